"""Utility signals: what capacity is idle (the prune side of a self-evolving model).

:class:`IdleCapacity` watches the hidden units of the model while it trains (forward pre-hooks
on the module that CONSUMES each unit: the next layer of an MLP / CNN, the FFN down
projection of a transformer block) and, every ``window`` updates, ranks each layer's units by
importance over the window:

* ``"activation"``: ``E|a_u| * ||W_out[:, u]||``, the mean activation magnitude times the norm
  of the unit's outgoing weights; a first-order bound on how much the unit moves the next
  layer's input (Hu et al. 2016, "Network Trimming"; the dead-unit fraction of ReLU nets).
* ``"taylor"``: ``E_n |sum_pos a_u g_u|``, the first-order Taylor estimate of the loss change
  when the unit is removed (Molchanov et al. 2019, "Importance Estimation for Neural Network
  Pruning"), from the activations and their gradients (needs ``backward`` between the forward
  and the controller step, as in any training loop).

Which units are idle:

* without ``verify``: the dead units (mean ``|a|`` <= ``dead_eps``: they never fire) and the
  least important units whose importance together is at most ``share`` of the layer's total;
* with ``verify`` (``model -> loss`` on data of the current task, lower is better): the ladder
  ``fractions`` (largest first) of each layer's least important units is ablated (their
  activations masked to zero by the hooks; no weight is touched) until the loss rises by at
  most ``tolerance`` over the unablated loss: the capacity is idle because removing it does
  not hurt. This is the measured version and what the self-evolving benchmark uses.

``value`` is the idle fraction of all watched units; the signal triggers when it is at least
``threshold`` (and at least one unit of some layer can go) and, with ``max_loss``, the mean
training loss over the window is at most ``max_loss``: capacity is only idle while the task
is solved (grow when the loss plateaus HIGH, ``LossPlateau(min_loss=...)``; prune only when it
is LOW; a ``max_loss`` below the plateau's ``min_loss`` leaves a dead band between the two,
the loss-level half of the grow/prune hysteresis). ``state()`` gives the idle units
per layer (``units``: ``{layer: [unit, ...]}``, the classifier ``"prune"`` action's input),
``n_remove`` (the smallest per-layer count, for operators that remove the same number in every
layer such as ``ffn_remove_units``), ``idle_fraction`` and ``dead_fraction``. Every layer keeps
at least ``min_units`` units.

Statistics are gathered only from training-mode forwards outside selfgrow's own measurements
(:func:`selfgrow.core.in_measurement`), and are dropped after every structural change (the
controller rebinds the signal). They are not saved in checkpoints: a resumed run starts a new
window.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..adapters import find_adapter
from ..core import eval_mode, in_measurement, measurement, rng_isolated
from ..errors import GrowthConfigError, SelfgrowWarning, choices_message
from .signals import ExpertOverload, Signal, _check_int, check_range, register_signal

__all__ = ["IDLE_CRITERIA", "IdleCapacity", "IdleExperts"]

IDLE_CRITERIA = ("activation", "taylor")


@dataclass(eq=False)  # hashed by identity (ablation masks are keyed by watch)
class _Watch:
    """One watched layer of units: its consumer module (whose input is the units'
    activations), how the input is laid out and where the outgoing weights are."""

    index: int
    module: nn.Module
    width: int
    #: input columns per unit (``H * W`` after a Flatten), 1 otherwise
    group: int
    #: the input is (N, C, H, W) (a conv consumer) rather than (..., C * group)
    conv: bool
    #: the consumer weight: (out, width * group) for a linear, (out, width, kh, kw) for a
    #: conv, so that ``reshape(out, width, -1)`` puts the unit on dim 1
    weight: Callable[[], torch.Tensor]
    handle: Any = None
    act_sum: torch.Tensor | None = None
    taylor_sum: torch.Tensor | None = None
    n_samples: int = 0
    mask: torch.Tensor | None = None


def _per_unit(x: torch.Tensor, w: _Watch) -> torch.Tensor:
    """(N, width): the input summed over everything but the sample and the unit."""
    if w.conv:
        return x.flatten(2).sum(2) if x.dim() > 2 else x
    x = x.reshape(-1, x.shape[-1]) if x.dim() > 2 else x
    return x.reshape(x.shape[0], w.width, w.group).sum(2)


class IdleCapacity(Signal):
    """Idle hidden units: the signal a ``Rule(..., direction="prune")`` listens to.

    Args:
        threshold: idle fraction of the watched units at which the signal triggers, in (0, 1].
        window: updates (controller steps) per measurement, >= 1.
        criterion: ``"activation"`` or ``"taylor"`` (see the module docstring).
        share: without ``verify``: the least important units of a layer whose importance sums
            to at most this share of the layer's are idle, in [0, 1).
        dead_eps: a unit whose mean ``|a|`` over the window is at most this is dead (idle
            whatever its weights), >= 0.
        verify: optional ``model -> float`` loss on data of the current task (lower is
            better); run in eval mode, without gradients and without moving the global RNG.
        tolerance: with ``verify``: the largest loss increase (loss units) an ablation may
            cause for its units to count as idle, >= 0.
        relative: ``tolerance`` is relative to the unablated loss (``loss * tolerance``)
            instead of absolute.
        fractions: with ``verify``: the ablation ladder, fractions of each layer's units in
            (0, 1), tried largest first.
        min_units: units every layer keeps, >= 1.
        max_loss: the signal triggers only while the mean training loss of the window (the
            ``loss`` passed to ``observe``, loss units) is at most this; None: any loss.
        include: layer names to watch (``"hidden.0"``, ``"blocks.1"``, ``"layers.3"``); None
            watches every hidden layer the model's adapter lists.
        every: update every N controller steps.
        name: override the signal name.

    Raises:
        GrowthConfigError: an argument is out of range (names it and the valid range), an
            unknown criterion (lists the choices), or ``bind`` finds no hidden units.
    """

    name: ClassVar[str] = "idle_capacity"
    requires: tuple[str, ...] = ()
    optional: tuple[str, ...] = ("loss",)

    def __init__(
        self,
        threshold: float = 0.25,
        window: int = 50,
        criterion: str = "activation",
        share: float = 0.02,
        dead_eps: float = 0.0,
        verify: Callable[[nn.Module], float] | None = None,
        tolerance: float = 0.01,
        relative: bool = False,
        fractions: Sequence[float] = (0.5, 0.25, 0.125),
        min_units: int = 1,
        include: Sequence[str] | None = None,
        every: int = 1,
        name: str | None = None,
        max_loss: float | None = None,
    ) -> None:
        check_range("threshold", threshold, 0.0, 1.0, lo_open=True)
        if criterion not in IDLE_CRITERIA:
            raise GrowthConfigError("IdleCapacity: " + choices_message(
                "criterion", criterion, IDLE_CRITERIA))
        check_range("share", share, 0.0, 1.0, hi_open=True)
        check_range("dead_eps", dead_eps, 0.0, math.inf, hi_open=True)
        check_range("tolerance", tolerance, 0.0, math.inf, hi_open=True)
        if verify is not None and not callable(verify):
            raise GrowthConfigError(f"IdleCapacity: verify={verify!r} must be a callable "
                                    f"model -> loss, or None")
        if isinstance(fractions, (str, bytes)) or not hasattr(fractions, "__iter__"):
            raise GrowthConfigError(f"IdleCapacity: fractions={fractions!r} must be a list of "
                                    f"fractions in (0, 1)")
        fr = sorted({float(f) for f in fractions}, reverse=True)
        if not fr:
            raise GrowthConfigError("IdleCapacity: fractions is empty; valid: fractions in "
                                    "(0, 1)")
        for f in fr:
            check_range("fractions", f, 0.0, 1.0, lo_open=True, hi_open=True)
        _check_int("min_units", min_units, 1)
        if max_loss is not None:
            check_range("max_loss", max_loss, 0.0, math.inf, hi_open=True)
        if include is not None and (isinstance(include, str)
                                    or not all(isinstance(x, str) for x in include)):
            raise GrowthConfigError(f"IdleCapacity: include={include!r} must be a list of "
                                    f"layer names")
        super().__init__(threshold=threshold, window=window, every=every, name=name)
        self.criterion = criterion
        self.share = float(share)
        self.dead_eps = float(dead_eps)
        self.verify = verify
        self.tolerance = float(tolerance)
        self.relative = bool(relative)
        self.fractions = tuple(fr)
        self.min_units = int(min_units)
        self.max_loss = None if max_loss is None else float(max_loss)
        self._loss_sum, self._loss_n = 0.0, 0
        self.window_loss: float | None = None
        self.include = list(include) if include is not None else None
        self._watch: list[_Watch] = []
        self._model: nn.Module | None = None
        self._warned_nan = False
        self._since = 0
        self.units: dict[int, list[int]] = {}
        self.idle_fraction: float | None = None
        self.dead_fraction: float | None = None
        self.loss_increase: float | None = None
        self.importance: dict[int, list[float]] = {}

    # --- binding: one hook per watched layer ----------------------------------------------------
    def bind(self, model: nn.Module) -> None:
        for w in self._watch:
            if w.handle is not None:
                w.handle.remove()
        self._model = model
        self._watch = self._find(model)
        if not self._watch:
            raise GrowthConfigError(
                f"IdleCapacity found no hidden units to watch on {type(model).__name__}"
                + (f" (include={self.include})" if self.include is not None else "")
                + "; it watches the hidden layers of a classifier (MLP, CNN, nn.Sequential) "
                  "or the FFN units of a transformer family")
        for w in self._watch:
            w.handle = w.module.register_forward_pre_hook(self._hook(w))
        self._since = 0

    def _find(self, model: nn.Module) -> list[_Watch]:
        out: list[_Watch] = []
        cls = find_adapter(model, "classifier")
        if cls is not None:
            for i, u in enumerate(cls.units()):
                if self.include is not None and u.name not in self.include:
                    continue
                ref = next((r for r in u.consumers if r.attr == "weight"), None)
                if ref is None:
                    continue
                mod = ref.module
                conv = isinstance(mod, nn.modules.conv._ConvNd)
                out.append(_Watch(i, mod, u.width, ref.group, conv, _weight_of(mod)))
            return out
        tr = find_adapter(model, "transformer")
        if tr is not None:
            for lv in tr.layer_views():
                if self.include is not None and lv.path not in self.include:
                    continue
                down = lv.down
                out.append(_Watch(lv.index, down.module, down.in_features, 1, False,
                                  down.weight))
        return out

    def _hook(self, w: _Watch) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> Any:
            if not args or not isinstance(args[0], torch.Tensor):
                return None
            x = args[0]
            if w.mask is not None:  # an ablation (verify): the idle candidates emit zero
                m = w.mask.to(device=x.device, dtype=x.dtype)
                if w.conv:
                    m = m.view(1, -1, *([1] * (x.dim() - 2)))
                else:
                    m = m.repeat_interleave(w.group)
                return (x * m, *args[1:])
            if not module.training or in_measurement():
                return None
            if not self._fits(x, w):
                return None
            with torch.no_grad():
                a = _per_unit(x.detach().abs(), w).double()
                w.act_sum = a.sum(0) if w.act_sum is None else w.act_sum + a.sum(0)
                w.n_samples += a.shape[0]
            if self.criterion == "taylor" and x.requires_grad:
                xd = x.detach()

                def grad_hook(g: torch.Tensor) -> None:
                    with torch.no_grad():
                        t = _per_unit(xd * g, w).abs().double().sum(0)
                        w.taylor_sum = t if w.taylor_sum is None else w.taylor_sum + t

                x.register_hook(grad_hook)
            return None

        return hook

    @staticmethod
    def _fits(x: torch.Tensor, w: _Watch) -> bool:
        if w.conv:
            return x.dim() >= 3 and x.shape[1] == w.width
        return x.shape[-1] == w.width * w.group

    # --- measurement ---------------------------------------------------------------------------
    def update(self, step: int, metrics: Any) -> None:
        self._since += 1
        loss = metrics.get("loss") if hasattr(metrics, "get") else None
        if isinstance(loss, (int, float)) and math.isfinite(loss):
            self._loss_sum += float(loss)
            self._loss_n += 1
        if self._since < self.window:
            return
        if not any(w.n_samples for w in self._watch):
            return  # no training forward seen in the window: nothing to say yet
        self._since = 0
        self.n_updates += 1
        self.window_loss = self._loss_sum / self._loss_n if self._loss_n else None
        self._loss_sum, self._loss_n = 0.0, 0
        imp = {w.index: self._importance(w) for w in self._watch if w.n_samples}
        dead = {w.index: (w.act_sum / w.n_samples) <= self.dead_eps  # type: ignore[operator]
                for w in self._watch if w.n_samples}
        loss_ok = self.max_loss is None or (
            self.window_loss is not None and self.window_loss <= self.max_loss)
        if self.verify is not None and loss_ok:
            units = self._verified(imp, dead)
        else:  # (the ablation is not worth running while the loss is too high to prune)
            units = {i: self._tail(v, dead[i]) for i, v in imp.items()}
        total = sum(v.numel() for v in imp.values())
        n_idle = sum(len(u) for u in units.values())
        self.units = {i: u for i, u in units.items() if u}
        self.importance = {i: [round(float(x), 6) for x in v] for i, v in imp.items()
                           if v.numel() <= 64}
        self.idle_fraction = n_idle / max(total, 1)
        self.dead_fraction = sum(int(d.sum()) for d in dead.values()) / max(total, 1)
        self.value = self.idle_fraction
        self.triggered = bool(self.units) and self.value >= self.threshold and loss_ok
        for w in self._watch:
            w.act_sum = w.taylor_sum = None
            w.n_samples = 0

    def _importance(self, w: _Watch) -> torch.Tensor:
        if self.criterion == "taylor":
            if w.taylor_sum is None:
                return torch.zeros(w.width, dtype=torch.float64)
            return w.taylor_sum / w.n_samples
        mean_act = w.act_sum / w.n_samples  # type: ignore[operator]
        wt = w.weight().detach().double()
        out_norm = wt.reshape(wt.shape[0], w.width, -1).transpose(0, 1).reshape(w.width, -1)
        return mean_act * out_norm.norm(dim=1).to(mean_act.device)

    def _cap(self, width: int) -> int:
        return max(width - self.min_units, 0)

    def _limit(self, idle: set[int], imp: torch.Tensor) -> list[int]:
        """``idle`` plus nothing, less its most important members beyond ``width -
        min_units`` (ties broken by the lower index), sorted."""
        cap = self._cap(imp.numel())
        if len(idle) > cap:
            least = imp.argsort(stable=True).tolist()
            keep = set(least[:cap])
            idle = {u for u in idle if u in keep}
        return sorted(idle)

    def _tail(self, imp: torch.Tensor, dead: torch.Tensor) -> list[int]:
        """Dead units plus the least important ones summing to <= ``share`` of the layer."""
        order = imp.argsort(stable=True)
        csum = imp[order].cumsum(0)
        total = float(imp.sum())
        low = {int(u) for u, c in zip(order, csum, strict=True)
               if total > 0 and float(c) <= self.share * total}
        return self._limit(low | set(dead.nonzero().flatten().tolist()), imp)

    def _verified(self, imp: dict[int, torch.Tensor], dead: dict[int, torch.Tensor]
                  ) -> dict[int, list[int]]:
        """The largest ladder fraction whose ablation raises the verify loss by at most the
        tolerance (dead units always count); ``{}`` when even the smallest one hurts."""
        watch = {w.index: w for w in self._watch}
        base = self._verify_loss({})
        self.loss_increase = None
        if not math.isfinite(base):
            if not self._warned_nan:
                self._warned_nan = True
                warnings.warn(
                    f"IdleCapacity: verify returned {base} on the unablated model; no unit "
                    f"counts as idle until it returns a finite loss (check the data it "
                    f"evaluates)", SelfgrowWarning, stacklevel=4)
            return {}
        for f in self.fractions:
            cand: dict[int, list[int]] = {}
            for i, v in imp.items():
                ranked = v.argsort(stable=True).tolist()
                low = set(ranked[: int(f * v.numel())])
                cand[i] = self._limit(low | set(dead[i].nonzero().flatten().tolist()), v)
            if not any(cand.values()):
                continue
            loss = self._verify_loss({watch[i]: u for i, u in cand.items()})
            allowed = self.tolerance * abs(base) if self.relative else self.tolerance
            if loss - base <= allowed:
                self.loss_increase = loss - base
                return cand
        return {}

    def _verify_loss(self, ablate: dict[_Watch, list[int]]) -> float:
        if self.verify is None or not self._watch:
            return 0.0
        model = self._model
        if model is None:
            return 0.0
        try:
            for w, units in ablate.items():  # the hooks zero these units' activations
                m = torch.ones(w.width)
                m[units] = 0.0
                w.mask = m
            with rng_isolated(), measurement(), torch.no_grad(), eval_mode(model):
                try:
                    out = self.verify(model)
                except Exception as e:  # noqa: BLE001 - the user's callable: say whose it is
                    raise GrowthConfigError(
                        f"IdleCapacity: verify raised {type(e).__name__}: {e}") from e
            if isinstance(out, torch.Tensor) and out.numel() == 1:
                out = out.item()
            if isinstance(out, bool) or not isinstance(out, (int, float)):
                raise GrowthConfigError(f"IdleCapacity: verify returned {out!r:.60}; it must "
                                        f"return the loss as a number")
            return float(out)
        finally:
            for w in ablate:
                w.mask = None

    def on_growth(self, step: int) -> None:
        super().on_growth(step)
        self.units = {}
        self._since = 0
        self._loss_sum, self._loss_n = 0.0, 0

    def extra(self) -> dict[str, Any]:
        n = [len(v) for v in self.units.values()]
        out: dict[str, Any] = {
            "units": {i: list(u) for i, u in self.units.items()},
            "n_remove": min(n) if n and len(n) == len(self._watch) else 0,
            "idle_fraction": self.idle_fraction,
            "dead_fraction": self.dead_fraction,
            "criterion": self.criterion,
        }
        if self.max_loss is not None:
            out["window_loss"] = self.window_loss
            out["max_loss"] = self.max_loss
        if self.verify is not None:
            out["loss_increase"] = self.loss_increase
        return out

    def _extra_state(self) -> dict[str, Any]:
        return {"units": {str(i): u for i, u in self.units.items()},
                "idle_fraction": self.idle_fraction, "dead_fraction": self.dead_fraction}

    def _load_extra_state(self, state: Any) -> None:
        self.units = {int(i): list(u) for i, u in state.get("units", {}).items()}
        self.idle_fraction = state.get("idle_fraction")
        self.dead_fraction = state.get("dead_fraction")


def _weight_of(mod: nn.Module) -> Callable[[], torch.Tensor]:
    """The consumer's current weight (read at measurement time: growth replaces tensors)."""
    return lambda: mod.weight


class IdleExperts(ExpertOverload):
    """An MoE expert that the router hardly uses: the prune side of expert growth.

    Reads the same routing statistics as :class:`~selfgrow.control.signals.ExpertOverload`
    (each layer's per-expert load fraction, averaged over ``window`` updates). An expert's
    relative load is its load fraction times the number of experts (1 = its uniform share).
    ``value`` is the smallest relative load over the layers that have more than
    ``min_experts`` experts; the signal triggers when it is below ``threshold``.
    ``state()["layer"]`` (the block index) and ``state()["expert"]`` name the idlest expert,
    the arguments of the ``"remove_expert"`` action
    (``Rule("idle_experts", "remove_expert", from_state={"layer": "layer", "expert":
    "expert"}, direction="prune")``). Removing an expert that gets no routing mass is exact
    (``remove_expert``); otherwise its error is measured.

    Args:
        threshold: relative load below which an expert is idle, in (0, 1].
        window: loads are averaged over this many updates, >= 1.
        min_experts: layers with at most this many experts are left alone, >= 1.
        every: update every N controller steps.
        name: override the signal name.

    Raises:
        GrowthConfigError: an argument is out of range.
    """

    name: ClassVar[str] = "idle_experts"

    def __init__(self, threshold: float = 0.25, window: int = 10, min_experts: int = 2,
                 every: int = 1, name: str | None = None) -> None:
        super().__init__(threshold=threshold, window=window, every=every, name=name)
        _check_int("min_experts", min_experts, 1)
        self.min_experts = int(min_experts)
        self.idle: tuple[int, int] | None = None

    def update(self, step: int, metrics: Any) -> None:
        super().update(step, metrics)
        self.overloaded = []
        cands = {}
        for lname, v in self.layers.items():
            parts = lname.split(".")
            if v["n_experts"] <= self.min_experts or len(parts) < 2 or not parts[1].isdigit():
                continue
            cands[int(parts[1])] = (v["min_load"] * v["n_experts"], v["idle_expert"])
        if not cands:
            self.value, self.triggered, self.idle = None, False, None
            return
        layer = min(cands, key=lambda i: cands[i][0])
        self.value = cands[layer][0]
        self.idle = (layer, cands[layer][1])
        self.triggered = self.value < self.threshold

    def on_growth(self, step: int) -> None:
        super().on_growth(step)
        self.idle = None

    def extra(self) -> dict[str, Any]:
        out = super().extra()
        del out["layers"]  # overloaded layers: not this signal's business
        if self.idle is not None:
            out["layer"], out["expert"] = self.idle
        return out


register_signal(IdleCapacity)
register_signal(IdleExperts)
