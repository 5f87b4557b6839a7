"""Classifier adapters: how Net2WiderNet / Net2DeeperNet see a feed-forward classifier.

A classifier is viewed as a chain of widenable **units** (:class:`Unit`): a hidden layer of an
MLP, the output channels of a conv layer, or the residual stream of a ResNet stage. A unit is
written by its *producers* (tensors whose dimension 0 indexes the unit: Linear / Conv2d weight
rows and bias, BatchNorm weight, bias, running_mean, running_var) and read by its *consumers*
(tensors whose dimension 1 indexes it: the next Linear / Conv2d; after ``nn.Flatten`` each
channel spans ``group = H * W`` consecutive input columns of the next Linear). Widening a unit
is the same recipe for every family (:mod:`selfgrow.ops.net2net`); only the family knows how
to insert an identity layer after a unit and how to describe itself for checkpoints.

Families (``kind = "classifier"``):

* ``selfgrow.GrowableMLP`` / ``selfgrow.GrowableCNN`` (:class:`SelfgrowClassifierAdapter`);
* a user's ``nn.Sequential`` of Linear, Conv2d, BatchNorm1d/2d, ReLU/GELU/SiLU/Tanh, Flatten,
  Dropout and pooling layers, optionally ending in Avalanche's ``IncrementalClassifier``
  (:class:`SequentialAdapter`);
* a module made of exactly a ``features`` ``nn.Sequential`` and a ``classifier`` head
  (``nn.Linear``, a one-Linear ``nn.Sequential``, or Avalanche's ``IncrementalClassifier`` /
  ``MultiHeadClassifier``): Avalanche's ``SimpleMLP`` and ``MTSimpleMLP`` and the usual
  multi-head pattern (:class:`FeaturesClassifierAdapter`);
* torchvision's ResNet family with BasicBlock or Bottleneck blocks (:class:`ResNetAdapter`):
  a unit is a residual stream (a stage whose first block has no downsample shares the stream
  of the stage before it, e.g. the stem and ``layer1`` of resnet18).
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..core import Transaction
from ..errors import GrowthConfigError, IncompatibleModelError, choices_message
from ._base import Adapter, register_adapter


@dataclass(frozen=True)
class TensorRef:
    """One tensor that produces (``dim = 0``) or consumes (``dim = 1``) a unit.

    Attributes:
        name: dotted name in the model (``"hidden.0.weight"``, ``"layer1.0.bn2.running_var"``).
        module: the owning module.
        attr: attribute name on the module (``"weight"``, ``"bias"``, ``"running_mean"`` ...).
        dim: 0 for a producer (rows), 1 for a consumer (input columns).
        is_buffer: a buffer (no optimizer state) rather than a parameter.
        group: consumers only: consecutive input columns per unit coordinate (``H * W`` after
            a Flatten, else 1).
        main: the producer's main weight (``noise_std`` of Net2WiderNet perturbs its copies).
    """

    name: str
    module: nn.Module
    attr: str
    dim: int
    is_buffer: bool = False
    group: int = 1
    main: bool = False


@dataclass
class Unit:
    """A widenable unit: ``width`` coordinates written by ``producers``, read by
    ``consumers`` (see the module docstring). ``activation`` is the elementwise activation
    applied to the unit (``"relu"``, ``"gelu"`` ...; ``None`` if none), which decides whether
    identity insertion after it is exact."""

    name: str
    width: int
    producers: list[TensorRef] = field(default_factory=list)
    consumers: list[TensorRef] = field(default_factory=list)
    activation: str | None = None
    conv: bool = False


def _refs(prefix: str, mod: nn.Module, dim: int, group: int = 1, main_attr: str = "weight"
          ) -> list[TensorRef]:
    """Producer / consumer refs of a Linear, Conv2d (dim 0 or 1) or BatchNorm (dim 0)."""
    p = f"{prefix}." if prefix else ""
    out: list[TensorRef] = []
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        if dim != 0:
            raise IncompatibleModelError(f"{prefix}: a BatchNorm cannot consume a unit")
        for a in ("weight", "bias"):
            if getattr(mod, a, None) is not None:
                out.append(TensorRef(f"{p}{a}", mod, a, 0))
        for a in ("running_mean", "running_var"):
            if getattr(mod, a, None) is not None:
                out.append(TensorRef(f"{p}{a}", mod, a, 0, is_buffer=True))
        return out
    out.append(TensorRef(f"{p}weight", mod, "weight", dim, group=group,
                         main=dim == 0 and main_attr == "weight"))
    if dim == 0 and getattr(mod, "bias", None) is not None:
        out.append(TensorRef(f"{p}bias", mod, "bias", 0))
    return out


class ClassifierAdapter(Adapter):
    """Base of classifier adapters (``kind = "classifier"``).

    Subclasses implement :meth:`units`, :meth:`insert_identity` and (for checkpoints)
    :meth:`arch_spec` / :meth:`build_from_spec`, and may override :meth:`after_widen` to
    rewrite a family config. Module size attributes (``in_features``, ``out_channels``,
    ``num_features``) are synchronised generically after a widening.
    """

    kind: ClassVar[str] = "classifier"
    #: what the units are called in messages ("hidden layer", "conv block", "stream")
    unit_word: ClassVar[str] = "unit"

    @abc.abstractmethod
    def units(self) -> list[Unit]:
        """The widenable units, in forward order."""

    def widths(self) -> tuple[int, ...]:
        return tuple(u.width for u in self.units())

    def unit_index(self, unit: int | str) -> int:
        """Index of a unit given as an index, ``"2"`` or a unit / tensor name.

        Raises:
            GrowthConfigError: unknown name or index out of range (lists the valid ones).
        """
        units = self.units()
        names = [u.name for u in units]
        if isinstance(unit, int) and not isinstance(unit, bool):
            if 0 <= unit < len(units):
                return unit
        elif isinstance(unit, str):
            if unit.isdigit() and int(unit) < len(units):
                return int(unit)
            for i, u in enumerate(units):
                if unit == u.name or any(unit in (r.name, r.name.rpartition(".")[0])
                                         for r in u.producers):
                    return i
        raise GrowthConfigError(
            f"unknown {self.unit_word} {unit!r} for {type(self.model).__name__}; valid: "
            f"{', '.join(names)} (or their indices 0..{len(units) - 1})"
        )

    def after_widen(self, tx: Transaction, widths: tuple[int, ...]) -> None:
        """Hook: record the new widths in the family's config (none by default)."""

    def identity_problem(self, i: int) -> str | None:
        """Why an exact identity cannot be inserted after unit ``i`` (None: it can)."""
        u = self.units()[i]
        if u.activation != "relu":
            return (f"identity insertion after {u.name} needs a ReLU after it (an identity "
                    f"layer followed by {u.activation!r} is not an identity); use net2wider")
        return None

    @abc.abstractmethod
    def insert_identity(self, tx: Transaction, i: int, generator: torch.Generator) -> str:
        """Insert an exact identity layer / block after unit ``i`` through ``tx``; returns a
        note for the event log (which module was inserted where).

        Raises:
            IncompatibleModelError: identity insertion is not exact after this unit.
        """


# ---------------------------------------------------------------------------------------------
# Avalanche's dynamic heads (recognised by class, never imported here: avalanche is optional)
# ---------------------------------------------------------------------------------------------
DYNAMIC_HEADS = ("IncrementalClassifier", "MultiHeadClassifier")


def dynamic_head_kind(m: nn.Module) -> str | None:
    """``"IncrementalClassifier"`` / ``"MultiHeadClassifier"`` for Avalanche's dynamic
    classifiers (``avalanche.models.dynamic_modules``), else None."""
    name = type(m).__name__
    if name in DYNAMIC_HEADS and type(m).__module__.startswith("avalanche."):
        return name
    return None


def head_linears(prefix: str, m: nn.Module) -> list[tuple[str, nn.Linear]]:
    """``(dotted name, Linear)`` of every Linear reading a head's input: the Linear itself,
    the one Linear of an ``nn.Sequential`` head, ``{prefix}.classifier`` of an
    IncrementalClassifier, or ``{prefix}.classifiers.{task}.classifier`` for every task head
    of a MultiHeadClassifier (heads Avalanche adds later are built from its ``in_features``,
    which a widening updates).

    Raises:
        IncompatibleModelError: any other head.
    """
    kind = dynamic_head_kind(m)
    if isinstance(m, nn.Linear):
        return [(prefix, m)]
    if kind == "IncrementalClassifier":
        return [(f"{prefix}.classifier", m.classifier)]
    if kind == "MultiHeadClassifier":
        return [(f"{prefix}.classifiers.{k}.classifier", h.classifier)
                for k, h in m.classifiers.items()]
    if type(m) is nn.Sequential:
        inner = list(m.named_children())
        if len(inner) == 1 and isinstance(inner[0][1], nn.Linear):
            return [(f"{prefix}.{inner[0][0]}", inner[0][1])]
    raise IncompatibleModelError(
        f"head {prefix} ({type(m).__name__}) is not supported; valid heads: nn.Linear, an "
        f"nn.Sequential of one Linear, avalanche IncrementalClassifier, MultiHeadClassifier"
    )


def head_in_features(m: nn.Module) -> int:
    """Input width of a head, read from its weight (attributes may lag during a growth)."""
    return int(head_linears("head", m)[0][1].weight.shape[1])


def head_out_features(m: nn.Module) -> int:
    """Output width of a single-task head (Linear, one-Linear Sequential,
    IncrementalClassifier), read from its weight.

    Raises:
        IncompatibleModelError: a MultiHeadClassifier (one width per task) or an
            unsupported head.
    """
    linears = head_linears("head", m)
    if dynamic_head_kind(m) == "MultiHeadClassifier":
        raise IncompatibleModelError(
            "a MultiHeadClassifier has one output width per task; ask its task head "
            "(.classifiers[str(task)])")
    return int(linears[0][1].weight.shape[0])


def _consumer_refs(name: str, m: nn.Module, group: int) -> list[TensorRef]:
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        return _refs(name, m, 1, group=group)
    return [r for n, lin in head_linears(name, m) for r in _refs(n, lin, 1, group=group)]


def sync_classifier_attrs(tx: Transaction, root: nn.Module) -> None:
    """Make ``in/out_features``, ``in/out_channels`` and ``num_features`` of every Linear,
    Conv2d and BatchNorm (and ``in_features`` of Avalanche's MultiHeadClassifier, from which
    it builds the heads of new tasks) agree with its tensors (after a widening)."""
    for m in root.modules():
        if dynamic_head_kind(m) == "MultiHeadClassifier":
            n_in = head_in_features(m)
            if m.in_features != n_in:
                tx.set_attr(m, "in_features", n_in)
        if isinstance(m, nn.Linear):
            o, i = m.weight.shape
            if (m.out_features, m.in_features) != (o, i):
                tx.set_attr(m, "out_features", o)
                tx.set_attr(m, "in_features", i)
        elif isinstance(m, (nn.Conv1d, nn.Conv2d)):
            o, i = int(m.weight.shape[0]), int(m.weight.shape[1]) * m.groups
            if (m.out_channels, m.in_channels) != (o, i):
                tx.set_attr(m, "out_channels", o)
                tx.set_attr(m, "in_channels", i)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            ref = m.weight if m.weight is not None else m.running_mean
            if ref is not None and m.num_features != ref.shape[0]:
                tx.set_attr(m, "num_features", int(ref.shape[0]))


# ---------------------------------------------------------------------------------------------
# identity modules (no global RNG: built on meta, filled deterministically)
# ---------------------------------------------------------------------------------------------
def identity_matrix(n: int, like: torch.Tensor) -> torch.Tensor:
    """(n, n) identity in ``like``'s dtype and device."""
    return torch.eye(n, dtype=like.dtype, device=like.device)


def identity_kernel(c: int, k: int, like: torch.Tensor, spatial_dims: int = 2) -> torch.Tensor:
    """(c, c, k, k) conv kernel (``spatial_dims=1``: (c, c, k)) with ``weight[i, i, k//2,
    k//2] = 1`` (zero-based centre): with padding ``k//2`` the conv is the identity map."""
    w = torch.zeros(c, c, *(k,) * spatial_dims, dtype=like.dtype, device=like.device)
    ar = torch.arange(c, device=like.device)
    w[(ar, ar, *(k // 2,) * spatial_dims)] = 1.0
    return w


def identity_linear(w: int, like: torch.Tensor) -> nn.Linear:
    """``Linear(w, w)`` with ``weight = I`` (w, w), ``bias = 0`` (w,)."""
    with torch.device("meta"):
        lin = nn.Linear(w, w)
    lin = lin.to_empty(device=like.device).to(dtype=like.dtype)
    lin.weight = nn.Parameter(identity_matrix(w, like))
    lin.bias = nn.Parameter(torch.zeros(w, dtype=like.dtype, device=like.device))
    return lin


def identity_conv(c: int, k: int, like: torch.Tensor, bias: bool, spatial_dims: int = 2
                  ) -> nn.Module:
    """``Conv2d(c, c, k, padding=k // 2)`` (``spatial_dims=1``: ``Conv1d``) with an identity
    kernel (``weight[i, i, k//2, k//2] = 1``) and zero bias when ``bias``: the identity map."""
    cls = nn.Conv1d if spatial_dims == 1 else nn.Conv2d
    with torch.device("meta"):
        conv = cls(c, c, k, padding=k // 2, bias=bias)
    conv = conv.to_empty(device=like.device).to(dtype=like.dtype)
    conv.weight = nn.Parameter(identity_kernel(c, k, like, spatial_dims))
    if bias:
        conv.bias = nn.Parameter(torch.zeros(c, dtype=like.dtype, device=like.device))
    return conv


def identity_batchnorm(c: int, like: torch.Tensor, cls: type = nn.BatchNorm2d,
                       eps: float = 1e-5) -> nn.Module:
    """BatchNorm that is the identity in eval mode: ``gamma = 1``, ``beta = 0``,
    ``running_mean = 0``, ``running_var = 1 - eps``."""
    with torch.device("meta"):
        bn = cls(c, eps=eps)
    bn = bn.to_empty(device=like.device).to(dtype=like.dtype)
    z = torch.zeros(c, dtype=like.dtype, device=like.device)
    bn.weight = nn.Parameter(torch.ones_like(z))
    bn.bias = nn.Parameter(z.clone())
    bn.running_mean = z.clone()
    bn.running_var = torch.full_like(z, 1.0 - bn.eps)
    bn.num_batches_tracked = torch.zeros((), dtype=torch.long, device=like.device)
    return bn


# ---------------------------------------------------------------------------------------------
# selfgrow GrowableMLP / GrowableCNN
# ---------------------------------------------------------------------------------------------
@register_adapter
class SelfgrowClassifierAdapter(ClassifierAdapter):
    """``selfgrow.models.GrowableMLP`` (units ``hidden.<i>``) and ``GrowableCNN`` (units
    ``blocks.<i>``); ``model.config`` is updated with every growth."""

    family = "selfgrow.classifier"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from ..models.cnn import GrowableCNN
        from ..models.mlp import GrowableMLP

        return isinstance(model, (GrowableMLP, GrowableCNN))

    @property
    def is_mlp(self) -> bool:
        from ..models.mlp import GrowableMLP

        return isinstance(self.model, GrowableMLP)

    @property
    def unit_word(self) -> str:  # type: ignore[override]
        return "hidden layer" if self.is_mlp else "conv block"

    def config_widths(self) -> tuple[int, ...]:
        c = self.model.config  # type: ignore[attr-defined]
        return tuple(c.hidden if self.is_mlp else c.channels)

    def units(self) -> list[Unit]:
        m = self.model
        widths = self.config_widths()
        if self.is_mlp:
            actual = tuple(layer.weight.shape[0] for layer in m.hidden)  # type: ignore[union-attr]
        else:
            actual = tuple(b.conv.weight.shape[0] for b in m.blocks)  # type: ignore[union-attr]
        if actual != widths:
            raise IncompatibleModelError(
                f"{type(m).__name__}'s layers {actual} disagree with model.config {widths}; "
                "grow it only through selfgrow operators"
            )
        n = len(widths)
        units = []
        for i, w in enumerate(widths):
            if self.is_mlp:
                p = f"hidden.{i}"
                prod = _refs(p, m.hidden[i], 0)  # type: ignore[index]
                nxt = ("head", m.head) if i + 1 == n else (f"hidden.{i + 1}", m.hidden[i + 1])  # type: ignore[index]
                act = m.config.activation  # type: ignore[attr-defined]
                conv = False
            else:
                p = f"blocks.{i}"
                block = m.blocks[i]  # type: ignore[index]
                prod = _refs(f"{p}.conv", block.conv, 0)
                if isinstance(block.bn, nn.modules.batchnorm._BatchNorm):
                    prod += _refs(f"{p}.bn", block.bn, 0)
                nxt = (("head", m.head) if i + 1 == n
                       else (f"blocks.{i + 1}.conv", m.blocks[i + 1].conv))  # type: ignore[index]
                act, conv = "relu", True
            units.append(Unit(p, w, prod, _refs(nxt[0], nxt[1], 1), act, conv))
        return units

    def after_widen(self, tx: Transaction, widths: tuple[int, ...]) -> None:
        c = self.model.config  # type: ignore[attr-defined]
        new = c.replace(hidden=widths) if self.is_mlp else c.replace(channels=widths)
        tx.set_attr(self.model, "config", new)

    def insert_identity(self, tx: Transaction, i: int, generator: torch.Generator) -> str:
        from ..models.cnn import ConvBlock

        m = self.model
        cfg = m.config  # type: ignore[attr-defined]
        widths = self.config_widths()
        w = widths[i]
        new_widths = (*widths[: i + 1], w, *widths[i + 1:])
        if self.is_mlp:
            if cfg.activation != "relu":
                raise IncompatibleModelError(
                    f"net2deeper needs activation 'relu' (an identity layer followed by "
                    f"{cfg.activation!r} is not an identity); got {cfg.activation!r}, use "
                    f"net2wider instead"
                )
            container: nn.ModuleList = m.hidden  # type: ignore[assignment]
            new: nn.Module = identity_linear(w, m.hidden[i].weight)  # type: ignore[index]
            tx.set_attr(m, "config", cfg.replace(hidden=new_widths))
        else:
            container = m.blocks  # type: ignore[assignment]
            like = m.blocks[i].conv.weight  # type: ignore[index]
            with torch.device("meta"):
                block = ConvBlock(w, w, cfg.kernel_size, cfg.batchnorm, pool=False,
                                  spatial_dims=cfg.spatial_dims)
            block = block.to_empty(device=like.device).to(dtype=like.dtype)
            block.conv = identity_conv(w, cfg.kernel_size, like, bias=not cfg.batchnorm,
                                       spatial_dims=cfg.spatial_dims)
            if cfg.batchnorm:
                block.bn = identity_batchnorm(w, like, cls=type(block.bn), eps=block.bn.eps)
            new = block
            pools = tuple(p + 1 if p > i else p for p in cfg.pool_after)
            tx.set_attr(m, "config", cfg.replace(channels=new_widths, pool_after=pools))
        children = list(container)
        children.insert(i + 1, new)
        tx.set_modules(container, {str(k): c for k, c in enumerate(children)})
        return f"identity {'Linear + ReLU' if self.is_mlp else 'conv block'} after unit {i}"


# ---------------------------------------------------------------------------------------------
# nn.Sequential
# ---------------------------------------------------------------------------------------------
_ACTS: dict[type, str] = {nn.ReLU: "relu", nn.GELU: "gelu", nn.SiLU: "silu", nn.Tanh: "tanh"}
_PASS = (nn.Dropout, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Identity)
SEQUENTIAL_LAYERS = ("Linear", "Conv2d", "BatchNorm1d", "BatchNorm2d", "ReLU", "GELU", "SiLU",
                     "Tanh", "Flatten", "Dropout", "MaxPool2d", "AvgPool2d",
                     "AdaptiveAvgPool2d", "Identity")


def _spec_of(m: nn.Module) -> dict[str, Any]:
    """JSON-able constructor arguments of one supported layer."""
    t = type(m).__name__
    if isinstance(m, nn.Linear):
        return {"type": t, "in_features": m.in_features, "out_features": m.out_features,
                "bias": m.bias is not None}
    if isinstance(m, nn.Conv2d):
        return {"type": t, "in_channels": m.in_channels, "out_channels": m.out_channels,
                "kernel_size": list(m.kernel_size), "stride": list(m.stride),
                "padding": m.padding if isinstance(m.padding, str) else list(m.padding),
                "dilation": list(m.dilation), "groups": m.groups, "bias": m.bias is not None,
                "padding_mode": m.padding_mode}
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return {"type": t, "num_features": m.num_features, "eps": m.eps, "momentum": m.momentum,
                "affine": m.affine, "track_running_stats": m.track_running_stats}
    if isinstance(m, nn.GELU):
        return {"type": t, "approximate": m.approximate}
    if isinstance(m, (nn.ReLU, nn.SiLU)):
        return {"type": t, "inplace": m.inplace}
    if isinstance(m, nn.Flatten):
        return {"type": t, "start_dim": m.start_dim, "end_dim": m.end_dim}
    if isinstance(m, nn.Dropout):
        return {"type": t, "p": m.p}
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
        d = {"type": t, "kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
    if isinstance(m, nn.AdaptiveAvgPool2d):
        o = m.output_size
        return {"type": t, "output_size": list(o) if isinstance(o, tuple) else o}
    return {"type": t}


def _build_layer(spec: dict[str, Any]) -> nn.Module:
    t = spec.get("type")
    if t not in SEQUENTIAL_LAYERS:
        raise GrowthConfigError(choices_message("Sequential layer type", t, SEQUENTIAL_LAYERS))
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items() if k != "type"}
    return getattr(nn, t)(**kw)


_JSON_SCALARS = (int, float, str, bool, type(None))


def _plain_attrs(m: nn.Module) -> dict[str, Any]:
    """The JSON-able attributes a module adds to ``nn.Module``'s own (sizes, flags, task
    bookkeeping such as MultiTaskModule's ``known_train_tasks_labels``) for a rebuild."""
    base = set(nn.Module().__dict__)
    out: dict[str, Any] = {}
    for k, v in vars(m).items():
        if k in base:
            continue
        if isinstance(v, _JSON_SCALARS):
            out[k] = v
        elif isinstance(v, (set, frozenset)) and all(isinstance(x, _JSON_SCALARS) for x in v):
            out[k] = {"__set__": sorted(v, key=repr)}
        elif isinstance(v, (list, tuple)) and all(isinstance(x, _JSON_SCALARS) for x in v):
            out[k] = list(v)
    return out


def _restore_attrs(m: nn.Module, attrs: dict[str, Any]) -> None:
    for k, v in attrs.items():
        setattr(m, k, set(v["__set__"]) if isinstance(v, dict) and "__set__" in v else v)


def _avalanche_models() -> Any:
    try:
        from avalanche.models import dynamic_modules
    except ImportError as e:  # pragma: no cover - avalanche is in the base requirements
        raise IncompatibleModelError(
            "rebuilding an Avalanche dynamic head needs the package 'avalanche-lib': pip "
            "install avalanche-lib==0.6.0") from e
    return dynamic_modules


def _head_spec(m: nn.Module) -> dict[str, Any]:
    """JSON-able description of a classifier head (see :func:`head_linears`)."""
    kind = dynamic_head_kind(m)
    if kind == "IncrementalClassifier":
        return {"type": kind, "in_features": m.classifier.in_features,
                "out_features": m.classifier.out_features, "attrs": _plain_attrs(m),
                "buffers": {n: list(b.shape) for n, b in m.named_buffers(recurse=False)}}
    if kind == "MultiHeadClassifier":
        return {"type": kind, "attrs": _plain_attrs(m),
                "heads": {k: _head_spec(h) for k, h in m.classifiers.items()},
                "buffers": {n: list(b.shape) for n, b in m.named_buffers(recurse=False)}}
    if type(m) is nn.Sequential:
        return {"type": "Sequential", "layers": [_spec_of(x) for x in m]}
    head_linears("head", m)  # raises for unsupported heads
    return _spec_of(m)


def _build_head(spec: dict[str, Any]) -> nn.Module:
    t = spec.get("type") if isinstance(spec, dict) else None
    if t == "IncrementalClassifier":
        dm = _avalanche_models()
        h = dm.IncrementalClassifier(spec["in_features"], spec["out_features"])
        for n, shape in spec.get("buffers", {}).items():  # active_units: its own size
            h.register_buffer(n, torch.zeros(shape, dtype=torch.int8))
        _restore_attrs(h, spec.get("attrs", {}))
        return h
    if t == "MultiHeadClassifier":
        dm = _avalanche_models()
        attrs = spec.get("attrs", {})
        heads = spec["heads"]
        first = next(iter(heads.values()))
        mh = dm.MultiHeadClassifier(attrs.get("in_features", first["in_features"]),
                                    attrs.get("starting_out_features", 2))
        for k, hs in heads.items():
            mh.classifiers[k] = _build_head(hs)
        for n, shape in spec.get("buffers", {}).items():
            mh.register_buffer(n, torch.zeros(shape, dtype=torch.int8))
        _restore_attrs(mh, attrs)
        return mh
    if t == "Sequential":
        return nn.Sequential(*[_build_layer(x) for x in spec["layers"]])
    return _build_layer(spec)


def _chain_units(layers: list[tuple[str, nn.Module]]) -> list[Unit]:
    """Units of a feed-forward chain of ``(dotted name, layer)``: every Linear / Conv2d but
    the last compute layer (a Linear, Conv2d or classifier head, see :func:`head_linears`);
    a unit spans the layer and the BatchNorm right after it.

    Raises:
        IncompatibleModelError: fewer than two compute layers, grouped convolutions, a
            BatchNorm after the activation, a Conv2d after a Linear, or a Flatten whose
            output does not split into the channels.
    """
    def is_compute(m: nn.Module) -> bool:
        return isinstance(m, (nn.Linear, nn.Conv2d)) or dynamic_head_kind(m) is not None

    compute = [k for k, (_, m) in enumerate(layers) if is_compute(m)]
    if len(compute) < 2:
        raise IncompatibleModelError(
            "a model with fewer than two Linear / Conv2d layers has no hidden unit to grow"
        )
    units: list[Unit] = []
    for a, b in zip(compute[:-1], compute[1:], strict=True):
        name, mod = layers[a]
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            raise IncompatibleModelError(f"layer {name}: a classifier head must come last")
        if isinstance(mod, nn.Conv2d) and mod.groups != 1:
            raise IncompatibleModelError(f"layer {name}: grouped convolutions cannot grow")
        width = int(mod.weight.shape[0])
        prod = _refs(name, mod, 0)
        act = None
        flat = False
        for k in range(a + 1, b):
            n2, m2 = layers[k]
            if isinstance(m2, nn.modules.batchnorm._BatchNorm):
                if act is not None:
                    raise IncompatibleModelError(
                        f"layer {n2}: a BatchNorm after the activation is not supported"
                    )
                prod += _refs(n2, m2, 0)
            elif type(m2) in _ACTS:
                act = act or _ACTS[type(m2)]
            elif isinstance(m2, nn.Flatten):
                flat = True
        nname, nmod = layers[b]
        group = 1
        if isinstance(nmod, nn.Conv2d):
            if isinstance(mod, nn.Linear):
                raise IncompatibleModelError(f"layer {nname}: a Conv2d after a Linear")
            if nmod.groups != 1:
                raise IncompatibleModelError(f"layer {nname}: grouped convolutions cannot grow")
        elif isinstance(mod, nn.Conv2d):
            n_in = head_in_features(nmod)
            if not flat or n_in % width:
                raise IncompatibleModelError(
                    f"layer {nname}: Linear in_features {n_in} is not a multiple of the "
                    f"{width} channels of {name} after a Flatten"
                )
            group = n_in // width
        units.append(Unit(name, width, prod, _consumer_refs(nname, nmod, group), act,
                          isinstance(mod, nn.Conv2d)))
    return units


def _insert_identity_chain(tx: Transaction, seq: nn.Sequential,
                           layers: list[tuple[str, nn.Module]], unit: Unit) -> str:
    """Insert an exact identity block into ``seq`` (whose children are ``layers``, named as
    in the units) after ``unit``'s ReLU."""
    if unit.activation != "relu":
        raise IncompatibleModelError(
            f"identity insertion after layer {unit.name} needs a ReLU after it (the new "
            f"layer's input must be non-negative); it has {unit.activation!r}: use "
            f"net2wider instead"
        )
    names = [n for n, _ in layers]
    start = names.index(unit.name)
    pos = next(k for k in range(start + 1, len(layers)) if isinstance(layers[k][1], nn.ReLU))
    like = dict(layers)[unit.name].weight
    new: list[nn.Module]
    if unit.conv:
        conv = dict(layers)[unit.name]
        k = conv.kernel_size[0] if conv.kernel_size[0] == conv.kernel_size[1] and (
            conv.kernel_size[0] % 2) else 1
        has_bn = any(r.attr == "running_mean" for r in unit.producers)
        new = [identity_conv(unit.width, k, like, bias=not has_bn)]
        if has_bn:
            new.append(identity_batchnorm(unit.width, like))
        new.append(nn.ReLU())
    else:
        new = [identity_linear(unit.width, like), nn.ReLU()]
    mods = [m for _, m in layers]
    mods[pos + 1:pos + 1] = new
    tx.set_modules(seq, {str(k): m for k, m in enumerate(mods)})
    return f"identity {' + '.join(type(m).__name__ for m in new)} after layer {pos}"


def _check_layers(layers: list[tuple[str, nn.Module]], where: str, head_ok: bool
                  ) -> None:
    for k, (name, m) in enumerate(layers):
        kind = dynamic_head_kind(m)
        if kind == "IncrementalClassifier" and head_ok and k == len(layers) - 1:
            continue
        if kind is not None:
            hint = ("it must be the last layer" if kind == "IncrementalClassifier" else
                    "an nn.Sequential cannot pass task labels: build a MultiTaskModule with "
                    "`features` (nn.Sequential) and `classifier` (the MultiHeadClassifier)")
            raise IncompatibleModelError(f"{where} layer {name} ({kind}): {hint}")
        if type(m).__name__ not in SEQUENTIAL_LAYERS or type(m) is not getattr(
            nn, type(m).__name__
        ):
            raise IncompatibleModelError(
                f"{where} layer {name} ({type(m).__name__}) is not supported by selfgrow's "
                f"Sequential adapter; supported layers: {', '.join(SEQUENTIAL_LAYERS)}"
                f"{' and a last IncrementalClassifier' if head_ok else ''} (register an "
                f"action or an adapter for other models, see docs/extending.md)"
            )


@register_adapter
class SequentialAdapter(ClassifierAdapter):
    """A plain ``nn.Sequential`` classifier (MLP or CNN) of the layers in
    :data:`SEQUENTIAL_LAYERS`, whose last layer may be Avalanche's ``IncrementalClassifier``
    (its ``classifier`` Linear consumes the last unit; the classes it adds later read the
    grown width). Units: every Linear / Conv2d but the last (the head); a unit spans the
    layer and the BatchNorm right after it."""

    family = "torch.nn.Sequential"
    unit_word = "layer"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model) is nn.Sequential

    def _check(self) -> list[tuple[str, nn.Module]]:
        layers = list(self.model.named_children())
        _check_layers(layers, "nn.Sequential", head_ok=True)
        return layers

    def units(self) -> list[Unit]:
        return _chain_units(self._check())

    def insert_identity(self, tx: Transaction, i: int, generator: torch.Generator) -> str:
        layers = self._check()
        return _insert_identity_chain(tx, self.model, layers, self.units()[i])

    def arch_spec(self) -> dict[str, Any]:
        layers = self._check()
        return {"layers": [_head_spec(m) if dynamic_head_kind(m) else _spec_of(m)
                           for _, m in layers]}

    @classmethod
    def build_from_spec(cls, spec: dict[str, Any]) -> nn.Module:
        layers = spec.get("layers") if isinstance(spec, dict) else None
        if not isinstance(layers, list):
            raise GrowthConfigError(f"not a Sequential spec: {spec!r}")
        with torch.device("meta"):
            model = nn.Sequential(*[_build_head(s) if s.get("type") in DYNAMIC_HEADS
                                    else _build_layer(s) for s in layers])
        return model.to_empty(device="cpu")


def _is_features_classifier(model: nn.Module) -> bool:
    names = [n for n, _ in model.named_children()]
    if type(model) is nn.Sequential or sorted(names) != ["classifier", "features"]:
        return False
    if type(model.features) is not nn.Sequential:
        return False
    try:
        head_linears("classifier", model.classifier)
    except IncompatibleModelError:
        return False
    return True


@register_adapter
class FeaturesClassifierAdapter(ClassifierAdapter):
    """A module whose only children are ``features`` (an ``nn.Sequential`` of the layers in
    :data:`SEQUENTIAL_LAYERS`) and ``classifier`` (``nn.Linear``, an ``nn.Sequential`` of one
    Linear, or Avalanche's ``IncrementalClassifier`` / ``MultiHeadClassifier``), with its own
    ``forward`` (e.g. ``x -> classifier(features(x.view(B, -1)), task_labels)``): Avalanche's
    ``SimpleMLP`` / ``MTSimpleMLP`` and the usual multi-head pattern of task-incremental
    learning. Units are those of ``features`` (names ``features.<i>``); the last one is read
    by every task head. Identity layers are inserted into ``features``.

    Checkpoints: the spec records the class (``module:qualname``), its JSON-able attributes
    (``_input_size``, task bookkeeping), the layers of ``features`` and the head with every
    task head's size; :meth:`build_from_spec` creates the instance WITHOUT calling its
    ``__init__`` (so the class needs no particular constructor), sets those, and the
    checkpoint's weights are then loaded.
    """

    family = "features+classifier"
    unit_word = "layer"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return _is_features_classifier(model)

    def _layers(self) -> list[tuple[str, nn.Module]]:
        feats = [(f"features.{n}", m) for n, m in self.model.features.named_children()]
        _check_layers(feats, "features", head_ok=False)
        return [*feats, ("classifier", self.model.classifier)]

    def units(self) -> list[Unit]:
        return _chain_units(self._layers())

    def insert_identity(self, tx: Transaction, i: int, generator: torch.Generator) -> str:
        layers = self._layers()[:-1]
        unit = self.units()[i]
        renamed = [(n.removeprefix("features."), m) for n, m in layers]
        unit_local = Unit(unit.name.removeprefix("features."), unit.width, unit.producers,
                          unit.consumers, unit.activation, unit.conv)
        return "features: " + _insert_identity_chain(tx, self.model.features, renamed,
                                                     unit_local)

    def arch_spec(self) -> dict[str, Any]:
        self._layers()
        cls = type(self.model)
        return {"class": f"{cls.__module__}:{cls.__qualname__}",
                "attrs": _plain_attrs(self.model),
                "features": [_spec_of(m) for m in self.model.features],
                "classifier": _head_spec(self.model.classifier)}

    @classmethod
    def build_from_spec(cls, spec: dict[str, Any]) -> nn.Module:
        import importlib

        if not isinstance(spec, dict) or not {"class", "features", "classifier"} <= set(spec):
            raise GrowthConfigError(f"not a features+classifier spec: {spec!r:.200}")
        mod_name, _, qual = str(spec["class"]).partition(":")
        try:
            obj: Any = importlib.import_module(mod_name)
            for part in qual.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as e:
            raise IncompatibleModelError(
                f"cannot rebuild {spec['class']}: the class is not importable ({e}); import "
                f"the module that defines it first") from e
        if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
            raise IncompatibleModelError(f"{spec['class']} is not an nn.Module class")
        model = obj.__new__(obj)
        nn.Module.__init__(model)
        _restore_attrs(model, spec.get("attrs", {}))
        model.features = nn.Sequential(*[_build_layer(s) for s in spec["features"]])
        model.classifier = _build_head(spec["classifier"])
        return model


def _zero_residual(bn: nn.Module) -> None:
    """Zero a block's last BatchNorm (gain and bias): its residual branch then outputs 0."""
    bn.weight.zero_()  # type: ignore[union-attr]
    bn.bias.zero_()  # type: ignore[union-attr]


def _is_resnet(model: nn.Module) -> bool:
    t = type(model)
    return t.__module__ == "torchvision.models.resnet" and t.__name__ == "ResNet"


@register_adapter
class ResNetAdapter(ClassifierAdapter):
    """torchvision ``ResNet`` (resnet18/34 with BasicBlock, resnet50/101/152 and ResNeXt /
    wide ResNets with Bottleneck). Units are residual STREAMS: ``"stem+layer1"`` (the stem's
    output, shared by layer1 when its first block has no downsample), then one per stage whose
    first block has a downsample. Deepening appends an identity block to a stage."""

    family = "torchvision.ResNet"
    unit_word = "stream"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return _is_resnet(model)

    def stages(self) -> list[nn.Sequential]:
        return [getattr(self.model, f"layer{s}") for s in range(1, 5)]

    @staticmethod
    def _last(block: nn.Module) -> tuple[str, str]:
        return ("conv3", "bn3") if hasattr(block, "conv3") else ("conv2", "bn2")

    def units(self) -> list[Unit]:
        m = self.model
        cur = Unit("stem", int(m.conv1.weight.shape[0]),
                   _refs("conv1", m.conv1, 0) + _refs("bn1", m.bn1, 0), activation="relu",
                   conv=True)
        units = [cur]
        for s, stage in enumerate(self.stages(), start=1):
            for b, block in enumerate(stage):
                p = f"layer{s}.{b}"
                cur.consumers += _refs(f"{p}.conv1", block.conv1, 1)
                ds = getattr(block, "downsample", None)
                if ds is not None:
                    if not (isinstance(ds, nn.Sequential) and len(ds) == 2
                            and isinstance(ds[0], nn.Conv2d)):
                        raise IncompatibleModelError(f"{p}.downsample is not conv + norm")
                    cur.consumers += _refs(f"{p}.downsample.0", ds[0], 1)
                    cur = Unit(f"layer{s}", int(ds[0].weight.shape[0]),
                               _refs(f"{p}.downsample.0", ds[0], 0)
                               + _refs(f"{p}.downsample.1", ds[1], 0), activation="relu",
                               conv=True)
                    units.append(cur)
                elif b == 0 and cur.name == "stem":
                    cur.name = f"stem+layer{s}"
                cname, bname = self._last(block)
                cur.producers += _refs(f"{p}.{cname}", getattr(block, cname), 0)
                cur.producers += _refs(f"{p}.{bname}", getattr(block, bname), 0)
        cur.consumers += _refs("fc", m.fc, 1)
        return units

    def stage_index(self, stage: int | str) -> int:
        """1-based stage number from ``2``, ``"layer2"``, ``"2"``."""
        s = stage[5:] if isinstance(stage, str) and stage.startswith("layer") else stage
        try:
            k = int(s)
        except (TypeError, ValueError):
            k = -1
        if not 1 <= k <= 4:
            raise GrowthConfigError(
                f"unknown ResNet stage {stage!r}; valid: layer1, layer2, layer3, layer4"
            )
        return k

    def identity_problem(self, i: int) -> str | None:
        if not self._stream_stages()[i]:
            return ("the stem stream feeds no residual stage directly (layer1 starts with a "
                    "downsample): deepen stream 1 or later")
        return None

    def insert_identity(self, tx: Transaction, i: int, generator: torch.Generator) -> str:
        """Append an identity block to the last stage writing stream ``i``."""
        problem = self.identity_problem(i)
        if problem:
            raise IncompatibleModelError(problem)
        return self.insert_block(tx, self._stream_stages()[i][-1], generator)

    def _stream_stages(self) -> list[list[int]]:
        out: list[list[int]] = [[]]
        for s, stage in enumerate(self.stages(), start=1):
            if getattr(stage[0], "downsample", None) is not None:
                out.append([])
            out[-1].append(s)
        return out

    def insert_block(self, tx: Transaction, stage: int | str, generator: torch.Generator
                     ) -> str:
        """Append to ``stage`` a copy of its last block's architecture, freshly initialised
        (Kaiming normal, fan-out, from ``generator``), with the last BatchNorm's gain and bias
        ZERO: the residual branch outputs 0 and ``relu(0 + x) = x`` because the stream is
        post-ReLU. Exact in train and eval mode (Goyal et al. 2017's zero-init residual)."""
        import copy

        k = self.stage_index(stage)
        seq = getattr(self.model, f"layer{k}")
        last = seq[-1]
        block = copy.deepcopy(last)
        if getattr(block, "downsample", None) is not None:
            # the stage's only block changes resolution / width: the new block keeps both
            width = int(getattr(block, self._last(block)[1]).num_features)
            c1 = block.conv1
            with torch.device("meta"):
                block.conv1 = nn.Conv2d(width, c1.out_channels, c1.kernel_size, stride=1,
                                        padding=c1.padding, bias=False)
            block.conv1 = block.conv1.to_empty(device=c1.weight.device).to(c1.weight.dtype)
            if hasattr(block, "conv3"):
                block.conv2.stride = (1, 1)
            block.downsample = None
            block.stride = 1
        with torch.no_grad():
            for mod in block.modules():
                if isinstance(mod, nn.Conv2d):
                    fan_out = mod.out_channels * mod.kernel_size[0] * mod.kernel_size[1]
                    std = math.sqrt(2.0 / fan_out)
                    w = torch.randn(mod.weight.shape, generator=generator) * std
                    mod.weight.copy_(w.to(mod.weight.dtype))
                elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
                    mod.reset_running_stats()
                    mod.weight.fill_(1.0)
                    mod.bias.zero_()
            _, bname = self._last(block)
            _zero_residual(getattr(block, bname))
        blocks = [*seq, block]
        tx.set_modules(seq, {str(j): b for j, b in enumerate(blocks)})
        return f"identity {type(block).__name__} appended to layer{k} (now {len(blocks)} blocks)"

    # --- checkpoints -------------------------------------------------------------------------
    def arch_spec(self) -> dict[str, Any]:
        m = self.model
        block = type(m.layer1[0])
        leaves = {}
        for name, mod in m.named_modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)):
                leaves[name] = _spec_of(mod)
        return {"block": block.__name__, "layers": [len(s) for s in self.stages()],
                "num_classes": int(m.fc.out_features), "groups": int(m.groups),
                "width_per_group": int(m.base_width), "leaves": leaves}

    @classmethod
    def build_from_spec(cls, spec: dict[str, Any]) -> nn.Module:
        try:
            from torchvision.models import resnet as tvr
        except ImportError as e:  # pragma: no cover - torchvision is a dependency of [continual]
            raise IncompatibleModelError(
                "rebuilding a ResNet needs torchvision: pip install torchvision"
            ) from e
        blocks = {"BasicBlock": tvr.BasicBlock, "Bottleneck": tvr.Bottleneck}
        if not isinstance(spec, dict) or spec.get("block") not in blocks:
            raise GrowthConfigError(
                choices_message("ResNet block", getattr(spec, "get", dict().get)("block"),
                                list(blocks)))
        with torch.device("meta"):
            model = tvr.ResNet(blocks[spec["block"]], list(spec["layers"]),
                               num_classes=spec["num_classes"], groups=spec["groups"],
                               width_per_group=spec["width_per_group"])
            for name, leaf in spec["leaves"].items():
                parent_name, _, attr = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, attr, _build_layer(leaf))
        return model.to_empty(device="cpu")
