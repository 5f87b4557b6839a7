"""The pre-training benchmark harness end to end at its seconds-long ``smoke`` preset: every
row, the targets and the files it writes (the numbers of this preset mean nothing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pretrain_speedup_smoke_writes_its_table(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "pretrain_speedup.py"), "--preset", "smoke",
         "--schedules", "gstack,search", "--seeds", "0,1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((tmp_path / "pretrain_speedup_smoke.json").read_text())
    keys = [r["key"] for r in res["rows"]]
    assert keys[:2] == ["scratch", "fixed_small"] and "gstack" in keys and "search" in keys
    assert len(res["scratch_sweep"]) >= 6  # 3 LRs x {wsd, cosine}, extended at an edge
    assert {r["label"].split()[1] for r in res["scratch_sweep"]} == {"wsd", "cosine"}
    # every run spent the same FLOPs
    budget = res["budget"]["budget_flops"]
    for k, r in res["runs"].items():
        assert budget <= r["flops"] <= 1.1 * budget, k
    assert res["seeds"]["scratch"]["seeds"] == [0, 1]
    md = (tmp_path / "pretrain_speedup_smoke.md").read_text()
    assert "| scratch" in md and "## Targets" in md and "scratch beats the fixed small" in md
    assert (tmp_path / "pretrain_speedup_smoke.png").stat().st_size > 1000
