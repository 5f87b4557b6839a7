"""``selfgrow inspect``: timeline, --json, --plot, corrupt lines, missing directory."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from selfgrow.events import GrowthEvent, JsonlSink
from selfgrow.inspect_run import inspect_main


def _event(seq: int, step: int, kind: str = "growth") -> GrowthEvent:
    return GrowthEvent(
        kind=kind, run_id="r", seq=seq, wall_time=1.0, step=step, epoch=0, experience=seq,
        trigger={"signal": "replay_forgetting", "value": 0.31, "threshold": 0.2, "window": 2},
        action={"name": "widen", "op": "net2wider",
                "config": {"type": "Net2WiderConfig", "version": 1,
                           "data": {"layer": 0, "new_width": 16 * (seq + 2)}}},
        params_before=1000 * (seq + 1), params_after=1000 * (seq + 2),
        preservation={"max_abs": 1e-7, "max_rel": 2e-8, "probe_size": 64,
                      "exact_expected": True},
    )


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    d = tmp_path / "run"
    sink = JsonlSink(d / "events.jsonl", fsync=False)
    sink.emit(_event(0, 40))
    sink.emit(_event(1, 90, kind="skipped"))
    sink.emit(_event(2, 150))
    sink.close()
    rows = [{"step": s, "train/loss": 2.0 / s, "selfgrow/n_params": 1000.0} for s in range(1, 200)]
    rows.append({"kind": "eval", "step": 100, "experience": 0, "accuracy": [0.9, 0.0]})
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    summary = {
        "benchmark": {"name": "split-digits", "n_experiences": 2},
        "strategy": "replay", "model": "mlp", "lr": 1e-3, "epochs": 1,
        "data_source": {"dataset": "digits", "package": "scikit-learn", "version": "1.9.1"},
        "variants": {
            "grown": {"final_avg_accuracy": 0.8, "avg_forgetting": 0.1, "initial_params": 1000,
                      "final_params": 4000, "train_flops": 1e9, "wall_seconds": 2.0,
                      "n_growths": 2, "avg_accuracy_per_exp": [0.9, 0.8]},
        },
    }
    (d / "summary.json").write_text(json.dumps(summary))
    return d


def _run(*args: str, **kw: object) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = inspect_main(*args, out=out, err=err, **kw)  # type: ignore[arg-type]
    return code, out.getvalue(), err.getvalue()


def test_timeline_and_summary(run_dir: Path) -> None:
    code, out, err = _run(str(run_dir))
    assert code == 0 and not err
    assert "2 growths, 1 skipped" in out
    assert "replay_forgetting" in out and "net2wider(layer=0, new_width=32)" in out
    assert "1,000 -> 2,000" in out and "0.31 (0.2)" in out
    assert "final avg acc" in out and "scikit-learn 1.9.1" in out
    code, out_all, _ = _run(str(run_dir), include_skipped=True)
    assert "skipped" in out_all.split("growth timeline")[1]


def test_json(run_dir: Path) -> None:
    code, out, _ = _run(str(run_dir), as_json=True)
    doc = json.loads(out)
    assert code == 0
    assert [r["step"] for r in doc["timeline"]] == [40, 150]
    assert doc["timeline"][0]["signal"] == "replay_forgetting"
    assert doc["summary"]["variants"]["grown"]["final_params"] == 4000
    assert doc["bad_lines"] == []


def test_plot_writes_png(run_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    png = tmp_path / "out" / "g.png"
    code, out, _ = _run(str(run_dir), plot=str(png))
    assert code == 0 and png.is_file()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000


def test_corrupt_lines_are_named_and_rest_shown(run_dir: Path) -> None:
    p = run_dir / "events.jsonl"
    text = p.read_text().splitlines()
    text.insert(1, "{not json")
    text.append(text[0][: len(text[0]) // 2])  # truncated last line (crash mid-write)
    p.write_text("\n".join(text))
    code, out, err = _run(str(run_dir))
    assert code == 0
    assert "line 2" in err and f"line {len(text)}" in err
    assert "2 growths" in out  # the good events are still there


def test_missing_dir_exit_2(tmp_path: Path) -> None:
    code, out, err = _run(str(tmp_path / "nope"))
    assert code == 2 and "does not exist" in err and not out


def test_cli_inspect_entry(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from selfgrow.cli import main

    assert main(["inspect", str(run_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["timeline"]
    assert main(["inspect", str(run_dir.parent / "missing")]) == 2


@pytest.mark.parametrize("name", ["x.txt", "x", "missing/dir/x.png"])
def test_bad_plot_path_exit_2_writes_nothing(run_dir: Path, tmp_path: Path, name: str) -> None:
    out_dir = tmp_path / "plots"
    out_dir.mkdir()
    code, out, err = _run(str(run_dir), plot=str(out_dir / name))
    assert code == 2 and not out
    assert len(err.strip().splitlines()) == 1 and "--plot" in err
    assert list(out_dir.iterdir()) == []  # missing directories are not created
    if name.endswith(".png"):
        assert "does not exist" in err
    else:
        assert ".png, .pdf, .svg" in err


def test_plot_into_unwritable_place_exit_2(run_dir: Path) -> None:
    if not Path("/proc/self").exists():
        pytest.skip("needs Linux /proc")
    code, out, err = _run(str(run_dir), plot="/proc/x.png")
    assert code == 2 and not out and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "/proc/x.png" in err


@pytest.mark.parametrize("suffix", [".pdf", ".svg"])
def test_plot_other_formats(run_dir: Path, tmp_path: Path, suffix: str) -> None:
    f = tmp_path / f"g{suffix}"
    assert _run(str(run_dir), plot=str(f))[0] == 0 and f.stat().st_size > 1000


def test_not_a_run_dir_exit_2(tmp_path: Path) -> None:
    (tmp_path / "other.txt").write_text("x")
    code, out, err = _run(str(tmp_path))
    assert code == 2 and not out
    assert "not a selfgrow run directory (no events.jsonl, summary.json or config.json)" in err
    from selfgrow.cli import main

    assert main(["inspect", str(tmp_path)]) == 2


def test_events_only_dir_and_its_plot(tmp_path: Path) -> None:
    """A plain GrowthController log_dir (events.jsonl only) is a run: the plot says there is
    no accuracy data and the parameter line reaches the last event, not the last growth."""
    from selfgrow.inspect_run import build_figure, load_run

    d = tmp_path / "ctrl"
    sink = JsonlSink(d / "events.jsonl", fsync=False)
    sink.emit(_event(0, 40))
    sink.emit(_event(1, 300, kind="skipped"))
    sink.close()
    code, out, err = _run(str(d))
    assert code == 0 and "1 growths" in out and not err
    fig = build_figure(load_run(d))
    ax_p, _, ax_a = fig.axes
    assert "no accuracy data was recorded" in ax_a.get_title()
    assert max(ax_p.lines[0].get_xdata()) == 300
    png = tmp_path / "g.png"
    assert _run(str(d), plot=str(png))[0] == 0 and png.is_file()
