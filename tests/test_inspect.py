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


def test_all_shows_why_decisions_were_skipped(run_dir: Path) -> None:
    """G: --all shows each skipped decision's reason and the policy's block reason."""
    p = run_dir / "events.jsonl"
    lines = p.read_text().splitlines()
    ev = json.loads(lines[1])
    ev["reason"] = "replay_forgetting 0.31 > 0.2; cooldown: 60 of 100 steps since last growth"
    ev["extra"] = {"blocked": "cooldown", "n_skipped": 3}
    lines[1] = json.dumps(ev)
    p.write_text("\n".join(lines) + "\n")
    code, out, _ = _run(str(run_dir), include_skipped=True)
    row = next(r for r in out.splitlines() if r.startswith("1 ") and "skipped" in r)
    assert "cooldown: replay_forgetting 0.31 > 0.2; cooldown: 60 of 100 steps" in row
    assert "why skipped" in out
    code, out, _ = _run(str(run_dir), as_json=True, include_skipped=True)
    skipped = [r for r in json.loads(out)["timeline"] if r["kind"] == "skipped"]
    assert skipped[0]["blocked"] == "cooldown" and "60 of 100" in skipped[0]["reason"]
    code, out, _ = _run(str(run_dir))  # without --all: no such column
    assert "why skipped" not in out


def _shared_dir(tmp_path: Path) -> Path:
    """Two runs appended to one log directory, as two GrowthController(log_dir=d) do."""
    from selfgrow.runs import ScalarJsonlSink

    d = tmp_path / "shared"
    sink = JsonlSink(d / "events.jsonl", fsync=False)
    for run_id, steps in (("first", (40, 80)), ("second", (30,))):
        for seq, step in enumerate(steps):
            e = _event(seq, step)
            e.run_id = run_id
            sink.emit(e)
    sink.close()
    for run_id, last in (("first", 500), ("second", 100)):
        m = ScalarJsonlSink(d / "metrics.jsonl", run_id=run_id)
        for s in range(10, last + 1, 10):
            m.log_scalars(s, {"train/loss": 1.0, "model/params": 1000.0})
        m.close()
    return d


def test_shared_log_dir_shows_one_run(tmp_path: Path) -> None:
    """H: inspect names the run id, shows the latest run and lists the others; --run picks
    one; plots never merge runs."""
    from selfgrow.inspect_run import build_figure, load_run

    d = _shared_dir(tmp_path)
    rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert {r["run_id"] for r in rows} == {"first", "second"}  # ScalarJsonlSink(run_id=)
    code, out, err = _run(str(d))
    assert code == 0 and not err
    assert "run id: second" in out and "holds 2 runs" in out and "first" in out
    assert "1 growths" in out
    code, out, _ = _run(str(d), run="first")
    assert "run id: first" in out and "2 growths" in out and "second" in out
    assert _run(str(d), run="latest")[1] == _run(str(d))[1]
    code, out, err = _run(str(d), run="third")
    assert code == 2 and not out and "'third'" in err and "first, latest, second" in err
    doc = json.loads(_run(str(d), as_json=True, run="first")[1])
    assert doc["run_id"] == "first" and doc["other_run_ids"] == ["second"]
    assert {e["run_id"] for e in doc["events"]} == {"first"}
    for run, last in (("first", 500), ("second", 100)):
        rec = load_run(d, run=run)
        assert {r["run_id"] for r in rec.metrics} == {run}
        ax_p, ax_l, _ = build_figure(rec).axes
        assert max(ax_l.lines[0].get_xdata()) == last
        assert max(ax_p.lines[0].get_xdata()) == last
    from selfgrow.cli import main

    assert main(["inspect", str(d), "--run", "first", "--json"]) == 0


def test_rows_without_run_id_in_a_shared_dir_are_not_plotted(tmp_path: Path) -> None:
    d = _shared_dir(tmp_path)
    with open(d / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"step": 9999, "train/loss": 5.0}) + "\n")
    code, out, err = _run(str(d))
    assert code == 0 and "1 metrics.jsonl rows carry no run_id" in err
    from selfgrow.inspect_run import load_run

    assert all(r["step"] != 9999 for r in load_run(d).metrics)


def test_binary_junk_is_escaped(run_dir: Path) -> None:
    """M: a corrupt line's bytes are shown escaped and truncated, never raw."""
    p = run_dir / "events.jsonl"
    junk = b"\x1b[2J\x1b]0;pwned\x07\x00\xff\xfe" + b"A" * 500
    p.write_bytes(p.read_bytes() + junk + b"\n")
    code, out, err = _run(str(run_dir))
    assert code == 0 and "line 4" in err
    assert "\x1b" not in err and "\x00" not in err and "\x07" not in err
    assert "\\x1b[2J" in err and "A" * 100 not in err


def test_plain_controller_log_dir_fills_the_plot_panels(tmp_path: Path) -> None:
    """A plain GrowthController(log_dir=...) writes loss and parameter count (tagged with its
    run id) to metrics.jsonl, so inspect's loss and parameter panels have data."""
    import torch
    import torch.nn.functional as F

    from selfgrow import FixedSchedule, GrowthController, build_model
    from selfgrow.inspect_run import build_figure, load_run
    from selfgrow.models.mlp import MLPConfig

    torch.manual_seed(0)
    model = build_model(MLPConfig(in_features=8, hidden=(4,), n_classes=3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctrl = GrowthController(model, opt, policy=FixedSchedule([(20, "widen")]),
                            log_dir=str(tmp_path), run_id="plain", scalar_every=5)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    for _ in range(40):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        ctrl.observe(loss=loss)
    ctrl.close()
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(r["run_id"] == "plain" for r in rows)
    assert all("train/loss" in r and "model/params" in r for r in rows)
    assert rows[-1]["model/params"] > rows[0]["model/params"]  # the growth at step 20
    ax_p, ax_l, _ = build_figure(load_run(tmp_path)).axes
    assert max(ax_p.lines[0].get_xdata()) == 40 and len(ax_l.lines[0].get_xdata()) == 8
