"""Growth under DistributedDataParallel: one decision for all ranks, the same growth on every
rank, then a fresh DDP wrapper.

Every rank runs the same :class:`~selfgrow.control.controller.GrowthController`; this module
keeps them in lock-step:

1. **Signals see global metrics.** ``observe(loss=..., **metrics)`` all-reduces (mean over
   ranks) the loss and every numeric metric in one collective before the signals update, so
   every rank's signals hold the same state. Gradient-reading signals already see the
   all-reduced gradients.
2. **One decision.** The policy decides on rank 0 only; the decision is broadcast
   (``broadcast_object_list``) and every rank applies exactly that decision, so a policy that
   reads rank-local data (router statistics of the local batch, a capacity probe) still
   cannot split the ranks.
3. **The same growth.** Random parts of an operator (noise, fresh units, random unit choices)
   draw from the global torch RNG, which differs between ranks; for the duration of the growth
   it is seeded with the same value on every rank (from a shared base seed, the step and the
   growth count) and restored afterwards, so grown parameters are bit-identical. With
   ``check_consistency`` (default) a SHA-256 fingerprint of every parameter and buffer is
   compared across ranks after each growth and a :class:`DistributedGrowthError` is raised
   when they differ.
4. **Re-wrap.** DDP registers autograd hooks and gradient buckets for the parameters it was
   built with; after a growth the old wrapper's hooks are removed and a fresh
   ``DistributedDataParallel`` is built around the grown module. The optimizer holds the
   underlying module's parameters (never the wrapper's) and is migrated in place.

Training loop (launched with ``torchrun --nproc_per_node=N train.py``)::

    dist.init_process_group("nccl")                 # or "gloo" on CPU
    model = build_model(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)      # the module's parameters
    ctrl = DistributedGrowthController(model, opt, signals=[LossPlateau(window=200)],
                                       policy=policy, log_dir="runs/exp1", probe=probe,
                                       ddp_kwargs={"device_ids": [local_rank]})
    for x, y in loader:                             # e.g. with a DistributedSampler
        opt.zero_grad()
        loss = loss_fn(ctrl.ddp_model(x), y)        # always ctrl.ddp_model: it is replaced
        loss.backward()
        opt.step()
        ctrl.observe(loss=loss)                     # called on every rank, every step
    ctrl.close()

Only rank 0 writes ``events.jsonl`` (``log_all_ranks=True`` gives every rank
``log_dir/rank<r>``); every rank keeps the same events in ``ctrl.events``. Checkpoints are
written by rank 0 (``save_checkpoint(path, ctrl.ddp_model, opt, controller=ctrl)`` unwraps the
model) and loaded on every rank.

Requirements: every rank passes the same metric keys to ``observe`` and the same probe batch;
do not keep references to an old ``ddp_model`` across ``observe`` calls.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..errors import DistributedGrowthError, GrowthConfigError, SelfgrowError
from ..events.record import GrowthEvent
from .controller import GrowthController
from .policies import Action, Decision, Policy, PolicyContext
from .signals import Signal

__all__ = [
    "DistributedGrowthController",
    "DistributedGrowthError",
    "RankZeroPolicy",
    "model_fingerprint",
    "reduce_metrics",
]



def _group_src(group: Any) -> int:
    """Global rank of the group's rank 0."""
    return 0 if group is None else dist.get_global_rank(group, 0)


def _comm_device(group: Any) -> torch.device:
    backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduce_metrics(
    metrics: Mapping[str, Any], group: Any = None, device: torch.device | None = None
) -> dict[str, Any]:
    """Mean over ranks of every numeric metric, in one ``all_reduce``.

    Python floats and one-element tensors are packed into one float64 vector; larger tensors
    are averaged with one collective each (in sorted key order); ints (experience ids,
    counters), ``None`` and other values (dicts, strings) pass through unchanged.

    Args:
        metrics: this rank's metrics; every rank must pass the same keys with the same kinds.
        group: process group (default: the world).
        device: tensor device for the collective (default: CUDA for NCCL, else CPU).

    Returns:
        The metrics with numeric values replaced by their mean over ranks (floats stay floats;
        tensors come back as tensors on their original device).
    """
    world = dist.get_world_size(group)
    out = dict(metrics)
    if world == 1:
        return out
    dev = device or _comm_device(group)
    scalar_keys, tensor_keys = [], []
    for k in sorted(metrics):
        v = metrics[k]
        if isinstance(v, (bool, int)) or v is None:  # ids and counters: left alone
            continue
        if isinstance(v, float) or (isinstance(v, torch.Tensor) and v.numel() == 1):
            scalar_keys.append(k)
        elif isinstance(v, torch.Tensor) and v.dtype != torch.bool and not v.is_complex():
            tensor_keys.append(k)
    if scalar_keys:
        vec = torch.tensor(
            [float(metrics[k].detach()) if isinstance(metrics[k], torch.Tensor)
             else float(metrics[k]) for k in scalar_keys],
            dtype=torch.float64,
            device=dev,
        )
        dist.all_reduce(vec, op=dist.ReduceOp.SUM, group=group)
        vec /= world
        for k, v in zip(scalar_keys, vec.tolist(), strict=True):
            out[k] = v
    for k in tensor_keys:
        t = metrics[k].detach().to(device=dev, dtype=torch.float64).clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        out[k] = (t / world).to(device=metrics[k].device, dtype=_float_dtype(metrics[k]))
    return out


def _float_dtype(t: torch.Tensor) -> torch.dtype:
    return t.dtype if t.is_floating_point() else torch.float32


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of every parameter and buffer."""
    h = hashlib.sha256()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        c = t.detach().cpu().contiguous().reshape(-1)  # 0-dim buffers (BN counters, ramps)
        h.update(f"{name}|{tuple(t.shape)}|{c.dtype}|".encode())
        h.update(c.view(torch.uint8).numpy().tobytes() if c.numel() else b"")
    return h.hexdigest()


class RankZeroPolicy(Policy):
    """Wraps a policy so that it decides on rank 0 and every rank applies that decision.

    Each ``decide`` call costs one 1-element broadcast, plus a ``broadcast_object_list`` of the
    decision when rank 0 has one. When the decision is to grow now, the global torch RNG of
    every rank is seeded with the same value until the controller reports the outcome through
    ``notify`` (then the rank's own RNG state is restored), so random growth initialisation is
    identical on every rank.

    Args:
        policy: the policy to run on rank 0 (its state evolves identically on every rank,
            through ``notify``).
        group: process group (default: the world).
        seed: base seed shared by all ranks (default: rank 0's ``torch.initial_seed()``,
            broadcast).
        sync_rng: seed the RNG during growth (default True; False only for tests).
    """

    def __init__(
        self, policy: Policy, group: Any = None, seed: int | None = None, sync_rng: bool = True
    ) -> None:
        if not isinstance(policy, Policy):
            raise GrowthConfigError(f"policy must be a Policy, got {type(policy).__name__}")
        self.inner = policy
        self.group = group
        self.rank = dist.get_rank(group)
        self.sync_rng = sync_rng
        base = [int(seed) if seed is not None else torch.initial_seed()]
        dist.broadcast_object_list(base, src=_group_src(group), group=group)
        self.seed = int(base[0])
        self.attempts = 0  # go-decisions received (identical on every rank)
        self._stash: tuple[torch.Tensor, list[torch.Tensor] | None] | None = None

    # --- delegated attributes ----------------------------------------------------------------
    @property
    def max_per_step(self) -> int:  # type: ignore[override]
        return self.inner.max_per_step

    @property
    def cooldown(self) -> int:  # type: ignore[override]
        return self.inner.cooldown

    @property
    def budget(self) -> Any:
        return getattr(self.inner, "budget", None)

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (during unpickling)
            raise AttributeError(name)
        return getattr(self.inner, name)

    def actions(self) -> list[Action]:
        return self.inner.actions()

    def needs_total_steps(self) -> bool:
        return self.inner.needs_total_steps()

    def needs_estimate(self) -> bool:
        return self.inner.needs_estimate()

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(state)

    # --- decision ---------------------------------------------------------------------------
    def decide(
        self, states: Mapping[str, Mapping[str, Any]], ctx: PolicyContext
    ) -> tuple[Decision | None, str]:
        src = _group_src(self.group)
        dev = _comm_device(self.group)
        result: Any = (None, "")
        error: BaseException | None = None
        if self.rank == 0:
            try:
                result = self.inner.decide(states, ctx)
            except Exception as e:  # noqa: BLE001 - re-raised on every rank below
                error, result = e, f"{type(e).__name__}: {e}"
        code = 0 if result[0] is None else 1
        if error is not None:
            code = 2
        flag = torch.tensor([code], dtype=torch.int32, device=dev)
        dist.broadcast(flag, src=src, group=self.group)  # every rank leaves decide together
        code = int(flag.item())
        if code == 0:
            return None, result[1]
        box: list[Any] = [result]
        dist.broadcast_object_list(box, src=src, group=self.group)
        if code == 2:
            if error is not None:
                raise error
            raise DistributedGrowthError(f"the policy failed on rank 0: {box[0]}")
        decision, reason = box[0]
        if decision is not None and decision.go:
            self.attempts += 1
            if self.sync_rng:
                self._seed_for(ctx.step)
        return decision, reason

    def notify(self, decision: Decision, step: int, applied: bool) -> None:
        self._restore_rng()
        self.inner.notify(decision, step, applied)

    # --- RNG during growth ------------------------------------------------------------------
    def _seed_for(self, step: int) -> None:
        self._restore_rng()
        cuda = (
            torch.cuda.get_rng_state_all()
            if torch.cuda.is_available() and torch.cuda.is_initialized()
            else None
        )
        self._stash = (torch.get_rng_state(), cuda)
        torch.manual_seed((self.seed * 1_000_003 + step * 9_176 + self.attempts) % (2**63 - 1))

    def _restore_rng(self) -> None:
        if self._stash is None:
            return
        cpu, cuda = self._stash
        self._stash = None
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


class DistributedGrowthController:
    """A :class:`GrowthController` for DDP training (see the module docstring for the flow).

    Args:
        model: the plain module (a ``DistributedDataParallel`` is unwrapped; the controller
            builds and owns the wrapper).
        optimizer: optimizer over ``model.parameters()`` (the module's, not a wrapper's).
        signals: as for GrowthController.
        policy: as for GrowthController; wrapped in :class:`RankZeroPolicy`.
        log_dir: directory of ``events.jsonl``, written by rank 0 only (unless
            ``log_all_ranks``: then ``log_dir/rank<r>/events.jsonl`` on every rank).
        process_group: process group (default: the world).
        ddp_kwargs: keyword arguments of every ``DistributedDataParallel`` built (e.g.
            ``device_ids=[local_rank]``, ``find_unused_parameters``).
        growth_seed: base seed for random growth initialisation (default: rank 0's
            ``torch.initial_seed()``).
        check_consistency: compare parameter fingerprints across ranks after each growth.
        sync_growth_rng: seed the RNG identically during growth (default True).
        log_all_ranks: every rank writes its own event log.
        **controller_kwargs: any other GrowthController argument (probe, stabilizer,
            total_steps, run_id, sinks ...). ``run_id`` defaults to rank 0's.

    Raises:
        SelfgrowError: ``torch.distributed`` is not initialised.
        GrowthConfigError: the optimizer holds tensors that are not the model's parameters.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        signals: Sequence[Signal] = (),
        policy: Policy | None = None,
        *,
        log_dir: str | None = None,
        process_group: Any = None,
        ddp_kwargs: Mapping[str, Any] | None = None,
        growth_seed: int | None = None,
        check_consistency: bool = True,
        sync_growth_rng: bool = True,
        log_all_ranks: bool = False,
        **controller_kwargs: Any,
    ) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise SelfgrowError(
                "torch.distributed is not initialised; call dist.init_process_group(...) first "
                "(or use GrowthController for single-process training)"
            )
        if isinstance(model, DistributedDataParallel):  # the controller owns the wrapper
            remove = getattr(model, "_remove_autograd_hooks", None)
            if callable(remove):
                remove()
            model = model.module
        if optimizer is not None:
            own = {id(p) for p in model.parameters()}
            if any(id(p) not in own for g in optimizer.param_groups for p in g["params"]):
                raise GrowthConfigError(
                    "the optimizer holds tensors that are not parameters of the model; build it "
                    "from the plain module's parameters (model.parameters(), not a wrapper's "
                    "copies) so that growth can migrate it"
                )
        self.group = process_group
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        self.ddp_kwargs = dict(ddp_kwargs or {})
        self.check_consistency = check_consistency
        self._policy = (
            RankZeroPolicy(policy, process_group, growth_seed, sync_growth_rng)
            if policy is not None
            else None
        )
        if log_dir is not None and log_all_ranks:
            log_dir = f"{log_dir}/rank{self.rank}"
        elif self.rank != 0:
            log_dir = None
        run_id = [controller_kwargs.pop("run_id", None)]
        if run_id[0] is None and self.rank == 0:
            from .controller import _default_run_id

            run_id[0] = _default_run_id()
        dist.broadcast_object_list(run_id, src=_group_src(process_group), group=process_group)
        self.controller = GrowthController(
            model, optimizer, signals, self._policy, log_dir=log_dir, run_id=run_id[0],
            **controller_kwargs,
        )
        self.ddp_model: DistributedDataParallel = self._wrap(model)

    # --- delegation ---------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        """The underlying (unwrapped) module."""
        return self.controller.model

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self.controller.optimizer

    @optimizer.setter
    def optimizer(self, opt: torch.optim.Optimizer | None) -> None:
        self.controller.optimizer = opt

    @property
    def events(self) -> list[GrowthEvent]:
        return self.controller.events

    @property
    def sinks(self) -> list[Any]:
        return self.controller.sinks

    @property
    def events_path(self) -> Any:
        """This rank's ``events.jsonl`` (None on ranks that keep no log)."""
        for s in self.controller.sinks:
            p = getattr(s, "path", None)
            if p is not None and str(p).endswith("events.jsonl"):
                return p
        return None

    @property
    def seq(self) -> int:
        return self.controller.seq

    @property
    def step(self) -> int:
        return self.controller.step

    # --- per step -----------------------------------------------------------------------------
    def observe(
        self,
        loss: Any = None,
        step: int | None = None,
        epoch: int | None = None,
        experience: int | None = None,
        **metrics: Any,
    ) -> GrowthEvent | None:
        """Reduce metrics across ranks, run the controller (rank 0 decides), and after a
        growth check the ranks agree and re-wrap the model in a fresh DDP.

        Must be called on every rank at every step with the same metric keys.

        Returns:
            The growth event (identical on every rank up to wall-clock fields), or None.

        Raises:
            DistributedGrowthError: ranks differ after a growth.
        """
        if loss is not None:
            metrics["loss"] = loss
        metrics = reduce_metrics(metrics, self.group)
        loss = metrics.pop("loss", None)
        attempts = self._attempts()
        n_before = self.controller.n_changes
        event = self.controller.observe(
            loss=loss, step=step, epoch=epoch, experience=experience, **metrics
        )
        if self._attempts() != attempts:
            self._after_growth(n_before)
        return event

    def grow(self, config_or_action: Action, reason: str = "manual", **kwargs: Any
             ) -> GrowthEvent:
        """Grow now on every rank (call it on every rank with the same arguments)."""
        n_before = self.controller.n_changes
        pol = self._policy
        if pol is not None:
            pol.attempts += 1
            if pol.sync_rng:
                pol._seed_for(self.controller.step)
        try:
            ev = self.controller.grow(config_or_action, reason, **kwargs)
        finally:
            if pol is not None:
                pol._restore_rng()
        self._after_growth(n_before)
        return ev

    # --- internals ------------------------------------------------------------------------
    def _attempts(self) -> int:
        return self._policy.attempts if self._policy is not None else 0

    def _wrap(self, module: nn.Module) -> DistributedDataParallel:
        return DistributedDataParallel(module, process_group=self.group, **self.ddp_kwargs)

    def _after_growth(self, n_before: int) -> None:
        grew = self.controller.n_changes != n_before
        if self.check_consistency:
            mine = (self.controller.n_changes, model_fingerprint(self.model) if grew else "")
            all_: list[Any] = [None] * self.world_size
            dist.all_gather_object(all_, mine, group=self.group)
            if any(x != all_[0] for x in all_):
                raise DistributedGrowthError(
                    f"ranks disagree after growth at step {self.controller.step}: "
                    f"(growths + prunes, parameter fingerprint) per rank = {all_}; check that "
                    f"every rank passes the same probe and that operators draw randomness only "
                    f"from the torch RNG"
                )
        if grew:
            old = self.ddp_model
            remove = getattr(old, "_remove_autograd_hooks", None)
            if callable(remove):
                remove()
            del old
            self.ddp_model = self._wrap(self.model)

    # --- persistence --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The controller's state plus the shared growth seed."""
        st = self.controller.state_dict()
        if self._policy is not None:
            st["distributed"] = {"growth_seed": self._policy.seed,
                                 "attempts": self._policy.attempts}
        return st

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        st = dict(state)
        d = st.pop("distributed", None)
        self.controller.load_state_dict(st)
        if d is not None and self._policy is not None:
            self._policy.seed = int(d["growth_seed"])
            self._policy.attempts = int(d["attempts"])

    def close(self) -> None:
        """Close the controller's sinks (the process group is left to the caller)."""
        self.controller.close()

    def __enter__(self) -> DistributedGrowthController:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
