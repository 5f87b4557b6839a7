"""Kill-and-resume: a growing run SIGKILLed at several seeded points (before the first growth,
between a growth and the next checkpoint, in the middle of writing a checkpoint, after the
last growth) and resumed each time ends bit-identical to an uninterrupted run, with the same
events in events.jsonl, each exactly once."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from selfgrow.events import read_events
from selfgrow.optim import LAZY_INIT_KEY

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKER = HERE / "_resume_worker.py"
STEPS, EVERY = 80, 10
GROWTH_STEPS = (23, 40, 62)  # controller steps; training step s is controller step s + 1
#: fields that legitimately differ between two runs of the same computation
VOLATILE = ("wall_time", "op_seconds")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(HERE), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    return env


def _run(
    run_dir: Path,
    kill_at: tuple[str, int] | None = None,
    extra: list[str] | None = None,
    timeout: float = 60.0,
) -> list[str]:
    """Run the worker; with ``kill_at=("step"|"saving", s)`` SIGKILL it when it reports that
    point. Returns the lines it printed."""
    cmd = [sys.executable, str(WORKER), str(run_dir), "--steps", str(STEPS),
           "--every", str(EVERY), *(extra or [])]
    if kill_at is None:
        out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise AssertionError(f"worker failed:\n{out.stdout}\n{out.stderr}")
        return out.stdout.splitlines()
    proc = subprocess.Popen(
        [*cmd, "--lockstep"], env=_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, bufsize=1,
    )
    lines: list[str] = []
    target = f"{kill_at[0]} {kill_at[1]}"
    try:
        if proc.stdout is None or proc.stdin is None:
            raise AssertionError("no pipes")
        for line in proc.stdout:
            line = line.strip()
            lines.append(line)
            if line == target:
                os.kill(proc.pid, signal.SIGKILL)
                break
            if line.startswith(("step ", "saving ")):
                proc.stdin.write("\n")
                proc.stdin.flush()
        rc = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read() if proc.stderr else ""
    if rc != -signal.SIGKILL:
        raise AssertionError(f"worker was not killed at {target} (rc={rc}):\n{lines}\n{err}")
    return lines


def _events(run_dir: Path) -> list[dict[str, Any]]:
    evs, bad = read_events(run_dir / "events.jsonl")
    assert not bad, bad
    return [{k: v for k, v in e.to_dict().items() if k not in VOLATILE} for e in evs]


def _kill_points(seed: int) -> list[tuple[str, int]]:
    """Seeded kill points in training-step units (s = controller step - 1)."""
    rng = random.Random(seed)
    g1, g2, g3 = (g - 1 for g in GROWTH_STEPS)
    # growth 2 (deepen: brand-new tensors, whose Adam state is set at their first gradient)
    # happens on a checkpoint step; killing the next save resumes from that checkpoint
    if (g2 + 1) % EVERY:
        raise AssertionError("growth 2 must fall on a checkpoint step")
    return [
        ("step", rng.randrange(1, g1)),  # before the first growth
        # after growth 1, before the checkpoint that would include it: its event is rewound
        ("step", rng.randrange(g1, (g1 // EVERY + 1) * EVERY - 1)),
        ("saving", g2 + EVERY),  # mid-save (tmp written, not yet replaced)
        ("step", rng.randrange(g3 + 1, STEPS - 1)),  # after the last growth
    ]


#: the seed of the kill points test_sigkill_and_resume_... really uses
KILL_SEED = 20261129


def _check_kill_points(pts: list[tuple[str, int]]) -> None:
    """The kill points cover the cases of the module docstring (training-step units; the
    checkpoint of step s is written before "step s" is reported)."""
    g1, g2, g3 = (g - 1 for g in GROWTH_STEPS)
    (k0, s0), (k1, s1), (k2, s2), (k3, s3) = pts
    assert (k0, k1, k2, k3) == ("step", "step", "saving", "step"), pts
    assert s0 < EVERY - 1 and s0 < g1, f"first kill {s0} not before any checkpoint / growth"
    next_ck = (g1 // EVERY + 1) * EVERY - 1  # first checkpoint that includes growth 1
    assert g1 <= s1 < next_ck, f"second kill {s1} not between growth 1 and its checkpoint"
    assert (s2 + 1) % EVERY == 0 and s2 > g2, f"mid-save kill {s2} not on a later save"
    assert s3 > g3, f"last kill {s3} not after the last growth"
    assert len(set(pts)) == 4


def test_kill_points_cover_the_required_cases():
    _check_kill_points(_kill_points(KILL_SEED))  # the points the kill test really uses


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("reference")
    assert _run(d)[-1] == "done"
    return d


def test_sigkill_and_resume_is_bitwise_identical_with_same_events(tmp_path, reference):
    run = tmp_path / "killed"
    resumes: list[str] = []
    resumed_runs: list[bool] = []  # per run: did it start from a checkpoint?
    lazy_seen = False
    points = _kill_points(seed=KILL_SEED)
    _check_kill_points(points)
    for point in points:
        lines = _run(run, kill_at=point)
        resumes += [ln for ln in lines if ln.startswith("resumed")]
        resumed_runs.append(any(ln.startswith("resumed") for ln in lines))
        if point[0] == "saving":  # the surviving checkpoint holds not-yet-stepped new tensors
            state = torch.load(run / "ckpt.pt", weights_only=True)["optimizer"]["state"]
            lazy_seen = any(LAZY_INIT_KEY in st for st in state.values())
    assert lazy_seen
    lines = _run(run)
    resumes += [ln for ln in lines if ln.startswith("resumed")]
    resumed_runs.append(any(ln.startswith("resumed") for ln in lines))
    assert lines[-1] == "done"
    # the first kill came before any checkpoint: the second run restarted fresh; every later
    # run resumed from a checkpoint
    assert resumed_runs == [False, False, True, True, True], (resumed_runs, resumes)
    # events logged after a checkpoint were rewound and re-emitted at least once
    assert any(int(r.split()[-1]) > 0 for r in resumes), resumes
    # the mid-save kill left a torn temporary file; a later save of the host cleaned it up
    assert sorted(p.name for p in run.iterdir()) == ["ckpt.pt", "events.jsonl", "final.pt",
                                                     "metrics.jsonl"]
    # the scalar stream was rewound with the events: every row exactly once, as uninterrupted
    assert (run / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()

    ref = torch.load(reference / "final.pt", weights_only=True)
    got = torch.load(run / "final.pt", weights_only=True)
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k  # bitwise

    ev_ref, ev_got = _events(reference), _events(run)
    assert [e["seq"] for e in ev_got] == list(range(len(GROWTH_STEPS)))
    assert [e["step"] for e in ev_got] == list(GROWTH_STEPS)
    assert ev_got == ev_ref


def test_negative_control_resume_without_rng_restore_diverges(tmp_path, reference):
    """The comparison can fail: resuming without the stored RNG states (dropout masks and the
    random unit choice of _tiny_widen) ends with different parameters."""
    run = tmp_path / "no_rng"
    _run(run, kill_at=("step", 12))
    assert _run(run, extra=["--no-rng-restore"])[-1] == "done"
    ref = torch.load(reference / "final.pt", weights_only=True)
    got = torch.load(run / "final.pt", weights_only=True)
    assert any(not torch.equal(ref[k], got[k]) for k in ref)
