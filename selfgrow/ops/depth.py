"""Depth growth of transformers: add blocks to the layer stack.

Every operator works on any family with a :class:`~selfgrow.adapters.TransformerAdapter`
(selfgrow GrowableTransformer, ``nn.TransformerEncoder``, HF BERT / GPT-2 / LLaMA) and
rewrites the family's config (``n_layers`` / ``num_hidden_layers`` / ``n_layer`` /
``num_layers``), so a model built fresh from the grown config loads the grown state dict.

Exactness (docs/GROWTH-MATH.md, "Depth"):

=========================== ========================================================
operator                    function preserved?
=========================== ========================================================
``g_stack``                 no (plain copies); error measured by ``grow_``
``g_repeat``                no
``g_interleave``            no
``g_insert``                no
``g_random``                no
``splitting_layer``         no (first-order only)
``identity_insert``         yes: pre-LN zeroed output projections; post-LN depth mask
                            ramp at m = 0 (selfgrow) or norm transfer (BERT, nn; see
                            below)
``function_preserving_stack`` yes, same constructions with copied blocks
=========================== ========================================================

Optimizer state (by NAME, :mod:`selfgrow.optim`): a block that moves from index i to j
gets ``ParamMap(source="<layers>.i.<p>")`` for each of its parameters, so Adam moments and
step counts follow it. A COPY of block i starts from block i's state as well
(``ParamMap(source=<block i's param>)``, grad_scale 1): its weights are block i's trained
weights, so i's moment estimates are the best guess for them. Tensors an operator
re-initialises (zeroed output projections, random blocks, reset norms) get fresh state
(``ParamMap(None)``): their values have nothing to do with the source's moments.

Post-LN identity by **norm transfer** (exact up to O(eps), pure weights of the family,
no extra module, so HF ``save_pretrained``/``from_pretrained`` keep working): a post-LN
block ends with ``LN2`` (gain g, bias b), so the stream entering the next block is
``h = g * n + b`` with ``n = (x - mean) / sqrt(var + eps)``. Insert after it a block whose
attention output and FFN down projections are zero, move (g, b) from the preceding norm to
the new block's LN2 and give every other norm involved gain 1, bias 0. The preceding norm
then emits ``n``; the new block computes ``LN2(LN1(n))`` with ``mean(n) = 0`` and
``var(n) = var / (var + eps)``, i.e. ``n * (1 + delta)`` with
``|delta| <= eps * |1 - 1 / (var + eps)| / 2``; followed by (g, b) this is ``h`` again.
For BERT's eps = 1e-12 delta is far below fp32 round-off (exact in practice; the tests
measure it); for eps = 1e-5 it is reported, not claimed (``is_exact`` is False there).
The norm before block 0 is the embedding LayerNorm (BERT); families without one cannot
insert post-LN identities at position 0 this way.

Sources: Gong et al. 2019 (progressive stacking of BERT); Du et al. 2024 (G_stack and the
G_direct / G_learn families: stack, repeat, interleave, insert, random); Shen et al. 2022
(staged training: zero-initialised output projections give an identity pre-LN block);
Yao et al. 2023 (masked structural growth: depth mask ramp for post-LN).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..adapters import LayerView, NormRef, TransformerAdapter, get_adapter, set_param
from ..core import Transaction
from ..errors import GrowthConfigError, IncompatibleModelError, choices_message
from ..optim import ParamMap
from ._registry import GrowthResult, OpConfig, Operator, register_operator

POST_LN_MODES = ("auto", "ramp", "norm_transfer")
INITS = ("copy", "random")
#: norm-transfer is claimed exact only when eps is at most this (see the module docstring)
NORM_TRANSFER_EXACT_EPS = 1e-9


# ---------------------------------------------------------------------------------------------
# plan of the new layer list
# ---------------------------------------------------------------------------------------------
@dataclass
class Slot:
    """One block of the grown stack.

    Attributes:
        src: index of the old block it is (``kind="old"``) or derives from.
        kind: ``"old"`` (the same module, maybe moved), ``"copy"`` or ``"random"``.
        zero_out: zero the attention output and FFN down projections (weights and biases).
        noise: relative std of Gaussian noise added to every copied weight matrix.
        out_scale: multiply the output projections (weights and biases) by this.
        identity: make the block an identity for post-LN (ramp 0 or norm transfer).
    """

    src: int
    kind: str = "old"
    zero_out: bool = False
    noise: float = 0.0
    out_scale: float = 1.0
    identity: bool = False


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn_like(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device, t.dtype)


def _post_ln_mode(ad: TransformerAdapter, requested: str) -> str:
    if requested not in POST_LN_MODES:
        raise GrowthConfigError(choices_message("post_ln mode", requested, POST_LN_MODES))
    if requested == "auto":
        return "ramp" if ad.supports_ramp else "norm_transfer"
    if requested == "ramp" and not ad.supports_ramp:
        raise IncompatibleModelError(
            f"{ad.family} has no depth mask ramp; use post_ln='norm_transfer' or a selfgrow "
            f"GrowableTransformer"
        )
    return requested


def _prev_norm(ad: TransformerAdapter, slots: list[Slot], j: int) -> NormRef | None:
    """The norm that last wrote the stream before new position j (in the OLD model)."""
    # the block before j in the new order that is an old block (identity blocks in between
    # are handled by the caller: only the last of a run receives the transferred norm)
    for jj in range(j - 1, -1, -1):
        if not slots[jj].identity:
            s = slots[jj]
            return ad.layer(s.src).norm2 if s.kind == "old" else None
    return ad.embed_norm()


def validate_slots(model: nn.Module, ad: TransformerAdapter, slots: list[Slot],
                   post_ln: str) -> None:
    """Check a plan before anything changes (IncompatibleModelError / GrowthConfigError)."""
    d = ad.dims()
    n = len(ad.layers())
    if post_ln not in POST_LN_MODES:
        raise GrowthConfigError(choices_message("post_ln mode", post_ln, POST_LN_MODES))
    for s in slots:
        if not 0 <= s.src < n:
            raise GrowthConfigError(f"source layer {s.src} out of range [0, {n})")
        if s.kind not in ("old", "copy", "random"):
            raise GrowthConfigError(choices_message("slot kind", s.kind, ("old", "copy",
                                                                          "random")))
    if not any(s.identity for s in slots) or d.norm_first:
        return
    mode = _post_ln_mode(ad, post_ln)
    if mode == "norm_transfer":
        for j, s in enumerate(slots):
            if s.identity and (j + 1 == len(slots) or not slots[j + 1].identity):
                prev = _prev_norm(ad, slots, j)
                if prev is None:
                    raise IncompatibleModelError(
                        f"{ad.family}: post-LN identity block at position {j} has no norm "
                        f"before it to transfer (no embedding LayerNorm / preceded by a "
                        f"copy); insert after an existing block or use a family with a depth "
                        f"mask ramp"
                    )


def rebuild_stack(
    model: nn.Module,
    ad: TransformerAdapter,
    tx: Transaction,
    slots: list[Slot],
    *,
    seed: int = 0,
    post_ln: str = "auto",
) -> GrowthResult:
    """Replace the layer list by ``slots`` and return ParamMaps (see the module docstring).

    Used by every depth operator; other operators (e.g. compound growth) may call it too.
    """
    g = _gen(seed)
    d = ad.dims()
    lp = ad.layers_path
    old_layers = list(ad.layers())
    views = [ad.layer(i) for i in range(len(old_layers))]
    cfg = getattr(model, "config", None)
    maps: dict[str, ParamMap] = {}
    blocks: list[nn.Module] = []
    mode = None if d.norm_first else _post_ln_mode(ad, post_ln)
    transfers: list[tuple[int, NormRef]] = []
    for j, s in enumerate(slots):
        old = old_layers[s.src]
        if s.kind == "old":
            blocks.append(old)
            if j != s.src:
                for pn, _ in old.named_parameters():
                    maps[f"{lp}.{j}.{pn}"] = ParamMap(source=f"{lp}.{s.src}.{pn}")
            continue
        memo: dict[int, Any] = {id(cfg): cfg} if cfg is not None else {}
        new = copy.deepcopy(old, memo)
        fresh: set[int] = set()  # ids of re-initialised parameters
        with torch.no_grad():
            if s.kind == "random":
                for p in new.parameters():
                    if p.dim() >= 2:
                        p.copy_(_randn_like(p, g) * float(p.detach().double().std()))
                    fresh.add(id(p))
                for m in new.modules():  # norms: gain 1, bias 0
                    if _is_norm(m):
                        m.weight.fill_(1.0)
                        if getattr(m, "bias", None) is not None:
                            m.bias.zero_()
                    elif isinstance(getattr(m, "bias", None), nn.Parameter):
                        m.bias.zero_()
            if s.noise > 0:
                for p in new.parameters():
                    if p.dim() >= 2:
                        p.add_(_randn_like(p, g) * float(p.detach().double().std()) * s.noise)
            nv = _map_view(views[s.src], memo)
            for ref in nv.out_projections():
                w, b = ref.raw_weight(), ref.raw_bias()
                for t in (w, b):
                    if t is None:
                        continue
                    if s.zero_out:
                        t.zero_()
                        fresh.add(id(t))
                    elif s.out_scale != 1.0:
                        t.mul_(s.out_scale)
            if s.identity and not d.norm_first:
                if mode == "ramp":
                    ad.set_ramp(tx, new, 0.0)
                else:
                    last = j + 1 == len(slots) or not slots[j + 1].identity
                    for nr in (nv.norm1, nv.norm2):
                        nr.module.weight.fill_(1.0)
                        if getattr(nr.module, "bias", None) is not None:
                            nr.module.bias.zero_()
                        fresh.add(id(nr.module.weight))
                        if getattr(nr.module, "bias", None) is not None:
                            fresh.add(id(nr.module.bias))
                    if last:
                        prev = _prev_norm(ad, slots, j)
                        if prev is None:  # validated before; defensive
                            raise IncompatibleModelError("no norm to transfer")
                        transfers.append((j, prev))
                        nv.norm2.module.weight.copy_(prev.module.weight.detach())
                        if getattr(prev.module, "bias", None) is not None:
                            nv.norm2.module.bias.copy_(prev.module.bias.detach())
        for pn, p in new.named_parameters():
            src = None if id(p) in fresh else f"{lp}.{s.src}.{pn}"
            maps[f"{lp}.{j}.{pn}"] = ParamMap(source=src)
        blocks.append(new)
    # the norms that gave away their (g, b) become (1, 0); their old state no longer fits
    for j, prev in transfers:
        new_w = torch.ones_like(prev.module.weight)
        set_param(tx, model, prev.weight_name, new_w)
        if prev.bias_name is not None:
            set_param(tx, model, prev.bias_name, torch.zeros_like(prev.module.bias))
        # the norm may have been renamed (an old block moved); find its new name
        new_name = _new_name_of(prev, slots, lp)
        maps[new_name + ".weight"] = ParamMap(source=None)
        if prev.bias_name is not None:
            maps[new_name + ".bias"] = ParamMap(source=None)
        rel = _relative(views, slots, j, lp)
        maps[f"{lp}.{j}.{rel}.weight"] = ParamMap(source=prev.weight_name)
        if prev.bias_name is not None:
            maps[f"{lp}.{j}.{rel}.bias"] = ParamMap(source=prev.bias_name)
    ad.set_layers(tx, blocks)
    return GrowthResult(param_maps=maps, notes={
        "layers": [f"{s.kind}:{s.src}" + ("+id" if s.identity else "") for s in slots],
        "post_ln": mode,
    })


def _relative(views: list[LayerView], slots: list[Slot], j: int, lp: str) -> str:
    """Block-relative module path of the norm2 of the block at new position j."""
    v = views[slots[j].src]
    return v.norm2.path[len(v.path) + 1:]


def _new_name_of(prev: NormRef, slots: list[Slot], lp: str) -> str:
    """New dotted module path of an old norm (its block may have moved)."""
    if not prev.path.startswith(lp + "."):
        return prev.path  # embedding norm
    rest = prev.path[len(lp) + 1:]
    i_str, _, tail = rest.partition(".")
    i = int(i_str)
    for j, s in enumerate(slots):
        if s.kind == "old" and s.src == i:
            return f"{lp}.{j}.{tail}"
    return prev.path


def _is_norm(m: nn.Module) -> bool:
    name = type(m).__name__.lower()
    return isinstance(m, nn.LayerNorm) or name.endswith("norm") or "rmsnorm" in name


def _map_view(v: LayerView, memo: dict[int, Any]) -> LayerView:
    """The view ``v`` of an old block, re-pointed at its deep copy (via the deepcopy memo)."""

    def m(ref: Any) -> Any:
        if ref is None:
            return None
        mod = memo.get(id(ref.module), ref.module)
        return type(ref)(**{**ref.__dict__, "module": mod})

    return LayerView(
        index=v.index, path=v.path, module=memo.get(id(v.module), v.module),
        q=m(v.q), k=m(v.k), v=m(v.v), o=m(v.o), up=m(v.up), down=m(v.down),
        norm1=m(v.norm1), norm2=m(v.norm2), gate=m(v.gate),
    )


# ---------------------------------------------------------------------------------------------
# operators
# ---------------------------------------------------------------------------------------------
class _DepthOp(Operator):
    """Shared validate/apply: subclasses build the slot plan."""

    def slots(self, ad: TransformerAdapter, config: Any) -> list[Slot]:  # pragma: no cover
        raise GrowthConfigError("depth operator without a plan")

    def validate(self, model: nn.Module, config: OpConfig) -> None:
        if not isinstance(config, self.config_cls):
            raise GrowthConfigError(f"expected {self.config_cls.__name__}")
        ad = get_adapter(model)
        ad.check()
        slots = self.slots(ad, config)
        if len(slots) <= len(ad.layers()):
            raise GrowthConfigError(
                f"{config.name} would not add layers ({len(ad.layers())} -> {len(slots)})"
            )
        validate_slots(model, ad, slots, getattr(config, "post_ln", "auto"))

    def apply(self, model: nn.Module, config: OpConfig, tx: Transaction) -> GrowthResult:
        ad = get_adapter(model)
        slots = self.slots(ad, config)
        res = rebuild_stack(model, ad, tx, slots, seed=getattr(config, "seed", 0),
                            post_ln=getattr(config, "post_ln", "auto"))
        res.exact = self.is_exact(model, config)
        return res


def _check_factor(factor: int) -> None:
    if not isinstance(factor, int) or factor < 2:
        raise GrowthConfigError(f"factor must be an integer >= 2, got {factor!r}")


def _check_positions(positions: tuple[int, ...], n: int) -> list[int]:
    if not positions:
        raise GrowthConfigError("positions must name at least one insertion point")
    ps = sorted(int(p) for p in positions)
    for p in ps:
        if not 0 <= p <= n:
            raise GrowthConfigError(f"insertion position {p} out of range [0, {n}]")
    return ps


def _insert_slots(n: int, positions: list[int], make: Any) -> list[Slot]:
    """Old blocks 0..n-1 with new slots inserted BEFORE old index p for each p (p = n:
    at the end); ``make(p)`` builds the new slot."""
    out: list[Slot] = []
    for i in range(n + 1):
        for p in positions:
            if p == i:
                out.append(make(p))
        if i < n:
            out.append(Slot(i))
    return out


@dataclass
class GStackConfig(OpConfig):
    """G_stack (in place): every block repeated ``factor`` times, ``[0, 0, 1, 1, ...]``.

    NOT exact (a plain copy applies its block twice); ``grow_`` measures the error. Source:
    Gong et al. 2019 (progressive stacking), Du et al. 2024 (G_stack).
    """

    name: ClassVar[str] = "g_stack"
    factor: int = 2


@register_operator(GStackConfig)
class GStack(_DepthOp):
    exact = False

    def slots(self, ad: TransformerAdapter, config: Any) -> list[Slot]:
        _check_factor(config.factor)
        return [Slot(i, "old" if r == 0 else "copy") for i in range(len(ad.layers()))
                for r in range(config.factor)]


@dataclass
class GRepeatConfig(OpConfig):
    """G_repeat: the whole stack repeated ``factor`` times, ``[0..L-1, 0..L-1, ...]``.

    NOT exact. Source: Gong et al. 2019 (stacking BERT), Du et al. 2024 (G_direct stack).
    """

    name: ClassVar[str] = "g_repeat"
    factor: int = 2


@register_operator(GRepeatConfig)
class GRepeat(_DepthOp):
    exact = False

    def slots(self, ad: TransformerAdapter, config: Any) -> list[Slot]:
        _check_factor(config.factor)
        n = len(ad.layers())
        return [Slot(i, "old" if r == 0 else "copy") for r in range(config.factor)
                for i in range(n)]


@dataclass
class GInterleaveConfig(OpConfig):
    """G_interleave: after every block a copy of it with Gaussian noise of relative std
    ``noise`` (times the std of each weight matrix), ``factor - 1`` copies per block.

    NOT exact. Source: Du et al. 2024 (growth operators G_direct with noise).
    """

    name: ClassVar[str] = "g_interleave"
    factor: int = 2
    noise: float = 0.01
    seed: int = 0


@register_operator(GInterleaveConfig)
class GInterleave(_DepthOp):
    exact = False

    def slots(self, ad: TransformerAdapter, config: Any) -> list[Slot]:
        _check_factor(config.factor)
        noise = config.noise
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not (
            math.isfinite(noise) and noise >= 0
        ):
            raise GrowthConfigError(f"noise must be a finite number >= 0, got {noise!r}")
        return [Slot(i, "old" if r == 0 else "copy", noise=config.noise if r else 0.0)
                for i in range(len(ad.layers())) for r in range(config.factor)]


@dataclass
class GInsertConfig(OpConfig):
    """G_insert: new blocks inserted before old indices ``positions`` (``n_layers`` = at
    the end); each is a copy of its left neighbour (``init="copy"``; the right one at 0) or
    random (``init="random"``).

    NOT exact. Source: Du et al. 2024.
    """

    name: ClassVar[str] = "g_insert"
    positions: tuple[int, ...] = (1,)
    init: str = "copy"
    seed: int = 0


def _neighbour(p: int, n: int) -> int:
    return max(0, min(p - 1, n - 1)) if p > 0 else 0


@register_operator(GInsertConfig)
class GInsert(_DepthOp):
    exact = False

    def slots(self, ad: TransformerAdapter, config: Any) -> list[Slot]:
        if config.init not in INITS:
            raise GrowthConfigError(choices_message("init", config.init, INITS))
        n = len(ad.layers())
        ps = _check_positions(config.positions, n)
        return _insert_slots(n, ps, lambda p: Slot(_neighbour(p, n), config.init))


@dataclass
class GRandomConfig(OpConfig):
    """G_random: ``n_new`` randomly initialised blocks (weights ~ N(0, std of the
    corresponding source weight), norms gain 1 / bias 0, biases 0) at ``positions``
    (default: appended at the end).

    NOT exact. Source: Du et al. 2024 (G_random baseline).
    """

    name: ClassVar[str] = "g_random"
    n_new: int = 1
    positions: tuple[int, ...] = ()
    seed: int = 0


@register_operator(GRandomConfig)
class GRandom(_DepthOp):
    exact = False

    def slots(self, ad: TransformerAdapter, config: Any) -> list[Slot]:
        n = len(ad.layers())
        if config.n_new < 1:
            raise GrowthConfigError(f"n_new must be >= 1, got {config.n_new}")
        ps = list(config.positions) or [n] * config.n_new
        if len(ps) != config.n_new:
            raise GrowthConfigError(
                f"got {len(ps)} positions for n_new={config.n_new}; give one per new block"
            )
        ps = _check_positions(tuple(ps), n)
        return _insert_slots(n, ps, lambda p: Slot(_neighbour(p, n), "random"))


@dataclass
class SplittingLayerConfig(OpConfig):
    """Splitting: block i becomes two copies whose residual branches (attention output and
    FFN down projections) are halved: ``h + f(h)`` ~ ``h + f/2 + f/2`` to first order.

    NOT exact (the second half sees ``h + f/2``, not ``h``; post-LN is further off); error
    measured by ``grow_``. Default ``layers=()``: split every block.
    """

    name: ClassVar[str] = "splitting_layer"
    layers: tuple[int, ...] = ()


@register_operator(SplittingLayerConfig)
class SplittingLayer(_DepthOp):
    exact = False

    def slots(self, ad: TransformerAdapter, config: Any) -> list[Slot]:
        n = len(ad.layers())
        which = set(config.layers) if config.layers else set(range(n))
        for i in which:
            if not 0 <= i < n:
                raise GrowthConfigError(f"layer {i} out of range [0, {n})")
        out: list[Slot] = []
        for i in range(n):
            if i in which:
                out += [Slot(i, "copy", out_scale=0.5), Slot(i, "copy", out_scale=0.5)]
            else:
                out.append(Slot(i))
        return out


def _identity_exact(model: nn.Module, post_ln: str) -> bool:
    ad = get_adapter(model)
    d = ad.dims()
    if d.norm_first:
        return True
    try:
        mode = _post_ln_mode(ad, post_ln)
    except (GrowthConfigError, IncompatibleModelError):
        return False
    return mode == "ramp" or d.norm_eps <= NORM_TRANSFER_EXACT_EPS


@dataclass
class IdentityInsertConfig(OpConfig):
    """Identity insertion: new blocks before old indices ``positions`` that compute the
    identity.

    EXACT. Pre-LN: attention output and FFN down projections zero (weights and biases),
    other weights copied from the left neighbour (``init="copy"``) or random. Post-LN
    (``post_ln``): ``"ramp"`` -> depth mask ramp m = 0 (selfgrow; exact), ``"norm_transfer"``
    -> zeroed output projections plus norm transfer (pure family weights; exact up to
    O(eps), claimed exact for eps <= 1e-9, see the module docstring), ``"auto"`` -> ramp if
    the family has one. Sources: Shen et al. 2022 (staged training), Yao et al. 2023 (MSG).
    """

    name: ClassVar[str] = "identity_insert"
    positions: tuple[int, ...] = (1,)
    init: str = "copy"
    post_ln: str = "auto"
    seed: int = 0


@register_operator(IdentityInsertConfig)
class IdentityInsert(_DepthOp):
    exact = True

    def is_exact(self, model: nn.Module, config: OpConfig) -> bool:
        return _identity_exact(model, getattr(config, "post_ln", "auto"))

    def slots(self, ad: TransformerAdapter, config: Any) -> list[Slot]:
        if config.init not in INITS:
            raise GrowthConfigError(choices_message("init", config.init, INITS))
        n = len(ad.layers())
        ps = _check_positions(config.positions, n)
        return _insert_slots(n, ps, lambda p: Slot(_neighbour(p, n), config.init,
                                                   zero_out=True, identity=True))


@dataclass
class FunctionPreservingStackConfig(OpConfig):
    """Function-preserving stacking: like ``g_stack`` (``pattern="stack"``: each block
    followed by its copies) or ``g_repeat`` (``pattern="repeat"``: the whole stack again),
    but every copy has zeroed output projections (and ramp 0 / norm transfer for post-LN).

    EXACT (same constructions as ``identity_insert``). Sources: Shen et al. 2022,
    Du et al. 2024, Yao et al. 2023.
    """

    name: ClassVar[str] = "function_preserving_stack"
    factor: int = 2
    pattern: str = "stack"
    post_ln: str = "auto"


@register_operator(FunctionPreservingStackConfig)
class FunctionPreservingStack(_DepthOp):
    exact = True

    def is_exact(self, model: nn.Module, config: OpConfig) -> bool:
        return _identity_exact(model, getattr(config, "post_ln", "auto"))

    def slots(self, ad: TransformerAdapter, config: Any) -> list[Slot]:
        _check_factor(config.factor)
        n = len(ad.layers())
        if config.pattern == "stack":
            return [Slot(i) if r == 0 else Slot(i, "copy", zero_out=True, identity=True)
                    for i in range(n) for r in range(config.factor)]
        if config.pattern == "repeat":
            return [Slot(i) if r == 0 else Slot(i, "copy", zero_out=True, identity=True)
                    for r in range(config.factor) for i in range(n)]
        raise GrowthConfigError(choices_message("pattern", config.pattern, ("stack", "repeat")))


__all__ = [
    "FunctionPreservingStackConfig",
    "GInsertConfig",
    "GInterleaveConfig",
    "GRandomConfig",
    "GRepeatConfig",
    "GStackConfig",
    "IdentityInsertConfig",
    "Slot",
    "SplittingLayerConfig",
    "rebuild_stack",
    "validate_slots",
]
