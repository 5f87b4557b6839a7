"""Self-evolving models: grow-and-prune vs grow-only vs fixed sizes on a stream whose
difficulty changes.

The stream (``selfgrow.data.load_random_rbf``, river's RandomRBF generator, the MOA
benchmark) alternates hard concepts (50 Gaussian centroids: a complex boundary that needs
capacity) and easy ones (2 centroids); every concept is new (its own generator seeds), and
the learner is told where a concept starts (the experience id; ``LossPlateau`` starts a new
history there). Every method trains the same ``GrowableMLP`` (10 -> w -> w -> 5, ReLU) with
AdamW, one pass, test-then-train on each mini-batch (prequential accuracy).

Rows (same stream, same batches, same seeds):

* ``fixed small``: width 32 throughout.
* ``fixed at grown size``: width 128 throughout (the largest size the growing runs reach).
* ``grow-only``: starts at 32; ``LossPlateau(min_loss)`` -> Net2WiderNet on both hidden
  layers (``widen_layers``, factor 2, exact) up to the budget of the 128-wide model.
* ``grow-and-prune``: the same, plus ``IdleCapacity`` (Taylor importance over a window, with
  the ablation check ``verify``: the loss on the last 512 stream samples may rise by at most
  ``tolerance`` when the least important quarter of each layer is masked; and only while the
  window's training loss is at most ``max_loss``, below the plateau's ``min_loss``) -> the
  ``"prune"`` action (``remove_units`` of the idle units), ``RulePolicy(prune_floor = the
  64-wide model, prune_cooldown, hysteresis)``.
* ``fixed at equal compute``: the fixed width whose training FLOPs over the stream are
  closest to grow-and-prune's (FLOPs counted with ``FlopMeter``, forward + backward).

Every method's LR is the best of the grid on a separate tuning seed (baselines get the same
sweep). Reported over the seeds, mean ± std: prequential accuracy (overall and on hard / easy
concepts), final accuracy (the last concept's held-out test block at the end), mean and final
parameters, training FLOPs, growths and prunes. Target: grow-and-prune within 1 point of
grow-only's prequential accuracy with at least 30% fewer mean parameters.

Seed 0 of grow-and-prune also writes a run directory (``events.jsonl``, ``metrics.jsonl``)
that ``selfgrow inspect`` reads, and its figure (parameters going up and down, each change
labelled with its signal and operator).

Usage::

    PYTHONPATH=. python benchmarks/self_evolving.py --quick   # 3 seeds, 4 concepts (< 10 min)
    PYTHONPATH=. python benchmarks/self_evolving.py           # 3 seeds, 8 concepts, longer

Writes ``benchmarks/results/self_evolving[_quick].{md,json,png}`` and the run directory
``benchmarks/results/self_evolving[_quick]_run/``.
"""

from __future__ import annotations

import argparse
import collections
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from selfgrow import build_model
from selfgrow.control import (
    Budget,
    GrowthController,
    IdleCapacity,
    LossPlateau,
    Rule,
    RulePolicy,
)
from selfgrow.core import count_params
from selfgrow.data import load_random_rbf
from selfgrow.inspect_run import load_run, plot_run
from selfgrow.models.mlp import MLPConfig
from selfgrow.runs.dirs import write_json
from selfgrow.runs.flops import FlopMeter
from selfgrow.runs.summary import format_table

RESULTS = Path(__file__).resolve().parent / "results"

PRESETS: dict[str, dict[str, Any]] = {
    "quick": dict(centroids=(50, 2, 50, 2), n_hard=30000, n_easy=15000, n_test=2000,
                  seeds=(0, 1, 2), tune_seed=100, lrs=(3e-3, 1e-2)),
    "full": dict(centroids=(50, 2, 50, 2, 50, 2, 50, 2), n_hard=40000, n_easy=20000,
                 n_test=2000, seeds=(0, 1, 2), tune_seed=100, lrs=(1e-3, 3e-3, 1e-2)),
}
#: shared by every method
BATCH = 32
SMALL, LARGE = 32, 128
IN_FEATURES, N_CLASSES = 10, 5
HARD = 10  # concepts with at least this many centroids count as hard in the report
#: the growth / prune settings, chosen on the tuning seed by benchmarks/self_evolving_tune.py
#: (the growth settings are the same for both growing runs: grow-only gets the best of them)
GROW = dict(plateau_window=50, min_rel_drop=0.05, min_loss=0.15, cooldown=100)
PRUNE = dict(window=50, threshold=0.2, tolerance=0.02, fractions=(0.25,), max_loss=0.1,
             prune_cooldown=50, hysteresis=200, recent_batches=16, floor_width=64)


def mlp(width: int) -> torch.nn.Module:
    return build_model(MLPConfig(in_features=IN_FEATURES, hidden=(width, width),
                                 n_classes=N_CLASSES))


def n_params(width: int) -> int:
    return count_params(mlp(width))


def stream(p: dict[str, Any], seed: int) -> Any:
    sizes = [p["n_hard"] if c >= HARD else p["n_easy"] for c in p["centroids"]]
    return load_random_rbf(seed=seed, centroids=p["centroids"], n_train=sizes,
                           n_test=p["n_test"], n_features=IN_FEATURES, n_classes=N_CLASSES)


def controller(method: str, model: torch.nn.Module, opt: torch.optim.Optimizer,
               recent: collections.deque, probe: torch.Tensor, log_dir: Path | None,
               grow: dict[str, Any], prune: dict[str, Any]) -> GrowthController | None:
    """The growing runs' controller (None for a fixed model)."""
    GROW, PRUNE = grow, prune  # noqa: N806 - the module settings, or a tuning variant
    if method not in ("grow-only", "grow-and-prune"):
        return None
    signals: list[Any] = [LossPlateau(window=GROW["plateau_window"],
                                      min_rel_drop=GROW["min_rel_drop"],
                                      min_loss=GROW["min_loss"])]
    rules = [Rule("loss_plateau", "widen_layers", kwargs=dict(layers=[0, 1], factor=2.0))]
    extra: dict[str, Any] = {}
    if method == "grow-and-prune":
        def verify(m: torch.nn.Module) -> float:
            x = torch.cat([b[0] for b in recent])
            y = torch.cat([b[1] for b in recent])
            return float(F.cross_entropy(m(x), y))

        signals.append(IdleCapacity(window=PRUNE["window"], threshold=PRUNE["threshold"],
                                    criterion="taylor", verify=verify,
                                    tolerance=PRUNE["tolerance"],
                                    fractions=PRUNE["fractions"],
                                    max_loss=PRUNE["max_loss"]))
        rules.append(Rule("idle_capacity", "prune", from_state={"units": "units"},
                          direction="prune"))
        extra = dict(prune_floor=n_params(PRUNE["floor_width"]),
                     prune_cooldown=PRUNE["prune_cooldown"], hysteresis=PRUNE["hysteresis"])
    policy = RulePolicy(rules, budget=Budget(max_params=n_params(LARGE)),
                        cooldown=GROW["cooldown"], **extra)
    return GrowthController(model, opt, signals, policy, probe=probe, scalar_every=10,
                            log_dir=str(log_dir) if log_dir is not None else None,
                            run_id=f"self-evolving-{method}" if log_dir else None)


def run(method: str, width: int, lr: float, data: Any, seed: int,
        log_dir: Path | None = None, grow: dict[str, Any] | None = None,
        prune: dict[str, Any] | None = None) -> dict[str, Any]:
    """One pass over the stream, test-then-train on every batch (``grow`` / ``prune``
    override entries of :data:`GROW` / :data:`PRUNE`)."""
    grow, prune = {**GROW, **(grow or {})}, {**PRUNE, **(prune or {})}
    torch.manual_seed(seed)
    model = mlp(width)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    recent: collections.deque = collections.deque(maxlen=prune["recent_batches"])
    ctrl = controller(method, model, opt, recent, data.x_train[:256], log_dir, grow, prune)
    meter = FlopMeter()
    concepts = data.source["concepts"]
    start, step, param_steps = 0, 0, 0.0
    per_concept = []
    t0 = time.perf_counter()
    n_now, n_changes = count_params(model), 0
    for k, c in enumerate(concepts):
        x_all = data.x_train[start:start + c["n_train"]]
        y_all = data.y_train[start:start + c["n_train"]]
        start += c["n_train"]
        correct = seen = 0
        for b in range(0, len(y_all), BATCH):
            x, y = x_all[b:b + BATCH], y_all[b:b + BATCH]
            m = ctrl.model if ctrl is not None else model
            o = ctrl.optimizer if ctrl is not None else opt
            out = m(x)
            correct += int((out.argmax(1) == y).sum())
            seen += len(y)
            loss = F.cross_entropy(out, y)
            o.zero_grad(set_to_none=True)
            loss.backward()
            o.step()
            meter.add(m, x, y)
            recent.append((x, y))
            step += 1
            if ctrl is not None:
                ctrl.observe(loss=loss, experience=k)
                if ctrl.n_changes != n_changes:
                    n_changes, n_now = ctrl.n_changes, count_params(ctrl.model)
            param_steps += n_now
        per_concept.append({"centroids": c["centroids"], "prequential": correct / seen})
        if ctrl is not None and ctrl.metrics_sink is not None:  # the figure's accuracy panel
            ctrl.metrics_sink.log_row({"kind": "eval", "step": step, "experience": k,
                                       "prequential": correct / seen})
    m = ctrl.model if ctrl is not None else model
    last = concepts[-1]["n_test"]
    with torch.no_grad():
        m.eval()
        final = float((m(data.x_test[-last:]).argmax(1) == data.y_test[-last:]).float().mean())
    events = ctrl.events if ctrl is not None else []
    if ctrl is not None:
        ctrl.close()
    hard = [c["prequential"] for c in per_concept if c["centroids"] >= HARD]
    easy = [c["prequential"] for c in per_concept if c["centroids"] < HARD]
    sizes = [c["n_train"] for c in concepts]
    total = sum(sizes)
    return {
        "method": method, "width": width, "lr": lr, "seed": seed,
        "prequential": sum(c["prequential"] * n for c, n in zip(per_concept, sizes,
                                                                 strict=True)) / total,
        "prequential_hard": statistics.mean(hard) if hard else None,
        "prequential_easy": statistics.mean(easy) if easy else None,
        "per_concept": per_concept,
        "final_accuracy": final,
        "mean_params": param_steps / step,
        "final_params": count_params(m),
        "train_flops": meter.total,
        "growths": sum(1 for e in events if e.kind == "growth"),
        "prunes": sum(1 for e in events if e.kind == "prune"),
        "changes": [(e.step, e.kind, e.params_after) for e in events
                    if e.kind in ("growth", "prune")],
        "wall_seconds": time.perf_counter() - t0,
    }


def equal_flops_width(target: float, data: Any, p: dict[str, Any]) -> int:
    """The fixed width whose training FLOPs over the stream are closest to ``target``."""
    n = len(data.y_train)
    x, y = data.x_train[:BATCH], data.y_train[:BATCH]
    meter = FlopMeter()
    best, err = SMALL, float("inf")
    for w in range(8, LARGE + 1, 4):
        f = meter.add(mlp(w), x, y) / BATCH * n
        if abs(f - target) < err:
            best, err = w, abs(f - target)
    return best


def mean_std(rows: list[dict[str, Any]], key: str) -> tuple[float, float]:
    v = [float(r[key]) for r in rows if r[key] is not None]
    return statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the < 10 minute preset")
    ap.add_argument("--out", default=str(RESULTS), help="results directory")
    args = ap.parse_args()
    torch.set_num_threads(1)
    preset = "quick" if args.quick else "full"
    p = PRESETS[preset]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "self_evolving" + ("_quick" if args.quick else "")
    t_start = time.perf_counter()
    fixed = {"fixed small": SMALL, "fixed at grown size": LARGE}
    growing = {"grow-only": SMALL, "grow-and-prune": SMALL}

    # LR per method on the tuning seed (the equal-compute width comes from the tuned
    # grow-and-prune run there, then gets its own sweep)
    tune = stream(p, p["tune_seed"])
    tuning: dict[str, dict[float, float]] = {}
    best_lr: dict[str, float] = {}
    for method, w in {**fixed, **growing}.items():
        tuning[method] = {lr: run(method, w, lr, tune, p["tune_seed"])["prequential"]
                          for lr in p["lrs"]}
        best_lr[method] = max(tuning[method], key=tuning[method].get)
        print(f"tune {method:22s} {tuning[method]} -> lr {best_lr[method]}", flush=True)
    gp_tune = run("grow-and-prune", SMALL, best_lr["grow-and-prune"], tune, p["tune_seed"])
    w_eq_tune = equal_flops_width(gp_tune["train_flops"], tune, p)
    tuning["fixed at equal compute"] = {
        lr: run("fixed", w_eq_tune, lr, tune, p["tune_seed"])["prequential"] for lr in p["lrs"]}
    best_lr["fixed at equal compute"] = max(tuning["fixed at equal compute"],
                                            key=tuning["fixed at equal compute"].get)

    rows: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    run_dir = out / f"{stem}_run"
    for seed in p["seeds"]:
        data = stream(p, seed)
        for method, w in {**growing, **fixed}.items():
            log = None
            if method == "grow-and-prune" and seed == p["seeds"][0]:
                shutil.rmtree(run_dir, ignore_errors=True)
                log = run_dir
            r = run(method, w, best_lr[method], data, seed, log_dir=log)
            rows[method].append(r)
            print(f"seed {seed} {method:22s} preq {r['prequential']:.4f} final "
                  f"{r['final_accuracy']:.4f} mean params {r['mean_params']:.0f} "
                  f"flops {r['train_flops']:.3g} +{r['growths']}/-{r['prunes']} "
                  f"({r['wall_seconds']:.1f} s)", flush=True)
        w_eq = equal_flops_width(rows["grow-and-prune"][-1]["train_flops"], data, p)
        r = run("fixed at equal compute", w_eq, best_lr["fixed at equal compute"], data, seed)
        rows["fixed at equal compute"].append(r)
        print(f"seed {seed} fixed at equal compute (width {w_eq}) preq {r['prequential']:.4f}",
              flush=True)

    order = ["grow-and-prune", "grow-only", "fixed small", "fixed at equal compute",
             "fixed at grown size"]
    table = []
    summary: dict[str, Any] = {}
    for method in order:
        rs = rows[method]
        s = {k: mean_std(rs, k) for k in ("prequential", "prequential_hard",
                                          "prequential_easy", "final_accuracy",
                                          "mean_params", "final_params", "train_flops",
                                          "growths", "prunes")}
        s["widths"] = sorted({r["width"] for r in rs})
        s["lr"] = best_lr[method]
        summary[method] = s

        def pm(k: str, f: str = "{:.4f}", s: dict[str, Any] = s) -> str:
            m, sd = s[k]
            return f"{f.format(m)} ± {f.format(sd)}"

        table.append([method, pm("prequential"), pm("prequential_hard"),
                      pm("prequential_easy"), pm("final_accuracy"), pm("mean_params", "{:,.0f}"),
                      pm("final_params", "{:,.0f}"), f"{s['train_flops'][0]:.3g}",
                      f"{s['growths'][0]:.1f} / {s['prunes'][0]:.1f}",
                      "/".join(str(w) for w in s["widths"]), f"{s['lr']:g}"])
    header = ["method", "prequential acc", "hard concepts", "easy concepts", "final acc",
              "mean params", "final params", "train FLOPs", "growths / prunes",
              "start width", "lr"]
    text = format_table(header, table)
    gp, go = summary["grow-and-prune"], summary["grow-only"]
    d_acc = (gp["prequential"][0] - go["prequential"][0]) * 100
    fewer = 1 - gp["mean_params"][0] / go["mean_params"][0]
    met = d_acc >= -1.0 and fewer >= 0.30
    verdict = (f"Target (grow-and-prune within 1 point of grow-only's prequential accuracy "
               f"with >= 30% fewer mean parameters): {'MET' if met else 'MISSED'}: "
               f"{d_acc:+.2f} points, {fewer * 100:.1f}% fewer mean parameters.")
    eq = summary["fixed at equal compute"]
    vs_eq = (f"Against the fixed model of equal training FLOPs (width "
             f"{'/'.join(str(w) for w in eq['widths'])}): "
             f"{(gp['prequential'][0] - eq['prequential'][0]) * 100:+.2f} points.")
    print("\n" + text + "\n\n" + verdict + "\n" + vs_eq)

    # the self-evolving run's figure, from its run directory (what `selfgrow inspect` reads)
    plot_run(load_run(run_dir), out / f"{stem}.png")

    cmd = "PYTHONPATH=. python benchmarks/self_evolving.py" + (" --quick" if args.quick else "")
    meta = {"command": cmd, "preset": {k: list(v) if isinstance(v, tuple) else v
                                       for k, v in p.items()},
            "grow": GROW, "prune": {k: list(v) if isinstance(v, tuple) else v
                                    for k, v in PRUNE.items()},
            "batch": BATCH, "widths": [SMALL, LARGE], "machine": platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__, "threads": 1,
            "data_source": stream(p, p["seeds"][0]).source,
            "wall_seconds_total": time.perf_counter() - t_start}
    write_json(out / f"{stem}.json", {"meta": meta, "tuning": {
        m: {str(lr): a for lr, a in v.items()} for m, v in tuning.items()},
        "summary": summary, "runs": rows, "target_met": met})
    md = ["# Self-evolving models: grow-and-prune on a stream of changing difficulty", "",
          f"Command: `{cmd}` ({meta['wall_seconds_total'] / 60:.1f} min, 1 thread). "
          f"Stream: river RandomRBF concepts with centroids {list(p['centroids'])}, "
          f"{p['n_hard']:,} samples per hard concept and {p['n_easy']:,} per easy one, "
          f"batch {BATCH}, one pass, test-then-train; seeds {list(p['seeds'])} "
          f"(mean ± std); each method's LR is the best of {list(p['lrs'])} on seed "
          f"{p['tune_seed']}.", "", "```", text, "```", "", verdict, "", vs_eq, "",
          f"The run directory `{run_dir.name}` (beside this file) holds grow-and-prune seed "
          f"{p['seeds'][0]}'s events; `selfgrow inspect` shows "
          f"them and `{stem}.png` is its figure.", ""]
    (out / f"{stem}.md").write_text("\n".join(md))
    print(f"\nwrote {out / stem}.{{md,json,png}} and {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
