"""The model-growth survey's claims, measured with the pre-training harness.

Each claim is a small side-by-side comparison at EQUAL training FLOPs on Shakespeare bytes
(the ``claims`` preset of ``pretrain_common``: target 4 layers, d_model 64, 2 heads, 64
tokens of context), over 3 seeds (mean and std of the final validation loss). A claim is
"confirmed" when the winner the survey names beats every other variant by more than the
seeds' combined standard deviation, "refuted" when another variant wins by that margin, and
"inconclusive" otherwise.

Usage::

    PYTHONPATH=. python benchmarks/survey_claims.py            # 3 seeds (about 30 min)
    PYTHONPATH=. python benchmarks/survey_claims.py --seeds 0  # one seed (smoke)

Writes ``benchmarks/results/survey_claims.{md,json}``.
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

from pretrain_common import budget_for, mean_std, run_one  # noqa: E402

PRESET = {"target": (4, 64, 2, 64), "tokens_per_step": 1024, "tokens_per_param": 10,
          "n_evals": 10, "eval_windows": 128}
LR = 8e-3  # the best LR of the quick preset's scratch sweep (benchmarks/results)


def variants() -> list[dict[str, Any]]:
    """(claim, variant label, grow_and_train arguments); FLOPs equal for all."""
    L, D, H, T = PRESET["target"]
    half_l = L // 2
    return [
        # 1. compound vs depth-only vs width-only (exact operators in all three)
        {"claim": "compound", "label": "compound (depth+width+seq)", "strategy": "compound"},
        {"claim": "compound", "label": "depth only (function-preserving)",
         "strategy": "compound", "start": (half_l, D, H, T)},
        {"claim": "compound", "label": "width only (exact duplication)", "strategy": "compound",
         "start": (L, D // 2, H // 2, T)},
        # 2. growth timing (G_stack)
        *[{"claim": "timing", "label": f"g_stack at {int(g * 100)}%", "strategy": "gstack",
           "grow_at": g} for g in (0.15, 0.25, 0.5, 0.75)],
        # 3. number of stages (depth 1 -> 4 layers, function-preserving)
        {"claim": "stages", "label": "1 stage (1->4 layers at 30%)", "strategy": "compound",
         "start": (1, D, H, T), "grow_at": 0.3},
        {"claim": "stages", "label": "2 stages (at 15%, 30%)", "strategy": "compound",
         "start": (1, D, H, T), "grow_at": [0.15, 0.3]},
        {"claim": "stages", "label": "3 stages (at 10%, 20%, 30%)", "strategy": "compound",
         "start": (1, D, H, T), "grow_at": [0.1, 0.2, 0.3]},
        {"claim": "stages", "label": "4 stages (width at 7.5%, then depth 1->4)",
         "strategy": "compound", "start": (1, D // 2, H // 2, T),
         "stages": [(0.075, (1, D, H, T)), (0.15, (2, D, H, T)), (0.225, (3, D, H, T)),
                    (0.3, (4, D, H, T))]},
        # 5. halved LR + re-warm-up after stacking vs neither
        {"claim": "lr_after_stack", "label": "g_stack, LR halved + re-warm-up 50 steps",
         "strategy": "gstack", "lr_scale_after": 0.5, "rewarm_steps": 50},
        {"claim": "lr_after_stack", "label": "g_stack, neither", "strategy": "gstack",
         "lr_scale_after": 1.0, "rewarm_steps": 0},
        # 6. function-preserving vs plain stacking (same time, same target)
        {"claim": "fp_vs_plain", "label": "plain G_stack", "strategy": "gstack"},
        {"claim": "fp_vs_plain", "label": "function-preserving stack", "strategy": "compound",
         "start": (half_l, D, H, T)},
    ]


CLAIMS = {
    "compound": ("CompoundGrow: growing several dimensions together beats growing one "
                 "(Gu et al. 2021)", "compound (depth+width+seq)"),
    "timing": ("Growth timing: growing early (10-30% of training) beats growing late "
               "(Du et al. 2024; Yao et al. 2023)", ("g_stack at 15%", "g_stack at 25%")),
    "stages": ("Several growth stages (2-3) beat one big growth (Gong et al. 2019; Shen "
               "et al. 2022)", ("2 stages (at 15%, 30%)", "3 stages (at 10%, 20%, 30%)")),
    "lr_after_stack": ("Halving the LR with a re-warm-up after stacking helps (G_stack "
                       "recipe; SPARKLING 2026)", "g_stack, LR halved + re-warm-up 50 steps"),
    "fp_vs_plain": ("Function-preserving stacking beats plain stacking (Shen et al. 2022; "
                    "Yao et al. 2023) -- Du et al. 2024 report the opposite for G_stack",
                    "function-preserving stack"),
}


def verdict(rows: list[dict[str, Any]], winner: Any) -> str:
    names = winner if isinstance(winner, tuple) else (winner,)
    best = min(rows, key=lambda r: r["mean"])
    margin = lambda a, b: (b["mean"] - a["mean"]) > (a["std"] + b["std"])  # noqa: E731
    wrows = [r for r in rows if r["label"] in names]
    others = [r for r in rows if r["label"] not in names]
    bw = min(wrows, key=lambda r: r["mean"])
    if best["label"] in names and all(margin(bw, o) for o in others):
        return "confirmed"
    if best["label"] not in names and margin(best, bw):
        return "refuted"
    return "inconclusive"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--only", default=None, help="comma-separated claim keys")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    b = budget_for(PRESET)
    t0 = time.perf_counter()
    print(f"claims preset: target {PRESET['target']}, {PRESET['tokens_per_param']} tokens/param,"
          f" budget {b['budget_flops']:.3g} FLOPs, lr {LR}, seeds {seeds}", flush=True)
    only = set(a.only.split(",")) if a.only else None
    results: dict[str, list[dict[str, Any]]] = {}
    preservation: list[dict[str, Any]] = []
    for v in variants():
        if only and v["claim"] not in only:
            continue
        kw = {k: val for k, val in v.items() if k not in ("claim", "label", "strategy",
                                                           "start")}
        if "start" in v:
            from selfgrow.models.transformer import TransformerConfig
            from selfgrow.pretrain import Shape, config_for

            tgt = Shape.of(PRESET["target"])
            kw["model_or_config"] = config_for(Shape.of(v["start"]), TransformerConfig(),
                                               tgt.head_dim, 4)
        kw.setdefault("lr", LR)
        finals, spikes = [], []
        for sd in seeds:
            r = run_one(PRESET, b["budget_flops"], v["strategy"], seed=sd, label=v["label"],
                        **kw)
            finals.append(r["final_val_loss"])
            spikes.append([g["spike"] for g in r["growths"]])
            if v["strategy"] == "gstack" and v["claim"] == "fp_vs_plain":
                for g in r["growths"]:
                    preservation.append({"seed": sd, "label": v["label"],
                                         **(g.get("preservation") or {}),
                                         "val_spike": g["spike"]})
        m, s = mean_std(finals)
        row = {"label": v["label"], "finals": finals, "mean": m, "std": s, "spikes": spikes}
        results.setdefault(v["claim"], []).append(row)
        print(f"  [{v['claim']}] {v['label']}: {m:.4f} +- {s:.4f}", flush=True)
    table = []
    for key, rows in results.items():
        text, winner = CLAIMS[key]
        table.append({"claim": key, "text": text, "rows": rows,
                      "verdict": verdict(rows, winner)})
    # 4. output change right after plain G_stack
    pres = {"text": "Plain G_stack changes the output by about 1e-6 right after stacking "
                    "(survey)", "measured": preservation}
    if preservation:
        mx = max(float(p.get("max_abs", 0.0) or 0.0) for p in preservation)
        pres["verdict"] = "confirmed" if mx < 1e-5 else "refuted"
        pres["max_abs"] = mx
    out = {"preset": PRESET, "budget": b, "lr": LR, "seeds": seeds, "claims": table,
           "gstack_output_change": pres, "command": "PYTHONPATH=. python " + " ".join(
               shlex.quote(x) for x in [os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
           "machine": {"python": platform.python_version(), "torch": torch.__version__,
                       "cpu_count": os.cpu_count(), "threads": a.threads},
           "elapsed_seconds": time.perf_counter() - t0}
    d = Path(a.out)
    d.mkdir(parents=True, exist_ok=True)
    (d / "survey_claims.json").write_text(json.dumps(out, indent=1, default=str) + "\n")
    md = _markdown(out)
    (d / "survey_claims.md").write_text(md)
    print("\n" + md)
    return 0


def _markdown(out: dict[str, Any]) -> str:
    b = out["budget"]
    lines = ["# The survey's claims, measured", "",
             f"Command: `{out['command']}` ({out['elapsed_seconds'] / 60:.1f} min, "
             f"{out['machine']['threads']} thread(s), {out['machine']['cpu_count']} cores)  ",
             f"Setting: Shakespeare bytes (split by play), target {out['preset']['target']} "
             f"(layers, d_model, heads, seq_len) = {int(b['target_params']):,} parameters, "
             f"every run {b['budget_flops']:.3g} training FLOPs "
             f"({out['preset']['tokens_per_param']} tokens per target parameter), WSD, peak "
             f"LR {out['lr']}, seeds {out['seeds']}. Final validation loss (nats/byte), mean "
             f"+- std over seeds; lower is better.", "",
             "| claim | variant | final val loss | verdict |", "|---|---|---|---|"]
    for c in out["claims"]:
        for i, r in enumerate(c["rows"]):
            lines.append(f"| {c['text'] if i == 0 else ''} | {r['label']} | "
                         f"{r['mean']:.4f} +- {r['std']:.4f} | "
                         f"{('**' + c['verdict'] + '**') if i == 0 else ''} |")
    p = out["gstack_output_change"]
    if p.get("measured"):
        ex = p["measured"][0]
        lines.append(f"| {p['text']} | plain G_stack, probe batch | max abs output change "
                     f"{p['max_abs']:.3g} (relative {ex.get('max_rel', float('nan')):.3g}); "
                     f"validation-loss spike {ex['val_spike']:+.3f} | **{p['verdict']}** |")
    lines += ["", "Verdict rule: confirmed when the claimed winner beats every other variant "
              "by more than the sum of their seed standard deviations; refuted when another "
              "variant beats it by that margin; otherwise inconclusive.", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
