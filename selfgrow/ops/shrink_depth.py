"""Shrink operator for depth: remove whole transformer blocks.

A block adds its residual branches to the stream: pre-LN ``h + attn(norm1(h))`` then
``+ ffn(norm2(.))``, whose writes are the attention output projection ``o`` and the FFN down
projection ``down`` (weights and biases); selfgrow's GrowableTransformer also has a depth
mask ramp m, ``h <- h + m (block(h) - h)``.

``remove_layers``: drop blocks, the others keep their order (and their module objects).
EXACT when every removed block contributes nothing (``is_exact`` checks the weights):

* its ramp is 0 (selfgrow GrowableTransformer, any norm placement), or
* the model is pre-LN and the block's ``o`` and ``down`` weights AND biases are all zero,
  as after ``identity_insert`` / ``function_preserving_stack`` of :mod:`selfgrow.ops.depth`
  (a pre-LN block is then an identity).

* the model is post-LN without a ramp (HF BERT, post-LN ``nn.TransformerEncoder``) and the
  removed blocks undo a **norm transfer** (the inverse of the depth operators' post-LN
  identity, :mod:`selfgrow.ops.depth`): for each run of consecutive removed blocks, the norm
  that wrote the stream before the run (the previous block's norm2, or the embedding norm
  before block 0) has gain 1 and bias 0, every block of the run has zero output projections
  and norm1 (1, 0), all but its last norm2 (1, 0); the last block's norm2 (g, b) then moves
  into that preceding norm. The run computed ``g * norm(norm(n)) + b`` of the normalised
  ``n``, equal to ``g * n + b`` up to ``O(eps)`` (the bound of the depth module docstring), so
  this is claimed exact for ``eps <= 1e-9`` (BERT's 1e-12) and measured otherwise.

Any other post-LN block ends with a norm, so even with zero output projections it is
``norm2(norm1(h))``, not ``h``: its removal is inexact and the error is measured.

Blocks are given explicitly (``layers``) or chosen as the ``n_remove`` with the smallest
weight-based residual-contribution proxy (``criterion="residual"``):
``m * (|o|_F |v|_F + |b_o| + |down|_F |up|_F (|gate|_F when gated) + |b_down|)``, fp64,
``m`` the ramp (1 without one): zero for a block that writes nothing, the first-order size of
what the branches can add to the stream otherwise; ties remove the lower index first.
Sources: Fan et al. 2019 (LayerDrop: a network trained with layer dropout can be pruned to a
sub-network at inference); Gromov et al. 2024 ("The Unreasonable Ineffectiveness of the
Deeper Layers": whole blocks, chosen by how little they change the stream, can be removed).

Optimizer state: every kept block's parameters keep their state bit-identical (a block that
moves from index i to j is mapped by name, ``ParamMap(source="<layers>.i.<p>")``); the
removed blocks' state is dropped; a norm that receives a transferred (g, b) takes the state
of the norm it came from (the inverse of the depth operators' mapping). The family config's
layer count is rewritten (through ``set_layers``), so a model built from the config loads
the state dict. At least one block stays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..adapters import NormRef, TransformerAdapter, get_adapter, set_param
from ..core import Transaction
from ..errors import GrowthConfigError, IncompatibleModelError, choices_message
from ..optim import ParamMap
from ._registry import GrowthResult, OpConfig, Operator, register_operator
from .depth import NORM_TRANSFER_EXACT_EPS, Slot, rebuild_stack
from .shrink import check_n_remove, parse_indices

OP = "remove_layers"
CRITERIA = ("residual",)


@dataclass
class RemoveLayersConfig(OpConfig):
    """Remove whole transformer blocks: ``layers`` (block indices) or the ``n_remove`` with
    the smallest residual-contribution proxy (``criterion="residual"``: ramp times
    ``|o| |v| + |b_o| + |down| |up| (|gate|) + |b_down|``, Frobenius norms). EXACT when every
    removed block has ramp 0, or the model is pre-LN and the block's attention output and FFN
    down projections (weights and biases) are zero, or (post-LN without a ramp, norm eps <=
    1e-9) the removed blocks undo a norm transfer, whose (g, b) moves back into the preceding
    norm (module docstring); otherwise inexact (the error is measured). At least one block
    stays; kept blocks keep their optimizer state bit-identical. Sources: Fan et al. 2019
    (LayerDrop); Gromov et al. 2024 (pruning the deeper layers).
    """

    name: ClassVar[str] = "remove_layers"
    layers: tuple[int, ...] | None = None
    n_remove: int = 0
    criterion: str = "residual"


def _ramp(ad: TransformerAdapter, i: int) -> torch.Tensor | None:
    """The depth mask ramp buffer of block ``i`` (families with ``supports_ramp``), or None."""
    if not ad.supports_ramp:
        return None
    r = getattr(ad.layers()[i], "ramp", None)
    return r if isinstance(r, torch.Tensor) else None


def residual_score(ad: TransformerAdapter, i: int) -> float:
    """Block ``i``'s residual-contribution proxy (see the module docstring), fp64."""
    lv = ad.layer(i)

    def norm(t: torch.Tensor | None) -> float:
        return 0.0 if t is None else float(t.double().norm())

    attn = norm(lv.o.weight()) * norm(lv.v.weight()) + norm(lv.o.bias())
    ffn = norm(lv.down.weight()) * norm(lv.up.weight())
    if lv.gate is not None:
        ffn *= norm(lv.gate.weight())
    ffn += norm(lv.down.bias())
    r = _ramp(ad, i)
    return (1.0 if r is None else abs(float(r))) * (attn + ffn)


def _is_meta(ad: TransformerAdapter) -> bool:
    return bool(ad.layer(0).o.raw_weight().is_meta) if ad.dims().n_layers else False


def _removal(model: nn.Module, config: RemoveLayersConfig) -> list[int]:
    """The kept blocks (sorted old indices); validates everything first."""
    ad = get_adapter(model)
    ad.check()
    if config.criterion not in CRITERIA:
        raise GrowthConfigError(f"{OP}: " + choices_message("criterion", config.criterion,
                                                            CRITERIA))
    n = ad.dims().n_layers
    if config.layers is not None:
        gone = parse_indices(config.layers, n, "layers", "layer", OP)
        if config.n_remove != 0:
            raise GrowthConfigError(f"{OP}: give layers or n_remove, not both")
        k = len(gone)
    else:
        k = check_n_remove(config.n_remove, OP)
    if not 0 < k < n:
        raise GrowthConfigError(f"{OP}: removing {k} of n_layers={n} blocks is out of range; "
                                f"valid: 1..{n - 1} (at least one block stays)")
    if config.layers is None:
        if _is_meta(ad):  # a shape-only copy (estimate_growth): which blocks go does not matter
            scores = torch.zeros(n, dtype=torch.float64)
        else:
            scores = torch.tensor([residual_score(ad, i) for i in range(n)], dtype=torch.float64)
        gone = scores.argsort(stable=True)[:k].tolist()  # ties: the lower index first
    return [i for i in range(n) if i not in set(gone)]


def _block_is_dead(ad: TransformerAdapter, i: int) -> bool:
    """Block ``i`` adds nothing to the stream: ramp 0, or pre-LN with zero output
    projections (weights and biases)."""
    r = _ramp(ad, i)
    if r is not None and bool(r.eq(0).all()):
        return True
    return ad.dims().norm_first and _outs_zero(ad, i)


def _runs(idx: list[int]) -> list[list[int]]:
    """Maximal runs of consecutive indices of the sorted list ``idx``."""
    out: list[list[int]] = []
    for i in idx:
        if out and out[-1][-1] == i - 1:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def _unit(nr: NormRef) -> bool:
    """The norm has gain 1 and bias 0 (or no bias)."""
    b = getattr(nr.module, "bias", None)
    return bool(nr.module.weight.detach().eq(1).all()) and (
        b is None or bool(b.detach().eq(0).all()))


def _outs_zero(ad: TransformerAdapter, i: int) -> bool:
    for ref in ad.layer(i).out_projections():
        for t in (ref.raw_weight(), ref.raw_bias()):
            if t is not None and bool(t.detach().ne(0).any()):
                return False
    return True


def _transfers(ad: TransformerAdapter, keep: list[int]) -> list[tuple[NormRef, NormRef]]:
    """``(preceding norm, last removed norm2)`` of every removed run that undoes a post-LN
    norm transfer (see the module docstring); empty for pre-LN, ramp families and meta
    copies."""
    d = ad.dims()
    if d.norm_first or ad.supports_ramp or _is_meta(ad):
        return []
    gone = [i for i in range(d.n_layers) if i not in set(keep)]
    out = []
    for run in _runs(gone):
        prev = ad.layer(run[0] - 1).norm2 if run[0] > 0 else ad.embed_norm()
        if prev is None or not _unit(prev):
            continue
        if all(_outs_zero(ad, i) and _unit(ad.layer(i).norm1) for i in run) and all(
                _unit(ad.layer(i).norm2) for i in run[:-1]):
            out.append((prev, ad.layer(run[-1]).norm2))
    return out


def _removed_are_dead(ad: TransformerAdapter, keep: list[int]) -> bool:
    """Whether the removal is exact: every removed block contributes nothing, or (post-LN
    without a ramp, eps <= 1e-9) every removed run undoes a norm transfer; False on a
    shape-only (meta) copy, which has no values to check."""
    if _is_meta(ad):
        return False
    gone = [i for i in range(ad.dims().n_layers) if i not in set(keep)]
    if all(_block_is_dead(ad, i) for i in gone):
        return True
    return (ad.dims().norm_eps <= NORM_TRANSFER_EXACT_EPS
            and len(_transfers(ad, keep)) == len(_runs(gone)))


def _new_path(path: str, lp: str, keep: list[int]) -> str:
    """Module path of a kept block's submodule after the removal (its index shifts)."""
    if not path.startswith(lp + "."):
        return path  # embedding norm
    i_str, _, tail = path[len(lp) + 1:].partition(".")
    return f"{lp}.{keep.index(int(i_str))}.{tail}"


@register_operator(RemoveLayersConfig)
class RemoveLayers(Operator):
    shrinks = True
    exact = False

    def is_exact(self, model: nn.Module, config: OpConfig) -> bool:
        if not isinstance(config, RemoveLayersConfig):
            return False
        try:
            keep = _removal(model, config)
        except (GrowthConfigError, IncompatibleModelError):
            return False
        return _removed_are_dead(get_adapter(model), keep)

    def validate(self, model: nn.Module, config: OpConfig) -> None:
        if not isinstance(config, RemoveLayersConfig):
            raise GrowthConfigError("expected RemoveLayersConfig")
        _removal(model, config)

    def apply(self, model: nn.Module, config: OpConfig, tx: Transaction) -> GrowthResult:
        if not isinstance(config, RemoveLayersConfig):
            raise GrowthConfigError("expected RemoveLayersConfig")
        keep = _removal(model, config)
        ad = get_adapter(model)
        n = ad.dims().n_layers
        exact = _removed_are_dead(ad, keep)
        transfers = _transfers(ad, keep)
        lp = ad.layers_path
        res = rebuild_stack(model, ad, tx, [Slot(i) for i in keep])
        for prev, src in transfers:  # the run's last norm2 (g, b) goes to the preceding norm
            dst = _new_path(prev.path, lp, keep)
            set_param(tx, model, f"{dst}.weight", src.module.weight.detach().clone())
            res.param_maps[f"{dst}.weight"] = ParamMap(source=src.weight_name)
            if prev.bias_name is not None and src.bias_name is not None:
                set_param(tx, model, f"{dst}.bias", src.module.bias.detach().clone())
                res.param_maps[f"{dst}.bias"] = ParamMap(source=src.bias_name)
        res.exact = exact
        res.notes = {"n_layers": [n, len(keep)], "removed": [i for i in range(n)
                                                             if i not in set(keep)],
                     "criterion": config.criterion if config.layers is None else None,
                     "norm_transfer": [[p.path, s.path] for p, s in transfers]}
        return res


__all__ = ["RemoveLayersConfig", "residual_score"]
