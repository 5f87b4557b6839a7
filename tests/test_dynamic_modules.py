"""Avalanche's dynamic modules grow with selfgrow inside a real strategy: a user's
nn.Sequential ending in an IncrementalClassifier (class-incremental: classes added after the
growth read the grown width) and Avalanche's MTSimpleMLP with its MultiHeadClassifier
(task-incremental: heads of new tasks are built at the grown width)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("avalanche")

from avalanche.models import IncrementalClassifier, MTSimpleMLP, MultiHeadClassifier  # noqa: E402
from avalanche.training.plugins import ReplayPlugin  # noqa: E402
from avalanche.training.storage_policy import ExperienceBalancedBuffer  # noqa: E402
from avalanche.training.supervised import Naive  # noqa: E402

from selfgrow.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from selfgrow.continual import GrowthPlugin  # noqa: E402
from selfgrow.continual.benchmarks import build_benchmark  # noqa: E402
from selfgrow.continual.plugin import check_optimizer_matches  # noqa: E402
from selfgrow.control import FixedSchedule, GrowthController  # noqa: E402
from selfgrow.errors import GrowthConfigError, IncompatibleModelError  # noqa: E402


def _run(model: nn.Module, bench: Any, probe_fn: Any, tmp_path: Path) -> tuple[Any, Any, Any]:
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    ctrl = GrowthController(model, opt, policy=FixedSchedule([(10, "widen")]),
                            probe_fn=probe_fn, log_dir=tmp_path / "run")
    gp = GrowthPlugin(ctrl, replay_eval_every=5)
    rp = ReplayPlugin(mem_size=60, storage_policy=ExperienceBalancedBuffer(max_size=60))
    strategy = Naive(model=model, optimizer=opt, criterion=nn.CrossEntropyLoss(),
                     train_mb_size=32, train_epochs=1, plugins=[gp, rp], evaluator=None,
                     eval_every=-1)
    return strategy, ctrl, gp


def _check_growth(strategy: Any, ctrl: Any, gp: Any) -> None:
    growths = [e for e in ctrl.events if e.kind == "growth"]
    assert len(growths) == 1 and growths[0].preservation["max_rel"] <= 1e-5
    check_optimizer_matches(strategy.model, strategy.optimizer)
    ids = [id(p) for g in strategy.optimizer.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids))  # no parameter registered twice
    assert set(ids) == {id(p) for p in strategy.model.parameters()}
    assert 0 in gp.reference_accuracy and gp.last_replay_accuracy


def test_sequential_with_incremental_classifier_grows_then_adds_classes(tmp_path: Path) -> None:
    bench = build_benchmark("split-digits", seed=0, n_experiences=3, flatten=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 8), nn.ReLU(), IncrementalClassifier(8, 2))
    probe = bench.data.x_train[:16]
    strategy, ctrl, gp = _run(model, bench, lambda m: m(probe), tmp_path)
    strategy.train(bench.scenario.train_stream[0])
    assert model[0].out_features > 8  # grown in experience 0
    width = model[0].out_features
    head_bias = model[2].classifier.bias.detach().clone()
    for exp in bench.scenario.train_stream[1:]:
        strategy.train(exp)  # Avalanche's adaptation adds the new classes at the grown width
    assert model[2].classifier.in_features == width
    assert model[2].classifier.out_features == 10
    assert not torch.equal(model[2].classifier.bias[: len(head_bias)], head_bias)  # trained on
    _check_growth(strategy, ctrl, gp)
    assert strategy.model(bench.data.x_test[:4]).shape == (4, 10)
    # a checkpoint rebuilds the grown architecture (IncrementalClassifier included)
    path = save_checkpoint(tmp_path / "ck.pt", model, strategy.optimizer)
    ck = load_checkpoint(path)
    assert isinstance(ck.model[2], IncrementalClassifier)
    model.eval()
    ck.model.eval()
    assert torch.equal(ck.model(bench.data.x_test[:8]), model(bench.data.x_test[:8]))


def test_multi_head_model_grows_and_new_task_heads_follow(tmp_path: Path) -> None:
    bench = build_benchmark("split-digits", seed=0, n_experiences=3, flatten=True,
                            task_incremental=True)
    torch.manual_seed(0)
    model = MTSimpleMLP(input_size=64, hidden_size=8)
    probe = bench.data.x_train[:16]
    t0 = torch.zeros(16, dtype=torch.long)
    strategy, ctrl, gp = _run(model, bench, lambda m: m(probe, t0), tmp_path)
    strategy.train(bench.scenario.train_stream[0])
    width = model.features[0].out_features
    assert width > 8
    for exp in bench.scenario.train_stream[1:]:
        strategy.train(exp)
    assert isinstance(model.classifier, MultiHeadClassifier)
    assert model.classifier.in_features == width
    assert sorted(model.classifier.classifiers) == ["0", "1", "2"]
    for head in model.classifier.classifiers.values():
        assert head.classifier.in_features == width
    _check_growth(strategy, ctrl, gp)
    assert set(gp.reference_accuracy) == {0, 1}  # measured with the task labels
    path = save_checkpoint(tmp_path / "ck.pt", model, strategy.optimizer)
    ck = load_checkpoint(path)
    x, t = bench.data.x_test[:8], torch.full((8,), 2)
    model.eval()
    ck.model.eval()
    assert type(ck.model) is MTSimpleMLP
    assert torch.equal(ck.model(x, t), model(x, t))


def test_refusals_name_the_fix() -> None:
    seq = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), MultiHeadClassifier(4))
    opt = torch.optim.Adam(seq.parameters())
    with pytest.raises(IncompatibleModelError, match="cannot pass task labels.*features"):
        GrowthController(seq, opt, policy=FixedSchedule([(1, "widen")])).grow("widen")
    mt = MTSimpleMLP(input_size=4, hidden_size=4)
    ctrl = GrowthController(mt, torch.optim.Adam(mt.parameters()))
    from selfgrow.continual.probe import CapacityProbe

    with pytest.raises(GrowthConfigError, match="capacity_probe cannot trial a multi-task"):
        GrowthPlugin(ctrl, capacity_probe=CapacityProbe())
