"""Per-rank body of tests/test_distributed.py (spawned with torch.multiprocessing, gloo, CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from _growth_helpers import (
    _DeepenConfig,
    _TinyNet,
    _TinyNetConfig,
    _WidenConfig,
    batch,
    init_gloo,
)
from torch import nn

from selfgrow.checkpoint import load_checkpoint, save_checkpoint
from selfgrow.control import FixedSchedule, LossPlateau
from selfgrow.control.distributed import DistributedGrowthController, reduce_metrics

GROWTH_STEPS = (5, 11, 17)
STEPS = 22
VOLATILE = ("wall_time", "op_seconds")


def _schedule() -> FixedSchedule:
    return FixedSchedule(
        [
            (GROWTH_STEPS[0], _WidenConfig(layer=0, add=5)),
            (GROWTH_STEPS[1], _DeepenConfig(after=0)),
            (GROWTH_STEPS[2], _WidenConfig(layer=1, add=3)),
        ]
    )


class _ExplodingSchedule(FixedSchedule):
    """Raises in ``decide`` at one step (on rank 0, where the policy runs)."""

    def __init__(self, at: int) -> None:
        super().__init__([])
        self.at = at

    def decide(self, states: Any, ctx: Any) -> Any:
        if ctx.step == self.at:
            raise RuntimeError("policy exploded")
        return super().decide(states, ctx)


def _controller(model: nn.Module, opt: torch.optim.Optimizer, out: Path, sync_rng: bool,
                explode_at: int | None = None) -> DistributedGrowthController:
    return DistributedGrowthController(
        model,
        opt,
        signals=[LossPlateau(window=4, min_rel_drop=0.01)],
        policy=_schedule() if explode_at is None else _ExplodingSchedule(explode_at),
        log_dir=str(out),
        probe=batch(seed=999, step=0)[0],
        run_id="ddp-test",
        sync_growth_rng=sync_rng,
        measure_flops=False,
    )


def run(rank: int, world: int, port: int, out: str, sync_rng: bool = True,
        resume_at: int | None = None, explode_at: int | None = None) -> None:
    """Train STEPS steps on rank-local data with three scheduled growths; write this rank's
    final parameters, events and per-growth fingerprints to ``out/rank<r>.pt``. With
    ``resume_at``, rank 0 checkpoints after that step and every rank then rebuilds model,
    optimizer and controller from the checkpoint before going on."""
    init_gloo(rank, world, port)
    try:
        outp = Path(out)
        torch.manual_seed(0)  # same initial weights (DDP would broadcast them anyway)
        model = _TinyNet(_TinyNetConfig(hidden=(12,)))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        torch.manual_seed(100 + rank)  # rank-specific RNG: growth must not depend on it
        ctrl = _controller(model, opt, outp, sync_rng, explode_at)
        fingerprints: list[str] = []
        for s in range(STEPS):
            x, y = batch(seed=rank + 1, step=s)  # rank-local data
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.mse_loss(ctrl.wrapped_model(x), y)
            loss.backward()
            opt.step()
            ev = ctrl.observe(loss=loss)
            if ev is not None:
                from selfgrow.control.distributed import model_fingerprint

                fingerprints.append(model_fingerprint(ctrl.model))
            if resume_at is not None and s == resume_at:
                ck_path = outp / "ckpt.pt"
                if rank == 0:
                    save_checkpoint(ck_path, ctrl.wrapped_model, opt, controller=ctrl)
                dist.barrier()
                ctrl.close()
                ck = load_checkpoint(ck_path, restore_rng=False)
                model, opt = ck.model, ck.optimizer
                if opt is None:
                    raise RuntimeError("no optimizer in checkpoint")
                ctrl = _controller(model, opt, outp, sync_rng)
                ck.restore_controller(ctrl)
        t = torch.tensor([rank, 2.0 * rank])
        reduced = reduce_metrics({"a": float(rank), "t": t, "n": None, "s": "x", "i": rank})
        events: list[dict[str, Any]] = [
            {k: v for k, v in e.to_dict().items() if k not in VOLATILE} for e in ctrl.events
        ]
        torch.save(
            {
                "params": {k: v.clone() for k, v in ctrl.model.state_dict().items()},
                "events": events,
                "fingerprints": fingerprints,
                "optimizer_params": sum(len(g["params"]) for g in opt.param_groups),
                "n_params": len(list(ctrl.model.parameters())),
                "ddp_module_is_model": ctrl.wrapped_model.module is ctrl.model,
                "signals": {sg.name: sg.state_dict() for sg in ctrl.signals},
                "reduced": reduced,
            },
            outp / f"rank{rank}.pt",
        )
        ctrl.close()
        dist.barrier()  # nobody tears gloo down while a peer still talks to it
    finally:
        dist.destroy_process_group()
