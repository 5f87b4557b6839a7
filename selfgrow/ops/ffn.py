"""Width growth of the FFN hidden layer (d_ff) of transformers.

Both operators work through :mod:`selfgrow.adapters` (selfgrow GrowableTransformer with
GELU or SwiGLU, ``nn.TransformerEncoder``, HF BERT, GPT-2 (``Conv1D``, stored ``(in, out)``)
and LLaMA (gated)) and rewrite the family's FFN width (``d_ff`` / ``intermediate_size`` /
``n_inner`` / ``linear1.out_features``) so a fresh model built from the grown config loads
the grown state dict.

The FFN of one block is ``down(act(up(x)))`` or, gated, ``down(act(gate(x)) * up(x))`` with
``up, gate: (F, C)`` and ``down: (C, F)``. Hidden unit u is row u of up/gate (and their
biases) and column u of down.

``ffn_net2wider`` (Net2WiderNet, Chen et al. 2016; bert2BERT function-preserving
initialisation, Chen et al. 2022). A new unit copies the incoming rows (and biases) of an old
unit j -- gate and up rows together for gated FFNs -- and every copy of j, the original
included, gets j's outgoing column divided by the number of copies ``c_j``. The copies have
identical pre-activations, so for ANY elementwise activation (and for the gated product, whose
two factors are both copied) they have identical activations ``a_j`` and contribute
``c_j * (w_j / c_j) * a_j = w_j a_j``: EXACT. Per tensor (F' = new width):

====================================== ============ ====================== ============
tensor                                 unit axis    values                 grad_scale
====================================== ============ ====================== ============
up, gate rows and their biases         output       copied                 1/c_j
down columns                           input        copied, divided by c_j 1
down bias                              --           unchanged              --
====================================== ============ ====================== ============

(a copy's activation feeds ``w_j / c_j`` so its incoming weights receive ``1/c_j`` of the old
gradient; a down column multiplies the same activation and feeds an unchanged output, so it
receives the old gradient.) Copies receive identical gradients and would stay identical under
SGD/Adam; ``noise > 0`` breaks the symmetry EXACTLY by adding to the outgoing columns of the
c_j copies of j noise terms that sum to zero over the copies (their activations are equal, so
the noise cancels in the output).

``ffn_zero_fanout`` (zero fan-out growth, docs/GROWTH-MATH.md; the function-preserving alternative
to copying, in the spirit of masked structural growth, Yao et al. 2023, where new units start
with zero contribution): new units get random incoming rows (N(0, init_std^2), biases 0)
and zero outgoing columns: EXACT (the new units add ``0 * a``). The incoming rows receive no
gradient until the outgoing columns move away from zero, which they do at the first step
(their gradient is ``a_u * dL/dy``, non-zero for random incoming rows). ParamMap: every new
coordinate is brand-new (index -1: ``m = 0``, ``v`` set at its first gradient; see
:mod:`selfgrow.optim`).

Per-layer selection (``ffn_net2wider(layers=[...])``): every supported family stores ONE FFN
width in its config, so every block must end with the same d_ff (otherwise a model built from
the config could not load the state dict). Selected layers get Net2WiderNet copies, the other
layers get the same number of zero fan-out units (also exact).
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
    get_adapter,
    normal_fill,
    projection_plans,
    resize_params,
    zeros_fill,
)
from ..core import Transaction, zero_sum_noise
from ..errors import GrowthConfigError
from ._registry import GrowthResult, OpConfig, Operator, register_operator


def _check_layers(layers: list[int] | tuple[int, ...] | None, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    if not isinstance(layers, (list, tuple)) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in layers
    ):
        raise GrowthConfigError(f"layers must be None or a list of ints, got {layers!r}")
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise GrowthConfigError(f"layers {bad} out of range; valid: 0..{n_layers - 1}")
    if len(set(layers)) != len(layers):
        raise GrowthConfigError(f"layers has duplicates: {list(layers)}")
    return sorted(layers)


def _validate_new_d_ff(ad: TransformerAdapter, new_d_ff: Any) -> int:
    ad.check()
    f = ad.dims().d_ff
    if not isinstance(new_d_ff, int) or isinstance(new_d_ff, bool) or new_d_ff <= f:
        raise GrowthConfigError(
            f"new_d_ff must be an integer > current d_ff {f} (no shrinking), got {new_d_ff!r}"
        )
    return f


def ffn_unit_plans(
    ad: TransformerAdapter, per_layer: dict[int, Roles]
) -> dict[str, dict[int, AxisMap]]:
    """Plans (``{param_name: {dim: AxisMap}}``) growing the FFN units of the given layers:
    up/gate rows (and biases) follow ``roles.write``, down columns ``roles.read``.
    Reusable by other operators (e.g. expert upcycling)."""
    items: list[tuple[ProjRef, AxisMap | None, AxisMap | None]] = []
    for i, roles in per_layer.items():
        lv = ad.layer(i)
        items.append((lv.up, roles.write, None))
        if lv.gate is not None:
            items.append((lv.gate, roles.write, None))
        items.append((lv.down, None, roles.read))
    return projection_plans(items)


def _incoming_names(ad: TransformerAdapter, layers: list[int]) -> list[str]:
    names: list[str] = []
    for i in layers:
        lv = ad.layer(i)
        for ref in (lv.up, lv.gate):
            if ref is not None:
                names.append(ref.weight_name)
                if ref.bias_name is not None:
                    names.append(ref.bias_name)
    return names


def _fresh_roles(f: int, new_f: int) -> Roles:
    idx = torch.cat([torch.arange(f), torch.full((new_f - f,), -1)])
    return Roles.from_index(idx, f)


# ---------------------------------------------------------------------------------------------
# ffn_net2wider
# ---------------------------------------------------------------------------------------------
@dataclass
class FFNNet2WiderConfig(OpConfig):
    """Net2WiderNet on the FFN hidden units: d_ff F -> ``new_d_ff``.

    New unit u copies unit ``sources[u - F]`` (default: units drawn uniformly at random with
    ``seed``, as in Net2Net; ``sources=list(range(F))`` doubles every unit once, as in staged
    training / HyperCloning): incoming rows and biases copied (gate and up together), every
    copy's outgoing column = original / copy count. EXACT for any elementwise activation,
    also with ``noise > 0`` (zero-sum noise on the copies' outgoing columns, relative to each
    down weight's std). ``layers`` (None = all) selects the layers that get copies; the others
    get zero fan-out units so every layer keeps the config's single d_ff (exact too).

    Sources: Chen et al. 2016 (Net2Net); Chen et al. 2022 (bert2BERT); Shen et al. 2022
    (staged training); Wang et al. 2024 (HyperCloning).
    """

    name: ClassVar[str] = "ffn_net2wider"
    new_d_ff: int = 0
    sources: list[int] | None = None
    layers: list[int] | None = None
    noise: float = 0.0
    init_std: float = 0.02
    seed: int = 0


@register_operator(FFNNet2WiderConfig)
class FFNNet2Wider(Operator):
    exact = True

    def validate(self, model: nn.Module, config: OpConfig) -> None:
        if not isinstance(config, FFNNet2WiderConfig):
            raise GrowthConfigError("expected FFNNet2WiderConfig")
        ad = get_adapter(model)
        f = _validate_new_d_ff(ad, config.new_d_ff)
        _check_layers(config.layers, ad.dims().n_layers)
        if config.sources is not None:
            src = config.sources
            if not isinstance(src, (list, tuple)) or len(src) != config.new_d_ff - f:
                raise GrowthConfigError(
                    f"sources must list one old unit per new unit ({config.new_d_ff - f}), "
                    f"got {src!r}"
                )
            bad = [j for j in src if not isinstance(j, int) or not 0 <= j < f]
            if bad:
                raise GrowthConfigError(f"sources {bad} are not units; valid: 0..{f - 1}")
        if not config.noise >= 0:
            raise GrowthConfigError(f"noise must be >= 0, got {config.noise}")
        if not config.init_std >= 0:
            raise GrowthConfigError(f"init_std must be >= 0, got {config.init_std}")

    def apply(self, model: nn.Module, config: OpConfig, tx: Transaction) -> GrowthResult:
        if not isinstance(config, FFNNet2WiderConfig):
            raise GrowthConfigError("expected FFNNet2WiderConfig")
        ad = get_adapter(model)
        d = ad.dims()
        f, nf = d.d_ff, config.new_d_ff
        g = torch.Generator().manual_seed(config.seed)
        if config.sources is not None:
            src = torch.tensor(list(config.sources), dtype=torch.long)
        else:
            src = torch.randint(0, f, (nf - f,), generator=g)
        copies = Roles.from_index(torch.cat([torch.arange(f), src]), f)
        selected = _check_layers(config.layers, d.n_layers)
        others = [i for i in range(d.n_layers) if i not in selected]
        fresh = _fresh_roles(f, nf)
        per_layer = {i: copies for i in selected} | {i: fresh for i in others}
        plans = ffn_unit_plans(ad, per_layer)
        fills: dict[str, Fill] = {}
        rnd = normal_fill(config.init_std, g)
        for n in _incoming_names(ad, others):
            fills[n] = rnd if not n.endswith("bias") else zeros_fill
        post = {}
        if config.noise > 0:
            for i in selected:
                down = ad.layer(i).down
                post[down.weight_name] = _zero_sum_noise(
                    copies.index, 0 if down.transposed else 1, config.noise, g
                )
        maps = resize_params(tx, model, plans, fill=fills, post=post)
        ad.update_dims(tx, d_ff=nf)
        return GrowthResult(param_maps=maps, exact=True, notes={
            "d_ff": [f, nf], "copied_layers": selected, "zero_fanout_layers": others,
            "n_new_units": nf - f,
            "sources": src.tolist() if nf - f <= 64 else f"{nf - f} units (not logged)",
        })


def _zero_sum_noise(index: torch.Tensor, dim: int, std: float, g: torch.Generator) -> Any:
    """Post-function adding to each unit column (along ``dim``) noise whose sum over the copies
    of the same old unit is zero (units copied once get none)."""

    def f(t: torch.Tensor) -> torch.Tensor:
        tc = t.movedim(dim, 0)  # (F', ...)
        n_old = int(index.clamp(min=0).max()) + 1
        n = zero_sum_noise(index, n_old, tuple(tc.shape), 0, 1.0, g)
        n = n * std * (1.0 if t.is_meta else float(t.detach().double().std()))
        return (tc + n.to(device=t.device, dtype=t.dtype)).movedim(0, dim)

    return f


# ---------------------------------------------------------------------------------------------
# ffn_zero_fanout
# ---------------------------------------------------------------------------------------------
@dataclass
class FFNZeroFanoutConfig(OpConfig):
    """Add FFN units with random incoming rows (N(0, init_std^2), zero biases) and zero
    outgoing columns in every layer: d_ff F -> ``new_d_ff``.

    EXACT (the new units contribute ``0 * act(.)``); new coordinates are brand-new for the
    optimizer (m = 0, v set at the first gradient). Sources: docs/GROWTH-MATH.md (zero fan-out);
    related: Yao et al. 2023 (masked structural growth: new units start with zero
    contribution); Chen et al. 2016 (Net2Net, the copying alternative).
    """

    name: ClassVar[str] = "ffn_zero_fanout"
    new_d_ff: int = 0
    init_std: float = 0.02
    seed: int = 0


@register_operator(FFNZeroFanoutConfig)
class FFNZeroFanout(Operator):
    exact = True

    def validate(self, model: nn.Module, config: OpConfig) -> None:
        if not isinstance(config, FFNZeroFanoutConfig):
            raise GrowthConfigError("expected FFNZeroFanoutConfig")
        _validate_new_d_ff(get_adapter(model), config.new_d_ff)
        if not config.init_std >= 0:
            raise GrowthConfigError(f"init_std must be >= 0, got {config.init_std}")

    def apply(self, model: nn.Module, config: OpConfig, tx: Transaction) -> GrowthResult:
        if not isinstance(config, FFNZeroFanoutConfig):
            raise GrowthConfigError("expected FFNZeroFanoutConfig")
        ad = get_adapter(model)
        d = ad.dims()
        f, nf = d.d_ff, config.new_d_ff
        fresh = _fresh_roles(f, nf)
        layers = list(range(d.n_layers))
        plans = ffn_unit_plans(ad, {i: fresh for i in layers})
        rnd = normal_fill(config.init_std, torch.Generator().manual_seed(config.seed))
        fills: dict[str, Fill] = {
            n: (rnd if not n.endswith("bias") else zeros_fill) for n in _incoming_names(ad, layers)
        }
        maps = resize_params(tx, model, plans, fill=fills)
        ad.update_dims(tx, d_ff=nf)
        return GrowthResult(param_maps=maps, exact=True, notes={"d_ff": [f, nf]})


__all__ = ["FFNNet2WiderConfig", "FFNZeroFanoutConfig", "ffn_unit_plans"]
