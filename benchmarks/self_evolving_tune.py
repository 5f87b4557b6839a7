"""Tuning sweep of benchmarks/self_evolving.py's growth and prune settings, on the tuning seed
only (the reported seeds are never used to choose anything).

Growth settings (``LossPlateau`` window and minimum relative drop) are swept for grow-only and
grow-and-prune alike; prune settings (the ablation ladder, the floor width and the loss level
below which pruning is allowed) for grow-and-prune. Each row: prequential accuracy and mean
parameters over the quick stream at LR 1e-2.

Usage::

    PYTHONPATH=. python benchmarks/self_evolving_tune.py    # about 3 minutes, 1 thread

Writes ``benchmarks/results/self_evolving_tune.{md,json}``.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import self_evolving as se  # noqa: E402

from selfgrow.runs.dirs import write_json  # noqa: E402
from selfgrow.runs.summary import format_table  # noqa: E402


def main() -> int:
    torch.set_num_threads(1)
    p = se.PRESETS["quick"]
    seed = p["tune_seed"]
    data = se.stream(p, seed)
    rows: list[dict[str, Any]] = []
    for pw, mrd in ((100, 0.02), (50, 0.05)):
        g = dict(plateau_window=pw, min_rel_drop=mrd)
        r = se.run("grow-only", se.SMALL, 1e-2, data, seed, grow=g)
        rows.append({"method": "grow-only", "grow": g, "prune": None,
                     "prequential": r["prequential"], "mean_params": r["mean_params"]})
        for fr, fw, ml in itertools.product(((0.5, 0.25), (0.25,)), (32, 64), (None, 0.1)):
            pr = dict(fractions=fr, floor_width=fw, max_loss=ml)
            r = se.run("grow-and-prune", se.SMALL, 1e-2, data, seed, grow=g, prune=pr)
            rows.append({"method": "grow-and-prune", "grow": g, "prune": pr,
                         "prequential": r["prequential"], "mean_params": r["mean_params"]})
        print(f"plateau {g} done", flush=True)
    table = format_table(
        ["method", "plateau window / min drop", "fractions / floor width / max_loss",
         "prequential acc", "mean params"],
        [[r["method"], f"{r['grow']['plateau_window']} / {r['grow']['min_rel_drop']}",
          "-" if r["prune"] is None else
          f"{list(r['prune']['fractions'])} / {r['prune']['floor_width']} / "
          f"{r['prune']['max_loss']}", f"{r['prequential']:.4f}", f"{r['mean_params']:,.0f}"]
         for r in rows])
    print(table)
    out = se.RESULTS
    cmd = "PYTHONPATH=. python benchmarks/self_evolving_tune.py"
    write_json(out / "self_evolving_tune.json", {"command": cmd, "seed": seed, "rows": rows})
    (out / "self_evolving_tune.md").write_text(
        f"# Tuning sweep of the self-evolving benchmark (seed {seed} only)\n\nCommand: "
        f"`{cmd}` (LR 1e-2, the quick stream).\n\n```\n{table}\n```\n\nChosen: plateau 50 / "
        f"0.05 (the better of the two for grow-only too), fractions [0.25], floor width 64, "
        f"max_loss 0.1: the highest grow-and-prune accuracy among the settings with a "
        f"loss-level dead band, within 0.1 point of grow-only here.\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
