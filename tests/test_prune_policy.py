"""Grow-and-prune decisions: prune rules, floor, prune cooldown, hysteresis (RulePolicy) and the
IdleCapacity utility signal."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from selfgrow import GrowthConfigError, IdleCapacity, build_model
from selfgrow.control.policies import PolicyContext, Rule, RulePolicy, SkipReason
from selfgrow.models.cnn import CNNConfig
from selfgrow.models.mlp import MLPConfig
from selfgrow.models.transformer import TransformerConfig

GROW = {"grow_sig": {"triggered": True, "value": 1.0}}
PRUNE = {"idle": {"triggered": True, "value": 0.5}}
BOTH = {**GROW, **PRUNE}


def _policy(**kw: Any) -> RulePolicy:
    return RulePolicy([Rule("grow_sig", "widen"), Rule("idle", "prune", direction="prune")], **kw)


def _ctx(step: int, n_params: int = 1000, after: int = 500, **kw: Any) -> PolicyContext:
    return PolicyContext(step=step, n_params=n_params,
                         estimate=lambda a, k: {"params": after, "method": "meta_twin"}, **kw)


def test_rule_direction_is_validated():
    with pytest.raises(GrowthConfigError, match="direction 'shrink'.*grow, prune"):
        Rule("idle", "prune", direction="shrink")


@pytest.mark.parametrize("kw", [dict(prune_floor=0), dict(prune_floor=1.5),
                                dict(prune_cooldown=-1), dict(hysteresis=True),
                                dict(max_prunes=-2)])
def test_prune_limits_are_validated(kw):
    with pytest.raises(GrowthConfigError, match=next(iter(kw))):
        _policy(**kw)


def test_a_grow_rule_that_fires_vetoes_every_prune():
    """A model that lacks capacity is never pruned, even when the growth itself is blocked."""
    pol = _policy(max_growths=0)
    d, why = pol.decide(BOTH, _ctx(10))
    assert d.direction == "grow" and d.blocked == SkipReason.MAX_GROWTHS
    d, _ = pol.decide(PRUNE, _ctx(10))
    assert d.direction == "prune" and d.go


def test_prune_floor_uses_the_size_estimate():
    pol = _policy(prune_floor=600)
    d, why = pol.decide(PRUNE, _ctx(10, n_params=1000, after=500))
    assert d.blocked == SkipReason.FLOOR and "500 < floor 600" in why
    d, _ = pol.decide(PRUNE, _ctx(10, n_params=1000, after=700))
    assert d.go and d.estimate["params"] == 700
    d, why = pol.decide(PRUNE, _ctx(10, n_params=600, after=300))
    assert d.blocked == SkipReason.FLOOR and "<= floor" in why


def test_prune_cooldown_and_max_prunes():
    pol = _policy(prune_cooldown=50, max_prunes=2)
    d, _ = pol.decide(PRUNE, _ctx(60, n_prunes=1, last_prune_step=20,
                                  last_prune_attempt_step=20))
    assert d.blocked == SkipReason.COOLDOWN
    d, _ = pol.decide(PRUNE, _ctx(70, n_prunes=1, last_prune_step=20,
                                  last_prune_attempt_step=20))
    assert d.go
    d, _ = pol.decide(PRUNE, _ctx(500, n_prunes=2, last_prune_step=20))
    assert d.blocked == SkipReason.MAX_PRUNES
    # growths do not count against max_prunes, prunes not against max_growths
    d, _ = _policy(max_growths=1).decide(GROW, _ctx(500, n_prunes=5))
    assert d.go


def test_hysteresis_blocks_each_direction_after_the_other():
    pol = _policy(hysteresis=100)
    d, why = pol.decide(PRUNE, _ctx(150, last_growth_step=100, n_growths=1))
    assert d.blocked == SkipReason.HYSTERESIS and "after the growth at step 100" in why
    d, why = pol.decide(GROW, _ctx(150, last_prune_step=100, n_prunes=1))
    assert d.blocked == SkipReason.HYSTERESIS and "after the prune at step 100" in why
    assert pol.decide(PRUNE, _ctx(200, last_growth_step=100))[0].go
    assert pol.decide(GROW, _ctx(200, last_prune_step=100))[0].go


def _simulate(pol: RulePolicy, trace: list[dict[str, Any]]) -> list[tuple[int, str]]:
    """Apply every decision the policy lets through, as the controller does (counters and
    last-change steps), and return the (step, direction) of each change."""
    ctx = dict(n_growths=0, n_prunes=0, last_growth_step=None, last_attempt_step=None,
               last_prune_step=None, last_prune_attempt_step=None)
    changes = []
    for step, states in enumerate(trace):
        d, _ = pol.decide(states, _ctx(step, **ctx))
        if d is None or not d.go:
            continue
        changes.append((step, d.direction))
        if d.direction == "grow":
            ctx.update(n_growths=ctx["n_growths"] + 1, last_growth_step=step,
                       last_attempt_step=step)
        else:
            ctx.update(n_prunes=ctx["n_prunes"] + 1, last_prune_step=step,
                       last_prune_attempt_step=step)
    return changes


def _flip_flop_trace(steps: int = 400) -> list[dict[str, Any]]:
    """A model at the edge of its capacity: a prune makes the loss plateau high (grow), the
    growth's new units sit idle (prune), and so on: the wanted direction flips every 5
    steps."""
    return [GROW if (s // 5) % 2 == 0 else PRUNE for s in range(steps)]


def _reversals(changes: list[tuple[int, str]]) -> list[int]:
    return [s for (s, d), (_, prev) in zip(changes[1:], changes, strict=False) if d != prev]


def test_without_hysteresis_the_scripted_trace_oscillates():
    """The negative control: the same limits without hysteresis reverse direction on every
    flip of the trace."""
    changes = _simulate(_policy(cooldown=5, prune_cooldown=5), _flip_flop_trace())
    assert len(_reversals(changes)) >= 60


def test_hysteresis_stops_the_oscillation():
    """With hysteresis H, two changes in opposite directions are at least H steps apart."""
    h = 100
    changes = _simulate(_policy(cooldown=5, prune_cooldown=5, hysteresis=h), _flip_flop_trace())
    rev = _reversals(changes)
    assert len(rev) <= 400 // h
    for (s, d), (s0, d0) in zip(changes[1:], changes, strict=False):
        if d != d0:
            assert s - s0 >= h, (s0, d0, s, d)
    assert changes, "the policy still changes the model"


# ------------------------------------------------------------------------------ IdleCapacity
def _train_steps(model: torch.nn.Module, sig: IdleCapacity, x: torch.Tensor, y: torch.Tensor,
                 n: int) -> None:
    for step in range(n):
        out = model(x)
        F.cross_entropy(out, y).backward()
        sig.update(step, {})
        model.zero_grad()


@pytest.mark.parametrize("criterion", ["activation", "taylor"])
def test_idle_capacity_finds_dead_units(criterion):
    torch.manual_seed(0)
    m = build_model(MLPConfig(in_features=12, hidden=(16, 8), n_classes=3))
    with torch.no_grad():  # units 0..3 of layer 0 never fire
        m.hidden[0].weight[:4] = 0.0
        m.hidden[0].bias[:4] = -1.0
    x, y = torch.randn(64, 12), torch.randint(0, 3, (64,))
    sig = IdleCapacity(window=3, threshold=0.1, criterion=criterion, share=0.0)
    sig.bind(m)
    _train_steps(m, sig, x, y, 2)
    assert sig.value is None  # the window is not full yet
    _train_steps(m, sig, x, y, 1)
    st = sig.state()
    assert st["triggered"] and st["units"][0] == [0, 1, 2, 3]
    assert st["dead_fraction"] == pytest.approx(4 / 24)
    assert 1 not in st["units"]  # every unit of layer 1 is alive and share=0


def test_idle_capacity_negative_control_live_units_are_not_idle():
    torch.manual_seed(0)
    m = build_model(MLPConfig(in_features=12, hidden=(16,), n_classes=3))
    x, y = torch.randn(64, 12), torch.randint(0, 3, (64,))
    sig = IdleCapacity(window=2, threshold=0.1, share=0.0)
    sig.bind(m)
    _train_steps(m, sig, x, y, 2)
    assert not sig.triggered and sig.value == 0.0


def test_idle_capacity_verify_ablates_without_touching_weights():
    """With verify, the ladder's fractions are ablated through the hooks: the loss the
    verify callable sees changes, the weights do not, and the model is back to normal."""
    torch.manual_seed(0)
    m = build_model(MLPConfig(in_features=12, hidden=(16,), n_classes=3))
    x, y = torch.randn(64, 12), torch.randint(0, 3, (64,))
    seen: list[float] = []

    def verify(model: torch.nn.Module) -> float:
        assert not model.training and not torch.is_grad_enabled()
        loss = float(F.cross_entropy(model(x), y))
        seen.append(loss)
        return loss

    before = {k: v.clone() for k, v in m.state_dict().items()}
    out0 = m(x).detach()
    sig = IdleCapacity(window=2, threshold=0.1, verify=verify, tolerance=1e9)
    sig.bind(m)
    _train_steps(m, sig, x, y, 2)
    assert sig.triggered and len(sig.units[0]) == 8  # the 0.5 rung passes an infinite tolerance
    assert len(seen) == 2 and seen[0] != seen[1]  # unablated, then ablated
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert torch.equal(m(x).detach(), out0)
    # the negative control: a loss that any ablation of live units raises (the distance to
    # the unablated output) and a zero tolerance: no rung passes

    def distance(model: torch.nn.Module) -> float:
        return float((model(x) - out0).pow(2).mean())

    sig0 = IdleCapacity(window=2, threshold=0.1, verify=distance, tolerance=0.0, share=0.0)
    sig0.bind(m)
    _train_steps(m, sig0, x, y, 2)
    assert not sig0.triggered and sig0.units == {}


def test_idle_capacity_watches_cnn_and_transformer_units():
    torch.manual_seed(0)
    c = build_model(CNNConfig(in_channels=1, image_size=8, channels=(4, 6), n_classes=3,
                              batchnorm=True, pool_after=(0,)))
    sig = IdleCapacity(window=1, threshold=0.01, share=0.5)
    sig.bind(c)
    _train_steps(c, sig, torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,)), 1)
    assert set(sig.importance) == {0, 1} and len(sig.importance[1]) == 6
    t = build_model(TransformerConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=2, d_ff=24))
    sig = IdleCapacity(window=1, threshold=0.01, share=0.5)
    sig.bind(t)
    t(torch.randint(0, 40, (2, 6))).float().pow(2).mean().backward()
    sig.update(0, {})
    assert set(sig.importance) == {0, 1} and len(sig.importance[0]) == 24
    assert sig.state()["n_remove"] >= 1


def test_idle_capacity_ignores_eval_forwards_and_rebinds():
    torch.manual_seed(0)
    m = build_model(MLPConfig(in_features=12, hidden=(16,), n_classes=3))
    sig = IdleCapacity(window=1, threshold=0.1)
    sig.bind(m)
    m.eval()
    m(torch.randn(4, 12))
    sig.update(0, {})
    assert sig.value is None  # no training forward in the window
    n_hooks = len(m.head._forward_pre_hooks)
    sig.bind(m)
    assert len(m.head._forward_pre_hooks) == n_hooks  # the old hook was removed


@pytest.mark.parametrize("kw, match", [
    (dict(criterion="l1"), "criterion 'l1'.*activation, taylor"),
    (dict(threshold=0.0), "threshold"),
    (dict(fractions=(0.5, 1.0)), "fractions"),
    (dict(fractions=()), "fractions is empty"),
    (dict(verify=3), "verify=3"),
    (dict(min_units=0), "min_units"),
    (dict(include="hidden.0"), "include"),
])
def test_idle_capacity_bad_arguments(kw, match):
    with pytest.raises(GrowthConfigError, match=match):
        IdleCapacity(**kw)


def test_idle_capacity_on_a_model_without_units():
    with pytest.raises(GrowthConfigError, match="no hidden units"):
        IdleCapacity().bind(torch.nn.Linear(3, 2))


def test_idle_capacity_max_loss_blocks_pruning_while_the_loss_is_high():
    """Capacity is only idle while the task is solved: the same dead units trigger at a low
    window loss and not at a high one (the loss-level half of the grow/prune hysteresis)."""
    torch.manual_seed(0)
    m = build_model(MLPConfig(in_features=12, hidden=(16,), n_classes=3))
    with torch.no_grad():
        m.hidden[0].weight[:4] = 0.0
        m.hidden[0].bias[:4] = -1.0
    x = torch.randn(8, 12)
    for loss, fires in ((0.05, True), (0.5, False)):
        sig = IdleCapacity(window=2, threshold=0.1, share=0.0, max_loss=0.1)
        sig.bind(m)
        for step in range(2):
            m(x)
            sig.update(step, {"loss": loss})
        assert sig.triggered is fires and sig.state()["window_loss"] == pytest.approx(loss)
        assert sig.value == pytest.approx(4 / 16)  # the measurement itself is unchanged


def test_every_shrink_operator_says_so():
    """Operator.shrinks is what makes a change a prune: every operator of the shrink modules
    (and remove_expert) sets it, no growth operator does."""
    from selfgrow.ops import get_operator, list_operators

    for name in list_operators():
        op = get_operator(name)
        shrink = type(op).__module__.startswith("selfgrow.ops.shrink") or name == "remove_expert"
        assert op.shrinks is shrink, name


def test_idle_experts_drives_remove_expert():
    """IdleExperts names the least used expert; the remove_expert action removes it and
    the controller logs a prune (with a router that never picks expert 3, exactly)."""
    from selfgrow import GrowthController
    from selfgrow.control import IdleExperts
    from selfgrow.models.moe import moe_layers

    torch.manual_seed(0)
    m = build_model(TransformerConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=2,
                                      d_ff=24, moe_experts=(0, 4), moe_top_k=2))
    moe = moe_layers(m)["layers.1.ffn"]
    with torch.no_grad():
        moe.router.bias[3] = -1e4  # expert 3 never gets routing mass
    sig = IdleExperts(threshold=0.25, window=2)
    pol = RulePolicy([Rule("idle_experts", "remove_expert",
                           from_state={"layer": "layer", "expert": "expert"},
                           direction="prune")], max_prunes=1)
    probe = torch.randint(0, 40, (2, 6))
    ctrl = GrowthController(m, torch.optim.Adam(m.parameters()), [sig], pol, probe=probe)
    for _ in range(3):
        m(torch.randint(0, 40, (4, 6)))
        ctrl.observe(loss=1.0)
    ev = next(e for e in ctrl.events if e.kind == "prune")
    assert ev.trigger["signal"] == "idle_experts" and ev.action["op"] == "remove_expert"
    assert ev.action["kwargs"] == {"layer": 1, "expert": 3}
    assert moe_layers(m)["layers.1.ffn"].n_experts == 3
    assert ev.preservation["max_abs"] < 1e-5  # no routing mass: exact
    with pytest.raises(GrowthConfigError, match="min_experts"):
        IdleExperts(min_experts=0)


def test_idle_capacity_verify_failures_are_loud():
    """A verify that raises or returns a non-number gets the project's error naming it; a NaN
    loss warns once and prunes nothing."""
    from selfgrow.errors import SelfgrowWarning

    torch.manual_seed(0)
    m = build_model(MLPConfig(in_features=12, hidden=(16,), n_classes=3))
    x, y = torch.randn(8, 12), torch.randint(0, 3, (8,))

    def boom(model: torch.nn.Module) -> float:
        raise RuntimeError("no data")

    for verify, match in ((boom, "verify raised RuntimeError: no data"),
                          (lambda model: "x", "verify returned 'x'")):
        sig = IdleCapacity(window=1, threshold=0.1, verify=verify)
        sig.bind(m)
        m(x)
        with pytest.raises(GrowthConfigError, match=match):
            sig.update(0, {})
        assert torch.equal(m(x), m(x))  # no ablation mask left behind
    sig = IdleCapacity(window=1, threshold=0.1, verify=lambda model: float("nan"))
    sig.bind(m)
    with pytest.warns(SelfgrowWarning, match="verify returned nan"):
        _train_steps(m, sig, x, y, 1)
    assert not sig.triggered and sig.units == {}


def test_growth_never_edits_the_callers_config():
    """A model keeps a copy of the config it was built from: growing or pruning it leaves
    the caller's config (which may build other models) as written."""
    from selfgrow import grow_, make_config

    tc = TransformerConfig(vocab_size=40, d_model=16, n_layers=3, n_heads=2, d_ff=24)
    t = build_model(tc)
    grow_(t, make_config("remove_layers", layers=(1,)))
    grow_(t, make_config("ffn_net2wider", new_d_ff=32))
    assert (tc.n_layers, tc.d_ff) == (3, 24) and (t.config.n_layers, t.config.d_ff) == (2, 32)
    mc = MLPConfig(in_features=12, hidden=(16,), n_classes=3)
    grow_(build_model(mc), make_config("remove_units", layer=0, n_remove=4))
    assert mc.hidden == (16,)
