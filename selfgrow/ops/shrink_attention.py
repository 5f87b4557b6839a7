"""Shrink operator for attention: remove query heads (and, with whole groups, KV heads).

Canonical layout (see :mod:`selfgrow.ops.heads`): ``q: (H * Dh, C)``, ``k, v: (Hkv * Dh, C)``,
``o: (C, H * Dh)``; query head i owns q rows and o columns ``[i Dh, (i + 1) Dh)`` and reads
KV head ``i // g`` (``g = H / Hkv``, grouped-query attention; ``g = 1`` is multi-head
attention). The attention output is ``sum_i o[:, i] head_i + b_o``, a sum over query heads,
so removing head i changes it by ``- o[:, i] head_i``.

``heads_remove``: drop query heads in every layer, head_dim kept. EXACT when every removed
head's output-projection columns ``o[:, i Dh:(i + 1) Dh]`` are zero in every layer (e.g.
heads added by ``heads_fresh`` that never trained, or pruned to zero; ``is_exact`` checks the
weights); otherwise the error is measured and reported. The grouped-query rule (``gqa``,
the mirror of the growth operators' modes) keeps every kept query head reading the KV head
it was trained with:

* ``"groups"`` (default): remove whole KV groups, one KV head and its g query heads; the
  remaining groups keep their order, so query head i still reads KV head ``i // g``. The
  number removed is a multiple of g; given ``heads`` must list every head of each group
  they touch. On multi-head attention (g = 1) this removes single heads.
* ``"within"``: keep every KV head and remove the same number r of query heads from each
  group (g -> g - r); the kept heads of group j stay contiguous, so head i reads KV head
  ``i // (g - r)``. The number removed is a multiple of Hkv, and each group keeps a head.

Heads are given explicitly (``heads``, query head indices, the same in every layer) or chosen
per layer as the least important by magnitude: ``|o[:, i]|_F * |q[i]|_F`` (Frobenius norms
of the head's output columns and query rows, fp64; a KV group's importance is the sum of its
query heads'), the first-order size of the head's contribution; ties remove the lower index
first. Sources: Michel et al. 2019 ("Are Sixteen Heads Really Better than One?": most heads
can be removed at test time); Voita et al. 2019 (specialised heads do the heavy lifting, the
rest can be pruned).

Optimizer state: the kept q / k / v rows, biases and o columns keep their state bit-identical
(gathered, gradient scale 1); the removed coordinates' state is dropped. The family config's
``n_heads`` / ``n_kv_heads`` are rewritten, so a model built from the config loads the state
dict. Families that derive ``head_dim = d_model / n_heads`` (HF BERT, HF GPT-2,
``nn.TransformerEncoder``) are refused with
:class:`~selfgrow.errors.IncompatibleModelError`: a rebuilt model with fewer heads would have
a different head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..adapters import (
    AxisMap,
    ProjRef,
    TransformerAdapter,
    TransformerDims,
    get_adapter,
    projection_plans,
    resize_params,
)
from ..core import Transaction
from ..errors import GrowthConfigError, IncompatibleModelError, choices_message
from ._registry import GrowthResult, OpConfig, Operator, register_operator
from .heads import GQA_MODES, _coords
from .shrink import _keep_roles, check_n_remove, parse_indices

OP = "heads_remove"
CRITERIA = ("magnitude",)

#: per layer: (kept query heads (H',), kept KV heads (Hkv',)), sorted old indices
HeadKeep = tuple[torch.Tensor, torch.Tensor]


@dataclass
class HeadsRemoveConfig(OpConfig):
    """Remove attention query heads in every layer (head_dim kept): ``heads`` (query head
    indices, the same in every layer) or, per layer, the ``n_remove`` least important by
    ``criterion`` (``"magnitude"``: ``|o[:, head]|_F * |q[head]|_F``; a group's is the sum of
    its heads'). ``gqa``: ``"groups"`` removes whole KV groups (a KV head and its g query
    heads; ``n_remove`` a multiple of g; single heads on multi-head attention) or
    ``"within"`` removes the same number of query heads from every group (``n_remove`` a
    multiple of n_kv_heads, every group keeps one). EXACT when every removed head's
    output-projection columns are zero; otherwise inexact (the error is measured). Kept
    coordinates keep their optimizer state bit-identical. Refuses head-tied families
    (BERT, GPT-2, nn.MultiheadAttention) with IncompatibleModelError. Sources: Michel et al.
    2019 (Are Sixteen Heads Really Better than One?); Voita et al. 2019.
    """

    name: ClassVar[str] = "heads_remove"
    heads: tuple[int, ...] | None = None
    n_remove: int = 0
    gqa: str = "groups"
    criterion: str = "magnitude"


def head_importance(ad: TransformerAdapter, i: int) -> torch.Tensor:
    """(H,) fp64 ``|o[:, head]|_F * |q[head]|_F`` of layer ``i``'s query heads."""
    d = ad.dims()
    lv = ad.layer(i)
    q = lv.q.weight().double().reshape(d.n_heads, -1).norm(dim=1)
    o = lv.o.weight().double().reshape(d.d_model, d.n_heads, d.head_dim).norm(dim=(0, 2))
    return o * q


def _valid_counts(d: TransformerDims, gqa: str) -> list[int]:
    h, hkv = d.n_heads, d.n_kv_heads
    step = h // hkv if gqa == "groups" else hkv
    return list(range(step, h, step))


def _check_count(d: TransformerDims, n: int, gqa: str) -> None:
    valid = _valid_counts(d, gqa)
    if n in valid:
        return
    g = d.n_heads // d.n_kv_heads
    rule = (f"whole KV groups of g={g} query heads, at least one group stays" if gqa == "groups"
            else f"the same number from each of the {d.n_kv_heads} KV groups, each keeps one")
    shown = ", ".join(map(str, valid[:6])) + (", ..." if len(valid) > 6 else "")
    hint = ""
    if not valid:
        hint = ("; use gqa='within'" if gqa == "groups" else "; use gqa='groups'")
    raise GrowthConfigError(
        f"{OP}: removing {n} of n_heads={d.n_heads} query heads (n_kv_heads={d.n_kv_heads}) is "
        f"out of range for gqa={gqa!r} ({rule}); valid: {shown or 'none'}{hint}")


def _keep_of(gone: set[int], d: TransformerDims, gqa: str) -> HeadKeep:
    g = d.n_heads // d.n_kv_heads
    kq = torch.tensor([j for j in range(d.n_heads) if j not in gone], dtype=torch.long)
    if gqa == "within":
        return kq, torch.arange(d.n_kv_heads)
    kkv = torch.tensor([j for j in range(d.n_kv_heads) if j * g not in gone], dtype=torch.long)
    return kq, kkv


def _check_given(gone: list[int], d: TransformerDims, gqa: str) -> None:
    """Given heads form whole groups (``groups``) / the same count per group (``within``)."""
    g, hkv = d.n_heads // d.n_kv_heads, d.n_kv_heads
    s = set(gone)
    per = [len(s & set(range(j * g, (j + 1) * g))) for j in range(hkv)]
    if gqa == "groups":
        partial = [j for j in range(hkv) if 0 < per[j] < g]
        if partial:
            raise GrowthConfigError(
                f"{OP}: gqa='groups' removes whole KV groups of g={g} query heads (n_heads="
                f"{d.n_heads}, n_kv_heads={hkv}; group j holds heads j*{g}..j*{g}+{g - 1}); "
                f"heads {sorted(gone)} remove only part of group(s) {partial}; list every head "
                f"of a group, or use gqa='within'")
    elif len(set(per)) != 1:
        raise GrowthConfigError(
            f"{OP}: gqa='within' removes the same number of query heads from each of the {hkv} "
            f"KV groups (g={g}); heads {sorted(gone)} remove {per} from groups "
            f"0..{hkv - 1}; or use gqa='groups'")
    _check_count(d, len(gone), gqa)


def _is_meta(ad: TransformerAdapter) -> bool:
    return bool(ad.layer(0).q.raw_weight().is_meta) if ad.dims().n_layers else False


def _removal(model: nn.Module, config: HeadsRemoveConfig) -> dict[int, HeadKeep]:
    """Per layer, the kept query and KV heads; validates everything first."""
    ad = get_adapter(model)
    ad.check()
    d = ad.dims()
    if d.heads_tied_to_width:
        raise IncompatibleModelError(
            f"{OP}: {ad.family} ties head_dim = d_model / n_heads ({d.d_model} / {d.n_heads}); "
            f"a model rebuilt from its config with fewer heads would have a different head_dim. "
            f"Heads can be removed on families with an explicit head_dim (selfgrow "
            f"GrowableTransformer, HF LLaMA)")
    if config.gqa not in GQA_MODES:
        raise GrowthConfigError(f"{OP}: " + choices_message("gqa mode", config.gqa, GQA_MODES))
    if config.criterion not in CRITERIA:
        raise GrowthConfigError(f"{OP}: " + choices_message("criterion", config.criterion,
                                                            CRITERIA))
    n_layers, h, hkv = d.n_layers, d.n_heads, d.n_kv_heads
    g = h // hkv
    if config.heads is not None:
        gone = parse_indices(config.heads, h, "heads", "query head", OP)
        if config.n_remove != 0:
            raise GrowthConfigError(f"{OP}: give heads or n_remove, not both")
        _check_given(gone, d, config.gqa)
        keep = _keep_of(set(gone), d, config.gqa)
        return {i: keep for i in range(n_layers)}
    n = check_n_remove(config.n_remove, OP)
    _check_count(d, n, config.gqa)
    out: dict[int, HeadKeep] = {}
    for i in range(n_layers):
        if _is_meta(ad):  # a shape-only copy (estimate_growth): which heads go does not matter
            imp = torch.zeros(h, dtype=torch.float64)
        else:
            imp = head_importance(ad, i)
        if config.gqa == "groups":  # the n / g least important groups (ties: lower first)
            groups = imp.reshape(hkv, g).sum(dim=1).argsort(stable=True)[: n // g]
            gone = {int(j) * g + r for j in groups for r in range(g)}
        else:  # the r least important heads of every group
            r = n // hkv
            gone = {j * g + int(t) for j in range(hkv)
                    for t in imp[j * g:(j + 1) * g].argsort(stable=True)[:r]}
        out[i] = _keep_of(gone, d, config.gqa)
    return out


def _removed_outputs_are_zero(ad: TransformerAdapter, keep: dict[int, HeadKeep]) -> bool:
    """Whether every removed query head has all-zero output-projection columns in every layer
    (the removal is then exact); False on a shape-only (meta) copy."""
    if _is_meta(ad):
        return False
    d = ad.dims()
    for i, (kq, _) in keep.items():
        o = ad.layer(i).o.weight()  # (C, H * Dh)
        mask = torch.ones(d.n_heads * d.head_dim, dtype=torch.bool)
        mask[_coords(kq, d.head_dim)] = False
        if bool(o[:, mask].ne(0).any()):
            return False
    return True


@register_operator(HeadsRemoveConfig)
class HeadsRemove(Operator):
    shrinks = True
    exact = False

    def is_exact(self, model: nn.Module, config: OpConfig) -> bool:
        if not isinstance(config, HeadsRemoveConfig):
            return False
        try:
            keep = _removal(model, config)
        except (GrowthConfigError, IncompatibleModelError):
            return False
        return _removed_outputs_are_zero(get_adapter(model), keep)

    def validate(self, model: nn.Module, config: OpConfig) -> None:
        if not isinstance(config, HeadsRemoveConfig):
            raise GrowthConfigError("expected HeadsRemoveConfig")
        _removal(model, config)

    def apply(self, model: nn.Module, config: OpConfig, tx: Transaction) -> GrowthResult:
        if not isinstance(config, HeadsRemoveConfig):
            raise GrowthConfigError("expected HeadsRemoveConfig")
        keep = _removal(model, config)
        ad = get_adapter(model)
        d = ad.dims()
        dh = d.head_dim
        exact = _removed_outputs_are_zero(ad, keep)
        items: list[tuple[ProjRef, AxisMap | None, AxisMap | None]] = []
        for i, (kq, kkv) in keep.items():
            lv = ad.layer(i)
            q = _keep_roles(_coords(kq, dh), d.n_heads * dh)
            items += [(lv.q, q.write, None), (lv.o, None, q.read)]
            if kkv.numel() != d.n_kv_heads:
                kv = _keep_roles(_coords(kkv, dh), d.n_kv_heads * dh)
                items += [(lv.k, kv.write, None), (lv.v, kv.write, None)]
        maps = resize_params(tx, model, projection_plans(items))
        first = next(iter(keep.values()), (torch.arange(d.n_heads), torch.arange(d.n_kv_heads)))
        nh, nkv = int(first[0].numel()), int(first[1].numel())
        ad.update_dims(tx, n_heads=nh, n_kv_heads=nkv)
        removed: Any = {i: sorted(set(range(d.n_heads)) - set(kq.tolist()))
                        for i, (kq, _) in keep.items()}
        return GrowthResult(param_maps=maps, exact=exact, notes={
            "n_heads": [d.n_heads, nh], "n_kv_heads": [d.n_kv_heads, nkv], "gqa": config.gqa,
            "criterion": config.criterion if config.heads is None else None,
            "removed": removed})


__all__ = ["HeadsRemoveConfig", "head_importance"]
