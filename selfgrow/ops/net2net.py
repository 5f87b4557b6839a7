"""Net2Net growth operators for the reference classifiers (GrowableMLP, GrowableCNN).

Source: T. Chen, I. Goodfellow, J. Shlens, "Net2Net: Accelerating Learning via Knowledge
Transfer", ICLR 2016 (Net2WiderNet, Net2DeeperNet). Optimizer-state rule for copies: staged
training (Shen et al. 2022), see docs/GROWTH-MATH.md and :mod:`selfgrow.optim`.

Operators (registry keys):

* ``"net2wider"`` (:class:`Net2WiderNet`): widen hidden layers (MLP) or conv blocks (CNN) by
  copying existing units; exact in eval mode when ``noise_std == 0``.
* ``"net2deeper"`` (:class:`Net2DeeperNet`): insert an identity layer (MLP: identity Linear +
  ReLU; CNN: identity-kernel conv + identity BatchNorm + ReLU); exact in eval mode.

The controller's ``"widen"``, ``"deepen"`` and ``"widen_layers"`` actions for these families
live in :mod:`selfgrow.control.family_actions`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core import Transaction, zero_sum_noise
from ..errors import GrowthConfigError, IncompatibleModelError
from ..models.cnn import ConvBlock, GrowableCNN
from ..models.mlp import GrowableMLP
from ..optim import ParamMap
from ._registry import GrowthResult, OpConfig, Operator, register_operator

#: model families these operators support
SUPPORTED_MODELS: tuple[type[nn.Module], ...] = (GrowableMLP, GrowableCNN)


# ---------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------
def _check_family(model: nn.Module, op: str) -> None:
    """Raise IncompatibleModelError unless ``model`` is a consistent GrowableMLP/GrowableCNN."""
    if not isinstance(model, SUPPORTED_MODELS):
        raise IncompatibleModelError(
            f"operator {op!r} does not support {type(model).__name__}; supported models: "
            f"{', '.join(m.__name__ for m in SUPPORTED_MODELS)}"
        )
    widths = hidden_widths(model)
    if isinstance(model, GrowableMLP):
        actual = tuple(layer.weight.shape[0] for layer in model.hidden)
    else:
        actual = tuple(b.conv.weight.shape[0] for b in model.blocks)  # type: ignore[union-attr]
    if actual != widths:
        raise IncompatibleModelError(
            f"{type(model).__name__}'s layers {actual} disagree with model.config {widths}; "
            "grow it only through selfgrow operators"
        )


def hidden_widths(model: nn.Module) -> tuple[int, ...]:
    """Hidden widths (MLP) or block channels (CNN) from ``model.config``."""
    if isinstance(model, GrowableMLP):
        return model.config.hidden
    if isinstance(model, GrowableCNN):
        return model.config.channels
    raise IncompatibleModelError(
        f"{type(model).__name__} is not one of {', '.join(m.__name__ for m in SUPPORTED_MODELS)}"
    )


def layer_prefix(model: nn.Module) -> str:
    return "hidden" if isinstance(model, GrowableMLP) else "blocks"


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


def _check_layer(layer: int, n: int, model: nn.Module) -> None:
    if not 0 <= layer < n:
        raise GrowthConfigError(
            f"layer {layer} out of range for {type(model).__name__} with {n} "
            f"{layer_prefix(model)} layers; valid: 0..{n - 1}"
        )


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
    shape = [w.shape[0], -1] + [1] * (w.dim() - 2)
    scale = share.to(device=w.device, dtype=w.dtype).reshape(shape)
    return w.index_select(1, idx.to(w.device)) * scale


def _identity_matrix(n: int, like: torch.Tensor) -> torch.Tensor:
    """(n, n) identity in ``like``'s dtype and device."""
    return torch.eye(n, dtype=like.dtype, device=like.device)


def _identity_kernel(c: int, k: int, like: torch.Tensor) -> torch.Tensor:
    """(c, c, k, k) conv kernel with ``weight[i, i, k//2, k//2] = 1`` (zero-based centre): with
    padding ``k//2`` the conv is the identity map."""
    w = torch.zeros(c, c, k, k, dtype=like.dtype, device=like.device)
    ar = torch.arange(c, device=like.device)
    w[ar, ar, k // 2, k // 2] = 1.0
    return w


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
        layer: index of the hidden layer (MLP ``hidden.<i>``) or conv block (CNN
            ``blocks.<i>``) to widen, or a tuple of indices to widen several at once.
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

    module: nn.Module
    attr: str
    is_buffer: bool = False
    rows: torch.Tensor | None = None
    row_old: int = 0
    cols: torch.Tensor | None = None
    col_old: int = 0
    noise: bool = False


@register_operator(Net2WiderConfig)
class Net2WiderNet(Operator):
    """Net2WiderNet (Chen, Goodfellow, Shlens 2016): widen a hidden layer by copying units.

    For a widened layer with old width ``n`` and new width ``n'``, a replication map
    ``g: [0, n') -> [0, n)`` (identity on the first ``n`` positions, random existing units
    beyond) defines, with ``c_j = |{k : g(k) = j}|``:

    * GrowableMLP ``hidden.<i>``: ``weight`` (n, d_in) -> (n', d_in) rows ``W[g]``,
      ``bias`` (n,) -> (n',) ``b[g]``; the next layer (``hidden.<i+1>`` or ``head``)
      ``weight`` (d_out, n) -> (d_out, n') columns ``W[:, g(k)] / c_{g(k)}``.
    * GrowableCNN ``blocks.<i>``: ``conv.weight`` (n, C_in, k, k) -> (n', C_in, k, k) copied
      per output channel (and ``conv.bias`` when present), ``bn.weight``, ``bn.bias``,
      ``bn.running_mean``, ``bn.running_var`` (n,) -> (n',) copied per channel; the next
      block's ``conv.weight`` (C_out, n, k, k) -> (C_out, n', k, k) or ``head.weight``
      (n_classes, n) -> (n_classes, n') input channels divided by ``c``.

    Exactness: exact (outputs equal up to round-off) for any elementwise activation when
    ``noise_std == 0``, in eval mode; with BatchNorm it is exact in train mode too (twin
    channels have equal batch statistics). ``noise_std > 0`` adds noise to the new copies'
    incoming weights and is not exact.

    Optimizer: copied rows get ``ParamMap(grad_scale=1/c)`` (each twin receives 1/c of the
    unit's gradient, so Adam ``m' = m/c``, ``v' = v/c**2``); divided columns get
    ``grad_scale=1`` (their gradient equals the source column's).

    Raises:
        IncompatibleModelError: the model is not a GrowableMLP / GrowableCNN.
        GrowthConfigError: layer out of range, new_width not larger than the current width,
            negative noise_std (all raised before any change).
    """

    exact = True
    supported_models: ClassVar[tuple[type[nn.Module], ...]] = SUPPORTED_MODELS

    def is_exact(self, model: nn.Module, config: OpConfig) -> bool:
        return isinstance(config, Net2WiderConfig) and config.noise_std == 0

    def validate(self, model: nn.Module, config: OpConfig) -> None:
        if not isinstance(config, Net2WiderConfig):
            raise GrowthConfigError(f"expected Net2WiderConfig, got {type(config).__name__}")
        _check_family(model, Net2WiderConfig.name)
        widths = hidden_widths(model)
        for layer, new in config.targets().items():
            _check_layer(layer, len(widths), model)
            if new <= widths[layer]:
                raise GrowthConfigError(
                    f"new_width {new} for {layer_prefix(model)}.{layer} must exceed its "
                    f"current width {widths[layer]} (Net2WiderNet only grows)"
                )
        for field_name in ("noise_std", "split_noise"):
            noise = getattr(config, field_name)
            if isinstance(noise, bool) or not isinstance(noise, (int, float)):
                raise GrowthConfigError(f"{field_name} must be a float, got {noise!r}")
            if not (math.isfinite(noise) and noise >= 0):
                raise GrowthConfigError(f"{field_name} must be finite and >= 0, got {noise}")
        if isinstance(config.seed, bool) or not isinstance(config.seed, int) or config.seed < 0:
            raise GrowthConfigError(f"seed must be an int >= 0, got {config.seed!r}")

    def apply(self, model: nn.Module, config: OpConfig, tx: Transaction) -> GrowthResult:
        if not isinstance(config, Net2WiderConfig):
            raise GrowthConfigError(f"expected Net2WiderConfig, got {type(config).__name__}")
        targets = config.targets()
        widths = hidden_widths(model)
        gen = torch.Generator().manual_seed(config.seed)
        idx = {i: _copy_index(widths[i], targets[i], gen) for i in sorted(targets)}

        edits: dict[str, _Edit] = {}
        for i, g in idx.items():
            for name, mod, attr, is_buf, main in self._producers(model, i):
                e = edits.setdefault(name, _Edit(mod, attr, is_buf))
                e.rows, e.row_old, e.noise = g, widths[i], main
            name, mod, attr = self._consumer(model, i + 1)
            e = edits.setdefault(name, _Edit(mod, attr))
            e.cols, e.col_old = g, widths[i]

        maps: dict[str, ParamMap] = {}
        for name, e in edits.items():
            old = getattr(e.module, e.attr)
            t = old.detach()
            index: list[torch.Tensor | None] = [None] * t.dim()
            grad_scale: float | torch.Tensor = 1.0
            if e.cols is not None:
                t = _split_outgoing(
                    t, e.cols, _copy_counts(e.cols, e.col_old), config.split_noise, gen
                )
                index[1] = e.cols
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
                tx.set_buffer(e.module, e.attr, t.contiguous())
            else:
                tx.set_parameter(e.module, e.attr, t.contiguous())
                maps[name] = ParamMap(source=name, index=tuple(index), grad_scale=grad_scale)

        new_widths = tuple(targets.get(i, w) for i, w in enumerate(widths))
        self._set_sizes(model, new_widths, tx)
        return GrowthResult(
            param_maps=maps,
            exact=config.noise_std == 0,
            notes={"widths_before": list(widths), "widths_after": list(new_widths)},
        )

    @staticmethod
    def _producers(model: nn.Module, i: int) -> list[tuple[str, nn.Module, str, bool, bool]]:
        """Tensors whose dim 0 indexes layer ``i``'s units:
        ``(full name, module, attr, is_buffer, is_main_weight)``."""
        if isinstance(model, GrowableMLP):
            lin = model.hidden[i]
            p = f"hidden.{i}"
            return [
                (f"{p}.weight", lin, "weight", False, True),
                (f"{p}.bias", lin, "bias", False, False),
            ]
        block = model.blocks[i]  # type: ignore[index]
        p = f"blocks.{i}"
        out = [(f"{p}.conv.weight", block.conv, "weight", False, True)]
        if block.conv.bias is not None:
            out.append((f"{p}.conv.bias", block.conv, "bias", False, False))
        if isinstance(block.bn, nn.BatchNorm2d):
            for a in ("weight", "bias"):
                out.append((f"{p}.bn.{a}", block.bn, a, False, False))
            for a in ("running_mean", "running_var"):
                out.append((f"{p}.bn.{a}", block.bn, a, True, False))
        return out

    @staticmethod
    def _consumer(model: nn.Module, j: int) -> tuple[str, nn.Module, str]:
        """The weight whose dim 1 reads layer ``j - 1``'s units (layer ``j`` or the head)."""
        n = len(hidden_widths(model))
        if j == n:
            return "head.weight", model.head, "weight"  # type: ignore[return-value]
        if isinstance(model, GrowableMLP):
            return f"hidden.{j}.weight", model.hidden[j], "weight"
        return f"blocks.{j}.conv.weight", model.blocks[j].conv, "weight"  # type: ignore[index]

    @staticmethod
    def _set_sizes(model: nn.Module, widths: tuple[int, ...], tx: Transaction) -> None:
        """Keep the modules' size attributes and ``model.config`` in line with ``widths``."""
        if isinstance(model, GrowableMLP):
            for i, w in enumerate(widths):
                tx.set_attr(model.hidden[i], "out_features", w)
                nxt = model.hidden[i + 1] if i + 1 < len(widths) else model.head
                tx.set_attr(nxt, "in_features", w)
            tx.set_attr(model, "config", model.config.replace(hidden=widths))
            return
        if not isinstance(model, GrowableCNN):
            raise IncompatibleModelError(f"unsupported model {type(model).__name__}")
        for i, w in enumerate(widths):
            block = model.blocks[i]
            tx.set_attr(block.conv, "out_channels", w)
            if isinstance(block.bn, nn.BatchNorm2d):
                tx.set_attr(block.bn, "num_features", w)
            if i + 1 < len(widths):
                tx.set_attr(model.blocks[i + 1].conv, "in_channels", w)
            else:
                tx.set_attr(model.head, "in_features", w)
        tx.set_attr(model, "config", model.config.replace(channels=widths))


# ---------------------------------------------------------------------------------------------
# Net2DeeperNet (identity insertion)
# ---------------------------------------------------------------------------------------------
@dataclass
class Net2DeeperConfig(OpConfig):
    """Config of :class:`Net2DeeperNet`.

    Attributes:
        layer: insert the new identity layer right after hidden layer / conv block ``layer``
            (the new one becomes ``layer + 1``; later layers shift by one).
    """

    name: ClassVar[str] = "net2deeper"

    layer: int = 0


@register_operator(Net2DeeperConfig)
class Net2DeeperNet(Operator):
    """Net2DeeperNet (Chen, Goodfellow, Shlens 2016): insert an identity layer.

    * GrowableMLP (activation ``"relu"`` only): after ``hidden.<i>`` (width h) insert
      ``Linear(h, h)`` with ``weight = I`` (h, h) and ``bias = 0`` (h,), followed by ReLU.
      Exact: its input is post-ReLU, hence non-negative, and ``relu(I x) = x`` for ``x >= 0``.
    * GrowableCNN: after ``blocks.<i>`` (C channels) insert a block with
      ``conv.weight`` (C, C, k, k) an identity kernel (``weight[c, c, k//2, k//2] = 1``,
      zero-based centre, padding ``k//2``; zero bias when the conv has one),
      BatchNorm as identity (``running_mean = 0``, ``running_var = 1 - eps``, ``gamma = 1``,
      ``beta = 0``), ReLU and no pooling. Exact in eval mode (BN uses running statistics); in
      train mode BN normalises with batch statistics and is not an identity.

    Later layers shift by one index (``hidden.2`` becomes ``hidden.3``); their optimizer state
    follows them by name (``ParamMap(source=old_name)``); the new tensors get fresh state
    (``ParamMap(source=None)``).

    Raises:
        IncompatibleModelError: not a GrowableMLP / GrowableCNN, or an MLP whose activation is
            not ReLU (the identity would not be exact).
        GrowthConfigError: layer out of range (all raised before any change).
    """

    exact = True
    supported_models: ClassVar[tuple[type[nn.Module], ...]] = SUPPORTED_MODELS

    def validate(self, model: nn.Module, config: OpConfig) -> None:
        if not isinstance(config, Net2DeeperConfig):
            raise GrowthConfigError(f"expected Net2DeeperConfig, got {type(config).__name__}")
        _check_family(model, Net2DeeperConfig.name)
        if isinstance(model, GrowableMLP) and model.config.activation != "relu":
            raise IncompatibleModelError(
                f"net2deeper needs activation 'relu' (an identity layer followed by "
                f"{model.config.activation!r} is not an identity); got "
                f"{model.config.activation!r}, use net2wider instead"
            )
        if isinstance(config.layer, bool) or not isinstance(config.layer, int):
            raise GrowthConfigError(f"layer must be an int, got {config.layer!r}")
        _check_layer(config.layer, len(hidden_widths(model)), model)

    def apply(self, model: nn.Module, config: OpConfig, tx: Transaction) -> GrowthResult:
        if not isinstance(config, Net2DeeperConfig):
            raise GrowthConfigError(f"expected Net2DeeperConfig, got {type(config).__name__}")
        old_named = dict(model.named_parameters())
        i = config.layer
        widths = hidden_widths(model)
        w = widths[i]
        if isinstance(model, GrowableMLP):
            container: nn.ModuleList = model.hidden
            new = self._identity_linear(w, model.hidden[i].weight)
            tx.set_attr(model, "config", model.config.replace(hidden=_insert(widths, i, w)))
        elif isinstance(model, GrowableCNN):
            container = model.blocks
            cfg = model.config
            new = self._identity_block(w, cfg.kernel_size, cfg.batchnorm, model.blocks[i])
            pools = tuple(p + 1 if p > i else p for p in cfg.pool_after)
            tx.set_attr(
                model, "config", cfg.replace(channels=_insert(widths, i, w), pool_after=pools)
            )
        else:
            raise IncompatibleModelError(f"unsupported model {type(model).__name__}")
        children = list(container)
        children.insert(i + 1, new)
        tx.set_modules(container, {str(k): m for k, m in enumerate(children)})
        maps = _renamed_maps(old_named, dict(model.named_parameters()))
        return GrowthResult(param_maps=maps, exact=True, notes={"inserted_after": i})

    @staticmethod
    def _identity_linear(w: int, like: torch.Tensor) -> nn.Linear:
        with torch.device("meta"):  # no random init (keeps the global RNG untouched)
            lin = nn.Linear(w, w)
        lin = lin.to_empty(device=like.device).to(dtype=like.dtype)
        lin.weight = nn.Parameter(_identity_matrix(w, like))
        lin.bias = nn.Parameter(torch.zeros(w, dtype=like.dtype, device=like.device))
        return lin

    @staticmethod
    def _identity_block(c: int, k: int, batchnorm: bool, like_block: nn.Module) -> ConvBlock:
        like = like_block.conv.weight  # type: ignore[union-attr]
        with torch.device("meta"):
            block = ConvBlock(c, c, k, batchnorm, pool=False)
        block = block.to_empty(device=like.device).to(dtype=like.dtype)
        block.conv.weight = nn.Parameter(_identity_kernel(c, k, like))
        if block.conv.bias is not None:
            block.conv.bias = nn.Parameter(torch.zeros(c, dtype=like.dtype, device=like.device))
        if isinstance(block.bn, nn.BatchNorm2d):
            bn = block.bn
            z = torch.zeros(c, dtype=like.dtype, device=like.device)
            bn.weight = nn.Parameter(torch.ones_like(z))
            bn.bias = nn.Parameter(z.clone())
            bn.running_mean = z.clone()
            bn.running_var = torch.full_like(z, 1.0 - bn.eps)
            bn.num_batches_tracked = torch.zeros((), dtype=torch.long, device=like.device)
        return block


def _insert(widths: tuple[int, ...], i: int, w: int) -> tuple[int, ...]:
    return (*widths[: i + 1], w, *widths[i + 1 :])


# ---------------------------------------------------------------------------------------------
# actions
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


def resolve_layer(model: nn.Module, layer: int | str) -> int:
    """Index of a hidden layer / conv block given as an int, ``"2"``, or a module / parameter
    name such as ``"hidden.2"``, ``"hidden.2.weight"``, ``"blocks.1.conv.weight"``.

    Raises:
        GrowthConfigError: unknown name or index out of range (lists the valid names).
    """
    n = len(hidden_widths(model))
    prefix = layer_prefix(model)
    valid = ", ".join(f"{prefix}.{i}" for i in range(n))
    idx: int | None = None
    if isinstance(layer, int) and not isinstance(layer, bool):
        idx = layer
    elif isinstance(layer, str):
        parts = layer.split(".")
        if len(parts) == 1 and parts[0].isdigit():
            idx = int(parts[0])
        elif len(parts) >= 2 and parts[0] == prefix and parts[1].isdigit():
            idx = int(parts[1])
    if idx is None or not 0 <= idx < n:
        raise GrowthConfigError(
            f"unknown layer {layer!r} for {type(model).__name__}; valid: {valid} "
            f"(or their indices 0..{n - 1})"
        )
    return idx
