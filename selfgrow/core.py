"""Growth primitives: reversible model edits, parameter maps and index regridding.

This module is the bottom layer of selfgrow's growth machinery and imports nothing of selfgrow
but :mod:`selfgrow.errors`. Everything above it (optimizer migration, adapters, operators, the
controller) builds on these pieces:

* :class:`Transaction`: the journal through which every model edit is made; any exception
  inside ``with Transaction() as tx:`` undoes every change (same objects, same tensors).
* :class:`ParamMap`: how one parameter of a grown model derives from an old one (used to
  migrate optimizer state and, by the Avalanche regularisers, saved importances).
* :class:`AxisMap` / :class:`Roles` / :func:`regrid` / :func:`gather_dim`: growing tensors
  along canonical axes (copy, scale, fill new coordinates).
* small helpers written once for the whole package: :func:`count_params`,
  :func:`eval_mode`, :func:`zero_sum_noise`, :func:`full_tensor`.
* ``torch.compile`` and autocast around growth: :func:`unwrap_compiled` (the real module of a
  compiled wrapper), :func:`reset_compiled` (drop the compiled code of a grown model),
  :func:`autocast_disabled` (weight surgery in the parameters' own dtype) and
  :func:`compute_dtype` (the precision a forward really runs in).
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import GrowthConfigError, IncompatibleModelError

#: set inside :func:`measurement` (a forward that is not training or evaluation data)
_MEASURING: contextvars.ContextVar[bool] = contextvars.ContextVar("selfgrow_measuring",
                                                                  default=False)

_MISSING = object()


class Transaction:
    """Journal of reversible model edits; rolls back on exception.

    Usage::

        with Transaction() as tx:
            tx.replace_module(model.layers, "2", new_block)
            tx.set_parameter(model.head, "weight", new_weight)
            tx.set_attr(model.config, "n_layers", 7)
    """

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []
        self.committed = False

    # --- context manager -------------------------------------------------------------------
    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if exc_type is not None:
            self.rollback()
        else:
            self.committed = True
            self._undo.clear()
        return False

    def rollback(self) -> None:
        """Undo every recorded change, newest first."""
        while self._undo:
            self._undo.pop()()

    # --- edits -------------------------------------------------------------------------------
    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        """Set ``obj.name = value`` (any object, e.g. a config dataclass), reversibly."""
        old = obj.__dict__.get(name, _MISSING) if hasattr(obj, "__dict__") else _MISSING
        if old is _MISSING:
            old = getattr(obj, name, _MISSING)
        object.__setattr__(obj, name, value) if _is_frozen(obj) else setattr(obj, name, value)

        def undo() -> None:
            if old is _MISSING:
                delattr(obj, name)
            elif _is_frozen(obj):
                object.__setattr__(obj, name, old)
            else:
                setattr(obj, name, old)

        self._undo.append(undo)

    def replace_module(self, parent: nn.Module, name: str, new: nn.Module) -> nn.Module:
        """Replace ``parent.<name>`` (a child module; ``name`` may be an index of a
        ModuleList/Sequential) with ``new``, moved to the old module's device and dtype."""
        old = parent._modules[name]
        if old is not None:
            new = _match_device_dtype(new, old)
            new.train(old.training)  # the replacement keeps the replaced module's mode
        parent._modules[name] = new

        def undo() -> None:
            parent._modules[name] = old

        self._undo.append(undo)
        return new

    def set_modules(self, parent: nn.Module, children: dict[str, nn.Module]) -> None:
        """Replace all children of a container (ModuleList / Sequential) at once, e.g. to
        insert or reorder layers. ``children`` maps the new keys ('0', '1', ...) to modules."""
        old = parent._modules.copy()
        before = {id(m) for m in old.values() if m is not None}
        modes: list[tuple[nn.Module, bool]] = []
        for child in children.values():  # new modules take their parent's train/eval mode
            if child is not None and id(child) not in before:
                modes += [(m, m.training) for m in child.modules()]
                child.train(parent.training)
        parent._modules.clear()
        parent._modules.update(children)

        def undo() -> None:
            parent._modules.clear()
            parent._modules.update(old)
            for m, t in modes:
                m.train(t)

        self._undo.append(undo)

    def set_parameter(self, module: nn.Module, name: str, value: torch.Tensor | None) -> None:
        """Register a new parameter tensor under ``module.<name>`` (keeps requires_grad of the
        old parameter when there was one)."""
        old = module._parameters.get(name, _MISSING)
        if value is not None and not isinstance(value, nn.Parameter):
            rg = old.requires_grad if isinstance(old, nn.Parameter) else True
            value = nn.Parameter(value.detach(), requires_grad=rg)
        module._parameters[name] = value

        def undo() -> None:
            if old is _MISSING:
                del module._parameters[name]
            else:
                module._parameters[name] = old

        self._undo.append(undo)

    def set_buffer(self, module: nn.Module, name: str, value: torch.Tensor | None) -> None:
        """Register a new buffer tensor under ``module.<name>``."""
        old = module._buffers.get(name, _MISSING)
        module._buffers[name] = value

        def undo() -> None:
            if old is _MISSING:
                del module._buffers[name]
            else:
                module._buffers[name] = old

        self._undo.append(undo)

    def call(self, do: Callable[[], None], undo: Callable[[], None]) -> None:
        """Run an arbitrary reversible action (``undo`` restores what ``do`` changed)."""
        do()
        self._undo.append(undo)


def _is_frozen(obj: Any) -> bool:
    params = getattr(type(obj), "__dataclass_params__", None)
    return bool(params is not None and params.frozen)


def _match_device_dtype(new: nn.Module, like: nn.Module) -> nn.Module:
    ref = next(iter(like.parameters()), None)
    if ref is None:
        ref = next(iter(like.buffers()), None)
    if ref is None:
        return new
    if ref.is_floating_point():
        return new.to(device=ref.device, dtype=ref.dtype)
    return new.to(device=ref.device)


def module_path(root: nn.Module, target: nn.Module) -> str:
    """Dotted name of ``target`` inside ``root``; raises KeyError if absent."""
    for name, mod in root.named_modules():
        if mod is target:
            return name
    raise KeyError("module not found in model")


def get_parent(root: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    """Return ``(parent_module, child_name)`` for a dotted module path."""
    parts = dotted.split(".")
    parent = root
    for p in parts[:-1]:
        parent = getattr(parent, p) if not p.isdigit() else parent[int(p)]  # type: ignore[index]
    return parent, parts[-1]


# ---------------------------------------------------------------------------------------------
# parameter maps and regridding
# ---------------------------------------------------------------------------------------------
#: gather by copying slices when the index has at most this many runs
MAX_RUNS = 32


def gather_dim(t: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """``t.index_select(dim, index.clamp(min=0))`` where only entries ``index >= 0`` matter:
    new coordinates (``-1``) get arbitrary values (zeros here). Always a new tensor.

    Growth indices are mostly a few runs of consecutive coordinates (tiling
    ``[0..C-1, 0..C-1]``, appending ``[0..C-1, -1, ...]``); those are copied as slices,
    which on CPU is 5-10x faster than ``index_select`` along an inner dimension. Other
    indices (random Net2Net picks) fall back to ``index_select``.
    """
    n = index.numel()
    if t.is_meta:  # shape-only dry runs (size estimates): no values to gather or check
        shape = list(t.shape)
        shape[dim] = n
        return t.new_empty(shape)
    if n == 0 or index.dim() != 1:
        return t.index_select(dim, index.clamp(min=0))
    if int(index.max()) >= t.shape[dim]:
        raise GrowthConfigError(
            f"index {int(index.max())} out of range for dimension {dim} of size {t.shape[dim]}"
        )
    new = index < 0
    key = index - torch.arange(n, device=index.device)
    brk = torch.zeros(n, dtype=torch.bool, device=index.device)
    brk[0] = True
    brk[1:] = (new[1:] != new[:-1]) | (~new[1:] & (key[1:] != key[:-1]))
    starts = torch.nonzero(brk).flatten().tolist()
    if len(starts) > MAX_RUNS:
        return t.index_select(dim, index.clamp(min=0))
    ends = starts[1:] + [n]
    first = index[starts].tolist()
    shape = list(t.shape)
    shape[dim] = n
    out = t.new_empty(shape)
    for a, b, i0 in zip(starts, ends, first, strict=True):
        if i0 < 0:
            out.narrow(dim, a, b - a).zero_()
        else:
            out.narrow(dim, a, b - a).copy_(t.narrow(dim, i0, b - a))
    return out


@dataclass
class ParamMap:
    """How one parameter of the grown model derives from a parameter of the old model.

    Attributes:
        source: name of the old parameter (in ``model.named_parameters()`` before growth), or
            ``None`` for a brand-new tensor (fresh optimizer state).
        index: one entry per dimension of the NEW tensor: ``None`` (dimension unchanged) or a
            LongTensor of length ``new.shape[d]`` whose entries are the old index copied into
            that position, or ``-1`` for a brand-new coordinate.
        grad_scale: float or tensor broadcastable to the new shape: the gradient this
            coordinate will receive relative to its source coordinate's gradient (``1/c`` for a
            copy whose output is split among ``c`` twins).
        unsqueeze: a size-1 dimension inserted into the old tensor at this position before
            ``index`` applies (the new tensor has one more dimension, e.g. a dense FFN
            weight (F, C) stacked into experts (E, F, C) with ``index[0] = zeros(E)``).
    """

    source: str | None
    index: tuple[torch.Tensor | None, ...] = ()
    grad_scale: float | torch.Tensor = 1.0
    unsqueeze: int | None = None

    def gather(self, old: torch.Tensor, new_shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(values, new_mask)``: ``old`` gathered into ``new_shape`` and a bool mask
        of the brand-new coordinates (values there are arbitrary)."""
        out = old if self.unsqueeze is None else old.unsqueeze(self.unsqueeze)
        mask = torch.zeros((), dtype=torch.bool, device=old.device)
        for d, idx in enumerate(self.index):
            if idx is None:
                continue
            idx = idx.to(old.device)
            out = gather_dim(out, d, idx)
            shape = [1] * len(new_shape)
            shape[d] = idx.numel()
            mask = mask | (idx < 0).view(shape)
        if tuple(out.shape) != tuple(new_shape):
            raise GrowthConfigError(
                f"ParamMap from {self.source!r} gives shape {tuple(out.shape)}, "
                f"expected {tuple(new_shape)}"
            )
        return out, mask.expand(new_shape)


Fill = Callable[[tuple[int, ...], torch.dtype, torch.device], torch.Tensor]


def zeros_fill(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype, device=device)


#: a fill whose values do not depend on the position (``elementwise = True``) may be called
#: with the shape ``(n_new,)`` of the new coordinates only (see :func:`regrid`)
zeros_fill.elementwise = True  # type: ignore[attr-defined]


def normal_fill(std: float, generator: torch.Generator | None = None) -> Fill:
    """Fill brand-new coordinates with N(0, std^2), drawn on CPU for determinism: in fp64 for
    fp64 models, in fp32 otherwise (half the cost of an fp64 draw on large models)."""

    def fill(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        draw = torch.float64 if dtype == torch.float64 else torch.float32
        t = torch.randn(shape, generator=generator, dtype=draw) * std
        return t.to(device=device, dtype=dtype)

    fill.elementwise = True  # type: ignore[attr-defined]
    return fill


@dataclass
class AxisMap:
    """How one dimension of a tensor grows.

    Attributes:
        index: LongTensor (new_size,): old coordinate copied into each new position, -1 for a
            brand-new coordinate.
        value_scale: None or tensor (new_size,) multiplying the copied values along this axis
            (e.g. ``1 / count`` for a weight reading a duplicated stream).
        grad_scale: None or tensor (new_size,): gradient of the new coordinate relative to its
            source's gradient along this axis (multiplied over axes for the ParamMap).
    """

    index: torch.Tensor
    value_scale: torch.Tensor | None = None
    grad_scale: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return int(self.index.numel())

    @staticmethod
    def identity(n: int) -> AxisMap:
        return AxisMap(torch.arange(n))

    @staticmethod
    def concat(parts: Iterable[tuple[int, AxisMap]]) -> AxisMap:
        """Join segment maps of a fused axis: ``parts`` = ``(old_offset, map)`` in new order."""
        idx, vs, gs = [], [], []
        for off, m in parts:
            idx.append(torch.where(m.index >= 0, m.index + off, m.index))
            vs.append(m.value_scale if m.value_scale is not None else torch.ones(m.size))
            gs.append(m.grad_scale if m.grad_scale is not None else torch.ones(m.size))
        return AxisMap(torch.cat(idx), torch.cat(vs).double(), torch.cat(gs).double())


@dataclass
class Roles:
    """Reader / writer AxisMaps of one growing axis (residual stream, attention inner dim,
    FFN units), built from one index map by :meth:`from_index`.

    With ``count[j]`` = number of new coordinates copying the same old coordinate as j:

    * ``write`` (a tensor producing the axis: its rows / a norm gain / embedding columns):
      values copied, ``grad_scale = 1 / count`` (each copy's output is shared by ``count``
      twins downstream, so it receives ``g / count``);
    * ``read`` (a tensor consuming the axis: its input columns): values divided by
      ``count`` (the copies' contributions add up to the old one), ``grad_scale = 1`` (it
      multiplies the same input and feeds an unchanged output).
    """

    read: AxisMap
    write: AxisMap
    index: torch.Tensor
    count: torch.Tensor

    @staticmethod
    def from_index(index: torch.Tensor, old: int) -> Roles:
        """index: (new,) old coordinate per new position, -1 = brand new."""
        cnt_old = torch.bincount(index[index >= 0], minlength=old).double()
        cnt = torch.where(index >= 0, cnt_old[index.clamp(min=0)], torch.ones(()).double())
        inv = 1.0 / cnt
        return Roles(
            read=AxisMap(index, value_scale=inv, grad_scale=torch.ones_like(inv)),
            write=AxisMap(index, value_scale=None, grad_scale=inv),
            index=index,
            count=cnt,
        )

    def tied_final(self) -> AxisMap:
        """Final norm feeding a tied head: values / count, gradient unchanged."""
        return AxisMap(self.index, value_scale=1.0 / self.count,
                       grad_scale=torch.ones_like(self.count))


def regrid(
    t: torch.Tensor,
    axes: dict[int, AxisMap],
    fill: Fill = zeros_fill,
) -> tuple[torch.Tensor, ParamMap]:
    """Gather ``t`` along the given axes, scale values, fill new coordinates.

    Args:
        t: old tensor (any shape).
        axes: ``{dim: AxisMap}``; dims not listed are unchanged.
        fill: values of brand-new coordinates (those with -1 on any listed axis).

    Returns:
        ``(new_tensor, ParamMap)`` with ``source`` unset (the caller sets it), index per dim
        and ``grad_scale`` as a broadcastable tensor (or 1.0).
    """
    out = t.detach()
    new_mask = torch.zeros((), dtype=torch.bool)
    index: list[torch.Tensor | None] = [None] * t.dim()
    gscale: torch.Tensor | float = 1.0
    nd = t.dim()
    for d, m in sorted(axes.items()):
        idx = m.index.to(out.device)
        out = gather_dim(out, d, idx)
        shape = [1] * nd
        shape[d] = m.size
        if m.value_scale is not None and not bool((m.value_scale == 1).all()):
            # ``out`` is the fresh result of index_select: scale it in place (one pass less)
            out.mul_(m.value_scale.to(device=out.device, dtype=out.dtype).view(shape))
        new_mask = new_mask | (m.index < 0).view(shape)
        index[d] = m.index
        if m.grad_scale is not None:
            gscale = gscale * m.grad_scale.double().view(shape)
    if bool(new_mask.any()):  # on the broadcastable mask: no pass over the tensor
        new_mask = new_mask.expand(out.shape).to(out.device)
        if getattr(fill, "elementwise", False):
            # i.i.d. fills: draw only the new coordinates (row-major order), in place
            kept = 1
            for d, size in enumerate(out.shape):
                kept *= int((axes[d].index >= 0).sum()) if d in axes else int(size)
            vals = fill((out.numel() - kept,), out.dtype, out.device)
            out = out.masked_scatter_(new_mask, vals)
        else:
            out = torch.where(new_mask, fill(tuple(out.shape), out.dtype, out.device), out)
    if isinstance(gscale, torch.Tensor):
        gscale = gscale.to(dtype=torch.float32)
    return out.contiguous(), ParamMap(source=None, index=tuple(index), grad_scale=gscale)


# ---------------------------------------------------------------------------------------------
# helpers shared by every layer
# ---------------------------------------------------------------------------------------------
def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind ``t``: ``t.full_tensor()`` for a ``DTensor`` (an FSDP2 shard or
    a ``Partial`` reduction result: a collective every rank must join), ``t`` itself
    otherwise."""
    if type(t).__name__ == "DTensor" and callable(getattr(t, "full_tensor", None)):
        return t.full_tensor()  # type: ignore[no-any-return, attr-defined]
    return t


def count_params(model: nn.Module) -> int:
    """Number of parameter elements of ``model`` (tied tensors counted once)."""
    return sum(p.numel() for p in model.parameters())


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block and restore every submodule's own mode after
    (``model.train()`` afterwards would wrongly unfreeze modules the user keeps in eval)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, t in modes:
            m.train(t)


def in_measurement() -> bool:
    """Whether the current forward is a measurement (grow_'s function-preservation probe, a
    FLOP count) rather than training or evaluation: modules that keep statistics of their
    inputs (MoE routing counts) skip it. See :func:`measurement`."""
    return _MEASURING.get()


@contextlib.contextmanager
def measurement() -> Iterator[None]:
    """Mark the forwards inside as measurements (:func:`in_measurement` is True)."""
    token = _MEASURING.set(True)
    try:
        yield
    finally:
        _MEASURING.reset(token)


@contextlib.contextmanager
def rng_isolated() -> Iterator[None]:
    """Run a block without moving the global random streams a training run depends on.

    selfgrow's own randomness uses seeded ``torch.Generator`` objects; this guard covers what
    it calls into (a ``DataLoader``'s base seed, a module constructor's default init, a
    framework callback): the torch CPU generator and, where CUDA is initialised, the current
    device's generator are restored on exit. A run with growth disabled therefore sees the
    same random numbers as the same run without selfgrow.
    """
    cpu = torch.random.get_rng_state()
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        dev = torch.cuda.current_device()
        cuda = (dev, torch.cuda.get_rng_state(dev))
    try:
        yield
    finally:
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda[1], cuda[0])


def zero_sum_noise(
    groups: torch.Tensor,
    n_groups: int,
    shape: tuple[int, ...],
    dim: int,
    std: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Gaussian noise (fp64, CPU) of ``shape`` whose sum over the members of each group along
    ``dim`` is zero: the symmetry breaking of Net2WiderNet's copies that stays EXACT.

    Args:
        groups: (shape[dim],) LongTensor, group (old unit) of each position; ``-1`` marks a
            position outside every group (it gets no noise).
        n_groups: number of groups (old units).
        shape: shape of the noise.
        dim: the axis along which positions are grouped.
        std: standard deviation of the raw draw before centring.
        generator: random generator (the global one is never touched when given).

    Returns:
        noise with ``noise.index_add(dim, groups, ...)`` summing to 0 per group; a group of
        one member gets zero noise.
    """
    n = torch.randn(shape, generator=generator, dtype=torch.float64) * std
    n = n.movedim(dim, 0)
    valid = groups >= 0
    g = groups.clamp(min=0)
    sums = torch.zeros((n_groups,) + tuple(n.shape[1:]), dtype=torch.float64)
    sums.index_add_(0, g[valid], n[valid])
    cnt = torch.bincount(g[valid], minlength=n_groups).double().clamp(min=1)
    n = n - (sums / cnt.view((-1,) + (1,) * (n.dim() - 1)))[g]
    n[~valid] = 0.0
    return n.movedim(0, dim)


def register_unique(
    table: dict[Any, Any], key: Any, value: Any, what: str, *, override: bool = False
) -> None:
    """The one duplicate rule of every selfgrow registry (operators, models, adapters,
    actions, signals): a key taken by a DIFFERENT object raises unless ``override=True``;
    registering the same object again (or the same class re-created by re-importing its
    module) is a no-op replacement.

    Raises:
        GrowthConfigError: ``key`` is already registered to another object.
    """
    old = table.get(key, _MISSING)
    if old is not _MISSING and not override and not _same_definition(old, value):
        raise GrowthConfigError(
            f"{what} {key!r} is already registered to {_describe(old)}; pick another name "
            f"or pass override=True to replace it"
        )
    table[key] = value


def _same_definition(a: Any, b: Any) -> bool:
    if a is b:
        return True
    qa = (getattr(a, "__module__", None), getattr(a, "__qualname__", None))
    qb = (getattr(b, "__module__", None), getattr(b, "__qualname__", None))
    return qa[1] is not None and qa == qb


def _describe(obj: Any) -> str:
    q = getattr(obj, "__qualname__", None)
    return f"{getattr(obj, '__module__', '?')}.{q}" if q else repr(obj)


# ---------------------------------------------------------------------------------------------
# torch.compile and autocast
# ---------------------------------------------------------------------------------------------
#: plain module -> the torch.compile wrappers seen around it (weak: a wrapper the user drops
#: is not kept alive), so a growth of the plain module can drop the wrappers' compiled code
_COMPILED_WRAPPERS: weakref.WeakKeyDictionary[nn.Module, weakref.WeakSet[nn.Module]] = (
    weakref.WeakKeyDictionary()
)


def _optimized_module_type() -> type | None:
    # torch._dynamo is heavy to import; if it was never imported, nothing is compiled
    ef = sys.modules.get("torch._dynamo.eval_frame")
    return getattr(ef, "OptimizedModule", None) if ef is not None else None


def is_compiled(model: object) -> bool:
    """Whether ``model`` is a ``torch.compile`` wrapper (``OptimizedModule``)."""
    cls = _optimized_module_type()
    return cls is not None and isinstance(model, cls)


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The real module of a ``torch.compile(model)`` wrapper (``._orig_mod``); any other
    module is returned as is.

    Growth edits the real module in place: its parameters are the wrapper's parameters (the
    same objects, so an optimizer built on ``compiled.parameters()`` holds them), and the
    wrapper runs the grown module from its next call (see :func:`reset_compiled`). The wrapper
    is remembered (weakly) so that a later ``grow_`` of the plain module also drops its
    compiled code.

    Raises:
        IncompatibleModelError: ``model`` is not an ``nn.Module`` (e.g. ``torch.compile`` of
            a plain function), naming its type.
    """
    if not isinstance(model, nn.Module):
        raise IncompatibleModelError(
            f"expected a torch.nn.Module (or torch.compile of one), got "
            f"{type(model).__name__}; growth needs the module whose parameters it edits"
        )
    wrappers: list[nn.Module] = []
    while is_compiled(model) and isinstance(getattr(model, "_orig_mod", None), nn.Module):
        wrappers.append(model)
        model = model._orig_mod  # type: ignore[assignment]
    if wrappers:
        _COMPILED_WRAPPERS.setdefault(model, weakref.WeakSet()).update(wrappers)
    return model


def _dynamo_frame_codes(model: nn.Module) -> list[Any]:
    """Code objects of the frames dynamo may have compiled for ``model``: every submodule's
    ``forward`` and the top frame of each remembered compile wrapper."""
    codes: dict[int, Any] = {}
    for m in model.modules():
        fwd = getattr(type(m), "forward", None)
        code = getattr(fwd, "__code__", None)
        if code is not None:
            codes[id(code)] = code
    for w in list(_COMPILED_WRAPPERS.get(model, ())):
        fn = getattr(w.forward, "__wrapped__", None)  # dynamo_ctx(fn) keeps fn (functools.wraps)
        code = getattr(getattr(fn, "__func__", fn), "__code__", None)
        if code is not None:
            codes[id(code)] = code
    return list(codes.values())


def reset_compiled(model: nn.Module) -> int:
    """Drop the ``torch.compile`` code compiled for ``model``'s frames, so the next call of
    its compile wrapper traces the (grown) module afresh.

    Dynamo's default guards already notice a growth (a parameter of a new shape, a new
    submodule) and recompile; resetting on top of that (1) keeps graphs of old shapes from
    piling up, one per growth, until dynamo reaches ``recompile_limit`` and silently runs the
    model eagerly, and (2) makes a model compiled with guard filters that skip module guards
    (``torch.compiler.skip_guard_on_all_nn_modules_unsafe``) stop reusing the stale graph of
    the old shapes (which computes a wrong output). The reset is per code object: the
    ``forward`` of every submodule class of ``model``, dynamo's resume functions derived
    from them (graph breaks), and the top frame of the compile wrappers seen by
    :func:`unwrap_compiled`. Other instances of the same classes simply recompile on their
    next call. Functions outside module ``forward`` methods that dynamo compiled as frames of
    their own are guarded on their tensor arguments and left alone; where the per-code reset
    is unavailable (an older torch) ``torch.compiler.reset()`` is used instead.

    Args:
        model: the grown module (a compile wrapper is unwrapped first).

    Returns:
        number of code objects reset (0 when ``torch.compile`` was never used).
    """
    if _optimized_module_type() is None:
        return 0
    model = unwrap_compiled(model)
    import torch._dynamo as dynamo

    reset_code = getattr(dynamo, "reset_code", None)
    if reset_code is None:  # pragma: no cover - older torch
        torch.compiler.reset()
        return -1
    try:
        from torch._dynamo.resume_execution import ContinueExecutionCache

        resumes: Any = ContinueExecutionCache.cache
    except (ImportError, AttributeError):  # pragma: no cover - older/newer torch
        resumes = {}
    todo, seen = _dynamo_frame_codes(model), set()
    while todo:
        code = todo.pop()
        if id(code) in seen:
            continue
        seen.add(id(code))
        reset_code(code)
        try:
            todo.extend(resumes.get(code, {}).values())
        except TypeError:  # pragma: no cover - an unexpected cache layout
            pass
    return len(seen)


def _device_types(model: nn.Module | None) -> list[str]:
    types = {"cpu"}
    if torch.cuda.is_available():
        types.add("cuda")
    if model is not None:
        types |= {t.device.type for t in model.parameters()}
    return sorted(types)


def _autocast_enabled(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except (RuntimeError, TypeError):  # pragma: no cover - a device type without autocast
        return False


def autocast_dtype(model: nn.Module | None = None) -> torch.dtype | None:
    """The dtype autocast computes in for ``model``'s devices (None when autocast is off)."""
    for t in _device_types(model):
        if _autocast_enabled(t):
            return torch.get_autocast_dtype(t)
    return None


@contextlib.contextmanager
def autocast_disabled(model: nn.Module | None = None) -> Iterator[None]:
    """Turn autocast off (on CPU, CUDA and ``model``'s devices) for the block: growth's weight
    arithmetic (copies, splits, LiGO's matrix products) must run in the parameters' own dtype,
    not autocast's lower one (a product under autocast returns bf16 where the model is fp32).
    """
    with contextlib.ExitStack() as stack:
        for t in _device_types(model):
            if _autocast_enabled(t):
                stack.enter_context(torch.autocast(t, enabled=False))
        yield


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The precision ``model``'s forward runs in now: autocast's dtype when autocast is active
    on its device and lower than its parameters', else the lowest-precision floating dtype of
    its parameters (fp32 for a model without floating parameters)."""
    dtypes = [p.dtype for p in model.parameters() if p.is_floating_point()]
    ac = autocast_dtype(model)
    if ac is not None:
        dtypes.append(ac)
    if not dtypes:
        return torch.float32
    return max(dtypes, key=lambda d: torch.finfo(d).eps)
