"""The self-evolving controller end to end: a model that grows and prunes, with prune events
logged, inspected, plotted and checkpointed; the benchmark's run function on a short stream."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from selfgrow import (
    GrowthConfigError,
    GrowthController,
    IdleCapacity,
    Rule,
    RulePolicy,
    build_model,
    load_checkpoint,
    save_checkpoint,
)
from selfgrow.control.signals import Signal
from selfgrow.inspect_run import inspect_main, load_run
from selfgrow.models.mlp import MLPConfig
from selfgrow.ops.net2net import hidden_widths


class Scripted(Signal):
    """Triggered on the steps listed in ``on`` (a test double for a real signal)."""

    name = "scripted"

    def __init__(self, on: set[int], name: str, **state: Any) -> None:
        super().__init__(threshold=0.5, window=1, name=name)
        self.on, self.extra_state = on, state

    def update(self, step: int, metrics: Any) -> None:
        self.value = 1.0 if step in self.on else 0.0
        self.triggered = step in self.on

    def extra(self) -> dict[str, Any]:
        return dict(self.extra_state)


def _mlp(width: int = 8) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(MLPConfig(in_features=6, hidden=(width, width), n_classes=3))


def _controller(model: torch.nn.Module, log_dir: Path | None = None, **pol: Any
                ) -> GrowthController:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    grow = Scripted({3, 20}, "grow_sig")
    prune = Scripted({8, 9, 12, 30}, "idle_sig")
    policy = RulePolicy([Rule("grow_sig", "widen_layers", kwargs=dict(layers=[0, 1], factor=2.0)),
                         Rule("idle_sig", "prune", kwargs=dict(fraction=0.5), direction="prune")],
                        **pol)
    return GrowthController(model, opt, [grow, prune], policy, probe=torch.randn(8, 6),
                            log_dir=str(log_dir) if log_dir else None)


def _train(ctrl: GrowthController, steps: int) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
        loss = F.cross_entropy(ctrl.model(x), y)
        ctrl.optimizer.zero_grad()
        loss.backward()
        ctrl.optimizer.step()
        ctrl.observe(loss=loss)


def test_grow_then_prune_logs_both_kinds_and_inspect_shows_them(tmp_path):
    ctrl = _controller(_mlp(), tmp_path / "run", prune_cooldown=2, hysteresis=4,
                       prune_floor=150)
    _train(ctrl, 32)
    kinds = [(e.kind, e.step) for e in ctrl.events if e.kind in ("growth", "prune")]
    # growth at 3; prune at 8 (5 >= hysteresis 4 after the growth); 9 is in the prune cooldown;
    # 12 would go below the floor; growth at 20; prune at 30
    assert kinds == [("growth", 3), ("prune", 8), ("growth", 20), ("prune", 30)]
    assert ctrl.n_growths == 2 and ctrl.n_prunes == 2
    skipped = {(e.step, e.extra["blocked"]) for e in ctrl.events if e.kind == "skipped"}
    assert (9, "cooldown") in skipped and (12, "floor") in skipped
    prune = next(e for e in ctrl.events if e.kind == "prune")
    assert prune.params_after < prune.params_before
    assert prune.trigger["signal"] == "idle_sig" and "idle_sig triggered" in prune.reason
    assert prune.action["op"] == "remove_units"
    assert prune.preservation["exact_expected"] is False  # live units: the error is measured
    assert prune.preservation["max_abs"] > 0
    ctrl.close()
    out = io.StringIO()
    assert inspect_main(str(tmp_path / "run"), out=out, plot=str(tmp_path / "p.png")) == 0
    text = out.getvalue()
    assert "2 growths, 2 prunes" in text
    assert text.count(" prune ") >= 2 and "remove_units" in text
    rec = load_run(tmp_path / "run")
    assert [e.kind for e in rec.changes] == ["growth", "prune", "growth", "prune"]
    assert (tmp_path / "p.png").stat().st_size > 0
    lines = (tmp_path / "run" / "events.jsonl").read_text().splitlines()
    assert {json.loads(ln)["kind"] for ln in lines} >= {"growth", "prune", "skipped"}


def test_prune_rule_directions_are_checked():
    m = _mlp()
    opt = torch.optim.Adam(m.parameters())
    sig = [Scripted(set(), "s")]
    with pytest.raises(GrowthConfigError, match="removes capacity; use direction='prune'"):
        GrowthController(m, opt, sig, RulePolicy([Rule("s", "prune", kwargs=dict(fraction=0.5))]))
    with pytest.raises(GrowthConfigError, match="does not remove capacity"):
        GrowthController(m, opt, sig, RulePolicy([Rule("s", "widen", direction="prune")]))
    ctrl = GrowthController(m, opt)
    with pytest.raises(GrowthConfigError, match="does not remove capacity"):
        ctrl.prune("widen")
    assert hidden_widths(m) == (8, 8) and not ctrl.events
    ev = ctrl.prune("prune", fraction=0.25)
    assert ev.kind == "prune" and hidden_widths(m) == (6, 6) and ctrl.n_prunes == 1


def test_prune_state_is_checkpointed_and_the_pruned_model_rebuilds(tmp_path):
    ctrl = _controller(_mlp(), hysteresis=4, prune_cooldown=5)
    _train(ctrl, 10)
    assert ctrl.n_prunes == 1 and hidden_widths(ctrl.model) == (8, 8)
    path = save_checkpoint(tmp_path / "c.pt", ctrl.model, ctrl.optimizer, controller=ctrl)
    ck = load_checkpoint(
        path, optimizer_factory=lambda mod: torch.optim.Adam(mod.parameters(), lr=1e-2))
    assert hidden_widths(ck.model) == (8, 8)
    other = _controller(ck.model, hysteresis=4, prune_cooldown=5)
    other.optimizer = ck.optimizer
    ck.restore_controller(other)
    assert (other.n_prunes, other.last_prune_step, other.n_growths) == (1, 8, 1)
    x = torch.randn(4, 6)
    assert torch.equal(ck.model.eval()(x), ctrl.model.eval()(x))


def test_a_state_saved_before_prunes_existed_loads():
    ctrl = _controller(_mlp())
    state = ctrl.state_dict()
    for k in ("n_prunes", "last_prune_step", "last_prune_attempt_step"):
        del state[k]
    ctrl.load_state_dict(state)
    assert ctrl.n_prunes == 0 and ctrl.last_prune_step is None


def test_idle_capacity_drives_a_real_prune_of_dead_units():
    """IdleCapacity finds the units that never fire and the prune removes exactly those; the
    function is unchanged (dead ReLU units contribute nothing)."""
    m = _mlp(12)
    with torch.no_grad():
        m.hidden[0].weight[:5] = 0.0
        m.hidden[0].bias[:5] = -1.0
    opt = torch.optim.SGD(m.parameters(), lr=0.0)  # nothing moves: the dead units stay dead
    sig = IdleCapacity(window=2, threshold=0.1, share=0.0, include=["hidden.0"])
    policy = RulePolicy([Rule("idle_capacity", "prune", from_state={"units": "units"},
                              direction="prune")], max_prunes=1)
    probe = torch.randn(32, 6)
    ctrl = GrowthController(m, opt, [sig], policy, probe=probe)
    before = m.eval()(probe).detach()
    m.train()
    _train(ctrl, 3)
    ev = next(e for e in ctrl.events if e.kind == "prune")
    assert hidden_widths(m) == (7, 12)
    assert ev.trigger["idle_fraction"] == pytest.approx(5 / 12)
    assert ev.preservation["max_abs"] < 1e-6
    assert torch.allclose(m.eval()(probe), before, atol=1e-6)


def test_benchmark_run_on_a_short_stream():
    """The benchmark's run function: grow-and-prune on a short RBF stream grows on the hard
    concept, prunes on the easy one, and counts parameters and FLOPs."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import self_evolving as se
    finally:
        sys.path.pop(0)
    pytest.importorskip("river")
    p = dict(centroids=(50, 2), n_hard=15000, n_easy=6000, n_test=200)
    data = se.stream(p, 0)
    r = se.run("grow-and-prune", se.SMALL, 1e-2, data, 0)
    assert r["growths"] >= 1 and r["prunes"] >= 1, r["changes"]
    assert r["mean_params"] < r["final_params"] or r["final_params"] < se.n_params(se.LARGE)
    assert 0.5 < r["prequential"] <= 1.0 and r["train_flops"] > 0
    fixed = se.run("fixed small", se.SMALL, 1e-2, data, 0)
    assert fixed["growths"] == fixed["prunes"] == 0
    assert fixed["mean_params"] == fixed["final_params"] == se.n_params(se.SMALL)
