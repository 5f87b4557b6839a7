"""Checkpoints of growing runs: config + weights + optimizer (by name) + scheduler + controller.

A grown model no longer has the shape its constructor was first called with, so a checkpoint
stores a description of its current architecture beside the weights, as nanoGPT does
(:func:`~selfgrow.adapters.describe_architecture`: the config dataclass of selfgrow's own
models, or the family adapter's ``arch_spec`` for every other family selfgrow understands);
loading calls :func:`~selfgrow.adapters.build_architecture` on it and so rebuilds the GROWN
architecture, with no registration by the user.

One checkpoint is one file written with :func:`torch.save` and read back with
``torch.load(weights_only=True)`` (no pickled code is executed). It holds:

* ``model``: the serialised config and ``state_dict()`` (weights and buffers);
* ``optimizer``: the optimizer class, each param group's hyper-parameters and the parameter
  NAMES it holds, and the per-parameter state keyed by NAME (never by position, so the file
  stays valid whatever order growth left the parameters in);
* ``scheduler``: the LR scheduler's ``state_dict()``;
* ``controller``: the growth controller's ``state_dict()`` (signals, policy, step, seq,
  run_id ...) and the **event cursor** (see below);
* ``rng``: torch (CPU and CUDA), numpy and Python ``random`` generator states, so that data
  order, dropout masks and random growth initialisations continue exactly;
* ``extra``: anything the caller adds (epoch, data-loader position, ...).

Writes are atomic: the file is written to a temporary name in the same directory, flushed,
fsynced and moved over the destination with :func:`os.replace`; a process killed while saving
leaves the previous checkpoint intact; its torn ``.<name>.tmp.<host>.<pid>`` file is deleted
by the next save on the same host.

Event log and resume
--------------------
The controller appends one line per event to ``events.jsonl`` and fsyncs it, while
checkpoints are written only every N steps. A run killed between two checkpoints has
therefore logged events that the resumed run will re-emit when it replays those steps. The
cursor saved in the checkpoint (next ``seq``, byte offset and line count of
``events.jsonl`` and a SHA-256 of its content up to there) lets
:meth:`Checkpoint.restore_controller` truncate the log back to the state it had at save
time (:func:`rewind_events`), so the log of a resumed run holds every event exactly once.
A deterministic run re-emits the discarded events identically (up to wall-clock fields); a
non-deterministic one may decide differently after resume, and the log then records what
the resumed run did. Only the JSONL log is
rewound: other sinks (TensorBoard) receive the replayed steps again, as they do for any
resumed run (TensorBoard's ``purge_step`` drops the stale ones). Under DDP only rank 0 keeps
the log, and only its controller rewinds it. A run killed before its first checkpoint and
started again from scratch empties its log first:
``rewind_events(run_dir / "events.jsonl", EventCursor())``.

Typical use::

    save_checkpoint(run_dir / "ckpt.pt", model, optimizer, controller=ctrl, scheduler=sched,
                    extra={"step": step})
    ...
    ck = load_checkpoint(run_dir / "ckpt.pt", scheduler_factory=make_scheduler)
    ctrl = GrowthController(ck.model, ck.optimizer, signals=..., policy=..., log_dir=run_dir)
    ck.restore_controller(ctrl)           # load_state_dict + rewind events.jsonl
    start = ck.extra["step"] + 1
"""

from __future__ import annotations

import glob
import hashlib
import importlib
import os
import random
import socket
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .adapters import build_architecture, describe_architecture
from .errors import CheckpointError
from .optim import LAZY_INIT_KEY, install_hooks

FORMAT = "selfgrow.checkpoint"
FORMAT_VERSION = 1
EVENTS_FILENAME = "events.jsonl"

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "EventCursor",
    "get_rng_state",
    "load_checkpoint",
    "rewind_events",
    "save_checkpoint",
    "set_rng_state",
    "unwrap_model",
]



# ---------------------------------------------------------------------------------------------
# event cursor
# ---------------------------------------------------------------------------------------------
@dataclass
class EventCursor:
    """Position of the event log when a checkpoint was written.

    Attributes:
        path: absolute path of ``events.jsonl`` at save time (``None``: the controller had no
            JSONL log).
        seq: the controller's next event sequence number (``None`` if it exposes none).
        offset: size of the log in bytes at save time.
        lines: number of complete lines (events) in the log at save time.
        sha256: hex digest of the log's first ``offset`` bytes (checked before truncating).
    """

    path: str | None = None
    seq: int | None = None
    offset: int = 0
    lines: int = 0
    sha256: str = hashlib.sha256(b"").hexdigest()

    @classmethod
    def of_file(cls, path: str | os.PathLike[str] | None, seq: int | None = None) -> EventCursor:
        """The cursor at the current end of ``path`` (an absent file counts as empty)."""
        if path is None:
            return cls(None, seq)
        p = Path(path).absolute()
        data = p.read_bytes() if p.exists() else b""
        return cls(str(p), seq, len(data), data.count(b"\n"), hashlib.sha256(data).hexdigest())


def rewind_events(path: str | os.PathLike[str], cursor: EventCursor) -> int:
    """Truncate an event log back to ``cursor`` (events logged after the checkpoint).

    Args:
        path: the ``events.jsonl`` to rewind (usually ``cursor.path``; may differ when a run
            directory was moved).
        cursor: the cursor stored in the checkpoint.

    Returns:
        The number of lines discarded (complete events, plus a torn last line if the process
        was killed while writing it).

    Raises:
        CheckpointError: the log is shorter than the cursor or its first ``cursor.offset``
            bytes differ from what was there at save time (another run's log, or an edited
            one); nothing is changed then.
    """
    p = Path(path)
    if not p.exists():
        if cursor.offset == 0:
            return 0
        raise CheckpointError(
            f"event log {p} is missing but the checkpoint saw {cursor.lines} events "
            f"({cursor.offset} bytes) in it; restore the run directory or pass the log's path"
        )
    size = p.stat().st_size
    with open(p, "rb") as fh:
        head = fh.read(cursor.offset)
        tail = fh.read()
    if size < cursor.offset or hashlib.sha256(head).hexdigest() != cursor.sha256:
        raise CheckpointError(
            f"event log {p} does not continue the log the checkpoint was taken with "
            f"(expected its first {cursor.offset} bytes / {cursor.lines} lines to match, file "
            f"has {size} bytes); point the run at the original log directory"
        )
    if not tail:
        return 0
    discarded = sum(1 for line in tail.split(b"\n") if line.strip())
    with open(p, "r+b") as fh:
        fh.truncate(cursor.offset)
        fh.flush()
        os.fsync(fh.fileno())
    return discarded


def _controller_events_path(controller: Any) -> Path | None:
    """Where ``controller`` appends its JSONL events (``None`` when it has no such log)."""
    from .events.jsonl import JsonlSink

    for attr in ("events_path", "log_path"):
        if hasattr(controller, attr):  # an explicit None means: this controller keeps no log
            v = getattr(controller, attr)
            return Path(v) if v is not None else None
    for attr in ("sinks", "_sinks"):
        for s in getattr(controller, attr, None) or ():
            if isinstance(s, JsonlSink):
                return s.path
    log_dir = getattr(controller, "log_dir", None)
    if log_dir is not None:
        return Path(log_dir) / EVENTS_FILENAME
    return None


def _controller_seq(controller: Any, state: Mapping[str, Any] | None) -> int | None:
    seq = getattr(controller, "seq", None)
    if seq is None and state is not None:
        seq = state.get("seq")
    return int(seq) if isinstance(seq, int) else None


# ---------------------------------------------------------------------------------------------
# RNG
# ---------------------------------------------------------------------------------------------
def get_rng_state() -> dict[str, Any]:
    """Torch (CPU, and CUDA when initialised), numpy and Python ``random`` states, in a form
    that ``torch.load(weights_only=True)`` reads back."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np.asarray(np_state["state"]["key"], dtype=np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned (CUDA states only when the device count
    matches)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    n = state.get("numpy")
    if n is not None:
        np.random.set_state(
            {
                "bit_generator": n["bit_generator"],
                "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                "has_gauss": n["has_gauss"],
                "gauss": n["gauss"],
            }
        )
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under DistributedDataParallel / DataParallel / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _class_path(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _import_class(path: str, base: type, what: str, factory_arg: str) -> type:
    module, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise CheckpointError(
            f"cannot rebuild the {what} {path!r} from the checkpoint; pass {factory_arg}="
        )
    return cls


def _optimizer_payload(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    id2name = {id(p): n for n, p in model.named_parameters()}
    groups = []
    state: dict[str, dict[str, Any]] = {}
    for gi, g in enumerate(optimizer.param_groups):
        names = []
        for p in g["params"]:
            n = id2name.get(id(p))
            if n is None:
                raise CheckpointError(
                    f"optimizer param group {gi} holds a {tuple(p.shape)} tensor that is not a "
                    f"parameter of the model; checkpoints key optimizer state by parameter name, "
                    f"so build the optimizer from model.parameters() (the unwrapped module's)"
                )
            names.append(n)
            if p in optimizer.state:
                state[n] = dict(optimizer.state[p])
        hparams = {k: v for k, v in g.items() if k not in ("params", "param_names")}
        groups.append({"hparams": hparams, "names": names, "param_names": "param_names" in g})
    return {"class": _class_path(optimizer), "groups": groups, "state": state}


def _build_optimizer(
    model: nn.Module, saved: Mapping[str, Any], factory: OptimizerFactory | None
) -> torch.optim.Optimizer:
    named = dict(model.named_parameters())
    if factory is not None:
        return factory(model)
    cls = _import_class(saved["class"], torch.optim.Optimizer, "optimizer", "optimizer_factory")
    groups = []
    for g in saved["groups"]:
        missing = [n for n in g["names"] if n not in named]
        if missing:
            raise CheckpointError(f"optimizer names {missing} are not parameters of the model")
        group: dict[str, Any] = {**g["hparams"], "params": [named[n] for n in g["names"]]}
        if g["param_names"]:
            group["param_names"] = list(g["names"])
        groups.append(group)
    return cls(groups)


def _load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, saved: Mapping[str, Any]
) -> None:
    """Load name-keyed state into ``optimizer`` through its positional ``load_state_dict``."""
    id2name = {id(p): n for n, p in model.named_parameters()}
    if len(optimizer.param_groups) != len(saved["groups"]):
        raise CheckpointError(
            f"optimizer has {len(optimizer.param_groups)} param groups, the checkpoint "
            f"{len(saved['groups'])}; optimizer_factory must build the same groups"
        )
    sd_groups, sd_state, idx = [], {}, 0
    for gi, (g, gs) in enumerate(zip(optimizer.param_groups, saved["groups"], strict=True)):
        names = [id2name.get(id(p), "") for p in g["params"]]
        if sorted(names) != sorted(gs["names"]):
            raise CheckpointError(
                f"param group {gi} holds {sorted(names)} but the checkpoint's holds "
                f"{sorted(gs['names'])}; optimizer_factory must group parameters the same way"
            )
        ids = []
        for n in names:
            if n in saved["state"]:
                sd_state[idx] = saved["state"][n]
            ids.append(idx)
            idx += 1
        sdg: dict[str, Any] = {**gs["hparams"], "params": ids}
        if "param_names" in g:
            sdg["param_names"] = names
        sd_groups.append(sdg)
    optimizer.load_state_dict({"state": sd_state, "param_groups": sd_groups})
    # load_state_dict casts floating state to the parameter's dtype; keep any state whose
    # saved dtype differs on purpose (e.g. selfgrow's float64 lazy-init marker) exactly
    named = dict(model.named_parameters())
    lazy = False
    for n, st_saved in saved["state"].items():
        st = optimizer.state.get(named[n]) if n in named else None
        if st is None:
            continue
        lazy = lazy or LAZY_INIT_KEY in st
        for k, v in st_saved.items():
            cur = st.get(k)
            if isinstance(v, torch.Tensor) and isinstance(cur, torch.Tensor) and (
                cur.dtype != v.dtype
            ) and k != "step":
                st[k] = v.to(cur.device)
    if lazy:  # brand-new tensors awaiting their first gradient need selfgrow's step hook
        install_hooks(optimizer)


def _load_weights(model: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """Load ``state`` keeping each saved tensor's dtype and device (ties are kept)."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        s = state.get(name)
        if s is not None and (s.dtype != t.dtype or s.device != t.device):
            t.data = t.data.to(device=s.device, dtype=s.dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"weights do not fit the model rebuilt from the checkpoint's config: missing "
            f"{missing}, unexpected {unexpected}; was the config updated by every operator?"
        )
    return model


_SCALARS = (type(None), bool, int, float, complex, str, torch.dtype, torch.device, torch.Size)


def _check_loadable(obj: Any, where: str) -> None:
    """Raise CheckpointError naming the first value ``torch.load(weights_only=True)`` would
    refuse (so a bad controller/extra state fails at save time, not at resume time)."""
    if isinstance(obj, torch.Tensor) or type(obj) in _SCALARS:
        return
    if type(obj) in (dict, OrderedDict):
        for k, v in obj.items():
            _check_loadable(k, f"{where} key")
            _check_loadable(v, f"{where}.{k}")
        return
    if type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            _check_loadable(v, f"{where}[{i}]")
        return
    raise CheckpointError(
        f"{where} is a {type(obj).__name__}, which torch.load(weights_only=True) cannot read; "
        f"state_dict()/extra values must be dicts, lists, tuples, numbers, strings or tensors"
    )


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}.tmp.{socket.gethostname()}."


def _remove_stale_tmp(path: Path) -> None:
    """Delete temporary files of ``path`` left by processes of this host that no longer run
    (killed while saving)."""
    prefix = _tmp_prefix(path)
    for p in path.parent.glob(f"{glob.escape(prefix)}*"):
        pid = p.name[len(prefix) :]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            p.unlink(missing_ok=True)
        except OSError:  # alive under another user, or unknowable: leave it
            pass


def _atomic_save(obj: Any, path: Path) -> None:
    if path.is_dir():
        raise CheckpointError(f"checkpoint path {str(path)!r} is a directory; pass a file name "
                              f"such as {str(path / 'ckpt.pt')!r}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise CheckpointError(f"cannot create the directory of {str(path)!r}: {e}") from None
    _remove_stale_tmp(path)
    tmp = path.parent / f"{_tmp_prefix(path)}{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------
def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    controller: Any = None,
    scheduler: Any = None,
    extra: Mapping[str, Any] | None = None,
    *,
    events_path: str | os.PathLike[str] | None = None,
    rng: bool = True,
) -> Path:
    """Write a resumable checkpoint of a (possibly grown) run, atomically.

    Args:
        path: destination file (parent directories are created).
        model: a selfgrow model or any model of a family with an adapter, optionally wrapped in
            DistributedDataParallel / DataParallel / ``torch.compile`` (unwrapped here).
        optimizer: its optimizer; must hold the model's own parameters (state is keyed by
            their names).
        controller: the growth controller (anything with ``state_dict()``); its state and
            the event cursor of its ``events.jsonl`` are stored.
        scheduler: an LR scheduler (anything with ``state_dict()``).
        extra: caller data (step, epoch, data position ...); must be readable with
            ``torch.load(weights_only=True)``: dicts, lists, tuples, numbers, strings, tensors.
        events_path: the controller's event log if it cannot be found from the controller
            (``events_path``/``log_path`` attributes, a JsonlSink in ``sinks``, or
            ``log_dir/events.jsonl``).
        rng: also store torch/numpy/python RNG states (default True).

    Returns:
        The path written.

    Raises:
        IncompatibleModelError: no selfgrow config and no adapter describes the model.
        CheckpointError: the optimizer holds tensors that are not parameters of the model.
    """
    path = Path(path)
    model = unwrap_model(model)
    payload: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "torch_version": str(torch.__version__),
        "model": {"architecture": describe_architecture(model), "state": model.state_dict()},
        "optimizer": _optimizer_payload(model, optimizer) if optimizer is not None else None,
        "scheduler": (
            {"class": _class_path(scheduler), "state": scheduler.state_dict()}
            if scheduler is not None
            else None
        ),
        "controller": None,
        "events": None,
        "rng": get_rng_state() if rng else None,
        "extra": dict(extra or {}),
    }
    if controller is not None:
        cstate = controller.state_dict()
        payload["controller"] = cstate
        ev_path = events_path if events_path is not None else _controller_events_path(controller)
        cursor = EventCursor.of_file(ev_path, _controller_seq(controller, cstate))
        payload["events"] = asdict(cursor)
        ms = getattr(controller, "metrics_sink", None)
        if ms is not None:  # the scalar stream is rewound with the events on resume
            ms.flush()
            payload["metrics"] = asdict(EventCursor.of_file(ms.path))
    elif events_path is not None:
        payload["events"] = asdict(EventCursor.of_file(events_path))
    _check_loadable(payload, "checkpoint")
    _atomic_save(payload, path)
    return path


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns.

    Attributes:
        model: the model rebuilt from the stored config (the grown shape) with its weights.
        optimizer: the optimizer rebuilt over ``model``'s parameters with its state, or None.
        controller_state: for ``controller.load_state_dict`` (prefer :meth:`restore_controller`).
        scheduler: the scheduler from ``scheduler_factory`` with its state loaded, or None.
        extra: the caller data given to :func:`save_checkpoint`.
        scheduler_state: the raw scheduler ``state_dict`` (use it without a factory).
        event_cursor: position of ``events.jsonl`` at save time, or None.
        metrics_cursor: position of the controller's ``metrics.jsonl`` at save time, or None.
        rng_state: stored RNG states (already restored unless ``restore_rng=False``).
        model_config: the serialised model config (``{type, version, data}``) or the
            adapter's architecture spec.
        path: the file read.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    controller_state: dict[str, Any] | None
    scheduler: Any
    extra: dict[str, Any]
    scheduler_state: dict[str, Any] | None = None
    event_cursor: EventCursor | None = None
    metrics_cursor: EventCursor | None = None
    rng_state: dict[str, Any] | None = None
    model_config: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def restore_controller(
        self, controller: Any, *, events_path: str | os.PathLike[str] | None = None
    ) -> int:
        """Load the controller's state and rewind its ``events.jsonl`` (and the
        ``metrics.jsonl`` of its ``metrics_sink``) to the cursors.

        Args:
            controller: a controller built on :attr:`model` and :attr:`optimizer`.
            events_path: the log to rewind (default: the controller's own ``events.jsonl``;
                nothing is rewound when it has none, e.g. on DDP ranks other than 0).

        Returns:
            The number of events discarded from the log (logged after the checkpoint; a
            deterministic resumed run emits them again).

        Raises:
            CheckpointError: the checkpoint holds no controller state, or the log does not
                match the cursor (nothing changed).
        """
        if self.controller_state is None:
            raise CheckpointError(f"checkpoint {self.path} was saved without a controller")
        cursor = self.event_cursor
        target = events_path if events_path is not None else _controller_events_path(controller)
        discarded = 0
        if cursor is not None and target is not None:
            # check and truncate first: a mismatching log leaves the controller untouched
            discarded = rewind_events(target, cursor)
        ms = getattr(controller, "metrics_sink", None)
        if self.metrics_cursor is not None and ms is not None and events_path is None:
            ms.flush()
            rewind_events(ms.path, self.metrics_cursor)
        controller.load_state_dict(self.controller_state)
        return discarded

    def restore_rng(self) -> None:
        """Set torch/numpy/python RNGs to their state at save time."""
        if self.rng_state is None:
            raise CheckpointError(f"checkpoint {self.path} was saved with rng=False")
        set_rng_state(self.rng_state)


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    optimizer_factory: OptimizerFactory | None = None,
    scheduler_factory: SchedulerFactory | None = None,
    map_location: Any = "cpu",
    restore_rng: bool = True,
    weights_only: bool = True,
) -> Checkpoint:
    """Rebuild model, optimizer and scheduler from a checkpoint of :func:`save_checkpoint`.

    The model is built with ``build_model(config)`` (its grown shape), placed on the device
    and dtypes of the loaded weights, and loaded strictly. The optimizer is rebuilt with the
    same class, param groups and hyper-parameters over the parameters of those names
    (``optimizer_factory(model)`` instead, e.g. for an optimizer outside ``torch.optim``:
    it must put the same names in the same number of groups), then its state is loaded by
    name. The scheduler is built with ``scheduler_factory(optimizer)`` before the
    optimizer's state is loaded (constructing a scheduler rewrites the learning rates), then
    its state is loaded.

    Args:
        path: checkpoint file.
        optimizer_factory: ``model -> optimizer``; default rebuilds the stored class.
        scheduler_factory: ``optimizer -> scheduler``; without it :attr:`Checkpoint.scheduler`
            is None and the state is in :attr:`Checkpoint.scheduler_state`.
        map_location: as for :func:`torch.load` (default ``"cpu"``).
        restore_rng: set torch/numpy/python RNG states to those at save time (default True).
        weights_only: load with ``torch.load(weights_only=True)`` (default); pass False only
            for a trusted file whose controller state holds other Python objects.

    Returns:
        Checkpoint(model, optimizer, controller_state, scheduler, extra, ...).

    Raises:
        CheckpointError: not a selfgrow checkpoint, a newer format, or weights / optimizer
            that do not fit the rebuilt model.
        GrowthConfigError: the stored model config type is not registered (import the
            module that registers it first).
    """
    path = Path(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as e:
        why = str(e) or "empty or not a checkpoint"
        raise CheckpointError(
            f"cannot read checkpoint {path}: {type(e).__name__}: {why}"
            " (not a file written by selfgrow.save_checkpoint, or truncated)"
        ) from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a selfgrow checkpoint")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {payload['format_version']}; this selfgrow reads "
            f"up to {FORMAT_VERSION}; upgrade selfgrow"
        )
    arch = payload["model"].get("architecture")
    if arch is None:  # format 1 files of selfgrow's own models
        arch = {"family": "selfgrow", "config": payload["model"]["config"]}
    model = _load_weights(build_architecture(arch), payload["model"]["state"])
    mconf = arch.get("config", arch.get("spec"))

    optimizer = None
    scheduler = None
    sched = payload.get("scheduler")
    if payload.get("optimizer") is not None:
        optimizer = _build_optimizer(model, payload["optimizer"], optimizer_factory)
        if scheduler_factory is not None and sched is not None:
            scheduler = scheduler_factory(optimizer)
        _load_optimizer_state(model, optimizer, payload["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(sched["state"])
    elif optimizer_factory is not None:
        raise CheckpointError(f"checkpoint {path} was saved without an optimizer")

    ev = payload.get("events")
    rng_state = payload.get("rng")
    if restore_rng and rng_state is not None:
        set_rng_state(rng_state)
    return Checkpoint(
        model=model,
        optimizer=optimizer,
        controller_state=payload.get("controller"),
        scheduler=scheduler,
        extra=payload.get("extra") or {},
        scheduler_state=sched["state"] if sched is not None else None,
        event_cursor=EventCursor(**ev) if ev is not None else None,
        metrics_cursor=(EventCursor(**payload["metrics"]) if payload.get("metrics") is not None
                        else None),
        rng_state=rng_state,
        model_config=mconf,
        path=path,
    )
