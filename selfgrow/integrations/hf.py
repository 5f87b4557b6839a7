"""Growth inside ``transformers.Trainer``: :class:`GrowthCallback`.

::

    ctrl = GrowthController(model, None, signals=[LossPlateau(window=50)],
                            policy=RulePolicy([Rule("loss_plateau", "deepen")]),
                            log_dir="runs/gpt2")
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[GrowthCallback(ctrl)])
    trainer.train()
    ...
    trainer.train(resume_from_checkpoint=True)   # a new process: same small model, new ctrl

What the callback does, hook by hook (the Trainer's own loop is left untouched):

* ``on_train_begin``: hands the Trainer's optimizer (the torch optimizer inside accelerate's
  ``AcceleratedOptimizer``) to the controller, sets ``total_steps`` from ``max_steps`` when the
  controller has none, and, on resume, restores the controller's state and rewinds its
  ``events.jsonl`` / ``metrics.jsonl`` to the checkpoint (events logged after it are dropped,
  a deterministic run logs them again).
* every forward pass in training mode: the model output's ``loss`` is recorded (a forward
  hook); ``on_step_end`` (after ``optimizer.step()``, ``lr_scheduler.step()`` and
  ``zero_grad()``, so no gradient is in flight) reports their mean over the step's
  micro-batches as ``loss`` and the last ``eval_loss`` of ``on_evaluate`` as ``val_loss``
  (for :class:`~selfgrow.control.signals.ValidationPlateau`), at ``step=global_step``. A
  growth the policy decides happens there: the model grows in place, the optimizer's Adam
  state is migrated in place (same optimizer object, same param groups; every group's
  parameters are put back in the order of ``model.named_parameters()``, the order in which a
  Trainer built on the grown model would list them, so the Trainer's positional
  ``optimizer.pt`` stays valid), and the LR scheduler, which holds one base LR per param
  group, is checked to still match the groups (its object is unchanged).
* growth events: written by the controller to its own sinks (``events.jsonl``, TensorBoard),
  appended to ``state.log_history`` (so they are in every checkpoint's
  ``trainer_state.json``) as ``{"step", "selfgrow_event", "selfgrow_op", "selfgrow_reason",
  "selfgrow_params_before", "selfgrow_params_after"}``, and logged at INFO level by the
  ``selfgrow.integrations.hf`` logger.
* ``on_save``: writes :data:`GROWTH_FILE` into ``checkpoint-<step>``: the growth history (the
  operator configs applied so far, in order), the parameter shapes they lead to, the
  controller's ``state_dict()`` and the cursors of its logs. The Trainer has already saved
  the model and optimizer there.
* resume: a ``load_state_dict`` pre-hook on the model. When the Trainer loads a checkpoint
  whose shapes differ from the (small) model's, the hook finds the :data:`GROWTH_FILE` of the
  run's checkpoints whose shapes match it, replays its growth history on the model IN PLACE
  (the Trainer keeps its model object), and lets the load go on; the Trainer then builds its
  optimizer on the grown model and loads ``optimizer.pt`` into it. A resumed run continues
  exactly as the uninterrupted one (``tests/test_hf_trainer.py`` checks weights and Adam
  state).

Limits: one process or DDP through the Trainer (growth decided on every rank from the same
reduced signals is not arranged here: use it on one process, or with signals that every rank
sees identically, such as a :class:`~selfgrow.control.schedules.FixedSchedule`); DeepSpeed and
the Trainer's FSDP are refused at ``on_train_begin`` (their engines own the parameters).
``ReduceLROnPlateau`` schedulers hold no per-group state and pass the check.

Needs ``transformers`` and ``accelerate`` (``pip install 'selfgrow[hf]'``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import _atomic_save, _check_loadable
from ..errors import CheckpointError, IncompatibleModelError
from ._common import (
    check_controller,
    describe,
    log_cursors,
    new_changes,
    repair_optimizer,
    replay,
    restore_controller,
    shapes,
)

try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "selfgrow.integrations.hf needs the packages 'transformers' and 'accelerate': "
        "pip install 'selfgrow[hf]'"
    ) from e

__all__ = ["GROWTH_FILE", "GrowthCallback", "read_growth_file"]

#: the file :class:`GrowthCallback` writes into every ``checkpoint-<step>`` folder
GROWTH_FILE = "selfgrow_growth.pt"
_FORMAT = "selfgrow.hf_trainer"
_VERSION = 1

logger = logging.getLogger(__name__)


def _inner_optimizer(opt: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (or ``opt`` itself)."""
    seen = 0
    while opt is not None and not type(opt).__module__.startswith("torch.optim") and isinstance(
        getattr(opt, "optimizer", None), torch.optim.Optimizer
    ) and seen < 8:
        opt = opt.optimizer
        seen += 1
    return opt


def _unwrap(model: nn.Module) -> nn.Module:
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def read_growth_file(path: str | Path) -> dict[str, Any]:
    """Read a :data:`GROWTH_FILE` (``torch.load(weights_only=True)``: no code runs).

    Returns:
        ``{"format", "version", "step", "history": [op config dicts], "shapes": {name:
        [dims]}, "controller": state_dict, "events": cursor dict | None, "metrics": ...}``.

    Raises:
        CheckpointError: missing, unreadable or not a selfgrow growth file.
    """
    p = Path(path)
    try:
        data = torch.load(p, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise CheckpointError(f"no selfgrow growth file at {str(p)!r}") from e
    except Exception as e:  # noqa: BLE001 - torch.load's many failure types
        raise CheckpointError(f"cannot read the growth file {str(p)!r}: {e}") from e
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        raise CheckpointError(f"{str(p)!r} is not a selfgrow growth file (format {_FORMAT!r})")
    if data.get("version") != _VERSION:
        raise CheckpointError(f"{str(p)!r} has growth-file version {data.get('version')!r}; "
                              f"this selfgrow reads {_VERSION}")
    return data


class GrowthCallback(TrainerCallback):
    """Grow a model while ``transformers.Trainer`` trains it (see the module docstring).

    Args:
        controller: a :class:`~selfgrow.control.controller.GrowthController` built on the
            model given to the Trainer (its optimizer may be None: the Trainer's is taken at
            ``on_train_begin``).

    Raises:
        GrowthConfigError: ``controller`` is not a GrowthController.
        IncompatibleModelError (at ``on_train_begin``): the Trainer trains another model, or
            uses DeepSpeed / its FSDP.
        CheckpointError (on resume): no growth file of the run matches the checkpoint's
            shapes, or replaying it does not reproduce them.
    """

    def __init__(self, controller: Any) -> None:
        check_controller(controller, "GrowthCallback")
        self.controller = controller
        #: op config dicts of every growth / prune applied to the model, in order
        self.history: list[dict[str, Any]] = []
        self._losses: list[float] = []
        self._val_loss: float | None = None
        self._n_events = len(controller.events)
        self._output_dir: Path | None = None
        self._resume_file: Path | None = None
        model = controller.model
        self._loss_hook = model.register_forward_hook(self._record_loss)
        self._load_hook = model.register_load_state_dict_pre_hook(self._regrow_before_load)

    # --- hooks on the model ------------------------------------------------------------------
    def _record_loss(self, module: nn.Module, args: Any, output: Any) -> None:
        if not module.training:
            return
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self._losses.append(float(loss.detach()))

    def _regrow_before_load(self, module: nn.Module, state_dict: Mapping[str, Any], prefix: str,
                            *args: Any) -> None:
        if prefix:  # the Trainer loads the whole model; a sub-module load is not ours
            return
        theirs = shapes(state_dict)
        mine = shapes(module.state_dict())
        if all(mine.get(k) == s for k, s in theirs.items()):
            return
        if self.history:
            raise CheckpointError(
                "the checkpoint's shapes differ from the model's, and this model has already "
                "grown in this process: resume on the model as it was built (the small one)")
        found = self._find_growth_file(theirs)
        data = read_growth_file(found)
        replay(module, data["history"], theirs, repr(str(found)))
        self.history = list(data["history"])
        self._resume_file = found

    def _find_growth_file(self, theirs: dict[str, tuple[int, ...]]) -> Path:
        roots = [self._output_dir] if self._output_dir is not None else []
        cands = sorted((p for r in roots for p in r.glob(f"checkpoint-*/{GROWTH_FILE}")),
                       key=lambda p: _ckpt_step(p.parent), reverse=True)
        for p in cands:
            shapes = {k: tuple(v) for k, v in read_growth_file(p)["shapes"].items()}
            if all(shapes.get(k) == s for k, s in theirs.items()):
                return p
        where = str(self._output_dir) if self._output_dir is not None else "(no output_dir)"
        raise CheckpointError(
            f"the checkpoint's parameter shapes differ from the model's and no {GROWTH_FILE} "
            f"under {where}/checkpoint-* matches them ({len(cands)} found): was it saved by a "
            f"Trainer with GrowthCallback, in this output_dir?")

    # --- Trainer events ------------------------------------------------------------------------
    def on_init_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._output_dir = Path(args.output_dir)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._output_dir = Path(args.output_dir)
        if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
            raise IncompatibleModelError(
                "GrowthCallback cannot grow under the Trainer's DeepSpeed or FSDP engines (they "
                "own the parameters); train on one process or with DDP")
        ctrl = self.controller
        model = kw.get("model")
        if model is not None and _unwrap(model) is not ctrl.model:
            raise IncompatibleModelError(
                "the Trainer trains a different model object than the GrowthController's; "
                "build the controller on the model given to Trainer(model=...)")
        opt = _inner_optimizer(kw.get("optimizer"))
        if opt is not None and opt is not ctrl.optimizer:
            ctrl.optimizer = opt
        if ctrl.total_steps is None and getattr(state, "max_steps", 0) > 0:
            ctrl.total_steps = int(state.max_steps)
        if state.global_step > 0 and ctrl.step == 0:
            self._restore(args, state)

    def _restore(self, args: Any, state: Any) -> None:
        path = self._resume_file or Path(args.output_dir) / f"checkpoint-{state.global_step}" \
            / GROWTH_FILE
        if not path.exists():
            logger.warning("selfgrow: resuming at step %d without %s: the controller starts "
                           "afresh at that step", state.global_step, path)
            self.controller.step = int(state.global_step)
            return
        data = read_growth_file(path)
        if int(data["step"]) != int(state.global_step):
            raise CheckpointError(f"{str(path)!r} was saved at step {data['step']}, the Trainer "
                                  f"resumes at step {state.global_step}")
        ctrl = self.controller
        restore_controller(ctrl, data["controller"], data)
        self.history = list(data["history"])
        self._n_events = len(ctrl.events)

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None,
                    **kw: Any) -> None:
        v = (metrics or {}).get("eval_loss")
        if v is not None and math.isfinite(float(v)):
            self._val_loss = float(v)

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        ctrl = self.controller
        loss = sum(self._losses) / len(self._losses) if self._losses else None
        self._losses.clear()
        metrics: dict[str, Any] = {}
        if self._val_loss is not None:
            metrics["val_loss"] = self._val_loss
            self._val_loss = None
        epoch = math.floor(state.epoch) if state.epoch is not None else None
        ctrl.observe(loss=loss, step=int(state.global_step), epoch=epoch, **metrics)
        changed, self._n_events = new_changes(ctrl, self._n_events)
        for ev in changed:
            self.history.append(dict(ev.action["config"]))
            record = {"step": int(state.global_step), "selfgrow_event": ev.kind,
                      "selfgrow_op": str(ev.action.get("op")),
                      "selfgrow_reason": str(ev.reason),
                      "selfgrow_params_before": int(ev.params_before),
                      "selfgrow_params_after": int(ev.params_after)}
            state.log_history.append(record)
            logger.info("selfgrow: step %d: %s", state.global_step, describe(ev))
        if changed:
            sched = kw.get("lr_scheduler")
            repair_optimizer(ctrl.optimizer, ctrl.model, [sched] if sched is not None else [])

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if not getattr(state, "is_world_process_zero", True):
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not folder.is_dir():
            return
        ctrl = self.controller
        payload = {
            "format": _FORMAT,
            "version": _VERSION,
            "step": int(state.global_step),
            "history": list(self.history),
            "shapes": {k: list(s) for k, s in shapes(ctrl.model.state_dict()).items()},
            "controller": ctrl.state_dict(),
            **log_cursors(ctrl),
        }
        _check_loadable(payload, GROWTH_FILE)
        _atomic_save(payload, folder / GROWTH_FILE)

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        ms = self.controller.metrics_sink
        if ms is not None:
            ms.flush()

    def remove_hooks(self) -> None:
        """Detach the loss and load hooks from the model (the callback stops working)."""
        self._loss_hook.remove()
        self._load_hook.remove()


def _ckpt_step(folder: Path) -> int:
    tail = folder.name.rpartition("-")[2]
    return int(tail) if tail.isdigit() else -1
