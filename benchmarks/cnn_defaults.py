"""Learning-rate / epoch sweep that sets ``selfgrow run --model cnn``'s defaults.

The small CNN of ``selfgrow run`` (two conv blocks of 8 and 16 channels, BatchNorm, 2x2
max-pool each, global average pool) trained fixed with Replay on Split-MNIST-5k, for every
Adam learning rate and epochs per experience of the grid, seeds 0 and 1; then the whole
``selfgrow run`` comparison (grown, fixed small, equal FLOPs, grown size) at the chosen
defaults. Writes ``benchmarks/results/cnn_defaults.{md,json}``.

Usage::

    PYTHONPATH=. python benchmarks/cnn_defaults.py
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from selfgrow.continual.runner import (
    MODEL_DEFAULTS,
    RunSpec,
    _Slot,
    build_small_model,
    run_experiment,
    spec_benchmark,
    train_variant,
)

RESULTS = Path(__file__).resolve().parent / "results"
LRS = (1e-3, 3e-3, 1e-2, 3e-2)
EPOCHS = (5, 10)
SEEDS = (0, 1)


def main() -> int:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="selfgrow-cnn-") as work:
        for lr in LRS:
            for ep in EPOCHS:
                accs = []
                for seed in SEEDS:
                    spec = RunSpec(model="cnn", lr=lr, epochs=ep, seed=seed)
                    bench = spec_benchmark(spec, seed)
                    torch.manual_seed(seed)
                    model = build_small_model("cnn", bench.data.input_shape,
                                              bench.data.num_classes, spec.width, spec.channels)
                    rd = Path(work) / f"{lr}_{ep}_{seed}"
                    rd.mkdir(parents=True)
                    res, _, _ = train_variant("fixed_small", model, spec, bench, rd, grow=False,
                                              progress=False, print_fn=lambda *_: None,
                                              slot=_Slot("fixed_small", seed, rd / "tb", "cnn",
                                                         "cnn"))
                    accs.append(res.final_avg_accuracy)
                rows.append({"lr": lr, "epochs": ep, "acc": accs,
                             "mean": statistics.mean(accs)})
                print(f"lr {lr:g} epochs {ep}: {' / '.join(f'{a:.3f}' for a in accs)}",
                      flush=True)
        d = MODEL_DEFAULTS["cnn"]
        spec = RunSpec(model="cnn", lr=d["lr"], epochs=d["epochs"], seeds=list(SEEDS))
        _, summary = run_experiment(spec, runs_dir=Path(work) / "runs", name="cnn",
                                    progress=False, print_fn=lambda *_: None)
    lines = ["# `selfgrow run --model cnn` defaults: LR / epoch sweep", "",
             "Command: `PYTHONPATH=. python benchmarks/cnn_defaults.py` "
             f"({(time.perf_counter() - t0) / 60:.1f} min). Small CNN (8/16 channels, "
             "BatchNorm) fixed, Replay (300 samples), Split-MNIST-5k, final average accuracy, "
             f"seeds {', '.join(map(str, SEEDS))}.", "",
             "| Adam LR | epochs / experience | final avg acc (per seed) | mean |",
             "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['lr']:g} | {r['epochs']} | "
                     f"{' / '.join(f'{a:.3f}' for a in r['acc'])} | {r['mean']:.3f} |")
    lines += ["", f"Chosen defaults: lr {d['lr']:g}, {d['epochs']} epochs. `selfgrow run "
              "--model cnn` with them (mean ± std over the seeds):", "", "| variant | final avg "
              "acc | params | train FLOPs |", "|---|---|---|---|"]
    for key, v in summary["variants"].items():
        lines.append(f"| {key} | {v['final_avg_accuracy']:.3f} ± "
                     f"{v.get('final_avg_accuracy_std') or 0:.3f} | {v['final_params']:,.0f} | "
                     f"{v['train_flops']:.3g} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cnn_defaults.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "cnn_defaults.json").write_text(json.dumps(
        {"sweep": rows, "defaults": d, "run": summary["variants"]}, indent=1, default=str)
        + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
