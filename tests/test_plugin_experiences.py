"""GrowthPlugin tracks forgetting by the experience a sample came from, and never moves the
global random stream (a run with growth disabled is bitwise identical to one without it)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("avalanche")

from avalanche.core import SupervisedPlugin  # noqa: E402
from avalanche.training.plugins import ReplayPlugin  # noqa: E402
from avalanche.training.storage_policy import (  # noqa: E402
    ClassBalancedBuffer,
    ExperienceBalancedBuffer,
    ParametricBuffer,
)
from avalanche.training.supervised import Naive  # noqa: E402

from selfgrow import build_model  # noqa: E402
from selfgrow.continual import GrowthPlugin  # noqa: E402
from selfgrow.continual.benchmarks import (  # noqa: E402
    build_benchmark,
    permuted_domain_incremental,
)
from selfgrow.control import (  # noqa: E402
    GrowthController,
    LossPlateau,
    ReplayForgetting,
    Rule,
    RulePolicy,
)
from selfgrow.data import load_dataset  # noqa: E402
from selfgrow.models.mlp import MLPConfig  # noqa: E402


@pytest.fixture(scope="module")
def permuted() -> Any:
    return permuted_domain_incremental(load_dataset("digits", seed=0), n_experiences=3, seed=0)


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(MLPConfig(in_features=64, hidden=(32,), n_classes=10))


class _Watch(SupervisedPlugin):
    """After every update: the plugin's latest per-experience accuracy and the signal."""

    def __init__(self, gp: GrowthPlugin) -> None:
        super().__init__()
        self.gp = gp
        self.keys_per_exp: dict[int, set[int]] = {}
        self.fired: list[tuple[int, Any]] = []

    def after_update(self, strategy: Any, **kwargs: Any) -> None:
        e = self.gp._exp_id
        self.keys_per_exp.setdefault(e, set()).update(self.gp.last_replay_accuracy)
        sig = self.gp.controller.signals[0]
        if sig.triggered:
            self.fired.append((e, sig.extra()["worst_experience"]))


def _run_domain(bench: Any, storage_policy: Any | None) -> tuple[GrowthPlugin, _Watch]:
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ctrl = GrowthController(model, opt, signals=[ReplayForgetting(threshold=0.15)])
    gp = GrowthPlugin(ctrl, replay_eval_every=5)
    watch = _Watch(gp)
    plugins: list[Any] = [gp, watch]
    if storage_policy is not None:
        plugins.append(ReplayPlugin(mem_size=storage_policy.max_size,
                                    storage_policy=storage_policy))
    strategy = Naive(model=model, optimizer=opt, criterion=torch.nn.CrossEntropyLoss(),
                     train_mb_size=64, train_epochs=2, device="cpu", plugins=plugins,
                     evaluator=None)
    for exp in bench.scenario.train_stream:
        strategy.train(exp)
    return gp, watch


def test_domain_incremental_forgetting_of_the_first_experience_fires(permuted):
    """Every experience holds every class: the old class -> experience bucketing put every
    sample in experience 0's bucket and never saw experience 1; the signal never fired."""
    gp, watch = _run_domain(permuted, storage_policy=None)
    assert watch.keys_per_exp[1] == {0}
    assert watch.keys_per_exp[2] == {0, 1}, "replay accuracy missing for a past experience"
    assert set(gp.reference_accuracy) == {0, 1}
    assert gp.reference_accuracy[0] > 0.8
    assert any(e == 1 and worst == 0 for e, worst in watch.fired), watch.fired[:5]


@pytest.mark.parametrize("policy", ["experience_balanced", "parametric_experience",
                                    "class_balanced"])
def test_every_past_experience_is_measured_whatever_the_buffer(permuted, policy):
    sp = {
        "experience_balanced": lambda: ExperienceBalancedBuffer(max_size=300),
        "parametric_experience": lambda: ParametricBuffer(max_size=300, groupby="experience"),
        # grouped by class: no experience information, the plugin holds its own samples
        "class_balanced": lambda: ClassBalancedBuffer(max_size=300),
    }[policy]()
    gp, watch = _run_domain(permuted, storage_policy=sp)
    assert watch.keys_per_exp[2] == {0, 1}
    assert set(gp.reference_accuracy) == {0, 1}


def _digits_run(with_plugin: bool, replay: bool) -> dict[str, torch.Tensor]:
    bench = build_benchmark("split-digits", seed=0, n_experiences=2)
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    plugins: list[Any] = []
    if with_plugin:
        ctrl = GrowthController(
            model, opt,
            signals=[ReplayForgetting(threshold=0.05),
                     LossPlateau(window=5, min_rel_drop=0.99, ema=0.0)],
            policy=RulePolicy([Rule("loss_plateau", "widen")], max_growths=0),  # disabled
            probe=bench.data.x_train[:16])
        plugins.append(GrowthPlugin(ctrl, replay_eval_every=3))
    if replay:
        plugins.append(ReplayPlugin(mem_size=100,
                                    storage_policy=ExperienceBalancedBuffer(max_size=100)))
    torch.manual_seed(123)
    strategy = Naive(model=model, optimizer=opt, criterion=torch.nn.CrossEntropyLoss(),
                     train_mb_size=32, train_epochs=1, device="cpu", plugins=plugins,
                     evaluator=None)
    for exp in bench.scenario.train_stream:
        strategy.train(exp)
    out = {k: v.clone() for k, v in model.state_dict().items()}
    out["__next_random__"] = torch.rand(4)  # the global stream after the run
    return out


@pytest.mark.parametrize("replay", [True, False], ids=["replay", "naive"])
def test_growth_disabled_is_bitwise_identical_to_no_plugin(replay):
    a = _digits_run(with_plugin=False, replay=replay)
    b = _digits_run(with_plugin=True, replay=replay)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs: the plugin moved the global RNG"
