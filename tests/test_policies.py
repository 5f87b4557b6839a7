"""Policies are pure: scripted states + context -> (decision, reason)."""

from __future__ import annotations

import pytest

from selfgrow.control import Budget, Decision, FixedSchedule, Rule, RulePolicy
from selfgrow.control.policies import PolicyContext
from selfgrow.errors import GrowthConfigError


def _st(name: str, triggered: bool, value: float = 0.0, **extra) -> dict:
    return {"signal": name, "value": value, "threshold": 0.01, "window": 10,
            "triggered": triggered, **extra}


def _est(params_per_action: dict[str, int]):
    calls = []

    def estimate(action, kwargs):
        calls.append((action, dict(kwargs)))
        return {"params": params_per_action[action] * kwargs.get("n", 1),
                "memory_bytes": 1000, "flops_per_sample": 10.0}

    estimate.calls = calls  # type: ignore[attr-defined]
    return estimate


RULES = [Rule("loss_plateau", "deepen"), Rule("replay_forgetting", "widen", {"factor": 1.5})]

# (policy kwargs, states, ctx kwargs, expected (action or None, blocked code))
TABLE = [
    ("nothing", {}, {}, {}, (None, None)),
    ("first_rule", {}, {"loss_plateau": True, "replay_forgetting": True}, {}, ("deepen", "")),
    ("second_rule", {}, {"replay_forgetting": True}, {}, ("widen", "")),
    ("warmup", {"warmup_steps": 100}, {"loss_plateau": True}, {"step": 99},
     ("deepen", "warmup")),
    ("warmup_done", {"warmup_steps": 100}, {"loss_plateau": True}, {"step": 100},
     ("deepen", "")),
    ("warmup_fraction", {"warmup_steps": 0.1}, {"loss_plateau": True},
     {"step": 99, "total_steps": 1000}, ("deepen", "warmup")),
    ("window_early", {"growth_window": (0.2, 0.8)}, {"loss_plateau": True},
     {"step": 100, "total_steps": 1000}, ("deepen", "window")),
    ("window_inside", {"growth_window": (0.2, 0.8)}, {"loss_plateau": True},
     {"step": 500, "total_steps": 1000}, ("deepen", "")),
    ("window_late", {"growth_window": (0.2, 0.8)}, {"loss_plateau": True},
     {"step": 801, "total_steps": 1000}, ("deepen", "window")),
    ("cooldown", {"cooldown": 50}, {"loss_plateau": True},
     {"step": 149, "last_growth_step": 100}, ("deepen", "cooldown")),
    ("cooldown_over", {"cooldown": 50}, {"loss_plateau": True},
     {"step": 150, "last_growth_step": 100}, ("deepen", "")),
    ("cooldown_after_failure", {"cooldown": 50}, {"loss_plateau": True},
     {"step": 149, "last_attempt_step": 100}, ("deepen", "cooldown")),
    ("max_growths", {"max_growths": 2}, {"loss_plateau": True}, {"n_growths": 2},
     ("deepen", "max_growths")),
    ("budget_first_fits", {"budget": Budget(max_params=150)}, {"loss_plateau": True,
     "replay_forgetting": True}, {}, ("deepen", "")),
    ("budget_second_fits", {"budget": Budget(max_params=120)}, {"loss_plateau": True,
     "replay_forgetting": True}, {}, ("widen", "")),
    ("budget_none_fits", {"budget": Budget(max_params=50)}, {"loss_plateau": True},
     {}, ("deepen", "budget")),
    ("budget_memory", {"budget": Budget(max_memory_bytes=999)}, {"loss_plateau": True},
     {}, ("deepen", "budget")),
    ("budget_flops", {"budget": Budget(max_flops_per_sample=10.0)}, {"loss_plateau": True},
     {}, ("deepen", "")),
]


@pytest.mark.parametrize("name,pol_kw,trig,ctx_kw,expect", TABLE, ids=[t[0] for t in TABLE])
def test_rule_policy_table(name, pol_kw, trig, ctx_kw, expect):
    pol = RulePolicy(RULES, **pol_kw)
    states = {n: _st(n, trig.get(n, False)) for n in ("loss_plateau", "replay_forgetting")}
    est = _est({"deepen": 140, "widen": 110})
    ctx = PolicyContext(**{"step": 1000, "n_params": 100, "estimate": est,
                           "total_steps": None, **ctx_kw})
    before = repr(states), repr(ctx)
    d, reason = pol.decide(states, ctx)
    assert (repr(states), repr(ctx)) == before  # pure
    assert isinstance(reason, str) and reason
    action, blocked = expect
    if action is None:
        assert d is None
        return
    assert isinstance(d, Decision) and d.action == action and (d.blocked or "") == blocked
    assert d.go == (blocked == "")
    assert d.trigger["signal"] in ("loss_plateau", "replay_forgetting")
    assert set(d.trigger) >= {"signal", "value", "threshold", "window"}
    if blocked:
        assert "skipped" in reason
    if action == "widen":
        assert d.kwargs == {"factor": 1.5}
    if "budget" in pol_kw and not blocked:
        assert d.estimate is not None
    if "budget" not in pol_kw:
        assert est.calls == []  # no estimate needed without a budget


def test_limits_checked_before_costly_budget_estimate():
    est = _est({"deepen": 1})
    pol = RulePolicy(RULES, budget=Budget(max_params=10), cooldown=10)
    d, _ = pol.decide({"loss_plateau": _st("loss_plateau", True)},
                      PolicyContext(step=5, n_params=1, last_growth_step=0, estimate=est))
    assert d is not None and d.blocked == "cooldown" and est.calls == []


def test_from_state_copies_layers_into_kwargs():
    pol = RulePolicy([Rule("gradient_saturation", "widen_layers", from_state={"layers": "layers"},
                           kwargs={"factor": 2})])
    d, _ = pol.decide({"gradient_saturation": _st("gradient_saturation", True,
                                                  layers=["blocks.1.ffn"])},
                      PolicyContext(step=1, n_params=1))
    assert d.kwargs == {"factor": 2, "layers": ["blocks.1.ffn"]}
    assert d.trigger["layers"] == ["blocks.1.ffn"]


def test_fractions_need_total_steps():
    pol = RulePolicy(RULES, warmup_steps=0.5)
    assert pol.needs_total_steps()
    with pytest.raises(GrowthConfigError, match="total_steps"):
        pol.decide({"loss_plateau": _st("loss_plateau", True)}, PolicyContext(step=1, n_params=1))
    assert not RulePolicy(RULES, warmup_steps=100.0).needs_total_steps()


def test_fixed_schedule_pure_then_notified():
    sched = FixedSchedule([(10, "deepen"), (10, "widen", {"factor": 2}), (0.5, "deepen")])
    ctx = PolicyContext(step=9, n_params=1, total_steps=100)
    assert sched.decide({}, ctx)[0] is None
    ctx.step = 10
    d1, _ = sched.decide({}, ctx)
    assert d1.action == "deepen" and d1.go and d1.trigger["signal"] == "schedule"
    assert sched.decide({}, ctx)[0].action == "deepen"  # pure until notified
    sched.notify(d1, 10, applied=True)
    d2, _ = sched.decide({}, ctx)
    assert d2.action == "widen" and d2.kwargs == {"factor": 2}
    sched.notify(d2, 10, applied=True)
    assert sched.decide({}, ctx)[0] is None
    ctx.step = 50
    d3, reason = sched.decide({}, ctx)
    assert d3.action == "deepen" and "step 50" in reason
    other = FixedSchedule([(10, "deepen"), (10, "widen", {"factor": 2}), (0.5, "deepen")])
    other.load_state_dict(sched.state_dict())
    assert other.done == [True, True, False]


@pytest.mark.parametrize("entries,msg", [
    ([(5,)], "must be"), ([(-1, "widen")], ">= 0"), ([(1.5, "widen")], "fraction"),
    ([(5, 42)], "action"),
])
def test_fixed_schedule_rejects_bad_entries(entries, msg):
    with pytest.raises(GrowthConfigError, match=msg):
        FixedSchedule(entries)
