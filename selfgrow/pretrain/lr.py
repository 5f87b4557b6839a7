"""Learning-rate schedules of a pre-training run, as functions of training PROGRESS.

Progress ``p`` in [0, 1] is the fraction of the budget spent (FLOPs, or seconds for a
wall-clock budget), so a schedule is defined for a growing model whose step count is not
known in advance.

* ``"wsd"`` (warmup-stable-decay; Hu et al. 2024 MiniCPM, Hägele et al. 2024): linear warm-up
  over ``warmup``, constant, then linear decay to ``min_ratio`` over the last ``decay``.
* ``"cosine"``: linear warm-up, then cosine decay to ``min_ratio`` at ``p = 1``.

A growth's re-warm-up (the :class:`~selfgrow.control.stabilize.Stabilizer`) multiplies on
top of this value without changing it.
"""

from __future__ import annotations

import math

from ..control.signals import check_range
from ..errors import GrowthConfigError, choices_message

LR_SCHEDULES = ("wsd", "cosine")

__all__ = ["LR_SCHEDULES", "lr_multiplier", "check_lr_schedule"]


def check_lr_schedule(kind: str, warmup: float, decay: float, min_ratio: float) -> None:
    """Raise GrowthConfigError for an unknown schedule or an out-of-range fraction."""
    if kind not in LR_SCHEDULES:
        raise GrowthConfigError(choices_message("lr_schedule", kind, LR_SCHEDULES))
    check_range("warmup", warmup, 0.0, 1.0, hi_open=True)
    check_range("decay", decay, 0.0, 1.0)
    check_range("min_ratio", min_ratio, 0.0, 1.0)
    if warmup + (decay if kind == "wsd" else 0.0) > 1.0:
        raise GrowthConfigError(
            f"warmup={warmup} + decay={decay} exceed the whole run (their sum must be <= 1)"
        )


def lr_multiplier(kind: str, p: float, warmup: float = 0.02, decay: float = 0.2,
                  min_ratio: float = 0.0) -> float:
    """LR factor in [0, 1] at progress ``p`` (clamped to [0, 1])."""
    p = min(max(float(p), 0.0), 1.0)
    if warmup > 0 and p < warmup:
        return max(p / warmup, 1e-3)
    if kind == "wsd":
        start = 1.0 - decay
        if decay <= 0 or p < start:
            return 1.0
        return 1.0 - (1.0 - min_ratio) * (p - start) / decay
    q = (p - warmup) / max(1.0 - warmup, 1e-12)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * q))
