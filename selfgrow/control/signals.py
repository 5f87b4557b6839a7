"""Training signals: measure, never decide.

A :class:`Signal` turns what the training loop reports (loss, validation loss, gradients,
router statistics, replay-buffer accuracy) into a scalar ``value`` and a boolean ``triggered``.
Policies (:mod:`selfgrow.control.policies`) read the signals' :meth:`Signal.state` dicts and
decide; signals hold no opinion about what to grow.

Protocol used by :class:`~selfgrow.control.controller.GrowthController`:

* ``requires``: metric keys the signal reads from ``observe(**metrics)``; it is updated on
  steps where all of them are present (``loss`` is present whenever passed), and also on
  steps where any of its ``optional`` keys is present (e.g. reference accuracies).
* ``every``: update every N controller steps (costly signals sample).
* ``bind(model)``: called once at construction and again after every growth, for signals that
  read the model (gradients, routing statistics, capacity probes).
* ``update(step, metrics)``; then ``value`` / ``triggered`` / ``state()``.
* ``on_growth(step)``: the model just grew; the default clears ``triggered`` so the evidence
  must be re-established on the grown model.
* ``state_dict()`` / ``load_state_dict()``: everything needed to continue identically.
"""

from __future__ import annotations

import abc
import copy
import inspect
import math
import warnings
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from fnmatch import fnmatch
from typing import Any, ClassVar

import torch
from torch import nn

from ..core import full_tensor, register_unique
from ..errors import GrowthConfigError, choices_message

__all__ = [
    "CapacityProbe",
    "ExpertOverload",
    "GradientSaturation",
    "LossPlateau",
    "ReplayForgetting",
    "Signal",
    "ValidationPlateau",
    "check_range",
    "list_signals",
    "make_signal",
]


def check_range(
    what: str,
    value: float,
    lo: float,
    hi: float,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
) -> None:
    """Raise GrowthConfigError unless ``value`` lies in the interval (bounds as flagged).

    Args:
        what: parameter name used in the message.
        value: value to check.
        lo: lower bound; ``lo_open`` excludes it.
        hi: upper bound; ``hi_open`` excludes it.
    """
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise GrowthConfigError(
            f"{what} must be a number, got {type(value).__name__} {value!r:.60}")
    ok = math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        raise GrowthConfigError(
            f"{what}={value!r} is out of range; valid range: {left}{lo}, {hi}{right}"
        )


def _check_int(what: str, value: int, lo: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise GrowthConfigError(
            f"{what} must be an integer, got {type(value).__name__} {value!r:.60}")
    if value < lo:
        raise GrowthConfigError(f"{what}={value!r} is out of range; valid: an integer >= {lo}")


def _grad_weight_ratios(weights: list[torch.Tensor]) -> list[float]:
    """``|grad| / |w|`` per tensor with a single device->host transfer (no per-layer sync)."""
    if any(type(w).__name__ == "DTensor" for w in weights):  # FSDP2 shards: global norms
        return [float(full_tensor(torch.linalg.vector_norm(w.grad.detach().float())))
                / (float(full_tensor(torch.linalg.vector_norm(w.detach().float()))) + 1e-12)
                for w in weights]
    try:
        g = torch.stack([torch.linalg.vector_norm(w.grad.detach().float()) for w in weights])
        n = torch.stack([torch.linalg.vector_norm(w.detach().float()) for w in weights])
        return (g / (n + 1e-12)).tolist()
    except RuntimeError:  # tensors on several devices: one transfer per tensor
        return [
            float(w.grad.detach().float().norm()) / (float(w.detach().float().norm()) + 1e-12)
            for w in weights
        ]


def _float(x: Any) -> float:
    if isinstance(x, torch.Tensor):
        return float(x.detach().float().mean()) if x.numel() != 1 else float(x.detach())
    return float(x)


class Signal(abc.ABC):
    """Base class of training signals.

    Attributes:
        name: key under which policies refer to this signal (e.g. ``"loss_plateau"``).
        requires: metric keys needed by :meth:`update`.
        optional: metric keys consumed whenever present (update is called for them too).
        threshold: the value at which the signal triggers (units per subclass).
        window: history length (steps, or evaluations for sparse metrics).
        every: update every N controller steps.
        value: last measured value (None before the first measurement).
        triggered: whether the last measurement crossed the threshold.
    """

    name: ClassVar[str] = ""
    requires: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()

    def __init__(
        self, *, threshold: float, window: int, every: int = 1, name: str | None = None
    ) -> None:
        _check_int("window", window, 1)
        _check_int("every", every, 1)
        if name is not None:
            if not isinstance(name, str) or not name:
                raise GrowthConfigError(f"signal name={name!r} must be a non-empty string")
            self.name = name  # type: ignore[misc]
        self.threshold = float(threshold)
        self.window = int(window)
        self.every = int(every)
        self.value: float | None = None
        self.triggered = False
        self.n_updates = 0

    def bind(self, model: nn.Module) -> None:  # noqa: B027 - optional hook
        """Give the signal the live model (called again after every growth)."""

    @abc.abstractmethod
    def update(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Consume the metrics of controller step ``step`` and refresh ``value``/``triggered``."""

    def on_growth(self, step: int) -> None:
        """The model grew at ``step``: clear ``triggered`` (evidence must be rebuilt)."""
        self.triggered = False

    def extra(self) -> dict[str, Any]:
        """Signal-specific details for the log (override)."""
        return {}

    def state(self) -> dict[str, Any]:
        """``{signal, value, threshold, window, triggered, **extra}`` for policies and logs."""
        return {
            "signal": self.name,
            "value": self.value,
            "threshold": self.threshold,
            "window": self.window,
            "triggered": bool(self.triggered),
            **self.extra(),
        }

    def state_dict(self) -> dict[str, Any]:
        """Serialisable state (override ``_extra_state``/``_load_extra_state`` to extend)."""
        return {
            "name": self.name,
            "value": self.value,
            "triggered": self.triggered,
            "n_updates": self.n_updates,
            **self._extra_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.value = state["value"]
        self.triggered = bool(state["triggered"])
        self.n_updates = int(state["n_updates"])
        self._load_extra_state(state)

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:  # noqa: B027 - optional hook
        pass

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, threshold={self.threshold}, "
            f"window={self.window}, every={self.every})"
        )


# ---------------------------------------------------------------------------------------------
# plateaus
# ---------------------------------------------------------------------------------------------
class LossPlateau(Signal):
    """Training loss stops improving.

    The loss is smoothed with an exponential moving average (``ema`` = weight of the past,
    0 disables smoothing); ``value`` is the relative improvement of the smoothed loss over the
    last ``window`` updates, ``(L[t - window] - L[t]) / |L[t - window]|`` (a fraction; positive
    = improving). Triggered when ``value < min_rel_drop`` once ``window`` updates are available.
    A rising loss also counts as not improving. After a growth, and when the ``experience``
    the controller reports changes (continual learning: a new task's loss starts high), the
    history is cleared, so a new plateau needs ``window`` fresh updates.

    ``min_loss``: a plateau counts only while the smoothed loss is above it: a task solved to
    that loss does not lack capacity (a grow-and-prune model must not grow on an easy stretch
    of the stream, where the loss is flat because it is near zero).

    Args:
        window: improvement horizon in updates (steps, or evaluations for sparse metrics), >= 1.
        min_rel_drop: relative improvement below which the loss counts as flat, in [0, 1).
        ema: smoothing factor in [0, 1).
        every: update every N controller steps.
        name: override the signal name.
        min_loss: smoothed loss (loss units) at or below which a plateau does not trigger,
            >= 0, or None (every plateau triggers).

    Raises:
        GrowthConfigError: a parameter is out of range (message gives the range).
    """

    name: ClassVar[str] = "loss_plateau"
    requires: tuple[str, ...] = ("loss",)
    metric: ClassVar[str] = "loss"

    def __init__(
        self,
        window: int = 200,
        min_rel_drop: float = 0.01,
        ema: float = 0.9,
        every: int = 1,
        name: str | None = None,
        min_loss: float | None = None,
    ) -> None:
        check_range("min_rel_drop", min_rel_drop, 0.0, 1.0, hi_open=True)
        check_range("ema", ema, 0.0, 1.0, hi_open=True)
        if min_loss is not None:
            check_range("min_loss", min_loss, 0.0, math.inf, hi_open=True)
        super().__init__(threshold=min_rel_drop, window=window, every=every, name=name)
        self.min_loss = None if min_loss is None else float(min_loss)
        self.min_rel_drop = float(min_rel_drop)
        self.ema = float(ema)
        self._smoothed: float | None = None
        self._hist: deque[float] = deque(maxlen=self.window + 1)
        self._experience: Any = None

    def update(self, step: int, metrics: Mapping[str, Any]) -> None:
        x = _float(metrics[self.metric])
        if not math.isfinite(x):
            return
        exp = metrics.get("experience")
        if exp is not None and exp != self._experience:
            if self._experience is not None:
                self._reset()
            self._experience = exp
        self.n_updates += 1
        s = x if self._smoothed is None else self.ema * self._smoothed + (1 - self.ema) * x
        self._smoothed = s
        self._hist.append(s)
        if len(self._hist) <= self.window:
            self.value, self.triggered = None, False
            return
        ref = self._hist[0]
        self.value = (ref - s) / max(abs(ref), 1e-12)
        self.triggered = self.value < self.min_rel_drop and (
            self.min_loss is None or s > self.min_loss)

    def _reset(self) -> None:
        self._hist.clear()
        self._smoothed = None
        self.value = None
        self.triggered = False

    def on_growth(self, step: int) -> None:
        super().on_growth(step)
        self._reset()

    def extra(self) -> dict[str, Any]:
        out: dict[str, Any] = {"smoothed": self._smoothed, "history": len(self._hist)}
        if self.min_loss is not None:
            out["min_loss"] = self.min_loss
        return out

    def _extra_state(self) -> dict[str, Any]:
        return {"smoothed": self._smoothed, "hist": list(self._hist),
                "experience": self._experience}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        self._smoothed = state["smoothed"]
        self._hist = deque(state["hist"], maxlen=self.window + 1)
        self._experience = state.get("experience")


class ValidationPlateau(LossPlateau):
    """Validation loss stops improving: :class:`LossPlateau` on the ``val_loss`` metric.

    Updated only on steps where ``val_loss`` is passed to ``observe``; ``window`` therefore
    counts evaluations, not steps. Smoothing is off by default (``ema=0``).
    """

    name: ClassVar[str] = "val_plateau"
    requires: tuple[str, ...] = ("val_loss",)
    metric: ClassVar[str] = "val_loss"

    def __init__(
        self,
        window: int = 3,
        min_rel_drop: float = 0.005,
        ema: float = 0.0,
        every: int = 1,
        name: str | None = None,
        min_loss: float | None = None,
    ) -> None:
        super().__init__(window=window, min_rel_drop=min_rel_drop, ema=ema, every=every,
                         name=name, min_loss=min_loss)


# ---------------------------------------------------------------------------------------------
# continual learning: forgetting on the replay buffer
# ---------------------------------------------------------------------------------------------
class ReplayForgetting(Signal):
    """Accuracy on past experiences (measured on replay-buffer samples) drops.

    Metrics: ``replay_accuracy: dict[int, float]`` (experience id -> accuracy in [0, 1] now)
    and, optionally, ``experience_end_accuracy: dict[int, float]`` (accuracy measured right
    after that experience was learned). References are remembered; an experience without a
    reference uses its first replay measurement. ``value`` = max (``reduce="max"``) or mean
    drop ``reference - now`` over past experiences (a fraction); triggered when
    ``value > threshold``. ``experience_end_accuracy`` is consumed whenever it is passed, also
    on steps without ``replay_accuracy``; a value is taken as the new reference only when it
    differs from the one last passed, so passing the full dict every time is fine.

    After a growth the forgetting that already happened cannot be undone by capacity, so the
    next measurement of every experience becomes its new reference: the signal then measures
    forgetting since the growth.

    Args:
        threshold: forgetting (accuracy drop, fraction) that triggers, in (0, 1).
        reduce: ``"max"`` or ``"mean"`` over past experiences.
        window: number of recent measurements whose drops are averaged (1 = last only).
        every: update every N controller steps.
        name: override the signal name.
    """

    name: ClassVar[str] = "replay_forgetting"
    requires: tuple[str, ...] = ("replay_accuracy",)
    optional: tuple[str, ...] = ("experience_end_accuracy",)
    REDUCE: ClassVar[tuple[str, ...]] = ("max", "mean")

    def __init__(
        self,
        threshold: float = 0.1,
        reduce: str = "max",
        window: int = 1,
        every: int = 1,
        name: str | None = None,
    ) -> None:
        check_range("threshold", threshold, 0.0, 1.0, lo_open=True, hi_open=True)
        if reduce not in self.REDUCE:
            raise GrowthConfigError(
                f"reduce={reduce!r} is invalid; valid choices: {', '.join(self.REDUCE)}"
            )
        super().__init__(threshold=threshold, window=window, every=every, name=name)
        self.reduce = reduce
        self.reference: dict[int, float] = {}
        self.drops: dict[int, float] = {}
        self._given: dict[int, float] = {}
        self._rebase: set[int] = set()
        self._recent: deque[float] = deque(maxlen=self.window)

    def update(self, step: int, metrics: Mapping[str, Any]) -> None:
        for k, v in dict(metrics.get("experience_end_accuracy") or {}).items():
            k, v = int(k), _float(v)
            if self._given.get(k) != v and math.isfinite(v):
                self._given[k] = v
                self.reference[k] = v
                self._rebase.discard(k)
        if metrics.get("replay_accuracy") is None:
            return
        now = {int(k): _float(v) for k, v in dict(metrics["replay_accuracy"]).items()}
        drops: dict[int, float] = {}
        for k, acc in now.items():
            if not math.isfinite(acc):
                continue
            if k in self._rebase:
                self.reference[k] = acc
                self._rebase.discard(k)
            self.reference.setdefault(k, acc)
            drops[k] = self.reference[k] - acc
        self.drops = drops
        if not drops:
            return
        self.n_updates += 1
        vals = list(drops.values())
        cur = max(vals) if self.reduce == "max" else sum(vals) / len(vals)
        self._recent.append(cur)
        self.value = sum(self._recent) / len(self._recent)
        self.triggered = self.value > self.threshold

    def on_growth(self, step: int) -> None:
        super().on_growth(step)
        self._recent.clear()
        self._rebase = set(self.reference)

    def extra(self) -> dict[str, Any]:
        worst = max(self.drops, key=self.drops.__getitem__) if self.drops else None
        return {"reduce": self.reduce, "drops": dict(self.drops), "worst_experience": worst}

    def _extra_state(self) -> dict[str, Any]:
        return {
            "reference": {str(k): v for k, v in self.reference.items()},
            "drops": {str(k): v for k, v in self.drops.items()},
            "recent": list(self._recent),
            "given": {str(k): v for k, v in self._given.items()},
            "rebase": sorted(self._rebase),
        }

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        self._given = {int(k): float(v) for k, v in state["given"].items()}
        self._rebase = {int(k) for k in state["rebase"]}
        self.reference = {int(k): float(v) for k, v in state["reference"].items()}
        self.drops = {int(k): float(v) for k, v in state["drops"].items()}
        self._recent = deque(state["recent"], maxlen=self.window)


# ---------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------
class GradientSaturation(Signal):
    """Layers whose gradients stay large relative to their weights and to their own history.

    For every layer (module owning a ``weight`` parameter that requires grad) the controller
    step reads ``r = ||grad|| / (||weight|| + eps)`` from ``p.grad`` (so call ``observe``
    after ``backward`` and before ``zero_grad``). ``score = mean(r over the last window
    updates) / slow_mean(r)``, where ``slow_mean`` is an EMA with horizon ``history`` updates:
    in healthy training relative gradients decay (score < 1); a layer whose relative
    gradient stops decaying, and is above ``min_ratio``, is *saturated* (it keeps asking for
    change it cannot make). ``value`` = max score; triggered when at least one layer has
    ``score >= threshold`` after ``2 * window`` updates. ``state()["layers"]`` lists the saturated
    layers (module names) for actions such as ``widen_layers``.

    Args:
        threshold: score at which a layer saturates, > 0 (1.0 = no decay).
        window: short averaging window in updates, >= 1.
        history: horizon of the slow EMA in updates, >= window.
        min_ratio: ignore layers whose windowed ``||g||/||w||`` is below this, >= 0.
        include: shell-style patterns of module names to watch (e.g. ``["hidden.*"]``, the
            layers your ``widen_layers`` action can grow); None = every layer.
        exclude: patterns of module names to ignore (e.g. ``["head"]``).
        every: update every N controller steps.
        name: override the signal name.
    """

    name: ClassVar[str] = "gradient_saturation"
    requires: tuple[str, ...] = ()

    def __init__(
        self,
        threshold: float = 1.0,
        window: int = 50,
        history: int = 500,
        min_ratio: float = 1e-4,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        every: int = 1,
        name: str | None = None,
    ) -> None:
        check_range("threshold", threshold, 0.0, math.inf, lo_open=True, hi_open=True)
        check_range("min_ratio", min_ratio, 0.0, math.inf, hi_open=True)
        for pats in (include or (), exclude):
            if isinstance(pats, str) or not all(isinstance(x, str) for x in pats):
                raise GrowthConfigError(
                    f"include/exclude must be lists of name patterns, got {pats!r}"
                )
        self.include = list(include) if include is not None else None
        self.exclude = list(exclude)
        super().__init__(threshold=threshold, window=window, every=every, name=name)
        _check_int("history", history, self.window)
        self.history = int(history)
        self.min_ratio = float(min_ratio)
        self._model: nn.Module | None = None
        self._recent: dict[str, deque[float]] = {}
        self._slow: dict[str, float] = {}
        self._count: dict[str, int] = {}
        self.scores: dict[str, float] = {}
        self.saturated: list[str] = []
        self._warned = False

    def bind(self, model: nn.Module) -> None:
        self._model = model

    def _layers(self) -> list[tuple[str, torch.Tensor]]:
        if self._model is None:
            return []
        out = []
        for name, mod in self._model.named_modules():
            w = getattr(mod, "weight", None)
            if not (isinstance(w, nn.Parameter) and w.requires_grad and w.grad is not None):
                continue
            if self.include is not None and not any(fnmatch(name, p) for p in self.include):
                continue
            if any(fnmatch(name, p) for p in self.exclude):
                continue
            out.append((name, w))
        return out

    @torch.no_grad()
    def update(self, step: int, metrics: Mapping[str, Any]) -> None:
        layers = self._layers()
        if not layers:
            if self._model is not None and not self._warned:
                self._warned = True
                warnings.warn(
                    "GradientSaturation found no gradients on the model: call "
                    "GrowthController.observe() after backward() and before zero_grad()",
                    stacklevel=3,
                )
            return
        self.n_updates += 1
        beta = 1.0 - 1.0 / self.history
        scores: dict[str, float] = {}
        saturated: list[str] = []
        for (name, _), r in zip(layers, _grad_weight_ratios([w for _, w in layers]), strict=True):
            if not math.isfinite(r):
                continue
            q = self._recent.setdefault(name, deque(maxlen=self.window))
            q.append(r)
            n = self._count.get(name, 0) + 1
            self._count[name] = n
            prev = self._slow.get(name)
            # bias-free start: plain mean until the EMA horizon is reached
            self._slow[name] = r if prev is None else (
                prev + (r - prev) / n if n <= self.history else beta * prev + (1 - beta) * r
            )
            # score only once the slow mean covers twice the short window: before that the two
            # means share most of their samples and the score is ~1 by construction
            if n < 2 * self.window:
                continue
            short = sum(q) / len(q)
            score = short / max(self._slow[name], 1e-30)
            scores[name] = score
            if score >= self.threshold and short >= self.min_ratio:
                saturated.append(name)
        self.scores = scores
        self.saturated = saturated
        self.value = max(scores.values()) if scores else None
        self.triggered = bool(saturated)

    def on_growth(self, step: int) -> None:
        super().on_growth(step)
        self._recent.clear()
        self._count = {k: 0 for k in self._count}
        self._slow.clear()
        self.saturated = []

    def extra(self) -> dict[str, Any]:
        top = dict(sorted(self.scores.items(), key=lambda kv: -kv[1])[:8])
        return {"layers": list(self.saturated), "scores": top}

    def _extra_state(self) -> dict[str, Any]:
        return {
            "recent": {k: list(v) for k, v in self._recent.items()},
            "slow": dict(self._slow),
            "count": dict(self._count),
            "scores": dict(self.scores),
            "saturated": list(self.saturated),
        }

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        self._recent = {k: deque(v, maxlen=self.window) for k, v in state["recent"].items()}
        self._slow = dict(state["slow"])
        self._count = dict(state["count"])
        self.scores = dict(state["scores"])
        self.saturated = list(state["saturated"])


# ---------------------------------------------------------------------------------------------
# mixture of experts
# ---------------------------------------------------------------------------------------------
RoutingStats = Mapping[str, Mapping[str, Any]]


class ExpertOverload(Signal):
    """One expert takes too much of the routing mass.

    Reads ``router_stats: dict[layer_name, {"load": Tensor[n_experts], "active_k": float,
    "max_k": int}]`` from ``observe`` (``load`` = fraction of routed tokens per expert, summing
    to 1), or, when the metric is absent, collects it from every module of the bound model that
    implements ``routing_stats() -> {"load", "active_k", "max_k"}``. ``value`` = the largest
    share of TOKENS routed to one expert, over layers and experts: its load fraction times
    the mean active experts per token (``active_k``; 1 when absent), at most 1. Under top-k
    an expert's load fraction is at most 1/k, so a threshold on the load alone could never
    fire for k >= 2; the token share is 1 when every token uses the expert, whatever k, and
    k / E under uniform routing (pick a threshold above it, or use ``min_entropy``, which
    does not depend on E).
    ``state()`` also reports per layer the max load fraction, that token share, the
    normalised usage entropy ``H(load) / log(n_experts)`` (1 = uniform), the overloaded
    layers and their busiest expert. Triggered when ``value > threshold`` or, if
    ``min_entropy`` is set, when a layer's normalised entropy falls below it.

    Args:
        threshold: share of tokens routed to one expert that triggers, in (0, 1].
        min_entropy: optional normalised-entropy floor in [0, 1].
        window: loads are averaged over this many updates.
        every: update every N controller steps.
        name: override the signal name.
    """

    name: ClassVar[str] = "expert_overload"

    def __init__(
        self,
        threshold: float = 0.5,
        min_entropy: float | None = None,
        window: int = 10,
        every: int = 1,
        name: str | None = None,
    ) -> None:
        check_range("threshold", threshold, 0.0, 1.0, lo_open=True)
        if min_entropy is not None:
            check_range("min_entropy", min_entropy, 0.0, 1.0)
        super().__init__(threshold=threshold, window=window, every=every, name=name)
        self.requires = ("router_stats",)
        self.min_entropy = min_entropy
        self._model: nn.Module | None = None
        self._loads: dict[str, deque[list[float]]] = {}
        self.layers: dict[str, dict[str, Any]] = {}
        self.overloaded: list[str] = []

    def bind(self, model: nn.Module) -> None:
        self._model = model
        if any(callable(getattr(m, "routing_stats", None)) for m in model.modules()):
            self.requires = ()  # the model reports its own routing statistics

    def _collect(self) -> dict[str, Mapping[str, Any]]:
        if self._model is None:
            return {}
        out = {}
        for name, m in self._model.named_modules():
            fn = getattr(m, "routing_stats", None)
            if callable(fn):
                out[name] = fn()
        return out

    def update(self, step: int, metrics: Mapping[str, Any]) -> None:
        stats = metrics.get("router_stats")
        stats = dict(stats) if stats is not None else self._collect()
        if not stats:
            return
        self.n_updates += 1
        layers: dict[str, dict[str, Any]] = {}
        for lname, st in stats.items():
            load = torch.as_tensor(st["load"], dtype=torch.float64).flatten().cpu()
            total = float(load.sum())
            if load.numel() == 0 or not math.isfinite(total) or total <= 0:
                continue
            q = self._loads.setdefault(lname, deque(maxlen=self.window))
            if q and len(q[-1]) != load.numel():
                q.clear()  # the layer gained experts
            q.append((load / total).tolist())
            mean = torch.tensor(list(q), dtype=torch.float64).mean(0)
            n = mean.numel()
            p = mean.clamp_min(1e-30)
            ent = float(-(mean * p.log()).sum()) / math.log(n) if n > 1 else 1.0
            k = _float(st["active_k"]) if "active_k" in st else None
            scale = k if k is not None and math.isfinite(k) and k > 0 else 1.0
            layers[lname] = {
                "max_load": float(mean.max()),
                "token_share": min(1.0, float(mean.max()) * scale),
                "expert": int(mean.argmax()),
                "min_load": float(mean.min()),
                "idle_expert": int(mean.argmin()),
                "entropy": ent,
                "n_experts": n,
                "active_k": _float(st["active_k"]) if "active_k" in st else None,
                "max_k": int(st["max_k"]) if "max_k" in st else None,
            }
        self.layers = layers
        if not layers:
            return
        self.value = max(v["token_share"] for v in layers.values())
        self.overloaded = [
            k
            for k, v in layers.items()
            if v["token_share"] > self.threshold
            or (self.min_entropy is not None and v["entropy"] < self.min_entropy)
        ]
        self.triggered = bool(self.overloaded)

    def on_growth(self, step: int) -> None:
        super().on_growth(step)
        self._loads.clear()
        self.overloaded = []

    def extra(self) -> dict[str, Any]:
        ents = [v["entropy"] for v in self.layers.values()]
        return {
            "entropy": min(ents) if ents else None,
            "layers": list(self.overloaded),
            "per_layer": {k: dict(v) for k, v in self.layers.items()},
        }

    def _extra_state(self) -> dict[str, Any]:
        return {
            "loads": {k: [list(x) for x in v] for k, v in self._loads.items()},
            "layers": {k: dict(v) for k, v in self.layers.items()},
            "overloaded": list(self.overloaded),
        }

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        self._loads = {k: deque(v, maxlen=self.window) for k, v in state["loads"].items()}
        self.layers = {k: dict(v) for k, v in state["layers"].items()}
        self.overloaded = list(state["overloaded"])


# ---------------------------------------------------------------------------------------------
# capacity probe
# ---------------------------------------------------------------------------------------------
class CapacityProbe(Signal):
    """Can the model still absorb new data without forgetting old data?

    Every ``every`` steps: ``before = evaluate_old(copy)`` on a ``copy.deepcopy`` of the bound
    model, ``finetune(copy)`` briefly on new data, ``after = evaluate_old(copy)``; ``value =
    before - after`` (drop of a higher-is-better score such as accuracy; pass
    ``higher_is_better=False`` for a loss, then ``value = after - before``). Triggered when
    ``value > threshold``. The live model, its optimizer and the global RNG state are left
    untouched (the RNG state is saved and restored around the probe).

    Args:
        finetune: ``copy -> None``; trains the copy for a few steps on new data.
        evaluate_old: ``model -> float``; score on old data.
        threshold: drop that triggers (score units), > 0.
        every: sample every N controller steps (costly: a model copy and a short fine-tune).
        higher_is_better: whether ``evaluate_old`` is a score (True) or a loss (False).
        name: override the signal name.
    """

    name: ClassVar[str] = "capacity_probe"
    requires: tuple[str, ...] = ()

    def __init__(
        self,
        finetune: Callable[[nn.Module], None],
        evaluate_old: Callable[[nn.Module], float],
        threshold: float = 0.05,
        every: int = 500,
        higher_is_better: bool = True,
        name: str | None = None,
    ) -> None:
        if not callable(finetune) or not callable(evaluate_old):
            raise GrowthConfigError("CapacityProbe needs callables finetune and evaluate_old")
        check_range("threshold", threshold, 0.0, math.inf, lo_open=True, hi_open=True)
        super().__init__(threshold=threshold, window=1, every=every, name=name)
        self.finetune = finetune
        self.evaluate_old = evaluate_old
        self.higher_is_better = higher_is_better
        self._model: nn.Module | None = None
        self.before: float | None = None
        self.after: float | None = None

    def bind(self, model: nn.Module) -> None:
        self._model = model

    def update(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self._model is None:
            return
        rng = torch.random.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        try:
            clone = copy.deepcopy(self._model)
            before = float(self.evaluate_old(clone))
            self.finetune(clone)
            after = float(self.evaluate_old(clone))
            del clone
        finally:
            torch.random.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
        self.n_updates += 1
        self.before, self.after = before, after
        self.value = before - after if self.higher_is_better else after - before
        self.triggered = self.value > self.threshold

    def extra(self) -> dict[str, Any]:
        return {"before": self.before, "after": self.after}

    def _extra_state(self) -> dict[str, Any]:
        return {"before": self.before, "after": self.after}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.before, self.after = state["before"], state["after"]


SIGNALS: dict[str, type[Signal]] = {}


def register_signal(cls: type[Signal] | None = None, *, override: bool = False) -> Any:
    """Class decorator making a :class:`Signal` subclass buildable by name with
    :func:`make_signal` (``@register_signal`` or ``@register_signal(override=True)``).

    Raises:
        GrowthConfigError: not a Signal subclass, no class variable ``name``, or the name is
            taken by another signal class (the one duplicate rule of selfgrow's registries;
            ``override=True`` replaces it on purpose).
    """

    def deco(c: type[Signal]) -> type[Signal]:
        if not (isinstance(c, type) and issubclass(c, Signal)):
            raise GrowthConfigError(f"register_signal needs a Signal subclass, got {c!r}")
        if not c.name:
            raise GrowthConfigError(f"{c.__name__} must set the class variable 'name'")
        register_unique(SIGNALS, c.name, c, "signal", override=override)
        return c

    return deco(cls) if cls is not None else deco


for _cls in (
    LossPlateau,
    ValidationPlateau,
    ReplayForgetting,
    GradientSaturation,
    ExpertOverload,
    CapacityProbe,
):
    register_signal(_cls)


def list_signals() -> list[str]:
    """Names of the registered signals (keys of :func:`make_signal`), sorted."""
    return sorted(SIGNALS)


def make_signal(name: str, **kwargs: Any) -> Signal:
    """Build a registered signal by name (for CLIs and config files).

    Raises:
        GrowthConfigError: unknown name (lists the choices) or bad arguments (names them).
    """
    cls = SIGNALS.get(name)
    if cls is None:
        raise GrowthConfigError(choices_message("signal", name, list(SIGNALS)))
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as e:
        raise GrowthConfigError(f"bad arguments for signal {name!r}: {e}") from None
    return cls(**kwargs)
