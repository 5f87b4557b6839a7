"""TensorBoard sink: growth events and training scalars as real TensorBoard event files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .record import STRUCTURE_KINDS, GrowthEvent, as_float


class TensorBoardSink:
    """Writes scalars and growth events with ``torch.utils.tensorboard.SummaryWriter``.

    Per growth event (at the event's ``step``): ``model/params`` (the parameter count after
    it: the same tag as the training scalars', so TensorBoard shows one parameter curve with
    the exact growth steps), ``growth/event``
    (1 at a growth), the trigger's value and threshold under ``signal/<name>`` and
    ``signal/<name>_threshold``, the preservation error, and a Markdown text record under
    ``growth/events``. ``log_scalars`` writes any ``{tag: value}`` mapping (loss, parameter
    count, every signal's value). Every emit flushes, so a crashed run keeps its events.

    Args:
        log_dir: directory of the event files (created if missing).
        flush_secs: SummaryWriter's background flush period in seconds.
        purge_step: a resumed run's first step: TensorBoard hides what an interrupted run
            logged at this step and later (``SummaryWriter(purge_step=...)``).

    Raises:
        DataUnavailableError-like ImportError message when ``tensorboard`` is missing.
    """

    def __init__(self, log_dir: str | os.PathLike[str], flush_secs: int = 10,
                 purge_step: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # pragma: no cover - tensorboard is a base dependency
            from ..errors import DataUnavailableError

            raise DataUnavailableError(
                "TensorBoardSink needs the package 'tensorboard': pip install tensorboard"
            ) from e
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._writer: Any = SummaryWriter(log_dir=str(self.log_dir), flush_secs=flush_secs,
                                          purge_step=purge_step)
        self._closed = False

    def emit(self, event: GrowthEvent) -> None:
        """Record one event (growth, skipped or anomaly) and flush."""
        if self._closed:
            return
        step = int(event.step) if event.step is not None else 0
        w = self._writer
        trig = event.trigger or {}
        sig = trig.get("signal")
        if event.kind in STRUCTURE_KINDS:
            w.add_scalar("model/params", event.params_after, step)
            w.add_scalar(f"{event.kind}/event", 1.0, step)
            pres = event.preservation or {}
            for key in ("max_abs", "max_rel"):
                if isinstance(pres.get(key), (int, float)):
                    w.add_scalar(f"growth/preservation_{key}", float(pres[key]), step)
        if sig:
            for key, tag in (("value", f"signal/{sig}"), ("threshold", f"signal/{sig}_threshold")):
                v = trig.get(key)
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    w.add_scalar(tag, float(v), step)
        w.add_text(f"growth/{event.kind}", _event_markdown(event), step)
        w.flush()

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        """Write ``{tag: value}`` at ``step`` (non-numeric values are skipped)."""
        if self._closed:
            return
        for tag, v in scalars.items():
            fv = as_float(v)  # Python / NumPy numbers, one-element tensors
            if fv is None:
                continue
            self._writer.add_scalar(tag, fv, int(step))

    def flush(self) -> None:
        if not self._closed:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the writer (idempotent)."""
        if not self._closed:
            self._writer.flush()
            self._writer.close()
            self._closed = True


def _experience(x: Any) -> str:
    """``experience 1 (id 0)``: ids are 0-based, user-facing numbers 1-based."""
    if isinstance(x, int) and not isinstance(x, bool):
        return f"experience {x + 1} (id {x})"
    return f"experience {x}"


def _event_markdown(event: GrowthEvent) -> str:
    trig = event.trigger or {}
    act = event.action or {}
    pres = event.preservation or {}
    lines = [
        f"**{event.kind}** #{event.seq} at step {event.step} ({_experience(event.experience)})",
        f"- trigger: `{trig.get('signal')}` value={trig.get('value')} "
        f"threshold={trig.get('threshold')}",
        f"- action: `{act.get('op')}` {json.dumps((act.get('config') or {}).get('data', {}))}",
        f"- params: {event.params_before} -> {event.params_after}",
        f"- preservation: max_abs={pres.get('max_abs')} max_rel={pres.get('max_rel')}",
    ]
    if event.reason:
        lines.append(f"- reason: {event.reason}")
    return "\n".join(lines)
