"""``ligo``: the learned linear growth operator (LiGO, Wang et al. 2023, "Learning to Grow
Pretrained Models for Efficient Transformer Training").

Every grown weight is a linear function of the small model's weights, factored into a width
expansion shared across layers and a depth expansion per kind of tensor:

    W'_l = sum_j D_t[l, j] * (B_r  W_j  A_c^T)        (l < L', j < L)

* ``t`` is the tensor's kind inside a block (``attn.q.weight``, ``norm1.bias``, ...): one depth
  matrix ``D_t`` of shape ``(L', L)`` per kind (the paper's per-module depth coefficients).
* ``B_r`` (rows) and ``A_c`` (columns) are the expansion matrices of the axis each dimension
  lies on, SHARED by every layer and every tensor on that axis: the residual stream
  (``stream_out`` for tensors that write it, ``stream_in`` for tensors that read it, both
  ``(C', C)``), the query/attention inner width (``q_out``, ``q_in``: ``(H' Dh, H Dh)``),
  the key/value inner width (``kv_out``: ``(Hkv' Dh, Hkv Dh)``) and the FFN hidden width
  (``ffn_out``, ``ffn_in``: ``(F', F)``). Embeddings, the final norm and an untied head use
  the same stream matrices (width only).

Initialisation (``coefficients=None``), which is also where :func:`fit_ligo` starts:

* depth: the stacking pattern, ``D_t[l, l // f] = 1`` for ``pattern="stack"`` (G_stack's
  ``0, 0, 1, 1, ...``) or ``D_t[l, l mod L] = 1`` for ``"repeat"`` (``0, 1, 0, 1``);
* width: duplication, axis coordinate ``i' -> i' mod n`` (k tiles, heads cloned whole with
  head_dim kept, grouped-query groups cloned whole); ``*_out`` matrices select, ``*_in``
  matrices select and divide by the factor, and the final norm of a tied head reads
  (``stream_in``), as in ``widen_d_model``.

So at initialisation the grown tensors are exactly those of ``widen_d_model`` (noise 0) +
``heads_clone`` + ``ffn_net2wider`` (every unit doubled) + ``g_stack`` / ``g_repeat``
(tested bit for bit). The claim: EXACT (function preserved) when ``depth_factor == 1`` and
no learned coefficients are given (pure duplication); otherwise NOT exact (stacked copies
apply their block again, learned coefficients are whatever the fitting found) and ``grow_``
measures the error.

:func:`fit_ligo` trains the coefficients (``D_t``, ``B``, ``A``; the small weights frozen) for a
short phase on the grown model's task loss, through ``torch.func.functional_call`` on a
grown skeleton, and returns a :class:`LiGOConfig` holding them; ``grow_`` with that config
then materialises the grown weights into a plain model (the architecture of the target
config: no LiGO parameters remain). It keeps the initialisation when the fitted
coefficients do not lower the loss on its held-out batches, so the phase never makes the
grown model worse there.

Optimizer state: each grown tensor takes the state of its initialisation source (the block
it stacks from, the coordinates it duplicates) with duplication's grad scales (``*_out``
axes ``1/k``, ``*_in`` axes 1), as ``widen_d_model`` / ``g_stack`` do; with learned
coefficients this is a warm start, not an exact mapping.

Scope: selfgrow's :class:`~selfgrow.models.transformer.GrowableTransformer` (every variant
but masked norms); other families raise :class:`~selfgrow.errors.IncompatibleModelError`
(grow them with ``compound_grow``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import get_adapter
from ..core import Transaction, rng_isolated
from ..errors import GrowthConfigError, IncompatibleModelError, choices_message
from ..models.transformer import GrowableTransformer, TransformerConfig
from ..optim import ParamMap
from ..runs.flops import flop_counter
from ._registry import GrowthResult, OpConfig, Operator, register_operator

PATTERNS = ("stack", "repeat")
#: width axes of the expansion matrices (``*_out``: written / selected, ``*_in``: read)
AXES = ("stream_out", "stream_in", "q_out", "q_in", "kv_out", "ffn_out", "ffn_in")
#: kind of tensor inside a block -> (axis of dim 0, axis of dim 1 or None)
_BLOCK: dict[str, tuple[str, str | None]] = {
    "norm1.weight": ("stream_out", None),
    "norm1.bias": ("stream_out", None),
    "attn.q.weight": ("q_out", "stream_in"),
    "attn.q.bias": ("q_out", None),
    "attn.k.weight": ("kv_out", "stream_in"),
    "attn.k.bias": ("kv_out", None),
    "attn.v.weight": ("kv_out", "stream_in"),
    "attn.v.bias": ("kv_out", None),
    "attn.o.weight": ("stream_out", "q_in"),
    "attn.o.bias": ("stream_out", None),
    "norm2.weight": ("stream_out", None),
    "norm2.bias": ("stream_out", None),
    "ffn.up.weight": ("ffn_out", "stream_in"),
    "ffn.up.bias": ("ffn_out", None),
    "ffn.gate.weight": ("ffn_out", "stream_in"),
    "ffn.gate.bias": ("ffn_out", None),
    "ffn.down.weight": ("stream_out", "ffn_in"),
    "ffn.down.bias": ("stream_out", None),
}


@dataclass
class LiGOConfig(OpConfig):
    """Grow a GrowableTransformer by a LiGO operator (see the module docstring).

    Attributes:
        depth_factor: L' = depth_factor * L (integer >= 1).
        width_factor: C' = width_factor * C (integer >= 1).
        heads_factor: H' = heads_factor * H and Hkv' = heads_factor * Hkv, head_dim kept
            (None: ``width_factor``; 1 keeps the attention inner width).
        ffn_factor: F' = ffn_factor * F (None: ``width_factor``).
        pattern: depth initialisation, ``"stack"`` (G_stack) or ``"repeat"``.
        coefficients: learned operator from :func:`fit_ligo` (``{"width": {axis: (n', n)
            nested lists}, "depth": {kind: (L', L) nested lists}}``); None = the
            initialisation. Its size is O(C'C + H'Dh HDh + F'F + kinds L'L) floats.
    """

    name: ClassVar[str] = "ligo"
    depth_factor: int = 2
    width_factor: int = 1
    heads_factor: int | None = None
    ffn_factor: int | None = None
    pattern: str = "stack"
    coefficients: dict[str, Any] | None = None


@dataclass(frozen=True)
class _Plan:
    """Resolved sizes of one LiGO growth."""

    src: TransformerConfig
    dst: TransformerConfig
    sizes: dict[str, tuple[int, int]]  # axis -> (new, old)
    kinds: tuple[str, ...]  # block tensor kinds present in the model
    depth_src: tuple[int, ...]  # initial source block of every new block


def _factor(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise GrowthConfigError(f"{name} must be an integer >= 1, got {v!r}")
    return v


def _plan(model: nn.Module, config: LiGOConfig) -> _Plan:
    """Validate ``config`` against ``model`` (never mutates) and resolve the sizes."""
    if not isinstance(model, GrowableTransformer):
        raise IncompatibleModelError(
            f"ligo grows selfgrow's GrowableTransformer, got {type(model).__name__}; grow "
            f"other families with compound_grow (widen_d_model, heads_clone, ffn_net2wider, "
            f"g_stack)")
    get_adapter(model).check()
    cfg = model.config
    if cfg.norm_mask:
        raise IncompatibleModelError(
            "ligo does not grow a model with masked norms (widen_d_model_masked still "
            "ramping); finish the ramp first")
    if cfg.n_layers < 1:
        raise IncompatibleModelError("ligo needs at least one block to grow from")
    kd = _factor("depth_factor", config.depth_factor)
    kw = _factor("width_factor", config.width_factor)
    kh = _factor("heads_factor", kw if config.heads_factor is None else config.heads_factor)
    kf = _factor("ffn_factor", kw if config.ffn_factor is None else config.ffn_factor)
    if config.pattern not in PATTERNS:
        raise GrowthConfigError(choices_message("ligo pattern", config.pattern, PATTERNS))
    if kd == kw == kh == kf == 1:
        raise GrowthConfigError("ligo with every factor 1 grows nothing; set depth_factor, "
                                "width_factor, heads_factor or ffn_factor above 1")
    hd, kvd = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    dst = copy.deepcopy(cfg)
    dst.n_layers, dst.d_model, dst.d_ff = kd * cfg.n_layers, kw * cfg.d_model, kf * cfg.d_ff
    dst.n_heads, dst.n_kv_heads = kh * cfg.n_heads, kh * cfg.n_kv_heads
    sizes = {"stream_out": (dst.d_model, cfg.d_model), "stream_in": (dst.d_model, cfg.d_model),
             "q_out": (kh * hd, hd), "q_in": (kh * hd, hd), "kv_out": (kh * kvd, kvd),
             "ffn_out": (dst.d_ff, cfg.d_ff), "ffn_in": (dst.d_ff, cfg.d_ff)}
    names = {n for n, _ in model.layers[0].named_parameters()}
    kinds = tuple(k for k in _BLOCK if k in names)
    n, n2 = cfg.n_layers, dst.n_layers
    depth_src = tuple(range(n2)) if kd == 1 else tuple(
        (l // kd if config.pattern == "stack" else l % n) for l in range(n2))
    if config.coefficients is not None:
        _check_coefficients(config.coefficients, sizes, kinds, (n2, n))
    return _Plan(copy.deepcopy(cfg), dst, sizes, kinds, depth_src)


def _check_coefficients(co: Any, sizes: dict[str, tuple[int, int]], kinds: tuple[str, ...],
                        depth: tuple[int, int]) -> None:
    if (not isinstance(co, dict) or set(co) != {"width", "depth"}
            or not all(isinstance(co[p], dict) for p in ("width", "depth"))):
        raise GrowthConfigError(
            f"ligo coefficients must be a dict {{'width': dict, 'depth': dict}} (as returned "
            f"by fit_ligo), got {type(co).__name__} "
            f"{sorted(co) if isinstance(co, dict) else ''}")
    want = {**{f"width.{a}": sizes[a] for a in AXES if sizes[a][0] != sizes[a][1]},
            **{f"depth.{k}": depth for k in kinds}}
    extra = sorted({f"{p}.{k}" for p in ("width", "depth") for k in co[p]} - set(want))
    if extra:
        raise GrowthConfigError(f"ligo coefficients {extra} do not belong to this model and "
                                f"config (expected {sorted(want)})")
    for key, shape in want.items():
        part, name = key.split(".", 1)
        if name not in co[part]:
            raise GrowthConfigError(f"ligo coefficients lack {key}; they were fitted for "
                                    f"another model (expected {sorted(want)})")
        try:
            t = torch.as_tensor(co[part][name], dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as e:
            raise GrowthConfigError(
                f"ligo coefficient {key} is not a rectangular array of numbers ({e}); valid: "
                f"a nested list or tensor of shape {tuple(shape)}") from None
        if tuple(t.shape) != tuple(shape):
            raise GrowthConfigError(f"ligo coefficient {key} has shape {tuple(t.shape)}, "
                                    f"expected {tuple(shape)} for this model and config")
        if not bool(torch.isfinite(t).all()):
            raise GrowthConfigError(f"ligo coefficient {key} holds NaN or infinite values; "
                                    f"valid: finite numbers")


def _tile(new: int, old: int) -> torch.Tensor:
    return torch.arange(new) % old


def init_coefficients(plan: _Plan, dtype: torch.dtype = torch.float64,
                      device: torch.device | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """The initial operator: duplication matrices and the stacking pattern (see the module
    docstring). ``{"width": {axis: (n', n)}, "depth": {kind: (L', L)}}``."""
    width: dict[str, torch.Tensor] = {}
    for axis, (new, old) in plan.sizes.items():
        m = torch.zeros(new, old, dtype=dtype, device=device)
        m[torch.arange(new), _tile(new, old)] = 1.0
        if axis.endswith("_in"):
            m = m * (old / new)  # each old coordinate read by new/old copies
        width[axis] = m
    n2, n = plan.dst.n_layers, plan.src.n_layers
    d = torch.zeros(n2, n, dtype=dtype, device=device)
    d[torch.arange(n2), torch.tensor(plan.depth_src)] = 1.0
    return {"width": width, "depth": {k: d.clone() for k in plan.kinds}}


def learned_axes(plan: _Plan) -> tuple[str, ...]:
    """The width axes that grow (only their matrices are learned and stored; an axis that
    keeps its size keeps the identity)."""
    return tuple(a for a in AXES if plan.sizes[a][0] != plan.sizes[a][1])


def _as_tensors(co: dict[str, Any], plan: _Plan, dtype: torch.dtype, device: torch.device
                ) -> dict[str, dict[str, torch.Tensor]]:
    out = init_coefficients(plan, dtype, device)
    for part in ("width", "depth"):
        for k, v in co[part].items():
            out[part][k] = torch.as_tensor(v, dtype=dtype, device=device)
    return out


def _serialise(co: dict[str, dict[str, torch.Tensor]], plan: _Plan) -> dict[str, Any]:
    return {"width": {a: co["width"][a].detach().double().cpu().tolist()
                      for a in learned_axes(plan)},
            "depth": {k: v.detach().double().cpu().tolist() for k, v in co["depth"].items()}}


def _top_axes(cfg: TransformerConfig) -> dict[str, tuple[str | None, str | None]]:
    out: dict[str, tuple[str | None, str | None]] = {"tok_emb.weight": (None, "stream_out")}
    if cfg.positions == "learned":
        out["pos_emb.weight"] = (None, "stream_out")
    norm_axis = "stream_in" if cfg.tie_embeddings else "stream_out"
    out["norm_f.weight"] = (norm_axis, None)
    if cfg.bias and cfg.norm == "layernorm":
        out["norm_f.bias"] = (norm_axis, None)
    if not cfg.tie_embeddings:
        out["head.weight"] = (None, "stream_in")
    return out


def materialise(small: dict[str, torch.Tensor], plan: _Plan,
                co: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Grown parameters (names of the grown model, tied head omitted) as differentiable
    functions of the small parameters ``small`` (names of the small model) and the
    coefficients ``co`` (see the module docstring)."""
    w = co["width"]
    out: dict[str, torch.Tensor] = {}
    for name, (r, c) in _top_axes(plan.src).items():
        t = small[name]
        if r is not None:  # 1-D norm tensors
            out[name] = w[r] @ t
        else:
            out[name] = t @ w[c].transpose(0, 1) if c is not None else t
    n = plan.src.n_layers
    for kind in plan.kinds:
        r, c = _BLOCK[kind]
        stack = torch.stack([small[f"layers.{j}.{kind}"] for j in range(n)])  # (L, ...)
        if stack.dim() == 2:  # (L, n_r) vectors
            wide = stack @ w[r].transpose(0, 1)  # (L, n_r')
        else:
            wide = torch.matmul(torch.matmul(w[r], stack), w[c].transpose(0, 1))  # (L, r', c')
        deep = torch.tensordot(co["depth"][kind], wide, dims=([1], [0]))  # (L', ...)
        for l in range(plan.dst.n_layers):
            out[f"layers.{l}.{kind}"] = deep[l]
    return out


def _scale(axis: str | None, plan: _Plan) -> float:
    if axis is None or axis.endswith("_in"):
        return 1.0
    new, old = plan.sizes[axis]
    return old / new


def _param_maps(plan: _Plan) -> dict[str, ParamMap]:
    """Optimizer-state sources: the initialisation's (module docstring)."""
    maps: dict[str, ParamMap] = {}

    def one(new_name: str, src: str, axes: tuple[str | None, str | None]) -> ParamMap:
        idx = tuple(None if a is None or plan.sizes[a][0] == plan.sizes[a][1]
                    else _tile(*plan.sizes[a]) for a in axes)
        while idx and idx[-1] is None:
            idx = idx[:-1]
        return ParamMap(source=src, index=idx,
                        grad_scale=_scale(axes[0], plan) * _scale(axes[1], plan))

    for name, axes in _top_axes(plan.src).items():
        maps[name] = one(name, name, axes)
    for kind in plan.kinds:
        for l, j in enumerate(plan.depth_src):
            maps[f"layers.{l}.{kind}"] = one(f"layers.{l}.{kind}", f"layers.{j}.{kind}",
                                             _BLOCK[kind])
    return maps


@register_operator(LiGOConfig)
class LiGO(Operator):
    """Materialises a LiGO operator (initial or fitted) into a plain grown model."""

    exact = False

    def is_exact(self, model: nn.Module, config: OpConfig) -> bool:
        return (isinstance(config, LiGOConfig) and config.coefficients is None
                and config.depth_factor == 1)

    def validate(self, model: nn.Module, config: OpConfig) -> None:
        if not isinstance(config, LiGOConfig):
            raise GrowthConfigError("expected LiGOConfig")
        _plan(model, config)

    def apply(self, model: nn.Module, config: OpConfig, tx: Transaction) -> GrowthResult:
        if not isinstance(config, LiGOConfig):
            raise GrowthConfigError("expected LiGOConfig")
        plan = _plan(model, config)
        model = cast(GrowableTransformer, model)  # _plan refused every other model
        ref = model.tok_emb.weight
        small = dict(model.named_parameters())
        if config.coefficients is None:
            co = init_coefficients(plan, ref.dtype, ref.device)
        else:
            co = _as_tensors(config.coefficients, plan, ref.dtype, ref.device)
        with torch.no_grad():
            grown = materialise(small, plan, co)
            fresh = _skeleton(plan, ref)
            for name, p in fresh.named_parameters():
                p.copy_(grown[name])
            for l, j in enumerate(plan.depth_src):
                fresh.layers[l].ramp.copy_(model.layers[j].ramp)
        fresh.train(model.training)
        for f in ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff"):
            if getattr(model.config, f) != getattr(plan.dst, f):
                tx.set_attr(model.config, f, getattr(plan.dst, f))
        for name in ("tok_emb", "pos_emb", "layers", "norm_f", "head"):
            if name in model._modules:
                tx.replace_module(model, name, fresh._modules[name])
        exact = self.is_exact(model, config)
        return GrowthResult(param_maps=_param_maps(plan), exact=exact, notes={
            "from": [plan.src.n_layers, plan.src.d_model, plan.src.n_heads, plan.src.d_ff],
            "to": [plan.dst.n_layers, plan.dst.d_model, plan.dst.n_heads, plan.dst.d_ff],
            "pattern": config.pattern, "learned": config.coefficients is not None,
        })


def _skeleton(plan: _Plan, ref: torch.Tensor) -> GrowableTransformer:
    """A GrowableTransformer of the grown config on ``ref``'s device and dtype (meta for a
    meta twin: nothing allocated); its random init does not move the global RNG."""
    with rng_isolated(), torch.device(ref.device):
        return GrowableTransformer(copy.deepcopy(plan.dst)).to(dtype=ref.dtype)


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _lm_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


def _check_batch(b: Any, cfg: TransformerConfig, targets: bool) -> None:
    """A fitting batch is ``(x, y)``: token ids (B, T) in [0, vocab_size); with the default
    loss ``y`` is ids of the same shape too (a custom loss takes any targets)."""
    ok = isinstance(b, (tuple, list)) and len(b) == 2 and all(
        isinstance(t, torch.Tensor) for t in b)
    if not ok:
        raise GrowthConfigError(
            f"batches() must return (inputs, targets), two token-id tensors (B, T); got "
            f"{type(b).__name__}{f' of length {len(b)}' if isinstance(b, (tuple, list)) else ''}")
    x, y = b
    for nm, t in (("inputs", x), ("targets", y))[: 2 if targets else 1]:
        if t.dim() != 2 or t.dtype not in (torch.int64, torch.int32):
            raise GrowthConfigError(f"batches() {nm} must be int64 token ids of shape (B, T), "
                                    f"got {t.dtype} {tuple(t.shape)}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= cfg.vocab_size):
            raise GrowthConfigError(f"batches() {nm} hold ids outside [0, {cfg.vocab_size}) "
                                    f"(min {int(t.min())}, max {int(t.max())})")
    if targets and x.shape != y.shape:
        raise GrowthConfigError(f"batches() inputs {tuple(x.shape)} and targets "
                                f"{tuple(y.shape)} differ in shape")


def fit_ligo(
    model: nn.Module,
    config: LiGOConfig,
    batches: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    steps: int = 100,
    lr: float = 1e-2,
    *,
    loss_fn: LossFn = _lm_loss,
    held_out: int = 2,
) -> tuple[LiGOConfig, dict[str, Any]]:
    """Fit a LiGO operator for ``model`` (not modified): train the coefficients for ``steps``
    Adam steps at ``lr`` on the grown model's loss, small weights frozen.

    Args:
        model: a GrowableTransformer (the small model).
        config: factors and pattern (its ``coefficients``, if any, are the starting point).
        batches: called once per step (and ``held_out`` times first) for ``(inputs (B, T)
            token ids, targets (B, T))``.
        steps: fitting steps (>= 0; 0 returns the initialisation).
        lr: Adam learning rate of the coefficients (> 0; default 1e-2, as the ligo
            schedule).
        loss_fn: ``loss_fn(logits (B, T, V), targets (B, T))`` -> scalar (default mean
            next-token cross-entropy, nats).
        held_out: batches drawn first and kept to compare the initial and fitted operators.

    Returns:
        ``(config with coefficients, report)``; report keys ``steps``, ``loss_init`` and
        ``loss_final`` (mean loss on the held-out batches, nats), ``loss_first`` /
        ``loss_last`` (training loss of the first / last step), ``kept`` (``"fitted"`` or
        ``"init"`` when fitting did not lower the held-out loss) and ``flops`` (forward +
        backward FLOPs of the phase, counted with FlopCounterMode).

    Raises:
        GrowthConfigError / IncompatibleModelError: as ``grow_`` would for ``config``, or
            bad ``steps`` / ``lr`` / ``held_out``, or ``batches`` not a callable returning
            ``(x, y)`` int64 tensors of one shape (B, T) with ids in the vocabulary.
    """
    if not isinstance(config, LiGOConfig):
        raise GrowthConfigError(f"fit_ligo needs a LiGOConfig, got {type(config).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise GrowthConfigError(f"steps must be an integer >= 0, got {steps!r}")
    if isinstance(held_out, bool) or not isinstance(held_out, int) or held_out < 1:
        raise GrowthConfigError(f"held_out must be an integer >= 1, got {held_out!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise GrowthConfigError(f"lr must be a finite number > 0, got {lr!r}")
    plan = _plan(model, config)
    model = cast(GrowableTransformer, model)  # _plan refused every other model
    ref = model.tok_emb.weight
    small = {n: p.detach() for n, p in model.named_parameters()}
    start = (init_coefficients(plan, ref.dtype, ref.device) if config.coefficients is None
             else _as_tensors(config.coefficients, plan, ref.dtype, ref.device))
    init = {part: {k: v.clone() for k, v in d.items()} for part, d in start.items()}
    learn = set(learned_axes(plan))
    co = {"width": {k: v.clone().requires_grad_(k in learn) for k, v in start["width"].items()},
          "depth": {k: v.clone().requires_grad_(True) for k, v in start["depth"].items()}}
    skel = _skeleton(plan, ref)
    skel.train(model.training)
    for l, j in enumerate(plan.depth_src):
        skel.layers[l].ramp.data.copy_(model.layers[j].ramp)
    tied = plan.dst.tie_embeddings

    def loss_of(c: dict[str, dict[str, torch.Tensor]], x: torch.Tensor, y: torch.Tensor
                ) -> torch.Tensor:
        params = materialise(small, plan, c)
        if tied:
            params["head.weight"] = params["tok_emb.weight"]
        logits = torch.func.functional_call(skel, params, (x,), tie_weights=False)
        return loss_fn(logits, y)

    if not callable(batches):
        raise GrowthConfigError(f"batches must be a callable returning (inputs, targets), got "
                                f"{type(batches).__name__}")

    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        b = batches()
        _check_batch(b, plan.src, loss_fn is _lm_loss)
        return b

    held = [draw() for _ in range(held_out)]
    fc = flop_counter()
    with fc, torch.no_grad():
        loss_init = sum(float(loss_of(init, x, y)) for x, y in held) / held_out
    eval_flops = float(fc.get_total_flops())
    flops = eval_flops
    opt = torch.optim.Adam([t for d in co.values() for t in d.values() if t.requires_grad],
                           lr=lr)
    first = last = float("nan")
    step_flops = 0.0
    for s in range(steps):
        x, y = draw()
        opt.zero_grad(set_to_none=True)
        if s == 0:  # every step has the same shapes: count one, charge each
            with flop_counter() as counter:
                loss = loss_of(co, x, y)
                loss.backward()
            step_flops = float(counter.get_total_flops())
        else:
            loss = loss_of(co, x, y)
            loss.backward()
        opt.step()
        flops += step_flops
        last = float(loss.detach())
        if s == 0:
            first = last
    fitted = {part: {k: v.detach() for k, v in d.items()} for part, d in co.items()}
    with torch.no_grad():
        loss_final = (sum(float(loss_of(fitted, x, y)) for x, y in held) / held_out
                      if steps else loss_init)
    flops += eval_flops if steps else 0.0
    kept = "fitted" if steps and loss_final < loss_init else "init"
    out = copy.copy(config)
    if kept == "fitted":
        out.coefficients = _serialise(fitted, plan)
    elif config.coefficients is not None:
        out.coefficients = _serialise(init, plan)
    return out, {"steps": steps, "loss_init": loss_init,
                 "loss_final": loss_final if kept == "fitted" else loss_init,
                 "loss_fitted": loss_final, "loss_first": first, "loss_last": last,
                 "kept": kept, "flops": flops}


__all__ = ["AXES", "PATTERNS", "LiGO", "LiGOConfig", "fit_ligo", "init_coefficients",
           "materialise"]
