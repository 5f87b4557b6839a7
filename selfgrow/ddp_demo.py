"""DDP growth demo: ``torchrun --standalone --nproc_per_node=2 -m selfgrow.ddp_demo``.

A GrowableMLP learning a random teacher on every rank's own synthetic batches, widened and
deepened at fixed steps by a :class:`~selfgrow.control.DistributedGrowthController`; prints
the events and checks the ranks agree at the end. A separate top-level module (not imported
by the package), so that ``-m`` runs it without Python's "found in sys.modules" warning.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .control.distributed import DistributedGrowthController, model_fingerprint


def main(argv: Sequence[str] | None = None) -> None:
    """A GrowableMLP learning a random teacher on every rank's own synthetic batches, widened
    and deepened at fixed steps; prints the events and checks the ranks agree at the end."""
    import argparse
    import os

    from .control.schedules import FixedSchedule
    from .control.signals import LossPlateau
    from .models import build_model
    from .models.mlp import MLPConfig

    ap = argparse.ArgumentParser(prog="torchrun ... -m selfgrow.ddp_demo")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--log-dir", default=None, help="directory for events.jsonl (rank 0)")
    ap.add_argument("--checkpoint", default=None, help="write a checkpoint here at the end")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        torch.manual_seed(0)
        teacher = nn.Linear(32, 4).to(device)
        model = build_model(MLPConfig(in_features=32, hidden=(16,), n_classes=4)).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        probe = torch.randn(64, 32, generator=torch.Generator().manual_seed(1)).to(device)
        ctrl = DistributedGrowthController(
            model, opt, signals=[LossPlateau(window=20)],
            policy=FixedSchedule([(args.steps // 3, "widen"), (2 * args.steps // 3, "deepen")]),
            log_dir=args.log_dir, probe=probe, measure_flops=False,
            ddp_kwargs={"device_ids": [local_rank]} if cuda else {},
        )
        gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
        for _ in range(args.steps):
            x = torch.randn(32, 32, generator=gen).to(device)
            y = teacher(x).argmax(-1).detach()
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(ctrl.wrapped_model(x), y)
            loss.backward()
            opt.step()
            ev = ctrl.observe(loss=loss)
            if ev is not None and rank == 0:
                print(f"step {ev.step}: {ev.action.get('op')} {ev.params_before} -> "
                      f"{ev.params_after} params, max_rel {ev.preservation.get('max_rel')}",
                      flush=True)
        prints: list[Any] = [None] * world
        dist.all_gather_object(prints, model_fingerprint(ctrl.model))
        if rank == 0:
            same = all(p == prints[0] for p in prints)
            final = float(loss.detach())
            print(f"{world} ranks, {ctrl.n_growths} growths, final loss "
                  f"{final:.4f}, parameters identical on all ranks: {same}", flush=True)
            if args.checkpoint:
                from .checkpoint import save_checkpoint

                save_checkpoint(args.checkpoint, ctrl.wrapped_model, opt, controller=ctrl)
        ctrl.close()
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
