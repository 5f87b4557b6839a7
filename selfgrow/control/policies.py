"""Policies: signal states -> at most one growth decision per step (pure, Lightning style).

``policy.decide(states, ctx) -> (decision, reason)``:

* ``(None, reason)``: nothing to do (no signal wants growth);
* ``(Decision, reason)`` with ``decision.blocked is None``: grow now;
* ``(Decision, reason)`` with ``decision.blocked`` a :class:`SkipReason` (cooldown, warmup,
  window, max_growths, budget): a signal wanted growth but a limit stopped it; the controller
  logs it as a ``"skipped"`` event (rate-limited). A growth that was attempted and failed is
  logged with :attr:`SkipReason.ERROR`.

``decide`` never mutates anything; the controller reports what happened through
``policy.notify(decision, step, applied)``, which is where stateful policies (schedules)
advance. Counters such as the number of growths and the last growth step live in the
controller and reach the policy through :class:`PolicyContext`.
"""

from __future__ import annotations

import abc
import enum
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import GrowthConfigError, choices_message
from ..ops import OpConfig
from .signals import check_range

__all__ = [
    "BLOCK_REASONS",
    "Budget",
    "DIRECTIONS",
    "Decision",
    "Policy",
    "PolicyContext",
    "Rule",
    "RulePolicy",
    "SkipReason",
]

class SkipReason(enum.StrEnum):
    """Why a growth a signal wanted did not happen (``Decision.blocked``; the ``blocked``
    field of ``"skipped"`` events holds its value)."""

    COOLDOWN = "cooldown"
    WARMUP = "warmup"
    WINDOW = "window"
    MAX_GROWTHS = "max_growths"
    BUDGET = "budget"
    #: a prune would take the model below ``RulePolicy(prune_floor=...)``
    FLOOR = "floor"
    #: a change in the opposite direction (grow after prune, prune after grow) came too soon
    HYSTERESIS = "hysteresis"
    #: ``RulePolicy(max_prunes=...)`` reached
    MAX_PRUNES = "max_prunes"
    #: the growth was attempted and failed (operator, optimizer or probe error)
    ERROR = "error"


#: values of the limits a policy applies (every :class:`SkipReason` but ERROR)
BLOCK_REASONS = tuple(r.value for r in SkipReason if r is not SkipReason.ERROR)

Action = str | OpConfig
#: ``estimate(action, kwargs) -> {"params": int, "memory_bytes": int | None,
#: "flops_per_sample": float | None}`` for the model AFTER the growth
Estimator = Callable[[Action, Mapping[str, Any]], Mapping[str, Any]]


@dataclass
class Decision:
    """One growth the policy wants.

    Attributes:
        action: an action name (``"widen"``, resolved against the model family) or an
            operator config.
        kwargs: keyword arguments for the action (ignored for an OpConfig).
        reason: human-readable why.
        trigger: the triggering signal's state ``{signal, value, threshold, window, ...}``.
        blocked: ``None`` to grow now, else the :class:`SkipReason`.
        estimate: the budget estimate of the grown model, when one was computed.
        direction: ``"grow"`` or ``"prune"`` (the controller logs a ``"prune"`` event and
            counts it in ``n_prunes``), or None: taken from the operator
            (:attr:`~selfgrow.ops.Operator.shrinks`; schedules and manual growth). An explicit
            direction that disagrees with the operator is refused when applied.
    """

    action: Action
    kwargs: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    trigger: dict[str, Any] = field(default_factory=dict)
    blocked: SkipReason | None = None
    estimate: dict[str, Any] | None = None
    direction: str | None = None

    @property
    def go(self) -> bool:
        """True when the growth should happen now."""
        return self.blocked is None

    @property
    def action_name(self) -> str:
        """The action name, or the operator name for a config."""
        return self.action if isinstance(self.action, str) else type(self.action).name


@dataclass
class PolicyContext:
    """What a policy may know besides the signals (read-only).

    Attributes:
        step: current controller step (optimizer steps).
        n_params: parameter count of the live model.
        n_growths: growths applied so far.
        last_growth_step: step of the last growth, or None.
        last_attempt_step: step of the last growth attempt (applied or failed), or None.
        total_steps: planned length of training in steps, if known (warmup fractions, timing
            windows).
        estimate: callable giving the grown model's size for a candidate action (budget).
        n_prunes: prunes applied so far.
        last_prune_step: step of the last applied prune, or None.
        last_prune_attempt_step: step of the last prune attempt (applied or failed), or None.
    """

    step: int
    n_params: int
    n_growths: int = 0
    last_growth_step: int | None = None
    last_attempt_step: int | None = None
    total_steps: int | None = None
    estimate: Estimator | None = None
    n_prunes: int = 0
    last_prune_step: int | None = None
    last_prune_attempt_step: int | None = None


#: the two directions of a structural change (``Rule.direction``, ``Decision.direction``)
DIRECTIONS = ("grow", "prune")


@dataclass
class Budget:
    """Upper limits on the grown model; ``None`` = unlimited.

    Attributes:
        max_params: parameters (count).
        max_memory_bytes: training memory estimate (params + grads + optimizer state +
            activations, bytes; see :func:`selfgrow.control.sizing.estimate_memory`).
        max_flops_per_sample: forward FLOPs for one sample.
    """

    max_params: float | None = None
    max_memory_bytes: float | None = None
    max_flops_per_sample: float | None = None

    def __post_init__(self) -> None:
        for k in ("max_params", "max_memory_bytes", "max_flops_per_sample"):
            v = getattr(self, k)
            if v is not None:
                check_range(k, v, 0.0, math.inf, lo_open=True, hi_open=True)

    @property
    def unlimited(self) -> bool:
        return (
            self.max_params is None
            and self.max_memory_bytes is None
            and self.max_flops_per_sample is None
        )

    def check(self, estimate: Mapping[str, Any]) -> str:
        """Return ``""`` if ``estimate`` fits, else why not (e.g. ``"params 2.1e5 > 2e5"``).
        A growth whose size could not be estimated (``method == "unavailable"``) never fits:
        a budget is never bypassed silently."""
        if estimate.get("method") == "unavailable" and not self.unlimited:
            return f"size unknown: {estimate.get('error', 'no estimate')}"
        pairs = (
            ("params", self.max_params),
            ("memory_bytes", self.max_memory_bytes),
            ("flops_per_sample", self.max_flops_per_sample),
        )
        for key, limit in pairs:
            if limit is None:
                continue
            v = estimate.get(key)
            if v is None:
                continue
            if v > limit:
                return f"{key} {v:.4g} > {limit:.4g}"
        return ""

    def check_decision(self, d: Decision, ctx: PolicyContext) -> str:
        """Estimate the grown model for ``d`` (stored in ``d.estimate``) and :meth:`check` it:
        ``""`` if it fits, else why not. The one budget check every policy uses.

        Raises:
            GrowthConfigError: a limit is set but the context has no size estimator.
        """
        if self.unlimited:
            return ""
        if ctx.estimate is None:
            raise GrowthConfigError("a Budget is set but the context has no size estimator")
        d.estimate = dict(ctx.estimate(d.action, d.kwargs))
        return self.check(d.estimate)


class Policy(abc.ABC):
    """Base class of growth policies.

    Attributes:
        max_per_step: how many growths the controller may apply in one step (a schedule's
            CompoundGrow stage applies several).
        cooldown: steps between growths (the controller also uses it to rate-limit "skipped"
            events).
    """

    max_per_step: int = 1
    cooldown: int = 0

    @abc.abstractmethod
    def decide(
        self, states: Mapping[str, Mapping[str, Any]], ctx: PolicyContext
    ) -> tuple[Decision | None, str]:
        """Pure: signal states (name -> ``Signal.state()``) and context -> (decision, reason)."""

    def actions(self) -> list[Action]:
        """Every action this policy may emit (checked against the model at construction)."""
        return []

    def needs_total_steps(self) -> bool:
        """Whether decisions depend on ``ctx.total_steps`` (fractions)."""
        return False

    def needs_estimate(self) -> bool:
        """Whether decisions call ``ctx.estimate`` (a budget is set)."""
        return False

    def notify(self, decision: Decision, step: int, applied: bool) -> None:  # noqa: B027
        """The controller applied (or failed / skipped) ``decision`` at ``step``."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: B027 - stateless
        """Restore :meth:`state_dict` output."""


@dataclass
class Rule:
    """When signal ``signal`` is triggered, do ``action``.

    Attributes:
        signal: name of a signal (``Signal.name``).
        action: action name or operator config.
        kwargs: fixed keyword arguments for the action.
        from_state: ``{kwarg: state_key}``: copy values from the trigger's state into the
            action's kwargs (e.g. ``{"layers": "layers"}`` to widen the saturated layers).
        direction: ``"grow"`` (default) or ``"prune"``: a prune rule's action removes
            capacity (``"prune"``, ``ffn_remove_units``, ``remove_expert`` ...); it is subject
            to the policy's prune limits (floor, prune cooldown, hysteresis) instead of the
            growth limits, and is considered only on a step where no grow rule fired.
    """

    signal: str
    action: Action
    kwargs: dict[str, Any] = field(default_factory=dict)
    from_state: dict[str, str] = field(default_factory=dict)
    direction: str = "grow"

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise GrowthConfigError("Rule " + choices_message(
                "direction", self.direction, DIRECTIONS))
        if not isinstance(self.signal, str) or not self.signal:
            raise GrowthConfigError(f"Rule signal={self.signal!r} must be a signal name")
        if not isinstance(self.action, (str, OpConfig)):
            raise GrowthConfigError(
                f"Rule action={self.action!r} must be an action name or an OpConfig"
            )


def steps_or_fraction(what: str, v: float, total: int | None) -> int:
    """Steps from ``v``: an int (or integral float) is a step count, a float in (0, 1) a
    fraction of ``total`` steps (rounded up). The one conversion every policy uses.

    Raises:
        GrowthConfigError: a fraction while ``total`` is unknown.
    """
    if isinstance(v, float) and 0.0 < v < 1.0:
        if total is None:
            raise GrowthConfigError(f"{what}={v} is a fraction but total_steps is unknown")
        return int(math.ceil(v * total))
    return int(v)


class RulePolicy(Policy):
    """First triggered rule wins, subject to warmup, timing window, cooldown, max growths and
    budget (checked in that order; the budget is checked per rule, so a smaller growth further
    down the list may fit when the first does not).

    Grow and prune (self-evolving models): rules with ``direction="prune"`` remove capacity.
    A prune rule is considered only on a step where no grow rule fired (a model that lacks
    capacity is never pruned), and passes its own limits: warmup, ``max_prunes``,
    ``prune_cooldown`` (steps since the last prune or prune attempt), ``hysteresis`` (steps
    since the last GROWTH) and ``prune_floor`` (the pruned model, sized on a meta twin, keeps
    at least that many parameters). A growth, symmetrically, waits ``hysteresis`` steps after
    the last prune. The hysteresis is what stops the grow/prune oscillation of a model that
    sits at the edge of its capacity (prune -> loss rises -> grow -> new units idle -> prune):
    two changes in opposite directions are always at least ``hysteresis`` steps apart, so the
    number of direction reversals in ``T`` steps is at most ``T / hysteresis``. ``cooldown``
    and ``max_growths`` count growths only; ``growth_window`` limits growths only.

    Args:
        rules: ordered rules.
        budget: limits on the grown model.
        cooldown: minimum steps between two growths (or a growth and a failed attempt), >= 0.
        warmup_steps: no growth or prune before this step; an int counts steps, a float in
            (0, 1) is a fraction of ``total_steps``.
        max_growths: at most this many growths, or None.
        growth_window: ``(start, end)`` fractions of ``total_steps`` outside which no growth
            happens, or None.
        prune_floor: a prune never takes the model below this many parameters (None: no
            floor; at least one unit of every layer always stays).
        prune_cooldown: minimum steps between two prunes (or a prune and a failed prune
            attempt), >= 0.
        hysteresis: minimum steps between a change and the next one in the opposite
            direction, >= 0.
        max_prunes: at most this many prunes, or None.

    Raises:
        GrowthConfigError: a parameter is out of range.
    """

    def __init__(
        self,
        rules: Sequence[Rule],
        budget: Budget | None = None,
        cooldown: int = 0,
        warmup_steps: int | float = 0,
        max_growths: int | None = None,
        growth_window: tuple[float, float] | None = None,
        *,
        prune_floor: int | None = None,
        prune_cooldown: int = 0,
        hysteresis: int = 0,
        max_prunes: int | None = None,
    ) -> None:
        if isinstance(rules, Rule) or not hasattr(rules, "__iter__"):
            raise GrowthConfigError(
                f"RulePolicy needs a list of Rule, got {type(rules).__name__} {rules!r}; "
                f"wrap a single rule in a list: RulePolicy([rule])"
            )
        rules = list(rules)
        if not rules or not all(isinstance(r, Rule) for r in rules):
            raise GrowthConfigError(f"RulePolicy needs a non-empty list of Rule, got {rules!r}")
        for what, v in (("cooldown", cooldown), ("prune_cooldown", prune_cooldown),
                        ("hysteresis", hysteresis)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise GrowthConfigError(f"{what}={v!r} is out of range; valid: int >= 0")
        if isinstance(warmup_steps, float) and not warmup_steps.is_integer():
            check_range("warmup_steps (fraction)", warmup_steps, 0.0, 1.0, hi_open=True)
        elif warmup_steps < 0:
            raise GrowthConfigError(
                f"warmup_steps={warmup_steps!r} is out of range; valid: steps >= 0 or a "
                "fraction in [0, 1)"
            )
        for what, v in (("max_growths", max_growths), ("max_prunes", max_prunes)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise GrowthConfigError(f"{what}={v!r} is out of range; valid: int >= 0 or None")
        if prune_floor is not None and (isinstance(prune_floor, bool)
                                        or not isinstance(prune_floor, int) or prune_floor < 1):
            raise GrowthConfigError(f"prune_floor={prune_floor!r} is out of range; valid: a "
                                    f"parameter count >= 1, or None")
        if growth_window is not None:
            lo, hi = growth_window
            check_range("growth_window start", lo, 0.0, 1.0)
            check_range("growth_window end", hi, lo, 1.0)
        self.rules = rules
        self.budget = budget or Budget()
        self.cooldown = cooldown
        self.warmup_steps = warmup_steps
        self.max_growths = max_growths
        self.growth_window = growth_window
        self.prune_floor = prune_floor
        self.prune_cooldown = prune_cooldown
        self.hysteresis = hysteresis
        self.max_prunes = max_prunes

    def actions(self) -> list[Action]:
        return [r.action for r in self.rules]

    def needs_total_steps(self) -> bool:
        w = self.warmup_steps
        return self.growth_window is not None or (isinstance(w, float) and 0.0 < w < 1.0)

    def needs_estimate(self) -> bool:
        return not self.budget.unlimited or (
            self.prune_floor is not None and any(r.direction == "prune" for r in self.rules))

    def signals(self) -> list[str]:
        """Signal names the rules refer to."""
        return [r.signal for r in self.rules]

    def decide(
        self, states: Mapping[str, Mapping[str, Any]], ctx: PolicyContext
    ) -> tuple[Decision | None, str]:
        fired = [r for r in self.rules if states.get(r.signal, {}).get("triggered")]
        grow = [r for r in fired if r.direction == "grow"]
        if grow:
            return self._decide_grow([self._decision(r, states[r.signal]) for r in grow], ctx)
        if fired:  # prune rules only: no grow rule fired on this step
            return self._decide_prune([self._decision(r, states[r.signal]) for r in fired], ctx)
        return None, "no signal triggered"

    def _decide_grow(self, cands: list[Decision], ctx: PolicyContext
                     ) -> tuple[Decision | None, str]:
        check = None if self.budget.unlimited else self.budget.check_decision
        return self._choose(cands, self._limits(ctx), check, ctx, SkipReason.BUDGET)

    def _decide_prune(self, cands: list[Decision], ctx: PolicyContext
                      ) -> tuple[Decision | None, str]:
        check = None if self.prune_floor is None else self._floor_check
        return self._choose(cands, self._prune_limits(ctx), check, ctx, SkipReason.FLOOR)

    @staticmethod
    def _choose(cands: list[Decision], block: tuple[SkipReason, str] | None,
                check: Callable[[Decision, PolicyContext], str] | None, ctx: PolicyContext,
                code: SkipReason) -> tuple[Decision | None, str]:
        """The first candidate, blocked by the step's limits if any; else the first that
        passes ``check`` (a budget or the floor, ``""`` when it passes: a smaller change
        further down the list may pass when the first does not)."""
        first = cands[0]
        if block:
            first.blocked, why = block
            return first, f"{first.reason}; skipped: {why}"
        if check is None:
            return first, first.reason
        failed = ""
        for d in cands:
            why = check(d, ctx)
            if not why:
                return d, d.reason
            failed = failed or f"{d.action_name}: {why}"
        first.blocked = code
        return first, f"{first.reason}; skipped: {code.value} ({failed})"

    def _floor_check(self, d: Decision, ctx: PolicyContext) -> str:
        """``""`` when the pruned model keeps at least ``prune_floor`` parameters (sized on a
        meta twin, stored in ``d.estimate``), else why not. A prune whose size is unknown
        never passes: the floor is never bypassed silently."""
        floor = self.prune_floor
        if floor is None:
            return ""
        if ctx.n_params <= floor:
            return f"params {ctx.n_params:.4g} <= floor {floor:.4g}"
        if ctx.estimate is None:
            raise GrowthConfigError("prune_floor is set but the context has no size estimator")
        d.estimate = dict(ctx.estimate(d.action, d.kwargs))
        n = d.estimate.get("params")
        if d.estimate.get("method") == "failed":
            return ""  # an invalid prune: the real attempt fails through the logged path
        if n is None:
            return f"size unknown: {d.estimate.get('error', 'no estimate')}"
        if n < floor:
            return f"params after prune {n:.4g} < floor {floor:.4g}"
        return ""

    def _decision(self, rule: Rule, st: Mapping[str, Any]) -> Decision:
        kw = dict(rule.kwargs)
        for k, key in rule.from_state.items():
            if key in st:
                kw[k] = st[key]
        v = st.get("value")
        vtxt = f"{v:.4g}" if isinstance(v, (int, float)) else str(v)
        trig = {k: st.get(k) for k in ("signal", "value", "threshold", "window")}
        trig["signal"] = trig["signal"] or rule.signal
        for k in ("layers", "worst_experience", "entropy", "idle_fraction", "dead_fraction",
                  "component", "dominant", "scores", "components"):
            if k in st:
                trig[k] = st[k]
        name = rule.action if isinstance(rule.action, str) else type(rule.action).name
        if isinstance(kw.get("component"), str):
            name = f"{name} {kw['component']}"
        thr = st.get("threshold")
        reason = f"{rule.signal} triggered (value {vtxt}, threshold {thr}) -> {name}"
        return Decision(rule.action, kw, reason, trig, direction=rule.direction)

    def _warmup(self, ctx: PolicyContext) -> tuple[SkipReason, str] | None:
        warm = steps_or_fraction("warmup_steps", self.warmup_steps, ctx.total_steps)
        if ctx.step < warm:
            return SkipReason.WARMUP, f"warmup until step {warm} (now {ctx.step})"
        return None

    def _limits(self, ctx: PolicyContext) -> tuple[SkipReason, str] | None:
        block = self._warmup(ctx)
        if block:
            return block
        if self.growth_window is not None:
            if ctx.total_steps is None:
                raise GrowthConfigError("growth_window needs total_steps on the controller")
            lo, hi = (int(f * ctx.total_steps) for f in self.growth_window)
            if not lo <= ctx.step <= hi:
                why = f"outside growth window steps [{lo}, {hi}] (now {ctx.step})"
                return SkipReason.WINDOW, why
        if self.max_growths is not None and ctx.n_growths >= self.max_growths:
            return SkipReason.MAX_GROWTHS, f"max_growths={self.max_growths} reached"
        return (_cooldown("cooldown", (ctx.last_growth_step, ctx.last_attempt_step),
                          self.cooldown, ctx.step)
                or _hysteresis("growth", "prune", ctx.last_prune_step, self.hysteresis,
                               ctx.step))

    def _prune_limits(self, ctx: PolicyContext) -> tuple[SkipReason, str] | None:
        block = self._warmup(ctx)
        if block:
            return block
        if self.max_prunes is not None and ctx.n_prunes >= self.max_prunes:
            return SkipReason.MAX_PRUNES, f"max_prunes={self.max_prunes} reached"
        return (_cooldown("prune cooldown", (ctx.last_prune_step, ctx.last_prune_attempt_step),
                          self.prune_cooldown, ctx.step)
                or _hysteresis("prune", "growth", ctx.last_growth_step, self.hysteresis,
                               ctx.step))


def _cooldown(label: str, lasts: Sequence[int | None], steps: int, now: int
              ) -> tuple[SkipReason, str] | None:
    """COOLDOWN while fewer than ``steps`` steps passed since the latest of ``lasts``."""
    last = max((s for s in lasts if s is not None), default=None)
    if last is not None and now - last < steps:
        return SkipReason.COOLDOWN, f"{label} until step {last + steps} (now {now})"
    return None


def _hysteresis(change: str, other: str, last: int | None, steps: int, now: int
                ) -> tuple[SkipReason, str] | None:
    """HYSTERESIS while fewer than ``steps`` steps passed since the last change of the
    opposite direction (``other``, at step ``last``)."""
    if last is not None and now - last < steps:
        return SkipReason.HYSTERESIS, (
            f"hysteresis: no {change} until step {last + steps}, {steps} steps after the "
            f"{other} at step {last} (now {now})")
    return None
