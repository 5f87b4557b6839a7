"""Avalanche plugin that lets a :class:`~selfgrow.control.GrowthController` grow the model of
a running strategy.

The plugin is a thin adapter: it reports the loss of every optimizer step (plus the accuracy
on replay-buffer samples of every past experience, every ``replay_eval_every`` steps) to the
controller, which decides and grows the model and migrates the optimizer in place. The plugin
then repairs what Avalanche keeps on the side (``strategy.optimized_param_id``) so that the
next ``make_optimizer`` neither drops the migrated Adam state nor adds a grown tensor twice.

Optimizer bookkeeping in Avalanche 0.6.0: before each training experience the strategy
calls ``make_optimizer``, which edits the SAME optimizer object in place by parameter name
(``update_optimizer``; the first call also resets its state). So the controller's optimizer
and the strategy's stay one object; should anyone assign a new optimizer to the strategy,
the plugin hands it to the controller at the next callback.

Works with ``Replay`` / any strategy with a ``ReplayPlugin`` (listed before or after this
plugin: the buffer is read at the start of each experience, when every plugin's
``after_training_exp`` has filled it) and without one (then it keeps
``held_per_experience`` training samples of each experience itself).
"""

from __future__ import annotations

from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metric_results import MetricValue
from torch import nn
from torch.utils.data import DataLoader

from ..core import eval_mode
from ..errors import GrowthConfigError
from ..events.record import GrowthEvent


class GrowthPlugin(SupervisedPlugin):
    """Grow the strategy's model with a growth controller while Avalanche trains it.

    Args:
        controller: a ``GrowthController`` built on the SAME model and optimizer objects as
            the strategy (``strategy.model is controller.model``).
        replay_eval_every: measure replay accuracy every this many optimizer steps (and at
            the first step of each experience); ``0`` disables it.
        max_replay_samples: at most this many stored samples per past experience are used
            for replay accuracy (cost: one forward pass over them).
        held_per_experience: without a replay buffer in the strategy, keep this many samples
            of each experience's training data to measure accuracy on instead.
        sinks: extra sinks receiving ``log_scalars`` (loss, parameters, replay accuracy)
            every ``log_every`` steps.
        log_every: scalar logging period in optimizer steps.

    Attributes:
        events: growth events this plugin saw returned by the controller.
        reference_accuracy: ``{experience: accuracy}`` on stored samples right after it was
            learned.
        last_replay_accuracy: the latest ``{experience: accuracy}`` measurement.
        step: optimizer steps seen.
    """

    def __init__(
        self,
        controller: Any,
        replay_eval_every: int = 25,
        max_replay_samples: int = 200,
        held_per_experience: int = 100,
        sinks: list[Any] | None = None,
        log_every: int = 10,
    ) -> None:
        super().__init__()
        if replay_eval_every < 0 or log_every < 1 or max_replay_samples < 1:
            raise GrowthConfigError(
                f"need replay_eval_every >= 0, log_every >= 1, max_replay_samples >= 1; got "
                f"{replay_eval_every}, {log_every}, {max_replay_samples}"
            )
        self.controller = controller
        self.replay_eval_every = replay_eval_every
        self.max_replay_samples = max_replay_samples
        self.held_per_experience = held_per_experience
        self.sinks = list(sinks or [])
        self.log_every = log_every
        self.events: list[GrowthEvent] = []
        self.reference_accuracy: dict[int, float] = {}
        self.last_replay_accuracy: dict[int, float] = {}
        self.step = 0
        self._class_to_exp: dict[int, int] = {}
        self._held: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._stored: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._exp_id = 0
        self._exp_step = 0

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def find_replay_plugin(strategy: Any) -> Any | None:
        """The first plugin of the strategy holding a replay buffer (``storage_policy``)."""
        for p in getattr(strategy, "plugins", []):
            sp = getattr(p, "storage_policy", None)
            if sp is not None and hasattr(sp, "buffer"):
                return p
        return None

    def _sync(self, strategy: Any) -> None:
        """Make controller and strategy share one model and one optimizer object."""
        ctrl = self.controller
        if strategy.model is not ctrl.model:
            # the controller is the authority after a growth; before any, the strategy is
            if self.events:
                strategy.model = ctrl.model
            else:
                ctrl.model = strategy.model
        if strategy.optimizer is not ctrl.optimizer:
            # Avalanche 0.6's make_optimizer edits the optimizer in place, but a user (or
            # another plugin) may assign a new one: follow the strategy.
            ctrl.optimizer = strategy.optimizer

    def _collect_stored(self, strategy: Any) -> None:
        """Tensors of stored samples per past experience, from the replay buffer or held."""
        rp = self.find_replay_plugin(strategy)
        stored: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        if rp is not None:
            buf = rp.storage_policy.buffer
            if len(buf) > 0:
                for mb in DataLoader(buf, batch_size=512, shuffle=False):
                    x, y = mb[0], mb[1]
                    for c in torch.unique(y).tolist():
                        e = self._class_to_exp.get(int(c))
                        if e is None or e >= self._exp_id:
                            continue
                        m = y == c
                        stored.setdefault(e, []).append((x[m], y[m]))
        else:
            for e, xy in self._held.items():
                if e < self._exp_id:
                    stored[e] = [xy]
        self._stored = {}
        g = torch.Generator().manual_seed(1234)
        for e, parts in stored.items():
            x = torch.cat([p[0] for p in parts])
            y = torch.cat([p[1] for p in parts])
            if len(y) > self.max_replay_samples:
                idx = torch.randperm(len(y), generator=g)[: self.max_replay_samples]
                x, y = x[idx], y[idx]
            self._stored[e] = (x, y)

    @torch.no_grad()
    def _accuracy(self, model: nn.Module, device: Any) -> dict[int, float]:
        out: dict[int, float] = {}
        with eval_mode(model):
            for e, (x, y) in sorted(self._stored.items()):
                correct = 0
                for i in range(0, len(y), 256):
                    logits = model(x[i : i + 256].to(device))
                    correct += int((logits.argmax(-1).cpu() == y[i : i + 256]).sum())
                out[e] = correct / max(len(y), 1)
        return out

    def _publish(self, strategy: Any, name: str, value: float) -> None:
        ev = getattr(strategy, "evaluator", None)
        if ev is not None:
            ev.publish_metric_value(MetricValue(self, name, value, self.step))

    def _log(self, scalars: dict[str, float]) -> None:
        for s in self.sinks:
            s.log_scalars(self.step, scalars)

    # ------------------------------------------------------------------ callbacks
    def before_training(self, strategy: Any, **kwargs: Any) -> None:
        self._sync(strategy)

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        exp = strategy.experience
        self._exp_id = int(getattr(exp, "current_experience", self._exp_id))
        self._exp_step = 0
        for c in getattr(exp, "classes_in_this_experience", []) or []:
            self._class_to_exp.setdefault(int(c), self._exp_id)
        self._sync(strategy)
        if self.find_replay_plugin(strategy) is None and self.held_per_experience > 0:
            ds = exp.dataset.eval() if hasattr(exp.dataset, "eval") else exp.dataset
            n = min(self.held_per_experience, len(ds))
            g = torch.Generator().manual_seed(self._exp_id)
            idx = torch.randperm(len(ds), generator=g)[:n].tolist()
            items = [ds[i] for i in idx]
            self._held[self._exp_id] = (
                torch.stack([it[0] for it in items]),
                torch.as_tensor([int(it[1]) for it in items]),
            )
        # every after_training_exp has run by now (buffer filled, whatever the plugin order)
        # and the model is still the one that just finished the previous experience
        self._collect_stored(strategy)
        missing = [e for e in self._stored if e not in self.reference_accuracy]
        if missing:
            acc = self._accuracy(strategy.model, strategy.device)
            for e in missing:
                self.reference_accuracy[e] = acc[e]
                self._publish(strategy, f"Growth/reference_acc/exp{e:03d}", acc[e])

    def after_update(self, strategy: Any, **kwargs: Any) -> None:
        if not strategy.is_training:
            return
        self.step += 1
        self._exp_step += 1
        self._sync(strategy)
        loss_t = strategy.loss
        loss = float(loss_t.detach()) if isinstance(loss_t, torch.Tensor) else float(loss_t)
        metrics: dict[str, Any] = {}
        due = self.replay_eval_every > 0 and (
            self._exp_step == 1 or self.step % self.replay_eval_every == 0
        )
        if due and self._stored:
            acc = self._accuracy(strategy.model, strategy.device)
            self.last_replay_accuracy = acc
            metrics["replay_accuracy"] = dict(acc)
            metrics["experience_end_accuracy"] = {
                e: self.reference_accuracy[e] for e in acc if e in self.reference_accuracy
            }
            scal = {f"replay/acc_exp{e:03d}": a for e, a in acc.items()}
            scal["replay/acc_mean"] = sum(acc.values()) / len(acc)
            drops = [self.reference_accuracy[e] - a for e, a in acc.items()
                     if e in self.reference_accuracy]
            if drops:
                scal["replay/max_drop"] = max(drops)
            self._log(scal)
        ev = self.controller.observe(
            loss=loss,
            step=self.step,
            epoch=int(strategy.clock.train_exp_epochs),
            experience=self._exp_id,
            **metrics,
        )
        if ev is not None:
            self._after_decision(strategy, ev)

    def _after_decision(self, strategy: Any, ev: GrowthEvent) -> None:
        if getattr(ev, "kind", "growth") != "growth":
            return
        self.events.append(ev)
        ctrl = self.controller
        strategy.model = ctrl.model
        if strategy.optimizer is not ctrl.optimizer:
            strategy.optimizer = ctrl.optimizer
        self._refresh_param_map(strategy)
        self._publish(strategy, "Growth/n_params", float(ev.params_after))
        self._publish(strategy, "Growth/n_growths", float(len(self.events)))

    def _refresh_param_map(self, strategy: Any) -> None:
        """The optimizer was edited in place by name; Avalanche's name -> tensor map must
        follow, or the next ``make_optimizer`` re-adds the grown tensors as new parameters
        (each then updated twice per step)."""
        strategy.optimized_param_id = dict(strategy.model.named_parameters())

    def state_dict(self) -> dict[str, Any]:
        """Counters and accuracy references needed to resume (the controller and the replay
        buffer have their own state)."""
        return {
            "step": self.step,
            "exp_id": self._exp_id,
            "reference_accuracy": dict(self.reference_accuracy),
            "class_to_exp": dict(self._class_to_exp),
            "held": {e: (x.clone(), y.clone()) for e, (x, y) in self._held.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.step = int(state["step"])
        self._exp_id = int(state["exp_id"])
        self.reference_accuracy = {int(k): float(v) for k, v in state["reference_accuracy"].items()}
        self._class_to_exp = {int(k): int(v) for k, v in state["class_to_exp"].items()}
        self._held = {int(e): (x.clone(), y.clone()) for e, (x, y) in state["held"].items()}

    def after_training(self, strategy: Any, **kwargs: Any) -> None:
        for s in self.sinks:
            flush = getattr(s, "flush", None)
            if flush is not None:
                flush()


def check_optimizer_matches(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Raise ``GrowthConfigError`` unless the optimizer holds exactly the model's parameters,
    each once (the invariant a growth inside a strategy must keep)."""
    opt_ids = [id(p) for g in optimizer.param_groups for p in g["params"]]
    model_ids = {id(p) for p in model.parameters()}
    if len(opt_ids) != len(set(opt_ids)):
        raise GrowthConfigError("a parameter appears more than once in the optimizer")
    if set(opt_ids) != model_ids:
        raise GrowthConfigError(
            f"optimizer parameters ({len(set(opt_ids))}) differ from model parameters "
            f"({len(model_ids)})"
        )
