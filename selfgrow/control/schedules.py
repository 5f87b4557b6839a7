"""Fixed growth schedules as policies (G_stack at a chosen step, CompoundGrow stages).

``FixedSchedule([(step, action_or_config, kwargs), ...])`` grows at given steps regardless of
signals. Several entries at the same step form a CompoundGrow stage: the controller applies
them all in that step, in list order. An entry's step may also be a fraction in (0, 1) of the
controller's ``total_steps``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import GrowthConfigError
from ..ops import OpConfig
from .policies import (
    Action,
    Budget,
    Decision,
    Policy,
    PolicyContext,
    SkipReason,
    steps_or_fraction,
)

__all__ = ["FixedSchedule"]

Entry = tuple[float, Action, Mapping[str, Any]]


class FixedSchedule(Policy):
    """Grow at fixed steps.

    Args:
        entries: ``(step, action_or_config)`` or ``(step, action_or_config, kwargs)`` tuples;
            ``step`` is an int (controller steps) or a float in (0, 1) (fraction of
            ``total_steps``). Entries are applied in step order, list order within a step.
        budget: optional limits; an entry over budget is skipped (logged) and dropped.

    Raises:
        GrowthConfigError: malformed entry or negative step.
    """

    max_per_step = 1_000_000

    def __init__(self, entries: Sequence[Sequence[Any]], budget: Budget | None = None) -> None:
        if isinstance(entries, (str, bytes)) or not hasattr(entries, "__iter__"):
            raise GrowthConfigError(
                f"FixedSchedule needs a list of (step, action[, kwargs]) entries, got "
                f"{entries!r}"
            )
        parsed: list[Entry] = []
        for e in entries:
            if not isinstance(e, (tuple, list)) or len(e) not in (2, 3):
                raise GrowthConfigError(
                    f"schedule entry {e!r} must be (step, action) or (step, action, kwargs)"
                )
            step, action = e[0], e[1]
            if len(e) == 3 and e[2] is not None and not isinstance(e[2], Mapping):
                raise GrowthConfigError(
                    f"schedule entry {e!r}: kwargs must be a dict of action arguments, got "
                    f"{type(e[2]).__name__} {e[2]!r}"
                )
            kwargs = dict(e[2]) if len(e) == 3 and e[2] is not None else {}
            if not isinstance(step, (int, float)) or isinstance(step, bool) or step < 0:
                raise GrowthConfigError(f"schedule step {step!r} must be a number >= 0")
            if isinstance(step, float) and not step.is_integer() and not 0.0 < step < 1.0:
                raise GrowthConfigError(
                    f"schedule step {step!r}: a float step must be a fraction in (0, 1)"
                )
            if not isinstance(action, (str, OpConfig)):
                raise GrowthConfigError(
                    f"schedule action {action!r} must be an action name or an OpConfig"
                )
            parsed.append((step, action, kwargs))
        self.entries = parsed
        self.budget = budget or Budget()
        self.done: list[bool] = [False] * len(parsed)

    def actions(self) -> list[Action]:
        return [a for _, a, _ in self.entries]

    def needs_total_steps(self) -> bool:
        return any(isinstance(s, float) and 0.0 < s < 1.0 for s, _, _ in self.entries)

    def needs_estimate(self) -> bool:
        return not self.budget.unlimited

    def _step_of(self, s: float, total: int | None) -> int:
        return steps_or_fraction("schedule step", s, total)

    def _pending(self, ctx: PolicyContext) -> int | None:
        order = sorted(
            (i for i, d in enumerate(self.done) if not d),
            key=lambda i: (self._step_of(self.entries[i][0], ctx.total_steps), i),
        )
        for i in order:
            if self._step_of(self.entries[i][0], ctx.total_steps) <= ctx.step:
                return i
            break
        return None

    def decide(
        self, states: Mapping[str, Mapping[str, Any]], ctx: PolicyContext
    ) -> tuple[Decision | None, str]:
        i = self._pending(ctx)
        if i is None:
            return None, "no scheduled growth due"
        s, action, kwargs = self.entries[i]
        at = self._step_of(s, ctx.total_steps)
        name = action if isinstance(action, str) else type(action).name
        d = Decision(
            action,
            dict(kwargs),
            f"scheduled {name} at step {at}",
            {"signal": "schedule", "value": float(at), "threshold": None, "window": None,
             "entry": i},
        )
        why = self.budget.check_decision(d, ctx)
        if why:
            d.blocked = SkipReason.BUDGET
            return d, f"{d.reason}; skipped: budget ({why})"
        return d, d.reason

    def notify(self, decision: Decision, step: int, applied: bool) -> None:
        i = decision.trigger.get("entry")
        if isinstance(i, int) and 0 <= i < len(self.done):
            self.done[i] = True  # applied, failed or over budget: never retried

    def state_dict(self) -> dict[str, Any]:
        return {"done": list(self.done)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        done = list(state["done"])
        if len(done) != len(self.entries):
            raise GrowthConfigError(
                f"schedule state has {len(done)} entries, this schedule has {len(self.entries)}"
            )
        self.done = [bool(x) for x in done]
