"""Width growth of the residual stream (d_model) of transformers.

All operators work through :mod:`selfgrow.adapters` (selfgrow GrowableTransformer,
``nn.TransformerEncoder``, HF BERT / GPT-2 / LLaMA) and rewrite the family's config
(``d_model`` / ``hidden_size`` / ``n_embd`` / MHA ``embed_dim``) so a fresh model built from
the grown config loads the grown state dict.

Duplication by an integer factor k (``widen_d_model``, EXACT; staged training, Shen et al.
2022; bert2BERT, Chen et al. 2022; HyperCloning, Wang et al. 2024). The stream becomes
``h' = [h; h; ...]`` (k tiles, new coordinate j copies old coordinate ``j mod C``). It has
the same mean, variance and mean square as h, so LayerNorm and RMSNorm commute with it when
their gain and bias are tiled. Per tensor (C = old width, rows = outputs, cols = inputs):

====================================== =============== ===================== ============
tensor                                 stream axis     values                grad_scale
====================================== =============== ===================== ============
q, k, v, FFN up/gate, head (untied)    input (read)    tiled, divided by k   1
o, FFN down (weights and biases)       output (write)  tiled                 1/k
embeddings (tokens, positions, types)  columns (write) tiled                 1/k
norm gains and biases                  (write)         tiled                 1/k
final norm when the head is tied       (write)         tiled, divided by k   1
====================================== =============== ===================== ============

Why these grad_scales: the loss is invariant to the duplication, ``L'([h; h]) = L(h)``, and
symmetric in the copies, so each copy of a stream coordinate receives ``1/k`` of the old
gradient; a tensor WRITING the stream therefore gets ``g/k`` per copy. A tensor READING the
stream multiplies the same input ``x`` and feeds an unchanged output, so it gets the old
gradient ``g`` (grad_scale 1) although its values are divided by k. With a tied head the
shared matrix is a writer (1/k) and, as head, reads ``norm_f / k`` (1/k as well); the final
norm gain, divided by k, feeds an undivided head: grad_scale 1. The optimizer migration
scales Adam moments by these factors (``m * s``, ``v * s**2``, :mod:`selfgrow.optim`).

Attention: where the family ties ``head_dim = d_model // n_heads`` (BERT, GPT-2,
``nn.MultiheadAttention``) the head width is kept and the heads are cloned k times (q, k, v
rows tiled, ``o`` columns tiled and divided by k: each clone computes the same attention
pattern, scale ``1/sqrt(Dh)`` unchanged; grad_scale 1/k for q/k/v rows). Widening head_dim
instead would change ``q.k`` and the softmax scale, so it is not done. Where head_dim is
free (selfgrow, LLaMA) the heads are left alone and only the stream grows.

Symmetry breaking that stays exact (``noise > 0``): every weight READING the stream gets
``+N`` on the block reading copy 1 and ``-N`` on copy 2 (k > 2: k - 1 independent blocks and
minus their sum), which cancels on identical copies.

``widen_d_model_masked`` (arbitrary width, EXACT at ramp start; Yao et al. 2023): norms
switch to masked statistics, new coordinates have mask 0 and norm gain/bias 0, so they
neither change the statistics nor reach any reader; ``GrowableTransformer.advance_ramps``
ramps the mask to 1 later. selfgrow GrowableTransformer only.

``widen_d_model_pad`` (arbitrary width, NOT exact through LayerNorm/RMSNorm: statistics
change): ``"net2net"`` (new coordinates copy random old ones, readers divided by the copy
count; Chen et al. 2016 Net2WiderNet, bert2BERT FPI), ``"zero"`` (zero padding) or
``"random"`` (small random values); the error is measured by ``grow_``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..adapters import (
    AxisMap,
    ProjRef,
    Roles,
    TransformerAdapter,
    get_adapter,
    normal_fill,
    projection_plans,
    resize_params,
)
from ..core import Transaction
from ..errors import GrowthConfigError, IncompatibleModelError, choices_message
from ..models.transformer import Norm
from ._registry import GrowthResult, OpConfig, Operator, register_operator

PAD_MODES = ("net2net", "zero", "random")


# ---------------------------------------------------------------------------------------------
# axis roles
# ---------------------------------------------------------------------------------------------
def _tile(old: int, new: int) -> torch.Tensor:
    return torch.arange(new) % old


def _norm_plans(plans: dict[str, dict[int, AxisMap]], nr: Any, m: AxisMap) -> None:
    plans[nr.weight_name] = {0: m}
    if nr.bias_name is not None:
        plans[nr.bias_name] = {0: m}


def width_plans(
    ad: TransformerAdapter, stream: Roles, inner: Roles | None
) -> tuple[dict[str, dict[int, AxisMap]], list[str]]:
    """Every parameter touching the stream (and the attention inner dim when ``inner`` is
    given, for head-tied families): ``({name: {dim: AxisMap}}, names_of_stream_readers)``.

    Reusable by other operators (e.g. compound width + heads growth).
    """
    items: list[tuple[ProjRef, AxisMap | None, AxisMap | None]] = []
    readers: list[str] = []
    plans: dict[str, dict[int, AxisMap]] = {}
    for lv in ad.layer_views():
        iw = inner.write if inner is not None else None
        ir = inner.read if inner is not None else None
        for ref in (lv.q, lv.k, lv.v):
            items.append((ref, iw, stream.read))
        items.append((lv.o, stream.write, ir))
        items.append((lv.up, None, stream.read))
        if lv.gate is not None:
            items.append((lv.gate, None, stream.read))
        items.append((lv.down, stream.write, None))
        readers += [r.weight_name for r in (lv.q, lv.k, lv.v, lv.up, lv.gate) if r is not None]
        _norm_plans(plans, lv.norm1, stream.write)
        _norm_plans(plans, lv.norm2, stream.write)
    for ref, reads, writes in ad.extra_projections():
        items.append((ref, stream.write if writes else None, stream.read if reads else None))
        if reads:
            readers.append(ref.weight_name)
    tied = ad.tied()
    head = ad.head()
    if head is not None and not tied:
        items.append((head, None, stream.read))
        readers.append(head.weight_name)
    plans.update(projection_plans(items))
    for e in ad.embeddings():
        plans[e.weight_name] = {1: stream.write}
    en = ad.embed_norm()
    if en is not None:
        _norm_plans(plans, en, stream.write)
    fn = ad.final_norm()
    if fn is not None:
        _norm_plans(plans, fn, stream.tied_final() if tied else stream.write)
    return plans, sorted(set(readers))


def _reader_dim(ad: TransformerAdapter, name: str) -> int:
    """Dimension of a reader weight that reads the stream (1, or 0 for transposed Conv1D)."""
    for lv in ad.layer_views():
        for r in lv.projections().values():
            if r.weight_name == name:
                return 0 if r.transposed else 1
    return 1


def _sym_noise(dim: int, old: int, k: int, std: float, g: torch.Generator
               ) -> Callable[[torch.Tensor], torch.Tensor]:
    def f(t: torch.Tensor) -> torch.Tensor:
        blocks = list(t.split(old, dim=dim))
        scale = std * float(t.detach().double().std())
        shape = blocks[0].shape
        ns = [torch.randn(shape, generator=g, dtype=torch.float64) * scale for _ in range(k - 1)]
        ns.append(-torch.stack(ns).sum(0))
        return torch.cat([b + n.to(b.dtype) for b, n in zip(blocks, ns, strict=True)], dim=dim)

    return f


def _regrid_masks(tx: Transaction, model: nn.Module, index: torch.Tensor, new_value: float
                  ) -> None:
    for m in model.modules():
        if isinstance(m, Norm) and m.mask is not None:
            new = m.mask.index_select(0, index.clamp(min=0).to(m.mask.device))
            new = torch.where(index.to(new.device) >= 0, new, torch.full_like(new, new_value))
            tx.set_buffer(m, "mask", new)


def _check_nonneg(field: str, value: float) -> None:
    """GrowthConfigError unless ``value`` is a finite real >= 0 (NaN noise would silently
    fill the grown weights with NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        math.isfinite(value) and value >= 0
    ):
        raise GrowthConfigError(f"{field} must be a finite number >= 0, got {value!r}")


def _validate_common(model: nn.Module, new_d: int) -> TransformerAdapter:
    ad = get_adapter(model)
    ad.check()
    d = ad.dims()
    if not isinstance(new_d, int) or new_d <= d.d_model:
        raise GrowthConfigError(
            f"new d_model must be an integer > current {d.d_model} (no shrinking), got {new_d!r}"
        )
    if d.heads_tied_to_width and new_d % d.head_dim:
        raise GrowthConfigError(
            f"{ad.family} ties head_dim = d_model / n_heads; new d_model {new_d} must be a "
            f"multiple of head_dim {d.head_dim} (heads are added, head_dim kept)"
        )
    return ad


# ---------------------------------------------------------------------------------------------
# widen_d_model (exact duplication)
# ---------------------------------------------------------------------------------------------
@dataclass
class WidenDModelConfig(OpConfig):
    """Duplicate the residual stream ``factor`` times (C -> k C).

    EXACT in eval mode, through LayerNorm/RMSNorm, learned positions and tied embeddings
    (final norm divided by k), also with ``noise > 0`` (symmetric +N/-N on the stream
    readers, relative to each weight's std). Head-tied families clone their heads (head_dim
    kept). Sources: Shen et al. 2022 (staged training), Chen et al. 2022 (bert2BERT),
    Wang et al. 2024 (HyperCloning). See the module docstring for values and grad_scales.
    """

    name: ClassVar[str] = "widen_d_model"
    factor: int = 2
    noise: float = 0.0
    seed: int = 0


@register_operator(WidenDModelConfig)
class WidenDModel(Operator):
    exact = True

    def validate(self, model: nn.Module, config: OpConfig) -> None:
        if not isinstance(config, WidenDModelConfig):
            raise GrowthConfigError("expected WidenDModelConfig")
        if not isinstance(config.factor, int) or config.factor < 2:
            raise GrowthConfigError(f"factor must be an integer >= 2, got {config.factor!r}")
        _check_nonneg("noise", config.noise)
        ad = get_adapter(model)
        _validate_common(model, ad.dims().d_model * config.factor)

    def apply(self, model: nn.Module, config: OpConfig, tx: Transaction) -> GrowthResult:
        if not isinstance(config, WidenDModelConfig):
            raise GrowthConfigError("expected WidenDModelConfig")
        ad = get_adapter(model)
        d = ad.dims()
        k, c = config.factor, d.d_model
        stream = Roles.from_index(_tile(c, k * c), c)
        inner = None
        if d.heads_tied_to_width:
            hd = d.n_heads * d.head_dim
            inner = Roles.from_index(_tile(hd, k * hd), hd)
        plans, readers = width_plans(ad, stream, inner)
        post = {}
        if config.noise > 0:
            g = torch.Generator().manual_seed(config.seed)
            for n in readers:
                post[n] = _sym_noise(_reader_dim(ad, n), c, k, config.noise, g)
        maps = resize_params(tx, model, plans, post=post)
        _regrid_masks(tx, model, stream.index, 1.0)
        dims: dict[str, int] = {"d_model": k * c}
        if d.heads_tied_to_width:
            dims["n_heads"] = k * d.n_heads
        ad.update_dims(tx, **dims)
        return GrowthResult(param_maps=maps, exact=True, notes={
            "d_model": [c, k * c], "heads_cloned": d.heads_tied_to_width,
            "tied_final_norm_divided": ad.tied(),
        })


# ---------------------------------------------------------------------------------------------
# widen_d_model_pad (inexact: net2net / zero / random)
# ---------------------------------------------------------------------------------------------
@dataclass
class WidenDModelPadConfig(OpConfig):
    """Grow C to any ``new_d`` by Net2Net-style replication (``mode="net2net"``: new
    coordinates copy random old ones, readers divided by the copy count), zero padding
    (``"zero"``) or small random padding (``"random"``, std ``init_std``).

    NOT exact: LayerNorm/RMSNorm statistics change with the added coordinates; ``grow_``
    measures the error. Sources: Chen et al. 2016 (Net2WiderNet), Chen et al. 2022
    (bert2BERT function-preserving initialisation, which is also inexact through LN).
    """

    name: ClassVar[str] = "widen_d_model_pad"
    new_d: int = 0
    mode: str = "net2net"
    init_std: float = 0.02
    seed: int = 0


@register_operator(WidenDModelPadConfig)
class WidenDModelPad(Operator):
    exact = False

    def validate(self, model: nn.Module, config: OpConfig) -> None:
        if not isinstance(config, WidenDModelPadConfig):
            raise GrowthConfigError("expected WidenDModelPadConfig")
        if config.mode not in PAD_MODES:
            raise GrowthConfigError(choices_message("mode", config.mode, PAD_MODES))
        _check_nonneg("init_std", config.init_std)
        _validate_common(model, config.new_d)

    def apply(self, model: nn.Module, config: OpConfig, tx: Transaction) -> GrowthResult:
        if not isinstance(config, WidenDModelPadConfig):
            raise GrowthConfigError("expected WidenDModelPadConfig")
        ad = get_adapter(model)
        d = ad.dims()
        c, nd = d.d_model, config.new_d
        g = torch.Generator().manual_seed(config.seed)

        def grow_index(old: int, new: int, unit: int = 1) -> torch.Tensor:
            if config.mode == "net2net":
                extra = torch.randint(0, old // unit, ((new - old) // unit,), generator=g)
            else:
                extra = torch.full(((new - old) // unit,), -1)
            units = torch.cat([torch.arange(old // unit), extra])
            idx = (units[:, None] * unit + torch.arange(unit)[None, :]).reshape(-1)
            return torch.where(units[:, None].expand(-1, unit).reshape(-1) >= 0, idx, -1)

        stream = Roles.from_index(grow_index(c, nd), c)
        inner = None
        if d.heads_tied_to_width:
            hd = d.n_heads * d.head_dim
            inner = Roles.from_index(grow_index(hd, nd, d.head_dim), hd)
        plans, _ = width_plans(ad, stream, inner)
        fill: Any = normal_fill(config.init_std, g) if config.mode == "random" else None
        norm_names = norm_param_names(ad)
        fills = {}
        for n in plans:
            if n in norm_names:
                if n.endswith("weight") and config.mode != "zero":
                    fills[n] = _ones_fill  # new coordinates normalised with gain 1, bias 0
            elif fill is not None:
                fills[n] = fill
        maps = resize_params(tx, model, plans, fill=fills)
        _regrid_masks(tx, model, stream.index, 1.0)
        dims = {"d_model": nd}
        if d.heads_tied_to_width:
            dims["n_heads"] = nd // d.head_dim
        ad.update_dims(tx, **dims)
        return GrowthResult(param_maps=maps, exact=False,
                            notes={"d_model": [c, nd], "mode": config.mode})


def _ones_fill(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
               ) -> torch.Tensor:
    return torch.ones(shape, dtype=dtype, device=device)


def norm_param_names(ad: TransformerAdapter) -> set[str]:
    """Names of every norm gain and bias (block, embedding and final norms)."""
    refs = [nr for lv in ad.layer_views() for nr in (lv.norm1, lv.norm2)]
    refs += [nr for nr in (ad.final_norm(), ad.embed_norm()) if nr is not None]
    out = set()
    for nr in refs:
        out.add(nr.weight_name)
        if nr.bias_name is not None:
            out.add(nr.bias_name)
    return out


# ---------------------------------------------------------------------------------------------
# widen_d_model_masked (exact at ramp start)
# ---------------------------------------------------------------------------------------------
@dataclass
class WidenDModelMaskedConfig(OpConfig):
    """Grow C to any ``new_d`` with masked normalisation: new coordinates have norm mask 0
    and norm gain/bias 0; other new weights zero (``init="zero"``) or N(0, init_std^2)
    (``"random"``, the default: gives the new coordinates gradients once the ramp opens).

    EXACT while the mask of the new coordinates is 0 (round-off from computing masked
    statistics); post-LN: the new embedding columns are zero (the first block reads the raw
    embedding sum); ``GrowableTransformer.advance_ramps`` ramps them in. selfgrow
    GrowableTransformer only. Source: Yao et al. 2023 (masked structural growth).
    """

    name: ClassVar[str] = "widen_d_model_masked"
    new_d: int = 0
    init: str = "random"
    init_std: float = 0.02
    seed: int = 0


@register_operator(WidenDModelMaskedConfig)
class WidenDModelMasked(Operator):
    exact = True

    def validate(self, model: nn.Module, config: OpConfig) -> None:
        if not isinstance(config, WidenDModelMaskedConfig):
            raise GrowthConfigError("expected WidenDModelMaskedConfig")
        if config.init not in ("zero", "random"):
            raise GrowthConfigError(choices_message("init", config.init, ("zero", "random")))
        _check_nonneg("init_std", config.init_std)
        ad = get_adapter(model)
        if not ad.supports_norm_mask:
            raise IncompatibleModelError(
                f"widen_d_model_masked needs masked normalisation, which {ad.family} lacks; "
                f"use widen_d_model (integer factor, exact) or widen_d_model_pad (inexact)"
            )
        _validate_common(model, config.new_d)
        if ad.dims().heads_tied_to_width:
            raise IncompatibleModelError(f"{ad.family} ties heads to width")

    def apply(self, model: nn.Module, config: OpConfig, tx: Transaction) -> GrowthResult:
        if not isinstance(config, WidenDModelMaskedConfig):
            raise GrowthConfigError("expected WidenDModelMaskedConfig")
        ad = get_adapter(model)
        c, nd = ad.dims().d_model, config.new_d
        index = torch.cat([torch.arange(c), torch.full((nd - c,), -1)])
        # all old coordinates keep values and gradients: plain index maps, no scaling
        stream = Roles(read=AxisMap(index), write=AxisMap(index), index=index,
                       count=torch.ones(nd, dtype=torch.float64))
        plans, _ = width_plans(ad, stream, None)
        g = torch.Generator().manual_seed(config.seed)
        rnd = normal_fill(config.init_std, g) if config.init == "random" else None
        norm_names = norm_param_names(ad)
        fills = {n: rnd for n in plans if n not in norm_names and rnd is not None}
        if not ad.dims().norm_first:
            # post-LN blocks read the raw embedding sum: its new columns must be zero
            for e in ad.embeddings():
                fills.pop(e.weight_name, None)
        ad.enable_norm_mask(tx)
        maps = resize_params(tx, model, plans, fill=fills)  # norms: zero gain/bias at new
        _regrid_masks(tx, model, index, 0.0)
        ad.update_dims(tx, d_model=nd)
        return GrowthResult(param_maps=maps, exact=True,
                            notes={"d_model": [c, nd], "mask": "new coordinates at 0"})


__all__ = [
    "Roles",
    "WidenDModelConfig",
    "WidenDModelMaskedConfig",
    "WidenDModelPadConfig",
    "norm_param_names",
    "width_plans",
]
