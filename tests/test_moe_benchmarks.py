"""The MoE benchmarks end to end: ``moe_growth.py`` at its seconds-long ``smoke`` preset
(every row, the targets and the files; the numbers of this preset mean nothing), the
dispatch benchmark's measurement, and (slow) growth by merging on two real corpora."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_moe_growth_smoke_writes_its_tables(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "moe_growth.py"), "--preset", "smoke",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((tmp_path / "moe_growth_smoke.json").read_text())
    assert set(res["growth"]) == {"fixed", "grown", "upcycled", "drop_upcycled",
                                  "dense_active", "dynamic_k", "top_any"}
    up = res["growth"]["upcycled"]["runs"][0]
    assert up["experts"] == [8, 8] and up["flops"] > 0
    assert res["growth"]["dense_active"]["runs"][0]["experts"] == []
    assert "merged (BTX, top-2)" in res["merging"]
    md = (tmp_path / "moe_growth_smoke.md").read_text()
    assert "Targets:" in md and "merged within 5%" in md


def test_moe_dispatch_measure_reports_a_ratio() -> None:
    import moe_dispatch

    r = moe_dispatch.measure(16, 32, 4, 2, 64, reps=1, steps=1)
    assert r["ratio"] > 0 and r["active_params_per_token"]["moe"] > 0
    assert set(r["tokens_per_s"]) == {"moe", "dense"}


@pytest.mark.slow
def test_merged_model_is_within_5_percent_of_each_specialist() -> None:
    """Branch-Train-MiX on Shakespeare and Python source (the benchmark's quick settings):
    each specialist is far worse on the other corpus, the merged model within 5% of the
    specialist on each."""
    import moe_growth

    from selfgrow.data.text import load_python_stdlib, load_shakespeare

    res = moe_growth.run_merging(moe_growth.PRESETS["quick"], load_shakespeare(),
                                 load_python_stdlib(), lambda s: None)
    sh, py = res["shakespeare specialist"], res["python specialist"]
    assert sh["python"] > 1.1 * py["python"] and py["shakespeare"] > 1.1 * sh["shakespeare"]
    assert max(res["ratio"].values()) <= 1.05, res
