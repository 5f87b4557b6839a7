"""The capacity probe: short trials before an experience decide whether and how to grow."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from selfgrow.continual.probe import CapacityProbe
from selfgrow.errors import GrowthConfigError
from selfgrow.models import build_model
from selfgrow.models.mlp import MLPConfig


@pytest.fixture(scope="module")
def digits() -> Any:
    from selfgrow.data import load_digits

    return load_digits(seed=0, flatten=True)


def _split(d: Any, classes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    keep = torch.isin(d.y_train, torch.tensor(classes))
    return d.x_train[keep], d.y_train[keep]


def _model(width: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    m = build_model(MLPConfig(in_features=64, hidden=(width,), n_classes=10))
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    x = torch.randn(8, 64)
    torch.nn.functional.cross_entropy(m(x), torch.arange(8)).backward()
    opt.step()  # Adam state exists, so the trials must copy and migrate it
    opt.zero_grad()
    return m, opt


def test_probe_leaves_model_optimizer_and_rng_untouched(digits: Any) -> None:
    m, opt = _model(4)
    before = copy.deepcopy(m.state_dict())
    st_before = copy.deepcopy(opt.state_dict())
    rng = torch.get_rng_state()
    probe = CapacityProbe(steps=5, action_kwargs={"widen": {"factor": 2.0}})
    rep = probe.run(m, opt, _split(digits, [4, 5, 6]), _split(digits, [0, 1, 2, 3]))
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    st = opt.state_dict()
    assert st["param_groups"] == st_before["param_groups"]
    for i, s in st["state"].items():
        assert all(torch.equal(v, st_before["state"][i][k]) for k, v in s.items() if
                   torch.is_tensor(v))
    assert [t.action for t in rep.trials] == [None, "widen", "deepen"]
    assert rep.flops > 0 and rep.samples == 3 * 5 * 64
    assert rep.trials[1].params > rep.trials[0].params


def test_probe_is_deterministic(digits: Any) -> None:
    m, opt = _model(4)
    probe = CapacityProbe(steps=5)
    a = probe.run(m, opt, _split(digits, [4, 5, 6]), _split(digits, [0, 1, 2, 3]))
    b = probe.run(m, opt, _split(digits, [4, 5, 6]), _split(digits, [0, 1, 2, 3]))
    assert a.to_dict() == b.to_dict()


def test_probe_recommends_width_for_a_starved_model_and_margin_gates_it(digits: Any) -> None:
    """A 2-unit hidden layer cannot hold 10 digit classes; 8x the width in the same steps
    learns the new ones better without losing the old ones: the probe picks widen. With a
    margin larger than any possible gain (more than 100% accuracy) it recommends nothing."""
    m, opt = _model(2)
    new, old = _split(digits, [5, 6, 7, 8, 9]), _split(digits, [0, 1, 2, 3, 4])
    probe = CapacityProbe(candidates=("widen",), steps=60,
                          action_kwargs={"widen": {"factor": 8.0}})
    rep = probe.run(m, opt, new, old)
    assert rep.choice == "widen", rep.describe()
    assert rep.gain >= 0.05
    assert "capacity probe chose widen" in rep.describe()
    strict = CapacityProbe(candidates=("widen",), steps=60, margin=1.01,
                           action_kwargs={"widen": {"factor": 8.0}})
    rep2 = strict.run(m, opt, new, old)
    assert rep2.choice is None and rep2.gain == pytest.approx(rep.gain)
    assert "no growth" in rep2.describe()


def test_probe_honours_allowed(digits: Any) -> None:
    m, opt = _model(4)
    rep = CapacityProbe(steps=2).run(m, opt, _split(digits, [4, 5]), None, allowed=["deepen"])
    assert [t.action for t in rep.trials] == [None, "deepen"]
    rep = CapacityProbe(steps=2).run(m, opt, _split(digits, [4, 5]), None, allowed=[])
    assert rep.choice is None and len(rep.trials) == 1


@pytest.mark.parametrize("kw, bad", [
    ({"steps": 0}, "steps=0"), ({"candidates": ()}, "candidates"),
    ({"margin": -0.1}, "margin=-0.1"), ({"held_out": 1.0}, "held_out=1.0"),
    ({"batch_size": True}, "batch_size=True"), ({"max_new": 2}, "max_new=2"),
])
def test_probe_rejects_bad_settings(kw: dict[str, Any], bad: str) -> None:
    with pytest.raises(GrowthConfigError, match=bad):
        CapacityProbe(**kw)


def test_probe_inside_growth_plugin_grows_before_an_experience(tmp_path: Any) -> None:
    """Through GrowthPlugin: a probed growth is an event with the capacity_probe trigger and
    the trials in its reason, charged FLOPs, and the model trains on; with max_growths
    reached the probe does not run (no trials, no FLOPs)."""
    pytest.importorskip("avalanche")
    from avalanche.training.plugins import ReplayPlugin
    from avalanche.training.storage_policy import ExperienceBalancedBuffer
    from avalanche.training.supervised import Naive

    from selfgrow.continual import GrowthPlugin
    from selfgrow.continual.benchmarks import build_benchmark
    from selfgrow.control import GrowthController, LossPlateau, Rule, RulePolicy
    from selfgrow.events import read_events

    bench = build_benchmark("split-digits", seed=0, n_experiences=2, flatten=True)
    for max_growths, expect in ((3, True), (0, False)):
        torch.manual_seed(0)
        model = build_model(MLPConfig(in_features=64, hidden=(2,), n_classes=10))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        log = tmp_path / f"log{max_growths}"
        # a plateau rule that never fires within this run: only the probe grows
        ctrl = GrowthController(model, opt, signals=[LossPlateau(window=10_000)],
                                policy=RulePolicy([Rule("loss_plateau", action="widen")],
                                                  max_growths=max_growths),
                                log_dir=str(log))
        probe = CapacityProbe(candidates=("widen",), steps=40,
                              action_kwargs={"widen": {"factor": 8.0}})
        gp = GrowthPlugin(ctrl, replay_eval_every=0, capacity_probe=probe)
        strat = Naive(model=model, optimizer=opt, train_mb_size=32, train_epochs=2,
                      device="cpu", evaluator=None,
                      plugins=[gp, ReplayPlugin(mem_size=100,
                                                storage_policy=ExperienceBalancedBuffer(100))])
        for exp in bench.scenario.train_stream:
            strat.train(exp)
        ctrl.close()
        growths = [e for e in read_events(log / "events.jsonl")[0] if e.kind == "growth"]
        if expect:
            assert len(gp.probe_reports) == 1 and gp.probe_flops > 0
            assert len(growths) == 1, gp.probe_reports
            assert growths[0].trigger["signal"] == "capacity_probe"
            assert "capacity probe chose widen" in growths[0].reason
            assert strat.model.config.hidden == (16,)
            assert len(opt.param_groups[0]["params"]) == len(list(strat.model.parameters()))
        else:
            assert gp.probe_reports == [] and gp.probe_flops == 0.0 and growths == []
