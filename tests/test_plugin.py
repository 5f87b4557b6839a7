"""GrowthPlugin inside a real Avalanche strategy on scikit-learn's 8x8 digits."""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("avalanche")

from avalanche.training.plugins import ReplayPlugin  # noqa: E402
from avalanche.training.storage_policy import ExperienceBalancedBuffer  # noqa: E402
from avalanche.training.supervised import Naive  # noqa: E402

from selfgrow.continual import GrowthPlugin  # noqa: E402
from selfgrow.continual.benchmarks import build_benchmark  # noqa: E402
from selfgrow.continual.plugin import check_optimizer_matches  # noqa: E402


@pytest.fixture(scope="module")
def bench() -> Any:
    return build_benchmark("split-digits", seed=0, n_experiences=2)


def _controller(model: torch.nn.Module, opt: torch.optim.Optimizer, probe: torch.Tensor) -> Any:
    from selfgrow.control import GrowthController, LossPlateau, ReplayForgetting, Rule, RulePolicy

    return GrowthController(
        model, opt,
        signals=[
            ReplayForgetting(threshold=0.05),
            # fires as soon as its window is full: the test wants a growth, not a judgement
            LossPlateau(window=5, min_rel_drop=0.99, ema=0.0),
        ],
        policy=RulePolicy(
            [Rule("replay_forgetting", action="widen", kwargs={"factor": 1.5}),
             Rule("loss_plateau", action="widen", kwargs={"factor": 2.0})],
            cooldown=8, max_growths=3,
        ),
        probe=probe,
    )


class _StateWatch:
    """Wraps controller.observe: snapshots the Adam state of ``head.bias`` (untouched by
    widening the hidden layer) before each call and compares it after a growth."""

    def __init__(self, ctrl: Any) -> None:
        self.ctrl = ctrl
        self.checked = 0
        self._observe = ctrl.observe
        ctrl.observe = self.observe

    def observe(self, **kw: Any) -> Any:
        named = dict(self.ctrl.model.named_parameters())
        st = self.ctrl.optimizer.state.get(named["head.bias"], {})
        before = {k: v.clone() for k, v in st.items() if torch.is_tensor(v)}
        ev = self._observe(**kw)
        if ev is not None and ev.kind == "growth" and before:
            after_p = dict(self.ctrl.model.named_parameters())["head.bias"]
            after = self.ctrl.optimizer.state[after_p]
            for k, v in before.items():
                assert torch.equal(after[k], v), k
            self.checked += 1
        return ev


@pytest.mark.parametrize("order", ["growth_first", "replay_first"])
def test_plugin_grows_inside_replay_strategy(bench: Any, order: str) -> None:
    from selfgrow.models import build_model
    from selfgrow.models.mlp import MLPConfig

    torch.manual_seed(0)
    model = build_model(MLPConfig(in_features=64, hidden=(8,), n_classes=10))
    n0 = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    ctrl = _controller(model, opt, bench.data.x_train[:16])
    watch = _StateWatch(ctrl)
    gp = GrowthPlugin(ctrl, replay_eval_every=5)
    rp = ReplayPlugin(mem_size=100, storage_policy=ExperienceBalancedBuffer(max_size=100))
    plugins = [gp, rp] if order == "growth_first" else [rp, gp]
    strategy = Naive(
        model=model, optimizer=opt, criterion=torch.nn.CrossEntropyLoss(),
        train_mb_size=32, train_epochs=1, eval_mb_size=256, plugins=plugins, evaluator=None,
        eval_every=-1,
    )
    for exp in bench.scenario.train_stream:
        strategy.train(exp)
        # invariant after every experience (and after make_optimizer ran again)
        check_optimizer_matches(strategy.model, strategy.optimizer)
    growths = [e for e in ctrl.events if e.kind == "growth"]
    assert growths, "no growth event"
    assert gp.events == [e for e in growths if e in gp.events] and gp.events
    assert strategy.model is ctrl.model
    assert sum(p.numel() for p in strategy.model.parameters()) > n0
    assert strategy.optimizer is opt and ctrl.optimizer is opt  # edited in place
    assert strategy.optimized_param_id == dict(strategy.model.named_parameters())
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in strategy.model.parameters()}
    assert watch.checked >= 1  # Adam state of an untouched parameter survived a growth
    # replay accuracy was measured on experience 0's buffer samples, with a reference
    assert 0 in gp.reference_accuracy and 0 in gp.last_replay_accuracy
    # a grown model still trains: every parameter got a finite gradient-driven state
    for p in strategy.model.parameters():
        assert torch.isfinite(p).all()


def test_plugin_without_replay_keeps_its_own_samples(bench: Any) -> None:
    from selfgrow.models import build_model
    from selfgrow.models.mlp import MLPConfig

    torch.manual_seed(1)
    model = build_model(MLPConfig(in_features=64, hidden=(8,), n_classes=10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ctrl = _controller(model, opt, bench.data.x_train[:16])
    gp = GrowthPlugin(ctrl, replay_eval_every=5, held_per_experience=50)
    strategy = Naive(
        model=model, optimizer=opt, criterion=torch.nn.CrossEntropyLoss(),
        train_mb_size=32, train_epochs=1, plugins=[gp], evaluator=None, eval_every=-1,
    )
    for exp in bench.scenario.train_stream:
        strategy.train(exp)
        strategy.eval(bench.scenario.test_stream[:1])  # eval adapts the model: no growth
    check_optimizer_matches(strategy.model, strategy.optimizer)
    assert 0 in gp.reference_accuracy
    assert gp.step == ctrl.step
    fresh = GrowthPlugin(ctrl)
    fresh.load_state_dict(gp.state_dict())
    assert fresh.state_dict()["reference_accuracy"] == gp.reference_accuracy
    assert fresh.step == gp.step and set(fresh._held) == set(gp._held)


def test_negative_control_stale_param_map_duplicates_parameters(bench: Any) -> None:
    """Without refreshing strategy.optimized_param_id, Avalanche's next make_optimizer adds
    the grown tensors a second time: the invariant checked above really is at stake."""
    from selfgrow.errors import GrowthConfigError
    from selfgrow.models import build_model
    from selfgrow.models.mlp import MLPConfig

    class StalePlugin(GrowthPlugin):
        def _refresh_param_map(self, strategy: Any) -> None:
            pass

    torch.manual_seed(0)
    model = build_model(MLPConfig(in_features=64, hidden=(8,), n_classes=10))
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    gp = StalePlugin(_controller(model, opt, bench.data.x_train[:16]), replay_eval_every=5)
    strategy = Naive(
        model=model, optimizer=opt, criterion=torch.nn.CrossEntropyLoss(),
        train_mb_size=32, train_epochs=1, plugins=[gp], evaluator=None, eval_every=-1,
    )
    for exp in bench.scenario.train_stream:
        strategy.train(exp)
    assert gp.events
    with pytest.raises(GrowthConfigError, match="more than once"):
        check_optimizer_matches(strategy.model, strategy.optimizer)
