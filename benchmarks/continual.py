"""Continual learning: selfgrow against the field's strategies, at equal compute.

Every method trains on the same benchmark with the same data order, seeds, optimizer (Adam),
mini-batch size, epochs per experience and replay memory, through selfgrow's experiment
runner (:func:`selfgrow.continual.runner.train_variant`, Avalanche strategies and its
evaluation plugin). Per benchmark and seed, in this order:

* ``selfgrow + Replay``: starts small; replay forgetting, loss plateau and the capacity probe
  grow it (its final size and training FLOPs define the two sized baselines below);
* ``Replay, fixed small``: the same small model, never grown;
* ``Replay, equal FLOPs``: the width whose training FLOPs match ``selfgrow + Replay``'s,
  picked before it trains (:func:`selfgrow.continual.runner.equal_flops_width`);
* ``Replay, grown size``: freshly initialised at selfgrow's final architecture;
* ``Naive``, ``EWC``, ``LwF``, ``SI``, ``Cumulative`` (upper bound: every past experience's
  data again): at the grown size (the strongest size these get, so they are not tuned down);
* ``DER``: a new feature extractor (the small model's body) every experience, old ones
  frozen, with its auxiliary loss and the same replay memory (Yan et al. 2021);
* ``selfgrow + EWC``: EWC on the small model, grown by the controller; its penalty follows
  every growth;
* ``selfgrow + DER-style``: DER's expansion, but only when the capacity probe says a new
  extractor learns the new experience better than the current ones;
* task-incremental (the same benchmark with task labels, logits masked to the task's
  classes): ``PNN`` (Avalanche's PNNStrategy, a column per task) and ``selfgrow + Replay``.

Metrics come from Avalanche's evaluation plugin (accuracy per experience after every
experience; StreamBWT): final average accuracy, average forgetting, BWT, plus final
parameters, training FLOPs (FlopCounterMode; the probe's trials included) and wall seconds.
3 seeds, mean and std.

Usage::

    PYTHONPATH=. python benchmarks/continual.py --quick   # Split-MNIST-5k, 3 seeds (< 10 min)
    PYTHONPATH=. python benchmarks/continual.py           # + Split-Fashion-MNIST (about 90 min)

Writes ``benchmarks/results/continual[_quick].{md,json,png}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from selfgrow.continual.runner import (
    EXPANSION_STRATEGIES,
    RunSpec,
    _Slot,
    aggregate_seeds,
    build_expansion_model,
    build_small_model,
    equal_flops_width,
    train_variant,
)

RESULTS = Path(__file__).resolve().parent / "results"


@dataclasses.dataclass
class Method:
    """One row of the table: how it trains and at which size.

    ``size``: ``small`` (the starting model), ``equal`` (equal training FLOPs to the first
    grown method), ``grown`` (the first grown method's final architecture).
    """

    key: str
    label: str
    strategy: str
    grow: bool = False
    size: str = "small"
    spec: dict[str, Any] = dataclasses.field(default_factory=dict)
    task_incremental: bool = False


#: selfgrow's settings for the grown methods: the demo's (tuning seeds 100-102 in
#: benchmarks/results/continual_tune.md: the capacity probe did not pay on Replay, so it is off)
GROW: dict[str, Any] = {}
#: selfgrow's DER-style growth IS the probe-gated DER (a new extractor only when a trial pays)
DER_GROW: dict[str, Any] = {"probe_steps": 10}

METHODS: list[Method] = [
    Method("selfgrow_replay", "selfgrow + Replay (start small)", "replay", grow=True,
           spec=GROW),
    Method("replay_small", "Replay, fixed small", "replay"),
    Method("replay_equal", "Replay, equal FLOPs", "replay", size="equal"),
    Method("replay_grown", "Replay, grown size", "replay", size="grown"),
    Method("naive", "Naive (grown size)", "naive", size="grown"),
    Method("ewc", "EWC (grown size)", "ewc", size="grown"),
    Method("lwf", "LwF (grown size)", "lwf", size="grown"),
    Method("si", "SI (grown size)", "si", size="grown"),
    Method("cumulative", "Cumulative (upper bound, grown size)", "cumulative", size="grown"),
    Method("der", "DER (+ Replay), small extractors", "der"),
    Method("der_equal", "DER (+ Replay), extractors at equal-FLOPs width", "der", size="equal"),
    Method("selfgrow_ewc", "selfgrow + EWC", "ewc", grow=True, spec=GROW),
    Method("selfgrow_der", "selfgrow + DER-style growth (probe-gated)", "der", grow=True,
           spec=DER_GROW),
]
TASK_METHODS: list[Method] = [
    Method("pnn_ti", "PNN (task-incremental, 100 units per column)", "pnn",
           spec={"width": 100, "growth": "off"}, task_incremental=True),
    Method("selfgrow_replay_ti", "selfgrow + Replay (task-incremental)", "replay", grow=True,
           spec=GROW, task_incremental=True),
]


def _model_for(m: Method, spec: RunSpec, bench: Any, ref: dict[str, Any]) -> Any:
    from selfgrow.models import build_model

    torch.manual_seed(spec.seed)
    shape, n_cls = bench.data.input_shape, bench.data.num_classes
    if m.strategy in EXPANSION_STRATEGIES:  # DER's extractors: the small (or equal) body
        if m.size == "equal":
            spec = dataclasses.replace(spec, width=ref["equal_flops"]["width"])
        return build_expansion_model(spec, bench)
    if m.size == "grown":
        return build_model(ref["final_model_config"])
    if m.size == "equal":
        w = ref["equal_flops"]["width"]
        return build_small_model(spec.model, shape, n_cls,
                                 w if spec.model == "mlp" else spec.width,
                                 w if spec.model == "cnn" else spec.channels)
    return build_small_model(spec.model, shape, n_cls, spec.width, spec.channels)


def run_benchmark(name: str, methods: list[Method], seeds: list[int], base: dict[str, Any],
                  work: Path, log: Any) -> dict[str, Any]:
    """Every method on benchmark ``name`` for every seed; returns ``{key: aggregate}``."""
    from selfgrow.continual.benchmarks import build_benchmark

    per: dict[str, list[dict[str, Any]]] = {m.key: [] for m in methods}
    described: dict[str, Any] = {}
    for seed in seeds:
        ref: dict[str, Any] = {}
        for m in methods:
            spec = RunSpec(benchmark=name, strategy=m.strategy, seed=seed,
                           task_incremental=m.task_incremental, **{**base, **m.spec})
            bench = build_benchmark(name, seed=seed, shuffle_classes=True,
                                    task_incremental=m.task_incremental)
            described.setdefault("task" if m.task_incremental else "class", bench.describe())
            if m.size == "equal" and "equal_flops" not in ref:
                ref["equal_flops"] = equal_flops_width(
                    spec, bench, ref["grown_flops"], ref["small_flops"])
            model = _model_for(m, spec, bench, ref)
            run_dir = work / name / f"seed{seed}" / m.key
            run_dir.mkdir(parents=True, exist_ok=True)
            slot = _Slot(m.key, seed, run_dir / "tb", f"{name}-{m.key}-s{seed}", m.label)
            t0 = time.perf_counter()
            res, _final, _ctrl = train_variant(m.key, model, spec, bench, run_dir,
                                               grow=m.grow, print_fn=lambda *_: None,
                                               progress=False, slot=slot)
            if m.size == "equal":
                res.equal_flops = ref["equal_flops"]
            d = res.to_dict()
            per[m.key].append(d)
            if m.key == "selfgrow_replay":
                ref["grown_flops"] = d["train_flops"]
                ref["final_model_config"] = d["final_model_config"]
            if m.key == "replay_small":
                ref["small_flops"] = d["train_flops"]
            log(f"{name} seed {seed} {m.label:<40} acc {d['final_avg_accuracy']:.3f} "
                f"forget {d['avg_forgetting']:.3f} params {d['final_params']:,} "
                f"FLOPs {d['train_flops']:.3g} ({time.perf_counter() - t0:.0f} s)")
    out = {}
    for m in methods:
        agg = aggregate_seeds(per[m.key])
        agg.update(label=m.label, strategy=m.strategy, grown=m.grow, size=m.size,
                   task_incremental=m.task_incremental, per_seed=per[m.key])
        out[m.key] = agg
    return {"methods": out, "benchmark": described}


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, checked on one benchmark's results (mean over seeds)."""
    m = res["methods"]
    checks: list[dict[str, Any]] = []

    def acc(k: str) -> tuple[float, float]:
        return (m[k]["final_avg_accuracy"] or float("nan"),
                m[k].get("final_avg_accuracy_std") or 0.0)

    if "selfgrow_replay" in m and "replay_equal" in m:
        (g, gs), (e, es) = acc("selfgrow_replay"), acc("replay_equal")
        checks.append({"target": "selfgrow + Replay >= Replay at equal FLOPs + 1 point, "
                                 "beyond one std",
                       "value": f"{(g - e) * 100:+.2f} points (std {gs * 100:.2f} / "
                                f"{es * 100:.2f})",
                       "met": bool(g - e >= 0.01 and g - e > max(gs, es))})
    if "selfgrow_replay" in m and "replay_grown" in m:
        (g, _), (f, _) = acc("selfgrow_replay"), acc("replay_grown")
        ratio = m["selfgrow_replay"]["train_flops"] / m["replay_grown"]["train_flops"]
        checks.append({"target": "within 0.5 points of Replay at the grown size with <= 70% "
                                 "of its training FLOPs",
                       "value": f"{(g - f) * 100:+.2f} points at {ratio:.0%} of its FLOPs",
                       "met": bool(g - f >= -0.005 and ratio <= 0.70)})
    others = [k for k in ("naive", "ewc", "lwf", "si") if k in m]
    if "selfgrow_replay" in m and others:
        g = acc("selfgrow_replay")[0]
        best = max(others, key=lambda k: acc(k)[0])
        checks.append({"target": "above Naive, EWC, LwF and SI",
                       "value": f"{(g - acc(best)[0]) * 100:+.2f} points over the best "
                                f"({m[best]['label']})",
                       "met": bool(all(g > acc(k)[0] for k in others))})
    if "pnn_ti" in m and "selfgrow_replay_ti" in m:
        g, p = acc("selfgrow_replay_ti")[0], acc("pnn_ti")[0]
        pr = m["selfgrow_replay_ti"]["final_params"] / m["pnn_ti"]["final_params"]
        checks.append({"target": "task-incremental: at least PNN's accuracy with <= 25% of "
                                 "its parameters",
                       "value": f"{(g - p) * 100:+.2f} points with {pr:.0%} of its parameters",
                       "met": bool(g >= p and pr <= 0.25)})
    return checks


def _pm(v: Any, s: Any, f: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{f.format(v)} ± {f.format(s or 0.0)}"


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Continual learning benchmark ({report['preset']})", "",
             f"Command: `{report['command']}`", "",
             f"Machine: {report['machine']}; torch {report['torch']}; seeds "
             f"{', '.join(map(str, report['seeds']))}; {report['wall_minutes']:.1f} min. "
             "Mean ± std over seeds. Wall seconds are this machine's (ratios, not absolutes).",
             "", f"Settings: {json.dumps(report['settings'])}", ""]
    for name, res in report["benchmarks"].items():
        desc = res["benchmark"].get("class", {})
        lines += [f"## {name}", "",
                  f"Data: {desc.get('data_source', {}).get('dataset', '?')}; "
                  f"{desc.get('n_experiences', '?')} experiences; class order drawn from each "
                  "seed (in the JSON).", "",
                  "| method | final avg acc | avg forgetting | BWT | final params | "
                  "train FLOPs | wall s |", "|---|---|---|---|---|---|---|"]
        cols = (("final_avg_accuracy", "{:.3f}"), ("avg_forgetting", "{:.3f}"),
                ("bwt", "{:.3f}"), ("final_params", "{:,.0f}"), ("train_flops", "{:.3g}"),
                ("wall_seconds", "{:.1f}"))
        for _k, v in res["methods"].items():
            cells = [_pm(v.get(c), v.get(f"{c}_std"), f) for c, f in cols]
            lines.append(f"| {v['label']} | " + " | ".join(cells) + " |")
        lines += ["", "Targets:", ""]
        for c in res["targets"]:
            lines.append(f"- {'met' if c['met'] else 'MISSED'}: {c['target']}: {c['value']}")
        lines.append("")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["benchmarks"])
    fig, axes = plt.subplots(1, len(names), figsize=(7 * len(names), 5), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for _k, v in report["benchmarks"][name]["methods"].items():
            ys = v.get("avg_accuracy_per_exp") or []
            ax.plot(range(1, len(ys) + 1), ys, marker="o", label=v["label"],
                    linestyle="-" if v["grown"] else "--")
        ax.set_title(f"{name}: accuracy on seen experiences")
        ax.set_xlabel("experience")
        ax.set_ylabel("average accuracy (mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="Split-MNIST-5k only (class- and task-incremental), < 10 minutes")
    p.add_argument("--benchmarks", default=None,
                   help="comma-separated benchmark names (default: quick: split-mnist; full: "
                        "split-mnist,split-fmnist)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default=None, help="comma-separated method keys (default all)")
    p.add_argument("--no-task", action="store_true", help="skip the task-incremental rows")
    p.add_argument("--out", default=None, help="output stem (default continual[_quick])")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    seeds = [int(s) for s in a.seeds.split(",")]
    names = (a.benchmarks.split(",") if a.benchmarks else
             ["split-mnist"] if a.quick else ["split-mnist", "split-fmnist"])
    methods = METHODS + ([] if a.no_task else TASK_METHODS)
    if a.methods:
        keep = set(a.methods.split(","))
        unknown = keep - {m.key for m in methods}
        if unknown:
            p.error(f"unknown method(s) {sorted(unknown)}; valid: "
                    f"{', '.join(m.key for m in methods)}")
        methods = [m for m in methods if m.key in keep]
    base: dict[str, Any] = {}
    stem = a.out or ("continual_quick" if a.quick else "continual")
    t0 = time.perf_counter()
    report: dict[str, Any] = {
        "preset": "quick" if a.quick else "full",
        "command": "PYTHONPATH=. python benchmarks/continual.py "
                   + " ".join(shlex.quote(x) for x in (argv if argv is not None
                                                       else sys.argv[1:])),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, 1 torch thread",
        "torch": torch.__version__, "seeds": seeds,
        "settings": {**dataclasses.asdict(RunSpec()), **base, "grown_methods": GROW,
                     "der_grown_methods": DER_GROW},
        "benchmarks": {},
    }
    with tempfile.TemporaryDirectory(prefix="selfgrow-continual-") as work:
        for name in names:
            res = run_benchmark(name, methods, seeds, base, Path(work),
                                lambda s: print(s, flush=True))
            res["targets"] = targets(res)
            report["benchmarks"][name] = res
    report["wall_minutes"] = (time.perf_counter() - t0) / 60
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    md = markdown(report)
    (RESULTS / f"{stem}.md").write_text(md + "\n")
    plot(report, RESULTS / f"{stem}.png")
    print()
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
