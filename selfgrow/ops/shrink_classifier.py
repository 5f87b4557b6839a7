"""Shrink operator for feed-forward classifiers: remove hidden units / conv channels, the
inverse direction of Net2WiderNet (:mod:`selfgrow.ops.net2net`).

``"remove_units"`` (:class:`RemoveUnits`) works through the classifier adapters
(:mod:`selfgrow.adapters.classifier`), so it covers every family ``net2wider`` does:
selfgrow's GrowableMLP (hidden units ``hidden.<i>``) and GrowableCNN (output channels of
``blocks.<i>`` with their BatchNorm entries), a user's ``nn.Sequential`` MLP / CNN (a Linear
after a Flatten loses the ``H * W`` input columns of each removed channel), the
``features`` + ``classifier`` pattern of Avalanche's models and torchvision's ResNet (a
residual stream loses a channel in every tensor that writes or reads it).

A unit ``u`` is row ``u`` of every producer (the unit's Linear / Conv2d weight (n, ...) and
bias (n,), BatchNorm weight, bias, running_mean, running_var (n,)) and column ``u`` of every
consumer (the next layer's weight (d_out, n, ...), or its ``group = H * W`` columns
``[u * group, (u + 1) * group)`` after a Flatten). Removing it deletes those rows and
columns; the next layer's output changes by the removed units' contribution
``sum_u W_out[:, u] * a_u``, so the removal is EXACT when every removed unit's outgoing
weights are zero (units that were pruned to zero, or whose fan-out was zeroed), in train and
eval mode, for any activation; otherwise it is inexact and ``grow_`` measures the error.

The controller's ``"prune"`` action for classifiers resolves to this operator (see
:mod:`selfgrow.control.family_actions`).

Sources: S. Han, J. Pool, J. Tran, W. Dally, "Learning both Weights and Connections for
Efficient Neural Networks", NeurIPS 2015 (magnitude pruning); H. Li, A. Kadav, I. Durdanovic,
H. Samet, H. P. Graf, "Pruning Filters for Efficient ConvNets", ICLR 2017 (whole filters by
norm, the next layer's input channels removed with them); P. Molchanov, A. Mallya, S. Tyree,
I. Frosio, J. Kautz, "Importance Estimation for Neural Network Pruning", CVPR 2019 (Taylor
importance, a gradient criterion: not implemented here, the magnitude criterion needs no
gradients).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..adapters.classifier import Unit, sync_classifier_attrs
from ..core import ParamMap, Transaction
from ..errors import GrowthConfigError, IncompatibleModelError, choices_message
from ._registry import GrowthResult, OpConfig, Operator, register_operator
from .net2net import _as_int_tuple, _check_layer, _expand_group, _unit_edits, classifier_adapter
from .shrink import parse_indices

#: importance criteria of :class:`RemoveUnitsConfig`
CRITERIA = ("magnitude",)
#: per-layer removed units are listed in the event notes up to this many in all
_MAX_LOGGED = 64


def _tuples(v: Any) -> Any:
    """Lists (a JSON round trip) -> tuples, recursively; anything else unchanged."""
    if isinstance(v, (list, tuple)):
        return tuple(_tuples(x) for x in v)
    return v


@dataclass
class RemoveUnitsConfig(OpConfig):
    """Config of :class:`RemoveUnits`.

    Attributes:
        layer: index of the unit to shrink (see :func:`selfgrow.ops.net2net.list_units`:
            hidden layer ``hidden.<i>``, conv block ``blocks.<i>``, a hidden Linear / Conv2d
            of an ``nn.Sequential``, a ResNet stream), or a tuple of distinct indices.
        units: the units (hidden units / output channels) to remove: a tuple of indices for
            one layer, or one tuple per layer of ``layer`` (``layer=(0, 1)``,
            ``units=((3, 5), (0,))``). ``None``: choose ``n_remove`` by ``criterion``.
        n_remove: how many units to remove per layer, the least important by ``criterion``:
            an int (the same for every layer of ``layer``) or one per layer. Give ``units``
            or ``n_remove``, not both; at least one unit stays in every layer.
        criterion: ``"magnitude"``: unit ``u`` scores ``||W_in[u]|| * ||W_out[:, u]||``
            (L2 norms of its incoming weight row(s), kernels included, and of its outgoing
            columns over every consumer), times ``|gamma_u|`` when a BatchNorm follows (the
            L2 norm of the gammas on a ResNet stream written by several BatchNorms): the
            first-order size of the unit's contribution. Ties remove the lower index first.
            On a shape-only (meta) copy, as in ``estimate_growth``, there are no values: the
            LAST ``n_remove`` units are chosen (the sizes are the same whichever go).
    """

    name: ClassVar[str] = "remove_units"

    layer: int | tuple[int, ...] = 0
    units: tuple[int, ...] | tuple[tuple[int, ...], ...] | None = None
    n_remove: int | tuple[int, ...] = 0
    criterion: str = "magnitude"

    def __post_init__(self) -> None:
        # JSON round trips turn tuples into lists; invalid values are left to validate()
        self.layer = _tuples(self.layer)
        self.units = _tuples(self.units)
        self.n_remove = _tuples(self.n_remove)


def _index_list(v: Any, width: int, where: str) -> list[int]:
    """Unit indices of one layer (integer-likes, not bools), in range, distinct, leaving at
    least one unit."""
    u = parse_indices(v, width, "units", "unit", "remove_units", where)
    _check_count(len(u), width, where)
    return u


def _check_count(n: int, width: int, where: str) -> None:
    if not 0 < n < width:
        raise GrowthConfigError(
            f"remove_units: removing {n} of the {width} units of {where} is out of range; "
            f"valid: 1..{width - 1} (at least one unit stays)")


def _is_meta(unit: Unit) -> bool:
    r = unit.producers[0]
    return bool(getattr(r.module, r.attr).is_meta)


def _outgoing(unit: Unit) -> list[torch.Tensor]:
    """Every consumer weight of ``unit`` as (width, -1): row ``u`` holds unit ``u``'s
    outgoing weights (its ``group`` columns and kernels)."""
    out = []
    for r in unit.consumers:
        t = getattr(r.module, r.attr).detach()  # (d_out, width * group, *k)
        out.append(t.transpose(0, 1).reshape(unit.width, -1))
    return out


def importance(unit: Unit) -> torch.Tensor:
    """Magnitude importance of ``unit``'s coordinates, (width,) fp64:
    ``||W_in[u]|| * ||W_out[:, u]||`` times ``|gamma_u|`` where BatchNorm follows (see
    :class:`RemoveUnitsConfig`)."""
    w = unit.width
    sq_in = torch.zeros(w, dtype=torch.float64)
    sq_gamma: torch.Tensor | None = None
    for r in unit.producers:
        t = getattr(r.module, r.attr).detach().double().cpu()
        if isinstance(r.module, nn.modules.batchnorm._BatchNorm):
            if r.attr == "weight":
                sq_gamma = t.pow(2) if sq_gamma is None else sq_gamma + t.pow(2)
        elif r.main:
            sq_in += t.reshape(w, -1).pow(2).sum(1)
    sq_out = torch.zeros(w, dtype=torch.float64)
    for t in _outgoing(unit):
        sq_out += t.double().cpu().pow(2).sum(1)
    imp = sq_in.sqrt() * sq_out.sqrt()
    return imp if sq_gamma is None else imp * sq_gamma.sqrt()


def _per_layer(v: Any, layers: tuple[int, ...], field: str) -> list[Any]:
    """``units`` / ``n_remove`` as one entry per layer of ``layers``."""
    if field == "n_remove":
        if isinstance(v, (list, tuple)):
            if len(v) != len(layers):
                raise GrowthConfigError(f"remove_units: n_remove {v!r} must give one count per "
                                        f"layer of layer={layers}")
            return list(v)
        return [v] * len(layers)
    nested = isinstance(v, (list, tuple)) and len(v) > 0 and all(
        isinstance(x, (list, tuple)) for x in v)
    if nested and len(v) == len(layers):
        return list(v)
    if not nested and len(layers) == 1:
        return [v]
    raise GrowthConfigError(
        f"remove_units: units={v!r} must be a tuple of unit indices for one layer, or one "
        f"tuple per layer of layer={layers} (e.g. units=((3, 5), (0,)))")


def plan_removal(model: nn.Module, config: RemoveUnitsConfig
                 ) -> tuple[list[Unit], dict[int, torch.Tensor]]:
    """Validate ``config`` for ``model`` and return its units and, per shrunk layer, the
    KEPT unit indices (sorted LongTensor). Changes nothing.

    Raises:
        IncompatibleModelError: no classifier adapter understands the model.
        GrowthConfigError: see :class:`RemoveUnits`.
    """
    units = classifier_adapter(model).units()
    if not isinstance(config.criterion, str) or config.criterion not in CRITERIA:
        raise GrowthConfigError("remove_units: " + choices_message(
            "criterion", config.criterion, CRITERIA))
    layers = _as_int_tuple(config.layer, "layer")
    if len(set(layers)) != len(layers):
        raise GrowthConfigError(f"remove_units: layer {layers} lists a layer twice")
    for i in layers:
        _check_layer(i, units)
    keep: dict[int, torch.Tensor] = {}
    if config.units is not None:
        if config.n_remove not in (0, None):
            raise GrowthConfigError("remove_units: give units or n_remove, not both")
        for i, u in zip(layers, _per_layer(config.units, layers, "units"), strict=True):
            w = units[i].width
            gone = set(_index_list(u, w, units[i].name))
            keep[i] = torch.tensor([j for j in range(w) if j not in gone], dtype=torch.long)
        return units, keep
    counts = _per_layer(config.n_remove, layers, "n_remove")
    for i, n in zip(layers, counts, strict=True):
        if isinstance(n, bool) or not isinstance(n, int):
            raise GrowthConfigError(f"remove_units: n_remove={n!r} must be an integer (or "
                                    f"give units)")
        _check_count(n, units[i].width, units[i].name)
    for i, n in zip(layers, counts, strict=True):
        w = units[i].width
        if _is_meta(units[i]):  # shape-only copy: which units go does not change the sizes
            keep[i] = torch.arange(w - n)
            continue
        drop = importance(units[i]).argsort(stable=True)[:n]  # ties: the lower index first
        mask = torch.ones(w, dtype=torch.bool)
        mask[drop] = False
        keep[i] = mask.nonzero().flatten()
    return units, keep


def removed_fanout_is_zero(units: list[Unit], keep: dict[int, torch.Tensor]) -> bool:
    """Whether every unit outside ``keep`` has all-zero outgoing weights (the removal is then
    exact); False on a shape-only (meta) copy, which has no values to check."""
    for i, k in keep.items():
        if _is_meta(units[i]):
            return False
        mask = torch.ones(units[i].width, dtype=torch.bool)
        mask[k] = False
        for t in _outgoing(units[i]):
            if bool(t[mask.to(t.device)].ne(0).any()):
                return False
    return True


@register_operator(RemoveUnitsConfig)
class RemoveUnits(Operator):
    """Remove hidden units / conv output channels of a classifier (structured pruning; the
    inverse direction of Net2WiderNet).

    For a unit of width ``n`` keeping the sorted indices ``k`` (``n' = len(k)``):

    * every producer (Linear / Conv2d ``weight`` (n, ...), ``bias`` (n,), BatchNorm
      ``weight``, ``bias``, ``running_mean``, ``running_var`` (n,)) -> rows ``W[k]``,
      shape (n', ...);
    * every consumer (the next Linear / Conv2d ``weight`` (d_out, n, ...); a Linear after a
      Flatten (d_out, n * H * W) keeps the ``H * W`` columns of each kept channel) -> columns
      ``W[:, k]``, shape (d_out, n', ...).

    The model's config (GrowableMLP ``hidden``, GrowableCNN ``channels``) or its modules'
    size attributes (``nn.Sequential``, ResNet) are rewritten, so ``build_model(model.config)``
    and checkpoints rebuild the shrunk architecture.

    Exactness: EXACT (outputs equal up to round-off, train and eval mode, any elementwise
    activation) when every removed unit's outgoing weights are zero: ``is_exact`` checks the
    weights. Otherwise inexact: the output loses ``sum_u W_out[:, u] a_u`` and ``grow_``
    measures the error on its probe.

    Optimizer: every kept coordinate keeps its state bit-identically (``ParamMap`` with the
    kept indices, ``grad_scale = 1``); removed coordinates' state is dropped; accumulated
    gradients follow the same map.

    Raises:
        IncompatibleModelError: no classifier adapter understands the model.
        GrowthConfigError: a layer out of range or listed twice, units out of range,
            repeated, not integers or removing every unit of a layer, ``n_remove`` out of
            ``1..width - 1``, both ``units`` and ``n_remove`` given, per-layer tuples whose
            lengths do not match ``layer``, or an unknown criterion (all raised before any
            change, naming the bad value and the valid range or choices).
    """

    shrinks = True

    exact = False
    #: the adapter kind this operator works on (registry-generated tests use it)
    adapter_kind: ClassVar[str] = "classifier"

    def is_exact(self, model: nn.Module, config: OpConfig) -> bool:
        if not isinstance(config, RemoveUnitsConfig):
            return False
        try:
            units, keep = plan_removal(model, config)
        except (GrowthConfigError, IncompatibleModelError):
            return False
        return removed_fanout_is_zero(units, keep)

    def validate(self, model: nn.Module, config: OpConfig) -> None:
        if not isinstance(config, RemoveUnitsConfig):
            raise GrowthConfigError(f"expected RemoveUnitsConfig, got {type(config).__name__}")
        plan_removal(model, config)

    def apply(self, model: nn.Module, config: OpConfig, tx: Transaction) -> GrowthResult:
        if not isinstance(config, RemoveUnitsConfig):
            raise GrowthConfigError(f"expected RemoveUnitsConfig, got {type(config).__name__}")
        ad = classifier_adapter(model)
        units, keep = plan_removal(model, config)
        exact = removed_fanout_is_zero(units, keep)
        widths = tuple(u.width for u in units)

        edits = _unit_edits(units, keep, widths)

        maps: dict[str, ParamMap] = {}
        for name, e in edits.items():
            t = getattr(e.ref_module, e.attr).detach()
            index: list[torch.Tensor | None] = [None] * t.dim()
            if e.cols is not None:
                cols = _expand_group(e.cols, e.group)
                t = t.index_select(1, cols.to(t.device))
                index[1] = cols
            if e.rows is not None:
                t = t.index_select(0, e.rows.to(t.device))
                index[0] = e.rows
            if e.is_buffer:
                tx.set_buffer(e.ref_module, e.attr, t.contiguous())
            else:
                tx.set_parameter(e.ref_module, e.attr, t.contiguous())
                maps[name] = ParamMap(source=name, index=tuple(index))

        new_widths = tuple(int(keep[i].numel()) if i in keep else w
                           for i, w in enumerate(widths))
        sync_classifier_attrs(tx, model)
        ad.after_widen(tx, new_widths)  # the family's config hook (any width change)
        removed = {i: sorted(set(range(widths[i])) - set(k.tolist())) for i, k in keep.items()}
        n_gone = sum(len(v) for v in removed.values())
        return GrowthResult(param_maps=maps, exact=exact, notes={
            "units": [units[i].name for i in sorted(keep)],
            "widths_before": list(widths), "widths_after": list(new_widths),
            "criterion": config.criterion if config.units is None else None,
            "removed": removed if n_gone <= _MAX_LOGGED else f"{n_gone} units (not logged)"})


__all__ = ["CRITERIA", "RemoveUnits", "RemoveUnitsConfig", "importance", "plan_removal",
           "removed_fanout_is_zero"]
