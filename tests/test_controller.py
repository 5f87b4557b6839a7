"""GrowthController: scripted traces fire the expected growths, limits, anomalies, logging,
state_dict round-trip."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

from selfgrow.control import (
    Budget,
    FixedSchedule,
    GrowthController,
    LossPlateau,
    ReplayForgetting,
    Rule,
    RulePolicy,
    Stabilizer,
    ValidationPlateau,
    register_action,
)
from selfgrow.errors import GrowthConfigError, IncompatibleModelError
from selfgrow.events import read_events
from selfgrow.ops import GrowthResult, OpConfig, Operator, Transaction, register_operator
from selfgrow.optim import ParamMap


# ---------------------------------------------------------------------------------------------
# test-only growable model + operator + actions
# ---------------------------------------------------------------------------------------------
class _CtrlNet(nn.Module):
    def __init__(self, d: int = 4, h: int = 3) -> None:
        super().__init__()
        self.a = nn.Linear(d, h)
        self.b = nn.Linear(h, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


@dataclass
class _AddUnitsConfig(OpConfig):
    """Test-only Net2WiderNet: append ``n`` copies of hidden units 0..n-1 (exact)."""

    name: ClassVar[str] = "_ctrl_add_units"
    n: int = 1

    def estimate_params(self, model: nn.Module) -> int:
        d, o = model.a.in_features, model.b.out_features
        h = model.a.out_features + self.n
        return d * h + h + h * o + o


@register_operator(_AddUnitsConfig)
class _AddUnits(Operator):
    exact = True

    def validate(self, model: nn.Module, config: OpConfig) -> None:
        if not isinstance(config, _AddUnitsConfig) or config.n < 1:
            raise GrowthConfigError(f"n={getattr(config, 'n', None)!r}; valid: >= 1")
        if config.n > model.a.out_features:
            raise GrowthConfigError(f"n={config.n} > hidden width {model.a.out_features}")

    def apply(self, model: nn.Module, config: OpConfig, tx: Transaction) -> GrowthResult:
        h = model.a.out_features
        idx = torch.cat([torch.arange(h), torch.arange(config.n)])  # type: ignore[attr-defined]
        a = nn.Linear(model.a.in_features, idx.numel())
        b = nn.Linear(idx.numel(), model.b.out_features)
        a.weight.data = model.a.weight.data[idx].clone()
        a.bias.data = model.a.bias.data[idx].clone()
        scale = 1.0 / torch.bincount(idx, minlength=h).float()[idx]
        b.weight.data = model.b.weight.data[:, idx] * scale
        b.bias.data = model.b.bias.data.clone()
        tx.replace_module(model, "a", a)
        tx.replace_module(model, "b", b)
        return GrowthResult(
            param_maps={
                "a.weight": ParamMap("a.weight", (idx, None), scale.view(-1, 1)),
                "a.bias": ParamMap("a.bias", (idx,), scale),
                "b.weight": ParamMap("b.weight", (None, idx)),
                "b.bias": ParamMap("b.bias"),
            }
        )


@register_action(_CtrlNet, "widen")
def _widen(model: nn.Module, n: int = 1) -> OpConfig:
    return _AddUnitsConfig(n=n)


@register_action(_CtrlNet, "deepen")  # stands in for a depth operator in these tests
def _deepen(model: nn.Module) -> OpConfig:
    return _AddUnitsConfig(n=1)


P0 = 4 * 3 + 3 + 3 * 2 + 2  # 23 params
P_PER_UNIT = 4 + 1 + 2  # 7 params per added hidden unit


class ListSink:
    def __init__(self) -> None:
        self.events: list = []
        self.scalars: list[tuple[int, dict[str, float]]] = []
        self.closed = False

    def emit(self, ev) -> None:
        self.events.append(ev)

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        self.scalars.append((step, dict(values)))

    def close(self) -> None:
        self.closed = True


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    m = _CtrlNet()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    return m, opt


def _train_step(m: nn.Module, opt: torch.optim.Optimizer, g: torch.Generator) -> None:
    x = torch.randn(8, 4, generator=g)
    opt.zero_grad()
    m(x).pow(2).mean().backward()
    opt.step()


def _plateau_trace(n: int = 80, flat_from: int = 21) -> list[float]:
    """Loss falls 0.05/step until ``flat_from`` then stays at 1.0 (steps are 1-based)."""
    return [2.0 - 0.05 * (s - 1) if s < flat_from else 1.0 for s in range(1, n + 1)]


# ---------------------------------------------------------------------------------------------
# scripted traces (table-driven)
# ---------------------------------------------------------------------------------------------
# window 10, ema 0: the loss is flat from step 21, so the relative drop over 10 steps first
# falls below 1% at step 31; after a growth the window refills in 11 steps.
CASES = [
    ("plain", {}, {}, [31, 42], [(53, "max_growths")]),
    ("warmup", {"warmup_steps": 40, "max_growths": 1}, {}, [40], [(31, "warmup"),
                                                                  (51, "max_growths")]),
    ("cooldown", {"cooldown": 20}, {}, [31, 51], [(42, "cooldown"), (62, "max_growths")]),
    ("budget", {"budget": Budget(max_params=P0 + P_PER_UNIT - 1)}, {}, [], [(31, "budget")]),
    ("budget_fits_once", {"budget": Budget(max_params=P0 + P_PER_UNIT)}, {}, [31],
     [(42, "budget")]),
    ("window", {"growth_window": (0.0, 0.35)}, {"total_steps": 100}, [31], [(42, "window")]),
    ("warmup_fraction", {"warmup_steps": 0.45}, {"total_steps": 100}, [45, 56],
     [(31, "warmup"), (67, "max_growths")]),
]


@pytest.mark.parametrize("case,pol_kw,ctrl_kw,growth_steps,skips", CASES, ids=[c[0] for c in CASES])
def test_scripted_loss_trace(case, pol_kw, ctrl_kw, growth_steps, skips):
    m, opt = _setup()
    sink = ListSink()
    pol_kw = {"max_growths": 2, **pol_kw}
    ctrl = GrowthController(
        m, opt,
        signals=[LossPlateau(window=10, min_rel_drop=0.01, ema=0.0)],
        policy=RulePolicy([Rule("loss_plateau", action="widen")], **pol_kw),
        sinks=[sink], probe=torch.randn(5, 4), **ctrl_kw,
    )
    returned = []
    for s, loss in enumerate(_plateau_trace(), start=1):
        ev = ctrl.observe(loss=torch.tensor(loss))
        if ev is not None:
            returned.append(ev.step)
        assert ctrl.step == s
    grown = [e.step for e in ctrl.events if e.kind == "growth"]
    assert grown == growth_steps == returned
    got_skips = [(e.step, e.extra["blocked"]) for e in ctrl.events if e.kind == "skipped"]
    assert got_skips == skips  # rate-limited: one event per (reason, signal, action)
    assert ctrl.n_growths == len(growth_steps)
    assert sum(p.numel() for p in m.parameters()) == P0 + P_PER_UNIT * len(growth_steps)
    assert sink.events == ctrl.events
    for e in ctrl.events:
        if e.kind == "growth":
            assert e.trigger["signal"] == "loss_plateau"
            assert e.trigger["threshold"] == 0.01 and e.trigger["window"] == 10
            assert e.trigger["value"] < 0.01
            assert e.preservation["max_rel"] <= 1e-5
        else:
            assert e.reason and "skipped" in e.reason


def test_skips_are_relogged_once_per_cooldown_and_on_reason_change():
    m, opt = _setup()
    ctrl = GrowthController(
        m, opt,
        signals=[LossPlateau(window=10, min_rel_drop=0.01, ema=0.0)],
        policy=RulePolicy([Rule("loss_plateau", "widen")],
                          budget=Budget(max_params=P0), cooldown=25),
    )
    assert ctrl.skip_log_every == 25
    for loss in _plateau_trace(n=90):
        ctrl.observe(loss=loss)
    skipped = [e for e in ctrl.events if e.kind == "skipped"]
    assert [e.step for e in skipped] == [31, 56, 81]
    assert ctrl.n_skipped == 90 - 30
    assert skipped[-1].extra["n_skipped"] == 81 - 30


def test_nonfinite_loss_is_anomaly_and_never_grows():
    m, opt = _setup()
    sig = LossPlateau(window=10, min_rel_drop=0.01, ema=0.0)
    ctrl = GrowthController(m, opt, signals=[sig], policy=RulePolicy([Rule("loss_plateau",
                                                                         "widen")]))
    bad = {5: float("nan"), 6: float("nan"), 7: float("inf"), 8: float("-inf"), 20: float("nan")}
    for s in range(1, 31):
        ev = ctrl.observe(loss=torch.tensor(bad.get(s, 1.0)))
        if s in bad:
            assert ev is None
    assert ctrl.n_anomalies == 5
    anomalies = [e for e in ctrl.events if e.kind == "anomaly"]
    assert [e.step for e in anomalies] == [5]  # at most one per skip_log_every (100) steps
    assert anomalies[0].extra["n_anomalies"] == 1
    # flat loss: 11 finite updates needed -> step 15 (4 skipped), refill 11 more -> step 27
    assert [e.step for e in ctrl.events if e.kind == "growth"] == [15, 27]
    assert all(e.kind != "growth" or e.step not in bad for e in ctrl.events)


def test_nan_streak_is_relogged_periodically():
    m, opt = _setup()
    ctrl = GrowthController(m, opt, signals=[LossPlateau(window=5)], skip_log_every=10)
    for _ in range(25):
        ctrl.observe(loss=float("nan"))
    assert [e.extra["streak"] for e in ctrl.events] == [1, 11, 21]
    assert ctrl.signals[0].n_updates == 0


def test_alternating_nan_losses_do_not_flood_the_log():
    m, opt = _setup()
    ctrl = GrowthController(m, opt, signals=[LossPlateau(window=5)], skip_log_every=20)
    for s in range(50):
        ctrl.observe(loss=float("nan") if s % 2 else 1.0)
    assert ctrl.n_anomalies == 25
    assert [e.step for e in ctrl.events if e.kind == "anomaly"] == [2, 22, 42]


def test_bad_rule_arguments_fail_at_construction():
    m, opt = _setup()
    with pytest.raises(GrowthConfigError, match="loss_plateau"):
        GrowthController(m, opt, signals=[LossPlateau(window=5)],
                         policy=RulePolicy([Rule("loss_plateau", "widen",
                                                 kwargs={"no_such_argument": 1})]))


def test_replay_forgetting_trace_widens_with_kwargs():
    m, opt = _setup()
    ctrl = GrowthController(
        m, opt,
        signals=[ReplayForgetting(threshold=0.1)],
        policy=RulePolicy([Rule("replay_forgetting", action="widen", kwargs={"n": 2})]),
        provides={"replay_accuracy", "experience_end_accuracy"},
    )
    # experience 0 learned to 0.9; replay accuracy then decays while experience 1 trains
    trace = {3: {0: 0.88}, 6: {0: 0.85}, 9: {0: 0.75}, 12: {0: 0.74}}
    for s in range(1, 13):
        kw = {}
        if s == 1:
            kw["experience_end_accuracy"] = {0: 0.9}
        if s in trace:
            kw["replay_accuracy"] = trace[s]
        ctrl.observe(loss=1.0, experience=1, **kw)
    growths = [e for e in ctrl.events if e.kind == "growth"]
    assert [e.step for e in growths] == [9]
    assert growths[0].experience == 1
    assert growths[0].action["name"] == "widen" and growths[0].action["kwargs"] == {"n": 2}
    assert growths[0].trigger["value"] == pytest.approx(0.15)
    assert growths[0].trigger["worst_experience"] == 0
    assert m.a.out_features == 5


def test_validation_plateau_updates_only_when_given():
    m, opt = _setup()
    sig = ValidationPlateau(window=2, min_rel_drop=0.01)
    ctrl = GrowthController(m, opt, signals=[sig], policy=RulePolicy([Rule("val_plateau",
                                                                         "widen")]))
    vals = {10: 2.0, 20: 1.5, 30: 1.49, 40: 1.49}
    for s in range(1, 41):
        ctrl.observe(loss=1.0, val_loss=vals.get(s))
    assert sig.n_updates == 4
    # window 2 evaluations: (2.0 - 1.49)/2.0 at step 30, (1.5 - 1.49)/1.5 = 0.0067 at step 40
    assert [e.step for e in ctrl.events if e.kind == "growth"] == [40]


# ---------------------------------------------------------------------------------------------
# construction-time validation
# ---------------------------------------------------------------------------------------------
def test_missing_metric_fails_at_construction():
    m, opt = _setup()
    with pytest.raises(GrowthConfigError, match="replay_accuracy"):
        GrowthController(m, opt, signals=[ReplayForgetting()], provides={"val_loss"})
    with pytest.raises(GrowthConfigError, match="val_loss"):
        GrowthController(m, opt, signals=[ValidationPlateau()], provides=set())
    GrowthController(m, opt, signals=[LossPlateau()], provides=set())  # loss is implied


def test_bad_wiring_fails_at_construction():
    m, opt = _setup()
    with pytest.raises(GrowthConfigError, match="not among"):
        GrowthController(m, opt, signals=[LossPlateau()],
                         policy=RulePolicy([Rule("replay_forgetting", "widen")]))
    with pytest.raises(GrowthConfigError, match="duplicate"):
        GrowthController(m, opt, signals=[LossPlateau(), LossPlateau()])
    GrowthController(m, opt, signals=[LossPlateau(), LossPlateau(name="loss_plateau_long")])
    with pytest.raises(IncompatibleModelError, match="add_heads"):
        GrowthController(m, opt, signals=[LossPlateau()],
                         policy=RulePolicy([Rule("loss_plateau", "add_heads")]))
    with pytest.raises(GrowthConfigError, match="total_steps"):
        GrowthController(m, opt, signals=[LossPlateau()],
                         policy=RulePolicy([Rule("loss_plateau", "widen")], warmup_steps=0.1))


# ---------------------------------------------------------------------------------------------
# manual growth, schedules, failures, sinks
# ---------------------------------------------------------------------------------------------
def test_manual_grow_goes_through_the_same_path(tmp_path):
    m, opt = _setup()
    g = torch.Generator().manual_seed(0)
    _train_step(m, opt, g)
    ctrl = GrowthController(m, opt, log_dir=tmp_path / "run", probe=torch.randn(6, 4),
                            run_id="r1")
    ev = ctrl.grow("widen", n=2)
    assert ev.kind == "growth" and ev.trigger["signal"] == "manual" and ev.reason == "manual"
    ev2 = ctrl.grow(_AddUnitsConfig(n=1), reason="because")
    assert ctrl.optimizer is opt and all(p in opt.state for p in m.parameters())
    assert ev2.seq == 1 and ev2.reason == "because" and ev2.params_before == P0 + 2 * P_PER_UNIT
    _train_step(m, opt, g)
    with pytest.raises(GrowthConfigError):
        ctrl.grow("widen", n=99)
    assert m.a.out_features == 6 and len(ctrl.events) == 2
    ctrl.close()
    events, bad = read_events(tmp_path / "run" / "events.jsonl")
    assert not bad and [e.seq for e in events] == [0, 1]


def test_events_jsonl_schema(tmp_path):
    m, opt = _setup()
    sink = ListSink()
    ctrl = GrowthController(
        m, opt,
        signals=[LossPlateau(window=10, min_rel_drop=0.01, ema=0.0)],
        policy=RulePolicy([Rule("loss_plateau", "widen")], max_growths=1),
        log_dir=str(tmp_path), sinks=[sink], probe=torch.randn(5, 4), run_id="exp",
    )
    g = torch.Generator().manual_seed(1)
    for s, loss in enumerate(_plateau_trace(60), start=1):
        _train_step(ctrl.model, ctrl.optimizer, g)
        ctrl.observe(loss=loss, epoch=s // 20)
        if s == 35:
            ctrl.observe(loss=float("nan"))
    ctrl.close()
    assert sink.closed
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert len(lines) == len(ctrl.events) == 3  # growth, anomaly, skipped (max_growths)
    kinds = [json.loads(x)["kind"] for x in lines]
    assert kinds == ["growth", "anomaly", "skipped"]
    d = json.loads(lines[0])
    for k in ("schema_version", "run_id", "seq", "wall_time", "step", "epoch", "experience",
              "trigger", "action", "params_before", "params_after", "preservation",
              "op_seconds", "optimizer", "lr_after", "flops_per_sample_before",
              "flops_per_sample_after", "reason"):
        assert k in d, k
    assert d["run_id"] == "exp" and d["seq"] == 0 and d["step"] == 31 and d["epoch"] == 1
    assert set(d["trigger"]) >= {"signal", "value", "threshold", "window"}
    assert d["action"]["op"] == "_ctrl_add_units" and d["action"]["name"] == "widen"
    assert d["params_after"] == d["params_before"] + P_PER_UNIT
    assert d["preservation"]["max_rel"] <= 1e-5 and d["preservation"]["probe_size"] == 5
    assert d["optimizer"]["migrated"] == 4 and d["lr_after"] == [1e-2]
    assert d["flops_per_sample_after"] > d["flops_per_sample_before"] > 0
    assert [json.loads(x)["seq"] for x in lines] == [0, 1, 2]
    # scalars: every 10 steps, n_params and the signal value
    steps = [s for s, _ in sink.scalars]
    assert steps == list(range(10, 61, 10))
    assert sink.scalars[-1][1]["model/params"] == P0 + P_PER_UNIT
    assert "signal/loss_plateau" in sink.scalars[-1][1]


def test_fixed_schedule_compound_stage_and_budget():
    m, opt = _setup()
    sched = FixedSchedule(
        [(5, "widen", {"n": 1}), (5, "deepen"), (10, _AddUnitsConfig(n=2)), (12, "widen")],
        budget=Budget(max_params=P0 + 4 * P_PER_UNIT),
    )
    ctrl = GrowthController(m, opt, policy=sched)
    out = {s: ctrl.observe(loss=1.0) for s in range(1, 15)}
    assert [(e.kind, e.step) for e in ctrl.events] == [
        ("growth", 5), ("growth", 5), ("growth", 10), ("skipped", 12)]
    assert out[5] is ctrl.events[1]
    assert ctrl.events[-1].extra["blocked"] == "budget"
    assert sched.done == [True] * 4
    assert ctrl.state_dict()["policy"] == {"done": [True] * 4}


def test_schedule_skips_of_distinct_entries_are_each_logged():
    m, opt = _setup()
    sched = FixedSchedule([(3, "widen"), (4, "widen")], budget=Budget(max_params=P0))
    ctrl = GrowthController(m, opt, policy=sched)
    for _ in range(6):
        ctrl.observe(loss=1.0)
    assert [(e.kind, e.step, e.trigger["entry"]) for e in ctrl.events] == [
        ("skipped", 3, 0), ("skipped", 4, 1)]
    assert ctrl.state_dict()["policy"] == {"done": [True, True]}


def test_failed_growth_is_logged_and_starts_cooldown():
    m, opt = _setup()
    ctrl = GrowthController(
        m, opt,
        signals=[LossPlateau(window=10, min_rel_drop=0.01, ema=0.0)],
        policy=RulePolicy([Rule("loss_plateau", "widen", kwargs={"n": 1})], cooldown=30),
    )
    # valid when built (checked then); invalid by the time it fires
    ctrl.policy.rules[0].kwargs["n"] = 50
    for loss in _plateau_trace(70):
        ctrl.observe(loss=loss)
    skipped = [e for e in ctrl.events if e.kind == "skipped"]
    assert [(e.step, e.extra["blocked"]) for e in skipped] == [
        (31, "error"), (32, "cooldown"), (61, "error"), (62, "cooldown")]
    assert "GrowthConfigError" in skipped[0].reason
    assert ctrl.n_growths == 0 and m.a.out_features == 3


def test_budget_uses_analytic_estimate_when_offered():
    m, opt = _setup()
    ctrl = GrowthController(
        m, opt, signals=[LossPlateau(window=10, min_rel_drop=0.01, ema=0.0)],
        policy=RulePolicy([Rule("loss_plateau", "widen")], budget=Budget(max_params=1e6)),
    )
    est = ctrl._estimate("widen", {"n": 2})
    assert est == {"params": P0 + 2 * P_PER_UNIT, "memory_bytes": None,
                   "flops_per_sample": None, "method": "analytic"}


def test_budget_memory_never_copies_the_model(monkeypatch):
    m, opt = _setup()
    ctrl = GrowthController(
        m, opt, signals=[LossPlateau(window=10, min_rel_drop=0.01, ema=0.0)],
        policy=RulePolicy([Rule("loss_plateau", "widen")], budget=Budget(max_memory_bytes=1e9)),
        memory_spec={"batch_size": 8, "input_shape": (4,)},
    )
    import selfgrow.control.controller as cc

    monkeypatch.setattr(cc, "estimate_growth", lambda *a: (_ for _ in ()).throw(RuntimeError()))
    est = ctrl._estimate("widen", {"n": 1})  # this test operator is not meta-safe: analytic
    assert est["method"] == "analytic" and est["params"] == P0 + P_PER_UNIT
    assert est["memory_bytes"] > 4 * (P0 + P_PER_UNIT) * 4
    assert m.a.out_features == 3  # the live model is untouched


def test_budget_estimates_on_a_meta_twin_without_copying_data(monkeypatch):
    import copy as copy_mod

    from selfgrow.models import build_model
    from selfgrow.models.mlp import MLPConfig

    m = build_model(MLPConfig(in_features=4, hidden=(8,), n_classes=3))
    opt = torch.optim.Adam(m.parameters())
    ctrl = GrowthController(
        m, opt, signals=[LossPlateau(window=10, min_rel_drop=0.01, ema=0.0)],
        policy=RulePolicy([Rule("loss_plateau", "widen")], budget=Budget(max_params=10**6)),
    )
    real_deepcopy = copy_mod.deepcopy

    def guarded(obj, memo=None):
        # a deep copy of the model is only allowed with every tensor mapped to a meta tensor
        if isinstance(obj, nn.Module):
            assert memo and all(id(p) in memo for p in obj.parameters()), "data copied"
        return real_deepcopy(obj, memo)

    monkeypatch.setattr(copy_mod, "deepcopy", guarded)
    est = ctrl._estimate("widen", {})
    twin = build_model(MLPConfig(in_features=4, hidden=(16,), n_classes=3))
    assert est["method"] == "meta_twin"
    assert est["params"] == sum(p.numel() for p in twin.parameters())


def test_budget_blocks_a_growth_it_cannot_size(monkeypatch):
    from selfgrow.control import Budget as B

    assert "size unknown" in B(max_params=10).check({"method": "unavailable", "error": "x"})
    assert B().check({"method": "unavailable"}) == ""  # no budget: nothing to enforce


def test_second_rule_fits_budget_when_first_does_not():
    m, opt = _setup()
    ctrl = GrowthController(
        m, opt, signals=[LossPlateau(window=10, min_rel_drop=0.01, ema=0.0)],
        policy=RulePolicy([Rule("loss_plateau", "widen", kwargs={"n": 3}),
                           Rule("loss_plateau", "widen", kwargs={"n": 1})],
                          budget=Budget(max_params=P0 + 2 * P_PER_UNIT), max_growths=1),
    )
    for loss in _plateau_trace(40):
        ctrl.observe(loss=loss)
    g = [e for e in ctrl.events if e.kind == "growth"]
    assert len(g) == 1 and g[0].action["kwargs"] == {"n": 1}
    assert g[0].extra["estimate"]["params"] == P0 + P_PER_UNIT


# ---------------------------------------------------------------------------------------------
# state_dict round-trip
# ---------------------------------------------------------------------------------------------
def _make_ctrl(m, opt):
    return GrowthController(
        m, opt,
        signals=[LossPlateau(window=10, min_rel_drop=0.01, ema=0.5),
                 ReplayForgetting(threshold=0.2)],
        policy=RulePolicy([Rule("loss_plateau", "widen"), Rule("replay_forgetting", "deepen")],
                          cooldown=5, max_growths=3),
        stabilizer=Stabilizer(rewarm_steps=5),
        run_id="rt",
    )


def _drive(ctrl, steps, g):
    losses = _plateau_trace(90)
    for s in steps:
        _train_step(ctrl.model, ctrl.optimizer, g)
        kw = {"replay_accuracy": {0: 0.9 - 0.01 * s}} if s % 7 == 0 else {}
        if s == 7:
            kw["experience_end_accuracy"] = {0: 0.9}
        ctrl.observe(loss=losses[s - 1] + (float("nan") if s == 33 else 0.0), **kw)


def test_state_dict_round_trip_continues_identically():
    m, opt = _setup()
    ref = _make_ctrl(m, opt)
    g_ref = torch.Generator().manual_seed(3)
    _drive(ref, range(1, 91), g_ref)

    m2, opt2 = _setup()
    first = _make_ctrl(m2, opt2)
    g = torch.Generator().manual_seed(3)
    _drive(first, range(1, 46), g)
    state = json.loads(json.dumps(first.state_dict()))  # must be JSON-serialisable
    model_copy = copy.deepcopy(m2)
    opt_copy = torch.optim.Adam(model_copy.parameters(), lr=1e-2)
    opt_copy.load_state_dict(opt2.state_dict())
    g_state = g.get_state()
    first.close()

    resumed = _make_ctrl(model_copy, opt_copy)
    resumed.load_state_dict(state)
    g2 = torch.Generator()
    g2.set_state(g_state)
    _drive(resumed, range(46, 91), g2)

    def sig(evs):
        return [(e.kind, e.seq, e.step, e.trigger.get("signal"), e.params_after) for e in evs]

    assert len([e for e in ref.events if e.kind == "growth"]) >= 2
    assert sig(first.events) + sig(resumed.events) == sig(ref.events)
    assert resumed.state_dict() == json.loads(json.dumps(ref.state_dict()))
    for p, q in zip(m.parameters(), model_copy.parameters(), strict=True):
        assert torch.allclose(p, q)


def test_load_state_dict_rejects_mismatch():
    m, opt = _setup()
    ctrl = _make_ctrl(m, opt)
    sd = ctrl.state_dict()
    other = GrowthController(m, opt, signals=[LossPlateau()])
    with pytest.raises(GrowthConfigError, match="signals"):
        other.load_state_dict(sd)
    with pytest.raises(GrowthConfigError, match="version"):
        ctrl.load_state_dict({**sd, "version": 99})


def test_optimizer_reassignment_reattaches_stabilizer():
    m, opt = _setup()
    stab = Stabilizer(rewarm_steps=4, rewarm_start=0.5)
    ctrl = GrowthController(m, opt, stabilizer=stab)
    ctrl.grow("widen")
    new_opt = torch.optim.SGD(m.parameters(), lr=0.1)
    ctrl.optimizer = new_opt
    seen = []
    new_opt.register_step_pre_hook(lambda o, a, k: seen.append(o.param_groups[0]["lr"]))
    m(torch.randn(2, 4)).sum().backward()
    new_opt.step()
    assert seen == [pytest.approx(0.05)] and new_opt.param_groups[0]["lr"] == 0.1
    lr_before = opt.param_groups[0]["lr"]
    opt.step()  # the old optimizer is no longer scaled
    assert opt.param_groups[0]["lr"] == lr_before


def test_invalid_growth_under_budget_is_logged_not_raised():
    m, opt = _setup()
    ctrl = GrowthController(
        m, opt, signals=[LossPlateau(window=10, min_rel_drop=0.01, ema=0.0)],
        policy=RulePolicy([Rule("loss_plateau", "widen", kwargs={"n": 1})],
                          budget=Budget(max_memory_bytes=1e9), cooldown=100),
        memory_spec={"input_shape": (4,)},
    )
    ctrl.policy.rules[0].kwargs["n"] = 50  # becomes invalid after construction
    for loss in _plateau_trace(40):
        ctrl.observe(loss=loss)
    assert [(e.step, e.extra["blocked"]) for e in ctrl.events] == [(31, "error"), (32, "cooldown")]


def test_make_decision_is_the_distributed_seam():
    m, opt = _setup()

    class Broadcast(GrowthController):
        calls = 0

        def make_decision(self):
            Broadcast.calls += 1
            return super().make_decision()

    ctrl = Broadcast(m, opt, signals=[LossPlateau(window=10, min_rel_drop=0.01, ema=0.0)],
                     policy=RulePolicy([Rule("loss_plateau", "widen")], max_growths=1))
    for loss in _plateau_trace(40):
        ctrl.observe(loss=loss)
    assert Broadcast.calls == 40 and ctrl.n_growths == 1


def test_new_experience_does_not_look_like_a_plateau():
    m, opt = _setup()
    ctrl = GrowthController(m, opt, signals=[LossPlateau(window=5, min_rel_drop=0.01, ema=0.0)],
                            policy=RulePolicy([Rule("loss_plateau", "widen")]))
    for s in range(1, 21):
        exp = 0 if s <= 10 else 1
        loss = 2.0 - 0.1 * s if exp == 0 else 3.0 - 0.1 * (s - 10)  # jumps up at step 11
        ctrl.observe(loss=loss, experience=exp)
    assert ctrl.n_growths == 0


def test_signals_taking_turns_under_one_limit_log_one_skip():
    m, opt = _setup()
    ctrl = GrowthController(
        m, opt,
        signals=[LossPlateau(window=10, min_rel_drop=0.01, ema=0.0), ReplayForgetting(0.1)],
        policy=RulePolicy([Rule("replay_forgetting", "widen", {"n": 2}),
                           Rule("loss_plateau", "widen")], cooldown=100),
    )
    for s, loss in enumerate(_plateau_trace(120), start=1):
        kw = {"replay_accuracy": {0: 0.5 if s % 2 else 0.9}} if s >= 50 else {}
        if s == 1:
            kw["experience_end_accuracy"] = {0: 0.9}
        ctrl.observe(loss=loss, **kw)
    evs = [(e.kind, e.step, e.trigger["signal"]) for e in ctrl.events]
    assert evs == [("growth", 31, "loss_plateau"), ("skipped", 42, "loss_plateau")]


def test_memory_budget_without_memory_spec_fails_at_construction():
    from selfgrow.control import Budget, FixedSchedule

    m, opt = _setup()
    with pytest.raises(GrowthConfigError, match="memory_spec"):
        GrowthController(m, opt, policy=FixedSchedule([(2, "widen")],
                                                      budget=Budget(max_memory_bytes=1000)))


def test_rule_argument_values_are_validated_against_the_model_at_construction():
    from selfgrow.models.transformer import GrowableTransformer, TransformerConfig

    m = GrowableTransformer(TransformerConfig())
    opt = torch.optim.Adam(m.parameters())
    with pytest.raises(GrowthConfigError, match="widen"):  # widen_d_model wants an int factor
        GrowthController(m, opt, signals=[LossPlateau(window=5)],
                         policy=RulePolicy([Rule("loss_plateau", "widen",
                                                 kwargs={"factor": 2.5})]))
