"""Growth under FSDP2 (``torch.distributed.fsdp.fully_shard``): gather, grow a plain model,
shard it again, re-key the optimizer, without a restart.

FSDP2 replaces every parameter of a sharded module with a ``DTensor`` holding this rank's
dim-0 shard, and the optimizer's state tensors are ``DTensor`` shards of the same layout. An
operator needs whole tensors, so :class:`FSDP2Strategy` runs each growth as:

1. **Gather.** A plain module is built from a shape-only META skeleton of the current
   architecture (allocated on the parameters' device, tied weights kept tied) and filled with
   ``DTensor.full_tensor()`` of every parameter and gradient; buffers (never sharded) are
   copied. The optimizer (the same object) is re-keyed onto the plain parameters with its
   state tensors gathered. FQNs are unchanged by FSDP2, so everything is matched by name.
2. **Grow.** The controller resolves the action and applies the operator to the plain model
   with the plain optimizer through the usual :func:`~selfgrow.ops.grow_` (validation,
   probe, transactional rollback, Adam state migration) - bit for bit the growth one process
   would do. The same decision and the same RNG seed are used on every rank
   (:class:`~selfgrow.control.distributed.RankZeroPolicy`), and with ``check_consistency`` a
   SHA-256 fingerprint of the grown plain model is compared across ranks.
3. **Re-shard.** ``fully_shard`` is applied again (same units, found again on the grown model,
   so new blocks are sharded like the old ones), the optimizer's ``param_groups`` are
   re-pointed at the new sharded parameters and every state tensor shaped like its parameter
   is cut into this rank's shard (``distribute_tensor(..., src_data_rank=None)``: every rank
   holds the same full tensor, so no communication); gradients likewise. The optimizer and LR
   schedulers stay the same objects.

A failure anywhere (invalid growth, a probe error, a rank mismatch) restores the optimizer's
parameter lists and state, and the original sharded model was never modified: model,
optimizer and gradients are exactly as before.

Memory: during a growth each rank holds the full parameters, gradients and optimizer state
of the model once (plus its shards), then frees them; operators edit arbitrary slices of
whole tensors, so the state is gathered whole. Growth is rare; the steady-state footprint is
FSDP2's.

Training loop (``torchrun --nproc_per_node=8 --nnodes=2 --node_rank=$NODE_RANK
--rdzv-backend=c10d --rdzv-endpoint=$HOST:29500 train.py``)::

    dist.init_process_group("nccl")                   # "gloo" on CPU
    model = build_model(cfg).to(device)               # plain module: the strategy shards it
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    ctrl = GrowthController(model, opt, signals=[LossPlateau(window=200)], policy=policy,
                            log_dir="runs/exp1", distributed=FSDP2Strategy())
    for x, y in loader:
        opt.zero_grad()
        loss = loss_fn(ctrl.wrapped_model(x), y)      # fetched every step: it is replaced
        loss.backward()
        opt.step()
        ctrl.observe(loss=loss)
    ctrl.close()

``FSDP2Strategy(shard_modules=...)`` chooses the ``fully_shard`` units (default: every element
of every ``nn.ModuleList``, then the root); ``fsdp_kwargs`` are passed to every
``fully_shard`` call (``reshard_after_forward``, ``mp_policy``, ``offload_policy``).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..core import full_tensor as _full
from ..errors import DistributedGrowthError, GrowthConfigError, SelfgrowError
from ..ops import meta_twin
from .distributed import DDPStrategy, model_fingerprint

__all__ = ["FSDP2Strategy", "default_shard_units"]

ShardUnits = Callable[[nn.Module], Iterable[nn.Module]]


def _fsdp() -> Any:
    try:
        from torch.distributed import fsdp
        from torch.distributed.tensor import DTensor, distribute_tensor
    except ImportError as e:  # pragma: no cover - torch builds without distributed
        raise SelfgrowError(
            f"FSDP2 needs torch.distributed.fsdp.fully_shard and torch.distributed.tensor "
            f"(torch >= 2.6 with distributed support): {e}") from e
    return fsdp, DTensor, distribute_tensor


def default_shard_units(model: nn.Module) -> list[nn.Module]:
    """Every element of every ``nn.ModuleList`` that holds parameters (transformer blocks,
    experts, stages), deepest first; the root is sharded after them by the strategy."""
    out: list[tuple[int, nn.Module]] = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList):
            depth = name.count(".") + 1 if name else 0
            out.extend((depth, m) for m in mod if any(True for _ in m.parameters()))
    out.sort(key=lambda t: -t[0])  # children before parents (fully_shard is bottom-up)
    seen: set[int] = set()
    units = []
    for _, m in out:
        if id(m) not in seen:
            seen.add(id(m))
            units.append(m)
    return units


class FSDP2Strategy(DDPStrategy):
    """FSDP2 as a :class:`~selfgrow.control.strategy.GrowthStrategy` (see the module
    docstring): ``GrowthController(model, opt, ..., distributed=FSDP2Strategy())`` with the
    PLAIN model and an optimizer over its parameters; the strategy applies ``fully_shard`` and
    re-keys the optimizer onto the sharded parameters at construction and after every growth.

    Metrics are averaged over ranks, rank 0 decides and the RNG is seeded alike during growth,
    as under :class:`~selfgrow.control.distributed.DDPStrategy`.

    Args:
        mesh: a 1-D ``DeviceMesh`` (default: ``init_device_mesh(<parameters' device type>,
            (world_size,))``).
        shard_modules: ``model -> iterable of submodules`` to ``fully_shard`` before the root,
            called again on every grown model (default :func:`default_shard_units`).
        fsdp_kwargs: keyword arguments of every ``fully_shard`` call except ``mesh``.
        growth_seed, check_consistency, sync_growth_rng, log_all_ranks: as DDPStrategy.

    Raises:
        SelfgrowError: ``torch.distributed`` is not initialised.
        GrowthConfigError: a multi-dimensional mesh, ``mesh`` inside ``fsdp_kwargs``, a
            ``shard_modules`` that is not callable; at controller construction: a model that
            is already sharded (``fully_shard`` applied), or an optimizer holding tensors
            that are not the model's parameters.
    """

    name = "fsdp2"

    def __init__(
        self,
        *,
        mesh: Any = None,
        shard_modules: ShardUnits | None = None,
        fsdp_kwargs: Mapping[str, Any] | None = None,
        growth_seed: int | None = None,
        check_consistency: bool = True,
        sync_growth_rng: bool = True,
        log_all_ranks: bool = False,
    ) -> None:
        _fsdp()
        if mesh is not None and getattr(mesh, "ndim", 1) != 1:
            raise GrowthConfigError(
                f"mesh has {mesh.ndim} dimensions; FSDP2Strategy supports a 1-D mesh (HSDP's "
                f"2-D mesh is not supported yet)")
        if shard_modules is not None and not callable(shard_modules):
            raise GrowthConfigError(
                f"shard_modules must be a callable model -> iterable of submodules, got "
                f"{type(shard_modules).__name__}")
        kw = dict(fsdp_kwargs or {})
        if "mesh" in kw:
            raise GrowthConfigError("pass the mesh as FSDP2Strategy(mesh=...), not in "
                                    "fsdp_kwargs")
        super().__init__(process_group=None if mesh is None else mesh.get_group(),
                         growth_seed=growth_seed, check_consistency=check_consistency,
                         sync_growth_rng=sync_growth_rng, log_all_ranks=log_all_ranks)
        self.mesh = mesh
        self.shard_modules: ShardUnits = shard_modules or default_shard_units
        self.fsdp_kwargs = kw
        self._skeleton: nn.Module | None = None
        self.device: torch.device | None = None

    # --- construction ---------------------------------------------------------------------
    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer | None,
              log_dir: str | None, run_id: str | None
              ) -> tuple[nn.Module, str | None, str | None]:
        fsdp, dtensor, _ = _fsdp()
        if isinstance(model, fsdp.FSDPModule) or any(
                isinstance(p, dtensor) for p in model.parameters()):
            raise GrowthConfigError(
                "the model is already sharded (fully_shard was applied); pass the plain module "
                "and let FSDP2Strategy shard it (shard_modules=... chooses the units), so that "
                "it can rebuild the architecture when it grows")
        model, log_dir, run_id = super().setup(model, optimizer, log_dir, run_id)
        params = list(model.parameters())
        if not params:
            raise GrowthConfigError("the model has no parameters to shard")
        self.device = params[0].device
        if self.mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            self.mesh = init_device_mesh(self.device.type, (self.world_size,))
        self._skeleton = meta_twin(model)
        plain = dict(model.named_parameters())
        self._shard(model)
        if optimizer is not None:
            sharded = dict(model.named_parameters())
            _rekey(optimizer, {id(p): sharded[n] for n, p in plain.items()}, _shard_like)
        return model, log_dir, run_id

    def bind(self, controller: Any) -> None:
        """No wrapper: the sharded module is what the loop calls."""

    def wrapped(self, model: nn.Module) -> nn.Module:
        return model

    def plain_view(self, model: nn.Module) -> nn.Module:
        return self._skeleton if self._skeleton is not None else model

    def _shard(self, model: nn.Module) -> None:
        fsdp, _, _ = _fsdp()
        units = list(self.shard_modules(model))
        for u in units:
            if not isinstance(u, nn.Module) or u is model:
                continue
            fsdp.fully_shard(u, mesh=self.mesh, **self.fsdp_kwargs)
        fsdp.fully_shard(model, mesh=self.mesh, **self.fsdp_kwargs)

    # --- growth ---------------------------------------------------------------------------
    def _gather(self, sharded: nn.Module) -> nn.Module:
        """A plain copy of ``sharded`` with full tensors (same FQNs, modes, grad flags)."""
        if self._skeleton is None or self.device is None:
            raise DistributedGrowthError(
                "FSDP2Strategy was not set up: pass it as GrowthController(..., "
                "distributed=FSDP2Strategy()) so it shards the model before any growth")
        # a memo deepcopy, not to_empty(): Module._apply would untie shared parameters
        memo: dict[int, Any] = {}
        for p in self._skeleton.parameters():
            memo[id(p)] = nn.Parameter(torch.empty_like(p, device=self.device),
                                       requires_grad=p.requires_grad)
        for b in self._skeleton.buffers():
            memo[id(b)] = torch.empty_like(b, device=self.device)
        plain = copy.deepcopy(self._skeleton, memo)
        for a, b in zip(plain.modules(), sharded.modules(), strict=True):
            a.training = b.training
        src = dict(sharded.named_parameters())
        with torch.no_grad():
            for name, q in plain.named_parameters():
                p = src[name]
                q.copy_(_full(p.detach()))
                q.requires_grad_(p.requires_grad)
                if p.grad is not None:
                    q.grad = _full(p.grad).clone()
            bufs = dict(sharded.named_buffers())
            for name, b in plain.named_buffers():
                b.copy_(bufs[name])
        return plain

    @contextmanager
    def growth_scope(self, controller: Any) -> Iterator[None]:
        sharded: nn.Module = controller.model
        opt: torch.optim.Optimizer | None = controller.optimizer
        saved = _snapshot(opt)
        plain = self._gather(sharded)
        names = {id(p): n for n, p in sharded.named_parameters()}
        plain_named = dict(plain.named_parameters())
        try:
            if opt is not None:
                _rekey(opt, {i: plain_named[n] for i, n in names.items()}, _gathered)
            controller._model = plain
            yield
            grown: nn.Module = controller._model
            if self.check_consistency:
                mine = model_fingerprint(grown)
                all_: list[Any] = [None] * self.world_size
                dist.all_gather_object(all_, mine, group=self.group)
                if any(x != all_[0] for x in all_):
                    raise DistributedGrowthError(
                        f"ranks disagree after growth at step {controller.step}: parameter "
                        f"fingerprints {all_}; check that every rank passes the same probe and "
                        f"that operators draw randomness only from the torch RNG")
            skeleton = meta_twin(grown)
            before = dict(grown.named_parameters())
            grads = {n: p.grad for n, p in before.items()}
            for p in before.values():
                p.grad = None
            self._shard(grown)
            after = dict(grown.named_parameters())
            if opt is not None:
                _rekey(opt, {id(before[n]): after[n] for n in before}, _shard_like)
            for n, g in grads.items():
                if g is not None:
                    after[n].grad = _shard_like(g, after[n])
            self._skeleton = skeleton
        except BaseException:
            controller._model = sharded
            _restore(opt, saved)
            raise

    def after_change(self, controller: Any, n_before: int) -> None:
        """The ranks' fingerprints were compared inside the growth scope; here only the
        structural-change counters (a growth that failed on one rank only)."""
        if not self.check_consistency:
            return
        all_: list[Any] = [None] * self.world_size
        dist.all_gather_object(all_, controller.n_changes, group=self.group)
        if any(x != all_[0] for x in all_):
            raise DistributedGrowthError(
                f"ranks disagree after growth at step {controller.step}: growths + prunes per "
                f"rank = {all_}")


# --- optimizer re-keying ----------------------------------------------------------------------
def _gathered(v: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return _full(v)


def _shard_like(v: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``v`` laid out as parameter ``p`` (a DTensor), when ``v`` has
    ``p``'s shape; anything else (step counters, 0-dim markers) is returned unchanged."""
    _, dtensor, distribute_tensor = _fsdp()
    if not isinstance(p, dtensor) or isinstance(v, dtensor) or tuple(v.shape) != tuple(p.shape):
        return v
    return distribute_tensor(v.detach().to(p.device), p.device_mesh, p.placements,
                             src_data_rank=None)


def _rekey(opt: torch.optim.Optimizer, new_of: Mapping[int, torch.Tensor],
           convert: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """Point ``opt``'s param groups at ``new_of[id(old)]`` and move each state entry there,
    converting its tensors with ``convert(value, new_param)``. New lists and a new state
    dict are installed, so a :func:`_snapshot` taken before stays intact."""
    state: defaultdict[Any, dict[str, Any]] = defaultdict(dict)
    for old, st in opt.state.items():
        new = new_of.get(id(old))
        if new is None:
            raise GrowthConfigError("the optimizer holds a tensor that is not a model parameter")
        state[new] = {k: convert(v, new) if isinstance(v, torch.Tensor) else v
                      for k, v in st.items()}
    for g in opt.param_groups:
        g["params"] = [new_of[id(p)] for p in g["params"]]
    opt.state = state


def _snapshot(opt: torch.optim.Optimizer | None) -> Any:
    if opt is None:
        return None
    return list(opt.param_groups), [g["params"] for g in opt.param_groups], opt.state


def _restore(opt: torch.optim.Optimizer | None, saved: Any) -> None:
    if opt is None or saved is None:
        return
    groups, params, state = saved
    opt.param_groups[:] = groups
    for g, ps in zip(groups, params, strict=True):
        g["params"] = ps
    opt.state = state
