"""``metrics.jsonl``: the scalar stream of a run (what ``selfgrow inspect --plot`` draws)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ..events.record import as_float


class ScalarJsonlSink:
    """Controller sink writing ``log_scalars`` calls as JSON lines ``{"step": s, tag: value,
    ...}`` to ``metrics.jsonl`` (append; non-finite values dropped); ``log_row`` writes any
    other row (evaluation results) and flushes.

    Args:
        path: the JSONL file (appended to; several runs may share it).
        run_id: added as ``"run_id"`` to every row (``selfgrow inspect`` then keeps the rows
            of different runs apart); ``None``: rows carry no run id.
    """

    def __init__(self, path: str | os.PathLike[str], run_id: str | None = None) -> None:
        self.path = Path(path)
        self.run_id = run_id
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open

    def _tag(self, row: dict[str, Any]) -> dict[str, Any]:
        if self.run_id is not None and "run_id" not in row:
            row = {"run_id": self.run_id, **row}
        return row

    def emit(self, event: Any) -> None:
        """Growth events go to events.jsonl; nothing to do here."""

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        row: dict[str, Any] = {"step": int(step)}
        for k, v in scalars.items():
            fv = as_float(v)
            if fv is not None and math.isfinite(fv):
                row[k] = fv
        self._fh.write(json.dumps(self._tag(row)) + "\n")

    def log_row(self, row: dict[str, Any]) -> None:
        self._fh.write(json.dumps(self._tag(dict(row))) + "\n")
        self._fh.flush()

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()


def isatty(stream: Any) -> bool:
    """True for a terminal (progress bars are drawn only then)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False
