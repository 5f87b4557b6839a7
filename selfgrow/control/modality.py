"""Per-modality signals and policies for multimodal models: grow the encoder that lags, or the
fusion, not everything at once.

Modalities learn at different speeds: in a jointly trained multimodal model the dominant
modality's encoder converges first and the other stays under-trained (Peng et al. 2022,
"Balanced Multimodal Learning via On-the-fly Gradient Modulation", OGM-GE; Wang et al. 2020,
"What Makes Training Multi-modal Classification Networks Hard?"). Three signals watch this:

* :class:`ModalityImbalance`: each modality's contribution, measured on a held batch by
  knocking the OTHER modalities out (their embeddings replaced by the batch mean) and scoring
  the fused prediction (the true class's probability or the accuracy); ``value = max / min``
  of the per-modality scores; ``state()["component"]`` names the lagging modality's encoder.
* :class:`ComponentSaturation`: :class:`~selfgrow.control.signals.GradientSaturation`
  grouped by component; ``state()["component"]`` names the most saturated one.
* fusion plateau: a :class:`~selfgrow.control.signals.LossPlateau` named
  ``"fusion_plateau"`` on the fused loss (:func:`fusion_plateau`).

:func:`modality_aware_policy` grows the component a signal names (first triggered rule wins:
imbalance, then saturation, then the fusion plateau), and every growth event carries the
signal, its value, the component and the per-modality scores. :func:`uniform_policy` is the
comparison: on the same signals, widen every component at once.

A model is multimodal here when it offers ``embed(x) -> {modality: (B, D_m)}``,
``fuse(embeddings) -> logits (B, C)`` and ``growth_components`` (e.g.
:class:`~selfgrow.models.multimodal.GrowableMultimodal`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core import eval_mode, measurement
from ..errors import GrowthConfigError, IncompatibleModelError, choices_message
from .policies import Budget, Rule, RulePolicy
from .signals import GradientSaturation, LossPlateau, Signal, check_range, register_signal

#: per-modality scores :class:`ModalityImbalance` can measure
SCORES = ("prob", "accuracy")


def check_multimodal(model: nn.Module, who: str) -> None:
    """Raise unless ``model`` offers ``embed``, ``fuse`` and ``growth_components``.

    Raises:
        IncompatibleModelError: names what is missing and the model class that has it.
    """
    missing = [a for a in ("embed", "fuse", "growth_components") if not hasattr(model, a)]
    if missing:
        raise IncompatibleModelError(
            f"{who} needs a multimodal model with embed(x) -> {{modality: embedding}}, "
            f"fuse(embeddings) -> logits and growth_components (e.g. "
            f"selfgrow.models.multimodal.GrowableMultimodal); {type(model).__name__} lacks "
            f"{', '.join(missing)}")


@torch.no_grad()
def modality_scores(model: nn.Module, x: Any, y: torch.Tensor, score: str = "prob"
                    ) -> dict[str, float]:
    """Per-modality contribution of ``model`` on the batch ``(x, y)``, plus ``"fused"``.

    For modality m the other modalities' embeddings are replaced by their batch mean (their
    information knocked out, their average activation kept) and the fused prediction is
    scored: ``"prob"`` = mean probability of the true class, ``"accuracy"`` = top-1 accuracy.
    Runs in eval mode as a :func:`~selfgrow.core.measurement` (BatchNorm statistics and
    signal hooks untouched).

    Args:
        model: a multimodal model (see the module docstring).
        x: the model's input (a packed tensor, or a tuple passed positionally to ``embed``).
        y: (B,) int64 labels.
        score: one of :data:`SCORES`.

    Returns:
        ``{modality: score, ..., "fused": score of the full model}``, scores in [0, 1].
    """
    if score not in SCORES:
        raise GrowthConfigError(choices_message("modality score", score, SCORES))
    check_multimodal(model, "modality_scores")

    def rate(logits: torch.Tensor) -> float:
        if score == "accuracy":
            return float((logits.argmax(dim=1) == y).double().mean())
        p = F.softmax(logits.double(), dim=1)
        return float(p.gather(1, y.view(-1, 1)).mean())

    with eval_mode(model), measurement():
        emb = model.embed(*x) if isinstance(x, (tuple, list)) else model.embed(x)
        out = {"fused": rate(model.fuse(emb))}
        for m in emb:
            knocked = {k: v if k == m else v.mean(dim=0, keepdim=True).expand_as(v)
                       for k, v in emb.items()}
            out[m] = rate(model.fuse(knocked))
    return out


class ModalityImbalance(Signal):
    """One modality contributes much less than another: grow its encoder.

    Every ``every`` steps the per-modality scores of :func:`modality_scores` are measured on
    the held batch ``probe = (x, y)`` and averaged over the last ``window`` measurements;
    ``value = max_m score_m / min_m score_m`` (>= 1, dimensionless) and the signal triggers
    when ``value >= threshold`` and the fused score is at most ``max_fused`` (a solved task
    needs no growth). ``state()`` adds ``component`` (the lagging modality, which is the name
    of its encoder component), ``dominant`` and ``scores``.

    Args:
        probe: ``(x, y)``: a held batch the model accepts and its (B,) labels.
        threshold: ratio at which the signal triggers, > 1.
        window: measurements averaged, >= 1.
        every: measure every N controller steps (one forward per modality on the probe).
        score: ``"prob"`` (smooth; default) or ``"accuracy"``.
        max_fused: trigger only while the fused score is at most this, in (0, 1].
        name: override the signal name.

    Raises:
        GrowthConfigError: a bad argument (names it and the valid range).
        IncompatibleModelError: at bind, a model that is not multimodal.
    """

    name: ClassVar[str] = "modality_imbalance"

    def __init__(self, probe: tuple[Any, torch.Tensor], threshold: float = 1.5,
                 window: int = 3, every: int = 50, score: str = "prob",
                 max_fused: float = 1.0, name: str | None = None) -> None:
        if not (isinstance(probe, (tuple, list)) and len(probe) == 2
                and isinstance(probe[1], torch.Tensor)):
            raise GrowthConfigError(
                "ModalityImbalance probe must be (x, y): a held batch and its labels tensor")
        check_range("threshold", threshold, 1.0, math.inf, lo_open=True, hi_open=True)
        check_range("max_fused", max_fused, 0.0, 1.0, lo_open=True)
        if score not in SCORES:
            raise GrowthConfigError(choices_message("ModalityImbalance score", score, SCORES))
        super().__init__(threshold=threshold, window=window, every=every, name=name)
        self.probe = (probe[0], probe[1].long())
        self.score = score
        self.max_fused = float(max_fused)
        self._model: nn.Module | None = None
        self._history: deque[dict[str, float]] = deque(maxlen=self.window)
        self.scores: dict[str, float] = {}

    def bind(self, model: nn.Module) -> None:
        check_multimodal(model, "ModalityImbalance")
        self._model = model

    def update(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self._model is None:
            return
        self._history.append(modality_scores(self._model, *self.probe, score=self.score))
        self.n_updates += 1
        keys = self._history[-1].keys()
        self.scores = {k: sum(h[k] for h in self._history) / len(self._history) for k in keys}
        mods = {k: v for k, v in self.scores.items() if k != "fused"}
        if len(mods) < 2:
            self.value, self.triggered = None, False
            return
        lo, hi = min(mods.values()), max(mods.values())
        self.value = hi / max(lo, 1e-12)
        self.triggered = (self.value >= self.threshold
                          and self.scores["fused"] <= self.max_fused
                          and len(self._history) == self.window)

    def on_growth(self, step: int) -> None:
        super().on_growth(step)
        self._history.clear()

    def extra(self) -> dict[str, Any]:
        mods = {k: v for k, v in self.scores.items() if k != "fused"}
        if not mods:
            return {"scores": dict(self.scores)}
        return {"component": min(mods, key=mods.__getitem__),
                "dominant": max(mods, key=mods.__getitem__),
                "scores": {k: round(v, 6) for k, v in self.scores.items()}}

    def _extra_state(self) -> dict[str, Any]:
        return {"history": [dict(h) for h in self._history], "scores": dict(self.scores)}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        self._history = deque((dict(h) for h in state["history"]), maxlen=self.window)
        self.scores = dict(state["scores"])


class ComponentSaturation(GradientSaturation):
    """:class:`~selfgrow.control.signals.GradientSaturation` grouped by component.

    Watches the layers of every component (``components``; default: the bound model's
    ``growth_components``) and adds to ``state()`` ``component`` (the component owning the
    most saturated layer), ``components`` (the saturated components, most saturated first)
    and ``component_scores`` (each component's highest layer score). Arguments as
    GradientSaturation's, ``include`` replaced by ``components``.

    Raises:
        GrowthConfigError: ``components`` is not a list of names.
    """

    name: ClassVar[str] = "component_saturation"

    def __init__(self, components: Sequence[str] | None = None, threshold: float = 1.0,
                 window: int = 50, history: int = 500, min_ratio: float = 1e-4,
                 exclude: Sequence[str] = (), every: int = 1, name: str | None = None
                 ) -> None:
        if components is not None and (isinstance(components, str) or not all(
                isinstance(c, str) and c for c in components)):
            raise GrowthConfigError(
                f"components must be a list of component names, got {components!r}")
        self.components = list(components) if components is not None else None
        include = None if components is None else [f"{c}.*" for c in components]
        super().__init__(threshold=threshold, window=window, history=history,
                         min_ratio=min_ratio, include=include, exclude=exclude, every=every,
                         name=name)

    def bind(self, model: nn.Module) -> None:
        if self.components is None:
            comps = getattr(model, "growth_components", None)
            if comps is None:
                raise IncompatibleModelError(
                    f"ComponentSaturation needs components=[...] or a model with "
                    f"growth_components; {type(model).__name__} has none")
            self.include = [f"{c}.*" for c in comps]
            self._groups = list(comps)
        else:
            self._groups = list(self.components)
        super().bind(model)

    def _component_of(self, layer: str) -> str | None:
        for c in getattr(self, "_groups", []):
            if layer == c or layer.startswith(f"{c}."):
                return c
        return None

    def extra(self) -> dict[str, Any]:
        out = super().extra()
        best: dict[str, float] = {}
        for layer, s in self.scores.items():
            c = self._component_of(layer)
            if c is not None:
                best[c] = max(best.get(c, -math.inf), s)
        hot = sorted({c for c in map(self._component_of, self.saturated) if c is not None},
                     key=lambda c: -best.get(c, 0.0))
        out["component_scores"] = best
        out["components"] = hot
        if hot:
            out["component"] = hot[0]
        return out


def fusion_plateau(window: int = 200, min_rel_drop: float = 0.01, **kwargs: Any
                   ) -> LossPlateau:
    """The fusion plateau: a :class:`~selfgrow.control.signals.LossPlateau` on the fused
    training loss named ``"fusion_plateau"`` (arguments as LossPlateau's)."""
    return LossPlateau(window=window, min_rel_drop=min_rel_drop, name="fusion_plateau",
                       **kwargs)


def modality_aware_policy(
    *, imbalance: str | None = "modality_imbalance",
    saturation: str | None = "component_saturation", plateau: str | None = "fusion_plateau",
    fusion: str = "fusion", action: str = "widen", action_kwargs: Mapping[str, Any] | None = None,
    budget: Budget | None = None, **policy_kwargs: Any,
) -> RulePolicy:
    """Grow the component a signal names: the lagging modality's encoder (``imbalance``),
    the most saturated component (``saturation``), else the fusion on a fusion plateau.

    Args:
        imbalance / saturation / plateau: names of the signals to use (None leaves one out).
        fusion: the fusion component's name.
        action: the multimodal model's action (``"widen"`` or ``"deepen"``), given
            ``component=`` by the rule.
        action_kwargs: fixed arguments of the action (e.g. ``{"factor": 2.0}``).
        budget / policy_kwargs: as :class:`~selfgrow.control.policies.RulePolicy`.

    Raises:
        GrowthConfigError: every signal left out.
    """
    kw = dict(action_kwargs or {})
    rules = []
    if imbalance:
        rules.append(Rule(imbalance, action, kw, from_state={"component": "component"}))
    if saturation:
        rules.append(Rule(saturation, action, kw, from_state={"component": "component"}))
    if plateau:
        rules.append(Rule(plateau, action, {**kw, "component": fusion}))
    if not rules:
        raise GrowthConfigError("modality_aware_policy needs at least one signal")
    return RulePolicy(rules, budget=budget, **policy_kwargs)


def uniform_policy(*, signals: Sequence[str] = ("modality_imbalance", "component_saturation",
                                                "fusion_plateau"),
                   action: str = "widen_all", action_kwargs: Mapping[str, Any] | None = None,
                   budget: Budget | None = None, **policy_kwargs: Any) -> RulePolicy:
    """The modality-blind comparison: when any of ``signals`` triggers, grow EVERY component
    at once (``widen_all``, one CompoundGrow). With the same signals, budget and limits as
    :func:`modality_aware_policy`, the two differ only in what they grow.

    Raises:
        GrowthConfigError: no signal names.
    """
    if isinstance(signals, str) or not signals:
        raise GrowthConfigError(f"uniform_policy needs a list of signal names, got {signals!r}")
    kw = dict(action_kwargs or {})
    return RulePolicy([Rule(s, action, kw) for s in signals], budget=budget, **policy_kwargs)


for _cls in (ModalityImbalance, ComponentSaturation):
    register_signal(_cls)

__all__ = [
    "SCORES",
    "ComponentSaturation",
    "ModalityImbalance",
    "check_multimodal",
    "fusion_plateau",
    "modality_aware_policy",
    "modality_scores",
    "uniform_policy",
]
