"""Net2Net growth operators for feed-forward classifiers: selfgrow's GrowableMLP /
GrowableCNN, a user's ``nn.Sequential`` MLP or CNN, and torchvision's ResNet family.

Source: T. Chen, I. Goodfellow, J. Shlens, "Net2Net: Accelerating Learning via Knowledge
Transfer", ICLR 2016 (Net2WiderNet, Net2DeeperNet); zero-initialised residual blocks:
P. Goyal et al., "Accurate, Large Minibatch SGD", 2017. Optimizer-state rule for copies:
staged training (Shen et al. 2022), see docs/GROWTH-MATH.md and :mod:`selfgrow.optim`.

Both operators work through the classifier adapters (:mod:`selfgrow.adapters.classifier`):
a model is a chain of units, each written by producer tensors (rows) and read by consumer
tensors (input columns). The controller's ``"widen"``, ``"deepen"`` and ``"widen_layers"``
actions for these families live in :mod:`selfgrow.control.family_actions`.

* ``"net2wider"`` (:class:`Net2WiderNet`): widen units by copying existing ones; exact in eval
  mode when ``noise_std == 0``.
* ``"net2deeper"`` (:class:`Net2DeeperNet`): insert an identity layer / block; exact in eval
  mode.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..adapters import get_adapter
from ..adapters.classifier import ClassifierAdapter, Unit, sync_classifier_attrs
from ..core import ParamMap, Transaction, zero_sum_noise
from ..errors import GrowthConfigError, IncompatibleModelError
from ._registry import GrowthResult, OpConfig, Operator, check_allocation, register_operator


def classifier_adapter(model: nn.Module) -> ClassifierAdapter:
    """The classifier adapter of ``model``.

    Raises:
        IncompatibleModelError: no classifier family matches (names the supported ones and
            how to add one).
    """
    return get_adapter(model, kind="classifier")


def list_units(model: nn.Module) -> list[str]:
    """Names of the widenable units of a classifier, in order (their indices are the
    ``layer`` of :class:`Net2WiderConfig`)."""
    return [u.name for u in classifier_adapter(model).units()]


def hidden_widths(model: nn.Module) -> tuple[int, ...]:
    """Widths of the classifier's units (hidden units / channels / stream channels)."""
    return classifier_adapter(model).widths()


def _check_layer(layer: int, units: list[Unit]) -> None:
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(units):
        raise GrowthConfigError(
            f"layer {layer!r} out of range; valid: 0..{len(units) - 1} "
            f"({', '.join(u.name for u in units)})"
        )


def _as_int_tuple(v: int | Sequence[int], field: str) -> tuple[int, ...]:
    if isinstance(v, int):
        items: tuple = (v,)
    elif isinstance(v, (tuple, list)):
        items = tuple(v)
    else:
        items = ()
    if not items or any(isinstance(x, bool) or not isinstance(x, int) for x in items):
        raise GrowthConfigError(f"{field} must be an int or a non-empty tuple of ints, got {v!r}")
    return items


def _copy_index(old: int, new: int, gen: torch.Generator) -> torch.Tensor:
    """Net2Net replication map ``g``: (new,) LongTensor; ``g[j] = j`` for ``j < old``, the
    other entries are randomly chosen existing units, without replacement while possible
    (so copy counts differ by at most one)."""
    extra = new - old
    reps = -(-extra // old)
    picks = torch.cat([torch.randperm(old, generator=gen) for _ in range(reps)])[:extra]
    return torch.cat([torch.arange(old), picks])


def _copy_counts(idx: torch.Tensor, old: int) -> torch.Tensor:
    """(old,) float64: how many positions of ``idx`` copy each old unit."""
    return torch.bincount(idx, minlength=old).to(torch.float64)


def _split_outgoing(
    w: torch.Tensor,
    idx: torch.Tensor,
    counts: torch.Tensor,
    split_noise: float = 0.0,
    gen: torch.Generator | None = None,
    group: int = 1,
) -> torch.Tensor:
    """Outgoing weights of the widened layer: ``w`` (out, old, *k) -> (out, new, *k) with
    column ``j`` = ``w[:, idx[j]] * share[:, j]``; ``share = 1/counts[idx[j]]`` (every copy,
    original included, carries an equal share of the unit's output) plus, when
    ``split_noise > 0``, noise of shape (out, new) centred over each unit's copies so that
    every unit's shares still sum to 1 per output row (exact)."""
    share = (1.0 / counts[idx]).view(1, -1).expand(w.shape[0], -1)
    if split_noise > 0:
        share = share + zero_sum_noise(
            idx, counts.numel(), tuple(share.shape), 1, split_noise, gen
        )
    if group > 1:  # a Linear after Flatten: each unit spans ``group`` input columns
        share = share.repeat_interleave(group, dim=1)
    shape = [w.shape[0], -1] + [1] * (w.dim() - 2)
    scale = share.to(device=w.device, dtype=w.dtype).reshape(shape)
    cols = _expand_group(idx, group)
    return w.index_select(1, cols.to(w.device)) * scale


def _renamed_maps(
    old_named: dict[str, nn.Parameter], new_named: dict[str, nn.Parameter]
) -> dict[str, ParamMap]:
    """ParamMaps after a layer insertion: moved parameters (same object, new name) follow their
    old name; parameters that did not exist before get fresh state."""
    old_by_id = {id(p): n for n, p in old_named.items()}
    maps: dict[str, ParamMap] = {}
    for name, p in new_named.items():
        src = old_by_id.get(id(p))
        if src is None:
            maps[name] = ParamMap(source=None)
        elif src != name:
            maps[name] = ParamMap(source=src)
    return maps


# ---------------------------------------------------------------------------------------------
# Net2WiderNet
# ---------------------------------------------------------------------------------------------
@dataclass
class Net2WiderConfig(OpConfig):
    """Config of :class:`Net2WiderNet`.

    Attributes:
        layer: index of the unit to widen (see :func:`list_units`: a hidden layer
            ``hidden.<i>`` / conv block ``blocks.<i>`` of selfgrow's models, a hidden
            Linear / Conv2d of an ``nn.Sequential``, a residual stream of a ResNet), or a tuple
            of indices to widen several at once.
        new_width: the layer's width after growth (units / channels), one per ``layer``;
            must exceed the current width.
        noise_std: std of Gaussian noise added to the incoming weights of the new copies to
            break symmetry; 0 (default) keeps the operator exact, > 0 makes it inexact.
        split_noise: symmetry breaking that stays EXACT: the outgoing weight of every copy of
            a unit is its share ``1/c`` plus centred Gaussian noise of this std, drawn per
            (output, copy) and re-centred so the shares of each unit's copies still sum to 1
            for every output (the copies have identical activations, so the sum is what the
            next layer sees). Twins then receive different gradients and separate.
        seed: seed of the choice of units to copy and of the noise.
    """

    name: ClassVar[str] = "net2wider"

    layer: int | tuple[int, ...] = 0
    new_width: int | tuple[int, ...] = 0
    noise_std: float = 0.0
    seed: int = 0
    split_noise: float = 0.0

    def targets(self) -> dict[int, int]:
        """``{layer: new_width}`` (validated types and lengths)."""
        layers = _as_int_tuple(self.layer, "layer")
        widths = _as_int_tuple(self.new_width, "new_width")
        if len(layers) != len(widths):
            raise GrowthConfigError(
                f"layer {layers} and new_width {widths} must have the same length"
            )
        if len(set(layers)) != len(layers):
            raise GrowthConfigError(f"layer {layers} lists a layer twice")
        return dict(zip(layers, widths, strict=True))


@dataclass
class _Edit:
    """One tensor of the grown model: gather rows (its own units) and/or columns (inputs)."""

    ref_module: nn.Module
    attr: str
    is_buffer: bool = False
    rows: torch.Tensor | None = None
    row_old: int = 0
    cols: torch.Tensor | None = None
    col_old: int = 0
    group: int = 1
    noise: bool = False


def _unit_edits(units: list[Unit], idx: dict[int, torch.Tensor], widths: tuple[int, ...],
                noise: bool = False) -> dict[str, _Edit]:
    """``{tensor name: _Edit}`` gathering, for every unit ``i`` in ``idx``, its producers'
    rows and its consumers' columns by ``idx[i]`` (old indices, new order); ``noise`` marks
    the producers' main weights for Net2WiderNet's symmetry noise."""
    edits: dict[str, _Edit] = {}
    for i, g in idx.items():
        for r in units[i].producers:
            e = edits.setdefault(r.name, _Edit(r.module, r.attr, r.is_buffer))
            e.rows, e.row_old, e.noise = g, widths[i], noise and r.main
        for r in units[i].consumers:
            e = edits.setdefault(r.name, _Edit(r.module, r.attr, r.is_buffer))
            e.cols, e.col_old, e.group = g, widths[i], r.group
    return edits


def _expand_group(idx: torch.Tensor, group: int) -> torch.Tensor:
    """Column index of a consumer whose unit coordinate ``u`` spans columns
    ``[u * group, (u + 1) * group)`` (a Linear after Flatten): (new * group,)."""
    if group == 1:
        return idx
    return (idx.view(-1, 1) * group + torch.arange(group).view(1, -1)).flatten()


@register_operator(Net2WiderConfig)
class Net2WiderNet(Operator):
    """Net2WiderNet (Chen, Goodfellow, Shlens 2016): widen units by copying existing ones.

    For a unit with old width ``n`` and new width ``n'``, a replication map
    ``g: [0, n') -> [0, n)`` (identity on the first ``n`` positions, random existing units
    beyond) defines, with ``c_j = |{k : g(k) = j}|``:

    * every producer (Linear / Conv2d ``weight`` (n, ...) and ``bias`` (n,), BatchNorm
      ``weight``, ``bias``, ``running_mean``, ``running_var`` (n,)) -> rows ``W[g]``, shape
      (n', ...);
    * every consumer (the next Linear / Conv2d ``weight`` (d_out, n, ...); a Linear after a
      Flatten (d_out, n * H * W) reads ``H * W`` columns per channel) -> input columns
      ``W[:, g(k)] / c_{g(k)}``, shape (d_out, n', ...).

    GrowableMLP / GrowableCNN: units ``hidden.<i>`` / ``blocks.<i>``; ``nn.Sequential``: every
    hidden Linear / Conv2d (with the BatchNorm after it); torchvision ResNet: residual
    streams, widened through the stem or the downsample conv + BN, every block's last conv +
    BN (producers), every block's ``conv1``, the next stage's downsample and ``fc``
    (consumers).

    Exactness: exact (outputs equal up to round-off) for any elementwise activation when
    ``noise_std == 0``, in eval mode; with BatchNorm also in train mode (twin channels have
    equal batch statistics); ``split_noise`` keeps it exact. ``noise_std > 0`` perturbs the
    new copies' incoming weights and is not exact.

    Optimizer: copied rows get ``ParamMap(grad_scale=1/c)`` (each twin receives 1/c of the
    unit's gradient, so Adam ``m' = m/c``, ``v' = v/c**2``); divided columns get
    ``grad_scale=1`` (their gradient equals the source column's).

    Raises:
        IncompatibleModelError: no classifier adapter understands the model.
        GrowthConfigError: layer out of range, new_width not larger than the current width,
            negative noise, or the grown tensors exceed the memory available (all raised
            before any change).
    """

    exact = True
    #: the adapter kind this operator works on (registry-generated tests use it)
    adapter_kind: ClassVar[str] = "classifier"

    def is_exact(self, model: nn.Module, config: OpConfig) -> bool:
        return isinstance(config, Net2WiderConfig) and config.noise_std == 0

    def validate(self, model: nn.Module, config: OpConfig) -> None:
        if not isinstance(config, Net2WiderConfig):
            raise GrowthConfigError(f"expected Net2WiderConfig, got {type(config).__name__}")
        units = classifier_adapter(model).units()
        targets = config.targets()
        for layer, new in targets.items():
            _check_layer(layer, units)
            if new <= units[layer].width:
                raise GrowthConfigError(
                    f"new_width {new} for {units[layer].name} must exceed its current width "
                    f"{units[layer].width} (Net2WiderNet only grows)"
                )
        for field_name in ("noise_std", "split_noise"):
            noise = getattr(config, field_name)
            if isinstance(noise, bool) or not isinstance(noise, (int, float)):
                raise GrowthConfigError(f"{field_name} must be a float, got {noise!r}")
            if not (math.isfinite(noise) and noise >= 0):
                raise GrowthConfigError(f"{field_name} must be finite and >= 0, got {noise}")
        if isinstance(config.seed, bool) or not isinstance(config.seed, int) or config.seed < 0:
            raise GrowthConfigError(f"seed must be an int >= 0, got {config.seed!r}")
        check_allocation(model, self.new_bytes(units, targets), "net2wider")

    @staticmethod
    def new_bytes(units: list[Unit], targets: dict[int, int]) -> int:
        """Bytes of the grown tensors (computed from shapes only, before any allocation)."""
        total = 0
        for i, new in targets.items():
            u = units[i]
            for r in (*u.producers, *u.consumers):
                t = getattr(r.module, r.attr)
                total += (t.numel() // max(u.width, 1)) * new * t.element_size()
        return total

    def apply(self, model: nn.Module, config: OpConfig, tx: Transaction) -> GrowthResult:
        if not isinstance(config, Net2WiderConfig):
            raise GrowthConfigError(f"expected Net2WiderConfig, got {type(config).__name__}")
        ad = classifier_adapter(model)
        units = ad.units()
        targets = config.targets()
        widths = tuple(u.width for u in units)
        gen = torch.Generator().manual_seed(config.seed)
        idx = {i: _copy_index(widths[i], targets[i], gen) for i in sorted(targets)}

        edits = _unit_edits(units, idx, widths, noise=True)

        maps: dict[str, ParamMap] = {}
        for name, e in edits.items():
            t = getattr(e.ref_module, e.attr).detach()
            index: list[torch.Tensor | None] = [None] * t.dim()
            grad_scale: float | torch.Tensor = 1.0
            if e.cols is not None:
                t = _split_outgoing(
                    t, e.cols, _copy_counts(e.cols, e.col_old), config.split_noise, gen, e.group
                )
                index[1] = _expand_group(e.cols, e.group)
            if e.rows is not None:
                t = t.index_select(0, e.rows.to(t.device))
                index[0] = e.rows
                inv = 1.0 / _copy_counts(e.rows, e.row_old)[e.rows]
                grad_scale = inv.to(t.dtype).view(-1, *([1] * (t.dim() - 1)))
                if e.noise and config.noise_std > 0:
                    noise = torch.randn(t[e.row_old :].shape, generator=gen, dtype=torch.float64)
                    t = t.clone()
                    t[e.row_old :] += config.noise_std * noise.to(t.device, t.dtype)
            if e.is_buffer:
                tx.set_buffer(e.ref_module, e.attr, t.contiguous())
            else:
                tx.set_parameter(e.ref_module, e.attr, t.contiguous())
                maps[name] = ParamMap(source=name, index=tuple(index), grad_scale=grad_scale)

        new_widths = tuple(targets.get(i, w) for i, w in enumerate(widths))
        sync_classifier_attrs(tx, model)
        ad.after_widen(tx, new_widths)
        return GrowthResult(
            param_maps=maps,
            exact=config.noise_std == 0,
            notes={"units": [units[i].name for i in sorted(targets)],
                   "widths_before": list(widths), "widths_after": list(new_widths)},
        )


# ---------------------------------------------------------------------------------------------
# Net2DeeperNet (identity insertion)
# ---------------------------------------------------------------------------------------------
@dataclass
class Net2DeeperConfig(OpConfig):
    """Config of :class:`Net2DeeperNet`.

    Attributes:
        layer: insert the new identity layer right after unit ``layer`` (selfgrow models and
            ``nn.Sequential``: right after it and its activation, later layers shift by one;
            ResNet: an identity block appended to the last stage writing stream ``layer``).
        seed: seed of the fresh weights of an inserted ResNet block (its residual branch
            outputs zero whatever they are).
    """

    name: ClassVar[str] = "net2deeper"

    layer: int = 0
    seed: int = 0


@register_operator(Net2DeeperConfig)
class Net2DeeperNet(Operator):
    """Net2DeeperNet (Chen, Goodfellow, Shlens 2016): insert an identity layer after a unit.

    * GrowableMLP (activation ``"relu"``) and ``nn.Sequential`` MLPs (unit followed by ReLU):
      ``Linear(h, h)`` with ``weight = I`` (h, h), ``bias = 0`` (h,), then ReLU. Exact: its
      input is post-ReLU, hence non-negative, and ``relu(I x) = x`` for ``x >= 0``.
    * GrowableCNN and ``nn.Sequential`` CNNs: ``Conv2d(C, C, k, padding=k//2)`` with an
      identity kernel (``weight[c, c, k//2, k//2] = 1``; zero bias when it has one),
      BatchNorm as identity (``running_mean = 0``, ``running_var = 1 - eps``, ``gamma = 1``,
      ``beta = 0``) where the unit has one, ReLU. Exact in eval mode (BN uses running
      statistics).
    * torchvision ResNet: a block of the stage's architecture (no downsample) appended to the
      stage, with its last BatchNorm's gain and bias zero: the residual branch outputs 0 and
      ``relu(0 + x) = x`` (the stream is post-ReLU). Exact in train and eval mode.

    Layers after the insertion point shift by one index (``hidden.2`` becomes ``hidden.3``);
    their optimizer state follows them by name (``ParamMap(source=old_name)``); the new
    tensors get fresh state (``ParamMap(source=None)``).

    Raises:
        IncompatibleModelError: no classifier adapter understands the model, or the identity
            would not be exact after this unit (e.g. a GELU or Tanh after it).
        GrowthConfigError: layer out of range (all raised before any change).
    """

    exact = True
    adapter_kind: ClassVar[str] = "classifier"

    def validate(self, model: nn.Module, config: OpConfig) -> None:
        if not isinstance(config, Net2DeeperConfig):
            raise GrowthConfigError(f"expected Net2DeeperConfig, got {type(config).__name__}")
        units = classifier_adapter(model).units()
        _check_layer(config.layer, units)
        if isinstance(config.seed, bool) or not isinstance(config.seed, int) or config.seed < 0:
            raise GrowthConfigError(f"seed must be an int >= 0, got {config.seed!r}")
        problem = classifier_adapter(model).identity_problem(config.layer)
        if problem:
            raise IncompatibleModelError(f"net2deeper: {problem}")

    def apply(self, model: nn.Module, config: OpConfig, tx: Transaction) -> GrowthResult:
        if not isinstance(config, Net2DeeperConfig):
            raise GrowthConfigError(f"expected Net2DeeperConfig, got {type(config).__name__}")
        old_named = dict(model.named_parameters())
        ad = classifier_adapter(model)
        note = ad.insert_identity(tx, config.layer, torch.Generator().manual_seed(config.seed))
        maps = _renamed_maps(old_named, dict(model.named_parameters()))
        return GrowthResult(param_maps=maps, exact=True,
                            notes={"inserted_after": config.layer, "inserted": note})


# ---------------------------------------------------------------------------------------------
# sizes for actions
# ---------------------------------------------------------------------------------------------
def grown_width(width: int, factor: float = 1.5, round_to: int = 8) -> int:
    """``ceil(width * factor)`` rounded up to a multiple of ``round_to`` (always > width).

    Raises:
        GrowthConfigError: ``factor <= 1`` or ``round_to < 1``.
    """
    if not (math.isfinite(factor) and factor > 1):
        raise GrowthConfigError(f"factor must be > 1, got {factor}")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise GrowthConfigError(f"round_to must be an int >= 1, got {round_to!r}")
    return max(math.ceil(width * factor / round_to) * round_to, width + 1)
