"""Signals: scripted metric traces -> values / triggers; range checks; state_dict round-trip."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from selfgrow.control import (
    Budget,
    CapacityProbe,
    ExpertOverload,
    GradientSaturation,
    GrowthController,
    LossPlateau,
    ReplayForgetting,
    RulePolicy,
    Stabilizer,
    ValidationPlateau,
)
from selfgrow.errors import GrowthConfigError

BAD = [
    (LossPlateau, {"min_rel_drop": 1.5}, r"\[0.0, 1.0\)"),
    (LossPlateau, {"min_rel_drop": -0.1}, "valid range"),
    (LossPlateau, {"ema": 1.0}, "ema"),
    (LossPlateau, {"window": 0}, "window"),
    (LossPlateau, {"every": 0}, "every"),
    (LossPlateau, {"min_rel_drop": float("nan")}, "min_rel_drop"),
    (ValidationPlateau, {"min_rel_drop": 2.0}, "min_rel_drop"),
    (ReplayForgetting, {"threshold": 0.0}, r"\(0.0, 1.0\)"),
    (ReplayForgetting, {"threshold": 1.0}, r"\(0.0, 1.0\)"),
    (ReplayForgetting, {"reduce": "median"}, "max, mean"),
    (GradientSaturation, {"threshold": -1.0}, "threshold"),
    (GradientSaturation, {"window": 10, "history": 5}, "history"),
    (ExpertOverload, {"threshold": 0.0}, r"\(0.0, 1.0\]"),
    (ExpertOverload, {"threshold": 1.5}, "threshold"),
    (ExpertOverload, {"min_entropy": 2.0}, "min_entropy"),
    (CapacityProbe, {"finetune": print, "evaluate_old": print, "threshold": 0.0}, "threshold"),
    (CapacityProbe, {"finetune": None, "evaluate_old": print}, "callables"),
    (Budget, {"max_params": -1}, "max_params"),
    (Budget, {"max_memory_bytes": 0}, "max_memory_bytes"),
    (Stabilizer, {"rewarm_start": 0.0}, "rewarm_start"),
    (Stabilizer, {"rewarm_steps": -3}, "rewarm_steps"),
    (Stabilizer, {"lr_scale_after": 0.0}, "lr_scale_after"),
    (Stabilizer, {"clip_grad_norm": -1.0}, "clip_grad_norm"),
    (RulePolicy, {"rules": [], "cooldown": 0}, "Rule"),
]


@pytest.mark.parametrize("cls,kw,msg", BAD, ids=[f"{c.__name__}-{list(k)[0]}" for c, k, _ in BAD])
def test_out_of_range_rejected(cls, kw, msg):
    with pytest.raises(GrowthConfigError, match=msg):
        cls(**kw)


def test_rule_policy_ranges():
    from selfgrow.control import Rule

    r = [Rule("loss_plateau", "widen")]
    for kw, msg in [({"cooldown": -1}, "cooldown"), ({"warmup_steps": 1.5}, "warmup"),
                    ({"warmup_steps": -2}, "warmup"), ({"max_growths": -1}, "max_growths"),
                    ({"growth_window": (0.5, 0.2)}, "growth_window end"),
                    ({"growth_window": (-0.1, 0.2)}, "growth_window start")]:
        with pytest.raises(GrowthConfigError, match=msg):
            RulePolicy(r, **kw)


# ---------------------------------------------------------------------------------------------
# plateaus
# ---------------------------------------------------------------------------------------------
PLATEAU_TRACES = [
    # (losses, window, min_rel_drop, ema, first trigger index (1-based) or None)
    ([1.0] * 10, 3, 0.01, 0.0, 4),
    ([4.0, 3.0, 2.0, 1.0, 1.0, 1.0, 1.0], 2, 0.01, 0.0, 6),
    ([2.0 * 0.99**i for i in range(40)], 5, 0.1, 0.0, 6),  # 4.9% per 5 steps < 10%
    ([2.0 * 0.99**i for i in range(40)], 5, 0.01, 0.0, None),  # always improving > 1%
    ([1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5], 3, 0.01, 0.0, 4),
]


@pytest.mark.parametrize("losses,window,drop,ema,expect", PLATEAU_TRACES)
def test_loss_plateau_traces(losses, window, drop, ema, expect):
    sig = LossPlateau(window=window, min_rel_drop=drop, ema=ema)
    first = None
    for i, x in enumerate(losses, start=1):
        sig.update(i, {"loss": x})
        if sig.triggered and first is None:
            first = i
        if i <= window:
            assert sig.value is None and not sig.triggered
    assert first == expect


def test_loss_plateau_ema_and_growth_reset():
    sig = LossPlateau(window=2, min_rel_drop=0.01, ema=0.5)
    for i, x in enumerate([4.0, 2.0, 2.0], start=1):
        sig.update(i, {"loss": torch.tensor(x)})
    # smoothed: 4, 3, 2.5 -> (4 - 2.5)/4
    assert sig.value == pytest.approx(0.375)
    st = sig.state()
    assert st["signal"] == "loss_plateau" and st["threshold"] == 0.01 and st["window"] == 2
    sig.update(4, {"loss": float("nan")})  # ignored
    assert sig.n_updates == 3
    sig.on_growth(4)
    assert sig.value is None and not sig.triggered and sig.state()["history"] == 0


def test_validation_plateau_defaults():
    sig = ValidationPlateau()
    assert sig.requires == ("val_loss",) and sig.name == "val_plateau" and sig.ema == 0.0


# ---------------------------------------------------------------------------------------------
# replay forgetting
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "reduce,window,expect_values,expect_trig",
    [
        ("max", 1, [0.05, 0.18, 0.15], [False, True, True]),
        ("mean", 1, [0.025, 0.09, 0.075], [False, False, False]),
        ("max", 2, [0.05, 0.115, 0.165], [False, True, True]),
    ],
)
def test_replay_forgetting_reduce_and_window(reduce, window, expect_values, expect_trig):
    sig = ReplayForgetting(threshold=0.1, reduce=reduce, window=window)
    sig.update(0, {"experience_end_accuracy": {0: 0.9, 1: 0.8}})
    assert sig.value is None and sig.n_updates == 0
    trace = [{0: 0.85, 1: 0.8}, {0: 0.72, 1: 0.8}, {0: 0.9, 1: 0.65}]
    vals, trig = [], []
    for i, acc in enumerate(trace, start=1):
        sig.update(i, {"replay_accuracy": acc, "experience_end_accuracy": {0: 0.9, 1: 0.8}})
        vals.append(sig.value)
        trig.append(sig.triggered)
    assert vals == pytest.approx(expect_values)
    assert trig == expect_trig
    assert sig.state()["worst_experience"] == 1


def test_replay_forgetting_rebases_after_growth():
    sig = ReplayForgetting(threshold=0.1)
    sig.update(1, {"replay_accuracy": {0: 0.6}, "experience_end_accuracy": {0: 0.9}})
    assert sig.triggered and sig.value == pytest.approx(0.3)
    sig.on_growth(1)
    assert not sig.triggered
    sig.update(2, {"replay_accuracy": {0: 0.6}, "experience_end_accuracy": {0: 0.9}})
    assert sig.value == pytest.approx(0.0) and not sig.triggered
    sig.update(3, {"replay_accuracy": {0: 0.45}})
    assert sig.value == pytest.approx(0.15) and sig.triggered
    # a changed reference for a new experience is taken as given
    sig.update(4, {"replay_accuracy": {0: 0.6, 1: 0.5}, "experience_end_accuracy": {1: 0.7}})
    assert sig.drops == pytest.approx({0: 0.0, 1: 0.2})


# ---------------------------------------------------------------------------------------------
# gradient saturation
# ---------------------------------------------------------------------------------------------
def _set_grads(model: nn.Sequential, scales: list[float]) -> None:
    for layer, s in zip(model, scales, strict=True):
        layer.weight.grad = torch.ones_like(layer.weight) * s * layer.weight.norm() / math.sqrt(
            layer.weight.numel())
        layer.bias.grad = torch.zeros_like(layer.bias)


def test_gradient_saturation_names_the_layer_that_stops_decaying():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    sig = GradientSaturation(threshold=0.95, window=5, history=100, min_ratio=1e-3)
    sig.bind(model)
    for t in range(1, 41):
        # layer 0 decays like 1/t, layer 1 constant, layer 2 constant but tiny
        _set_grads(model, [1.0 / t, 0.5, 1e-6])
        sig.update(t, {})
        if t < 5:
            assert sig.value is None and not sig.triggered
    assert sig.triggered and sig.state()["layers"] == ["1"]
    assert sig.scores["0"] < 0.5 and sig.scores["1"] == pytest.approx(1.0)
    assert sig.value == pytest.approx(max(sig.scores.values()))
    sd = json.loads(json.dumps(sig.state_dict()))
    other = GradientSaturation(threshold=0.95, window=5, history=100, min_ratio=1e-3)
    other.bind(model)
    other.load_state_dict(sd)
    _set_grads(model, [1.0 / 41, 0.5, 1e-6])
    sig.update(41, {})
    other.update(41, {})
    assert other.scores == sig.scores and other.saturated == sig.saturated
    sig.on_growth(41)
    assert not sig.triggered and sig.state()["layers"] == []


def test_gradient_saturation_include_exclude():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    only = GradientSaturation(threshold=0.95, window=2, history=10, include=["0", "1"],
                              exclude=["1"])
    only.bind(model)
    for t in range(1, 5):
        _set_grads(model, [0.5, 0.5, 0.5])
        only.update(t, {})
    assert only.state()["layers"] == ["0"] and set(only.scores) == {"0"}
    with pytest.raises(GrowthConfigError, match="patterns"):
        GradientSaturation(include="hidden.*")


def test_gradient_saturation_without_grads_does_nothing():
    model = nn.Linear(3, 3)
    sig = GradientSaturation(window=2, history=4)
    sig.bind(model)
    with pytest.warns(UserWarning, match="before zero_grad"):
        sig.update(1, {})
    sig.update(2, {})  # warned once only
    assert sig.n_updates == 0 and sig.value is None


def test_loss_plateau_resets_when_the_experience_changes():
    sig = LossPlateau(window=3, min_rel_drop=0.01, ema=0.0)
    for i in range(1, 6):
        sig.update(i, {"loss": 1.0, "experience": 0})
    assert sig.triggered
    sig.update(6, {"loss": 3.0, "experience": 1})  # new task: loss jumps, not a plateau
    assert not sig.triggered and sig.value is None and sig.state()["history"] == 1
    for i in range(7, 10):
        sig.update(i, {"loss": 3.0 - 0.5 * (i - 6), "experience": 1})
    assert sig.value == pytest.approx(0.5) and not sig.triggered


# ---------------------------------------------------------------------------------------------
# experts
# ---------------------------------------------------------------------------------------------
def test_expert_overload_from_metric():
    sig = ExpertOverload(threshold=0.5, window=1)
    stats = {"layer0": {"load": torch.tensor([0.25, 0.25, 0.25, 0.25]), "active_k": 1,
                        "max_k": 1},
             "layer1": {"load": torch.tensor([0.7, 0.1, 0.1, 0.1]), "active_k": 1, "max_k": 1}}
    sig.update(1, {"router_stats": stats})
    st = sig.state()
    assert sig.value == pytest.approx(0.7) and sig.triggered
    assert st["layers"] == ["layer1"] and st["per_layer"]["layer1"]["expert"] == 0
    assert st["per_layer"]["layer0"]["entropy"] == pytest.approx(1.0)
    assert st["entropy"] < 1.0


def test_expert_overload_measures_the_token_share_under_top_k():
    """Top-2: an expert used by every token has load fraction 1/2 (of the assignments) but a
    token share of 1, so the default threshold fires on collapsed routing."""
    sig = ExpertOverload(window=1)
    stats = {"l": {"load": torch.tensor([0.5, 0.5 / 3, 0.5 / 3, 0.5 / 3]), "active_k": 2.0,
                   "max_k": 2}}
    sig.update(1, {"router_stats": stats})
    assert sig.value == pytest.approx(1.0) and sig.triggered
    assert sig.state()["per_layer"]["l"]["max_load"] == pytest.approx(0.5)
    stats = {"l": {"load": torch.full((4,), 0.25), "active_k": 2.0, "max_k": 2}}
    sig = ExpertOverload(window=1)
    sig.update(1, {"router_stats": stats})
    assert sig.value == pytest.approx(0.5) and not sig.triggered  # balanced: 1/2 of tokens


def test_expert_overload_entropy_floor_and_module_protocol():
    class Router(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.load = torch.tensor([0.45, 0.45, 0.05, 0.05])

        def routing_stats(self):
            return {"load": self.load, "active_k": 1.0, "max_k": 1}

    model = nn.Sequential(Router())
    sig = ExpertOverload(threshold=0.9, min_entropy=0.9, window=2)
    assert sig.requires == ("router_stats",)
    sig.bind(model)
    assert sig.requires == ()  # the model reports routing statistics itself
    sig.update(1, {})
    assert sig.value == pytest.approx(0.45) and sig.triggered and sig.state()["layers"] == ["0"]
    model[0].load = torch.tensor([0.25, 0.25, 0.25, 0.25])
    sig.update(2, {})  # averaged over 2 updates
    assert sig.value == pytest.approx(0.35)
    model[0].load = torch.tensor([0.2] * 5)  # grew an expert: history restarts
    sig.update(3, {})
    assert sig.value == pytest.approx(0.2) and not sig.triggered


# ---------------------------------------------------------------------------------------------
# capacity probe
# ---------------------------------------------------------------------------------------------
def test_capacity_probe_measures_drop_on_a_copy_and_keeps_rng():
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    w0 = model.weight.detach().clone()

    def finetune(m: nn.Module) -> None:
        torch.randn(3)  # consumes RNG inside the probe
        with torch.no_grad():
            m.weight.add_(1.0)

    def evaluate_old(m: nn.Module) -> float:
        return -float(m.weight.detach().sum())  # higher is better

    sig = CapacityProbe(finetune, evaluate_old, threshold=1.5, every=5)
    sig.bind(model)
    state = torch.random.get_rng_state()
    sig.update(5, {})
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(model.weight, w0)
    assert sig.value == pytest.approx(2.0) and sig.triggered
    assert sig.state()["before"] > sig.state()["after"]


def test_capacity_probe_sampled_every_n_steps_by_controller():
    calls = []
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sig = CapacityProbe(lambda m: calls.append(1), lambda m: 0.0, every=4)
    ctrl = GrowthController(model, opt, signals=[sig])
    for _ in range(12):
        ctrl.observe(loss=1.0)
    assert len(calls) == 3 and sig.n_updates == 3 and not sig.triggered


# ---------------------------------------------------------------------------------------------
# state_dict round-trips of every signal
# ---------------------------------------------------------------------------------------------
def _loss_trace(i: int) -> dict:
    return {"loss": 2.0 / (1 + 0.1 * i) + 0.05 * math.sin(i)}


def _replay_trace(i: int) -> dict:
    return {"replay_accuracy": {0: 0.9 - 0.01 * i, 1: 0.8 - 0.003 * i},
            "experience_end_accuracy": {0: 0.9, 1: 0.8}}


def _router_trace(i: int) -> dict:
    p = torch.tensor([1.0 + 0.1 * i, 1.0, 1.0])
    return {"router_stats": {"l": {"load": p / p.sum(), "active_k": 1, "max_k": 1}}}


@pytest.mark.parametrize(
    "make,trace",
    [
        (lambda: LossPlateau(window=5, min_rel_drop=0.05, ema=0.3), _loss_trace),
        (lambda: ValidationPlateau(window=3), lambda i: {"val_loss": _loss_trace(i)["loss"]}),
        (lambda: ReplayForgetting(threshold=0.1, window=3), _replay_trace),
        (lambda: ExpertOverload(threshold=0.4, window=4), _router_trace),
    ],
)
def test_signal_state_dict_round_trip(make, trace):
    ref, a = make(), make()
    for i in range(1, 11):
        ref.update(i, trace(i))
        a.update(i, trace(i))
    b = make()
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for i in range(11, 31):
        ref.update(i, trace(i))
        b.update(i, trace(i))
        assert b.value == ref.value and b.triggered == ref.triggered
    assert json.dumps(b.state_dict()) == json.dumps(ref.state_dict())


def test_make_signal_by_name():
    from selfgrow.control import list_signals, make_signal

    assert "loss_plateau" in list_signals() and "replay_forgetting" in list_signals()
    sig = make_signal("loss_plateau", window=7)
    assert isinstance(sig, LossPlateau) and sig.window == 7
    with pytest.raises(GrowthConfigError, match="valid choices"):
        make_signal("loss_plato")
    with pytest.raises(GrowthConfigError, match="bad arguments"):
        make_signal("loss_plateau", windw=7)


def test_gradient_saturation_does_not_fire_on_healthy_training():
    """Regression: when the window first filled, the slow mean equalled the short one and the
    score was 1.0 >= threshold on every layer, in perfectly healthy training."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 1))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    sig = GradientSaturation(window=10)
    sig.bind(m)
    x = torch.randn(64, 4)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    fired = []
    for step in range(1, 61):
        opt.zero_grad()
        (m(x).squeeze(-1) - y).pow(2).mean().backward()
        sig.update(step, {})
        if sig.triggered:
            fired.append(step)
        opt.step()
    assert fired == [], fired
