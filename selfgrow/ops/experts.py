"""Mixture-of-experts growth of selfgrow's reference transformer (``GrowableTransformer``).

Experts are real tensors (:class:`~selfgrow.models.moe.MoEFFN` stacks them along dim 0), so
every operator here resizes tensors and rewrites ``TransformerConfig.moe_experts``: a model
built from the grown config loads the grown state dict. Optimizer state follows through
ParamMaps (kept experts bit-identical, copies scaled by their share, new tensors fresh), and
every operator is transactional like the rest of the registry.

======================= ================================================= =================
operator                what it does                                      exactness
======================= ================================================= =================
``moe_upcycle``         dense FFN -> E experts that are copies of it,     EXACT (dropless)
                        router N(0, router_std^2), bias 0                 for every gate
``moe_drop_upcycle``    upcycling, then each expert re-initialises a      inexact by design
                        random ``drop_ratio`` of its hidden units         (error measured)
``add_expert``          copy of expert ``source`` (default: the most      EXACT for top-any;
                        loaded); router row copied; top-any: both logits  top-k / dynamic-k:
                        - log 2; top-k: the copy ties the source (noisy)  measured
``remove_expert``       drop expert ``expert`` (default: least loaded)    measured; exact if
                                                                          it gets no mass
``grow_top_k``          top-k's k -> ``new_k`` (every MoE layer)          measured
======================= ================================================= =================

Why upcycling is exact: the gate's weights over the selected experts sum to 1
(``selfgrow.models.moe``), so ``sum_e w_e FFN(x) = FFN(x)`` whatever the router says; the
router can therefore start random (it gets gradient from the load-balancing loss at once, and
from the main loss as soon as the experts differ). With a capacity factor, tokens over
capacity are dropped and the claim is off (error measured). Sources: Komatsuzaki et al. 2023
(Sparse Upcycling); Nakamura et al. 2025 (Drop-Upcycling: re-initialise half of each
expert's FFN along its hidden dimension with the original weights' mean and std).

Why ``add_expert`` is exact for top-any gating: subtracting ``log 2`` from the logits of the
source expert e and its copy e' keeps the softmax denominator (``2 exp(l_e - log 2) =
exp(l_e)``), so every other probability is unchanged and e, e' get ``p_e / 2`` each; top-any
thresholds move by the same ``- log 2`` so e' is selected exactly when e was, and the
renormalised weights of the pair add up to e's old weight. Under top-k the pair would take
two of the k slots of a token routed to e, or, halved, drop out of tokens where e was
marginal (the busiest expert starved: measured in a trial), so top-k leaves e untouched and
starts the copy at e's logit with symmetry-breaking noise: exact for every token whose
top-k does not pick the copy, inexact for the others (measured).

Optimizer state (``selfgrow.optim``): an upcycled expert tensor ``(E, ...)`` maps every
expert onto the dense tensor (``ParamMap.unsqueeze = 0``) with ``grad_scale = 1 / E`` (each
expert receives about a 1/E share of the dense gradient under balanced routing), the router
(and top-any thresholds, the dynamic-k net) start fresh; Drop-Upcycling's expert tensors start
fresh (their re-initialised units differ per expert); ``add_expert`` copies the source's
state into the copy with ``grad_scale = 1/2`` (on the source too where they split its
mass: top-any, top-1);
``remove_expert`` keeps the other experts' state bit-identical.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..core import ParamMap, Transaction
from ..errors import GrowthConfigError, IncompatibleModelError, choices_message
from ..models.moe import GATES, MoEFFN
from ..models.transformer import FFN, GrowableTransformer, moe_ffn
from ._registry import GrowthResult, OpConfig, Operator, register_operator

ROUTER_INITS = ("split",)
#: the dense FFN parameter each stacked expert tensor of MoEFFN comes from
DENSE_OF_EXPERT = {"w_up": "up.weight", "w_down": "down.weight", "b_up": "up.bias",
                   "b_down": "down.bias", "w_gate": "gate.weight", "b_gate": "gate.bias"}


# ---------------------------------------------------------------------------------------------
# checks shared by every MoE operator
# ---------------------------------------------------------------------------------------------
def _transformer(model: nn.Module, op: str) -> GrowableTransformer:
    if not isinstance(model, GrowableTransformer):
        raise IncompatibleModelError(
            f"{op} works on selfgrow.GrowableTransformer (whose config records experts per "
            f"layer), got {type(model).__name__}")
    cfg = model.config
    layers = list(model.layers)
    if len(layers) != cfg.n_layers or (cfg.moe_experts and len(cfg.moe_experts) != len(layers)):
        raise IncompatibleModelError(
            f"{op}: config says {cfg.n_layers} layers and moe_experts={cfg.moe_experts}, the "
            f"model has {len(layers)} layers (config disagrees with modules)")
    for i, b in enumerate(layers):
        e = cfg.experts_of(i)
        ffn = b.ffn
        if e == 0 and not isinstance(ffn, FFN):
            raise IncompatibleModelError(f"{op}: layer {i} is {type(ffn).__name__}, config "
                                         f"says dense (config disagrees with modules)")
        if e and (not isinstance(ffn, MoEFFN) or ffn.n_experts != e or ffn.d_ff != cfg.d_ff):
            raise IncompatibleModelError(
                f"{op}: layer {i} is {ffn!r:.80}, config says {e} experts of d_ff "
                f"{cfg.d_ff} (config disagrees with modules)")
        if e == 0 and ffn.up.out_features != cfg.d_ff:
            raise IncompatibleModelError(f"{op}: layer {i} FFN has {ffn.up.out_features} "
                                         f"units, config says d_ff={cfg.d_ff}")
    return model


def _moe_layer_index(model: GrowableTransformer, layer: Any, op: str) -> int:
    moe = [i for i in range(model.config.n_layers) if model.config.experts_of(i)]
    if not moe:
        raise IncompatibleModelError(f"{op} needs an MoE layer; the model is dense (upcycle "
                                     f"it first with moe_upcycle)")
    if isinstance(layer, bool) or not isinstance(layer, int) or layer not in moe:
        raise GrowthConfigError(f"{op}: layer={layer!r} is not an MoE layer; valid: {moe}")
    return layer


def _int_or_none(name: str, v: Any, lo: int, hi: int) -> None:
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise GrowthConfigError(f"{name}={v!r} is out of range; valid: None or {lo}..{hi}")


def _std(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise GrowthConfigError(f"{name}={v!r} is out of range; valid: a number >= 0")


def _seed(v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise GrowthConfigError(f"seed={v!r} is out of range; valid: an integer >= 0")


def _load(m: MoEFFN) -> torch.Tensor | None:
    """The layer's current routing load (E,), without consuming the signal's window; None
    when no forward has been counted."""
    st = m.routing_stats(reset=False)
    if st["tokens"] == 0:
        return None
    load = torch.as_tensor(st["load"], dtype=torch.float64)
    return load if load.numel() == m.n_experts else None


def _gather0(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return t.index_select(0, idx.to(t.device))


def _set(tx: Transaction, module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = module._parameters.get(name)
    if old is None:
        raise IncompatibleModelError(f"{type(module).__name__} has no parameter {name!r}")
    tx.set_parameter(module, name, nn.Parameter(value.detach().to(old.dtype).contiguous(),
                                                requires_grad=old.requires_grad))


def _remap_stats(tx: Transaction, m: MoEFFN, index: torch.Tensor | None) -> None:
    """Restart the layer's routing window (counts of the old architecture would mislead the
    ``ExpertOverload`` signal) and re-index the per-tag counts to the new experts (``index``:
    old expert per new one, -1 = new: count 0; None = same experts), reversibly."""
    saved = (m._window, m._last_read, dict(m._tagged))

    def do() -> None:
        n = m.n_experts if index is None else int(index.numel())
        m._window = type(m._window)(n)
        m._last_read = None
        if index is not None:
            m._tagged = {t: s.remapped(index) for t, s in m._tagged.items()}

    def undo() -> None:
        m._window, m._last_read, m._tagged = saved[0], saved[1], saved[2]

    tx.call(do, undo)


def _expert_maps(prefix: str, m: MoEFFN, idx: torch.Tensor,
                 scale: torch.Tensor | None) -> dict[str, ParamMap]:
    out = {}
    for n, p in m.expert_params().items():
        gs: float | torch.Tensor = 1.0
        if scale is not None:
            gs = scale.view(-1, *([1] * (p.dim() - 1))).to(torch.float32)
        out[f"{prefix}.{n}"] = ParamMap(f"{prefix}.{n}", (idx,) + (None,) * (p.dim() - 1), gs)
    return out


# ---------------------------------------------------------------------------------------------
# upcycling
# ---------------------------------------------------------------------------------------------
@dataclass
class MoEUpcycleConfig(OpConfig):
    """Sparse Upcycling: the dense FFN of each selected layer becomes ``n_experts`` copies of
    itself behind a new router (N(0, ``router_std``^2) weights, zero bias).

    ``layers``: dense layers to upcycle (None = every dense layer). ``top_k`` / ``gate``: the
    model's MoE settings when it has no MoE layer yet (None keeps the config's); a model
    with MoE layers must keep its own. EXACT when dropless (``moe_capacity_factor`` None),
    for every gate. Source: Komatsuzaki et al. 2023 (Sparse Upcycling).
    """

    name: ClassVar[str] = "moe_upcycle"
    n_experts: int = 8
    layers: tuple[int, ...] | None = None
    top_k: int | None = None
    gate: str | None = None
    router_std: float = 0.02
    seed: int = 0


def _validate_upcycle(model: nn.Module, config: MoEUpcycleConfig, op: str
                      ) -> tuple[GrowableTransformer, list[int]]:
    m = _transformer(model, op)
    cfg = m.config
    e = config.n_experts
    if isinstance(e, bool) or not isinstance(e, int) or e < 2:
        raise GrowthConfigError(f"{op}: n_experts={e!r} is out of range; valid: an integer >= 2")
    dense = [i for i in range(cfg.n_layers) if not cfg.experts_of(i)]
    if not dense:
        raise IncompatibleModelError(f"{op}: every layer is already an MoE layer "
                                     f"(moe_experts={cfg.moe_experts}); nothing to upcycle")
    layers = config.layers
    if layers is None:
        chosen = dense
    else:
        if not isinstance(layers, (list, tuple)) or not layers or any(
                isinstance(i, bool) or not isinstance(i, int) for i in layers):
            raise GrowthConfigError(f"{op}: layers={layers!r} must be None or a non-empty "
                                    f"list of layer indices; valid: {dense}")
        bad = [i for i in layers if i not in dense]
        if bad or len(set(layers)) != len(layers):
            raise GrowthConfigError(f"{op}: layers {list(layers)} are not distinct dense "
                                    f"layers; valid: {dense}")
        chosen = sorted(layers)
    has_moe = bool(cfg.moe_experts)
    gate = config.gate if config.gate is not None else cfg.moe_gate
    k = config.top_k if config.top_k is not None else cfg.moe_top_k
    if gate not in GATES:
        raise GrowthConfigError(f"{op}: " + choices_message("MoE gate", gate, GATES))
    try:
        _int_or_none("top_k", config.top_k, 1, e)
    except GrowthConfigError as err:
        raise GrowthConfigError(f"{op}: {err}") from None
    if has_moe and (gate != cfg.moe_gate or k != cfg.moe_top_k):
        raise GrowthConfigError(
            f"{op}: the model's MoE layers use gate={cfg.moe_gate!r}, top_k={cfg.moe_top_k}; "
            f"new MoE layers must match (got gate={gate!r}, top_k={k})")
    if gate != "top_any" and k > e:
        raise GrowthConfigError(f"{op}: top_k={k} > n_experts={e}; valid: 1..{e}")
    _std("router_std", config.router_std)
    _seed(config.seed)
    return m, chosen


def _upcycle(model: GrowableTransformer, config: MoEUpcycleConfig, tx: Transaction,
             layers: list[int], drop_ratio: float | None) -> dict[str, ParamMap]:
    cfg = model.config
    E = config.n_experts
    gate = config.gate if config.gate is not None else cfg.moe_gate
    k = config.top_k if config.top_k is not None else cfg.moe_top_k
    g = torch.Generator().manual_seed(config.seed)
    if not cfg.moe_experts:
        tx.set_attr(cfg, "moe_gate", gate)
        tx.set_attr(cfg, "moe_top_k", k)
    maps: dict[str, ParamMap] = {}
    zeros = torch.zeros(E, dtype=torch.long)
    for i in layers:
        block = model.layers[i]
        dense: FFN = block.ffn
        ref = dense.up.weight
        with torch.device("meta"):
            moe = moe_ffn(cfg, E)
        moe = moe.to_empty(device=ref.device).to(ref.dtype)
        pre = f"layers.{i}.ffn"
        dense_params = dict(dense.named_parameters())
        with torch.no_grad():
            for n in moe.expert_params():
                src = dense_params[DENSE_OF_EXPERT[n]]
                getattr(moe, n).copy_(src.detach().unsqueeze(0).expand(E, *src.shape))
                if drop_ratio is None:
                    maps[f"{pre}.{n}"] = ParamMap(
                        f"{pre}.{DENSE_OF_EXPERT[n]}", (zeros,) + (None,) * src.dim(), 1.0 / E,
                        unsqueeze=0)
                else:
                    maps[f"{pre}.{n}"] = ParamMap(None)
            moe.router.weight.copy_(_normal(moe.router.weight.shape, config.router_std, g))
            moe.router.bias.zero_()
            if moe.threshold is not None:
                moe.threshold.zero_()
            if moe.k_net is not None:
                moe.k_net.weight.copy_(_normal(moe.k_net.weight.shape, config.router_std, g))
                moe.k_net.bias.zero_()
            if drop_ratio is not None:
                _drop(moe, dense, drop_ratio, g)
        for n, _ in moe.named_parameters():
            if not n.startswith(("w_", "b_")):
                maps[f"{pre}.{n}"] = ParamMap(None)
        moe.train(dense.training)
        tx.replace_module(block, "ffn", moe)
    experts = list(cfg.moe_experts) or [0] * cfg.n_layers
    for i in layers:
        experts[i] = E
    tx.set_attr(cfg, "moe_experts", tuple(experts))
    return maps


def _normal(shape: torch.Size, std: float, g: torch.Generator) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=g) * std


def _drop(moe: MoEFFN, dense: FFN, ratio: float, g: torch.Generator) -> list[list[int]]:
    """Drop-Upcycling: in each expert re-initialise ``round(ratio * F)`` hidden units (rows
    of up/gate, columns of down) from N(mean, std) of the dense weight; their up/gate biases
    become 0. Returns the re-initialised units per expert."""
    E, Fh = moe.n_experts, moe.d_ff
    n = int(round(ratio * Fh))
    dropped = []
    if moe.w_up.is_meta:
        return [[] for _ in range(E)]

    def stats(w: torch.Tensor) -> tuple[float, float]:
        w = w.detach().double()
        return float(w.mean()), float(w.std()) if w.numel() > 1 else 0.0

    ins = [("w_up", "b_up", dense.up.weight)]
    if moe.w_gate is not None:
        ins.append(("w_gate", "b_gate", dense.gate.weight))
    for e in range(E):
        units = torch.randperm(Fh, generator=g)[:n].sort().values
        dropped.append(units.tolist())
        for wn, bn, src in ins:
            mu, sd = stats(src)
            w = getattr(moe, wn)
            w[e, units] = (torch.randn(n, w.shape[2], generator=g, dtype=torch.float64) * sd
                           + mu).to(w)
            b = getattr(moe, bn)
            if b is not None:
                b[e, units] = 0
        mu, sd = stats(dense.down.weight)
        moe.w_down[e][:, units] = (torch.randn(moe.d_model, n, generator=g,
                                               dtype=torch.float64) * sd + mu).to(moe.w_down)
    return dropped


@register_operator(MoEUpcycleConfig)
class MoEUpcycle(Operator):
    exact = True

    def is_exact(self, model: nn.Module, config: OpConfig) -> bool:
        return getattr(getattr(model, "config", None), "moe_capacity_factor", None) is None

    def validate(self, model: nn.Module, config: OpConfig) -> None:
        if not isinstance(config, MoEUpcycleConfig):
            raise GrowthConfigError("expected MoEUpcycleConfig")
        _validate_upcycle(model, config, "moe_upcycle")

    def apply(self, model: nn.Module, config: OpConfig, tx: Transaction) -> GrowthResult:
        if not isinstance(config, MoEUpcycleConfig):
            raise GrowthConfigError("expected MoEUpcycleConfig")
        m, layers = _validate_upcycle(model, config, "moe_upcycle")
        maps = _upcycle(m, config, tx, layers, None)
        return GrowthResult(param_maps=maps, exact=self.is_exact(m, config), notes={
            "layers": layers, "n_experts": config.n_experts, "gate": m.config.moe_gate,
            "top_k": m.config.moe_top_k})


@dataclass
class MoEDropUpcycleConfig(MoEUpcycleConfig):
    """Drop-Upcycling: :class:`MoEUpcycleConfig`'s upcycling, then in every expert a random
    ``drop_ratio`` of the hidden units (different per expert, seeded) is re-initialised:
    their up / gate rows and down columns drawn from N(mean, std) of the dense weight, their
    up / gate biases 0. INEXACT by design (the error is measured and reported); the expert
    tensors start with fresh optimizer state. Source: Nakamura et al., ICLR 2025
    (Drop-Upcycling; ``drop_ratio = 0.5`` is the paper's choice).
    """

    name: ClassVar[str] = "moe_drop_upcycle"
    drop_ratio: float = 0.5


@register_operator(MoEDropUpcycleConfig)
class MoEDropUpcycle(Operator):
    exact = False

    def validate(self, model: nn.Module, config: OpConfig) -> None:
        if not isinstance(config, MoEDropUpcycleConfig):
            raise GrowthConfigError("expected MoEDropUpcycleConfig")
        _validate_upcycle(model, config, "moe_drop_upcycle")
        r = config.drop_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
            raise GrowthConfigError(f"moe_drop_upcycle: drop_ratio={r!r} is out of range; "
                                    f"valid: a number in (0, 1]")

    def apply(self, model: nn.Module, config: OpConfig, tx: Transaction) -> GrowthResult:
        if not isinstance(config, MoEDropUpcycleConfig):
            raise GrowthConfigError("expected MoEDropUpcycleConfig")
        m, layers = _validate_upcycle(model, config, "moe_drop_upcycle")
        maps = _upcycle(m, config, tx, layers, float(config.drop_ratio))
        return GrowthResult(param_maps=maps, exact=False, notes={
            "layers": layers, "n_experts": config.n_experts, "drop_ratio": config.drop_ratio,
            "dropped_units_per_expert": int(round(config.drop_ratio * m.config.d_ff))})


# ---------------------------------------------------------------------------------------------
# add / remove an expert
# ---------------------------------------------------------------------------------------------
@dataclass
class AddExpertConfig(OpConfig):
    """Add one expert to MoE layer ``layer``: a copy of expert ``source`` (None = the most
    loaded one in the layer's routing statistics) with a copy of its router row.

    How the router and the copy start depends on the gate (``router_init="split"``):

    * top-any: the logits of the source and the copy both drop by ``log 2`` (router bias and
      threshold), which splits the source's softmax mass in two and keeps every selection:
      EXACT (dropless; ``noise`` and ``router_noise`` default to 0 here).
    * top-k and dynamic-k with k >= 2: the source is untouched and the copy starts with the
      source's logit (up to the router noise below), so it competes for the source's tokens
      as an equal: where both fit in a token's top-k the copy takes a weaker expert's slot,
      elsewhere one of the two near-identical experts is picked. Halving both logits
      instead (the top-any split) starves the pair on a balanced router: two experts at
      p/2 drop out of every top-k, and an unselected expert gets no gradient from the main
      loss (found in a trial); starting the copy below the source leaves it dead the same
      way. Inexact where the copy is selected (measured).
    * top-1: both logits drop by ``log 2`` and the rows get opposite noise, so each token
      picks one of the pair (measured).

    Symmetry breaking (top-k / dynamic-k only, by default): the copy's expert weights get
    Gaussian noise of relative std ``noise`` (default 0.01 of each tensor's std) and its
    router row noise of relative std ``router_noise`` (default 0.1); without them two
    identical experts selected for the same tokens would receive the same gradient
    directions. Sources: docs/GROWTH-MATH.md (copy with a log 2 split; exact only under
    dense / threshold gating); Komatsuzaki et al. 2023 (experts as copies).
    """

    name: ClassVar[str] = "add_expert"
    layer: int = 0
    source: int | None = None
    router_init: str = "split"
    noise: float | None = None
    router_noise: float | None = None
    seed: int = 0


def _source_expert(m: MoEFFN, source: int | None, op: str, most: bool) -> int:
    E = m.n_experts
    if source is not None:
        _int_or_none("source" if most else "expert", source, 0, E - 1)
        return source
    load = _load(m)
    if load is None:
        raise GrowthConfigError(
            f"{op}: the layer has no routing statistics yet (no forward counted); run a "
            f"forward or pass {'source' if most else 'expert'}= (0..{E - 1})")
    return int(load.argmax()) if most else int(load.argmin())


def _noisy(t: torch.Tensor, rel: float, g: torch.Generator) -> torch.Tensor:
    """``t`` plus N(0, (rel * std(t))^2) noise (drawn on CPU, seeded); meta stays meta."""
    if rel == 0 or t.is_meta:
        return t
    sd = float(t.detach().double().std()) if t.numel() > 1 else float(t.abs().mean())
    n = torch.randn(tuple(t.shape), generator=g, dtype=torch.float64) * (rel * sd)
    return t + n.to(device=t.device, dtype=t.dtype)


@register_operator(AddExpertConfig)
class AddExpert(Operator):
    exact = False

    def is_exact(self, model: nn.Module, config: OpConfig) -> bool:
        c = getattr(model, "config", None)
        return (getattr(c, "moe_gate", None) == "top_any"
                and getattr(c, "moe_capacity_factor", 0) is None
                and not getattr(config, "noise", None) and not getattr(config, "router_noise",
                                                                       None))

    def _check(self, model: nn.Module, config: OpConfig) -> tuple[GrowableTransformer, int, int]:
        if not isinstance(config, AddExpertConfig):
            raise GrowthConfigError("expected AddExpertConfig")
        m = _transformer(model, "add_expert")
        i = _moe_layer_index(m, config.layer, "add_expert")
        if config.router_init not in ROUTER_INITS:
            raise GrowthConfigError("add_expert: " + choices_message(
                "router_init", config.router_init, ROUTER_INITS))
        for name in ("noise", "router_noise"):
            v = getattr(config, name)
            if v is not None:
                _std(name, v)
        _seed(config.seed)
        layer = m.layers[i].ffn
        src = _source_expert(layer, config.source, "add_expert", most=True)
        return m, i, src

    def validate(self, model: nn.Module, config: OpConfig) -> None:
        self._check(model, config)

    def apply(self, model: nn.Module, config: OpConfig, tx: Transaction) -> GrowthResult:
        if not isinstance(config, AddExpertConfig):
            raise GrowthConfigError("expected AddExpertConfig")
        m, i, src = self._check(model, config)
        layer: MoEFFN = m.layers[i].ffn
        E = layer.n_experts
        gate = m.config.moe_gate
        top1 = gate != "top_any" and layer.top_k == 1
        mode = "exact_split" if gate == "top_any" else ("pair_split" if top1 else "tie")
        default = 0.0 if gate == "top_any" else None
        noise = config.noise if config.noise is not None else (
            0.0 if default == 0.0 else 0.01)
        rnoise = config.router_noise if config.router_noise is not None else (
            0.0 if default == 0.0 else 0.1)
        g = torch.Generator().manual_seed(config.seed)
        idx = torch.cat([torch.arange(E), torch.tensor([src])])
        scale = torch.ones(E + 1, dtype=torch.float64)
        scale[E] = 0.5
        if mode != "tie":
            scale[src] = 0.5
        pre = f"layers.{i}.ffn"
        maps = _expert_maps(pre, layer, idx, scale)
        shift = math.log(2.0)
        for n, p in list(layer.expert_params().items()):
            new = _gather0(p.detach(), idx)
            if noise:
                new = torch.cat([new[:E], _noisy(new[E:], noise, g)])
            _set(tx, layer, n, new)
        w = _gather0(layer.router.weight.detach(), idx)
        b = _gather0(layer.router.bias.detach(), idx).clone()
        if rnoise and not w.is_meta:
            sd = float(w[src].double().std()) if w.shape[1] > 1 else 1.0
            d = (torch.randn(w.shape[1], generator=g, dtype=torch.float64) * rnoise * sd).to(w)
            w = w.clone()
            w[E] = w[E] + d
            if mode == "pair_split":
                w[src] = w[src] - d  # opposite: each token prefers one of the pair
        if mode != "tie":
            b[E] -= shift
            b[src] -= shift
        _set(tx, layer.router, "weight", w)
        _set(tx, layer.router, "bias", b)
        maps[f"{pre}.router.weight"] = ParamMap(f"{pre}.router.weight", (idx, None),
                                                scale.view(-1, 1).float())
        maps[f"{pre}.router.bias"] = ParamMap(f"{pre}.router.bias", (idx,), scale.float())
        if layer.threshold is not None:
            t = _gather0(layer.threshold.detach(), idx).clone()
            t[E] -= shift
            t[src] -= shift
            _set(tx, layer, "threshold", t)
            maps[f"{pre}.threshold"] = ParamMap(f"{pre}.threshold", (idx,), scale.float())
        new_index = torch.cat([torch.arange(E), torch.tensor([-1])])
        _remap_stats(tx, layer, new_index)
        experts = list(m.config.moe_experts)
        experts[i] = E + 1
        tx.set_attr(m.config, "moe_experts", tuple(experts))
        return GrowthResult(param_maps=maps, exact=self.is_exact(model, config), notes={
            "layer": i, "source": src, "n_experts": [E, E + 1], "router_init": mode,
            "noise": noise, "router_noise": rnoise})


@dataclass
class RemoveExpertConfig(OpConfig):
    """Remove expert ``expert`` of MoE layer ``layer`` (None = the least loaded one in the
    layer's routing statistics): its tensors, router row (and threshold) disappear; the other
    experts and their optimizer state are bit-identical. Exact when the expert receives no
    routing mass on the data (top-k / top-any select among the others exactly as before);
    otherwise inexact (measured). Source: docs/GROWTH-MATH.md.
    """

    name: ClassVar[str] = "remove_expert"
    layer: int = 0
    expert: int | None = None


@register_operator(RemoveExpertConfig)
class RemoveExpert(Operator):
    shrinks = True
    exact = False

    def _check(self, model: nn.Module, config: OpConfig) -> tuple[GrowableTransformer, int, int]:
        if not isinstance(config, RemoveExpertConfig):
            raise GrowthConfigError("expected RemoveExpertConfig")
        m = _transformer(model, "remove_expert")
        i = _moe_layer_index(m, config.layer, "remove_expert")
        layer: MoEFFN = m.layers[i].ffn
        E = layer.n_experts
        if E < 2:
            raise GrowthConfigError(f"remove_expert: layer {i} has one expert; removing it "
                                    f"would leave no FFN")
        if m.config.moe_gate != "top_any" and m.config.moe_top_k > E - 1:
            raise GrowthConfigError(
                f"remove_expert: top_k={m.config.moe_top_k} needs at least that many experts; "
                f"layer {i} has {E}")
        j = _source_expert(layer, config.expert, "remove_expert", most=False)
        return m, i, j

    def validate(self, model: nn.Module, config: OpConfig) -> None:
        self._check(model, config)

    def apply(self, model: nn.Module, config: OpConfig, tx: Transaction) -> GrowthResult:
        m, i, j = self._check(model, config)
        layer: MoEFFN = m.layers[i].ffn
        E = layer.n_experts
        keep = torch.tensor([e for e in range(E) if e != j])
        pre = f"layers.{i}.ffn"
        load = _load(layer)
        maps = _expert_maps(pre, layer, keep, None)
        for n, p in list(layer.expert_params().items()):
            _set(tx, layer, n, _gather0(p.detach(), keep))
        _set(tx, layer.router, "weight", _gather0(layer.router.weight.detach(), keep))
        _set(tx, layer.router, "bias", _gather0(layer.router.bias.detach(), keep))
        maps[f"{pre}.router.weight"] = ParamMap(f"{pre}.router.weight", (keep, None))
        maps[f"{pre}.router.bias"] = ParamMap(f"{pre}.router.bias", (keep,))
        if layer.threshold is not None:
            _set(tx, layer, "threshold", _gather0(layer.threshold.detach(), keep))
            maps[f"{pre}.threshold"] = ParamMap(f"{pre}.threshold", (keep,))
        _remap_stats(tx, layer, keep)
        experts = list(m.config.moe_experts)
        experts[i] = E - 1
        tx.set_attr(m.config, "moe_experts", tuple(experts))
        return GrowthResult(param_maps=maps, exact=False, notes={
            "layer": i, "expert": j, "n_experts": [E, E - 1],
            "load_of_removed": None if load is None else float(load[j])})


# ---------------------------------------------------------------------------------------------
# grow k
# ---------------------------------------------------------------------------------------------
@dataclass
class GrowTopKConfig(OpConfig):
    """Raise top-k's k (the largest k of dynamic-k) to ``new_k`` in every MoE layer: each
    token mixes more experts. INEXACT (the new experts join every token's mixture; the
    error is measured). Dynamic-k's ``k_net`` gains output rows for the new k values (zero
    weights, bias = the lowest existing bias - log 100, so they start as the least likely
    choices, about 100 times less likely than the least likely old k).
    Top-any has no k and is refused. Source: the survey's "grow k" (Lepikhin et al. 2021 for
    top-2 gating).
    """

    name: ClassVar[str] = "grow_top_k"
    new_k: int = 0


@register_operator(GrowTopKConfig)
class GrowTopK(Operator):
    exact = False

    def _check(self, model: nn.Module, config: OpConfig) -> GrowableTransformer:
        if not isinstance(config, GrowTopKConfig):
            raise GrowthConfigError("expected GrowTopKConfig")
        m = _transformer(model, "grow_top_k")
        cfg = m.config
        if not cfg.moe_experts:
            raise IncompatibleModelError("grow_top_k needs an MoE layer; the model is dense "
                                         "(upcycle it first with moe_upcycle)")
        if cfg.moe_gate == "top_any":
            raise IncompatibleModelError(
                "grow_top_k: the model's top_any gate has no k (each token uses the experts "
                "that clear their thresholds); valid gates: topk, dynamic_k")
        e_min = min(e for e in cfg.moe_experts if e)
        k = config.new_k
        if isinstance(k, bool) or not isinstance(k, int) or not cfg.moe_top_k < k <= e_min:
            raise GrowthConfigError(
                f"grow_top_k: new_k={k!r} is out of range; valid: {cfg.moe_top_k + 1}..{e_min} "
                f"(above the current k, at most the smallest layer's experts)")
        return m

    def validate(self, model: nn.Module, config: OpConfig) -> None:
        self._check(model, config)

    def apply(self, model: nn.Module, config: OpConfig, tx: Transaction) -> GrowthResult:
        if not isinstance(config, GrowTopKConfig):
            raise GrowthConfigError("expected GrowTopKConfig")
        m = self._check(model, config)
        k0, k = m.config.moe_top_k, config.new_k
        maps: dict[str, ParamMap] = {}
        for i, b in enumerate(m.layers):
            layer = b.ffn
            if not isinstance(layer, MoEFFN):
                continue
            tx.set_attr(layer, "top_k", k)
            _remap_stats(tx, layer, None)
            if layer.k_net is not None:
                w, bias = layer.k_net.weight.detach(), layer.k_net.bias.detach()
                idx = torch.cat([torch.arange(k0), torch.full((k - k0,), -1)])
                new_w = torch.cat([w, w.new_zeros(k - k0, w.shape[1])])
                low = bias[:1] if bias.is_meta else bias.min().reshape(1) - math.log(100.0)
                new_b = torch.cat([bias, low.expand(k - k0)])
                _set(tx, layer.k_net, "weight", new_w)
                _set(tx, layer.k_net, "bias", new_b)
                tx.set_attr(layer.k_net, "out_features", k)
                pre = f"layers.{i}.ffn.k_net"
                maps[f"{pre}.weight"] = ParamMap(f"{pre}.weight", (idx, None))
                maps[f"{pre}.bias"] = ParamMap(f"{pre}.bias", (idx,))
        tx.set_attr(m.config, "moe_top_k", k)
        return GrowthResult(param_maps=maps, exact=False, notes={"top_k": [k0, k]})


# ---------------------------------------------------------------------------------------------
# growth by merging (Branch-Train-MiX)
# ---------------------------------------------------------------------------------------------
MERGE_NON_FFN = ("average", "base")


def _shape_config(m: GrowableTransformer) -> dict[str, Any]:
    c = m.config
    return {f: getattr(c, f) for f in c.__dataclass_fields__ if not f.startswith("moe_")}


@torch.no_grad()
def grow_by_merging(
    base: nn.Module,
    models: list[nn.Module] | tuple[nn.Module, ...],
    *,
    non_ffn: str = "average",
    top_k: int = 2,
    gate: str = "topk",
    router_std: float = 0.02,
    seed: int = 0,
) -> GrowableTransformer:
    """Branch-Train-MiX: one MoE model whose layer-``i`` experts are the layer-``i`` FFNs of
    ``models`` (expert e = ``models[e]``), built as a NEW model (the inputs are untouched).

    Every model must be a dense selfgrow ``GrowableTransformer`` with ``base``'s architecture
    (typically copies of ``base`` each trained on its own experience or corpus). The
    non-FFN parameters (embeddings, attention, norms, head) are the element-wise mean over
    ``models`` (``non_ffn="average"``, BTX) or ``base``'s (``"base"``). The router starts
    N(0, ``router_std``^2) with zero bias; train it briefly with :func:`train_router_`
    (BTX trains the router, and optionally everything, after merging).

    Exactness: expert e of every layer IS ``models[e]``'s FFN (bit-identical tensors), so
    with a one-hot router (expert e selected with weight 1) each layer's FFN output equals
    ``models[e]``'s on the same input; with ``non_ffn="base"`` and ``base`` among the models,
    routing every token to base's expert reproduces base's outputs.

    Args:
        base: the seed model.
        models: ``E >= 2`` dense models of base's architecture.
        non_ffn: ``"average"`` or ``"base"``.
        top_k, gate: the MoE settings of the merged model (see ``selfgrow.models.moe``).
        router_std: std of the router init (0 = uniform routing at first).
        seed: seed of the router init.

    Returns:
        A ``GrowableTransformer`` with ``moe_experts = (E,) * n_layers``, on base's device
        and dtype, in base's training mode.

    Raises:
        IncompatibleModelError: a model that is not a dense GrowableTransformer of base's
            architecture (the message names the first differing field or parameter), or
            on another dtype / device.
        GrowthConfigError: fewer than two models, or bad ``non_ffn`` / ``top_k`` / ``gate``.
    """
    if not isinstance(models, (list, tuple)) or len(models) < 2:
        n = len(models) if isinstance(models, (list, tuple)) else "not a list"
        raise GrowthConfigError(f"grow_by_merging needs a list of at least 2 models, got "
                                f"{type(models).__name__} ({n})")
    if non_ffn not in MERGE_NON_FFN:
        raise GrowthConfigError(choices_message("non_ffn", non_ffn, MERGE_NON_FFN))
    _std("router_std", router_std)
    _seed(seed)
    def dense(who: str, m: nn.Module) -> GrowableTransformer:
        if not isinstance(m, GrowableTransformer):
            raise IncompatibleModelError(f"grow_by_merging: {who} is {type(m).__name__}; "
                                         f"valid: a dense selfgrow GrowableTransformer")
        _transformer(m, "grow_by_merging")
        if m.config.moe_experts:
            raise IncompatibleModelError(f"grow_by_merging: {who} already has MoE layers "
                                         f"(moe_experts={m.config.moe_experts}); valid: dense")
        return m

    base = dense("base", base)
    models = [dense(f"models[{e}]", m) for e, m in enumerate(models)]
    want = _shape_config(base)
    for e, m in enumerate(models):
        got = _shape_config(m)
        diff = [k for k in want if want[k] != got[k]]
        if diff:
            raise IncompatibleModelError(
                f"grow_by_merging: models[{e}] has {diff[0]}={got[diff[0]]!r}, base has "
                f"{want[diff[0]]!r}; every model must have base's architecture")
    ref_p = base.tok_emb.weight
    for e, m in enumerate(models):
        p0 = m.tok_emb.weight
        if p0.dtype != ref_p.dtype or p0.device != ref_p.device:
            raise IncompatibleModelError(
                f"grow_by_merging: models[{e}] is {p0.dtype} on {p0.device}, base is "
                f"{ref_p.dtype} on {ref_p.device}; move every model to one dtype and device")
    E = len(models)
    from ..models.moe import check_moe_args

    check_moe_args(E, top_k, gate, None, base.config.ffn)
    cfg = type(base.config)(**{**want, "moe_experts": (E,) * base.config.n_layers,
                                "moe_top_k": top_k, "moe_gate": gate,
                                "moe_capacity_factor": None})
    ref = base.tok_emb.weight
    with torch.device("meta"):
        merged = GrowableTransformer(cfg)
    merged = merged.to_empty(device=ref.device).to(ref.dtype)
    if cfg.tie_embeddings:  # materialising from meta unties them
        merged.head.weight = merged.tok_emb.weight
    named = [dict(m.named_parameters()) for m in models]
    base_named = dict(base.named_parameters())
    buffers = dict(base.named_buffers())
    g = torch.Generator().manual_seed(seed)
    for n, p in merged.named_parameters():
        parts = n.split(".")
        if len(parts) == 4 and parts[0] == "layers" and parts[2] == "ffn" and \
                parts[3] in DENSE_OF_EXPERT:
            src = f"layers.{parts[1]}.ffn.{DENSE_OF_EXPERT[parts[3]]}"
            p.copy_(torch.stack([nm[src].detach() for nm in named]))
        elif ".ffn.router." in n or ".ffn.k_net." in n or n.endswith(".ffn.threshold"):
            if n.endswith("weight"):
                p.copy_(torch.randn(tuple(p.shape), generator=g) * router_std)
            else:
                p.zero_()
        elif non_ffn == "base":
            p.copy_(base_named[n].detach())
        else:
            p.copy_(torch.stack([nm[n].detach().double() for nm in named]).mean(0).to(p.dtype))
    for n, b in merged.named_buffers():
        if n in buffers:
            b.copy_(buffers[n])
    merged.train(base.training)
    return merged


def train_router_(
    model: nn.Module,
    batches: Any,
    steps: int = 100,
    lr: float = 1e-3,
    batch_size: int = 16,
    seq_len: int = 64,
) -> list[float]:
    """Train only the MoE routers (router, top-any thresholds, dynamic-k net) of ``model``
    on next-token prediction plus the MoE auxiliary loss, in place (BTX's router training
    after merging); every other parameter is frozen for the duration and restored after.

    Args:
        batches: an object with ``sample(batch_size, seq_len) -> (x, y)`` (e.g.
            ``selfgrow.data.text.LMBatches``, or a mixture of several corpora's).
        steps, lr, batch_size, seq_len: Adam steps, learning rate and batch shape.

    Returns:
        The training loss of every step.

    Raises:
        IncompatibleModelError: a model without MoE routers.
        GrowthConfigError: bad steps / lr / batch_size / seq_len / batches.
    """
    import torch.nn.functional as F

    from ..models.moe import moe_auxiliary_loss

    routers = [p for n, p in model.named_parameters()
               if ".router." in n or ".k_net." in n or n.endswith(".threshold")]
    if not routers:
        raise IncompatibleModelError("train_router_: the model has no MoE router")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise GrowthConfigError(f"steps={steps!r} is out of range; valid: an integer >= 1")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) \
            or lr <= 0:
        raise GrowthConfigError(f"lr={lr!r} is out of range; valid: a number > 0")
    for name, v in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise GrowthConfigError(f"{name}={v!r} is out of range; valid: an integer >= 1")
    if not callable(getattr(batches, "sample", None)):
        raise GrowthConfigError("batches needs a sample(batch_size, seq_len) -> (x, y) method "
                                "(e.g. selfgrow.data.text.LMBatches)")
    ids = {id(p) for p in routers}
    frozen = {p: p.requires_grad for p in model.parameters() if id(p) not in ids}
    was_training = model.training
    opt = torch.optim.Adam(routers, lr=lr)
    losses = []
    try:
        for p in frozen:
            p.requires_grad_(False)
        model.train()
        dev = routers[0].device
        for _ in range(steps):
            x, y = batches.sample(batch_size, seq_len)
            x, y = x.to(dev), y.to(dev)
            logits = model(x)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            total = loss + moe_auxiliary_loss(model)
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        for p, rg in frozen.items():
            p.requires_grad_(rg)
        model.train(was_training)
    return losses


__all__ = [
    "AddExpertConfig",
    "GrowTopKConfig",
    "MoEDropUpcycleConfig",
    "MoEUpcycleConfig",
    "RemoveExpertConfig",
    "grow_by_merging",
    "train_router_",
]
