"""GrowthController: framework-agnostic loop glue (signals -> policy -> grow_ -> sinks).

Usage in a plain PyTorch loop::

    ctrl = GrowthController(model, opt, signals=[LossPlateau(window=200)],
                            policy=RulePolicy([Rule("loss_plateau", "deepen")], cooldown=300),
                            log_dir="runs/exp1", probe=held_batch)
    for x, y in loader:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        ctrl.observe(loss=loss)        # may grow model and optimizer in place
    ctrl.close()

``observe`` is called once per optimizer step, after ``backward`` (signals such as
:class:`~selfgrow.control.signals.GradientSaturation` read ``p.grad``, so call it before the
next ``zero_grad``). The model and optimizer are grown in place: the optimizer object stays
the same, so LR schedulers and framework references keep working.
"""

from __future__ import annotations

import math
import os
import time
import uuid
import warnings
import weakref
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core import count_params, is_compiled, rng_isolated, unwrap_compiled
from ..errors import (
    BudgetExceededError,
    GrowthConfigError,
    GrowthFailedWarning,
    IncompatibleModelError,
    IncompatibleOptimizerError,
)
from ..events.jsonl import JsonlSink
from ..events.record import GrowthEvent
from ..models.moe import routing_scalars
from ..ops import (
    OpConfig,
    ProbeFn,
    default_probe_fn,
    estimate_growth,
    eval_output,
    get_operator,
    grow_,
)
from ..optim import ParamTransition, check_optimizer_holds_model, check_optimizer_supported
from ..runs.metrics import ScalarJsonlSink
from .actions import list_actions, resolve_action, unknown_action_message
from .policies import Action, Decision, Policy, PolicyContext, SkipReason
from .signals import Signal
from .sizing import estimate_memory, flops_per_sample
from .stabilize import Stabilizer
from .strategy import GrowthStrategy

__all__ = ["GrowthController"]

_GROW_ERRORS = (
    GrowthConfigError,
    IncompatibleModelError,
    IncompatibleOptimizerError,
    BudgetExceededError,
)
STATE_VERSION = 1


def _optimizer_state_tensors(opt: torch.optim.Optimizer | None) -> int:
    """Per-element state tensors the optimizer keeps (Adam family 2, SGD momentum 1 ...)."""
    if opt is None:
        return 0
    for st in opt.state.values():
        return sum(1 for v in st.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    return 2  # not stepped yet: assume Adam's two moments


def _loss_value(loss: Any) -> float:
    """A loss as a float; the project's error for anything that is not one number."""
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise GrowthConfigError(
                f"loss must be a scalar (one element), got a tensor of shape "
                f"{tuple(loss.shape)}; reduce it first (e.g. loss.mean())"
            )
        return float(loss.detach())
    if isinstance(loss, bool) or not isinstance(loss, (int, float)):
        try:
            import numpy as np

            if isinstance(loss, np.generic) and loss.size == 1:
                return float(loss)
        except ImportError:  # pragma: no cover - numpy comes with torch
            pass
        raise GrowthConfigError(f"loss must be a number or a scalar tensor, got "
                                f"{type(loss).__name__} {loss!r:.60}")
    return float(loss)


def _default_run_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


class GrowthController:
    """Watches training signals and grows the live model through :func:`selfgrow.grow_`.

    Args:
        model: the live model, or a ``torch.compile`` wrapper of it (:attr:`model` is then
            the real module, :attr:`wrapped_model` the wrapper).
        optimizer: its optimizer (migrated in place at every growth); may be None.
        signals: signals to update at every ``observe``; names must be unique.
        policy: decides from the signals' states; None = manual growth only.
        log_dir: directory for ``events.jsonl`` (JsonlSink: append, flush, fsync per event)
            and ``metrics.jsonl`` (loss, parameter count and signal values every
            ``scalar_every`` steps: the panels of ``selfgrow inspect --plot``).
        sinks: extra sinks: objects with ``emit(event)``, optionally
            ``log_scalars(step, dict[str, float])`` and ``close()``.
        probe: held batch on which the preservation error is measured at every growth (and
            FLOPs per sample counted).
        probe_fn: alternative to ``probe``: ``model -> Tensor``.
        run_id: identifier written into every event (default: timestamp + random suffix).
        provides: metric keys the caller promises to pass to ``observe`` (``loss`` is
            implied); a signal requiring anything else raises at construction.
        stabilizer: LR re-warm-up / scaling / clipping after growth (see
            :class:`~selfgrow.control.stabilize.Stabilizer`).
        total_steps: planned training length in steps (for fractional warmup, timing windows
            and fractional schedule steps).
        scalar_every: emit signal values and ``n_params`` to sinks' ``log_scalars`` every N
            steps.
        skip_log_every: "skipped" events with the same block reason (cooldown, budget ...) are
            logged at most once per this many steps; a new reason is logged at once (default:
            the policy's cooldown, or 100 without one). Non-finite-loss streaks are re-logged
            at the same period.
        memory_spec: keyword arguments for
            :func:`~selfgrow.control.sizing.estimate_memory` (batch_size, input_shape or
            seq_len, optimizer_kind, dtype), used when the budget limits memory.
        measure_flops: count forward FLOPs per probe sample before and after every growth.
        strict: a growth the policy decided that fails (incompatible optimizer, operator
            error, probe failure) raises its error after the ``skipped`` event is logged.
            Default False: the event is logged, a :class:`~selfgrow.errors.GrowthFailedWarning`
            is issued once per distinct reason, and training goes on with the model,
            optimizer and gradients unchanged.
        distributed: how the controller runs across processes (a
            :class:`~selfgrow.control.strategy.GrowthStrategy`): ``None`` is one process;
            :class:`~selfgrow.control.distributed.DDPStrategy` keeps DDP ranks in lock-step
            (metrics averaged over ranks, one decision on rank 0, the same growth on every
            rank, a fresh DDP wrapper in :attr:`wrapped_model`).

    Randomness: the controller draws nothing from the global random streams (operators use
    their configs' seeded generators, and every call runs under
    :func:`~selfgrow.core.rng_isolated`), so a run whose policy never grows is bitwise
    identical to the same run without a controller.

    Raises:
        GrowthConfigError: duplicate signal names, a rule referring to a missing signal, a
            required metric not in ``provides``, or ``total_steps`` missing where needed.
        IncompatibleModelError: the policy uses an action this model family does not offer,
            or the probe does not run on the model.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        signals: Sequence[Signal] = (),
        policy: Policy | None = None,
        *,
        log_dir: str | None = None,
        sinks: Iterable[Any] = (),
        probe: Any = None,
        probe_fn: ProbeFn | None = None,
        run_id: str | None = None,
        provides: Iterable[str] | None = None,
        stabilizer: Stabilizer | None = None,
        total_steps: int | None = None,
        scalar_every: int = 10,
        skip_log_every: int | None = None,
        memory_spec: Mapping[str, Any] | None = None,
        measure_flops: bool = True,
        strict: bool = False,
        distributed: GrowthStrategy | None = None,
    ) -> None:
        if distributed is not None and not isinstance(distributed, GrowthStrategy):
            raise GrowthConfigError(
                f"distributed must be a GrowthStrategy (DDPStrategy(...)), got "
                f"{type(distributed).__name__}")
        #: the distribution strategy (one process by default)
        self.distributed: GrowthStrategy = distributed or GrowthStrategy()
        if not isinstance(model, nn.Module):
            raise IncompatibleModelError(f"model must be an nn.Module, got {type(model).__name__}")
        #: the ``torch.compile`` wrapper passed as ``model`` (None otherwise): the controller
        #: grows its real module and hands the wrapper back as :attr:`wrapped_model`
        self._compiled: nn.Module | None = model if is_compiled(model) else None
        model = unwrap_compiled(model)
        model, log_dir, run_id = self.distributed.setup(model, optimizer, log_dir, run_id)
        if isinstance(signals, Signal) or not hasattr(signals, "__iter__"):
            raise GrowthConfigError(
                f"signals must be a list of Signal instances, got {type(signals).__name__} "
                f"{signals!r:.80}; wrap a single signal in a list: signals=[signal]"
            )
        signals = list(signals)
        for s in signals:
            if not isinstance(s, Signal):
                raise GrowthConfigError(
                    f"signals must be Signal instances (LossPlateau(...), ReplayForgetting(...)"
                    f" ...), got {type(s).__name__} {s!r:.80}"
                )
        names = [s.name for s in signals]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise GrowthConfigError(
                f"duplicate signal names {dup}; give each a distinct name=... argument"
            )
        if policy is not None and not isinstance(policy, Policy):
            raise GrowthConfigError(f"policy must be a Policy, got {type(policy).__name__}")
        if not isinstance(scalar_every, int) or scalar_every < 1:
            raise GrowthConfigError(f"scalar_every={scalar_every!r} is out of range; valid: >= 1")
        if total_steps is not None and (not isinstance(total_steps, int) or total_steps < 1):
            raise GrowthConfigError(f"total_steps={total_steps!r} is out of range; valid: >= 1")
        self.signals = signals
        self.policy = self.distributed.wrap_policy(policy) if policy is not None else None
        self.stabilizer = stabilizer
        self.total_steps = total_steps
        self.scalar_every = scalar_every
        self.memory_spec = dict(memory_spec or {})
        self.measure_flops = measure_flops
        self.strict = bool(strict)
        self.probe = probe
        self.probe_fn = probe_fn if probe_fn is not None else (
            default_probe_fn(probe) if probe is not None else None
        )
        if self.probe_fn is not None:  # a probe that cannot run fails here, not at every growth
            try:
                with rng_isolated():
                    eval_output(model, self.probe_fn)
            except Exception as e:  # noqa: BLE001 - the user's probe
                raise IncompatibleModelError(
                    f"the probe does not run on the model ({type(e).__name__}: {e}); pass a "
                    f"batch the model accepts (probe=...) or probe_fn=model->Tensor"
                ) from e
        self.run_id = run_id or _default_run_id()
        self.sinks: list[Any] = []
        sinks = list(sinks)
        #: the ``metrics.jsonl`` sink of ``log_dir`` (None without a log directory)
        self.metrics_sink: ScalarJsonlSink | None = None
        if log_dir is not None:
            if not isinstance(log_dir, (str, os.PathLike)):
                raise GrowthConfigError(
                    f"log_dir must be a directory path, got {type(log_dir).__name__} {log_dir!r}"
                )
            if Path(log_dir).exists() and not Path(log_dir).is_dir():
                raise GrowthConfigError(f"log_dir {os.fspath(log_dir)!r} exists and is not a "
                                        f"directory")
            self.sinks.append(JsonlSink(Path(log_dir) / "events.jsonl"))
            path = (Path(log_dir) / "metrics.jsonl").resolve()
            given = [s for s in sinks if isinstance(s, ScalarJsonlSink)
                     and Path(s.path).resolve() == path]
            # a caller that already passes a sink on this file keeps it (one writer per file)
            self.metrics_sink = given[0] if given else ScalarJsonlSink(path, run_id=self.run_id)
            if not given:
                self.sinks.append(self.metrics_sink)
        self.sinks.extend(sinks)
        for s in self.sinks:
            if not callable(getattr(s, "emit", None)):
                raise GrowthConfigError(f"sink {s!r} has no emit(event) method")
        if optimizer is not None:  # a wrong optimizer fails here, not at every growth
            check_optimizer_holds_model(optimizer, model)
        for s in signals:  # one signal's history belongs to one live controller
            owner = getattr(s, "_selfgrow_owner", None)
            other = owner() if owner is not None else None
            if other is not None and other is not self and not other._closed:
                raise GrowthConfigError(
                    f"signal {s.name!r} ({type(s).__name__}) already belongs to another "
                    f"GrowthController (its history would be shared); create a new instance "
                    f"for each controller, or close() the other one first")
        cooldown = getattr(policy, "cooldown", 0) if policy is not None else 0
        self.skip_log_every = skip_log_every or (cooldown if cooldown > 0 else 100)

        # counters (state_dict)
        self.step = 0
        self.seq = 0
        self.epoch: int | None = None
        self.experience: int | None = None
        self.n_growths = 0
        #: the last committed growth's ParamTransition (old/new parameters and ParamMaps),
        #: kept only when ``keep_transition`` is set (it holds the old tensors) by a consumer
        #: of per-parameter state (GrowthPlugin), which sets it back to None once used
        self.keep_transition = False
        self.last_transition: ParamTransition | None = None
        self.last_growth_step: int | None = None
        self.last_attempt_step: int | None = None
        #: prunes applied (shrink operators), the step of the last one and of the last
        #: prune attempt (applied or failed)
        self.n_prunes = 0
        self.last_prune_step: int | None = None
        self.last_prune_attempt_step: int | None = None
        self.n_anomalies = 0
        self.n_skipped = 0
        self._anomaly_streak = 0
        self._last_anomaly_log: int | None = None
        self._last_skip: tuple[str, ...] | None = None
        self._last_skip_step: int | None = None
        self._estimates: dict[tuple[Any, ...], dict[str, Any]] = {}
        self._warned: set[tuple[str, ...]] = set()
        self._last_loss: float | None = None
        self.events: list[GrowthEvent] = []
        self._optimizer: torch.optim.Optimizer | None = None
        self._model = model
        self.optimizer = optimizer
        self._closed = False
        for s in self.signals:
            s.bind(model)
            s._selfgrow_owner = weakref.ref(self)  # type: ignore[attr-defined]
        self._validate(provides)
        self.distributed.bind(self)

    # --- plain attributes an adapter may reassign ----------------------------------------------
    @property
    def wrapped_model(self) -> nn.Module:
        """The module the training loop calls: :attr:`model` on one process, its current
        ``DistributedDataParallel`` wrapper under :class:`~selfgrow.control.distributed.
        DDPStrategy` (replaced after every growth: fetch it every step). A ``torch.compile``
        wrapper passed as ``model`` is returned on one process (it runs the grown module:
        ``grow_`` drops its stale compiled code), while :attr:`model` is the plain module."""
        if (self._compiled is not None and type(self.distributed) is GrowthStrategy
                and unwrap_compiled(self._compiled) is self._model):
            return self._compiled
        return self.distributed.wrapped(self._model)

    @property
    def model(self) -> nn.Module:
        """The live model (reassigning it rebinds the signals)."""
        return self._model

    @model.setter
    def model(self, model: nn.Module) -> None:
        self._model = model
        self._estimates.clear()
        for s in self.signals:
            s.bind(model)

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer migrated at every growth (reassigning re-attaches the stabilizer)."""
        return self._optimizer

    @optimizer.setter
    def optimizer(self, opt: torch.optim.Optimizer | None) -> None:
        if opt is not None:
            check_optimizer_supported(opt)  # LBFGS / unknown optimizers: refused up front
        old = self._optimizer
        if self.stabilizer is not None and old is not None and opt is not old:
            self.stabilizer.detach()
        self._optimizer = opt
        if self.stabilizer is not None and opt is not None:
            self.stabilizer.attach(opt)

    # --- validation -------------------------------------------------------------------------
    def _validate(self, provides: Iterable[str] | None) -> None:
        names = {s.name for s in self.signals}
        pol = self.policy
        if pol is not None:
            for sig in getattr(pol, "signals", lambda: [])():
                if sig not in names:
                    raise GrowthConfigError(
                        f"policy rule refers to signal {sig!r}, which is not among the "
                        f"controller's signals: {', '.join(sorted(names)) or 'none'}"
                    )
            if pol.needs_total_steps() and self.total_steps is None:
                raise GrowthConfigError(
                    "the policy uses fractions of training (warmup, timing window or schedule "
                    "steps); pass total_steps=... to GrowthController"
                )
            avail = set(list_actions(self.model))
            for a in pol.actions():
                if isinstance(a, str) and a not in avail:
                    raise IncompatibleModelError(unknown_action_message(a, self.model, avail))
            # resolve each rule's action once now, so bad arguments fail at construction and
            # not every time the rule fires (rules filled from signal state are checked then)
            for rule in getattr(pol, "rules", []):
                cfg = rule.action if isinstance(rule.action, OpConfig) else None
                if isinstance(rule.action, str) and not rule.from_state:
                    try:
                        cfg = resolve_action(rule.action, self.model, **rule.kwargs)
                        get_operator(cfg).validate(self.model, cfg)
                    except GrowthConfigError as e:
                        raise GrowthConfigError(
                            f"rule {rule.signal!r} -> {rule.action!r}: {e}"
                        ) from None
                direction = getattr(rule, "direction", "grow")
                shrinks = cfg is not None and get_operator(cfg).is_shrink(cfg)
                if cfg is not None and shrinks != (direction == "prune"):
                    raise GrowthConfigError(
                        f"rule {rule.signal!r} -> {rule.action!r} has direction={direction!r}"
                        f" but operator {cfg.name!r} "
                        + ("removes capacity; use direction='prune'" if direction == "grow"
                           else "does not remove capacity; a prune rule needs a shrink "
                           "operator or the family's 'prune' action"))
        budget = getattr(pol, "budget", None) if pol is not None else None
        if budget is not None and budget.max_memory_bytes is not None:
            spec = self.memory_spec
            if not (spec.get("make_input") or spec.get("input_shape") or spec.get("seq_len")):
                raise GrowthConfigError(
                    "Budget(max_memory_bytes=...) needs memory_spec=dict(batch_size=..., "
                    "input_shape=(...) or seq_len=...) to estimate the training memory "
                    "(see selfgrow.control.estimate_memory)"
                )
        if provides is not None:
            have = set(provides) | {"loss"}
            for s in self.signals:
                missing = [k for k in s.requires if k not in have]
                if missing:
                    raise GrowthConfigError(
                        f"signal {s.name!r} requires metrics {missing} that the caller does not "
                        f"provide (provides={sorted(have)})"
                    )

    # --- the per-step entry point ----------------------------------------------------------------
    def observe(
        self,
        loss: Any = None,
        step: int | None = None,
        epoch: int | None = None,
        experience: int | None = None,
        **metrics: Any,
    ) -> GrowthEvent | None:
        """Report one optimizer step; may grow the model and optimizer in place.

        Args:
            loss: training loss of this step (tensor or float); non-finite values are counted
                as anomalies, skip every signal update and never cause growth.
            step: explicit step number (default: previous step + 1; the first is 1).
            epoch: current epoch (recorded in events; sticky).
            experience: current continual-learning experience (recorded; sticky).
            **metrics: extra metrics for signals (``val_loss``, ``replay_accuracy``,
                ``experience_end_accuracy``, ``router_stats`` ...).

        Returns:
            The growth event if the model grew at this step (the last one for a compound
            stage), else None.

        Raises:
            Only with ``strict=True``: the error of a decided growth that failed.
            DistributedGrowthError: under a distributed strategy, ranks differ after a growth.
        """
        if loss is not None:
            metrics["loss"] = loss
        metrics = self.distributed.reduce(metrics)
        loss = metrics.pop("loss", None)
        attempts, n_before = self.distributed.attempts(), self.n_changes
        try:
            with rng_isolated():
                return self._observe(loss, step, epoch, experience, metrics)
        finally:
            if self.distributed.attempts() != attempts:
                self.distributed.after_change(self, n_before)

    def _observe(
        self,
        loss: Any,
        step: int | None,
        epoch: int | None,
        experience: int | None,
        metrics: dict[str, Any],
    ) -> GrowthEvent | None:
        lv = _loss_value(loss) if loss is not None else None  # refused: the step stays
        self.step = int(step) if step is not None else self.step + 1
        if epoch is not None:
            self.epoch = epoch
        if experience is not None:
            self.experience = experience
        if lv is not None:
            if not math.isfinite(lv):
                self._anomaly(lv)
                return None
            self._anomaly_streak = 0
            self._last_loss = lv
            metrics["loss"] = lv
        if self.experience is not None:
            metrics.setdefault("experience", self.experience)
        if self.epoch is not None:
            metrics.setdefault("epoch", self.epoch)
        for s in self.signals:
            if self.step % s.every:
                continue
            if all(metrics.get(k) is not None for k in s.requires) or any(
                metrics.get(k) is not None for k in s.optional
            ):
                s.update(self.step, metrics)
        if self.step % self.scalar_every == 0:
            self._log_scalars()
        if self.policy is None:
            return None
        event = None
        for _ in range(max(1, self.policy.max_per_step)):
            decision, reason = self.make_decision()
            if decision is None:
                break
            if not decision.go:
                self._skipped(decision, reason)
                self.policy.notify(decision, self.step, applied=False)
                break
            ev = self._apply(decision, reason, raise_errors=False)
            if ev is None:
                break
            event = ev
        return event

    def grow(self, config_or_action: Action, reason: str = "manual", *,
             trigger: Mapping[str, Any] | None = None, **action_kwargs: Any) -> GrowthEvent:
        """Grow now through the same path as automatic growth (event logged, optimizer
        migrated, stabilizer re-warmed). Budget and cooldown are not applied.

        Args:
            config_or_action: operator config or action name (resolved for this model).
            reason: free text recorded in the event.
            trigger: what decided the growth, recorded as the event's trigger (default
                ``{"signal": "manual"}``; a schedule passes ``{"signal": "schedule",
                "value": progress, "threshold": stage fraction}``).
            **action_kwargs: arguments of the action.

        Raises:
            GrowthConfigError / IncompatibleModelError / IncompatibleOptimizerError: the growth
                is invalid; model and optimizer are unchanged.
        """
        return self._manual(config_or_action, reason, trigger, action_kwargs, direction=None)

    def prune(self, config_or_action: Action, reason: str = "manual", *,
              trigger: Mapping[str, Any] | None = None, **action_kwargs: Any) -> GrowthEvent:
        """Prune now (a shrink operator or the family's ``"prune"`` action) through the same
        path as automatic prunes: a ``"prune"`` event logged, optimizer state of the kept
        coordinates kept, removed ones dropped. Floor, cooldown and hysteresis are not
        applied. Same arguments and errors as :meth:`grow`; refuses an operator that does
        not remove capacity (GrowthConfigError)."""
        return self._manual(config_or_action, reason, trigger, action_kwargs,
                            direction="prune")

    def _manual(self, config_or_action: Action, reason: str,
                trigger: Mapping[str, Any] | None, action_kwargs: dict[str, Any],
                direction: str | None) -> GrowthEvent:
        """The path shared by :meth:`grow` and :meth:`prune` (errors always raise)."""
        trig = {"signal": "manual", "value": None, "threshold": None, "window": None}
        if trigger is not None:
            if not isinstance(trigger, Mapping):
                raise GrowthConfigError(f"trigger must be a dict, got {trigger!r}")
            trig.update(trigger)
        d = Decision(config_or_action, dict(action_kwargs), reason, trig, direction=direction)
        n_before = self.n_changes
        self.distributed.before_manual(self.step)
        try:
            with rng_isolated():
                ev = self._apply(d, reason, raise_errors=True)
        finally:
            self.distributed.after_manual()
        if ev is None:  # pragma: no cover - raise_errors=True always returns or raises
            raise GrowthConfigError(f"{direction or 'growth'} failed")
        self.distributed.after_change(self, n_before)
        return ev

    @property
    def n_changes(self) -> int:
        """Structural changes applied so far: growths plus prunes."""
        return self.n_growths + self.n_prunes

    def check_limits(self, action: Action, **action_kwargs: Any) -> str:
        """Whether growing by ``action`` now stays within the policy's ``max_growths`` and
        ``budget`` (sized on a meta twin, nothing allocated): ``""`` if it does, else why
        not (e.g. ``"params 2.1e5 > 2e+05"``). For callers that decide growth themselves
        (a capacity probe) and then call :meth:`grow`, which applies no limit."""
        pol = self.policy
        mg = getattr(pol, "max_growths", None)
        if mg is not None and self.n_growths >= mg:
            return f"max_growths={mg} reached"
        budget = getattr(pol, "budget", None)
        if budget is None or budget.unlimited:
            return ""
        return str(budget.check(self._estimate(action, dict(action_kwargs))))

    def make_decision(self) -> tuple[Decision | None, str]:
        """Ask the policy for this step's decision from the signals' current states.

        This is the seam for distributed training: a DDP wrapper decides on rank 0 and
        broadcasts the result so that every rank grows identically.
        """
        if self.policy is None:
            return None, "no policy"
        states = {s.name: s.state() for s in self.signals}
        return self.policy.decide(states, self._context())

    # --- internals ----------------------------------------------------------------------------
    def _n_params(self) -> int:
        """Parameter count, cached until the next growth through this controller (or a
        change of ``self.model``)."""
        key = (id(self.model), self.n_changes)
        if getattr(self, "_n_params_key", None) != key:
            self._n_params_key = key
            self._n_params_val = count_params(self.model)
        return self._n_params_val

    def _context(self) -> PolicyContext:
        return PolicyContext(
            step=self.step,
            n_params=self._n_params(),
            n_growths=self.n_growths,
            last_growth_step=self.last_growth_step,
            last_attempt_step=self.last_attempt_step,
            total_steps=self.total_steps,
            estimate=self._estimate,
            n_prunes=self.n_prunes,
            last_prune_step=self.last_prune_step,
            last_prune_attempt_step=self.last_prune_attempt_step,
        )

    def _resolve(self, action: Action, kwargs: Mapping[str, Any],
                 model: nn.Module | None = None) -> OpConfig:
        if isinstance(action, OpConfig):
            return action
        return resolve_action(action, self.model if model is None else model, **dict(kwargs))

    def _estimate(self, action: Action, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Size of the model after ``action``, never by copying its data: the operator runs on
        a shape-only meta twin (:func:`selfgrow.ops.estimate_growth`: exact parameter
        counts, nothing allocated). Memory: the current :func:`estimate_memory` plus the new
        parameters' bytes for weights, gradients and the optimizer's state tensors, with the
        activation term scaled by the parameter ratio. FLOPs per sample: the current count
        scaled by the parameter ratio (matmul FLOPs grow with the weights they multiply;
        attention's sequence-length term is not rescaled)."""
        key = (self.n_changes, self._n_params(), repr(action), repr(sorted(kwargs.items())))
        if key in self._estimates:
            return self._estimates[key]
        budget = getattr(self.policy, "budget", None)
        need_mem = budget is not None and budget.max_memory_bytes is not None
        need_flops = budget is not None and budget.max_flops_per_sample is not None
        est: dict[str, Any] = {"params": None, "memory_bytes": None, "flops_per_sample": None}
        try:
            view = self.distributed.plain_view(self.model)
            cfg = self._resolve(action, kwargs, view)
            try:
                g = estimate_growth(view, cfg)
                est["method"] = "meta_twin"
            except _GROW_ERRORS:
                raise
            except Exception as e:  # noqa: BLE001 - an operator whose apply needs real values
                analytic = getattr(cfg, "estimate_params", None)
                if not callable(analytic):
                    est["method"] = "unavailable"
                    est["error"] = (
                        f"{type(cfg).__name__} cannot be sized on a meta twin ({type(e).__name__}:"
                        f" {e}); give the config an estimate_params(model) method"
                    )
                    self._estimates[key] = est
                    return est
                n0 = self._n_params()
                n1 = int(analytic(self.model))
                b = next(iter(self.model.parameters())).element_size()
                g = {"params_before": n0, "params_after": n1, "param_bytes_before": n0 * b,
                     "param_bytes_after": n1 * b}
                est["method"] = "analytic"
            est["params"] = int(g["params_after"])
            ratio = g["params_after"] / max(g["params_before"], 1)
            if need_mem:
                mem = estimate_memory(self.model, **self.memory_spec)
                per_param = 2 + _optimizer_state_tensors(self.optimizer)  # weight, grad, state
                grown = (g["param_bytes_after"] - g["param_bytes_before"]) * per_param
                est["memory_bytes"] = int(mem["total"] + grown
                                          + mem.get("activations", 0) * (ratio - 1))
            if need_flops and self.probe_fn is not None:
                f = self._flops()
                est["flops_per_sample"] = None if f is None else f * ratio
        except _GROW_ERRORS as e:
            # an invalid growth: let the decision through so that the real attempt fails
            # through the logged, rolled-back path instead of inside the policy
            est["method"] = "failed"
            est["error"] = f"{type(e).__name__}: {e}"
        self._estimates[key] = est
        return est

    def _apply(self, d: Decision, reason: str, raise_errors: bool) -> GrowthEvent | None:
        opt = self.optimizer
        try:
            # under a sharding strategy the scope swaps in a gathered plain model: the action
            # is resolved and the operator applied on it, then it is sharded again
            with self.distributed.growth_scope(self):
                opt = self.optimizer
                cfg = self._resolve(d.action, d.kwargs)
                shrinks = bool(get_operator(cfg).is_shrink(cfg))
                if d.direction is None:
                    d.direction = "prune" if shrinks else "grow"
                elif shrinks != (d.direction == "prune"):
                    raise GrowthConfigError(
                        f"action {d.action_name!r} resolved to operator {cfg.name!r}, which "
                        + ("removes capacity: give its rule direction='prune' (or call "
                           "controller.prune)" if shrinks else
                           "does not remove capacity: a prune needs a shrink operator (the "
                           "family's 'prune' action, ffn_remove_units, remove_expert ...)"))
                flops_before = self._flops()
                ev = grow_(self.model, cfg, optimizer=opt, probe_fn=self.probe_fn,
                           on_commit=self._keep_transition if self.keep_transition else None)
                flops_after = self._flops()
        except Exception as e:  # noqa: BLE001 - grow_ rolled everything back; report it loudly
            if raise_errors:
                raise
            if d.direction == "prune":
                self.last_prune_attempt_step = self.step
            else:
                self.last_attempt_step = self.step
            if self.policy is not None:
                self.policy.notify(d, self.step, applied=False)
            d.blocked = SkipReason.ERROR
            why = f"growth failed: {type(e).__name__}: {e}"
            self._skipped(d, f"{reason}; {why}", force=True)
            if self.strict:
                raise
            self._warn_failed(d, e, why)
            return None
        self._estimates.clear()
        pruned = d.direction == "prune"
        if pruned:
            self.n_prunes += 1
            self.last_prune_step = self.last_prune_attempt_step = self.step
        else:
            self.n_growths += 1
            self.last_growth_step = self.last_attempt_step = self.step
        self._last_skip = None
        for s in self.signals:
            s.bind(self.model)
            s.on_growth(self.step)
        if self.policy is not None:
            self.policy.notify(d, self.step, applied=True)
        lr_factor = 1.0
        if self.stabilizer is not None:
            self.stabilizer.on_growth(self.step)
            lr_factor = self.stabilizer.factor()
        ev.kind = "prune" if pruned else "growth"
        ev.trigger = dict(d.trigger)
        ev.reason = reason
        ev.action = {"name": d.action_name, "kwargs": dict(d.kwargs), **ev.action}
        if isinstance(d.action, str) and d.action_name != ev.action.get("op"):
            ev.extra = {**ev.extra, "resolved": f"action {d.action_name!r} on "
                        f"{type(self.model).__name__} resolved to operator {ev.action['op']!r}"}
        ev.flops_per_sample_before = flops_before
        ev.flops_per_sample_after = flops_after
        if opt is not None:
            ev.lr_after = [float(g["lr"]) * lr_factor for g in opt.param_groups]
        ev.extra = {**ev.extra, "n_growths": self.n_growths, "lr_factor": lr_factor}
        if pruned or self.n_prunes:
            ev.extra["n_prunes"] = self.n_prunes
        if d.estimate is not None:
            ev.extra["estimate"] = dict(d.estimate)
        self._emit(ev)
        return ev

    def _keep_transition(self, t: ParamTransition) -> None:
        self.last_transition = t

    def _warn_failed(self, d: Decision, err: BaseException, why: str) -> None:
        """One GrowthFailedWarning per distinct (action, error type, message)."""
        key = (str(d.action_name), type(err).__name__, str(err))
        if key in self._warned:
            return
        self._warned.add(key)
        warnings.warn(
            f"selfgrow: step {self.step}: action {d.action_name!r} was decided but not applied "
            f"({why}); the model, optimizer and gradients are unchanged and training goes on. "
            f"The skipped event is in the log; GrowthController(strict=True) raises instead.",
            GrowthFailedWarning,
            stacklevel=5,
        )

    def _flops(self) -> float | None:
        if not self.measure_flops or self.probe_fn is None:
            return None
        try:
            return flops_per_sample(self.model, self.probe_fn)
        except Exception:  # noqa: BLE001 - FLOP counting is best effort, never blocks growth
            return None

    def _base_event(self, kind: str, reason: str) -> GrowthEvent:
        n = count_params(self.model)
        return GrowthEvent(
            kind=kind,
            wall_time=time.time(),
            reason=reason,
            params_before=n,
            params_after=n,
        )

    def _skipped(self, d: Decision, reason: str, force: bool = False) -> None:
        self.n_skipped += 1
        # one event per block reason (and schedule entry) per skip_log_every steps: signals
        # that take turns while the same limit holds must not flood the log
        key = (str(d.blocked), str(d.trigger.get("entry", "")))
        recent = (
            self._last_skip_step is not None
            and self.step - self._last_skip_step < self.skip_log_every
        )
        if not force and key == self._last_skip and recent:
            return
        self._last_skip, self._last_skip_step = key, self.step
        ev = self._base_event("skipped", reason)
        ev.trigger = dict(d.trigger)
        ev.action = {"name": d.action_name, "kwargs": dict(d.kwargs)}
        if isinstance(d.action, OpConfig):
            from ..ops import op_config_to_dict

            ev.action["config"] = op_config_to_dict(d.action)
        ev.extra = {"blocked": d.blocked, "n_skipped": self.n_skipped}
        if d.estimate is not None:
            ev.extra["estimate"] = dict(d.estimate)
        self._emit(ev)

    def _anomaly(self, value: float) -> None:
        """Count a non-finite loss; log it as an event at most once per ``skip_log_every``
        steps (so losses alternating between NaN and finite values do not flood the log)."""
        self.n_anomalies += 1
        self._anomaly_streak += 1
        k = self._anomaly_streak
        last = self._last_anomaly_log
        if last is None or self.step - last >= self.skip_log_every:
            self._last_anomaly_log = self.step
            ev = self._base_event("anomaly", f"non-finite loss {value}; signals not updated")
            ev.extra = {"loss": str(value), "n_anomalies": self.n_anomalies, "streak": k}
            self._emit(ev)

    def _emit(self, ev: GrowthEvent) -> None:
        ev.run_id = self.run_id
        ev.seq = self.seq
        ev.step = self.step
        ev.epoch = self.epoch
        ev.experience = self.experience
        self.seq += 1
        self.events.append(ev)
        for s in self.sinks:
            s.emit(ev)

    def _log_scalars(self) -> None:
        targets = [s for s in self.sinks if callable(getattr(s, "log_scalars", None))]
        if not targets:
            return
        # one tag scheme for every driver: train/*, model/*, selfgrow/*, signal/<name>
        vals: dict[str, float] = {
            "model/params": float(count_params(self.model)),
            "selfgrow/n_growths": float(self.n_growths),
            "selfgrow/n_prunes": float(self.n_prunes),
            "selfgrow/n_anomalies": float(self.n_anomalies),
        }
        if self._last_loss is not None:
            vals["train/loss"] = self._last_loss
        for s in self.signals:
            if isinstance(s.value, (int, float)) and math.isfinite(s.value):
                vals[f"signal/{s.name}"] = float(s.value)
        # MoE layers: moe/<layer>/{load_max, active_k, entropy, dropped} of the current
        # routing window (read without consuming it: that is the ExpertOverload signal's)
        vals.update(routing_scalars(self.model, reset=False))
        for t in targets:
            t.log_scalars(self.step, vals)

    # --- persistence ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue identically (model/optimizer weights excluded)."""
        return {
            "version": STATE_VERSION,
            "run_id": self.run_id,
            "step": self.step,
            "seq": self.seq,
            "epoch": self.epoch,
            "experience": self.experience,
            "n_growths": self.n_growths,
            "last_growth_step": self.last_growth_step,
            "last_attempt_step": self.last_attempt_step,
            "n_prunes": self.n_prunes,
            "last_prune_step": self.last_prune_step,
            "last_prune_attempt_step": self.last_prune_attempt_step,
            "n_anomalies": self.n_anomalies,
            "n_skipped": self.n_skipped,
            "anomaly_streak": self._anomaly_streak,
            "last_anomaly_log": self._last_anomaly_log,
            "last_skip": list(self._last_skip) if self._last_skip else None,
            "last_skip_step": self._last_skip_step,
            "signals": {s.name: s.state_dict() for s in self.signals},
            "policy": self.policy.state_dict() if self.policy is not None else {},
            "stabilizer": self.stabilizer.state_dict() if self.stabilizer is not None else {},
            "distributed": self.distributed.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output onto a controller built with the same signals and
        policy (and the grown model, rebuilt from its config).

        Raises:
            GrowthConfigError: unknown version or signal set mismatch.
        """
        if state.get("version") != STATE_VERSION:
            raise GrowthConfigError(
                f"controller state version {state.get('version')!r}; this selfgrow reads "
                f"{STATE_VERSION}"
            )
        sig_state = state["signals"]
        mine = {s.name for s in self.signals}
        if set(sig_state) != mine:
            raise GrowthConfigError(
                f"saved signals {sorted(sig_state)} do not match this controller's "
                f"{sorted(mine)}"
            )
        self.run_id = state["run_id"]
        if self.metrics_sink is not None and self.metrics_sink.run_id is not None:
            self.metrics_sink.run_id = self.run_id
        self.step = int(state["step"])
        self.seq = int(state["seq"])
        self.epoch = state["epoch"]
        self.experience = state["experience"]
        self.n_growths = int(state["n_growths"])
        self.last_growth_step = state["last_growth_step"]
        self.last_attempt_step = state["last_attempt_step"]
        # absent from the state of a run saved before prunes existed: it never pruned
        self.n_prunes = int(state.get("n_prunes", 0))
        self.last_prune_step = state.get("last_prune_step")
        self.last_prune_attempt_step = state.get("last_prune_attempt_step")
        self.n_anomalies = int(state["n_anomalies"])
        self.n_skipped = int(state["n_skipped"])
        self._anomaly_streak = int(state["anomaly_streak"])
        self._last_anomaly_log = state.get("last_anomaly_log")
        ls = state["last_skip"]
        self._last_skip = tuple(ls) if ls else None  # type: ignore[assignment]
        self._last_skip_step = state["last_skip_step"]
        for s in self.signals:
            s.load_state_dict(sig_state[s.name])
        if self.policy is not None:
            self.policy.load_state_dict(state["policy"])
        if self.stabilizer is not None and state.get("stabilizer"):
            self.stabilizer.load_state_dict(state["stabilizer"])
        if state.get("distributed"):
            self.distributed.load_state_dict(state["distributed"])
        self._estimates.clear()

    def close(self) -> None:
        """Close every sink that has ``close()`` and detach the stabilizer's hooks; the
        signals are released (another controller may take them, history included)."""
        self._closed = True
        for s in self.sinks:
            c = getattr(s, "close", None)
            if callable(c):
                c()
        if self.stabilizer is not None:
            self.stabilizer.detach()

    def __enter__(self) -> GrowthController:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
