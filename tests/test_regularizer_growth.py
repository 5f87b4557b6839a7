"""Regulariser state follows a growth: right after an EXACT growth, the penalty of EWC
(separate, online), Synaptic Intelligence and MAS is unchanged; without the mapping (the
negative control) it is not, or the plugin crashes. Then every common Avalanche strategy
trains through a growth made by GrowthPlugin."""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any

import pytest
import torch

pytest.importorskip("avalanche")

from avalanche.training.plugins import (  # noqa: E402
    EWCPlugin,
    MASPlugin,
    SynapticIntelligencePlugin,
)
from avalanche.training.supervised import Naive  # noqa: E402

from selfgrow.continual.benchmarks import build_benchmark  # noqa: E402
from selfgrow.continual.regularizers import follow_growth  # noqa: E402
from selfgrow.models import build_model  # noqa: E402
from selfgrow.models.mlp import MLPConfig  # noqa: E402
from selfgrow.ops import grow_, make_config  # noqa: E402


@pytest.fixture(scope="module")
def bench() -> Any:
    return build_benchmark("split-digits", seed=0, n_experiences=2)


def _penalty(pl: Any, model: torch.nn.Module) -> float:
    """The plugin's own penalty at ``model`` (as it would add it in before_backward)."""
    if isinstance(pl, SynapticIntelligencePlugin):
        v = SynapticIntelligencePlugin.compute_ewc_loss(
            model, pl.ewc_data, pl.excluded_parameters, device="cpu", lambd=pl.si_lambda[0])
        return float(v)
    fake = SimpleNamespace(clock=SimpleNamespace(train_exp_counter=1), model=model,
                           device="cpu", loss=torch.tensor(1.0))
    pl.before_backward(fake)
    return float(fake.loss.detach()) - 1.0


PLUGINS = {
    "ewc": lambda: EWCPlugin(ewc_lambda=10.0),
    "online-ewc": lambda: EWCPlugin(ewc_lambda=10.0, mode="online", decay_factor=0.5),
    "si": lambda: SynapticIntelligencePlugin(si_lambda=10.0),
    "mas": lambda: MASPlugin(lambda_reg=10.0),
}
#: exact growths of the MLP (noise 0)
GROWTHS = {
    "net2wider": lambda: make_config("net2wider", layer=0, new_width=13),
    "net2wider-both": lambda: make_config("net2wider", layer=(0, 1), new_width=(12, 9)),
    "net2deeper": lambda: make_config("net2deeper", layer=0),
}


def _trained(bench: Any, kind: str) -> tuple[torch.nn.Module, Any]:
    torch.manual_seed(0)
    model = build_model(MLPConfig(in_features=64, hidden=(8, 6), n_classes=10))
    pl = PLUGINS[kind]()
    strat = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                  criterion=torch.nn.CrossEntropyLoss(), train_mb_size=64, train_epochs=1,
                  plugins=[pl], evaluator=None, eval_every=-1)
    strat.train(bench.scenario.train_stream[0])
    if kind == "si":
        # Avalanche 0.6's SI stores its anchors and theta snapshots as views of the live
        # parameters on CPU (``param.detach().cpu().flatten()``), so its path integrals and
        # importances stay 0 here; give it real state to carry
        gi = torch.Generator().manual_seed(2)
        for n, p in model.named_parameters():
            pl.ewc_data[0][n].data = p.detach().flatten().clone()
            pl.ewc_data[1][n].data = torch.rand(p.numel(), generator=gi)
            pl.syn_data["cum_trajectory"][n].data = -pl.ewc_data[1][n].data.clone()
    # the model moves on (as while learning the next experience): a nonzero penalty
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model, pl


@pytest.mark.parametrize("growth", list(GROWTHS))
@pytest.mark.parametrize("kind", list(PLUGINS))
def test_penalty_unchanged_right_after_an_exact_growth(bench, kind, growth):
    model, pl = _trained(bench, kind)
    before = _penalty(pl, model)
    assert before > 1e-4
    ref_model, ref_pl = copy.deepcopy(model), copy.deepcopy(pl)  # for the negative control
    kept: list[Any] = []
    x = bench.data.x_train[:32]
    ev = grow_(model, GROWTHS[growth](), probe=x, on_commit=kept.append)
    assert ev.preservation["exact_expected"] and ev.preservation["max_rel"] < 1e-5
    assert follow_growth([pl], model, kept[0]) == [type(pl).__name__]
    after = _penalty(pl, model)
    assert after == pytest.approx(before, rel=1e-5, abs=1e-7), (kind, growth)
    # negative control: the same growth with the plugin's own handling of new shapes
    grow_(ref_model, GROWTHS[growth](), probe=x)
    try:
        unmapped = _penalty(ref_pl, ref_model)
    except (AssertionError, RuntimeError, KeyError, ValueError):
        return  # the plugin cannot even compute it (online EWC / SI shape checks)
    assert abs(unmapped - before) > 1e-3 * before, (kind, growth, unmapped, before)


def test_transition_rules_on_a_hand_built_map():
    """Old (2,) -> new (4,): coordinate 0 copied twice with values halved (a = 1/2, c = 2),
    coordinate 1 kept, one brand-new coordinate."""
    from selfgrow.optim import ParamMap, ParamTransition

    old = {"w": torch.tensor([2.0, 3.0])}
    new = {"w": torch.tensor([1.0, 3.0, 1.0, 0.7])}
    pm = ParamMap(source="w", index=(torch.tensor([0, 1, 0, -1]),))
    t = ParamTransition(old=old, new=new, maps={"w": pm})
    anchor = t.map("w", torch.tensor([1.0, 4.0]), "anchor")
    imp = t.map("w", torch.tensor([8.0, 5.0]), "importance")
    acc = t.map("w", torch.tensor([6.0, 5.0]), "accumulator")
    torch.testing.assert_close(anchor, torch.tensor([0.5, 4.0, 0.5, 0.7]))
    torch.testing.assert_close(imp, torch.tensor([16.0, 5.0, 16.0, 0.0]))  # 8 / (2 * 1/4)
    torch.testing.assert_close(acc, torch.tensor([3.0, 5.0, 3.0, 0.0]))
    # the penalty sum imp * (theta - anchor)^2 at theta = new equals the old one
    p_old = float((torch.tensor([8.0, 5.0]) * (old["w"] - torch.tensor([1.0, 4.0])) ** 2).sum())
    assert float((imp * (new["w"] - anchor) ** 2).sum()) == pytest.approx(p_old)
    from selfgrow.errors import GrowthConfigError

    with pytest.raises(GrowthConfigError, match="state rule"):
        t.map("w", torch.zeros(2), "fisher")
    with pytest.raises(GrowthConfigError, match="elements"):
        t.map("w", torch.zeros(3), "anchor")


def test_brand_new_tensors_get_zero_state_in_model_order(bench):
    """A new layer (net2deeper) gets anchors at its values and zero importance; online EWC's
    positional merge of the next experience's importances then works."""
    model, pl = _trained(bench, "online-ewc")
    kept: list[Any] = []
    grow_(model, make_config("net2deeper", layer=0), on_commit=kept.append)
    follow_growth([pl], model, kept[0])
    names = [n for n, _ in model.named_parameters()]
    assert list(pl.importances[0]) == names and list(pl.saved_params[0]) == names
    fresh = [n for n in names if kept[0].source_of(n) is None]
    assert fresh
    for n in fresh:
        assert float(pl.importances[0][n].data.abs().sum()) == 0.0
        torch.testing.assert_close(pl.saved_params[0][n].data,
                                   dict(model.named_parameters())[n].detach())
    # the merge that online EWC does after the next experience
    new_imp = {n: copy.deepcopy(d) for n, d in pl.importances[0].items()}
    pl.update_importances(new_imp, 1)
    assert list(pl.importances[1]) == names


# ------------------------------------------------------------------ strategies through a growth
def _strategy(name: str, model: torch.nn.Module, opt: torch.optim.Optimizer, plugins: list
              ) -> Any:
    from avalanche.training import supervised as s

    base = dict(model=model, optimizer=opt, criterion=torch.nn.CrossEntropyLoss(),
                train_mb_size=32, train_epochs=3 if name == "gdumb" else 1,
                eval_mb_size=256, plugins=plugins, evaluator=None, eval_every=-1)
    make = {
        "naive": lambda: s.Naive(**base),
        "replay": lambda: s.Replay(mem_size=100, **base),
        "ewc": lambda: s.EWC(ewc_lambda=1.0, **base),
        "online-ewc": lambda: s.EWC(ewc_lambda=1.0, mode="online", decay_factor=0.5, **base),
        "si": lambda: s.SynapticIntelligence(si_lambda=1.0, **base),
        "mas": lambda: s.MAS(lambda_reg=1.0, **base),
        "lwf": lambda: s.LwF(alpha=1.0, temperature=2.0, **base),
        "gem": lambda: s.GEM(patterns_per_exp=32, memory_strength=0.5, **base),
        "agem": lambda: s.AGEM(patterns_per_exp=32, sample_size=32, **base),
        "gdumb": lambda: s.GDumb(mem_size=100, **base),
    }
    return make[name]()


STRATEGIES = ["naive", "replay", "ewc", "online-ewc", "si", "mas", "lwf", "gem", "agem", "gdumb"]


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_trains_through_a_growth(bench, name):
    """Growth in experience 1 (after the regularisers recorded experience 0): training goes
    on, each parameter is in the optimizer once, the Adam state of an untouched tensor
    survives, and the regulariser state has the grown shapes."""
    from test_plugin import _StateWatch

    from selfgrow.continual import GrowthPlugin
    from selfgrow.continual.plugin import check_optimizer_matches
    from selfgrow.control import GrowthController, LossPlateau, Rule, RulePolicy

    torch.manual_seed(0)
    model = build_model(MLPConfig(in_features=64, hidden=(8,), n_classes=10))
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    ctrl = GrowthController(
        model, opt, signals=[LossPlateau(window=5, min_rel_drop=0.99, ema=0.0)],
        policy=RulePolicy([Rule("loss_plateau", action="widen", kwargs={"factor": 1.5})],
                          cooldown=10, max_growths=4),
        probe=bench.data.x_train[:16])
    watch = _StateWatch(ctrl)
    gp = GrowthPlugin(ctrl, replay_eval_every=0)
    strat = _strategy(name, model, opt, [gp])
    for exp in bench.scenario.train_stream:
        strat.train(exp)
        check_optimizer_matches(strat.model, strat.optimizer)
    growths = [e for e in ctrl.events if e.kind == "growth"]
    assert any(e.experience == 1 for e in growths), [e.experience for e in growths]
    assert watch.checked >= 1
    assert strat.model is ctrl.model and strat.optimizer is opt
    names = dict(strat.model.named_parameters())
    for p in names.values():
        assert torch.isfinite(p).all()
    reg = [p for p in strat.plugins if isinstance(p, (EWCPlugin, SynapticIntelligencePlugin,
                                                      MASPlugin))]
    for pl in reg:  # state of the grown shapes (what follow_growth maintains)
        if isinstance(pl, EWCPlugin):
            state = pl.saved_params[max(pl.saved_params)]
        elif isinstance(pl, MASPlugin):
            state = pl.params
        else:
            state = pl.ewc_data[0]
        for n, d in state.items():
            assert d.data.numel() == names[n].numel(), (name, n)
    if reg:
        assert any(gp.mapped_state), gp.mapped_state
    if name == "gdumb":  # its initial model grew with the live one: same architecture
        from avalanche.training.plugins import GDumbPlugin

        init = next(p for p in strat.plugins if isinstance(p, GDumbPlugin)).init_model
        assert [p.shape for p in init.parameters()] == [p.shape for p in names.values()]


@pytest.mark.parametrize("fixed", [True, False], ids=["snapshot-si", "avalanche-si"])
def test_synaptic_intelligence_learns_importances_on_cpu(bench, fixed):
    """Avalanche 0.6's SI snapshots are views of the live weights on CPU: its importances
    stay 0 (the negative control documents it); selfgrow's subclass copies the snapshots
    and gets the path integrals SI is defined by."""
    from selfgrow.continual.regularizers import SnapshotSynapticIntelligencePlugin

    torch.manual_seed(0)
    model = build_model(MLPConfig(in_features=64, hidden=(8,), n_classes=10))
    cls = SnapshotSynapticIntelligencePlugin if fixed else SynapticIntelligencePlugin
    pl = cls(si_lambda=1.0)
    strat = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                  criterion=torch.nn.CrossEntropyLoss(), train_mb_size=64, train_epochs=1,
                  plugins=[pl], evaluator=None, eval_every=-1)
    strat.train(bench.scenario.train_stream[0])
    total = sum(float(d.data.abs().sum()) for d in pl.ewc_data[1].values())
    if fixed:
        assert total > 0
        named = dict(model.named_parameters())
        moved = sum(float((named[n].detach().flatten() - d.data).abs().sum())
                    for n, d in pl.ewc_data[0].items())
        assert moved == 0.0  # anchors = the weights at the end of the experience
    else:
        assert total == 0.0


def test_run_si_strategy_uses_the_snapshot_plugin():
    from selfgrow.continual.regularizers import SnapshotSynapticIntelligencePlugin
    from selfgrow.continual.runner import RunSpec, strategy_plugins

    (pl,) = strategy_plugins(RunSpec(strategy="si"), 5)
    assert isinstance(pl, SnapshotSynapticIntelligencePlugin)
