"""Controller overhead: training step time with a GrowthController (every applicable signal,
a policy that is evaluated every step but never fires) vs the same loop without controller.

Both loops train their own copy of the same ~3M-parameter selfgrow reference transformer
(built by :func:`build_model`) in one process. Timing alternates between the two in blocks
of ``--steps-per-block`` steps (order flipped every repetition, so drift in machine load hits
both equally); the overhead is the ratio of the medians of the per-step times. The time spent
inside ``observe`` alone is reported too (a lower-noise estimate of the same cost).

Signals: ``LossPlateau`` (the loss, every step) and ``GradientSaturation`` (reads every
weight's gradient, every step) -- what a pre-training loop reports at every step.
``ValidationPlateau`` updates only when a validation loss is reported, ``ReplayForgetting``
only in continual learning, ``ExpertOverload`` only for MoE models; ``CapacityProbe`` is a
sampled measurement (a model copy and a short fine-tune every N >= 500 steps) whose cost is a
scheduled evaluation, not per-step overhead. They are not in the per-step comparison.

Usage::

    python benchmarks/controller_overhead.py            # full run (a few minutes)
    python benchmarks/controller_overhead.py --quick    # smoke run (< 3 minutes on 1 core)

Writes ``benchmarks/results/controller_overhead.{md,json}`` (``--quick``:
``controller_overhead_quick.{md,json}``, so a smoke run never replaces the full result;
``--out`` to change the folder).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

TARGET_OVERHEAD = 0.02


def build_model(vocab_size: int = 512, seq_len: int = 128) -> nn.Module:
    """The benchmark model: the selfgrow reference transformer, ~3M parameters (decoder,
    pre-LN, d_model 192, 6 layers, 6 heads, d_ff 768, tied embeddings)."""
    from selfgrow.models.transformer import GrowableTransformer, TransformerConfig

    cfg = TransformerConfig(
        vocab_size=vocab_size,
        d_model=192,
        n_layers=6,
        n_heads=6,
        d_ff=768,
        max_seq_len=seq_len,
    )
    return GrowableTransformer(cfg)


def build_controller(model: nn.Module, optimizer: torch.optim.Optimizer, log_dir: str) -> Any:
    """GrowthController with every per-step signal and a RulePolicy that never fires (the
    thresholds cannot be met), so ``decide`` runs every step but the model keeps its shape."""
    from selfgrow.control import (
        FixedSchedule,
        GradientSaturation,
        GrowthController,
        LossPlateau,
        Rule,
        RulePolicy,
        list_actions,
    )

    signals = [
        LossPlateau(window=200, min_rel_drop=0.0),  # triggers only if the loss rises
        GradientSaturation(threshold=1e9, window=50, history=500),
    ]
    actions = list_actions(model)
    if actions:
        action = "deepen" if "deepen" in actions else actions[0]
        policy: Any = RulePolicy(
            [Rule("loss_plateau", action), Rule("gradient_saturation", action)],
            cooldown=100,
            max_growths=0,  # decided every step, blocked: the shape never changes
        )
    else:  # a model family without actions: the policy is still consulted every step
        policy = FixedSchedule([])
    return GrowthController(
        model, optimizer, signals=signals, policy=policy, log_dir=log_dir, measure_flops=False
    )


class Loop:
    """One training setup (model, optimizer, optional controller) and its step function."""

    def __init__(self, with_controller: bool, args: argparse.Namespace, log_dir: str) -> None:
        torch.manual_seed(args.seed)
        self.device = torch.device(args.device)
        self.model = build_model(args.vocab, args.seq_len).to(self.device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=3e-4, weight_decay=0.1)
        self.ctrl = build_controller(self.model, self.opt, log_dir) if with_controller else None
        g = torch.Generator().manual_seed(args.seed + 1)
        self.batches = [
            torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=g)
            .to(self.device)
            for _ in range(8)
        ]
        self.i = 0
        self.observe_s: list[float] = []

    def step(self) -> None:
        xy = self.batches[self.i % len(self.batches)]
        self.i += 1
        x, y = xy[:, :-1], xy[:, 1:]
        self.opt.zero_grad(set_to_none=True)
        logits = self.model(x)  # (B, T, V)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        self.opt.step()
        if self.ctrl is not None:
            t0 = time.perf_counter()
            self.ctrl.observe(loss=loss)
            self.observe_s.append(time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(loops: dict[str, Loop], reps: int, steps: int, warmup: int,
            log: Callable[[str], None]) -> dict[str, list[float]]:
    """Alternate blocks of ``steps`` timed steps between the loops; per-step seconds."""
    for lp in loops.values():
        for _ in range(warmup):
            lp.step()
        lp.observe_s.clear()
    times: dict[str, list[float]] = {k: [] for k in loops}
    names = list(loops)
    for r in range(reps):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            lp = loops[name]
            for _ in range(steps):
                _sync(lp.device)
                t0 = time.perf_counter()
                lp.step()
                _sync(lp.device)
                times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        log(f"rep {r + 1}/{reps}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in med.items()))
    return times


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small batch, few repetitions")
    ap.add_argument("--reps", type=int, default=None, help="alternating repetitions")
    ap.add_argument("--steps-per-block", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    quick = dict(reps=6, steps=8, warmup=3, batch=4)
    full = dict(reps=20, steps=20, warmup=10, batch=16)
    d = quick if args.quick else full
    args.reps = args.reps or d["reps"]
    args.steps_per_block = args.steps_per_block or d["steps"]
    args.warmup = args.warmup if args.warmup is not None else d["warmup"]
    args.batch = args.batch or d["batch"]
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python " + " ".join(shlex.quote(a) for a in [
        os.path.relpath(__file__), *(sys.argv[1:] if argv is None else argv)])

    def log(msg: str) -> None:
        print(msg, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        loops = {"no_controller": Loop(False, args, tmp), "controller": Loop(True, args, tmp)}
        n_params = sum(p.numel() for p in loops["controller"].model.parameters())
        log(f"model: {n_params / 1e6:.2f}M params, batch {args.batch} x {args.seq_len}, "
            f"{torch.get_num_threads()} threads, device {args.device}")
        t0 = time.perf_counter()
        times = measure(loops, args.reps, args.steps_per_block, args.warmup, log)
        wall = time.perf_counter() - t0
        ctrl = loops["controller"].ctrl
        grew = ctrl.n_growths if ctrl is not None else 0
        signals = [type(s).__name__ for s in ctrl.signals] if ctrl is not None else []
        policy = type(getattr(ctrl.policy, "inner", ctrl.policy)).__name__ if ctrl else ""
        observe = loops["controller"].observe_s
        if ctrl is not None:
            ctrl.close()

    base = statistics.median(times["no_controller"])
    with_c = statistics.median(times["controller"])
    obs = statistics.median(observe) if observe else 0.0
    overhead = with_c / base - 1.0
    result = {
        "benchmark": "controller_overhead",
        "command": command,
        "quick": args.quick,
        "model": "selfgrow.models.transformer.GrowableTransformer",
        "n_params": n_params,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "reps": args.reps,
        "steps_per_block": args.steps_per_block,
        "signals": signals,
        "policy": policy,
        "growths_during_benchmark": grew,
        "median_step_ms": {"no_controller": base * 1e3, "controller": with_c * 1e3},
        "median_observe_ms": obs * 1e3,
        "overhead": overhead,
        "observe_fraction_of_step": obs / base if base else None,
        "target": TARGET_OVERHEAD,
        "within_target": bool(overhead <= TARGET_OVERHEAD),
        "wall_seconds": wall,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.system()} {platform.machine()} ({os.cpu_count()} CPUs)",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "controller_overhead_quick" if args.quick else "controller_overhead"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(_markdown(result))
    log(f"overhead {overhead * 100:+.2f}% (observe {obs * 1e3:.3f} ms = "
        f"{result['observe_fraction_of_step'] * 100:.2f}% of a step); target <= "
        f"{TARGET_OVERHEAD * 100:.0f}%")
    return result


def _markdown(r: dict[str, Any]) -> str:
    ms = r["median_step_ms"]
    verdict = "within" if r["within_target"] else "ABOVE"
    quick = " (--quick smoke run: small batch, few repetitions; noisy)" if r["quick"] else ""
    obs = f"{r['median_observe_ms']:.3f} ms = {r['observe_fraction_of_step'] * 100:.2f}% of a step"
    return f"""# Controller overhead{quick}

Command: `{r['command']}`

Model: {r['model']} ({r['n_params'] / 1e6:.2f}M parameters), batch {r['batch']} x
{r['seq_len']} tokens, AdamW, device {r['device']}, {r['threads']} threads; {r['machine']},
torch {r['torch']}, Python {r['python']}, {r['date']}.

Controller: signals {', '.join(r['signals'])}; policy {r['policy']} consulted every step
(never fires: {r['growths_during_benchmark']} growths). Alternating blocks of
{r['steps_per_block']} steps, {r['reps']} repetitions per setup, medians of per-step times.

| setup | median step (ms) |
|---|---|
| no controller | {ms['no_controller']:.3f} |
| with controller | {ms['controller']:.3f} |
| **overhead** | **{r['overhead'] * 100:+.2f}%** ({verdict} the {r['target'] * 100:.0f}% target) |
| time inside `observe` | {obs} |

The difference of medians carries the machine's noise; the time inside `observe` measures
the controller's own cost directly.
"""


if __name__ == "__main__":
    main()
