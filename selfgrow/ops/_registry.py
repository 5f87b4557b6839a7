"""Operator registry and the single entry point :func:`grow_`.

An operator is a class registered for one config dataclass (torchao style)::

    @dataclass
    class Net2WiderConfig(OpConfig):
        name: ClassVar[str] = "net2wider"
        layer: int = 0
        new_width: int = 64

    @register_operator(Net2WiderConfig)
    class Net2WiderNet(Operator):
        exact = True
        def validate(self, model, config): ...      # raise, never mutate
        def apply(self, model, config, tx): ...     # mutate only through tx -> GrowthResult

``grow_(model, config, optimizer=..., probe=...)`` validates, applies inside a
:class:`~selfgrow.core.Transaction`, plans the optimizer migration, measures the
function-preservation error on the probe batch, and only then commits; any exception leaves
model and optimizer bit-identical.
"""

from __future__ import annotations

import abc
import contextvars
import copy
import dataclasses
import inspect
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from .._config import config_from_dict, config_to_dict
from ..core import (
    Transaction,
    autocast_disabled,
    compute_dtype,
    count_params,
    eval_mode,
    measurement,
    register_unique,
    reset_compiled,
    unwrap_compiled,
)
from ..errors import (
    GrowthConfigError,
    IncompatibleModelError,
    InsufficientMemoryError,
    SelfgrowWarning,
    choices_message,
)
from ..events.record import GrowthEvent
from ..optim import (
    ParamMap,
    ParamTransition,
    check_optimizer_holds_model,
    plan_grads,
    plan_migration,
)


@dataclass
class OpConfig:
    """Base of every operator config. Subclasses set the class variable ``name`` (the
    registry key, a standard term such as ``"g_stack"``) and add their own fields."""

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1


@dataclass
class GrowthResult:
    """What an operator's ``apply`` returns.

    Attributes:
        param_maps: ParamMap for every new-model parameter that was re-indexed, renamed or
            created (see :mod:`selfgrow.optim`). Parameters untouched by the operator need no
            entry.
        exact: whether this application is expected to preserve the function exactly.
        notes: free-form details for the event log (e.g. which layers were touched).
    """

    param_maps: dict[str, ParamMap] = field(default_factory=dict)
    exact: bool = True
    notes: dict[str, Any] = field(default_factory=dict)


class Operator(abc.ABC):
    """Base class of growth operators. Subclasses implement ``validate`` and ``apply``."""

    #: default exactness claim; override ``is_exact`` when it depends on the config
    exact: ClassVar[bool] = False
    #: a shrink operator (it removes capacity): the controller logs it as a ``"prune"``
    #: event under the policy's prune limits
    shrinks: ClassVar[bool] = False
    config_cls: ClassVar[type[OpConfig]]

    def is_exact(self, model: nn.Module, config: OpConfig) -> bool:
        return self.exact

    def is_shrink(self, config: OpConfig) -> bool:
        """Whether this application removes capacity (default :attr:`shrinks`; an operator
        that wraps another, such as ``component``, answers for its step)."""
        return self.shrinks

    def validate(self, model: nn.Module, config: OpConfig) -> None:  # noqa: B027 - optional hook
        """Raise GrowthConfigError / IncompatibleModelError if the request is invalid."""

    @abc.abstractmethod
    def apply(self, model: nn.Module, config: OpConfig, tx: Transaction) -> GrowthResult:
        """Mutate ``model`` only through ``tx`` and describe the parameter mapping."""


_OPERATORS: dict[str, Operator] = {}
_OPERATOR_CLASSES: dict[str, type[Operator]] = {}
_CONFIGS: dict[str, type[OpConfig]] = {}


def register_operator(
    config_cls: type[OpConfig], *, override: bool = False
) -> Callable[[type[Operator]], type[Operator]]:
    """Class decorator registering an Operator for ``config_cls`` (keyed by
    ``config_cls.name``).

    Raises:
        GrowthConfigError: ``config_cls.name`` is unset, or already registered to another
            operator class (the one duplicate rule of selfgrow's registries; pass
            ``override=True`` to replace it on purpose).
    """

    def deco(op_cls: type[Operator]) -> type[Operator]:
        name = config_cls.name
        if not name:
            raise GrowthConfigError(f"{config_cls.__name__} must set a class variable 'name'")
        register_unique(_OPERATOR_CLASSES, name, op_cls, "operator", override=override)
        op_cls.config_cls = config_cls
        _OPERATORS[name] = op_cls()
        _CONFIGS[config_cls.__name__] = config_cls
        return op_cls

    return deco


def list_operators() -> list[str]:
    """Names of every registered operator, sorted."""
    _load_builtin()
    return sorted(_OPERATORS)


def get_operator(name_or_config: str | OpConfig) -> Operator:
    """The Operator for a name or a config instance; GrowthConfigError lists the choices."""
    _load_builtin()
    if not isinstance(name_or_config, (str, OpConfig)):
        raise GrowthConfigError(
            f"expected an operator config or operator name, got "
            f"{type(name_or_config).__name__} {name_or_config!r:.80}; build one with "
            f"make_config(name, **fields) (or op_config_from_dict for a saved dict)"
        )
    name = name_or_config if isinstance(name_or_config, str) else type(name_or_config).name
    op = _OPERATORS.get(name)
    if op is None or (
        not isinstance(name_or_config, str) and not isinstance(name_or_config, op.config_cls)
    ):
        raise GrowthConfigError(choices_message("growth operator", name, list(_OPERATORS)))
    return op


def build_config(cls: type[OpConfig], **kwargs: Any) -> OpConfig:
    """``cls(**kwargs)`` for an operator config class; unknown or missing fields raise the
    project's error naming the valid fields (never a raw TypeError).

    Raises:
        GrowthConfigError: an unknown field, a missing required field, or a value the config
            rejects.
    """
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        raise GrowthConfigError(
            f"unknown field(s) {unknown} for {cls.__name__} (operator {cls.name!r}); valid "
            f"fields: {', '.join(fields) or 'none'}"
        )
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as e:
        raise GrowthConfigError(
            f"bad arguments for {cls.__name__} (operator {cls.name!r}): {e}; valid fields: "
            f"{', '.join(fields)}"
        ) from None
    return cls(**kwargs)


def make_config(name: str, **kwargs: Any) -> OpConfig:
    """Build the config of operator ``name`` from keyword arguments.

    Raises:
        GrowthConfigError: unknown operator (lists them) or unknown/missing field (lists the
            valid fields).
    """
    return build_config(get_operator(name).config_cls, **kwargs)


def op_config_to_dict(cfg: OpConfig) -> dict[str, Any]:
    return config_to_dict(cfg)


def op_config_from_dict(d: dict[str, Any]) -> OpConfig:
    _load_builtin()
    return config_from_dict(d, _CONFIGS)


def _load_builtin() -> None:
    # importing the operator modules registers them
    from . import _builtin  # noqa: F401


# ---------------------------------------------------------------------------------------------
# probing
# ---------------------------------------------------------------------------------------------
ProbeFn = Callable[[nn.Module], torch.Tensor]


def default_probe_fn(probe: Any) -> ProbeFn:
    """Turn a probe batch into ``model -> output tensor``: a tensor is passed positionally, a
    dict as keyword arguments, a tuple/list as positional arguments. The output may be a
    tensor, a tuple (first element), or an object with ``logits`` / ``last_hidden_state``."""

    def run(model: nn.Module) -> torch.Tensor:
        if isinstance(probe, Mapping):
            out = model(**probe)
        elif isinstance(probe, (tuple, list)):
            out = model(*probe)
        else:
            out = model(probe)
        return output_tensor(out)

    return run


def output_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for attr in ("logits", "last_hidden_state"):
        v = getattr(out, attr, None)
        if isinstance(v, torch.Tensor):
            return v
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, Mapping):
        for v in out.values():
            if isinstance(v, torch.Tensor):
                return v
    raise IncompatibleModelError(
        f"cannot find an output tensor in {type(out).__name__}; pass probe_fn=model->Tensor"
    )


@torch.no_grad()
def eval_output(model: nn.Module, fn: ProbeFn) -> torch.Tensor:
    """Run ``fn(model)`` in eval mode without gradients, restoring each module's mode; the
    forward is a :func:`~selfgrow.core.measurement` (statistics-keeping modules skip it)."""
    with eval_mode(model), measurement():
        return fn(model).detach().clone()


def preservation_error(before: torch.Tensor, after: torch.Tensor) -> dict[str, Any]:
    """``max_abs = max|after - before|``, ``max_rel = max_abs / max|before|`` (fp64 math).

    When growth widened the output's last dimension (e.g. ``widen_d_model`` on a model whose
    output is the residual stream), the old features are compared with the first
    ``before.shape[-1]`` features of the new output, and ``compared`` says so. Any other shape
    change gives ``inf`` errors and ``compared="shape changed"``.
    """
    note: dict[str, Any] = {}
    if before.shape != after.shape:
        widened = (
            before.dim() == after.dim()
            and before.dim() > 0
            and before.shape[:-1] == after.shape[:-1]
            and after.shape[-1] > before.shape[-1]
        )
        if not widened:
            return {
                "max_abs": float("inf"),
                "max_rel": float("inf"),
                "compared": f"shape changed {tuple(before.shape)} -> {tuple(after.shape)}",
            }
        d, big = before.shape[-1], after.shape[-1]
        after = after[..., :d]
        note["compared"] = f"first {d} of {big} output features"
    diff = (after.double() - before.double()).abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    scale = float(before.double().abs().max()) if before.numel() else 0.0
    return {"max_abs": max_abs, "max_rel": max_abs / max(scale, 1e-30), **note}


#: documented bound on ``preservation["max_rel"]`` of an EXACT growth, by the dtype the
#: forward computes in (:func:`~selfgrow.core.compute_dtype`: the parameters' dtype, or
#: autocast's). Measured over every exact operator x model family by
#: ``benchmarks/precision.py`` (docs/precision.md): max 1.1e-6 (fp32), 2.7e-3 (fp16),
#: 2.7e-2 (bf16 parameters), 1.4e-2 (fp32 parameters under bf16 autocast); the bounds are
#: about 10 machine epsilons for the 16-bit types (3-4x the measured maximum) and the
#: project's fp32 rule (docs/GROWTH-MATH.md). fp64 holds only for models that compute in
#: fp64 throughout (HF LLaMA's RMSNorm computes in fp32: 1e-6 there).
PRESERVATION_TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 1e-2,
    torch.bfloat16: 8e-2,
}


def preservation_tolerance(dtype: torch.dtype) -> float:
    """The documented max relative preservation error of an exact growth of a model that
    computes in ``dtype`` (see :data:`PRESERVATION_TOLERANCE`).

    Raises:
        GrowthConfigError: ``dtype`` is not one of the floating dtypes listed, naming them.
    """
    tol = PRESERVATION_TOLERANCE.get(dtype) if isinstance(dtype, torch.dtype) else None
    if tol is None:
        raise GrowthConfigError(choices_message(
            "compute dtype", dtype, [str(d) for d in PRESERVATION_TOLERANCE]))
    return tol


_MAX_BYTES: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "selfgrow_max_growth_bytes", default=None
)
#: new tensors + two optimizer-state tensors (Adam) + one temporary copy per grown byte
ALLOCATION_FACTOR = 4


def available_memory(device: torch.device) -> int | None:
    """Free bytes on ``device``: ``torch.cuda.mem_get_info`` on CUDA, ``MemAvailable`` of
    /proc/meminfo on CPU; None when unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            with open("/proc/meminfo", encoding="ascii") as fh:
                for line in fh:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def check_allocation(model: nn.Module, grown_bytes: int, op: str) -> None:
    """Refuse a growth whose new tensors (``grown_bytes``, computed from shapes before any
    allocation) times :data:`ALLOCATION_FACTOR` (optimizer state and temporaries) exceed the
    cap passed to :func:`grow_` (``max_bytes``) or the memory available on the model's device.

    Raises:
        InsufficientMemoryError: with the bytes needed, the bytes available and the device.
    """
    need = int(grown_bytes) * ALLOCATION_FACTOR
    p = next(iter(model.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    cap = _MAX_BYTES.get()
    avail = cap if cap is not None else available_memory(device)
    if avail is not None and need > avail:
        what = "the max_bytes cap" if cap is not None else f"the memory available on {device}"
        raise InsufficientMemoryError(
            f"{op}: the grown tensors need about {need:.3g} bytes ({grown_bytes:.3g} for the "
            f"new tensors, x{ALLOCATION_FACTOR} with optimizer state and temporaries), more "
            f"than {what} ({avail:.3g} bytes on {device}); nothing was changed"
        )


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise IncompatibleModelError(f"grow_ needs a torch.nn.Module, got {type(model).__name__}")
    params = list(model.parameters())
    if not params:
        raise IncompatibleModelError("model has no parameters to grow")
    if any(p.is_meta for p in params):
        raise IncompatibleModelError(
            "model has parameters on the meta device; materialise it (e.g. to_empty + init) "
            "before growing"
        )
    if not any(p.requires_grad for p in params):
        raise IncompatibleModelError(
            "every parameter of the model is frozen (requires_grad=False); unfreeze the part "
            "to grow first"
        )


# ---------------------------------------------------------------------------------------------
# shape-only size estimates
# ---------------------------------------------------------------------------------------------
def meta_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module structure whose parameters and buffers are META tensors of
    the same shapes: no tensor data is copied or allocated, whatever the model's size. A
    ``torch.compile`` wrapper is unwrapped first (the twin is a plain module)."""
    model = unwrap_compiled(model)
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"),
                                   requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def estimate_growth(model: nn.Module, config: OpConfig) -> dict[str, Any]:
    """Size of ``model`` after ``grow_(model, config)``, from shapes alone: the operator runs
    on a :func:`meta_twin` (no tensor data, nothing allocated), so the counts are exact.

    Returns:
        ``{"params_before", "params_after"`` (elements)``, "param_bytes_before",
        "param_bytes_after"`` (bytes of the parameters)``}``.

    Raises:
        GrowthConfigError / IncompatibleModelError: the growth is invalid (as ``grow_``).
    """
    op = get_operator(config)
    model = unwrap_compiled(model)
    twin = meta_twin(model)
    with autocast_disabled(model):
        op.validate(twin, config)
        with Transaction() as tx:
            op.apply(twin, copy.deepcopy(config), tx)

    def nbytes(m: nn.Module) -> int:
        return sum(p.numel() * p.element_size() for p in m.parameters())

    return {"params_before": count_params(model), "params_after": count_params(twin),
            "param_bytes_before": nbytes(model), "param_bytes_after": nbytes(twin)}


# ---------------------------------------------------------------------------------------------
# grow_
# ---------------------------------------------------------------------------------------------
def grow_(
    model: nn.Module,
    config: OpConfig,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    probe: Any = None,
    probe_fn: ProbeFn | None = None,
    check: Callable[[nn.Module], None] | None = None,
    max_bytes: int | None = None,
    on_commit: Callable[[ParamTransition], None] | None = None,
) -> GrowthEvent:
    """Apply a growth operator to ``model`` in place and migrate ``optimizer``'s state.

    ``torch.compile``: pass the compiled wrapper or its module; the real module
    (``compiled._orig_mod``) is grown in place, the optimizer holds its parameters (the
    wrapper's, the same objects), and the compiled code of the model's frames is dropped
    after the commit (:func:`~selfgrow.core.reset_compiled`), so the wrapper's next call
    traces the grown module instead of reusing a graph of the old shapes.

    Mixed precision: the operator's weight arithmetic runs with autocast turned off, in the
    parameters' own dtype (fp32, fp16, bf16 parameters keep their dtype); the probe runs
    under the caller's autocast state, as training does. ``preservation`` records the dtype
    the forward computes in and the documented bound of an exact growth in that dtype
    (:data:`PRESERVATION_TOLERANCE`: fp32 1e-5, fp16 1e-2, bf16 8e-2 max relative error).

    Args:
        model: the live model (any device/dtype, or a ``torch.compile`` wrapper of it); its
            config is updated by the operator.
        config: an operator config instance (see :func:`list_operators`).
        optimizer: optimizer whose state follows the model (edited in place, same object).
        probe: a held batch used to measure function preservation (see default_probe_fn).
        probe_fn: alternative to ``probe``: ``model -> Tensor``.
        check: optional callable run on the grown model before commit; raising there rolls
            everything back (used by tests to inject failures).
        max_bytes: cap on the bytes the growth may allocate (default: the memory available
            on the model's device); checked from shapes before anything is allocated.
        on_commit: called once after the growth committed (optimizer migrated) with a
            :class:`~selfgrow.optim.ParamTransition` (old and new parameters by name and the
            operator's ParamMaps), for code keeping its own per-parameter state.

    Returns:
        GrowthEvent with action, params_before/after, preservation and op_seconds filled in
        (controller-level fields such as step and trigger are left for the caller).
        ``preservation`` holds ``exact_expected``, ``dtype`` (the compute dtype) and
        ``tolerance`` (its bound); with a probe also ``max_abs``, ``max_rel``, ``probe_size``
        and ``within_tolerance`` (``max_rel <= tolerance``; a record, never an error).

    Raises:
        GrowthConfigError: unknown operator or invalid config (nothing changed).
        IncompatibleModelError: the model does not support this operator (nothing changed).
        IncompatibleOptimizerError: optimizer state cannot be migrated (nothing changed).
        InsufficientMemoryError: the growth would allocate more than ``max_bytes`` or the
            memory available (nothing allocated, nothing changed).
        Any exception raised while growing: model and optimizer are rolled back first.
    """
    op = get_operator(config)
    _check_model(model)
    model = unwrap_compiled(model)  # the real module: a compile wrapper's parameters are its
    if optimizer is not None:
        check_optimizer_holds_model(optimizer, model)
    if max_bytes is not None and (
        isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0
    ):
        raise GrowthConfigError(f"max_bytes={max_bytes!r} is out of range; valid: int >= 0")
    token = _MAX_BYTES.set(max_bytes)
    try:
        with autocast_disabled(model):
            op.validate(model, config)
    finally:
        _MAX_BYTES.reset(token)
    if probe_fn is None and probe is not None:
        probe_fn = default_probe_fn(probe)
    y_before = None
    if probe_fn is not None:
        try:
            y_before = eval_output(model, probe_fn)
        except Exception as e:  # noqa: BLE001 - the user's probe, before anything changes
            raise IncompatibleModelError(
                f"the probe could not run on the model before growth ({type(e).__name__}: "
                f"{e}); pass a batch the model accepts (or probe_fn=model->Tensor)"
            ) from e
    old_named = dict(model.named_parameters())
    params_before = count_params(model)
    exact_expected = op.is_exact(model, config)
    dtype = compute_dtype(model)  # under the caller's autocast, before anything changes
    tolerance = PRESERVATION_TOLERANCE.get(dtype)

    t0 = time.perf_counter()
    with Transaction() as tx:
        with autocast_disabled(model):  # weight surgery in the parameters' own dtype
            result = op.apply(model, config, tx)
        new_named = dict(model.named_parameters())
        plan = (
            plan_migration(optimizer, old_named, new_named, result.param_maps)
            if optimizer is not None
            else None
        )
        # gradients accumulated before the growth follow the parameter map (a growth between
        # backward() and step() must not silently drop them)
        grads = plan_grads(old_named, new_named, result.param_maps)
        op_seconds = time.perf_counter() - t0
        if check is not None:
            check(model)
        preservation: dict[str, Any] = {"exact_expected": bool(exact_expected and result.exact),
                                        "dtype": str(dtype).removeprefix("torch."),
                                        "tolerance": tolerance}
        if probe_fn is not None:
            try:
                y_after = eval_output(model, probe_fn)
            except Exception as e:  # noqa: BLE001 - any failure of the user's probe rolls back
                raise IncompatibleModelError(
                    f"the probe could not run on the grown model ({type(e).__name__}: {e}); "
                    f"nothing was changed. A model whose INPUT width grows with the operator "
                    f"(e.g. nn.TransformerEncoder under widen_d_model) needs a probe_fn that "
                    f"feeds inputs of the new width"
                ) from e
            preservation.update(preservation_error(y_before, y_after))  # type: ignore[arg-type]
            preservation["probe_size"] = int(y_before.shape[0]) if y_before.dim() else 1  # type: ignore[union-attr]
            if tolerance is not None:
                preservation["within_tolerance"] = bool(preservation["max_rel"] <= tolerance)
    # committed: now the optimizer (cannot fail halfway)
    t1 = time.perf_counter()
    report = plan.apply() if plan is not None else None
    for p, g in grads.items():
        p.grad = g
    try:  # no compiled graph of the old shapes may run again (best effort: never fails)
        reset_compiled(model)
    except Exception as e:  # noqa: BLE001 - dynamo internals; the growth itself committed
        warnings.warn(f"grow_: could not drop the torch.compile code of the grown model "
                      f"({type(e).__name__}: {e}); call torch.compiler.reset()",
                      SelfgrowWarning, stacklevel=2)
    op_seconds += time.perf_counter() - t1
    if on_commit is not None:
        on_commit(ParamTransition.capture(old_named, new_named, result.param_maps))
    return GrowthEvent(
        wall_time=time.time(),
        action={"op": type(config).name, "config": op_config_to_dict(config)},
        params_before=params_before,
        params_after=count_params(model),
        preservation=preservation,
        op_seconds=op_seconds,
        optimizer=report.as_dict() if report is not None else {},
        lr_after=(
            [float(g["lr"]) for g in optimizer.param_groups] if optimizer is not None else None
        ),
        extra={"notes": result.notes} if result.notes else {},
    )
