"""Stabilising training after growth: LR re-warm-up, permanent LR scale, gradient clipping.

The :class:`Stabilizer` composes with any LR scheduler without touching it: it registers an
optimizer step pre-hook that multiplies every param group's ``lr`` (whatever the user's
scheduler set) by the current factor and clips gradients, and a post-hook that restores the
exact ``lr`` values afterwards. Schedulers therefore never see the factor, and their
``base_lrs`` and chained updates stay correct.

Factor after a growth, ``k`` optimizer steps later (``k = 0`` on the first step)::

    factor(k) = scale * (rewarm_start + (1 - rewarm_start) * min(1, k / rewarm_steps))

where ``scale`` is multiplied by ``lr_scale_after`` at every growth (G_stack's recipe
halves the LR after stacking: ``lr_scale_after=0.5``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import GrowthConfigError
from .signals import check_range

__all__ = ["Stabilizer"]


class Stabilizer:
    """LR re-warm-up after each growth, optional permanent LR scale, gradient clipping.

    Args:
        rewarm_steps: optimizer steps to ramp the LR back to the scheduler's value after a
            growth; 0 disables re-warm-up.
        rewarm_start: LR fraction on the first step after growth, in (0, 1].
        lr_scale_after: permanent LR multiplier applied at every growth (cumulative), > 0;
            1.0 disables it.
        clip_grad_norm: max global grad norm (L2) clipped in the pre-step hook, or None.
        clip_only_during_rewarm: clip only while re-warming (otherwise on every step).

    Raises:
        GrowthConfigError: a parameter is out of range.
    """

    def __init__(
        self,
        rewarm_steps: int = 0,
        rewarm_start: float = 0.1,
        lr_scale_after: float = 1.0,
        clip_grad_norm: float | None = None,
        clip_only_during_rewarm: bool = False,
    ) -> None:
        if not isinstance(rewarm_steps, int) or rewarm_steps < 0:
            raise GrowthConfigError(
                f"rewarm_steps={rewarm_steps!r} is out of range; valid: an integer >= 0"
            )
        check_range("rewarm_start", rewarm_start, 0.0, 1.0, lo_open=True)
        check_range("lr_scale_after", lr_scale_after, 0.0, float("inf"), lo_open=True,
                    hi_open=True)
        if clip_grad_norm is not None:
            check_range("clip_grad_norm", clip_grad_norm, 0.0, float("inf"), lo_open=True,
                        hi_open=True)
        self.rewarm_steps = rewarm_steps
        self.rewarm_start = float(rewarm_start)
        self.lr_scale_after = float(lr_scale_after)
        self.clip_grad_norm = clip_grad_norm
        self.clip_only_during_rewarm = clip_only_during_rewarm
        self.scale = 1.0
        self.since_growth: int | None = None  # optimizer steps since the last growth
        self.n_growths = 0
        self._optimizer: torch.optim.Optimizer | None = None
        self._handles: list[Any] = []
        self._saved: list[float] | None = None

    # --- hooks ----------------------------------------------------------------------------------
    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Register the pre/post step hooks on ``optimizer`` (detaching from a previous one)."""
        if optimizer is self._optimizer and self._handles:
            return
        self.detach()
        self._optimizer = optimizer
        self._handles = [
            optimizer.register_step_pre_hook(self._pre),
            optimizer.register_step_post_hook(self._post),
        ]

    def detach(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._optimizer = None

    def rewarming(self) -> bool:
        """Whether the LR is currently being re-warmed."""
        return (
            self.rewarm_steps > 0
            and self.since_growth is not None
            and self.since_growth < self.rewarm_steps
        )

    def factor(self) -> float:
        """Multiplier the next optimizer step applies to every group's LR."""
        f = self.scale
        if self.rewarming():
            k = self.since_growth or 0
            f *= self.rewarm_start + (1.0 - self.rewarm_start) * k / self.rewarm_steps
        return f

    def _pre(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.clip_grad_norm is not None and (
            not self.clip_only_during_rewarm or self.rewarming()
        ):
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            if params:
                torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)
        f = self.factor()
        if f != 1.0:
            self._saved = [g["lr"] for g in optimizer.param_groups]
            for g in optimizer.param_groups:
                g["lr"] = _mul(g["lr"], f)

    def _post(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._saved is not None:
            for g, lr in zip(optimizer.param_groups, self._saved, strict=False):
                g["lr"] = lr
            self._saved = None
        if self.since_growth is not None:
            self.since_growth += 1

    # --- controller protocol ---------------------------------------------------------------------
    def on_growth(self, step: int) -> None:
        """A growth happened: restart re-warm-up and apply the permanent scale."""
        self.n_growths += 1
        self.scale *= self.lr_scale_after
        self.since_growth = 0

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "since_growth": self.since_growth, "n_growths": self.n_growths}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.scale = float(state["scale"])
        self.since_growth = state["since_growth"]
        self.n_growths = int(state["n_growths"])


def _mul(lr: Any, f: float) -> Any:
    if isinstance(lr, torch.Tensor):
        return lr * f
    return float(lr) * f
