"""``auto``: the controller decides when and what to grow toward the target shape.

:class:`TowardTarget` is a :class:`~selfgrow.control.policies.Policy` over two signals:

* **when**: the training loss plateaus (:class:`~selfgrow.control.signals.LossPlateau`: the
  smoothed loss improved by less than ``min_rel_drop`` over its window);
* **what**: the remaining growth dimensions toward the target (``"depth"``: the depth
  operator; ``"width"``: d_model, heads and FFN together). Width goes first when
  :class:`~selfgrow.control.signals.GradientSaturation` reports saturated layers (they keep
  asking for change a narrow layer cannot make), depth first otherwise.

No growth step is set by hand. Two guards keep the run inside its budget: no growth before
``start`` (fraction of the budget; the first steps' loss always "improves") and a
``deadline``: a dimension still missing when ``deadline`` of the budget is spent is grown
then (the event's trigger says ``deadline``), so the target is always trained for at least
``1 - deadline`` of the budget.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..control.policies import Decision, Policy, PolicyContext, SkipReason
from ..errors import GrowthConfigError
from ..ops import OpConfig
from ..ops.compound import CompoundGrowConfig

__all__ = ["TowardTarget"]


class TowardTarget(Policy):
    """Grow the remaining dimensions toward a target when the loss plateaus.

    Args:
        steps: ``[(dimension, [operator configs]), ...]`` in default order (one compound
            growth event per dimension).
        progress: callable returning the fraction of the budget spent.
        start: no growth before this fraction, in [0, 1).
        deadline: grow whatever is left at this fraction, in (start, 1).
        plateau: name of the loss-plateau signal.
        saturation: name of the gradient-saturation signal (None: never reorder).

    Raises:
        GrowthConfigError: bad fractions or an empty dimension.
    """

    max_per_step = 1

    def __init__(
        self,
        steps: Sequence[tuple[str, Sequence[OpConfig]]],
        progress: Callable[[], float],
        start: float = 0.05,
        deadline: float = 0.6,
        plateau: str = "loss_plateau",
        saturation: str | None = "gradient_saturation",
    ) -> None:
        if not 0.0 <= start < deadline < 1.0:
            raise GrowthConfigError(
                f"auto growth window start={start!r}, deadline={deadline!r}; valid: "
                f"0 <= start < deadline < 1"
            )
        self.remaining: list[tuple[str, list[OpConfig]]] = []
        for dim, ops in steps:
            if not ops:
                raise GrowthConfigError(f"auto: dimension {dim!r} has no operators")
            self.remaining.append((dim, list(ops)))
        self.progress = progress
        self.start = float(start)
        self.deadline = float(deadline)
        self.plateau = plateau
        self.saturation = saturation

    def signals(self) -> list[str]:
        return [self.plateau] + ([self.saturation] if self.saturation else [])

    def decide(self, states: Mapping[str, Mapping[str, Any]], ctx: PolicyContext
               ) -> tuple[Decision | None, str]:
        if not self.remaining:
            return None, "target shape reached"
        p = self.progress()
        st = states.get(self.plateau, {})
        flat = bool(st.get("triggered"))
        forced = p >= self.deadline
        if not (flat or forced):
            return None, "loss still improving"
        sat = states.get(self.saturation, {}) if self.saturation else {}
        order = [d for d, _ in self.remaining]
        pick = "width" if sat.get("triggered") and "width" in order else order[0]
        ops = dict(self.remaining)[pick]
        action = ops[0] if len(ops) == 1 else CompoundGrowConfig(steps=list(ops))
        if forced and not flat:
            trig = {"signal": "deadline", "value": p, "threshold": self.deadline, "window": None}
            reason = (f"deadline: {p:.0%} of the budget spent (limit {self.deadline:.0%}) and "
                      f"{pick} not yet at the target -> grow {pick}")
        else:
            v = st.get("value")
            vt = f"{v:.4g}" if isinstance(v, (int, float)) else str(v)
            trig = {k: st.get(k) for k in ("signal", "value", "threshold", "window")}
            trig["signal"] = trig["signal"] or self.plateau
            why = (f"gradient saturation in {len(sat.get('layers') or [])} layers -> width"
                   if pick == "width" and sat.get("triggered") else f"next: {pick}")
            reason = (f"{self.plateau} triggered (relative improvement {vt} < "
                      f"{st.get('threshold')}) at {p:.0%} of the budget; {why}")
        trig["dimension"] = pick
        d = Decision(action, {}, reason, trig)
        if p < self.start:
            d.blocked = SkipReason.WARMUP
            return d, f"{reason}; skipped: before {self.start:.0%} of the budget"
        return d, reason

    def notify(self, decision: Decision, step: int, applied: bool) -> None:
        if applied:
            dim = decision.trigger.get("dimension")
            self.remaining = [(d, o) for d, o in self.remaining if d != dim]

    def state_dict(self) -> dict[str, Any]:
        return {"remaining": [d for d, _ in self.remaining]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        keep = set(state["remaining"])
        self.remaining = [(d, o) for d, o in self.remaining if d in keep]
