"""Growth under DistributedDataParallel: one decision for all ranks, the same growth on every
rank, then a fresh DDP wrapper.

Every rank runs the same :class:`~selfgrow.control.controller.GrowthController`, given
``distributed=DDPStrategy(...)`` (a :class:`~selfgrow.control.strategy.GrowthStrategy`); the
strategy keeps the ranks in lock-step:

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
    ctrl = GrowthController(model, opt, signals=[LossPlateau(window=200)], policy=policy,
                            log_dir="runs/exp1", probe=probe,
                            distributed=DDPStrategy(ddp_kwargs={"device_ids": [local_rank]}))
    for x, y in loader:                             # e.g. with a DistributedSampler
        opt.zero_grad()
        loss = loss_fn(ctrl.wrapped_model(x), y)    # fetched every step: it is replaced
        loss.backward()
        opt.step()
        ctrl.observe(loss=loss)                     # called on every rank, every step
    ctrl.close()

Only rank 0 writes ``events.jsonl`` (``log_all_ranks=True`` gives every rank
``log_dir/rank<r>``); every rank keeps the same events in ``ctrl.events``. Checkpoints are
written by rank 0 (``save_checkpoint(path, ctrl.wrapped_model, opt, controller=ctrl)`` unwraps
the model) and loaded on every rank. ``DistributedGrowthController(model, opt, ...)`` is the
same controller, built with ``DDPStrategy`` from the same keyword arguments.

Requirements: every rank passes the same metric keys to ``observe`` and the same probe batch;
do not keep references to an old ``wrapped_model`` across ``observe`` calls.
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
from .controller import GrowthController
from .policies import Action, Decision, Policy, PolicyContext
from .signals import Signal
from .strategy import GrowthStrategy

__all__ = [
    "DDPStrategy",
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
        self.last_seed: int | None = None
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
        #: the seed of the last growth (reproduce it on one process: torch.manual_seed(...))
        self.last_seed = (self.seed * 1_000_003 + step * 9_176 + self.attempts) % (2**63 - 1)
        torch.manual_seed(self.last_seed)

    def _restore_rng(self) -> None:
        if self._stash is None:
            return
        cpu, cuda = self._stash
        self._stash = None
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


class DDPStrategy(GrowthStrategy):
    """DDP as a :class:`~selfgrow.control.strategy.GrowthStrategy` of the one
    :class:`~selfgrow.control.controller.GrowthController` (see the module docstring for the
    flow): ``GrowthController(model, opt, signals, policy, distributed=DDPStrategy(...))``.

    Args:
        process_group: process group (default: the world).
        ddp_kwargs: keyword arguments of every ``DistributedDataParallel`` built (e.g.
            ``device_ids=[local_rank]``, ``find_unused_parameters``).
        growth_seed: base seed for random growth initialisation (default: rank 0's
            ``torch.initial_seed()``).
        check_consistency: compare parameter fingerprints across ranks after each growth.
        sync_growth_rng: seed the RNG identically during growth (default True).
        log_all_ranks: every rank writes its own event log (``log_dir/rank<r>``); by default
            only rank 0 writes ``log_dir/events.jsonl``.

    Raises:
        SelfgrowError: ``torch.distributed`` is not initialised.
        GrowthConfigError (at controller construction): the optimizer holds tensors that are
            not the model's parameters.
    """

    name = "ddp"

    def __init__(
        self,
        *,
        process_group: Any = None,
        ddp_kwargs: Mapping[str, Any] | None = None,
        growth_seed: int | None = None,
        check_consistency: bool = True,
        sync_growth_rng: bool = True,
        log_all_ranks: bool = False,
    ) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise SelfgrowError(
                "torch.distributed is not initialised; call dist.init_process_group(...) first "
                "(or leave distributed=None for single-process training)"
            )
        self.group = process_group
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        self.ddp_kwargs = dict(ddp_kwargs or {})
        self.growth_seed = growth_seed
        self.check_consistency = check_consistency
        self.sync_growth_rng = sync_growth_rng
        self.log_all_ranks = log_all_ranks
        self.policy: RankZeroPolicy | None = None
        #: the current DistributedDataParallel wrapper (None before the controller binds)
        self.ddp_model: DistributedDataParallel | None = None

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer | None,
              log_dir: str | None, run_id: str | None
              ) -> tuple[nn.Module, str | None, str | None]:
        if isinstance(model, DistributedDataParallel):  # the strategy owns the wrapper
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
        if log_dir is not None and self.log_all_ranks:
            log_dir = f"{log_dir}/rank{self.rank}"
        elif self.rank != 0:
            log_dir = None
        box = [run_id]
        if box[0] is None and self.rank == 0:
            from .controller import _default_run_id

            box[0] = _default_run_id()
        dist.broadcast_object_list(box, src=_group_src(self.group), group=self.group)
        return model, log_dir, box[0]

    def wrap_policy(self, policy: Any) -> Any:
        self.policy = RankZeroPolicy(policy, self.group, self.growth_seed, self.sync_growth_rng)
        return self.policy

    def bind(self, controller: Any) -> None:
        self.ddp_model = self._wrap(controller.model)

    def reduce(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        return reduce_metrics(metrics, self.group)

    def attempts(self) -> int:
        return self.policy.attempts if self.policy is not None else 0

    def before_manual(self, step: int) -> None:
        if self.policy is not None:
            self.policy.attempts += 1
            if self.policy.sync_rng:
                self.policy._seed_for(step)

    def after_manual(self) -> None:
        if self.policy is not None:
            self.policy._restore_rng()

    def wrapped(self, model: nn.Module) -> nn.Module:
        return self.ddp_model if self.ddp_model is not None else model

    def _wrap(self, module: nn.Module) -> DistributedDataParallel:
        return DistributedDataParallel(module, process_group=self.group, **self.ddp_kwargs)

    def after_change(self, controller: Any, n_before: int) -> None:
        grew = controller.n_changes != n_before
        if self.check_consistency:
            mine = (controller.n_changes, model_fingerprint(controller.model) if grew else "")
            all_: list[Any] = [None] * self.world_size
            dist.all_gather_object(all_, mine, group=self.group)
            if any(x != all_[0] for x in all_):
                raise DistributedGrowthError(
                    f"ranks disagree after growth at step {controller.step}: "
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
            self.ddp_model = self._wrap(controller.model)

    def state_dict(self) -> dict[str, Any]:
        """The shared growth seed and the decisions received (empty without a policy)."""
        if self.policy is None:
            return {}
        return {"growth_seed": self.policy.seed, "attempts": self.policy.attempts}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.policy is not None and state:
            self.policy.seed = int(state["growth_seed"])
            self.policy.attempts = int(state["attempts"])


def DistributedGrowthController(  # noqa: N802 - the constructor-like name users know
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    signals: Sequence[Signal] = (),
    policy: Policy | None = None,
    *,
    process_group: Any = None,
    ddp_kwargs: Mapping[str, Any] | None = None,
    growth_seed: int | None = None,
    check_consistency: bool = True,
    sync_growth_rng: bool = True,
    log_all_ranks: bool = False,
    **controller_kwargs: Any,
) -> GrowthController:
    """``GrowthController(model, optimizer, signals, policy, distributed=DDPStrategy(...),
    **controller_kwargs)``: the one controller with the DDP strategy (arguments as
    :class:`DDPStrategy`). The training loop calls ``ctrl.wrapped_model``."""
    strategy = DDPStrategy(process_group=process_group, ddp_kwargs=ddp_kwargs,
                           growth_seed=growth_seed, check_consistency=check_consistency,
                           sync_growth_rng=sync_growth_rng, log_all_ranks=log_all_ranks)
    return GrowthController(model, optimizer, signals, policy, distributed=strategy,
                            **controller_kwargs)
