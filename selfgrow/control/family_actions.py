"""The built-in controller actions of every model family, in one place.

Actions are the words policies speak (``"widen"``, ``"deepen"`` ...); each function here turns
one into an operator config for a live model. They are registered in the control layer's one
action table (:mod:`selfgrow.control.actions`): per adapter kind (``"transformer"``: every
family with a :class:`~selfgrow.adapters.TransformerAdapter`, HF and
``nn.TransformerEncoder`` included; ``"classifier"``) or per model class. Operators never
register actions (they sit below the control layer).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from ..adapters import get_adapter
from ..errors import GrowthConfigError, IncompatibleModelError, choices_message
from ..models.multimodal import GrowableMultimodal
from ..ops import OpConfig, build_config
from ..ops.component import ComponentConfig, resolve_component
from ..ops.compound import CompoundGrowConfig
from ..ops.depth import IdentityInsertConfig
from ..ops.experts import AddExpertConfig, RemoveExpertConfig
from ..ops.ffn import FFNNet2WiderConfig
from ..ops.heads import HeadsCloneConfig, HeadsFreshConfig
from ..ops.net2net import Net2DeeperConfig, Net2WiderConfig, classifier_adapter, grown_width
from ..ops.positions import ExtendPositionsConfig
from ..ops.shrink import FFNRemoveUnitsConfig
from ..ops.shrink_classifier import RemoveUnitsConfig
from ..ops.width import WidenDModelConfig, WidenDModelMaskedConfig
from .actions import register_action, register_family_action, resolve_action


# ---------------------------------------------------------------------------------------------
# classifiers: selfgrow GrowableMLP / GrowableCNN, nn.Sequential, torchvision ResNet
# ---------------------------------------------------------------------------------------------
@register_family_action("classifier", "widen")
def classifier_widen(
    model: nn.Module,
    factor: float = 1.5,
    round_to: int = 8,
    noise_std: float = 0.0,
    seed: int = 0,
    split_noise: float = 0.5,
    layer: int | str | None = None,
) -> Net2WiderConfig:
    """Net2WiderNet on ``layer`` (a unit index or name; default: the narrowest unit, the
    first one on ties) to ``grown_width(width, factor, round_to)``. Actions break the symmetry
    between copies by default, exactly (``split_noise=0.5``): plain copies would stay
    identical forever and add no capacity."""
    ad = classifier_adapter(model)
    widths = ad.widths()
    i = min(range(len(widths)), key=widths.__getitem__) if layer is None else ad.unit_index(layer)
    return Net2WiderConfig(layer=i, new_width=grown_width(widths[i], factor, round_to),
                           noise_std=noise_std, seed=seed, split_noise=split_noise)


@register_family_action("classifier", "deepen")
def classifier_deepen(model: nn.Module, layer: int | str | None = None, seed: int = 0
                      ) -> Net2DeeperConfig:
    """Identity insertion after ``layer`` (default: the last unit followed by a ReLU; on a
    ResNet an identity block appended to the stage of that stream)."""
    ad = classifier_adapter(model)
    units = ad.units()
    if layer is None:
        ok = [i for i in range(len(units)) if ad.identity_problem(i) is None]
        i = ok[-1] if ok else len(units) - 1
    else:
        i = ad.unit_index(layer)
    return Net2DeeperConfig(layer=i, seed=seed)


@register_family_action("classifier", "widen_layers")
def classifier_widen_layers(
    model: nn.Module,
    layers: Sequence[int | str],
    factor: float = 1.5,
    round_to: int = 8,
    noise_std: float = 0.0,
    seed: int = 0,
    split_noise: float = 0.5,
) -> Net2WiderConfig:
    """Net2WiderNet on the given units (indices or unit / tensor names, e.g. the saturated
    ones GradientSaturation reports). Names of tensors that belong to no widenable unit (the
    output head) are skipped; GrowthConfigError if nothing widenable remains."""
    if isinstance(layers, (str, int)) or not layers:
        raise GrowthConfigError(f"layers must be a non-empty list of names/indices, got {layers!r}")
    ad = classifier_adapter(model)
    idx: set[int] = set()
    for x in layers:
        try:
            idx.add(ad.unit_index(x))
        except GrowthConfigError:
            if not isinstance(x, str):
                raise
    if not idx:
        raise GrowthConfigError(
            f"none of {list(layers)!r} is a widenable unit of {type(model).__name__} (the "
            f"output head keeps its width); valid: {', '.join(u.name for u in ad.units())}"
        )
    widths = ad.widths()
    order = sorted(idx)
    return Net2WiderConfig(layer=tuple(order),
                           new_width=tuple(grown_width(widths[i], factor, round_to) for i in order),
                           noise_std=noise_std, seed=seed, split_noise=split_noise)


def _fraction_count(fraction: float, width: int) -> int:
    """``fraction * width`` rounded half up, clipped to ``1..width - 1`` (one unit at least
    goes, one at least stays)."""
    return min(width - 1, max(1, math.floor(fraction * width + 0.5)))


def _check_prune_amount(fraction: float | None, n_remove: int | None, units: Any) -> None:
    given = [k for k, v in (("fraction", fraction), ("n_remove", n_remove), ("units", units))
             if v is not None]
    if len(given) != 1:
        raise GrowthConfigError(
            f"prune: give exactly one of fraction, n_remove, units; got "
            f"{', '.join(given) or 'none'}")
    if fraction is not None and (
            isinstance(fraction, bool) or not isinstance(fraction, (int, float))
            or not math.isfinite(fraction) or not 0 < fraction < 1):
        raise GrowthConfigError(f"prune: fraction={fraction!r} is out of range; valid: a "
                                f"number in (0, 1)")


@register_family_action("classifier", "prune")
def classifier_prune(
    model: nn.Module,
    layer: int | str | Sequence[int | str] | None = None,
    fraction: float | None = None,
    n_remove: int | None = None,
    units: Sequence[int] | Mapping[int | str, Sequence[int]] | None = None,
    criterion: str = "magnitude",
) -> RemoveUnitsConfig:
    """Structured pruning (``remove_units``) of classifier units: hidden units of an MLP,
    output channels of a conv layer (with their BatchNorm entries), channels of a ResNet
    stream.

    Args:
        layer: the unit(s) to prune (indices or unit / tensor names); ``None``: every
            hidden layer (with ``units`` as a mapping: its keys).
        fraction: per layer, remove ``fraction * width`` units (rounded half up; at least
            1, at most ``width - 1``), the least important by ``criterion``; in (0, 1). With
            ``layer=None``, layers of width 1 are skipped.
        n_remove: per layer, remove this many units, the least important by ``criterion``.
        units: the units to remove: a mapping ``{layer: [units]}`` (keys are indices or
            names; e.g. from a signal's state) or, with one ``layer``, a list of units.
        criterion: see :class:`~selfgrow.ops.shrink_classifier.RemoveUnitsConfig`.

    Give exactly one of ``fraction``, ``n_remove`` and ``units``.

    Raises:
        GrowthConfigError: none or several of fraction / n_remove / units, a fraction
            outside (0, 1), an unknown layer, or ``units`` as a list without exactly one
            ``layer`` (the operator checks the rest before any change).
    """
    _check_prune_amount(fraction, n_remove, units)
    ad = classifier_adapter(model)
    widths = ad.widths()
    if isinstance(units, Mapping):
        if layer is not None:
            raise GrowthConfigError("prune: units as a mapping {layer: units} names its own "
                                    "layers; leave layer=None")
        per = {ad.unit_index(k): tuple(v) for k, v in units.items()}
        if not per:
            raise GrowthConfigError("prune: units={} names no layer")
        order = sorted(per)
        return RemoveUnitsConfig(layer=tuple(order), units=tuple(per[i] for i in order),
                                 criterion=criterion)
    if layer is None:
        idx = list(range(len(widths)))
    elif isinstance(layer, (int, str)):
        idx = [ad.unit_index(layer)]
    else:
        idx = sorted({ad.unit_index(x) for x in layer})
    if units is not None:
        if len(idx) != 1:
            raise GrowthConfigError(
                f"prune: units={units!r} as a list needs exactly one layer (got layer="
                f"{layer!r}); give a mapping {{layer: units}} for several")
        return RemoveUnitsConfig(layer=idx[0], units=tuple(units), criterion=criterion)
    if fraction is not None:
        if layer is None:
            idx = [i for i in idx if widths[i] > 1]
            if not idx:
                raise GrowthConfigError(f"prune: every layer has width 1 {widths}; nothing "
                                        f"can be removed")
        counts = tuple(_fraction_count(float(fraction), widths[i]) for i in idx)
    else:
        counts = (n_remove if n_remove is not None else 0,) * len(idx)
    return RemoveUnitsConfig(layer=tuple(idx), n_remove=counts, criterion=criterion)


# ---------------------------------------------------------------------------------------------
# transformers: every family with a TransformerAdapter
# ---------------------------------------------------------------------------------------------
@register_family_action("transformer", "deepen")
def transformer_deepen(model: nn.Module, n_new: int = 1, at: str = "end", init: str = "copy",
                       **kw: Any) -> OpConfig:
    """Exact identity insertion of ``n_new`` blocks (``at="end"``: appended; ``"spread"``:
    evenly between existing blocks)."""
    n = get_adapter(model).dims().n_layers
    if at == "end":
        pos = tuple([n] * n_new)
    elif at == "spread":
        pos = tuple(sorted(round((k + 1) * n / (n_new + 1)) for k in range(n_new)))
    else:
        raise GrowthConfigError(choices_message("at", at, ("end", "spread")))
    return build_config(IdentityInsertConfig, positions=pos, init=init, **kw)


@register_family_action("transformer", "widen")
def transformer_widen(model: nn.Module, factor: int = 2, new_d: int | None = None,
                      **kw: Any) -> OpConfig:
    """Exact d_model duplication by ``factor``; with ``new_d`` that is not a multiple of
    d_model, exact masked widening."""
    c = get_adapter(model).dims().d_model
    if new_d is None or new_d % c == 0:
        return build_config(WidenDModelConfig, factor=factor if new_d is None else new_d // c, **kw)
    return build_config(WidenDModelMaskedConfig, new_d=new_d, **kw)


@register_family_action("transformer", "widen_ffn")
def transformer_widen_ffn(model: nn.Module, factor: int = 2, new_d_ff: int | None = None,
                          **kw: Any) -> OpConfig:
    """Net2WiderNet on every layer's FFN to ``new_d_ff`` (default ``factor * d_ff``, every
    unit copied ``factor - 1`` times), with exact zero-sum symmetry-breaking noise on the
    copies' outgoing columns (default ``noise=0.1``; plain copies would stay identical
    forever)."""
    kw.setdefault("noise", 0.1)
    f = get_adapter(model).dims().d_ff
    if new_d_ff is None:
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 2:
            raise GrowthConfigError(f"factor must be an integer >= 2, got {factor!r}")
        new_d_ff = factor * f
        kw.setdefault("sources", [u % f for u in range(new_d_ff - f)])
    return build_config(FFNNet2WiderConfig, new_d_ff=new_d_ff, **kw)


@register_family_action("transformer", "add_heads")
def transformer_add_heads(model: nn.Module, new_n_heads: int | None = None, groups: int = 1,
                          fresh: bool = False, **kw: Any) -> OpConfig:
    """Clone (or, ``fresh=True``, add new) heads; by default ``groups`` whole GQA groups
    (g query heads + 1 KV head each; one head for MHA).

    On families whose head width is tied to the hidden size (``head_dim = d_model / n_heads``:
    BERT, GPT-2, ``nn.MultiheadAttention``) heads cannot grow alone: the action keeps
    head_dim and widens d_model to ``new_n_heads * head_dim`` (default: twice the heads) with
    the exact d_model widening, which clones every head; the event records the operator it
    resolved to (``extra["resolved"]``) and the widths (``notes``)."""
    d = get_adapter(model).dims()
    if d.heads_tied_to_width:
        target = 2 * d.n_heads if new_n_heads is None else new_n_heads
        if isinstance(target, bool) or not isinstance(target, int) or target <= d.n_heads:
            raise GrowthConfigError(
                f"new_n_heads must be an int > {d.n_heads} (the current heads), got {target!r}"
            )
        new_d = target * d.head_dim
        if new_d % d.d_model == 0:
            return build_config(WidenDModelConfig, factor=new_d // d.d_model, **kw)
        return build_config(WidenDModelMaskedConfig, new_d=new_d, **kw)
    if new_n_heads is None:
        new_n_heads = d.n_heads + groups * (d.n_heads // int(d.n_kv_heads))
    cls = HeadsFreshConfig if fresh else HeadsCloneConfig
    return build_config(cls, new_n_heads=new_n_heads, **kw)


@register_family_action("transformer", "extend_context")
def transformer_extend_context(model: nn.Module, factor: int = 2, new_len: int | None = None,
                               **kw: Any) -> OpConfig:
    """``max_seq_len`` -> ``new_len`` (default ``factor * max_seq_len``), learned tables
    filled by ``fill`` (default copy_last)."""
    if new_len is None:
        cur = getattr(getattr(model, "config", None), "max_seq_len", None)
        if cur is None:
            cur = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if not isinstance(cur, int):
            raise IncompatibleModelError(
                f"extend_context: {type(model).__name__} has no maximum length in its config "
                f"(max_seq_len / max_position_embeddings); pass new_len=... or grow it with "
                f"grow_(model, make_config('extend_positions', new_len=...))"
            )
        new_len = int(factor * cur)
    return build_config(ExtendPositionsConfig, new_len=new_len, **kw)


@register_family_action("transformer", "add_expert")
def transformer_add_expert(model: nn.Module, layer: int | None = None,
                           source: int | None = None, **kw: Any) -> OpConfig:
    """One more expert in an MoE layer of a selfgrow GrowableTransformer (``add_expert``): by
    default in the layer whose busiest expert takes the largest load fraction in the
    layers' routing statistics (what the ``ExpertOverload`` signal read), copying that
    expert. Before any forward has been counted (when the controller checks its rules at
    construction), the first MoE layer and its expert 0.

    Raises:
        IncompatibleModelError: a model without MoE layers (or not a GrowableTransformer).
    """
    loads = _routing_by_block(model, "add_expert")
    seen = {i: st for i, st in loads.items() if st["tokens"] > 0}
    if layer is None:
        layer = max(seen, key=lambda i: float(seen[i]["load"].max())) if seen else min(loads)
    if source is None and layer not in seen:
        source = 0  # no routing counted yet (e.g. when the controller checks its rules)
    return build_config(AddExpertConfig, layer=layer, source=source, **kw)



@register_family_action("transformer", "prune")
def transformer_prune(model: nn.Module, fraction: float | None = None,
                      n_remove: int | None = None, units: Sequence[int] | None = None,
                      criterion: str = "magnitude") -> OpConfig:
    """Remove FFN hidden units in every layer (``ffn_remove_units``): ``units`` (the same in
    every layer: the config holds one d_ff), ``n_remove`` or ``fraction * d_ff`` (rounded half
    up; at least 1, at most ``d_ff - 1``) least important by ``criterion`` per layer. Give exactly
    one of ``fraction`` (in (0, 1)), ``n_remove`` and ``units``.

    Raises:
        GrowthConfigError: none or several of them, a fraction outside (0, 1), or ``units``
            as a per-layer mapping (every layer loses the same units).
    """
    _check_prune_amount(fraction, n_remove, units)
    if isinstance(units, Mapping):
        raise GrowthConfigError(
            "prune: a transformer's FFN layers share one d_ff, so units is one list of units "
            "removed in every layer, not a mapping {layer: units}")
    if units is not None:
        return build_config(FFNRemoveUnitsConfig, units=tuple(units), criterion=criterion)
    if fraction is not None:
        n_remove = _fraction_count(float(fraction), get_adapter(model).dims().d_ff)
    return build_config(FFNRemoveUnitsConfig, n_remove=n_remove, criterion=criterion)


@register_family_action("transformer", "remove_expert")
def transformer_remove_expert(model: nn.Module, layer: int | None = None,
                              expert: int | None = None) -> OpConfig:
    """Remove one expert of an MoE layer of a selfgrow GrowableTransformer
    (``remove_expert``, a shrink): by default in the layer whose least used expert has the
    smallest relative load (load fraction times the number of experts) in the routing
    statistics (what the ``IdleExperts`` signal read), that expert; before any forward has
    been counted, the first layer with more than one expert and its expert chosen by the
    operator.

    Raises:
        IncompatibleModelError: a model without MoE layers (or not a GrowableTransformer).
    """
    loads = _routing_by_block(model, "remove_expert")
    multi = {i: st for i, st in loads.items() if st["load"].numel() > 1}
    seen = {i: st for i, st in multi.items() if st["tokens"] > 0}
    if layer is None:
        pool = seen or multi or loads
        layer = min(pool, key=lambda i: float(pool[i]["load"].min()) * pool[i]["load"].numel()
                    if pool[i]["tokens"] > 0 else float("inf"))
    return build_config(RemoveExpertConfig, layer=layer, expert=expert)


def _routing_by_block(model: nn.Module, op: str) -> dict[int, dict[str, Any]]:
    """``{block index: routing statistics of its MoE layer}`` (the current window, not
    consumed).

    Raises:
        IncompatibleModelError: no MoE layer.
    """
    from ..models.moe import moe_layers

    layers = {n: m for n, m in moe_layers(model).items() if n.startswith("layers.")}
    if not layers:
        raise IncompatibleModelError(
            f"{op}: {type(model).__name__} has no MoE layer (a selfgrow "
            f"GrowableTransformer with moe_experts); upcycle it first (moe_upcycle)")
    return {int(n.split(".")[1]): m.routing_stats(reset=False) for n, m in layers.items()}


# ---------------------------------------------------------------------------------------------
# multimodal: selfgrow GrowableMultimodal (each component is a classifier-kind model)
# ---------------------------------------------------------------------------------------------
def _on_component(model: nn.Module, component: str, action: str, **kwargs: Any
                  ) -> ComponentConfig:
    """The component's own ``action`` (its family's), wrapped to target ``component``."""
    if not isinstance(component, str):
        raise GrowthConfigError(
            f"component={component!r} must be a component name; valid: "
            f"{', '.join(getattr(model, 'growth_components', ()))}")
    sub = resolve_component(model, component)
    return ComponentConfig(component=component, step=resolve_action(action, sub, **kwargs))


#: which units of a component ``widen`` grows
WIDEN_UNITS = ("narrowest", "all")


@register_action(GrowableMultimodal, "widen")
def multimodal_widen(model: nn.Module, component: str, units: str = "narrowest",
                     **kwargs: Any) -> ComponentConfig:
    """Net2WiderNet on one component (``"image"``, ``"audio"``, ``"fusion"``): its narrowest
    unit (``units="narrowest"``, the classifier ``widen`` action) or every unit at once
    (``units="all"``, ``widen_layers``); ``kwargs`` as those actions (``factor`` ...)."""
    if units not in WIDEN_UNITS:
        raise GrowthConfigError(choices_message("widen units", units, WIDEN_UNITS))
    if units == "all":
        sub = resolve_component(model, component)
        n = len(classifier_adapter(sub).widths())
        return _on_component(model, component, "widen_layers", layers=list(range(n)), **kwargs)
    return _on_component(model, component, "widen", **kwargs)


@register_action(GrowableMultimodal, "deepen")
def multimodal_deepen(model: nn.Module, component: str, **kwargs: Any) -> ComponentConfig:
    """Identity insertion in one component; ``kwargs`` as the classifier ``deepen``."""
    return _on_component(model, component, "deepen", **kwargs)


@register_action(GrowableMultimodal, "prune")
def multimodal_prune(model: nn.Module, component: str, **kwargs: Any) -> ComponentConfig:
    """Unit removal in one component; ``kwargs`` as the classifier ``prune``."""
    return _on_component(model, component, "prune", **kwargs)


@register_action(GrowableMultimodal, "widen_all")
def multimodal_widen_all(model: nn.Module, components: Sequence[str] | None = None,
                         units: str = "narrowest", **kwargs: Any) -> CompoundGrowConfig:
    """Widen every component (default: all of ``growth_components``) in one CompoundGrow:
    the modality-blind, uniform growth."""
    comps = list(model.growth_components if components is None else components)
    if not comps or isinstance(components, str):
        raise GrowthConfigError(f"components={components!r} must be a non-empty list of names")
    return CompoundGrowConfig(steps=[multimodal_widen(model, c, units=units, **kwargs)
                                     for c in comps])
