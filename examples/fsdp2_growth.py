"""Grow a transformer under FSDP2 (``fully_shard``): a 2-layer GrowableTransformer learns
Shakespeare bytes with AdamW, sharded over every rank; a depth growth (G_stack-style identity
insertion) and a Net2WiderNet FFN widening happen mid-run without a restart.

One machine, 2 processes on the CPU (gloo; about 11 s here)::

    .venv/bin/torchrun --standalone --nproc_per_node=2 examples/fsdp2_growth.py

On GPUs (NCCL), 2 nodes of 8: run on every node, with its own ``--node_rank``::

    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=$NODE_RANK \\
        --rdzv_backend=c10d --rdzv_endpoint=$MASTER_HOST:29500 examples/fsdp2_growth.py
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from selfgrow.control import FixedSchedule, FSDP2Strategy, GrowthController, LossPlateau
from selfgrow.data.text import load_shakespeare
from selfgrow.models.transformer import GrowableTransformer, tiny_config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--log-dir", default=None, help="events.jsonl here (rank 0)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    try:
        tokens = load_shakespeare().train.long()
        torch.manual_seed(0)  # the same initial model on every rank
        model = GrowableTransformer(tiny_config(vocab_size=256, d_model=32, n_layers=2,
                                                n_heads=4, head_dim=8, d_ff=64,
                                                max_seq_len=64)).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
        probe = tokens[:4 * 64].view(4, 64).to(device)  # the same held batch on every rank
        ctrl = GrowthController(
            model, opt, signals=[LossPlateau(window=20)],
            policy=FixedSchedule([(args.steps // 3, "deepen"),
                                  (2 * args.steps // 3, "widen_ffn", {"factor": 2})]),
            log_dir=args.log_dir, probe=probe, distributed=FSDP2Strategy())
        gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own batches
        for step in range(1, args.steps + 1):
            i = torch.randint(0, len(tokens) - 65, (16,), generator=gen)
            x = torch.stack([tokens[j:j + 65] for j in i.tolist()]).to(device)
            opt.zero_grad(set_to_none=True)
            logits = ctrl.wrapped_model(x[:, :-1])  # fetched every step: replaced on growth
            loss = F.cross_entropy(logits.reshape(-1, 256), x[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            ev = ctrl.observe(loss=loss)
            if rank == 0 and (ev is not None or step % 40 == 0):
                note = (f"  <- {ev.action['name']}: {ev.params_before:,} -> "
                        f"{ev.params_after:,} params, max |dy| on the probe "
                        f"{ev.preservation.get('max_abs', float('nan')):.1e}"
                        if ev is not None else "")
                print(f"step {step:4d}  loss {loss.item():.3f}{note}", flush=True)
        shard = sum(p.to_local().numel() for p in ctrl.model.parameters())
        total = sum(p.numel() for p in ctrl.model.parameters())
        print(f"rank {rank}/{world}: {ctrl.n_growths} growths, holds {shard:,} of {total:,} "
              f"parameters (FSDP2 shards); layers={ctrl.model.config.n_layers} "
              f"d_ff={ctrl.model.config.d_ff}", flush=True)
        ctrl.close()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
