"""Bad inputs to public functions get the project's own error naming the bad value (found by
a new user trying the product; each raised a raw TypeError / AttributeError / OSError)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from selfgrow import (
    FixedSchedule,
    GrowthController,
    LossPlateau,
    Rule,
    RulePolicy,
    build_model,
    list_actions,
    read_events,
    save_checkpoint,
)
from selfgrow.errors import (
    CheckpointError,
    EventFormatError,
    GrowthConfigError,
    IncompatibleModelError,
    IncompatibleOptimizerError,
)
from selfgrow.models.mlp import MLPConfig


def _mlp() -> torch.nn.Module:
    return build_model(MLPConfig(in_features=8, hidden=(4,), n_classes=3))


def test_controller_arguments():
    m = _mlp()
    with pytest.raises(GrowthConfigError, match=r"signals=\[signal\]"):
        GrowthController(m, None, signals=LossPlateau(window=5))  # type: ignore[arg-type]
    with pytest.raises(GrowthConfigError, match="'loss_plateau'"):
        GrowthController(m, None, signals=["loss_plateau"])  # type: ignore[list-item]
    with pytest.raises(GrowthConfigError, match="log_dir must be a directory path"):
        GrowthController(m, None, log_dir=5)  # type: ignore[arg-type]


def test_log_dir_that_is_a_file(tmp_path: Path):
    f = tmp_path / "a_file"
    f.write_text("x")
    with pytest.raises(GrowthConfigError, match="not a directory"):
        GrowthController(_mlp(), None, log_dir=str(f))


@pytest.mark.parametrize("loss", ["high", torch.ones(3), [1.0]])
def test_observe_rejects_a_loss_that_is_not_one_number(loss):
    ctrl = GrowthController(_mlp(), None)
    ctrl.observe(loss=1.0)
    with pytest.raises(GrowthConfigError, match="loss must be"):
        ctrl.observe(loss=loss)
    assert ctrl.step == 1  # a refused report is not a step
    ctrl.observe(loss=1.0)
    assert ctrl.step == 2


def test_an_optimizer_of_another_model_is_refused_at_construction():
    m, other = _mlp(), _mlp()
    with pytest.raises(IncompatibleOptimizerError, match="holds none of the model's"):
        GrowthController(m, torch.optim.Adam(other.parameters()))
    GrowthController(m, torch.optim.Adam(m.parameters()))  # its own optimizer is fine


def test_a_signal_belongs_to_one_live_controller():
    sig = LossPlateau(window=5)
    first = GrowthController(_mlp(), None, signals=[sig])
    with pytest.raises(GrowthConfigError, match="already belongs to another GrowthController"):
        GrowthController(_mlp(), None, signals=[sig])
    first.close()  # released: another controller may take it
    GrowthController(_mlp(), None, signals=[sig])


def test_signal_arguments_of_the_wrong_type_say_so():
    with pytest.raises(GrowthConfigError, match="window must be an integer, got str"):
        LossPlateau(window="a")  # type: ignore[arg-type]
    with pytest.raises(GrowthConfigError, match="window=0 is out of range"):
        LossPlateau(window=0)


def test_policies_and_actions():
    with pytest.raises(GrowthConfigError, match=r"RulePolicy\(\[rule\]\)"):
        RulePolicy(Rule("loss_plateau", "widen"))  # type: ignore[arg-type]
    with pytest.raises(GrowthConfigError, match="kwargs must be a dict"):
        FixedSchedule([(5, "widen", 3)])
    m = _mlp()
    ctrl = GrowthController(m, torch.optim.SGD(m.parameters(), lr=0.1))
    with pytest.raises(GrowthConfigError, match="factor='2'"):
        ctrl.grow("widen", factor="2")
    with pytest.raises(GrowthConfigError, match="unexpected keyword.*valid arguments: .*factor"):
        ctrl.grow("widen", position=99)
    with pytest.raises(GrowthConfigError, match="make_config"):
        ctrl.grow({"op": "net2wider"})  # type: ignore[arg-type]
    with pytest.raises(IncompatibleModelError, match="'mlp'"):
        list_actions("mlp")  # type: ignore[arg-type]


def test_events_and_checkpoints(tmp_path: Path):
    for bad in (tmp_path / "missing.jsonl", tmp_path, None):
        with pytest.raises(EventFormatError):
            read_events(bad)  # type: ignore[arg-type]
    m = _mlp()
    with pytest.raises(CheckpointError, match="is a directory"):
        save_checkpoint(tmp_path, m)


def test_plugin_and_benchmarks():
    pytest.importorskip("avalanche")
    from selfgrow.continual import GrowthPlugin
    from selfgrow.continual.benchmarks import build_benchmark, permuted_domain_incremental

    with pytest.raises(GrowthConfigError, match="GrowthController"):
        GrowthPlugin("ctrl")
    ctrl = GrowthController(_mlp(), None)
    with pytest.raises(GrowthConfigError, match="held_per_experience=-1"):
        GrowthPlugin(ctrl, held_per_experience=-1)
    with pytest.raises(GrowthConfigError, match="replay_eval_every='5'"):
        GrowthPlugin(ctrl, replay_eval_every="5")  # type: ignore[arg-type]
    with pytest.raises(GrowthConfigError, match="ClassificationData"):
        permuted_domain_incremental("digits", 2)  # type: ignore[arg-type]
    with pytest.raises(GrowthConfigError, match="n_experiences='5'"):
        build_benchmark("split-digits", n_experiences="5")  # type: ignore[arg-type]


def test_a_probe_that_cannot_run_fails_at_construction():
    with pytest.raises(IncompatibleModelError, match="the probe does not run"):
        GrowthController(_mlp(), None, probe=torch.randn(2, 7))  # the model takes 8 features
