"""MoE dispatch throughput: ``MoEFFN`` forward + backward against a dense FFN with the same
ACTIVE parameters per token.

The MoE layer has E experts of F hidden units each and routes every token to its top-k
experts (vectorised dispatch: assignments sorted by expert, one batched matmul per expert,
one scatter back; see ``selfgrow/models/moe.py``). The dense FFN has ``k * F`` hidden units,
so every token meets the same number of FFN weights in both layers; the MoE layer also pays
its router, its sort / gather / scatter and its auxiliary losses, which is what this measures.
Both layers are timed in one process, alternating blocks of steps (order flipped every
repetition so drift in machine load hits both equally); tokens/s = tokens per step / median
step time. Target: MoE >= 0.7x the dense FFN's tokens/s at 8 experts, top-2.

Usage::

    PYTHONPATH=. python benchmarks/moe_dispatch.py            # about 2 minutes
    PYTHONPATH=. python benchmarks/moe_dispatch.py --quick    # smoke run (< 1 minute)

Writes ``benchmarks/results/moe_dispatch[_quick].{md,json}``.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from selfgrow.models.moe import MoEFFN
from selfgrow.runs.dirs import write_json
from selfgrow.runs.summary import format_table

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 0.7


class DenseFFN(nn.Module):
    """``down(gelu(up(x)))`` with ``d_ff`` hidden units (the baseline)."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, d_ff)
        self.down = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


def _step(layer: nn.Module, x: torch.Tensor) -> None:
    y = layer(x)
    loss = y.float().pow(2).mean()
    if isinstance(layer, MoEFFN):
        loss = loss + layer.loss()
    loss.backward()
    for p in layer.parameters():
        p.grad = None


def _time_block(layer: nn.Module, x: torch.Tensor, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        _step(layer, x)
        out.append(time.perf_counter() - t0)
    return out


def measure(d_model: int, d_ff: int, n_experts: int, top_k: int, tokens: int,
            reps: int, steps: int, seed: int = 0) -> dict[str, Any]:
    """Median step times and tokens/s of both layers on one random batch (N = ``tokens``)."""
    torch.manual_seed(seed)
    moe = MoEFFN(d_model, d_ff, n_experts, top_k=top_k, init_std=0.02)
    dense = DenseFFN(d_model, top_k * d_ff)
    x = torch.randn(tokens, d_model)
    for layer in (moe, dense):  # warm-up
        _time_block(layer, x, 2)
    times: dict[str, list[float]] = {"moe": [], "dense": []}
    for r in range(reps):
        order = ("moe", "dense") if r % 2 == 0 else ("dense", "moe")
        for name in order:
            times[name] += _time_block(moe if name == "moe" else dense, x, steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    active_moe = top_k * (2 * d_model * d_ff + d_ff + d_model) + d_model * n_experts
    active_dense = sum(p.numel() for p in dense.parameters())
    return {
        "d_model": d_model, "d_ff_per_expert": d_ff, "n_experts": n_experts, "top_k": top_k,
        "tokens_per_step": tokens,
        "median_step_s": med,
        "tokens_per_s": {k: tokens / v for k, v in med.items()},
        "ratio": med["dense"] / med["moe"],
        "active_params_per_token": {"moe": active_moe, "dense": active_dense},
        "total_params": {"moe": sum(p.numel() for p in moe.parameters()),
                         "dense": active_dense},
        "steps_timed": {k: len(v) for k, v in times.items()},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions, two settings")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    reps, steps = (3, 5) if args.quick else (6, 10)
    settings = [(256, 512, 8, 2, 4096), (512, 1024, 8, 2, 2048)]
    if not args.quick:
        settings += [(256, 512, 8, 1, 4096), (256, 512, 16, 2, 4096)]
    t0 = time.time()
    rows = [measure(c, f, e, k, n, reps, steps) for c, f, e, k, n in settings]
    header = ["setting", "MoE tok/s", "dense tok/s", "MoE / dense", "active params (MoE / dense)",
              "target"]
    table = []
    for r in rows:
        tgt = ""
        if r["n_experts"] == 8 and r["top_k"] == 2:
            tgt = "met" if r["ratio"] >= TARGET else f"MISSED ({r['ratio']:.2f} < {TARGET})"
        table.append([
            f"C={r['d_model']} F={r['d_ff_per_expert']} E={r['n_experts']} top-{r['top_k']} "
            f"N={r['tokens_per_step']}",
            f"{r['tokens_per_s']['moe']:,.0f}", f"{r['tokens_per_s']['dense']:,.0f}",
            f"{r['ratio']:.2f}x",
            f"{r['active_params_per_token']['moe']:,} / {r['active_params_per_token']['dense']:,}",
            tgt,
        ])
    text = format_table(header, table)
    print(text)
    cmd = "PYTHONPATH=. python benchmarks/moe_dispatch.py" + (" --quick" if args.quick else "")
    if args.threads != 1:
        cmd += f" --threads {args.threads}"
    out = Path(args.out) if args.out else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    stem = "moe_dispatch_quick" if args.quick else "moe_dispatch"
    meta = {
        "command": cmd, "argv": shlex.join(sys.argv), "machine": platform.machine(),
        "cpus": torch.get_num_threads(), "torch": torch.__version__,
        "wall_s": round(time.time() - t0, 1), "target_ratio": TARGET,
    }
    write_json(out / f"{stem}.json", {"meta": meta, "rows": rows})
    md = [
        "# MoE dispatch throughput (forward + backward)", "",
        f"Command: `{cmd}`", "",
        f"Machine: {meta['machine']}, {meta['cpus']} torch thread(s), torch {meta['torch']}; "
        f"{meta['wall_s']} s. Tokens/s are this machine's (the ratio is the result).", "",
        "MoE: `selfgrow.models.moe.MoEFFN` (router, top-k, load-balancing and z-loss, "
        "sorted dispatch, dropless). Dense: an FFN with top_k x F hidden units (the same "
        "active FFN parameters per token).", "",
        "```", text, "```", "",
    ]
    (out / f"{stem}.md").write_text("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
