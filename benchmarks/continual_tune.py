"""Tune selfgrow's continual growth settings on tuning seeds (never the reported ones).

For every candidate setting, on Split-MNIST-5k: selfgrow + Replay, Replay fixed small and
Replay at equal training FLOPs (its width picked from those two runs, as in
``benchmarks/continual.py``), seeds 100, 101, 102. Prints and writes the gain over the
equal-FLOPs model per setting; ``benchmarks/continual.py`` then uses the best one on seeds
0, 1, 2.

Usage::

    PYTHONPATH=. python benchmarks/continual_tune.py

Writes ``benchmarks/results/continual_tune.{md,json}``.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from continual import METHODS, RESULTS, run_benchmark  # noqa: E402

#: candidate settings of the grown run (RunSpec fields), the demo's first
SETTINGS: dict[str, dict[str, Any]] = {
    "demo (no probe)": {},
    "probe 10": {"probe_steps": 10},
    "probe 10, margin 0.02": {"probe_steps": 10, "probe_margin": 0.02},
    "probe 20": {"probe_steps": 20},
    "probe 10, deepen on forgetting": {"probe_steps": 10, "on_forgetting": "deepen"},
    "probe 10, widen x4": {"probe_steps": 10, "widen_factor": 4.0},
    "probe 10, start width 16": {"probe_steps": 10, "width": 16},
}
SEEDS = [100, 101, 102]


def main() -> int:
    torch.set_num_threads(1)
    keys = ("selfgrow_replay", "replay_small", "replay_equal")
    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="selfgrow-tune-") as work:
        for label, grow in SETTINGS.items():
            methods = []
            for m in METHODS:
                if m.key in keys:
                    spec = dict(m.spec)
                    if m.key == "selfgrow_replay":
                        spec = grow
                    elif "width" in grow:  # the small baselines start where selfgrow does
                        spec = {"width": grow["width"]}
                    methods.append(type(m)(m.key, m.label, m.strategy, m.grow, m.size, spec))
            res = run_benchmark("split-mnist", methods, SEEDS, {}, Path(work) / label,
                                lambda s: print(s, flush=True))["methods"]
            g = [d["final_avg_accuracy"] for d in res["selfgrow_replay"]["per_seed"]]
            e = [d["final_avg_accuracy"] for d in res["replay_equal"]["per_seed"]]
            diff = [a - b for a, b in zip(g, e, strict=True)]
            rows.append({"setting": label, "grow": grow, "grown": g, "equal": e,
                         "gain_mean": statistics.mean(diff), "gain_std": statistics.stdev(diff),
                         "grown_params": res["selfgrow_replay"]["final_params"],
                         "grown_flops": res["selfgrow_replay"]["train_flops"]})
            print(f"== {label}: gain over equal FLOPs {rows[-1]['gain_mean'] * 100:+.2f} "
                  f"± {rows[-1]['gain_std'] * 100:.2f} points", flush=True)
    lines = ["# Tuning selfgrow + Replay on Split-MNIST-5k (tuning seeds 100, 101, 102)", "",
             "Command: `PYTHONPATH=. python benchmarks/continual_tune.py` "
             f"({(time.perf_counter() - t0) / 60:.1f} min)", "",
             "| setting | grown acc (per seed) | equal-FLOPs acc | gain (points) | grown params "
             "| grown FLOPs |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {' / '.join(f'{a:.3f}' for a in r['grown'])} | "
                     f"{' / '.join(f'{a:.3f}' for a in r['equal'])} | "
                     f"{r['gain_mean'] * 100:+.2f} ± {r['gain_std'] * 100:.2f} | "
                     f"{r['grown_params']:,.0f} | {r['grown_flops']:.3g} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "continual_tune.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "continual_tune.json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
