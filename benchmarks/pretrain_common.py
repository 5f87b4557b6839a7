"""Harness shared by ``pretrain_speedup.py`` and ``survey_claims.py``: presets, one run of
``selfgrow.pretrain.grow_and_train`` reduced to the numbers a comparison needs, and the
budget rule (tokens per target parameter).

Every run of one benchmark invocation shares the corpus (Shakespeare, split by play, seed 0),
the validation windows, the tokens per step and the FLOP counter; runs differ only in what is
compared. Evaluation is not counted in training FLOPs.
"""

from __future__ import annotations

import copy
import math
import re
import statistics
from typing import Any

from selfgrow.data import load_shakespeare
from selfgrow.pretrain import budget_for_tokens, flops_to_reach, grow_and_train

#: quick: a smoke-sized comparison (< 10 min on 2 cores); full: the committed result
PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"target": (4, 64, 2, 64), "tokens_per_step": 1024, "tokens_per_param": 3,
              "lrs": (2e-3, 4e-3, 8e-3), "n_evals": 10, "eval_windows": 64},
    "full": {"target": (4, 64, 2, 128), "tokens_per_step": 2048, "tokens_per_param": 30,
             "lrs": (1e-3, 2e-3, 4e-3), "n_evals": 40, "eval_windows": 128},
    # a seconds-long run of the whole harness (tests and debugging; numbers mean nothing)
    "smoke": {"target": (2, 32, 2, 32), "tokens_per_step": 512, "tokens_per_param": 2,
              "lrs": (2e-3, 4e-3, 8e-3), "n_evals": 4, "eval_windows": 8, "ligo_steps": 5},
    # a larger preset for a lent GPU (--device cuda)
    "cuda": {"target": (8, 256, 4, 256), "tokens_per_step": 16384, "tokens_per_param": 20,
             "lrs": (5e-4, 1e-3, 2e-3), "n_evals": 40, "eval_windows": 256},
}


def budget_for(preset: dict[str, Any]) -> dict[str, float]:
    """The preset's FLOP budget (``selfgrow.pretrain.budget_for_tokens``)."""
    return budget_for_tokens(preset["target"], preset["tokens_per_param"],
                             preset["tokens_per_step"])


_CORPUS: dict[int, Any] = {}


def corpus(seed: int = 0) -> Any:
    if seed not in _CORPUS:
        _CORPUS[seed] = load_shakespeare(seed=seed)
    return _CORPUS[seed]


def run_one(preset: dict[str, Any], budget_flops: float, strategy: str, *, seed: int = 0,
            device: str = "cpu", runs_dir: str | None = None, label: str | None = None,
            **kw: Any) -> dict[str, Any]:
    """One ``grow_and_train`` run; returns its summary reduced to the comparison's numbers
    (plus the curve)."""
    args = dict(strategy=strategy, target=preset["target"], budget_flops=budget_flops,
                data=corpus(0), tokens_per_step=preset["tokens_per_step"],
                n_evals=preset["n_evals"], eval_windows=preset["eval_windows"], seed=seed,
                runs_dir=runs_dir, progress=False, device=device,
                name=re.sub(r"[^A-Za-z0-9._-]+", "_", label or strategy).strip("._")
                if runs_dir else None)
    if strategy in ("ligo", "search") and "ligo_steps" in preset:
        args["ligo_steps"] = preset["ligo_steps"]  # the fit must fit a tiny budget
    args.update(kw)
    model_or_config = args.pop("model_or_config", None)
    res = grow_and_train(model_or_config, **args)
    s = res.summary
    return {"label": label or strategy, "strategy": strategy, "seed": seed,
            "kwargs": {k: v for k, v in kw.items() if k != "model_or_config"},
            "start": s["start"], "final_shape": s["final_shape"],
            "final_params": s["final_params"], "final_val_loss": s["final_val_loss"],
            "flops": s["flops"], "flops_overhead": s["flops_overhead"],
            "train_seconds": s["train_seconds"], "wall_seconds": s["wall_seconds_total"],
            "steps": s["steps"], "tokens": s["tokens"],
            "growths": [{k: g.get(k) for k in ("op", "progress", "from", "to", "spike",
                                                "val_loss_before", "val_loss_after",
                                                "preservation", "reason", "trigger",
                                                "ligo")}
                        for g in s["growths"]],
            "search": copy.deepcopy(s.get("search")),
            "curve": [{"flops": r["flops"], "val_loss": r["val_loss"], "step": r["step"],
                       "tokens": r["tokens"], "params": r["params"]} for r in s["curve"]]}


def speedup(run: dict[str, Any], ref_loss: float, ref_budget: float) -> tuple[float | None,
                                                                               float]:
    """(FLOPs needed to reach ``ref_loss`` on the run's validation curve or None, speedup =
    ``ref_budget`` / those FLOPs, or the run's final-loss ratio proxy 0.0 when never
    reached -- reported as "< 1")."""
    f = flops_to_reach(run["curve"], ref_loss)
    return f, (ref_budget / f if f else 0.0)


def mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)
