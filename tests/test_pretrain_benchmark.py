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
         "--schedules", "gstack,ligo,search", "--seeds", "0,1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((tmp_path / "pretrain_speedup_smoke.json").read_text())
    keys = [r["key"] for r in res["rows"]]
    assert keys[:2] == ["scratch", "fixed_small"] and "gstack" in keys and "search" in keys
    assert not any("error" in r for r in res["rows"]), res["rows"]
    assert next(r for r in res["rows"] if r["key"] == "ligo")["final_val_loss"] > 0
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


def test_pretrain_speedup_can_reuse_an_earlier_sweep(tmp_path):
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    script = str(ROOT / "benchmarks" / "pretrain_speedup.py")
    first = subprocess.run([sys.executable, script, "--preset", "smoke", "--schedules", "gstack",
                            "--seeds", "0", "--out", str(tmp_path)],
                           capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    prior = tmp_path / "pretrain_speedup_smoke.json"
    again = subprocess.run([sys.executable, script, "--preset", "smoke", "--schedules", "ligo",
                            "--seeds", "0", "--out", str(tmp_path), "--lrs-from", str(prior),
                            "--stem", "again"],
                           capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    res = json.loads((tmp_path / "again.json").read_text())
    p = json.loads(prior.read_text())
    assert res["lrs_from"] == str(prior) and len(res["scratch_sweep"]) in (1, 2)
    assert res["runs"]["scratch"]["kwargs"] == p["runs"]["scratch"]["kwargs"]
    assert [r["key"] for r in res["rows"]][-1] == "ligo"
    assert "not swept here" in (tmp_path / "again.md").read_text()
    wrong = subprocess.run([sys.executable, script, "--preset", "quick", "--lrs-from", str(prior),
                            "--out", str(tmp_path)],
                           capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert wrong.returncode != 0 and "is for preset 'smoke'" in wrong.stderr
