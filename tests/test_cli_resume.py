"""``selfgrow run``: an interrupted run is marked incomplete and ``--resume`` continues it
from its per-experience checkpoint, ending as the uninterrupted run does."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("avalanche")

from selfgrow.cli import main  # noqa: E402
from selfgrow.continual.runner import RunSpec, resume_experiment, run_experiment  # noqa: E402
from selfgrow.inspect_run import inspect_main  # noqa: E402


def _spec(**kw: Any) -> RunSpec:
    # growth fires early and often, so the architecture at the interruption is a grown one
    base: dict[str, Any] = {"benchmark": "split-digits", "epochs": 1, "baselines": False,
                            "plateau_window": 5, "plateau_min_rel_drop": 0.5, "cooldown": 5}
    return RunSpec(**{**base, **kw})


def _quiet(_: str) -> None:
    pass


def _stop_after(variant: str, exp_id: int) -> Any:
    def cb(v: str, seed: int, i: int) -> None:
        if v == variant and i == exp_id:
            raise KeyboardInterrupt
    return cb


def _events(d: Path) -> list[tuple[Any, ...]]:
    return [(e["kind"], e["step"], e["experience"], e["params_after"], e["run_id"])
            for e in map(json.loads, (d / "events.jsonl").read_text().splitlines())]


def test_interrupted_run_is_incomplete_and_resumes_identically(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = _spec()
    full, s_full = run_experiment(spec, tmp_path, "full", print_fn=_quiet, progress=False)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(spec, tmp_path, "cut", print_fn=_quiet, progress=False,
                       after_experience=_stop_after("grown", 1))
    cut = tmp_path / "cut"
    assert json.loads((cut / "status.json").read_text())["status"] == "interrupted"
    assert not (cut / "summary.json").exists()
    grown_at_cut = [e for e in _events(cut) if e[0] == "growth"]
    assert grown_at_cut and grown_at_cut[-1][3] > 610  # the checkpoint holds a grown model
    out = io.StringIO()
    assert inspect_main(str(cut), out=out, err=io.StringIO()) == 0
    assert "INCOMPLETE" in out.getvalue() and f"run --resume {cut}" in out.getvalue()
    # resume through the CLI: exit 0, continues with experience 3 (id 2), nothing repeated
    capsys.readouterr()
    assert main(["run", "--resume", str(cut), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "(resumed)" in printed and "exp 3/5" in printed and "exp 2/5" not in printed
    s_cut = json.loads((cut / "summary.json").read_text())
    a, b = s_full["variants"]["grown"], s_cut["variants"]["grown"]
    for key in ("accuracy_matrix", "final_avg_accuracy", "avg_forgetting", "final_params",
                "n_growths", "train_flops", "final_model_config"):
        assert a[key] == b[key], key
    strip = [e[:4] for e in _events(full)]
    assert [e[:4] for e in _events(cut)] == strip and {e[4] for e in _events(cut)} == {"cut"}
    metrics = [json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines()]
    full_metrics = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("kind")) for r in metrics] == [
        (r["step"], r.get("kind")) for r in full_metrics]
    assert json.loads((cut / "status.json").read_text())["status"] == "complete"
    out = io.StringIO()
    assert inspect_main(str(cut), out=out, err=io.StringIO()) == 0
    assert "INCOMPLETE" not in out.getvalue()
    assert main(["run", "--resume", str(cut)]) == 2  # complete now: nothing to resume


def test_resume_in_a_baseline_keeps_finished_variants(tmp_path: Path) -> None:
    """Interrupted in fixed_small: the grown result is kept, fixed_small continues, and
    fixed_grown is built from the grown run's final config."""
    spec = _spec(baselines=True, max_growths=1)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(spec, tmp_path, "b", print_fn=_quiet, progress=False,
                       after_experience=_stop_after("fixed_small", 2))
    state = json.loads((tmp_path / "b" / "resume" / "state.json").read_text())
    grown = state["completed"]["0"]["grown"]
    _, s = resume_experiment(tmp_path / "b", print_fn=_quiet, progress=False)
    v = s["variants"]
    assert v["grown"]["accuracy_matrix"] == grown["accuracy_matrix"]
    assert len(v["fixed_small"]["accuracy_matrix"]) == 5
    assert v["fixed_small"]["final_params"] == v["grown"]["initial_params"]
    assert v["fixed_grown"]["final_model_config"] == v["grown"]["final_model_config"]


def test_a_stateful_strategy_restarts_its_interrupted_variant(tmp_path: Path) -> None:
    """EWC's saved weights and importances are not in the checkpoint: resuming mid-variant
    says so and retrains that variant from its first experience, ending as an uninterrupted
    run does (never continuing with a silently empty regulariser)."""
    spec = _spec(strategy="ewc", max_growths=1)
    _, s_full = run_experiment(spec, tmp_path, "full", print_fn=_quiet, progress=False)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(spec, tmp_path, "cut", print_fn=_quiet, progress=False,
                       after_experience=_stop_after("grown", 2))
    said: list[str] = []
    _, s = resume_experiment(tmp_path / "cut", print_fn=said.append, progress=False)
    assert any("restarts from its first experience" in x for x in said), said
    a, b = s_full["variants"]["grown"], s["variants"]["grown"]
    for key in ("accuracy_matrix", "final_params", "n_growths", "final_model_config"):
        assert a[key] == b[key], key
