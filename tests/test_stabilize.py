"""Stabilizer: LR re-warm-up composes with LR schedulers without touching them."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from selfgrow.control import Stabilizer


def _run(sched_fn, stab: Stabilizer | None, grow_at: set[int], steps: int = 12):
    """SGD on p with grad 1: the update size of each step is the LR that step really used."""
    p = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = sched_fn(opt)
    if stab is not None:
        stab.attach(opt)
    used, group_lr = [], []
    for t in range(steps):
        if stab is not None and t in grow_at:
            stab.on_growth(t)
        before = float(p.detach())
        p.grad = torch.ones(1, dtype=torch.float64)
        opt.step()
        used.append(before - float(p.detach()))
        sched.step()
        group_lr.append(opt.param_groups[0]["lr"])
    return used, group_lr, sched, opt


SCHEDULERS = {
    "lambda": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s)),
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=12),
}


@pytest.mark.parametrize("kind", sorted(SCHEDULERS))
def test_rewarm_multiplies_scheduler_lr_and_leaves_scheduler_untouched(kind):
    stab = Stabilizer(rewarm_steps=4, rewarm_start=0.2)
    used, group_lr, sched, _ = _run(SCHEDULERS[kind], stab, {3})
    base_used, base_group_lr, base_sched, _ = _run(SCHEDULERS[kind], None, set())
    factors = [1, 1, 1, 0.2, 0.4, 0.6, 0.8, 1, 1, 1, 1, 1]
    assert used == pytest.approx([u * f for u, f in zip(base_used, factors, strict=True)])
    assert group_lr == pytest.approx(base_group_lr)  # the scheduler never sees the factor
    assert sched.base_lrs == base_sched.base_lrs == [0.1]
    assert sched.get_last_lr() == pytest.approx(base_sched.get_last_lr())


def test_permanent_scale_compounds_and_rewarm_restarts():
    stab = Stabilizer(rewarm_steps=2, rewarm_start=0.5, lr_scale_after=0.5)
    used, _, _, _ = _run(lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0), stab,
                         {2, 6}, steps=9)
    expect = [0.1, 0.1, 0.025, 0.0375, 0.05, 0.05, 0.0125, 0.01875, 0.025]
    assert used == pytest.approx(expect)


def test_disabled_stabilizer_is_identity_and_clipping_works():
    used, _, _, _ = _run(SCHEDULERS["cosine"], Stabilizer(), {3})
    base, _, _, _ = _run(SCHEDULERS["cosine"], None, set())
    assert used == pytest.approx(base)
    p = nn.Parameter(torch.zeros(4))
    opt = torch.optim.SGD([p], lr=1.0)
    stab = Stabilizer(clip_grad_norm=1.0)
    stab.attach(opt)
    p.grad = torch.full((4,), 3.0)
    opt.step()
    assert float(p.detach().norm()) == pytest.approx(1.0)
    only = Stabilizer(clip_grad_norm=1.0, clip_only_during_rewarm=True, rewarm_steps=1)
    stab.detach()
    only.attach(opt)
    p.grad = torch.full((4,), 3.0)
    opt.step()
    assert float(p.grad.norm()) == pytest.approx(6.0)  # not re-warming: no clipping
    only.on_growth(0)
    p.grad = torch.full((4,), 3.0)
    opt.step()
    assert float(p.grad.norm()) == pytest.approx(1.0)


def test_state_dict_round_trip_and_detach():
    a = Stabilizer(rewarm_steps=5, rewarm_start=0.1, lr_scale_after=0.5)
    used_a, _, _, opt = _run(SCHEDULERS["lambda"], a, {1}, steps=3)
    b = Stabilizer(rewarm_steps=5, rewarm_start=0.1, lr_scale_after=0.5)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.factor() == a.factor() == pytest.approx(0.5 * (0.1 + 0.9 * 2 / 5))
    a.detach()
    p = opt.param_groups[0]["params"][0]
    before = float(p.detach())
    p.grad = torch.ones(1, dtype=torch.float64)
    opt.step()
    assert before - float(p.detach()) == pytest.approx(opt.param_groups[0]["lr"])  # no hooks left


def test_tensor_lr_is_restored():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=torch.tensor(0.01))
    stab = Stabilizer(rewarm_steps=2, rewarm_start=0.5)
    stab.attach(opt)
    stab.on_growth(0)
    lr = opt.param_groups[0]["lr"]
    p.grad = torch.ones(1)
    opt.step()
    assert opt.param_groups[0]["lr"] is lr
