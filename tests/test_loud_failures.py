"""A growth the policy decided that fails is loud: a ``skipped`` event with the reason AND a
:class:`GrowthFailedWarning` (once per distinct reason); ``strict=True`` raises. Model,
optimizer and gradients stay exactly as they were."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from selfgrow import (
    FixedSchedule,
    GrowthController,
    GrowthFailedWarning,
    LossPlateau,
    Rule,
    RulePolicy,
    SelfgrowWarning,
    build_model,
    grow_,
    make_config,
)
from selfgrow.errors import GrowthConfigError, IncompatibleModelError
from selfgrow.models.mlp import MLPConfig
from selfgrow.ops import get_operator
from selfgrow.optim import register_optimizer


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(MLPConfig(in_features=16, hidden=(6,), n_classes=4))


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss


def _snapshot(model, opt):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {id(p): {k: v.clone() if isinstance(v, torch.Tensor) else v
                     for k, v in st.items()} for p, st in opt.state.items()},
            {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()})


def _same(a, b) -> bool:
    wa, sa, ga = a
    wb, sb, gb = b
    if wa.keys() != wb.keys() or any(not torch.equal(wa[k], wb[k]) for k in wa):
        return False
    if sa.keys() != sb.keys():
        return False
    for p in sa:
        if sa[p].keys() != sb[p].keys():
            return False
        for k in sa[p]:
            x, y = sa[p][k], sb[p][k]
            if isinstance(x, torch.Tensor) and not torch.equal(x, y):
                return False
    return ga.keys() == gb.keys() and all(
        (ga[n] is None and gb[n] is None) or torch.equal(ga[n], gb[n]) for n in ga)


class OddSGD(torch.optim.SGD):
    """A registered optimizer that later keeps per-coordinate state selfgrow cannot migrate."""

    def step(self, closure=None):
        out = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["odd_trace"] = torch.zeros_like(p)
        return out


register_optimizer(OddSGD)


def _fail_operator(monkeypatch):
    op = get_operator("net2wider")

    def boom(model, config, tx):
        raise RuntimeError("operator exploded")

    monkeypatch.setattr(op, "apply", boom)


def _probe_fails_after_growth():
    def probe_fn(model):
        if model.hidden[0].out_features != 6:
            raise ValueError("probe built for the old width")
        return model(torch.ones(2, 16))

    return probe_fn


FAILURES = {
    # name: (optimizer class, setup(monkeypatch) -> controller kwargs, error type name)
    "incompatible_optimizer": (OddSGD, lambda mp: {}, "IncompatibleOptimizerError"),
    "operator_error": (torch.optim.SGD, lambda mp: _fail_operator(mp) or {}, "RuntimeError"),
    "probe_shape": (torch.optim.SGD, lambda mp: {"probe_fn": _probe_fails_after_growth()},
                    "IncompatibleModelError"),
}


@pytest.mark.parametrize("case", sorted(FAILURES))
def test_failed_growth_is_a_skipped_event_and_a_warning_once_per_reason(case, monkeypatch,
                                                                       tmp_path):
    opt_cls, setup, err = FAILURES[case]
    model = _mlp()
    opt = opt_cls(model.parameters(), lr=0.1)
    kwargs = setup(monkeypatch)
    ctrl = GrowthController(
        model, opt, policy=FixedSchedule([(2, "widen"), (3, "widen")]), log_dir=str(tmp_path),
        **kwargs)
    _step(model, opt)
    ctrl.observe(loss=1.0)
    _step(model, opt)
    before = _snapshot(model, opt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ctrl.observe(loss=1.0)  # step 2: fails
        assert _same(before, _snapshot(model, opt)), "a failed growth changed something"
        ctrl.observe(loss=1.0)  # step 3: the same failure again
    mine = [w for w in caught if issubclass(w.category, GrowthFailedWarning)]
    assert len(mine) == 1, [str(w.message) for w in caught]
    assert issubclass(GrowthFailedWarning, SelfgrowWarning)
    assert err in str(mine[0].message) and "'widen'" in str(mine[0].message)
    assert mine[0].filename == __file__, "the warning should point at the caller's observe()"
    skipped = [e for e in ctrl.events if e.kind == "skipped"]
    assert [e.step for e in skipped] == [2, 3]
    assert all(e.extra["blocked"] == "error" and err in e.reason for e in skipped)
    assert ctrl.n_growths == 0
    ctrl.close()
    logged = [line for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert sum('"skipped"' in line for line in logged) == 2


@pytest.mark.parametrize("case", sorted(FAILURES))
def test_strict_raises_after_logging(case, monkeypatch):
    opt_cls, setup, err = FAILURES[case]
    model = _mlp()
    opt = opt_cls(model.parameters(), lr=0.1)
    ctrl = GrowthController(model, opt, policy=FixedSchedule([(2, "widen")]), strict=True,
                            **setup(monkeypatch))
    _step(model, opt)
    ctrl.observe(loss=1.0)
    _step(model, opt)
    before = _snapshot(model, opt)
    with pytest.raises(Exception) as info:
        ctrl.observe(loss=1.0)
    assert type(info.value).__name__ == err
    assert _same(before, _snapshot(model, opt))
    assert [e.kind for e in ctrl.events] == ["skipped"]


def test_distinct_reasons_each_warn():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctrl = GrowthController(model, opt, policy=FixedSchedule(
        [(1, make_config("net2wider", layer=0, new_width=3)),
         (2, make_config("net2wider", layer=0, new_width=2))]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            ctrl.observe(loss=1.0)
    assert len([w for w in caught if issubclass(w.category, GrowthFailedWarning)]) == 2


def test_unknown_action_error_keeps_the_register_action_hint():
    model = _mlp()
    with pytest.raises(IncompatibleModelError, match="register_action") as info:
        GrowthController(model, None, policy=RulePolicy([Rule("loss_plateau", "grow_wings")]),
                         signals=[LossPlateau(window=10)])
    assert "grow_wings" in str(info.value) and "widen" in str(info.value)


def test_make_config_unknown_field_lists_the_valid_fields():
    with pytest.raises(GrowthConfigError, match="new_width") as info:
        make_config("net2wider", widht=3)
    assert "widht" in str(info.value)


def test_grow_with_a_dict_config_is_the_projects_error():
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(GrowthConfigError, match="make_config"):
        grow_(model, {"op": "net2wider", "new_width": 8})  # type: ignore[arg-type]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
