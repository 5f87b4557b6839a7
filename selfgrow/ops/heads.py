"""Attention-head growth with head_dim kept fixed (multi-head and grouped-query attention).

Canonical layout (see :mod:`selfgrow.adapters`): ``q: (H * Dh, C)``, ``k, v: (Hkv * Dh, C)``,
``o: (C, H * Dh)``; query head i owns q rows ``[i Dh, (i + 1) Dh)`` and o columns of the same
range, KV head j owns k/v rows ``[j Dh, (j + 1) Dh)``. With grouped-query attention
(Ainslie et al. 2023) ``g = H / Hkv`` and query head i reads KV head ``i // g``. The attention
output is ``o(concat_i head_i) + b_o = sum_i o[:, i] head_i + b_o``: a sum over query heads.

``heads_clone`` (EXACT; Chen et al. 2022 bert2BERT, Wang et al. 2024 HyperCloning): a new
query head copies the q rows (and biases) of head h AND reads the same keys and values, so it
computes the same ``head_h``; the o columns of h are split between h and its copies (divided
by the copy count c_h), so ``sum`` is unchanged. q rows of copies get ``grad_scale = 1/c_h``,
o columns 1.

``heads_fresh`` (EXACT; docs/GROWTH-MATH.md, attention heads; related: Yao et al. 2023 masked
structural growth, where new structure starts with zero contribution): new heads get
random q (and, for new KV heads, k, v) rows, N(0, init_std^2), zero biases, and ZERO o
columns: they add ``0 * head``. New coordinates are brand-new for the optimizer (m = 0,
v = mean of old v).

Grouped-query attention (``gqa``), the rule being that every query head keeps reading its own
KV head:

* ``"groups"`` (default): add whole groups: one KV head plus its g query heads; the new
  groups go after the old ones, so query head i still reads KV head ``i // g``. Clone copies
  a whole group (KV rows of the group's KV head with ``grad_scale = 1/c`` as c copies share
  its contribution; the g query heads as above). Valid ``new_n_heads``: ``H + k g``; for
  multi-head attention (g = 1) any ``new_n_heads > H``.
* ``"within"``: keep the KV heads and add query heads inside each group (g grows to
  ``g' = new_n_heads / Hkv``); heads are re-ordered group-major (group j's old heads, then its
  new ones) so that query head i reads KV head ``i // g'``. Valid ``new_n_heads``: multiples
  of Hkv. On a multi-head model this turns it into a GQA model whose new query heads share
  the KV head of their source.

Plain repetition of the query heads (``q`` rows tiled, KV heads kept) is NOT exact on a GQA
model: with ``H -> 2H`` and ``g -> 2g`` query head i now reads KV head ``i // 2g``, not the
one it was trained with (the failure reported for Llama-3 cloning); the tests keep this as a
negative control.

Families where ``head_dim = d_model / n_heads`` is derived (``nn.MultiheadAttention`` in
``nn.TransformerEncoder``, HF BERT, HF GPT-2) have no inner attention width of their own:
adding heads there would change head_dim or d_model. Both operators refuse them with
:class:`~selfgrow.errors.IncompatibleModelError`; grow their heads with the width
(``widen_d_model`` clones heads and keeps head_dim, exactly).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..adapters import (
    AxisMap,
    Fill,
    ProjRef,
    Roles,
    TransformerAdapter,
    TransformerDims,
    get_adapter,
    normal_fill,
    projection_plans,
    resize_params,
)
from ..core import Transaction
from ..errors import GrowthConfigError, IncompatibleModelError, choices_message
from ._registry import GrowthResult, OpConfig, Operator, register_operator
from .ffn import _zero_sum_noise

GQA_MODES = ("groups", "within")


@dataclass(frozen=True)
class HeadPlan:
    """Where every head of the grown attention comes from.

    Attributes:
        q_heads: LongTensor (H',): old query head copied into each new query head, -1 = new.
        kv_heads: LongTensor (Hkv',): old KV head copied into each new KV head, -1 = new.
        n_heads / n_kv_heads: H' and Hkv'.
    """

    q_heads: torch.Tensor
    kv_heads: torch.Tensor
    n_heads: int
    n_kv_heads: int


def _coords(heads: torch.Tensor, dh: int) -> torch.Tensor:
    """Head index map (n,) -> coordinate index map (n * Dh,), -1 kept."""
    c = heads[:, None] * dh + torch.arange(dh)[None, :]
    return torch.where(heads[:, None] >= 0, c, -1).reshape(-1)


def validate_heads(ad: TransformerAdapter, new_n_heads: Any, gqa: str) -> TransformerDims:
    """Check that ``new_n_heads`` query heads can be reached in ``gqa`` mode.

    Raises:
        IncompatibleModelError: heads tied to the width (use widen_d_model).
        GrowthConfigError: bad mode or a head count incompatible with the groups (the message
            lists valid counts).
    """
    ad.check()
    d = ad.dims()
    if d.heads_tied_to_width:
        raise IncompatibleModelError(
            f"{ad.family} ties head_dim = d_model / n_heads ({d.d_model} / {d.n_heads}); heads "
            f"can only grow with width here (use widen_d_model, which clones the heads and "
            f"keeps head_dim = {d.head_dim})"
        )
    if gqa not in GQA_MODES:
        raise GrowthConfigError(choices_message("gqa mode", gqa, GQA_MODES))
    h, hkv = d.n_heads, d.n_kv_heads
    if not isinstance(new_n_heads, int) or isinstance(new_n_heads, bool) or new_n_heads <= h:
        raise GrowthConfigError(
            f"new_n_heads must be an integer > current n_heads {h}, got {new_n_heads!r}"
        )
    g = h // hkv
    if gqa == "groups" and (new_n_heads - h) % g:
        valid = ", ".join(str(h + k * g) for k in range(1, 4))
        raise GrowthConfigError(
            f"gqa='groups' adds whole groups of g={g} query heads (n_heads={h}, "
            f"n_kv_heads={hkv}); new_n_heads must be n_heads + k*{g}: {valid}, ... "
            f"(got {new_n_heads}); or use gqa='within'"
        )
    if gqa == "within" and new_n_heads % hkv:
        valid = ", ".join(str(hkv * m) for m in range(h // hkv + 1, h // hkv + 4))
        raise GrowthConfigError(
            f"gqa='within' keeps the {hkv} KV heads and puts new_n_heads / {hkv} query heads "
            f"in every group; new_n_heads must be a multiple of n_kv_heads={hkv}: {valid}, ... "
            f"(got {new_n_heads}); or use gqa='groups'"
        )
    return d


def head_plan(d: TransformerDims, new_n_heads: int, gqa: str, clone: bool,
              sources: list[int] | None = None) -> HeadPlan:
    """Head index maps for ``new_n_heads`` query heads (see the module docstring).

    Args:
        d: current dims; new_n_heads: H'; gqa: ``"groups"`` or ``"within"``.
        clone: copy heads (True) or add brand-new ones (-1).
        sources: groups mode only: the KV group copied into each new group (default
            round-robin 0, 1, ...).
    """
    h, hkv = d.n_heads, d.n_kv_heads
    g = h // hkv
    if gqa == "groups":
        n_new = (new_n_heads - h) // g
        if clone:
            src = torch.tensor(sources if sources is not None else
                               [t % hkv for t in range(n_new)], dtype=torch.long)
        else:
            src = torch.full((n_new,), -1, dtype=torch.long)
        kv = torch.cat([torch.arange(hkv), src])
        new_q = src[:, None] * g + torch.arange(g)[None, :]
        new_q = torch.where(src[:, None] >= 0, new_q, -1).reshape(-1)
        return HeadPlan(torch.cat([torch.arange(h), new_q]), kv, new_n_heads, hkv + n_new)
    g2 = new_n_heads // hkv
    q = torch.empty(new_n_heads, dtype=torch.long)
    for j in range(hkv):
        for r in range(g2):
            if r < g:
                q[j * g2 + r] = j * g + r
            else:
                q[j * g2 + r] = j * g + (r - g) % g if clone else -1
    return HeadPlan(q, torch.arange(hkv), new_n_heads, hkv)


def head_growth_plans(
    ad: TransformerAdapter, plan: HeadPlan
) -> tuple[dict[str, dict[int, AxisMap]], Roles]:
    """``resize_params`` plans of every layer's q, k, v, o for ``plan`` and the query-axis
    roles (q rows: write, o columns: read)."""
    d = ad.dims()
    q_roles = Roles.from_index(_coords(plan.q_heads, d.head_dim), d.n_heads * d.head_dim)
    kv_same = plan.n_kv_heads == d.n_kv_heads and bool(
        torch.equal(plan.kv_heads, torch.arange(d.n_kv_heads))
    )
    kv_roles = None if kv_same else Roles.from_index(
        _coords(plan.kv_heads, d.head_dim), d.n_kv_heads * d.head_dim
    )
    items: list[tuple[ProjRef, AxisMap | None, AxisMap | None]] = []
    for lv in ad.layer_views():
        items.append((lv.q, q_roles.write, None))
        if kv_roles is not None:
            items += [(lv.k, kv_roles.write, None), (lv.v, kv_roles.write, None)]
        items.append((lv.o, None, q_roles.read))
    return projection_plans(items), q_roles


def _fills(ad: TransformerAdapter, std: float, g: torch.Generator) -> dict[str, Fill]:
    """Random new q/k/v rows, zero new biases and o columns (resize_params' default)."""
    rnd = normal_fill(std, g)
    out: dict[str, Fill] = {}
    for lv in ad.layer_views():
        for ref in (lv.q, lv.k, lv.v):
            out[ref.weight_name] = rnd
    return out


# ---------------------------------------------------------------------------------------------
# heads_clone
# ---------------------------------------------------------------------------------------------
@dataclass
class HeadsCloneConfig(OpConfig):
    """Add query heads (head_dim kept) by cloning: H -> ``new_n_heads``.

    EXACT: a clone copies q rows (and k/v rows of its KV head for ``gqa="groups"``), and the
    o columns of the source are divided by its copy count; ``noise > 0`` adds zero-sum noise
    to the o columns of the copies of each head (their outputs are equal, so still exact).
    ``gqa``: ``"groups"`` (whole groups: KV head + its g query heads; ``sources`` = the KV
    groups copied, default round-robin) or ``"within"`` (more query heads per existing KV
    head, round-robin over each group's heads). Refuses head-tied families (BERT, GPT-2,
    nn.MultiheadAttention) with IncompatibleModelError: use widen_d_model there.

    Sources: Chen et al. 2022 (bert2BERT); Wang et al. 2024 (HyperCloning).
    """

    name: ClassVar[str] = "heads_clone"
    new_n_heads: int = 0
    gqa: str = "groups"
    sources: list[int] | None = None
    noise: float = 0.0
    seed: int = 0


@register_operator(HeadsCloneConfig)
class HeadsClone(Operator):
    exact = True

    def validate(self, model: nn.Module, config: OpConfig) -> None:
        if not isinstance(config, HeadsCloneConfig):
            raise GrowthConfigError("expected HeadsCloneConfig")
        d = validate_heads(get_adapter(model), config.new_n_heads, config.gqa)
        if config.sources is not None:
            if config.gqa != "groups":
                raise GrowthConfigError(
                    "sources applies to gqa='groups' only (gqa='within' clones the heads of "
                    "each group round-robin)"
                )
            n_new = (config.new_n_heads - d.n_heads) // (d.n_heads // d.n_kv_heads)
            src = config.sources
            if not isinstance(src, (list, tuple)) or len(src) != n_new or not all(
                isinstance(j, int) and 0 <= j < d.n_kv_heads for j in src
            ):
                raise GrowthConfigError(
                    f"sources must list {n_new} KV groups in 0..{d.n_kv_heads - 1} (one per new "
                    f"group), got {src!r}"
                )
        if not config.noise >= 0:
            raise GrowthConfigError(f"noise must be >= 0, got {config.noise}")

    def apply(self, model: nn.Module, config: OpConfig, tx: Transaction) -> GrowthResult:
        if not isinstance(config, HeadsCloneConfig):
            raise GrowthConfigError("expected HeadsCloneConfig")
        ad = get_adapter(model)
        d = ad.dims()
        sources = list(config.sources) if config.sources is not None else None
        plan = head_plan(d, config.new_n_heads, config.gqa, True, sources)
        plans, q_roles = head_growth_plans(ad, plan)
        post = {}
        if config.noise > 0:
            g = torch.Generator().manual_seed(config.seed)
            for lv in ad.layer_views():
                post[lv.o.weight_name] = _zero_sum_noise(
                    q_roles.index, 0 if lv.o.transposed else 1, config.noise, g
                )
        maps = resize_params(tx, model, plans, post=post)
        ad.update_dims(tx, n_heads=plan.n_heads, n_kv_heads=plan.n_kv_heads)
        return GrowthResult(param_maps=maps, exact=True, notes={
            "n_heads": [d.n_heads, plan.n_heads], "n_kv_heads": [d.n_kv_heads, plan.n_kv_heads],
            "gqa": config.gqa, "q_heads": plan.q_heads.tolist(),
            "kv_heads": plan.kv_heads.tolist(),
        })


# ---------------------------------------------------------------------------------------------
# heads_fresh
# ---------------------------------------------------------------------------------------------
@dataclass
class HeadsFreshConfig(OpConfig):
    """Add brand-new query heads (head_dim kept): H -> ``new_n_heads``; random q (and k, v
    of new KV heads with ``gqa="groups"``) rows N(0, init_std^2), zero biases, ZERO o columns.

    EXACT (the new heads add ``0 * head``). ``gqa`` as in :class:`HeadsCloneConfig`. Refuses
    head-tied families (BERT, GPT-2, nn.MultiheadAttention): use widen_d_model there.

    Sources: docs/GROWTH-MATH.md (attention heads, "fresh"); related: Yao et al. 2023 (masked
    structural growth: new structure starts with zero contribution).
    """

    name: ClassVar[str] = "heads_fresh"
    new_n_heads: int = 0
    gqa: str = "groups"
    init_std: float = 0.02
    seed: int = 0


@register_operator(HeadsFreshConfig)
class HeadsFresh(Operator):
    exact = True

    def validate(self, model: nn.Module, config: OpConfig) -> None:
        if not isinstance(config, HeadsFreshConfig):
            raise GrowthConfigError("expected HeadsFreshConfig")
        validate_heads(get_adapter(model), config.new_n_heads, config.gqa)
        if not config.init_std >= 0:
            raise GrowthConfigError(f"init_std must be >= 0, got {config.init_std}")

    def apply(self, model: nn.Module, config: OpConfig, tx: Transaction) -> GrowthResult:
        if not isinstance(config, HeadsFreshConfig):
            raise GrowthConfigError("expected HeadsFreshConfig")
        ad = get_adapter(model)
        d = ad.dims()
        plan = head_plan(d, config.new_n_heads, config.gqa, False)
        plans, _ = head_growth_plans(ad, plan)
        fills = _fills(ad, config.init_std, torch.Generator().manual_seed(config.seed))
        maps = resize_params(tx, model, plans, fill=fills)
        ad.update_dims(tx, n_heads=plan.n_heads, n_kv_heads=plan.n_kv_heads)
        return GrowthResult(param_maps=maps, exact=True, notes={
            "n_heads": [d.n_heads, plan.n_heads], "n_kv_heads": [d.n_kv_heads, plan.n_kv_heads],
            "gqa": config.gqa,
        })


__all__ = ["GQA_MODES", "HeadPlan", "HeadsCloneConfig", "HeadsFreshConfig",
           "head_growth_plans", "head_plan", "validate_heads"]
