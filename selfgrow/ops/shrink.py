"""Shrink operators: remove FFN hidden units, and fold duplicated units back into one.

Both work through :mod:`selfgrow.adapters` on every transformer family the FFN growth
operators support (selfgrow GrowableTransformer with GELU or SwiGLU, ``nn.TransformerEncoder``,
HF BERT, GPT-2 and LLaMA), rewrite the family's single FFN width in its config, and keep the
optimizer state of every kept coordinate bit-identical (removed coordinates are dropped).

The FFN of one block is ``down(act(up(x)))`` or, gated, ``down(act(gate(x)) * up(x))``;
hidden unit u is row u of up / gate (and their biases) and column u of down.

``ffn_remove_units``: drop units. The output changes by the removed units' contribution
``sum_u down[:, u] * a_u``, so the removal is EXACT when every removed unit's outgoing
column is zero (e.g. units added by ``ffn_zero_fanout`` that never trained, or pruned to
zero); otherwise the error is measured and reported. Units are given explicitly
(``units``, the same in every layer) or chosen per layer as the ``n_remove`` least important
by magnitude: ``|down[:, u]| * |up[u, :]|`` (times ``|gate[u, :]|`` when gated), the
first-order size of the unit's contribution. Sources: Han et al. 2015 (magnitude
pruning); Michel et al. 2019 / Voita et al. 2019 for structured pruning of transformers.

``ffn_fold_duplicates``: the inverse of Net2WiderNet. Units whose incoming rows and biases
(up and gate) are equal (within ``atol``; exactly equal by default) form a group; the group
keeps its first unit, whose outgoing column becomes the SUM of the group's columns, and the
others are removed. Equal pre-activations give equal activations ``a``, so
``sum_j w_j a = (sum_j w_j) a``: EXACT (``atol = 0``). Net2WiderNet followed by a fold
returns the original function, its zero-sum symmetry-breaking noise cancelling in the sum.
Optimizer state: a kept down column keeps its state (each copy received the same gradient
as the folded column will); a kept up / gate row's first moment is scaled by the group size
``c`` (the folded unit feeds ``sum_j w_j``, so its incoming gradient is ``c`` times one
copy's), its second moment by ``c^2``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..adapters import AxisMap, Roles, TransformerAdapter, get_adapter, resize_params
from ..core import Transaction
from ..errors import GrowthConfigError, IncompatibleModelError, choices_message
from ._registry import GrowthResult, OpConfig, Operator, register_operator
from .ffn import ffn_unit_plans

CRITERIA = ("magnitude",)


def _incoming(ad: TransformerAdapter, i: int) -> list[torch.Tensor]:
    """Canonical incoming tensors of layer ``i``'s units: up (F, C), gate, and their biases
    as (F, 1) columns."""
    lv = ad.layer(i)
    out = []
    for ref in (lv.up, lv.gate):
        if ref is None:
            continue
        out.append(ref.weight())
        b = ref.bias()
        if b is not None:
            out.append(b[:, None])
    return out


def _importance(ad: TransformerAdapter, i: int) -> torch.Tensor:
    """(F,) ``|down[:, u]| * |up[u, :]|`` (times ``|gate[u, :]|`` when gated), fp64."""
    lv = ad.layer(i)
    imp = lv.down.weight().double().norm(dim=0) * lv.up.weight().double().norm(dim=1)
    if lv.gate is not None:
        imp = imp * lv.gate.weight().double().norm(dim=1)
    return imp


def _keep_roles(keep: torch.Tensor, f: int, in_scale: torch.Tensor | None = None) -> Roles:
    """Roles of a shrinking unit axis: ``keep`` (new,) old units kept, in order; incoming
    rows' gradient scaled by ``in_scale`` (folded groups), outgoing unchanged."""
    ones = torch.ones(keep.numel(), dtype=torch.float64)
    return Roles(read=AxisMap(keep, value_scale=None, grad_scale=ones),
                 write=AxisMap(keep, value_scale=None,
                               grad_scale=ones if in_scale is None else in_scale),
                 index=keep, count=ones)


def parse_indices(values: Any, n: int, field: str, noun: str, op: str, where: str = ""
                  ) -> list[int]:
    """``values`` as a list of distinct indices in ``0..n-1`` (integer-likes accepted; bools,
    strings and floats refused), shared by the shrink operators; ``where`` names the layer
    in messages (``"hidden.0"``).

    Raises:
        GrowthConfigError: not a list of indices, an index out of range or listed twice (the
            message names the bad values and the valid range).
    """
    try:
        if isinstance(values, (str, bytes)) or any(isinstance(j, bool) for j in values):
            raise TypeError
        u = [operator.index(j) for j in values]
    except TypeError:
        at = f" for {where}" if where else ""
        raise GrowthConfigError(f"{op}: {field}={values!r}{at} must be a list of {noun} "
                                f"indices; valid: 0..{n - 1}") from None
    of = f" of {where}" if where else ""
    bad = [j for j in u if not 0 <= j < n]
    if bad:
        raise GrowthConfigError(f"{op}: {field} {bad}{of} are out of range; valid: 0..{n - 1}")
    dup = sorted({j for j in u if u.count(j) > 1})
    if dup:
        raise GrowthConfigError(f"{op}: {field} {dup}{of} are listed twice")
    return u


def check_n_remove(n: Any, op: str) -> int:
    """``n`` as an int (bools and non-integers refused with GrowthConfigError)."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise GrowthConfigError(f"{op}: n_remove={n!r} must be an integer")
    return n


def _check_d_ff(ad: TransformerAdapter, n_remove: int, op: str) -> int:
    f = ad.dims().d_ff
    if not 0 < n_remove < f:
        raise GrowthConfigError(f"{op}: removing {n_remove} of d_ff={f} units is out of range; "
                                f"valid: 1..{f - 1} (at least one unit stays)")
    return f


def _is_meta(ad: TransformerAdapter) -> bool:
    return bool(ad.layer(0).up.raw_weight().is_meta) if ad.dims().n_layers else False


# ---------------------------------------------------------------------------------------------
# ffn_remove_units
# ---------------------------------------------------------------------------------------------
@dataclass
class FFNRemoveUnitsConfig(OpConfig):
    """Remove FFN hidden units: ``units`` (the same units in every layer) or, per layer, the
    ``n_remove`` least important units by ``criterion`` (``"magnitude"``: ``|down[:, u]| *
    |up[u, :]|``, times ``|gate[u, :]|`` when gated). EXACT when every removed unit's
    outgoing column is zero; otherwise inexact (the error is measured). Kept coordinates
    keep their optimizer state bit-identical. Sources: Han et al. 2015 (magnitude pruning);
    Voita et al. 2019 (structured pruning of transformers).
    """

    name: ClassVar[str] = "ffn_remove_units"
    units: tuple[int, ...] | None = None
    n_remove: int = 0
    criterion: str = "magnitude"


def _removal(model: nn.Module, config: FFNRemoveUnitsConfig) -> dict[int, torch.Tensor]:
    """Per layer, the kept units (sorted); validates everything first."""
    ad = get_adapter(model)
    ad.check()
    if config.criterion not in CRITERIA:
        raise GrowthConfigError("ffn_remove_units: " + choices_message(
            "criterion", config.criterion, CRITERIA))
    n_layers, f = ad.dims().n_layers, ad.dims().d_ff
    if config.units is not None:
        u = parse_indices(config.units, f, "units", "unit", "ffn_remove_units")
        if config.n_remove != 0:
            raise GrowthConfigError("ffn_remove_units: give units or n_remove, not both")
        _check_d_ff(ad, len(u), "ffn_remove_units")
        keep = torch.tensor([j for j in range(f) if j not in set(u)], dtype=torch.long)
        return {i: keep for i in range(n_layers)}
    n = check_n_remove(config.n_remove, "ffn_remove_units")
    _check_d_ff(ad, n, "ffn_remove_units")
    if _is_meta(ad):  # a shape-only copy (estimate_growth): which units go does not matter
        keep = torch.arange(f - n)
        return {i: keep for i in range(n_layers)}
    out = {}
    for i in range(n_layers):
        drop = _importance(ad, i).argsort(stable=True)[:n]  # ties: the lower index first
        mask = torch.ones(f, dtype=torch.bool)
        mask[drop] = False
        out[i] = mask.nonzero().flatten()
    return out


def _removed_fanout_is_zero(ad: TransformerAdapter, keep: dict[int, torch.Tensor]) -> bool:
    """Whether every unit outside ``keep`` has an all-zero outgoing column (the removal is
    then exact); False on a shape-only (meta) copy, which has no values to check."""
    if _is_meta(ad):
        return False
    for i, k in keep.items():
        down = ad.layer(i).down.weight()
        mask = torch.ones(down.shape[1], dtype=torch.bool)
        mask[k] = False
        if bool(down[:, mask].ne(0).any()):
            return False
    return True


@register_operator(FFNRemoveUnitsConfig)
class FFNRemoveUnits(Operator):
    exact = False
    shrinks = True

    def is_exact(self, model: nn.Module, config: OpConfig) -> bool:
        if not isinstance(config, FFNRemoveUnitsConfig):
            return False
        try:
            keep = _removal(model, config)
        except (GrowthConfigError, IncompatibleModelError):
            return False
        return _removed_fanout_is_zero(get_adapter(model), keep)

    def validate(self, model: nn.Module, config: OpConfig) -> None:
        if not isinstance(config, FFNRemoveUnitsConfig):
            raise GrowthConfigError("expected FFNRemoveUnitsConfig")
        _removal(model, config)

    def apply(self, model: nn.Module, config: OpConfig, tx: Transaction) -> GrowthResult:
        if not isinstance(config, FFNRemoveUnitsConfig):
            raise GrowthConfigError("expected FFNRemoveUnitsConfig")
        keep = _removal(model, config)
        ad = get_adapter(model)
        f = ad.dims().d_ff
        nf = int(next(iter(keep.values())).numel()) if keep else f
        removed = {i: sorted(set(range(f)) - set(k.tolist())) for i, k in keep.items()}
        exact = _removed_fanout_is_zero(ad, keep)
        plans = ffn_unit_plans(ad, {i: _keep_roles(k, f) for i, k in keep.items()})
        maps = resize_params(tx, model, plans)
        ad.update_dims(tx, d_ff=nf)
        return GrowthResult(param_maps=maps, exact=exact, notes={
            "d_ff": [f, nf], "criterion": config.criterion if config.units is None else None,
            "removed": removed if f - nf <= 16 else f"{f - nf} units per layer (not logged)"})


# ---------------------------------------------------------------------------------------------
# ffn_fold_duplicates
# ---------------------------------------------------------------------------------------------
@dataclass
class FFNFoldDuplicatesConfig(OpConfig):
    """Fold duplicated FFN units (the inverse of Net2WiderNet): units whose incoming rows and
    biases (up and gate) are equal within ``atol`` (max abs difference) form a group, whose
    first unit stays with the SUM of the group's outgoing columns; units (or groups) whose
    outgoing weights are all zero contribute nothing and are dropped too (so a per-layer
    ``ffn_net2wider(layers=...)``, whose other layers got zero fan-out units, folds back
    exactly). EXACT for ``atol = 0`` (equal pre-activations give equal activations); with
    ``atol > 0`` the error is measured, and the greedy grouping (units within ``atol`` of
    each group's first unit, in unit order) costs one pass per group. Every layer must fold
    to the same width (the config holds one d_ff). On a shape-only (meta) copy, as in
    ``estimate_growth``, the duplicates are unknown and the estimate is the unfolded size
    (an upper bound). Source: Chen et al. 2016 (Net2WiderNet, whose copies this undoes).

    Optimizer state and accumulated gradients of a kept up / gate row are the first copy's
    times the group size: exact when the copies' outgoing columns are equal (noise 0), an
    approximation of the copies' sum when Net2WiderNet's symmetry noise made them differ.
    """

    name: ClassVar[str] = "ffn_fold_duplicates"
    atol: float = 0.0


def _groups(ad: TransformerAdapter, i: int, atol: float) -> list[list[int]]:
    """Groups of duplicated units of layer ``i``, each listed from its first unit, ordered
    by first unit; groups whose summed outgoing column is zero (units that contribute
    nothing) are left out, at least one group kept."""
    rows = torch.cat([t.double() for t in _incoming(ad, i)], dim=1)  # (F, D)
    F_ = rows.shape[0]
    if atol == 0:  # exact duplicates: one sort (torch.unique), not F^2 comparisons
        _, inv = torch.unique(rows, dim=0, return_inverse=True)
        order = torch.argsort(inv, stable=True)
        members: dict[int, list[int]] = {}
        for u in order.tolist():
            members.setdefault(int(inv[u]), []).append(u)
        groups = sorted(members.values(), key=lambda g: g[0])
    else:  # greedy: each group is the units within atol of its first unit
        remaining = torch.arange(F_)
        groups = []
        while remaining.numel():
            r = int(remaining[0])
            d = (rows[remaining] - rows[r]).abs().amax(dim=1)
            groups.append(remaining[d <= atol].tolist())
            remaining = remaining[d > atol]
    down = ad.layer(i).down.weight().double()  # (C, F)
    live = [g for g in groups if bool(down[:, g].sum(1).ne(0).any())]
    return live or groups[:1]


def _folding(model: nn.Module, config: FFNFoldDuplicatesConfig) -> dict[int, list[list[int]]]:
    ad = get_adapter(model)
    ad.check()
    a = config.atol
    if isinstance(a, bool) or not isinstance(a, (int, float)) or not a >= 0 or a != a:
        raise GrowthConfigError(f"ffn_fold_duplicates: atol={a!r} is out of range; valid: a "
                                f"number >= 0")
    f = ad.dims().d_ff
    if _is_meta(ad):  # a shape-only copy (estimate_growth): the duplicates are unknown
        return {i: [[u] for u in range(f)] for i in range(ad.dims().n_layers)}
    groups = {i: _groups(ad, i, float(a)) for i in range(ad.dims().n_layers)}
    widths = {i: len(g) for i, g in groups.items()}
    if all(w == f for w in widths.values()):
        raise IncompatibleModelError(
            f"ffn_fold_duplicates: no duplicated FFN units (incoming rows equal within "
            f"atol={a}) and no unit without outgoing weights in any layer; nothing to fold")
    if len(set(widths.values())) != 1:
        raise IncompatibleModelError(
            f"ffn_fold_duplicates: layers would fold to different widths {widths} (after "
            f"folding duplicates and dropping units whose outgoing weights are all zero); "
            f"the config holds one d_ff. Remove units per layer with ffn_remove_units first")
    return groups


@register_operator(FFNFoldDuplicatesConfig)
class FFNFoldDuplicates(Operator):
    exact = True
    shrinks = True

    def is_exact(self, model: nn.Module, config: OpConfig) -> bool:
        return isinstance(config, FFNFoldDuplicatesConfig) and config.atol == 0

    def validate(self, model: nn.Module, config: OpConfig) -> None:
        if not isinstance(config, FFNFoldDuplicatesConfig):
            raise GrowthConfigError("expected FFNFoldDuplicatesConfig")
        _folding(model, config)

    def apply(self, model: nn.Module, config: OpConfig, tx: Transaction) -> GrowthResult:
        if not isinstance(config, FFNFoldDuplicatesConfig):
            raise GrowthConfigError("expected FFNFoldDuplicatesConfig")
        groups = _folding(model, config)
        ad = get_adapter(model)
        f = ad.dims().d_ff
        per_layer: dict[int, Roles] = {}
        post: dict[str, Any] = {}
        for i, gs in groups.items():
            keep = torch.tensor([g[0] for g in gs], dtype=torch.long)
            size = torch.tensor([len(g) for g in gs], dtype=torch.float64)
            per_layer[i] = _keep_roles(keep, f, in_scale=size)
            down = ad.layer(i).down
            old = down.weight()  # canonical (C, F)
            summed = torch.stack([old[:, g].sum(1) for g in gs], dim=1)  # (C, F')
            post[down.weight_name] = _replace(summed, down.transposed)
        plans = ffn_unit_plans(ad, per_layer)
        maps = resize_params(tx, model, plans, post=post)
        nf = len(next(iter(groups.values())))
        ad.update_dims(tx, d_ff=nf)
        folded = {i: [g for g in gs if len(g) > 1] for i, gs in groups.items()}
        return GrowthResult(param_maps=maps, exact=config.atol == 0, notes={
            "d_ff": [f, nf], "atol": config.atol,
            "groups": folded if f - nf <= 16 else f"{f - nf} units folded per layer"})


def _replace(canonical: torch.Tensor, transposed: bool) -> Any:
    """Post-function writing the folded canonical (C, F') down weight in storage layout."""

    def fn(t: torch.Tensor) -> torch.Tensor:
        v = canonical.t() if transposed else canonical
        return v.to(device=t.device, dtype=t.dtype).contiguous()

    return fn


__all__ = ["FFNFoldDuplicatesConfig", "FFNRemoveUnitsConfig"]
