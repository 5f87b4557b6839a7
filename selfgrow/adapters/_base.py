"""The adapter API: how growth operators see a transformer of any family.

An operator never hard-codes where a model keeps its layers. It asks
:func:`get_adapter(model) <selfgrow.adapters.get_adapter>` for a :class:`TransformerAdapter`
and works on its canonical views:

* :meth:`TransformerAdapter.dims` -> :class:`TransformerDims` (n_layers, d_model, heads, ...);
* :meth:`TransformerAdapter.layer` -> :class:`LayerView` of block i: ``q, k, v, o`` and
  ``up, gate, down`` as :class:`ProjRef` (a linear map in canonical ``(out, in)`` layout that
  may live inside a fused and/or transposed parameter), ``norm1``/``norm2`` as
  :class:`NormRef`;
* embeddings, embedding norm, final norm and head (with tying);
* edits that only the family knows how to make: :meth:`~TransformerAdapter.set_layers`,
  :meth:`~TransformerAdapter.update_dims` (rewrites the family's config AND module
  attributes), :meth:`~TransformerAdapter.set_ramp`, :meth:`~TransformerAdapter.build_fresh`.

Writing weights goes through :func:`set_projection` / :func:`resize_params`, which handle fused
(``nn.MultiheadAttention.in_proj_weight``) and transposed (GPT-2 ``Conv1D``) storage and
produce the :class:`~selfgrow.optim.ParamMap` for optimizer migration. Everything is done
through a :class:`~selfgrow.core.Transaction`, so a failure rolls back.

Canonical meaning of the views (pre-LN: ``h + f(norm(h))``; post-LN: ``norm(h + f(h))``)::

    q: (H * Dh, C)   k, v: (Hkv * Dh, C)   o: (C, H * Dh)
    up, gate: (F, C) down: (C, F)          norm1 / norm2: (C,)

Adding an operator on top of the API (sketch)::

    ad = get_adapter(model)                       # raises IncompatibleModelError if unknown
    d = ad.dims()
    for i in range(d.n_layers):
        lv = ad.layer(i)
        w = lv.o.weight()                          # (C, H * Dh), canonical, a copy
        set_projection(tx, lv.o, weight=new_w, bias=new_b)   # fused/transposed handled
    ad.update_dims(tx, d_ff=new_f)                # config + module attributes

Growing along canonical axes (used by the width operators; the same recipe grows heads or
FFN units): describe each growing axis by an :class:`AxisMap` (new -> old index, -1 = new,
value and gradient scales), list the projections with
``projection_plans([(ref, out_map, in_map), ...])`` (fused/transposed storage handled), add
plain tensors (norms, embeddings) as ``{name: {dim: AxisMap}}``, and call
``resize_params(tx, model, plans, fill=...)``: it writes the tensors through the
transaction and returns the ParamMaps for optimizer migration. Then
``adapter.update_dims(tx, n_heads=..., d_ff=...)``. Example, Net2WiderNet on FFN units of
every layer (unit j copied into a new unit; see :class:`Roles`)::

    idx = torch.cat([torch.arange(F), torch.tensor([j])])
    units = Roles.from_index(idx, F)                       # write: copy; read: / count
    items = []
    for lv in ad.layer_views():
        items += [(lv.up, units.write, None), (lv.down, None, units.read)]
        if lv.gate is not None:
            items.append((lv.gate, units.write, None))
    maps = resize_params(tx, model, projection_plans(items))
    ad.update_dims(tx, d_ff=F + 1)

Adding a family: subclass :class:`TransformerAdapter`, implement the abstract methods and
decorate it with :func:`register_adapter`.
"""

from __future__ import annotations

import abc
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..core import (  # noqa: F401 - re-exported for adapter authors
    AxisMap,
    Fill,
    ParamMap,
    Roles,
    Transaction,
    normal_fill,
    register_unique,
    regrid,
    zeros_fill,
)
from ..errors import GrowthConfigError, IncompatibleModelError, choices_message


# ---------------------------------------------------------------------------------------------
# views
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TransformerDims:
    """Shape summary of a transformer, in canonical terms.

    Attributes:
        n_layers: number of blocks.
        d_model: C, residual stream width.
        n_heads: H, query heads; n_kv_heads: Hkv (== H without GQA); head_dim: Dh.
        d_ff: F, FFN hidden width.
        norm_first: pre-LN (True) or post-LN (False) blocks.
        norm: ``"layernorm"`` or ``"rmsnorm"``.
        gated: FFN has a gate projection (SwiGLU).
        heads_tied_to_width: the family computes ``head_dim = d_model // n_heads`` (BERT,
            GPT-2, nn.MultiheadAttention), so widening C must add heads of the same Dh.
        norm_eps: epsilon of the block norms.
    """

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    norm_first: bool
    norm: str = "layernorm"
    gated: bool = False
    heads_tied_to_width: bool = False
    norm_eps: float = 1e-5


@dataclass(frozen=True)
class ProjRef:
    """One linear map ``y = W x + b`` of a model in canonical layout ``W: (out, in)``.

    The map may be stored in a slice of a fused parameter (``rows`` = slice of the canonical
    output dimension, e.g. q = rows [0, C) of ``in_proj_weight``) and/or transposed
    (GPT-2 ``Conv1D`` stores ``(in, out)``).

    Attributes:
        path: dotted path of the module owning the parameters (``"layers.0.attn.q"``).
        module: that module.
        weight_attr / bias_attr: attribute names of the weight and bias parameters there
            (``bias_attr`` None when the family has no bias or the bias is None).
        rows: ``(start, stop)`` of the canonical output dimension inside a fused parameter, or
            None when the parameter holds this map alone.
        transposed: parameter stored as ``(in, out)``.
    """

    path: str
    module: nn.Module
    weight_attr: str = "weight"
    bias_attr: str | None = "bias"
    rows: tuple[int, int] | None = None
    transposed: bool = False

    @property
    def weight_name(self) -> str:
        """Full parameter name of the (possibly fused) weight."""
        return f"{self.path}.{self.weight_attr}" if self.path else self.weight_attr

    @property
    def bias_name(self) -> str | None:
        if self.bias_attr is None or getattr(self.module, self.bias_attr, None) is None:
            return None
        return f"{self.path}.{self.bias_attr}" if self.path else self.bias_attr

    def raw_weight(self) -> torch.Tensor:
        return getattr(self.module, self.weight_attr)

    def raw_bias(self) -> torch.Tensor | None:
        return None if self.bias_attr is None else getattr(self.module, self.bias_attr, None)

    def weight(self) -> torch.Tensor:
        """Canonical ``(out, in)`` weight (a detached copy)."""
        w = self.raw_weight().detach()
        w = w.t() if self.transposed else w
        if self.rows is not None:
            w = w[self.rows[0]:self.rows[1]]
        return w.clone()

    def bias(self) -> torch.Tensor | None:
        """Canonical ``(out,)`` bias (a detached copy) or None."""
        b = self.raw_bias()
        if b is None:
            return None
        b = b.detach()
        if self.rows is not None:
            b = b[self.rows[0]:self.rows[1]]
        return b.clone()

    @property
    def out_features(self) -> int:
        w = self.raw_weight()
        if self.rows is not None:
            return self.rows[1] - self.rows[0]
        return w.shape[1] if self.transposed else w.shape[0]

    @property
    def in_features(self) -> int:
        w = self.raw_weight()
        return w.shape[0] if self.transposed else w.shape[1]


@dataclass(frozen=True)
class NormRef:
    """A LayerNorm / RMSNorm: ``weight`` (C,) and optional ``bias`` (C,) of ``module``."""

    path: str
    module: nn.Module

    @property
    def weight_name(self) -> str:
        return f"{self.path}.weight"

    @property
    def bias_name(self) -> str | None:
        return f"{self.path}.bias" if getattr(self.module, "bias", None) is not None else None

    @property
    def eps(self) -> float:
        for a in ("eps", "variance_epsilon"):
            if hasattr(self.module, a):
                return float(getattr(self.module, a))
        return 1e-5


@dataclass(frozen=True)
class EmbRef:
    """An embedding table ``weight (N, C)`` whose columns write the residual stream."""

    path: str
    module: nn.Module
    weight_attr: str = "weight"

    @property
    def weight_name(self) -> str:
        return f"{self.path}.{self.weight_attr}"


@dataclass
class LayerView:
    """Canonical view of one transformer block (see the module docstring).

    Attributes:
        index: position in the layer list; path: dotted path (``"encoder.layer.3"``);
        module: the block module.
        q, k, v, o: attention projections; up, gate, down: FFN projections (gate None unless
            the FFN is gated).
        norm1: norm of the attention sub-block (before it in pre-LN, after the residual add in
            post-LN); norm2: same for the FFN sub-block.
    """

    index: int
    path: str
    module: nn.Module
    q: ProjRef
    k: ProjRef
    v: ProjRef
    o: ProjRef
    up: ProjRef
    down: ProjRef
    norm1: NormRef
    norm2: NormRef
    gate: ProjRef | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def projections(self) -> dict[str, ProjRef]:
        """``{"q": ..., "k": ..., "v": ..., "o": ..., "up": ..., ["gate": ...], "down": ...}``."""
        d = {"q": self.q, "k": self.k, "v": self.v, "o": self.o, "up": self.up}
        if self.gate is not None:
            d["gate"] = self.gate
        d["down"] = self.down
        return d

    def out_projections(self) -> list[ProjRef]:
        """The projections that write the residual stream (attention output, FFN down):
        zeroing them (weights and biases) makes a pre-LN block an exact identity."""
        return [self.o, self.down]


# ---------------------------------------------------------------------------------------------
# the adapter base class and registry
# ---------------------------------------------------------------------------------------------
class Adapter(abc.ABC):
    """How selfgrow sees one model family (the base of every adapter kind).

    An adapter is a light, stateless wrapper built per operation with
    ``get_adapter(model)``. Subclasses set ``family`` (a short, unique name used in errors and
    checkpoints) and ``kind`` (``"transformer"`` or ``"classifier"``: which operators and
    controller actions apply), implement :meth:`matches`, and are registered with
    :func:`register_adapter`.

    Checkpoints: :meth:`arch_spec` describes the CURRENT (possibly grown) architecture as
    JSON-serialisable data and :meth:`build_from_spec` rebuilds an untrained model of exactly
    that shape, so ``save_checkpoint`` / ``load_checkpoint`` work for the family with no
    registration by the user.
    """

    family: ClassVar[str] = ""
    kind: ClassVar[str] = ""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @classmethod
    @abc.abstractmethod
    def matches(cls, model: nn.Module) -> bool:
        """True if this adapter handles ``model``."""

    def arch_spec(self) -> dict[str, Any]:
        """JSON-serialisable description of the current architecture (see
        :meth:`build_from_spec`).

        Raises:
            IncompatibleModelError: the family cannot be checkpointed by selfgrow.
        """
        raise IncompatibleModelError(
            f"{self.family} models cannot be described for a selfgrow checkpoint; save the "
            f"weights with the family's own tools"
        )

    @classmethod
    def build_from_spec(cls, spec: dict[str, Any]) -> nn.Module:
        """An untrained model of the architecture described by ``spec`` (from
        :meth:`arch_spec`); weights are then loaded from the checkpoint.

        Raises:
            IncompatibleModelError: the family cannot be rebuilt by selfgrow.
            GrowthConfigError: the spec is malformed.
        """
        raise IncompatibleModelError(f"{cls.family} models cannot be rebuilt from a spec")


class TransformerAdapter(Adapter):
    """How growth operators find and edit the parts of one transformer family.

    Subclasses set ``family`` (a short name used in errors) and implement the abstract
    methods; register them with :func:`register_adapter`. An adapter is a light, stateless
    wrapper: build one per operation with ``get_adapter(model)``.
    """

    kind: ClassVar[str] = "transformer"
    #: the family can ramp new post-LN blocks in (depth mask ramp, exact at m = 0)
    supports_ramp: ClassVar[bool] = False
    #: the family supports masked normalisation (``widen_d_model_masked``)
    supports_norm_mask: ClassVar[bool] = False

    # --- structure ---------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def layers_path(self) -> str:
        """Dotted path of the layer ModuleList (``"layers"``, ``"encoder.layer"``, ``"h"``)."""

    def layers(self) -> nn.ModuleList:
        mod = self.model.get_submodule(self.layers_path)
        if not isinstance(mod, nn.ModuleList):
            raise IncompatibleModelError(f"{self.layers_path} is not an nn.ModuleList")
        return mod

    @abc.abstractmethod
    def dims(self) -> TransformerDims:
        """Current shape (read from the family's config, checked against the modules)."""

    @abc.abstractmethod
    def layer(self, i: int) -> LayerView:
        """Canonical view of block ``i``."""

    def layer_views(self) -> list[LayerView]:
        return [self.layer(i) for i in range(len(self.layers()))]

    @abc.abstractmethod
    def embeddings(self) -> list[EmbRef]:
        """Tables added into the residual stream (tokens, learned positions, token types)."""

    def embed_norm(self) -> NormRef | None:
        """Norm applied to the embeddings before the first block (BERT), if any."""
        return None

    def final_norm(self) -> NormRef | None:
        """Norm after the last block (pre-LN families), if any."""
        return None

    def head(self) -> ProjRef | None:
        """Output projection reading the stream ``(V, C)``, if the model has one."""
        return None

    def extra_projections(self) -> list[tuple[ProjRef, bool, bool]]:
        """Other linear maps touching width C: ``(ref, reads_stream, writes_C)`` (BERT's
        pooler dense reads the stream and writes a C-wide output)."""
        return []

    def tied(self) -> bool:
        """The head shares its weight with the token embedding."""
        h = self.head()
        embs = self.embeddings()
        return h is not None and bool(embs) and h.raw_weight() is getattr(
            embs[0].module, embs[0].weight_attr
        )

    # --- edits -------------------------------------------------------------------------------
    def set_layers(self, tx: Transaction, blocks: list[nn.Module]) -> None:
        """Replace the whole layer list by ``blocks`` (in order) and update n_layers."""
        container = self.layers()
        tx.set_modules(container, {str(i): b for i, b in enumerate(blocks)})
        self.after_set_layers(tx, blocks)
        self.update_dims(tx, n_layers=len(blocks))

    def after_set_layers(self, tx: Transaction, blocks: list[nn.Module]) -> None:  # noqa: B027
        """Hook: renumber per-layer attributes (HF ``layer_idx``) after a depth change."""

    @abc.abstractmethod
    def update_dims(self, tx: Transaction, **dims: Any) -> None:
        """Record new canonical dims (keys of :class:`TransformerDims`) in the family's config
        and in module attributes that cache them (``in_features``, ``num_heads``, ...)."""

    def set_ramp(self, tx: Transaction, block: nn.Module, value: float) -> None:
        """Set the depth mask ramp of ``block`` (only if ``supports_ramp``)."""
        raise IncompatibleModelError(
            f"{self.family} blocks have no depth mask ramp; post-LN identity insertion needs "
            f"one (selfgrow GrowableTransformer has it) or the exact norm-transfer construction"
        )

    def enable_norm_mask(self, tx: Transaction) -> None:
        """Switch every norm to masked statistics (only if ``supports_norm_mask``)."""
        raise IncompatibleModelError(f"{self.family} has no masked normalisation")

    @abc.abstractmethod
    def build_fresh(self) -> nn.Module:
        """A freshly initialised model built from the current (possibly grown) config."""

    def check(self) -> None:
        """Raise IncompatibleModelError if the config disagrees with the modules."""
        d = self.dims()
        layers = self.layers()
        if len(layers) != d.n_layers:
            raise IncompatibleModelError(
                f"{self.family}: config says {d.n_layers} layers, model has {len(layers)} "
                f"(config disagrees with modules)"
            )
        for i in range(len(layers)):
            lv = self.layer(i)
            want = {
                "q": (d.n_heads * d.head_dim, d.d_model),
                "k": (d.n_kv_heads * d.head_dim, d.d_model),
                "v": (d.n_kv_heads * d.head_dim, d.d_model),
                "o": (d.d_model, d.n_heads * d.head_dim),
                "up": (d.d_ff, d.d_model),
                "gate": (d.d_ff, d.d_model),
                "down": (d.d_model, d.d_ff),
            }
            for name, ref in lv.projections().items():
                got = (ref.out_features, ref.in_features)
                if got != want[name]:
                    raise IncompatibleModelError(
                        f"{self.family}: layer {i} {name} has shape {got}, config implies "
                        f"{want[name]} (config disagrees with modules)"
                    )
            for nr in (lv.norm1, lv.norm2):
                if nr.module.weight.shape[0] != d.d_model:
                    raise IncompatibleModelError(
                        f"{self.family}: {nr.path} has width {nr.module.weight.shape[0]}, "
                        f"config d_model={d.d_model}"
                    )


AdapterCls = type[Adapter]
_ADAPTERS: dict[str, AdapterCls] = {}
ADAPTER_KINDS = ("classifier", "transformer")
_ADD_FAMILY_HINT = (
    "To support it: subclass selfgrow.adapters.TransformerAdapter or ClassifierAdapter and "
    "decorate it with @selfgrow.adapters.register_adapter, or teach the controller one action "
    "with selfgrow.control.register_action(ModelClass, 'widen')(fn) (see docs/extending.md)"
)


def register_adapter(cls: AdapterCls | None = None, *, override: bool = False) -> Any:
    """Class decorator adding an adapter (``@register_adapter`` or
    ``@register_adapter(override=True)``). Adapters registered later are tried first.

    Raises:
        GrowthConfigError: ``family`` or ``kind`` unset/unknown, or ``family`` already taken
            by another adapter (pass ``override=True`` to replace it on purpose).
    """

    def deco(c: AdapterCls) -> AdapterCls:
        if not c.family:
            raise GrowthConfigError(f"{c.__name__} must set the class variable 'family'")
        if c.kind not in ADAPTER_KINDS:
            raise GrowthConfigError(choices_message(f"adapter kind of {c.__name__}", c.kind,
                                                    ADAPTER_KINDS))
        register_unique(_ADAPTERS, c.family, c, "adapter family", override=override)
        # most recent first: move the key to the end and iterate reversed
        _ADAPTERS[c.family] = _ADAPTERS.pop(c.family)
        return c

    return deco(cls) if cls is not None else deco


def supported_families(kind: str | None = None) -> list[str]:
    """Registered adapter families (of one ``kind`` if given), most recent first."""
    _load_builtin()
    return [f for f, a in reversed(_ADAPTERS.items()) if kind is None or a.kind == kind]


def _load_builtin() -> None:
    import importlib
    import pkgutil

    from . import __path__ as p

    for m in pkgutil.iter_modules(p):
        if not m.name.startswith("_"):
            importlib.import_module(f"{__package__}.{m.name}")


def find_adapter(model: nn.Module, kind: str | None = None) -> Adapter | None:
    """The adapter for ``model`` (of ``kind`` if given), or None when no family matches."""
    _load_builtin()
    for a in reversed(list(_ADAPTERS.values())):
        if (kind is None or a.kind == kind) and a.matches(model):
            return a(model)
    return None


def adapter_class(family: str) -> AdapterCls:
    """The adapter class registered under ``family`` (used to rebuild checkpoints).

    Raises:
        GrowthConfigError: unknown family (lists the registered ones).
    """
    _load_builtin()
    cls = _ADAPTERS.get(family)
    if cls is None:
        raise GrowthConfigError(choices_message("adapter family", family, list(_ADAPTERS)))
    return cls


def get_adapter(model: nn.Module, kind: str = "transformer") -> Any:
    """The adapter of ``kind`` for ``model``'s family (a :class:`TransformerAdapter` by
    default).

    Raises:
        IncompatibleModelError: no registered adapter of that kind matches; the message lists
            the supported families and how to add one.
    """
    if kind not in ADAPTER_KINDS:
        raise GrowthConfigError(choices_message("adapter kind", kind, ADAPTER_KINDS))
    ad = find_adapter(model, kind)
    if ad is not None:
        return ad
    raise IncompatibleModelError(
        f"no {kind} adapter for {type(model).__name__}; supported {kind} families: "
        f"{', '.join(supported_families(kind))}. {_ADD_FAMILY_HINT}"
    )


def describe_architecture(model: nn.Module) -> dict[str, Any]:
    """JSON-serialisable description of ``model``'s current (possibly grown) architecture:
    ``{"family": "selfgrow", "config": {type, version, data}}`` for selfgrow's registered
    models, else ``{"family": adapter.family, "spec": adapter.arch_spec()}``.

    Raises:
        IncompatibleModelError: no selfgrow config and no adapter understands the model (the
            message names the supported families and how to add one).
    """
    from ..models import is_registered_model, model_config_dict

    if is_registered_model(model):
        return {"family": "selfgrow", "config": model_config_dict(model)}
    ad = find_adapter(model)
    if ad is None:
        raise IncompatibleModelError(
            f"cannot describe {type(model).__name__} for a checkpoint: no selfgrow config and "
            f"no adapter; supported families: {', '.join(supported_families())}. "
            f"{_ADD_FAMILY_HINT}"
        )
    return {"family": ad.family, "spec": ad.arch_spec()}


def build_architecture(arch: dict[str, Any]) -> nn.Module:
    """An untrained model of the architecture :func:`describe_architecture` described.

    Raises:
        GrowthConfigError: malformed description, unknown family or config type, or a config
            version newer than this selfgrow reads.
    """
    from ..models import build_model

    if not isinstance(arch, dict) or "family" not in arch:
        raise GrowthConfigError(f"not an architecture description: {arch!r}")
    if arch["family"] == "selfgrow":
        return build_model(arch["config"])
    return adapter_class(arch["family"]).build_from_spec(arch["spec"])


# ---------------------------------------------------------------------------------------------
# index maps and writing weights
# ---------------------------------------------------------------------------------------------
def set_param(tx: Transaction, model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter ``name`` (dotted) of ``model`` by ``value`` through ``tx``; keeps
    requires_grad, device and dtype of the old parameter. Tied parameters (the same tensor
    registered under several names) are replaced everywhere."""
    mod_path, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_path) if mod_path else model
    old = mod._parameters[attr]
    new = nn.Parameter(
        value.detach().to(device=old.device, dtype=old.dtype).contiguous(),
        requires_grad=old.requires_grad,
    )
    for m in model.modules():
        for k, p in list(m._parameters.items()):
            if p is old:
                tx.set_parameter(m, k, new)


def set_projection(
    tx: Transaction,
    model: nn.Module,
    ref: ProjRef,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> None:
    """Write a canonical ``(out, in)`` weight and/or ``(out,)`` bias into the parameter(s)
    behind ``ref`` (fused slice and transposition handled). Shapes must equal the current
    ones when ``ref`` is a fused slice; otherwise the parameter is replaced by one of the new
    shape (call the adapter's ``update_dims`` afterwards to fix module attributes)."""
    if weight is not None:
        if ref.rows is not None:
            full = ref.raw_weight().detach().clone()
            full_c = full.t() if ref.transposed else full
            full_c[ref.rows[0]:ref.rows[1]] = weight.to(full.dtype)
            new = full_c.t() if ref.transposed else full_c
        else:
            new = weight.t() if ref.transposed else weight
        set_param(tx, model, ref.weight_name, new)
    if bias is not None:
        if ref.bias_name is None:
            raise IncompatibleModelError(f"{ref.path} has no bias to set")
        if ref.rows is not None:
            full_b = ref.raw_bias().detach().clone()  # type: ignore[union-attr]
            full_b[ref.rows[0]:ref.rows[1]] = bias.to(full_b.dtype)
            bias = full_b
        set_param(tx, model, ref.bias_name, bias)


def resize_params(
    tx: Transaction,
    model: nn.Module,
    plans: dict[str, dict[int, AxisMap]],
    fill: Fill | dict[str, Fill] = zeros_fill,
    post: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> dict[str, ParamMap]:
    """Regrid several parameters by name (actual storage layout) and return their ParamMaps.

    Args:
        plans: ``{param_name: {dim: AxisMap}}`` in the parameter's own layout.
        fill: fill for brand-new coordinates (one for all, or per parameter name).
        post: optional per-name function applied to the regridded tensor (e.g. symmetric
            noise) before it is written.

    Returns:
        ``{param_name: ParamMap(source=param_name, ...)}``.
    """
    named = dict(model.named_parameters(remove_duplicate=False))
    maps: dict[str, ParamMap] = {}
    for name, axes in plans.items():
        if name not in named:
            raise IncompatibleModelError(f"no parameter {name!r} in {type(model).__name__}")
        f = fill.get(name, zeros_fill) if isinstance(fill, dict) else fill
        new, pm = regrid(named[name], axes, f)
        if post and name in post:
            new = post[name](new)
        set_param(tx, model, name, new)
        pm.source = name
        maps[name] = pm
    return maps


def projection_axes(ref: ProjRef, out_map: AxisMap | None, in_map: AxisMap | None) -> dict:
    """Axes dict for the weight behind an unfused ``ref`` (transposition handled)."""
    axes: dict[int, AxisMap] = {}
    od, idim = (1, 0) if ref.transposed else (0, 1)
    if out_map is not None:
        axes[od] = out_map
    if in_map is not None:
        axes[idim] = in_map
    return axes


def projection_plans(
    items: list[tuple[ProjRef, AxisMap | None, AxisMap | None]],
) -> dict[str, dict[int, AxisMap]]:
    """:func:`resize_params` plans for projections given canonical axis maps.

    Args:
        items: ``(ref, out_map, in_map)``: how the canonical output rows and input columns
            of ``ref`` grow (None = unchanged). Refs that share a fused parameter (q/k/v in
            ``in_proj_weight`` or GPT-2 ``c_attn``) are merged into one plan for that
            parameter; all its slices must be listed; transposed storage is handled.

    Returns:
        ``{param_name: {dim: AxisMap}}`` for the weights and (when the output grows) biases.
    """
    groups: dict[str, list[tuple[ProjRef, AxisMap | None, AxisMap | None]]] = defaultdict(list)
    for it in items:
        groups[it[0].weight_name].append(it)
    plans: dict[str, dict[int, AxisMap]] = {}
    for name, its in groups.items():
        ref0 = its[0][0]
        if ref0.rows is not None:
            its.sort(key=lambda t: t[0].rows[0])  # type: ignore[index]
            total = ref0.raw_weight().shape[1 if ref0.transposed else 0]
            if sum(r.out_features for r, _, _ in its) != total:
                raise IncompatibleModelError(f"fused parameter {name} not fully described")
            if all(o is None for _, o, _ in its):
                om = None
            else:
                om = AxisMap.concat(
                    (r.rows[0], o if o is not None else AxisMap.identity(r.out_features))
                    for r, o, _ in its  # type: ignore[index]
                )
        else:
            om = its[0][1]
        im = its[0][2]
        axes = projection_axes(ref0, om, im)
        if axes:
            plans[name] = axes
        if om is not None and ref0.bias_name is not None:
            plans[ref0.bias_name] = {0: om}
    return plans


def sync_module_attrs(tx: Transaction, root: nn.Module) -> None:
    """Make cached size attributes of standard modules agree with their parameters:
    ``nn.Linear.in/out_features``, ``nn.Embedding.embedding_dim``,
    ``nn.LayerNorm.normalized_shape``, HF ``Conv1D.nf`` / ``nx``."""
    for m in root.modules():
        if isinstance(m, nn.Linear):
            o, i = m.weight.shape
            if m.in_features != i:
                tx.set_attr(m, "in_features", i)
            if m.out_features != o:
                tx.set_attr(m, "out_features", o)
        elif isinstance(m, nn.Embedding):
            if m.embedding_dim != m.weight.shape[1]:
                tx.set_attr(m, "embedding_dim", m.weight.shape[1])
            if m.num_embeddings != m.weight.shape[0]:
                tx.set_attr(m, "num_embeddings", m.weight.shape[0])
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None and tuple(m.normalized_shape) != tuple(m.weight.shape):
                tx.set_attr(m, "normalized_shape", tuple(m.weight.shape))
        elif type(m).__name__ == "Conv1D" and hasattr(m, "nf"):
            nx, nf = m.weight.shape
            if m.nf != nf:
                tx.set_attr(m, "nf", nf)
            if getattr(m, "nx", nx) != nx:
                tx.set_attr(m, "nx", nx)
        elif hasattr(m, "hidden_size") and hasattr(m, "weight") and m.weight is not None:
            # HF RMSNorm-like modules caching their width
            if isinstance(m.hidden_size, int) and m.weight.dim() == 1 and m.hidden_size != int(
                m.weight.shape[0]
            ):
                tx.set_attr(m, "hidden_size", int(m.weight.shape[0]))
