"""Training worker for tests/test_resume_kill.py: a small growable model trained with a fixed
seed under a GrowthController that grows three times (FixedSchedule), checkpointing every
``--every`` steps, resuming from ``RUN_DIR/ckpt.pt`` when it exists.

Usage::

    python tests/_resume_worker.py RUN_DIR [--steps 80] [--every 10] [--seed 0] [--lockstep]

With ``--lockstep`` the worker prints ``step S`` after every training step and
``saving S`` just before a checkpoint file is moved into place, and waits for one line on
stdin before going on; the test answers, or SIGKILLs the worker at a chosen point. Prints
``resumed S discarded N`` when it resumed, ``done`` at the end, after writing the final
parameters to ``RUN_DIR/final.pt``.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch
from _growth_helpers import _DeepenConfig, _TinyNet, _TinyNetConfig, _WidenConfig, batch
from torch import nn

from selfgrow.checkpoint import EventCursor, load_checkpoint, rewind_events, save_checkpoint
from selfgrow.control import FixedSchedule, GrowthController, LossPlateau, Stabilizer

#: controller steps (1-based) at which the model grows
GROWTH_STEPS = (23, 40, 62)


def make_scheduler(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 8))


def make_controller(
    model: nn.Module, opt: torch.optim.Optimizer, run_dir: Path
) -> GrowthController:
    schedule = FixedSchedule(
        [
            (GROWTH_STEPS[0], _WidenConfig(layer=0, add=4)),
            (GROWTH_STEPS[1], _DeepenConfig(after=0)),
            (GROWTH_STEPS[2], _WidenConfig(layer=1, add=3)),
        ]
    )
    probe = batch(seed=999, step=0)[0]
    return GrowthController(
        model,
        opt,
        signals=[LossPlateau(window=8, min_rel_drop=0.01)],
        policy=schedule,
        log_dir=str(run_dir),
        probe=probe,
        run_id="resume-test",
        stabilizer=Stabilizer(rewarm_steps=5, lr_scale_after=0.8),
        measure_flops=False,
    )


def _lockstep(msg: str, on: bool) -> None:
    if on:
        print(msg, flush=True)
        sys.stdin.readline()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lockstep", action="store_true")
    ap.add_argument("--no-rng-restore", action="store_true", help="negative control")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    run_dir: Path = args.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = run_dir / "ckpt.pt"
    current = {"step": -1}
    if args.lockstep:  # pause between writing the temporary file and os.replace
        real_replace = os.replace

        def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
            _lockstep(f"saving {current['step']}", True)
            real_replace(src, dst)

        os.replace = replace  # type: ignore[assignment]

    if ckpt.exists():
        ck = load_checkpoint(  # restores torch/numpy/python RNG states
            ckpt, scheduler_factory=make_scheduler, restore_rng=not args.no_rng_restore
        )
        model, opt, sched = ck.model, ck.optimizer, ck.scheduler
        if opt is None or sched is None:
            raise RuntimeError("checkpoint without optimizer/scheduler")
        ctrl = make_controller(model, opt, run_dir)
        discarded = ck.restore_controller(ctrl)
        start = int(ck.extra["step"]) + 1
        print(f"resumed {start} discarded {discarded}", flush=True)
    else:
        # a fresh (re)start: forget events of an earlier attempt that never checkpointed
        rewind_events(run_dir / "events.jsonl", EventCursor())
        torch.manual_seed(args.seed)
        np.random.seed(args.seed)
        random.seed(args.seed)
        model = _TinyNet(_TinyNetConfig(d_in=8, hidden=(16,), d_out=4, dropout=0.1))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
        sched = make_scheduler(opt)
        ctrl = make_controller(model, opt, run_dir)
        start = 0

    for s in range(start, args.steps):
        current["step"] = s
        x, y = batch(args.seed, s)
        model.train()
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        sched.step()
        ctrl.observe(loss=loss)
        if (s + 1) % args.every == 0:
            save_checkpoint(ckpt, model, opt, controller=ctrl, scheduler=sched, extra={"step": s})
        _lockstep(f"step {s}", args.lockstep)

    torch.save({k: v.clone() for k, v in model.state_dict().items()}, run_dir / "final.pt")
    ctrl.close()
    print("done", flush=True)


if __name__ == "__main__":
    main()
