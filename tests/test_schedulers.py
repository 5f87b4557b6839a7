"""LR schedulers attached before growth keep stepping correctly after growth.

``grow_`` edits the optimizer in place (same object, same param-group dicts), so a scheduler
built before growth must, after growth: produce the same lr sequence as a reference optimizer
that never grew (same schedule, same number of steps); keep ``base_lrs`` (one per group,
equal to each group's ``initial_lr``); see no new param group; and, for OneCycleLR, keep
cycling momentum / Adam's beta1 on the group that now holds the new parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from _families import make_input, randomize_, run, selfgrow_model
from torch import nn
from torch.optim import lr_scheduler as sched

from selfgrow.models.mlp import GrowableMLP, MLPConfig
from selfgrow.ops import grow_, make_config

TOTAL = 24
GROW_AT = 9

SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], sched.LRScheduler]] = {
    "lambda": lambda o: sched.LambdaLR(o, [lambda s: 0.95**s, lambda s: 1.0 / (1 + s)]),
    "cosine": lambda o: sched.CosineAnnealingLR(o, T_max=TOTAL, eta_min=1e-5),
    "onecycle": lambda o: sched.OneCycleLR(o, max_lr=[1e-2, 5e-3], total_steps=TOTAL + 1,
                                           pct_start=0.3),
}
OPTIMIZERS: dict[str, Callable[[list[dict[str, Any]]], torch.optim.Optimizer]] = {
    "adamw": lambda g: torch.optim.AdamW(g, lr=1e-3, weight_decay=0.01),
    "sgd": lambda g: torch.optim.SGD(g, lr=1e-2, momentum=0.9),
}
#: (model factory, growth config, input batch): depth (new tensors), width (replaced
#: tensors), classifier widening
GROWTHS: dict[str, tuple[Callable[[], nn.Module], Callable[[], Any], Callable[[nn.Module],
                                                                                 tuple]]] = {
    "identity_insert": (lambda: selfgrow_model(), lambda: make_config("identity_insert",
                                                                      positions=(1,)),
                        lambda m: make_input(m)),
    "widen_d_model": (lambda: selfgrow_model(), lambda: make_config("widen_d_model"),
                      lambda m: make_input(m)),
    "net2wider": (lambda: GrowableMLP(MLPConfig(in_features=16, hidden=(8, 8), n_classes=4)),
                  lambda: make_config("net2wider", layer=1, new_width=13),
                  lambda m: (torch.randn(8, 16, generator=torch.Generator().manual_seed(0)),)),
}


def _groups(model: nn.Module) -> list[dict[str, Any]]:
    named = list(model.named_parameters())
    return [{"params": [p for _, p in named if p.dim() > 1]},
            {"params": [p for _, p in named if p.dim() <= 1], "weight_decay": 0.0}]


def _momentum(g: dict[str, Any]) -> float:
    return float(g["betas"][0]) if "betas" in g else float(g["momentum"])


def _trace(opt: torch.optim.Optimizer) -> list[tuple[float, float]]:
    return [(float(g["lr"]), _momentum(g)) for g in opt.param_groups]


@pytest.mark.parametrize("optim", list(OPTIMIZERS))
@pytest.mark.parametrize("growth", list(GROWTHS))
@pytest.mark.parametrize("schedule", list(SCHEDULERS))
def test_scheduler_keeps_stepping_after_growth(schedule, growth, optim):
    make_model, make_cfg, make_x = GROWTHS[growth]
    torch.manual_seed(0)
    model = randomize_(make_model())
    x = make_x(model)
    opt = OPTIMIZERS[optim](_groups(model))
    s = SCHEDULERS[schedule](opt)

    # reference: same schedule on an optimizer that never grows (it only needs params)
    ref_params = [nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))]
    ref_opt = OPTIMIZERS[optim]([{"params": [ref_params[0]]},
                                 {"params": [ref_params[1]], "weight_decay": 0.0}])
    ref = SCHEDULERS[schedule](ref_opt)

    base_lrs = list(s.base_lrs)
    n_groups = len(opt.param_groups)
    group_dicts = list(opt.param_groups)
    grown_ids: set[int] = set()
    momenta_new_group: list[float] = []
    for step in range(TOTAL):
        assert _trace(opt) == _trace(ref_opt), step  # bit-identical: same arithmetic
        if step == GROW_AT:
            before = {id(p) for p in model.parameters()}
            grow_(model, make_cfg(), optimizer=opt)
            grown_ids = {id(p) for p in model.parameters()} - before
            assert grown_ids, "the growth made no new parameter tensors"
            assert len(opt.param_groups) == n_groups, "growth added a param group"
            assert all(a is b for a, b in zip(opt.param_groups, group_dicts, strict=True))
            assert s.optimizer is opt
        opt.zero_grad()
        run(model, x).float().pow(2).mean().backward()
        ref_opt.zero_grad()
        opt.step()
        ref_opt.step()
        s.step()
        ref.step()
        if grown_ids:
            holder = [gi for gi, g in enumerate(opt.param_groups)
                      if grown_ids & {id(p) for p in g["params"]}]
            assert holder, "new parameters are in no param group"
            momenta_new_group.append(_momentum(opt.param_groups[holder[0]]))
        assert all(math.isfinite(float(g["lr"])) for g in opt.param_groups)
    # base_lrs unchanged, one per group, and equal to each group's initial_lr (not stale)
    assert s.base_lrs == base_lrs == ref.base_lrs
    assert len(s.base_lrs) == len(opt.param_groups)
    assert [g["initial_lr"] for g in opt.param_groups] == s.base_lrs
    assert s.get_last_lr() == ref.get_last_lr()
    assert s.last_epoch == ref.last_epoch == TOTAL
    if schedule == "onecycle":  # momentum / beta1 keeps cycling on the new params' group
        assert len(set(momenta_new_group)) > 3, momenta_new_group
        assert max(momenta_new_group) <= 0.95 + 1e-12 and min(momenta_new_group) >= 0.85 - 1e-12


@pytest.mark.parametrize("schedule", list(SCHEDULERS))
def test_scheduler_state_dict_round_trip_after_growth(schedule):
    """A scheduler saved after growth resumes on a rebuilt optimizer with the same lrs."""
    torch.manual_seed(0)
    model = randomize_(selfgrow_model())
    x = make_input(model)
    opt = OPTIMIZERS["adamw"](_groups(model))
    s = SCHEDULERS[schedule](opt)
    for step in range(6):
        if step == 3:
            grow_(model, make_config("widen_d_model"), optimizer=opt)
        opt.zero_grad()
        run(model, x).float().pow(2).mean().backward()
        opt.step()
        s.step()
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": g["params"]}
              for g in opt.param_groups]
    opt2 = OPTIMIZERS["adamw"](groups)
    opt2.load_state_dict(opt.state_dict())
    s2 = SCHEDULERS[schedule](opt2)
    s2.load_state_dict(s.state_dict())
    for _ in range(4):
        opt.step()
        opt2.step()
        s.step()
        s2.step()
        assert _trace(opt2) == _trace(opt)
