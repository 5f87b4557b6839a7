"""Append-only JSONL event sink and a tolerant reader."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import EventFormatError
from .record import GrowthEvent


class JsonlSink:
    """Appends one event per line to ``path``; flushes and fsyncs after every event.

    Never truncates an existing file: a resumed run keeps appending to the same log.
    """

    def __init__(self, path: str | os.PathLike[str], fsync: bool = True) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fsync = fsync
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open on purpose

    def emit(self, event: GrowthEvent) -> None:
        self._fh.write(event.to_json() + "\n")
        self._fh.flush()
        if self._fsync:
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


@dataclass
class BadLine:
    """A line of ``events.jsonl`` that could not be read (1-based line number)."""

    lineno: int
    error: str
    text: str


def read_events(path: str | os.PathLike[str]) -> tuple[list[GrowthEvent], list[BadLine]]:
    """Read every valid event of a JSONL log; bad (truncated, corrupt) lines are returned
    separately with their line numbers instead of aborting the read.

    Raises:
        EventFormatError: ``path`` is not a path, does not exist or is not a file.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise EventFormatError(f"read_events needs a path, got {type(path).__name__} {path!r}")
    if not os.path.isfile(path):
        what = "is a directory" if os.path.isdir(path) else "does not exist"
        raise EventFormatError(f"event log {os.fspath(path)!r} {what}; pass an events.jsonl file")
    events: list[GrowthEvent] = []
    bad: list[BadLine] = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for i, line in enumerate(fh, start=1):
            s = line.strip()
            if not s:
                continue
            try:
                events.append(GrowthEvent.from_dict(json.loads(s)))
            except (json.JSONDecodeError, EventFormatError) as e:
                bad.append(BadLine(i, str(e), s[:200]))
    return events, bad
