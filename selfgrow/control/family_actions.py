"""The built-in controller actions of every model family, in one place.

Actions are the words policies speak (``"widen"``, ``"deepen"`` ...); each function here turns
one into an operator config for a live model. They are registered in the control layer's one
action table (:mod:`selfgrow.control.actions`): per adapter kind (``"transformer"``: every
family with a :class:`~selfgrow.adapters.TransformerAdapter`, HF and
``nn.TransformerEncoder`` included; ``"classifier"``) or per model class. Operators never
register actions (they sit below the control layer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from ..adapters import get_adapter
from ..errors import GrowthConfigError, choices_message
from ..models.cnn import GrowableCNN
from ..models.mlp import GrowableMLP
from ..ops import OpConfig, build_config
from ..ops.depth import IdentityInsertConfig
from ..ops.ffn import FFNNet2WiderConfig
from ..ops.heads import HeadsCloneConfig, HeadsFreshConfig
from ..ops.net2net import (
    Net2DeeperConfig,
    Net2WiderConfig,
    grown_width,
    hidden_widths,
    layer_prefix,
    resolve_layer,
)
from ..ops.positions import ExtendPositionsConfig
from ..ops.width import WidenDModelConfig, WidenDModelMaskedConfig
from .actions import register_action, register_family_action


# ---------------------------------------------------------------------------------------------
# classifiers (GrowableMLP, GrowableCNN)
# ---------------------------------------------------------------------------------------------
def classifier_widen(
    model: nn.Module,
    factor: float = 1.5,
    round_to: int = 8,
    noise_std: float = 0.0,
    seed: int = 0,
    split_noise: float = 0.5,
) -> Net2WiderConfig:
    """Net2WiderNet on the narrowest hidden layer / block (the first one on ties). Actions
    break the symmetry between copies by default, exactly (``split_noise=0.5``): plain copies
    would stay identical forever and add no capacity."""
    widths = hidden_widths(model)
    i = min(range(len(widths)), key=widths.__getitem__)
    return Net2WiderConfig(
        layer=i,
        new_width=grown_width(widths[i], factor, round_to),
        noise_std=noise_std,
        seed=seed,
        split_noise=split_noise,
    )


def classifier_deepen(model: nn.Module) -> Net2DeeperConfig:
    """Identity insertion after the last hidden layer / block."""
    return Net2DeeperConfig(layer=len(hidden_widths(model)) - 1)


def classifier_widen_layers(
    model: nn.Module,
    layers: Sequence[int | str],
    factor: float = 1.5,
    round_to: int = 8,
    noise_std: float = 0.0,
    seed: int = 0,
    split_noise: float = 0.5,
) -> Net2WiderConfig:
    """Net2WiderNet on the given layers (indices or names, e.g. saturated ones). Names of
    tensors that are not hidden layers / blocks (the output ``head``, e.g. as reported by
    GradientSaturation) are skipped; GrowthConfigError if nothing widenable remains."""
    if isinstance(layers, (str, int)) or not layers:
        raise GrowthConfigError(f"layers must be a non-empty list of names/indices, got {layers!r}")
    head = [x for x in layers if isinstance(x, str) and x.split(".")[0] == "head"]
    rest = [x for x in layers if x not in head]
    if not rest:
        raise GrowthConfigError(
            f"none of {list(layers)!r} is a widenable hidden layer / block of "
            f"{type(model).__name__} (the output head keeps its width); valid: "
            + ", ".join(f"{layer_prefix(model)}.{i}" for i in range(len(hidden_widths(model))))
        )
    idx = sorted({resolve_layer(model, layer) for layer in rest})
    widths = hidden_widths(model)
    return Net2WiderConfig(
        layer=tuple(idx),
        new_width=tuple(grown_width(widths[i], factor, round_to) for i in idx),
        noise_std=noise_std,
        seed=seed,
        split_noise=split_noise,
    )


for _cls in (GrowableMLP, GrowableCNN):
    register_action(_cls, "widen")(classifier_widen)
    register_action(_cls, "deepen")(classifier_deepen)
    register_action(_cls, "widen_layers")(classifier_widen_layers)


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
    (g query heads + 1 KV head each; one head for MHA)."""
    d = get_adapter(model).dims()
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
        new_len = int(factor * model.config.max_seq_len)
    return build_config(ExtendPositionsConfig, new_len=new_len, **kw)


_ = Sequence  # re-exported typing name used by the classifier actions
