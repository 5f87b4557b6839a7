"""MoE growth on Shakespeare: fixed MoE vs grown, upcycled, Drop-Upcycled and dynamically
gated MoEs, at the same number of training tokens; and growth by merging (Branch-Train-MiX)
on two corpora.

Every run trains a byte-level selfgrow ``GrowableTransformer`` (2 layers, d_model 64,
4 heads, MoE FFNs of ``d_ff`` units per expert) on the same seeded Shakespeare windows
(``selfgrow.data``) with AdamW, the same LR grid (each method reports its best LR), the same
steps and batch. Rows:

* ``fixed top-2, 8 experts``: the reference;
* ``grown from 3 experts``: top-2 MoE with 3 experts; a ``GrowthController`` with
  ``ExpertOverload(min_entropy)`` -> ``add_expert`` (copy of the busiest expert) grows it
  to at most 8 experts; also stopped at 80% of the steps (the FLOP target);
* ``dense-upcycled``: a dense FFN of ``d_ff`` units for half the steps, then
  ``moe_upcycle`` to 8 experts (Sparse Upcycling);
* ``Drop-Upcycled``: the same with ``moe_drop_upcycle`` (drop ratio 0.5);
* ``dense, same active FFN``: a dense FFN with 2 x ``d_ff`` units (top-2's active FFN
  parameters per token), for scale;
* ``dynamic-k`` (k in 1..2 per token) and ``top-any`` (DynMoE), 8 experts.

Metrics: validation loss (fixed validation windows), active parameters per token (non-FFN
parameters + mean active experts x one expert's parameters + router), training tokens/s,
training FLOPs (``FlopCounterMode`` on one training step every ``flop_every`` steps,
integrated over the run; routing-dependent gates are re-measured as they change). Targets:
grown within 2% of fixed-8's validation loss with at most 80% of its training FLOPs;
dynamic gating within 2% of top-2's loss with fewer active parameters per token.

Merging: a base model trained on a Shakespeare + Python mixture is branched into two
specialists, one per corpus, whose FFNs train on their corpus (Branch-Train-MiX's branches;
here attention and embeddings stay the base's, ``non_ffn="base"``), merged with
``grow_by_merging`` (top-2), and the router alone trains briefly (``train_router_``) on the
mixture. Target: the merged model's validation loss on each corpus within 5% of that
corpus's specialist, where each specialist is far worse on the other corpus.

Usage::

    PYTHONPATH=. python benchmarks/moe_growth.py --quick   # 3 seeds, one LR, < 10 minutes
    PYTHONPATH=. python benchmarks/moe_growth.py           # 6x the tokens, LR grid of 2 (~70 min)

Writes ``benchmarks/results/moe_growth[_quick].{md,json}``.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from selfgrow.control.controller import GrowthController
from selfgrow.control.policies import Rule, RulePolicy
from selfgrow.control.signals import ExpertOverload
from selfgrow.data.text import LMBatches, eval_windows, load_python_stdlib, load_shakespeare
from selfgrow.models.moe import moe_layers
from selfgrow.models.transformer import GrowableTransformer, TransformerConfig
from selfgrow.ops import grow_, make_config
from selfgrow.ops.experts import grow_by_merging, train_router_
from selfgrow.runs.dirs import write_json
from selfgrow.runs.flops import flop_counter
from selfgrow.runs.summary import format_table

RESULTS = Path(__file__).resolve().parent / "results"
T = 64

PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"steps": 400, "batch": 16, "lrs": (3e-3,), "seeds": (0, 1, 2), "d_ff": 64,
              "eval_windows": 64, "flop_every": 50, "merge_steps": (200, 400, 100),
              "merge_batch": 32},
    "full": {"steps": 1200, "batch": 32, "lrs": (1e-3, 3e-3), "seeds": (0, 1, 2), "d_ff": 64,
             "eval_windows": 128, "flop_every": 50, "merge_steps": (200, 400, 100),
             "merge_batch": 32},
    "smoke": {"steps": 12, "batch": 4, "lrs": (3e-3,), "seeds": (0,), "d_ff": 16,
              "eval_windows": 4, "flop_every": 6, "merge_steps": (4, 4, 4), "merge_batch": 4},
}


def config(d_ff: int, **moe: Any) -> TransformerConfig:
    return TransformerConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, d_ff=d_ff,
                             max_seq_len=T, **moe)


def lm_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def val_loss(model: torch.nn.Module, windows: tuple[torch.Tensor, torch.Tensor]) -> float:
    was = model.training
    model.eval()
    x, y = windows
    out = float(sum(lm_loss(model, x[i:i + 32], y[i:i + 32]) * len(x[i:i + 32])
                    for i in range(0, len(x), 32)) / len(x))
    model.train(was)
    return out


def active_params(model: GrowableTransformer) -> float:
    """Parameters a token meets: everything but the experts, plus (mean active experts) x
    one expert's parameters per MoE layer (from the layers' routing statistics)."""
    total = 0.0
    layers = moe_layers(model)
    expert_ids = {id(p) for m in layers.values() for p in m.expert_params().values()}
    total += sum(p.numel() for p in model.parameters() if id(p) not in expert_ids)
    for m in layers.values():
        per_expert = sum(p[0].numel() for p in m.expert_params().values())
        k = m.routing_stats(reset=False)["active_k"] or min(m.top_k, m.n_experts)
        total += k * per_expert
    return total


def step_flops(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Forward + backward FLOPs of one training step on a copy (the live model untouched)."""
    m = copy.deepcopy(model).train()
    with torch.random.fork_rng(), flop_counter() as fc:
        (lm_loss(m, x, y) + m.moe_loss()).backward()
    return float(fc.get_total_flops())


def train(model: GrowableTransformer, data: LMBatches, steps: int, lr: float, batch: int,
          flop_every: int, windows: Any,
          hooks: dict[int, Callable[[GrowableTransformer, torch.optim.Optimizer], None]]
          | None = None,
          controller: Callable[[GrowableTransformer, torch.optim.Optimizer], Any] | None = None,
          stop_at: tuple[int, ...] = ()) -> dict[str, Any]:
    """Train ``steps`` AdamW steps; ``hooks[s]`` runs before step ``s`` (a growth);
    ``controller`` builds a GrowthController observed after every step. Returns the final
    validation loss (and at each ``stop_at`` step), FLOPs, tokens/s, active parameters."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    ctrl = controller(model, opt) if controller is not None else None
    flops, per_step, train_s = 0.0, 0.0, 0.0
    at: dict[int, dict[str, float]] = {}
    model.train()
    for s in range(steps):
        if hooks and s in hooks:
            hooks[s](model, opt)
            per_step = 0.0
        x, y = data.sample(batch, T)
        if per_step == 0.0 or s % flop_every == 0:
            per_step = step_flops(model, x, y)
        flops += per_step
        t0 = time.perf_counter()
        loss = lm_loss(model, x, y) + model.moe_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        train_s += time.perf_counter() - t0
        if ctrl is not None and ctrl.observe(loss=loss.detach()) is not None:
            per_step = 0.0  # grown: re-measure
        if s + 1 in stop_at:
            at[s + 1] = {"val_loss": val_loss(model, windows), "flops": flops}
    if ctrl is not None:
        ctrl.close()
    return {"val_loss": val_loss(model, windows), "flops": flops,
            "tokens_per_s": steps * batch * T / train_s, "active_params": active_params(model),
            "experts": list(model.config.moe_experts), "at": at,
            "growths": [] if ctrl is None else [
                {"step": e.step, "op": e.action["op"], "notes": e.extra.get("notes")}
                for e in ctrl.events if e.kind == "growth"]}


def methods(p: dict[str, Any]) -> dict[str, dict[str, Any]]:
    d_ff, steps = p["d_ff"], p["steps"]
    half = steps // 2

    def upcycle(op: str) -> Callable[[GrowableTransformer, torch.optim.Optimizer], None]:
        def hook(m: GrowableTransformer, opt: torch.optim.Optimizer) -> None:
            grow_(m, make_config(op, n_experts=8, top_k=2, seed=0), optimizer=opt)
        return hook

    def grower(m: GrowableTransformer, opt: torch.optim.Optimizer) -> GrowthController:
        sig = ExpertOverload(threshold=1.0, min_entropy=0.985, window=10)
        pol = RulePolicy([Rule("expert_overload", "add_expert")], cooldown=max(steps // 12, 1),
                         warmup_steps=max(steps // 20, 1), max_growths=5)
        return GrowthController(m, opt, signals=[sig], policy=pol, measure_flops=False)

    return {
        "fixed": {"label": "fixed top-2, 8 experts", "cfg": config(d_ff, moe_experts=(8, 8))},
        "grown": {"label": "grown from 3 experts (ExpertOverload -> add_expert)",
                  "cfg": config(d_ff, moe_experts=(3, 3)), "controller": grower,
                  "stop_at": (int(0.8 * steps),)},
        "upcycled": {"label": "dense -> upcycled at half (8 experts)", "cfg": config(d_ff),
                     "hooks": {half: upcycle("moe_upcycle")}},
        "drop_upcycled": {"label": "dense -> Drop-Upcycled at half (8 experts, r=0.5)",
                          "cfg": config(d_ff), "hooks": {half: upcycle("moe_drop_upcycle")}},
        "dense_active": {"label": "dense, same active FFN (2 x d_ff)", "cfg": config(2 * d_ff)},
        "dynamic_k": {"label": "dynamic-k (k in 1..2), 8 experts",
                      "cfg": config(d_ff, moe_experts=(8, 8), moe_gate="dynamic_k")},
        "top_any": {"label": "top-any (DynMoE), 8 experts",
                    "cfg": config(d_ff, moe_experts=(8, 8), moe_gate="top_any")},
    }


def run_growth(p: dict[str, Any], corpus: Any, log: Callable[[str], None]) -> dict[str, Any]:
    windows = eval_windows(corpus.val, T, p["eval_windows"])
    out: dict[str, Any] = {}
    for key, m in methods(p).items():
        runs = []
        for seed in p["seeds"]:
            best = None
            for lr in p["lrs"]:
                torch.manual_seed(seed)
                model = GrowableTransformer(copy.deepcopy(m["cfg"]))
                t0 = time.time()
                r = train(model, LMBatches(corpus.train, seed), p["steps"], lr, p["batch"],
                          p["flop_every"], windows, hooks=m.get("hooks"),
                          controller=m.get("controller"), stop_at=m.get("stop_at", ()))
                r["lr"], r["seed"], r["wall_s"] = lr, seed, round(time.time() - t0, 1)
                log(f"{m['label']:<55} seed {seed} lr {lr:g}: val {r['val_loss']:.4f} "
                    f"FLOPs {r['flops']:.3g} ({r['wall_s']} s)")
                if best is None or r["val_loss"] < best["val_loss"]:
                    best = r
            runs.append(best)
        out[key] = {"label": m["label"], "runs": runs}
    return out


def run_merging(p: dict[str, Any], sh: Any, py: Any, log: Callable[[str], None],
                seed: int = 0) -> dict[str, Any]:
    base_steps, branch_steps, router_steps = p["merge_steps"]
    lr, batch = 3e-3, p["merge_batch"]
    win = {c.name: eval_windows(c.val, T, p["eval_windows"]) for c in (sh, py)}

    class Mix:
        def __init__(self, s: int) -> None:
            self.a, self.b = LMBatches(sh.train, s), LMBatches(py.train, s + 1)

        def sample(self, bs: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
            xa, ya = self.a.sample(bs // 2, t)
            xb, yb = self.b.sample(bs - bs // 2, t)
            return torch.cat([xa, xb]), torch.cat([ya, yb])

    def fit(m: GrowableTransformer, data: Any, steps: int, only_ffn: bool = False) -> None:
        params = [q for n, q in m.named_parameters() if not only_ffn or ".ffn." in n]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        m.train()
        for _ in range(steps):
            x, y = data.sample(batch, T)
            loss = lm_loss(m, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    torch.manual_seed(seed)
    base = GrowableTransformer(config(4 * p["d_ff"]))
    fit(base, Mix(seed), base_steps)
    specialists = []
    for i, c in enumerate((sh, py)):
        s = copy.deepcopy(base)
        fit(s, LMBatches(c.train, seed + 10 + i), branch_steps, only_ffn=True)
        specialists.append(s)
    merged = grow_by_merging(base, specialists, non_ffn="base", top_k=2, seed=seed)
    train_router_(merged, Mix(seed + 20), steps=router_steps, lr=1e-2, batch_size=batch,
                  seq_len=T)
    res: dict[str, Any] = {"steps": {"base": base_steps, "branch": branch_steps,
                                     "router": router_steps}}
    for name, m in (("base", base), ("shakespeare specialist", specialists[0]),
                    ("python specialist", specialists[1]), ("merged (BTX, top-2)", merged)):
        res[name] = {c: val_loss(m, w) for c, w in win.items()}
        log(f"merging: {name:<24} shakespeare {res[name]['shakespeare']:.4f} "
            f"python {res[name]['python']:.4f}")
    res["ratio"] = {"shakespeare": res["merged (BTX, top-2)"]["shakespeare"]
                    / res["shakespeare specialist"]["shakespeare"],
                    "python": res["merged (BTX, top-2)"]["python"]
                    / res["python specialist"]["python"]}
    return res


def _ms(xs: list[float], f: str) -> str:
    if len(xs) == 1:
        return f.format(xs[0])
    return f"{f.format(statistics.mean(xs))} ± {f.format(statistics.stdev(xs))}"


def report(growth: dict[str, Any], merging: dict[str, Any]) -> tuple[str, str, str]:
    """The growth table, the merging table and the targets' verdicts."""
    fixed = growth["fixed"]["runs"]
    fl = statistics.mean(r["val_loss"] for r in fixed)
    ff = statistics.mean(r["flops"] for r in fixed)
    rows = []
    for key, g in growth.items():
        rs = g["runs"]
        rows.append([g["label"], _ms([r["val_loss"] for r in rs], "{:.4f}"),
                     f"{statistics.mean(r['val_loss'] for r in rs) / fl - 1:+.1%}",
                     _ms([r["active_params"] for r in rs], "{:,.0f}"),
                     _ms([r["tokens_per_s"] for r in rs], "{:,.0f}"),
                     _ms([r["flops"] for r in rs], "{:.3g}"),
                     f"{statistics.mean(r['flops'] for r in rs) / ff:.0%}",
                     "/".join(str(e) for e in rs[0]["experts"]) or "dense"])
        if key == "grown":
            at = [r["at"][max(r["at"])] for r in rs if r["at"]]
            if at:
                rows.append(["  the same run at 80% of the steps",
                             _ms([a["val_loss"] for a in at], "{:.4f}"),
                             f"{statistics.mean(a['val_loss'] for a in at) / fl - 1:+.1%}",
                             "", "", _ms([a["flops"] for a in at], "{:.3g}"),
                             f"{statistics.mean(a['flops'] for a in at) / ff:.0%}", ""])
    head = ["method", "val loss", "vs fixed-8", "active params/token", "train tok/s",
            "train FLOPs", "FLOPs vs fixed-8", "experts"]
    text = format_table(head, rows)
    g = growth["grown"]["runs"]
    g80 = [r["at"][max(r["at"])] for r in g if r["at"]]
    lines = ["Targets:"]
    if g80:
        l80 = statistics.mean(a["val_loss"] for a in g80) / fl - 1
        f80 = statistics.mean(a["flops"] for a in g80) / ff
        ok = l80 <= 0.02 and f80 <= 0.8
        lines.append(f"- grown within 2% of fixed-8's loss with <= 80% of its FLOPs: "
                     f"{'met' if ok else 'MISSED'} (at 80% of the steps: {l80:+.1%} loss, "
                     f"{f80:.0%} FLOPs; full run: "
                     f"{statistics.mean(r['val_loss'] for r in g) / fl - 1:+.1%} loss, "
                     f"{statistics.mean(r['flops'] for r in g) / ff:.0%} FLOPs)")
    ap_fixed = statistics.mean(r["active_params"] for r in fixed)
    for key in ("dynamic_k", "top_any"):
        rs = growth[key]["runs"]
        dl = statistics.mean(r["val_loss"] for r in rs) / fl - 1
        ap = statistics.mean(r["active_params"] for r in rs)
        ok = dl <= 0.02 and ap < ap_fixed
        lines.append(f"- {growth[key]['label']}: within 2% of top-2 with fewer active "
                     f"params/token: {'met' if ok else 'MISSED'} ({dl:+.1%} loss, "
                     f"{ap:,.0f} vs {ap_fixed:,.0f} active params)")
    mrows = [[k, f"{v['shakespeare']:.4f}", f"{v['python']:.4f}"] for k, v in merging.items()
             if isinstance(v, dict) and "shakespeare" in v and k != "ratio"]
    mtext = format_table(["model", "val loss shakespeare", "val loss python"], mrows)
    r = merging["ratio"]
    lines.append(f"- merged within 5% of each specialist on its corpus: "
                 f"{'met' if max(r.values()) <= 1.05 else 'MISSED'} (shakespeare "
                 f"{r['shakespeare'] - 1:+.1%}, python {r['python'] - 1:+.1%})")
    return text, mtext, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--preset", choices=list(PRESETS), default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    name = args.preset or ("quick" if args.quick else "full")
    p = PRESETS[name]
    t0 = time.time()
    sh, py = load_shakespeare(), load_python_stdlib()
    growth = run_growth(p, sh, print)
    merging = run_merging(p, sh, py, print)
    text, mtext, targets = report(growth, merging)
    print(text, mtext, targets, sep="\n\n")
    cmd = "PYTHONPATH=. python benchmarks/moe_growth.py" + (
        " --quick" if name == "quick" else "" if name == "full" else f" --preset {name}")
    out = Path(args.out) if args.out else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    stem = "moe_growth" if name == "full" else f"moe_growth_{name}"
    meta = {"command": cmd, "argv": " ".join(sys.argv), "preset": p, "machine":
            platform.machine(), "torch": torch.__version__, "threads": 1,
            "wall_s": round(time.time() - t0, 1)}
    write_json(out / f"{stem}.json", {"meta": meta, "growth": growth, "merging": merging})
    md = ["# MoE growth on Shakespeare, and growth by merging", "", f"Command: `{cmd}`", "",
          f"Machine: {meta['machine']}, 1 torch thread, torch {meta['torch']}; "
          f"{meta['wall_s'] / 60:.1f} min. Settings: {p['steps']} steps of {p['batch']} x {T} "
          f"tokens, LRs {list(p['lrs'])} (best per method), seeds {list(p['seeds'])}; "
          f"2 layers, d_model 64, {p['d_ff']} units per expert. Tokens/s are this machine's.",
          "", "```", text, "```", "", "Growth by merging (Branch-Train-MiX; base -> two FFN "
          "specialists -> grow_by_merging top-2 -> router trained alone):", "", "```", mtext,
          "```", "", targets, ""]
    (out / f"{stem}.md").write_text("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
