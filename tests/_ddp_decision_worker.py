"""Per-rank body of tests/test_distributed_decision.py (spawned, gloo, CPU).

The policy reads rank-local data (here: the rank itself, standing in for rank-local router
statistics or a capacity probe): left alone, every rank would split DIFFERENT hidden units,
giving grown models of the same shape but different values. Only rank 0's decision may be
applied. Each rank records, for every growth, its grown module's fingerprint, config and
parameter shapes at the moment the controller hands it to a fresh DDP wrapper: before the
wrapper's constructor broadcasts rank 0's parameters (which would mask a difference).
``check_consistency`` is off so that this comparison, not the library's own check, is what
sees a divergence.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from _growth_helpers import _TinyNet, _TinyNetConfig, batch, init_gloo, split_units
from torch import nn

from selfgrow.control import GrowthController
from selfgrow.control.distributed import DDPStrategy, model_fingerprint
from selfgrow.control.policies import Decision, Policy
from selfgrow.ops import GrowthResult, OpConfig, Operator, Transaction, register_operator

GROW_AT = (3, 7)
STEPS = 10
#: hidden units each rank's policy would split if it decided for itself
UNITS = {0: (0, 1, 2), 1: (7, 8, 9)}


@dataclass
class _SplitUnitsConfig(OpConfig):
    """Net2WiderNet of layer ``layer`` copying exactly the hidden units ``units``."""

    name: ClassVar[str] = "_tiny_split_units"
    layer: int = 0
    units: tuple[int, ...] = (0,)


@register_operator(_SplitUnitsConfig)
class _SplitUnits(Operator):
    exact = True

    def apply(self, model: nn.Module, config: OpConfig, tx: Transaction) -> GrowthResult:
        if not isinstance(model, _TinyNet) or not isinstance(config, _SplitUnitsConfig):
            raise TypeError("_tiny_split_units needs a _TinyNet and a _SplitUnitsConfig")
        h = model.layers[config.layer].out_features
        idx = torch.cat([torch.arange(h), torch.tensor(config.units, dtype=torch.long)])
        return split_units(model, config.layer, idx, tx)


class _RankLocalPolicy(Policy):
    """Grows at GROW_AT, splitting the units this process's (rank-local) view prefers."""

    def __init__(self) -> None:
        self.calls_on_rank: dict[int, int] = {}

    def decide(self, states: Any, ctx: Any) -> tuple[Decision | None, str]:
        rank = dist.get_rank()
        self.calls_on_rank[rank] = self.calls_on_rank.get(rank, 0) + 1
        if ctx.step not in GROW_AT:
            return None, ""
        cfg = _SplitUnitsConfig(layer=0, units=UNITS[rank])
        return Decision(cfg, reason=f"rank {rank} prefers units {UNITS[rank]}"), ""


class _RecordingStrategy(DDPStrategy):
    """Records every module handed to a (fresh) DDP wrapper, before DDP broadcasts rank 0's
    parameters into it."""

    def _wrap(self, module: nn.Module) -> Any:
        rec = getattr(self, "handed_to_ddp", None)
        if rec is None:
            rec = self.handed_to_ddp = []
        rec.append({
            "fingerprint": model_fingerprint(module),
            "hidden": tuple(module.config.hidden),
            "shapes": {n: tuple(p.shape) for n, p in module.named_parameters()},
        })
        return super()._wrap(module)


def run(rank: int, world: int, port: int, out: str) -> None:
    init_gloo(rank, world, port)
    try:
        torch.manual_seed(0)
        model = _TinyNet(_TinyNetConfig(hidden=(12,)))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        policy = _RankLocalPolicy()
        strategy = _RecordingStrategy(check_consistency=False)
        ctrl = GrowthController(
            model, opt, policy=policy, probe=batch(seed=999, step=0)[0], run_id="ddp-decide",
            measure_flops=False, distributed=strategy,
        )
        for s in range(STEPS):
            x, y = batch(seed=rank + 1, step=s)  # rank-local data and losses
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.mse_loss(ctrl.wrapped_model(x), y)
            loss.backward()
            opt.step()
            ctrl.observe(loss=loss)
        torch.save({
            "handed_to_ddp": strategy.handed_to_ddp,
            "actions": [e.action for e in ctrl.events],
            "steps": [e.step for e in ctrl.events],
            "calls_on_rank": dict(policy.calls_on_rank),
        }, Path(out) / f"rank{rank}.pt")
        ctrl.close()
        dist.barrier()
    finally:
        dist.destroy_process_group()
