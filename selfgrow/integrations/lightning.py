"""Growth inside a PyTorch Lightning ``Trainer``: :class:`GrowthCallback`.

::

    class LitLM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = GPT2LMHeadModel(config)            # the network that grows
        def training_step(self, batch, i):
            return self.net(**batch).loss
        def validation_step(self, batch, i):
            self.log("val_loss", self.net(**batch).loss)
        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=3e-3)

    lit = LitLM()
    ctrl = GrowthController(lit.net, None, signals=[...], policy=..., log_dir="runs/lit")
    trainer = pl.Trainer(max_steps=1000, callbacks=[GrowthCallback(ctrl)])
    trainer.fit(lit, dl)
    trainer.fit(LitLM(), dl, ckpt_path="last")      # resume: a new process, the same small net

The controller is built on the network that grows (a sub-module of the LightningModule, or
the LightningModule itself when selfgrow understands it). Hook by hook:

* ``on_train_start``: hands the Trainer's optimizer to the controller (one optimizer:
  automatic optimization) and sets ``total_steps`` from ``max_steps`` when it has none.
* ``on_train_batch_end``: records the loss ``training_step`` returned (a tensor, or the
  ``"loss"`` of a dict); once per optimizer step (``trainer.global_step`` advanced; with
  ``accumulate_grad_batches`` that is every k batches) it reports their mean as ``loss`` and
  the last validation loss (``trainer.callback_metrics[val_key]``, taken at
  ``on_validation_end``) as ``val_loss``, at ``step=global_step``. The optimizer has stepped;
  the gradients it used are still on the parameters and follow the growth (the next
  ``zero_grad`` clears them). A growth migrates the Adam state in place (same optimizer
  object), puts every param group in ``LightningModule.named_parameters()`` order (what
  ``configure_optimizers`` on the grown module lists, so Lightning's positional optimizer
  state stays valid), checks that the LR schedulers still have one base LR per group, and is
  logged by the ``selfgrow.integrations`` logger, besides the controller's own sinks.
  ``selfgrow/n_params`` and ``selfgrow/n_growths`` go through ``LightningModule.log`` at
  every optimizer step, to every logger the Trainer has.
* checkpoints, with Lightning's callback convention: :meth:`state_dict` holds the growth
  history (operator configs in order), the controller's ``state_dict()`` and the cursors of
  its logs; :meth:`load_state_dict` restores the controller and rewinds its logs. Lightning
  loads the model's weights BEFORE the callbacks' state, so ``on_save_checkpoint`` also puts
  the history under ``checkpoint["state_dict"]["<net prefix>._selfgrow_growth"]`` (a plain
  list: Lightning checkpoints are ``torch.save`` files), and a ``load_state_dict`` pre-hook
  on the network takes it out, regrows the small network in place and lets the weights load.

Limits: automatic optimization with one optimizer; growth decisions on several processes
(DDP) need signals that every rank sees identically (a FixedSchedule, or reduced metrics);
FSDP / DeepSpeed strategies are refused at ``on_train_start``.

Needs ``pytorch-lightning`` (``pip install 'selfgrow[lightning]'``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, IncompatibleModelError
from ._common import (
    check_controller,
    describe,
    log_cursors,
    logger,
    new_changes,
    repair_optimizer,
    replay,
    restore_controller,
    shapes,
)

try:
    import pytorch_lightning as pl
except ImportError as e:  # pragma: no cover - exercised only without pytorch-lightning
    raise ImportError(
        "selfgrow.integrations.lightning needs the package 'pytorch-lightning': "
        "pip install 'selfgrow[lightning]'"
    ) from e

__all__ = ["HISTORY_KEY", "GrowthCallback"]

#: the entry of the network's state dict in a Lightning checkpoint that holds the growth history
HISTORY_KEY = "_selfgrow_growth"
_VERSION = 1


class GrowthCallback(pl.Callback):
    """Grow a network while a Lightning ``Trainer`` trains it (see the module docstring).

    Args:
        controller: a :class:`~selfgrow.control.controller.GrowthController` built on the
            network that grows (its optimizer may be None: the Trainer's is taken at
            ``on_train_start``).
        val_key: the metric logged in ``validation_step`` that is reported as ``val_loss``
            (for :class:`~selfgrow.control.signals.ValidationPlateau`).

    Raises:
        GrowthConfigError: ``controller`` is not a GrowthController, or ``val_key`` not a str.
        IncompatibleModelError (at ``setup`` / ``on_train_start``): the network is not part
            of the LightningModule, several optimizers, manual optimization, or an FSDP /
            DeepSpeed strategy.
        CheckpointError (on resume): the checkpoint's history does not rebuild its shapes.
    """

    def __init__(self, controller: Any, *, val_key: str = "val_loss") -> None:
        check_controller(controller, "GrowthCallback")
        if not isinstance(val_key, str) or not val_key:
            from ..errors import GrowthConfigError

            raise GrowthConfigError(f"val_key must be a metric name, got {val_key!r}")
        self.controller = controller
        self.val_key = val_key
        #: op config dicts of every growth / prune applied to the network, in order
        self.history: list[dict[str, Any]] = []
        self._losses: list[float] = []
        self._val_loss: float | None = None
        self._last_step = 0
        self._n_events = len(controller.events)
        self._prefix: str | None = None
        self._load_hook = controller.model.register_load_state_dict_pre_hook(
            self._regrow_before_load)

    @property
    def state_key(self) -> str:
        return "selfgrow.GrowthCallback"

    # --- setup ---------------------------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        net = self.controller.model
        prefix = next((n for n, m in pl_module.named_modules() if m is net), None)
        if prefix is None:
            raise IncompatibleModelError(
                "the GrowthController's model is not part of the LightningModule the Trainer "
                "fits; build the controller on that module's network (e.g. lit.net)")
        self._prefix = prefix

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        name = type(trainer.strategy).__name__
        if "FSDP" in name or "DeepSpeed" in name:
            raise IncompatibleModelError(
                f"GrowthCallback cannot grow under Lightning's {name} (the engine owns the "
                f"parameters); use a single device or DDP")
        if not pl_module.automatic_optimization:
            raise IncompatibleModelError(
                "GrowthCallback needs automatic optimization (manual optimization steps the "
                "optimizer itself; grow with controller.observe in training_step instead)")
        opts = trainer.optimizers
        if len(opts) != 1:
            raise IncompatibleModelError(
                f"GrowthCallback needs exactly one optimizer, the Trainer has {len(opts)}")
        ctrl = self.controller
        if opts[0] is not ctrl.optimizer:
            ctrl.optimizer = opts[0]
        if ctrl.total_steps is None and trainer.max_steps and trainer.max_steps > 0:
            ctrl.total_steps = int(trainer.max_steps)
        self._last_step = int(trainer.global_step)
        if trainer.global_step > 0 and ctrl.step == 0:
            logger.warning("selfgrow: resuming at step %d without selfgrow state in the "
                           "checkpoint: the controller starts afresh there", trainer.global_step)
            ctrl.step = int(trainer.global_step)

    # --- training ----------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self._losses.append(float(loss.detach()))
        step = int(trainer.global_step)
        if step == self._last_step:  # accumulating: the optimizer has not stepped
            return
        self._last_step = step
        ctrl = self.controller
        mean = sum(self._losses) / len(self._losses) if self._losses else None
        self._losses.clear()
        metrics: dict[str, Any] = {}
        if self._val_loss is not None:
            metrics["val_loss"], self._val_loss = self._val_loss, None
        ctrl.observe(loss=mean, step=step, epoch=int(trainer.current_epoch), **metrics)
        changed, self._n_events = new_changes(ctrl, self._n_events)
        for ev in changed:
            self.history.append(dict(ev.action["config"]))
            logger.info("selfgrow: step %d: %s", step, describe(ev))
        if changed:
            repair_optimizer(ctrl.optimizer, pl_module,
                             [c.scheduler for c in trainer.lr_scheduler_configs])
        n_params = float(sum(p.numel() for p in ctrl.model.parameters()))
        pl_module.log("selfgrow/n_params", n_params, on_step=True, on_epoch=False)
        pl_module.log("selfgrow/n_growths", float(ctrl.n_growths), on_step=True,
                      on_epoch=False)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        v = trainer.callback_metrics.get(self.val_key)
        if v is not None and math.isfinite(float(v)):
            self._val_loss = float(v)

    # --- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"version": _VERSION, "history": list(self.history),
                "controller": self.controller.state_dict(), **log_cursors(self.controller)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != _VERSION:
            raise CheckpointError(f"selfgrow callback state version {state.get('version')!r}; "
                                  f"this selfgrow reads {_VERSION}")
        restore_controller(self.controller, state["controller"], state)
        self.history = list(state["history"])
        self._n_events = len(self.controller.events)

    def on_save_checkpoint(self, trainer: Any, pl_module: Any,
                           checkpoint: dict[str, Any]) -> None:
        sd = checkpoint.get("state_dict")
        if isinstance(sd, dict) and self._prefix is not None:
            key = f"{self._prefix}.{HISTORY_KEY}" if self._prefix else HISTORY_KEY
            sd[key] = list(self.history)

    def _regrow_before_load(self, module: nn.Module, state_dict: dict[str, Any], prefix: str,
                            *args: Any) -> None:
        history = state_dict.pop(prefix + HISTORY_KEY, None)
        if history is None:
            return
        theirs = shapes({k[len(prefix):]: v for k, v in state_dict.items()
                         if k.startswith(prefix)})
        if all(shapes(module.state_dict()).get(k) == s for k, s in theirs.items()):
            return  # already this architecture (e.g. the same process)
        if self.history:
            raise CheckpointError(
                "the checkpoint's shapes differ from the network's, and it has already grown "
                "in this process: resume on the network as it was built (the small one)")
        replay(module, list(history), theirs, "the Lightning checkpoint")
        self.history = list(history)

    def remove_hooks(self) -> None:
        """Detach the load hook from the network (resume then no longer regrows it)."""
        self._load_hook.remove()
