"""Event schema (every DESIGN.md field in a written event) and the TensorBoard sink."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from selfgrow.events import GrowthEvent, read_events
from selfgrow.events.tensorboard import TensorBoardSink

DESIGN_FIELDS = {
    "run_id", "seq", "wall_time", "step", "epoch", "experience", "trigger", "action",
    "params_before", "params_after", "flops_per_sample_before", "flops_per_sample_after",
    "preservation", "op_seconds", "optimizer", "lr_after", "schema_version",
}


def _grow_once(log_dir: Path, sinks: list) -> list[GrowthEvent]:
    from selfgrow.control import GrowthController, LossPlateau, Rule, RulePolicy
    from selfgrow.models import build_model
    from selfgrow.models.mlp import MLPConfig

    torch.manual_seed(0)
    model = build_model(MLPConfig(in_features=8, hidden=(4,), n_classes=3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    ctrl = GrowthController(
        model, opt,
        signals=[LossPlateau(window=3, min_rel_drop=0.99, ema=0.0)],
        policy=RulePolicy([Rule("loss_plateau", action="widen", kwargs={"factor": 2.0})],
                          max_growths=1),
        log_dir=str(log_dir), sinks=sinks, probe=x[:8], scalar_every=1,
    )
    for epoch in range(2):
        for _ in range(5):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            ctrl.observe(loss=loss, epoch=epoch, experience=0)
    ctrl.close()
    return [e for e in ctrl.events if e.kind == "growth"]


def test_written_event_has_every_design_field(tmp_path: Path) -> None:
    growths = _grow_once(tmp_path, [])
    assert len(growths) == 1
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    raw = [json.loads(s) for s in lines]
    ev = next(r for r in raw if r["kind"] == "growth")
    assert DESIGN_FIELDS <= set(ev), DESIGN_FIELDS - set(ev)
    assert {"signal", "value", "threshold", "window"} <= set(ev["trigger"])
    assert {"op", "config"} <= set(ev["action"])
    assert {"max_abs", "max_rel", "probe_size", "exact_expected"} <= set(ev["preservation"])
    assert {"migrated", "zero_init", "rule"} <= set(ev["optimizer"])
    assert ev["params_after"] > ev["params_before"]
    assert ev["trigger"]["signal"] == "loss_plateau"
    assert ev["preservation"]["max_abs"] < 1e-5  # Net2WiderNet without noise is exact
    back, bad = read_events(tmp_path / "events.jsonl")
    assert not bad and any(e.kind == "growth" for e in back)


def test_tensorboard_sink_writes_real_event_files(tmp_path: Path) -> None:
    ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    tb = TensorBoardSink(tmp_path / "tb")
    growths = _grow_once(tmp_path, [tb])
    assert growths
    files = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert files
    acc = ea_mod.EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = acc.Tags()
    # a growth's parameter count goes to the one parameter-count tag, at the growth's step
    assert "model/params" in tags["scalars"] and "growth/params" not in tags["scalars"]
    assert "signal/loss_plateau" in tags["scalars"]
    assert any(t.startswith("selfgrow/") for t in tags["scalars"])  # controller scalars
    at_growth = [s.value for s in acc.Scalars("model/params") if s.step == growths[0].step]
    assert growths[0].params_after in at_growth
    assert any("growth" in t for t in tags.get("tensors", []))  # add_text -> tensor summary
    tb.close()
    tb.close()  # idempotent
