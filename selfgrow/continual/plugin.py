"""Avalanche plugin that lets a :class:`~selfgrow.control.GrowthController` grow the model of
a running strategy.

The plugin is a thin adapter: it reports the loss of every optimizer step (plus the accuracy
on stored samples of every past experience, every ``replay_eval_every`` steps) to the
controller, which decides and grows the model and migrates the optimizer in place. The plugin
then repairs what Avalanche keeps on the side (``strategy.optimized_param_id``) so that the
next ``make_optimizer`` neither drops the migrated Adam state nor adds a grown tensor twice.

Optimizer bookkeeping in Avalanche 0.6.0: before each training experience the strategy
calls ``make_optimizer``, which edits the SAME optimizer object in place by parameter name
(``update_optimizer``; the first call also resets its state). So the controller's optimizer
and the strategy's stay one object; should anyone assign a new optimizer to the strategy,
the plugin hands it to the controller at the next callback.

Forgetting is tracked by the experience a sample CAME FROM, never by the experience in which
its class first appeared (in a domain-incremental stream every experience holds every
class). With a replay buffer grouped by experience (``ExperienceBalancedBuffer``,
``ParametricBuffer(groupby="experience")``; listed before or after this plugin: the buffer
is read at the start of each experience, when every plugin's ``after_training_exp`` has
filled it) its groups are the per-experience samples. With any other buffer (class-balanced,
reservoir) or none, the plugin keeps ``held_per_experience`` training samples of each
experience itself.

Randomness: the plugin draws only from its own seeded generators and runs every callback
under :func:`~selfgrow.core.rng_isolated`, so a run whose controller never grows is bitwise
identical to the same strategy without the plugin.
"""

from __future__ import annotations

from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metric_results import MetricValue
from torch import nn
from torch.utils.data import DataLoader

from ..core import eval_mode, rng_isolated
from ..errors import GrowthConfigError
from ..events.record import STRUCTURE_KINDS, GrowthEvent
from .benchmarks import sample_experience


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
        sinks: extra sinks receiving ``log_scalars`` of the per-experience accuracy
            (``replay/acc_exp<k>``, ``replay/acc_mean``, ``replay/max_drop``) at every
            measurement; loss and parameter count are the controller's scalars.
        map_regularizers: after every growth, map the per-parameter state of the strategy's
            EWC / online EWC, Synaptic Intelligence and MAS plugins through the growth's
            ParamMaps (:func:`selfgrow.continual.regularizers.follow_growth`), so their
            penalty is unchanged right after an exact growth. False leaves it to them
            (their own padding: wrong values, and online EWC / SI crash on shape checks).
        capacity_probe: a :class:`~selfgrow.continual.probe.CapacityProbe`: before every
            experience after the first, short trials of "no growth" and of each candidate
            action on the new data (with half the stored old samples) decide whether to grow
            and how; the growth goes through the controller (event logged with the trials'
            numbers as its reason, within the policy's budget and ``max_growths``).

    Attributes:
        events: growth events this plugin saw returned by the controller.
        reference_accuracy: ``{experience: accuracy}`` on stored samples of that experience
            right after it was learned.
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
        map_regularizers: bool = True,
        capacity_probe: Any = None,
    ) -> None:
        super().__init__()
        if not callable(getattr(controller, "observe", None)):
            raise GrowthConfigError(
                f"GrowthPlugin needs a GrowthController, got {type(controller).__name__} "
                f"{controller!r:.60}"
            )
        for what, v in (("replay_eval_every", replay_eval_every),
                        ("max_replay_samples", max_replay_samples),
                        ("held_per_experience", held_per_experience)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise GrowthConfigError(f"{what}={v!r} must be an integer")
        if held_per_experience < 0:
            raise GrowthConfigError(
                f"held_per_experience={held_per_experience} is out of range; valid: >= 0")
        if replay_eval_every < 0 or max_replay_samples < 1:
            raise GrowthConfigError(
                f"need replay_eval_every >= 0 and max_replay_samples >= 1; got "
                f"{replay_eval_every}, {max_replay_samples}"
            )
        self.controller = controller
        self.replay_eval_every = replay_eval_every
        self.max_replay_samples = max_replay_samples
        self.held_per_experience = held_per_experience
        self.sinks = list(sinks or [])
        self.map_regularizers = bool(map_regularizers)
        if self.map_regularizers:  # the controller keeps each growth's ParamTransition
            controller.keep_transition = True
        if capacity_probe is not None:
            from avalanche.models import MultiTaskModule

            if isinstance(controller.model, MultiTaskModule):
                raise GrowthConfigError(
                    f"capacity_probe cannot trial a multi-task model "
                    f"({type(controller.model).__name__} needs task labels in its forward); "
                    f"valid: capacity_probe=None for MultiTaskModule models")
        self.capacity_probe = capacity_probe
        #: one :class:`~selfgrow.continual.probe.ProbeReport` dict per probed experience
        self.probe_reports: list[dict[str, Any]] = []
        #: FLOPs the capacity probe's trials cost (charge them to the run's budget)
        self.probe_flops = 0.0
        #: per growth, the regularisation plugins whose state followed it
        self.mapped_state: list[list[str]] = []
        self.events: list[GrowthEvent] = []
        self.reference_accuracy: dict[int, float] = {}
        self.last_replay_accuracy: dict[int, float] = {}
        self.step = 0
        self._gen = torch.Generator().manual_seed(0)  # DataLoader base seeds (never global)
        self._group_to_exp: dict[Any, int] = {}
        self._last_trained: int | None = None
        self._held: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._stored: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # task labels of the held / stored samples (a multi-task model's forward needs them)
        self._held_t: dict[int, torch.Tensor] = {}
        self._stored_t: dict[int, torch.Tensor] = {}
        self._exp_id = 0
        self._exp_step = 0

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def experience_groups(storage_policy: Any) -> dict[Any, Any] | None:
        """``{group key: group buffer}`` of a storage policy whose groups are experiences,
        else None (class-balanced, reservoir and unknown policies)."""
        from avalanche.training.storage_policy import ExperienceBalancedBuffer, ParametricBuffer

        if isinstance(storage_policy, ExperienceBalancedBuffer) or (
            isinstance(storage_policy, ParametricBuffer)
            and getattr(storage_policy, "groupby", None) == "experience"
        ):
            return dict(storage_policy.buffer_groups)
        return None

    def _grouped_buffer(self, strategy: Any) -> dict[Any, Any] | None:
        rp = self.find_replay_plugin(strategy)
        return None if rp is None else self.experience_groups(rp.storage_policy)

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
            # (and always with GDumb, whose fresh copy of its grown initial model is meant)
            from .regularizers import resets_model

            if self.events and not resets_model(list(getattr(strategy, "plugins", []))):
                strategy.model = ctrl.model
            else:
                ctrl.model = strategy.model
        if strategy.optimizer is not ctrl.optimizer:
            # Avalanche 0.6's make_optimizer edits the optimizer in place, but a user (or
            # another plugin) may assign a new one: follow the strategy.
            ctrl.optimizer = strategy.optimizer

    def _collect_stored(self, strategy: Any) -> None:
        """Tensors of stored samples per past experience: the replay buffer's experience
        groups, else the samples held back by the plugin."""
        groups = self._grouped_buffer(strategy)
        stored: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        if groups is not None:
            # a group that appeared since the last experience started holds that one's samples
            for key in groups:
                if key not in self._group_to_exp and self._last_trained is not None:
                    self._group_to_exp[key] = self._last_trained
            for key, group in groups.items():
                e = self._group_to_exp.get(key)
                buf = group.buffer
                if e is None or e >= self._exp_id or len(buf) == 0:
                    continue
                # own generator: a DataLoader without one draws its base seed from the
                # global RNG (the training run's data order would shift)
                loader = DataLoader(buf, batch_size=512, shuffle=False, generator=self._gen)
                for mb in loader:
                    t = mb[2] if len(mb) > 2 else torch.zeros(len(mb[1]), dtype=torch.long)
                    stored.setdefault(e, []).append((mb[0], mb[1], t))
        else:
            for e, (x, y) in self._held.items():
                if e < self._exp_id:
                    t = self._held_t.get(e, torch.zeros(len(y), dtype=torch.long))
                    stored[e] = [(x, y, t)]
        self._stored = {}
        self._stored_t = {}
        g = torch.Generator().manual_seed(1234)
        for e, parts in stored.items():
            x = torch.cat([p[0] for p in parts])
            y = torch.cat([torch.as_tensor(p[1]) for p in parts])
            t = torch.cat([torch.as_tensor(p[2]) for p in parts])
            if len(y) > self.max_replay_samples:
                idx = torch.randperm(len(y), generator=g)[: self.max_replay_samples]
                x, y, t = x[idx], y[idx], t[idx]
            self._stored[e] = (x, y)
            self._stored_t[e] = t

    @torch.no_grad()
    def _accuracy(self, model: nn.Module, device: Any) -> dict[int, float]:
        from avalanche.models.utils import avalanche_forward

        out: dict[int, float] = {}
        with eval_mode(model):
            for e, (x, y) in sorted(self._stored.items()):
                t = self._stored_t.get(e, torch.zeros(len(y), dtype=torch.long))
                correct = 0
                for i in range(0, len(y), 256):
                    # a MultiTaskModule (multi-head classifier) is called with the task labels
                    logits = avalanche_forward(model, x[i : i + 256].to(device),
                                               t[i : i + 256].to(device))
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
        with rng_isolated():
            self._before_training_exp(strategy)

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        # the buffer group created for this experience (by whichever plugin fills it, before
        # or after this one) is mapped to it when the next experience starts
        self._last_trained = self._exp_id

    def _before_training_exp(self, strategy: Any) -> None:
        exp = strategy.experience
        self._exp_id = int(getattr(exp, "current_experience", self._exp_id))
        self._exp_step = 0
        self._sync(strategy)
        if self._grouped_buffer(strategy) is None and self.held_per_experience > 0:
            x, y, t = sample_experience(exp.dataset, self.held_per_experience,
                                        seed=self._exp_id)
            self._held[self._exp_id] = (x, y)
            self._held_t[self._exp_id] = t
        # every after_training_exp has run by now (buffer filled, whatever the plugin order)
        # and the model is still the one that just finished the previous experience
        self._collect_stored(strategy)
        missing = [e for e in self._stored if e not in self.reference_accuracy]
        if missing:
            acc = self._accuracy(strategy.model, strategy.device)
            for e in missing:
                self.reference_accuracy[e] = acc[e]
                self._publish(strategy, f"Growth/reference_acc/exp{e:03d}", acc[e])
        if self.capacity_probe is not None and self._stored:
            self._probe(strategy, exp)

    def _probe(self, strategy: Any, exp: Any) -> None:
        """Run the capacity probe on the new experience; grow by its choice."""
        probe = self.capacity_probe
        ctrl = self.controller
        allowed = [c for c in probe.candidates
                   if not ctrl.check_limits(c, **probe.action_kwargs.get(c, {}))]
        if not allowed:
            return
        new = sample_experience(exp.dataset, probe.max_new, seed=10_000 + self._exp_id)[:2]
        old = (torch.cat([x for x, _ in self._stored.values()]),
               torch.cat([torch.as_tensor(y) for _, y in self._stored.values()]))
        report = probe.run(strategy.model, strategy.optimizer, new, old, allowed=allowed)
        self.probe_flops += report.flops
        rec = {"experience": self._exp_id, "step": self.step, **report.to_dict()}
        self.probe_reports.append(rec)
        scal = {f"probe/gain_{t.action}": t.score - report.trials[0].score
                for t in report.trials[1:]}
        scal["probe/score_none"] = report.trials[0].score
        self._log(scal)
        if report.choice is None:
            return
        ev = ctrl.grow(report.choice, reason=report.describe(),
                       trigger={"signal": "capacity_probe", "value": report.gain,
                                "threshold": probe.margin},
                       **probe.action_kwargs.get(report.choice, {}))
        self._after_decision(strategy, ev)

    def after_update(self, strategy: Any, **kwargs: Any) -> None:
        if not strategy.is_training:
            return
        with rng_isolated():
            self._after_update(strategy)

    def _after_update(self, strategy: Any) -> None:
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
        if getattr(ev, "kind", "growth") not in STRUCTURE_KINDS:
            return
        self.events.append(ev)
        ctrl = self.controller
        strategy.model = ctrl.model
        if strategy.optimizer is not ctrl.optimizer:
            strategy.optimizer = ctrl.optimizer
        self._refresh_param_map(strategy)
        transition = getattr(ctrl, "last_transition", None)
        if transition is not None:
            if self.map_regularizers:
                from ..ops import op_config_from_dict
                from .regularizers import follow_growth

                cfg = ev.action.get("config")
                self.mapped_state.append(
                    follow_growth(list(getattr(strategy, "plugins", [])), strategy.model,
                                  transition, op_config_from_dict(cfg) if cfg else None))
            ctrl.last_transition = None  # do not keep the old tensors alive
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
            "group_to_exp": [[k, v] for k, v in self._group_to_exp.items()],
            "last_trained": self._last_trained,
            "held": {e: (x.clone(), y.clone()) for e, (x, y) in self._held.items()},
            "held_task": {e: t.clone() for e, t in self._held_t.items()},
            "probe_reports": list(self.probe_reports),
            "probe_flops": self.probe_flops,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.step = int(state["step"])
        self._exp_id = int(state["exp_id"])
        self.reference_accuracy = {int(k): float(v) for k, v in state["reference_accuracy"].items()}
        self._group_to_exp = {k: int(v) for k, v in state.get("group_to_exp", [])}
        lt = state.get("last_trained")
        self._last_trained = None if lt is None else int(lt)
        self._held = {int(e): (x.clone(), y.clone()) for e, (x, y) in state["held"].items()}
        self._held_t = {int(e): t.clone() for e, t in state.get("held_task", {}).items()}
        self.probe_reports = list(state.get("probe_reports", []))
        self.probe_flops = float(state.get("probe_flops", 0.0))

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
