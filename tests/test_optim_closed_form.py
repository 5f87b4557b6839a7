"""The second moment of new coordinates after growth has the documented CLOSED-FORM value,
not merely "within 2x" (docs/optimizer-after-growth.md, selfgrow/optim.py).

At their first gradient ``g`` after growth, new coordinates get ``m = 0`` and a second moment
``c * g^2`` with ``c`` solved from the optimizer's update rule so that their update matches
the target RMS ``r`` (in units of lr): the RMS of the same tensor's old coordinates' update in
that very step (new coordinates inside a grown tensor), or the sibling's last normalised
update RMS (brand-new tensors). Since ``m = 0``, the update of every new coordinate is then
``lr * r * sign(g)`` EXACTLY (up to eps), whatever its gradient's size; equivalently, after
the step the second moment holds the unique value giving that update. Any other ``c``
(0, the fallback ``mean(v_old)``, ...) moves the new coordinates by a different amount, and
these tests fail.

Gradients of the new coordinates are made 20x smaller than the old ones', so ``c`` is far
from 0 (``c = 0`` would make the update Adam's sign-like step, much larger than ``r``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from selfgrow.optim import LAZY_INIT_KEY, ParamMap, migrate

DT = torch.float64
OLD, NEW, COLS = 6, 3, 5
LR = 1e-2


def _grad(seed: int, rows: int = OLD, scale_new: float = 1.0) -> torch.Tensor:
    g = torch.randn(rows, COLS, generator=torch.Generator().manual_seed(seed), dtype=DT)
    g[OLD:] *= scale_new
    return g


def _trained(make: Callable[[list[nn.Parameter]], torch.optim.Optimizer], steps: int = 7
             ) -> tuple[nn.Parameter, torch.optim.Optimizer]:
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(OLD, COLS, dtype=DT))
    opt = make([p])
    for s in range(steps):
        p.grad = _grad(s)
        opt.step()
    return p, opt


def _grow_rows(p: nn.Parameter, opt: torch.optim.Optimizer) -> nn.Parameter:
    """Append NEW brand-new rows to ``p`` (index -1) and migrate the optimizer."""
    q = nn.Parameter(torch.cat([p.detach(), torch.zeros(NEW, COLS, dtype=DT)]))
    idx = torch.cat([torch.arange(OLD), torch.full((NEW,), -1)])
    migrate(opt, {"w": p}, {"w": q}, {"w": ParamMap("w", (idx, None))})
    return q


def _first_step(q: nn.Parameter, opt: torch.optim.Optimizer) -> tuple[torch.Tensor,
                                                                      torch.Tensor]:
    g = _grad(100, OLD + NEW, scale_new=0.05)
    before = q.detach().clone()
    q.grad = g.clone()
    opt.step()
    return q.detach() - before, g


def _rms(x: torch.Tensor) -> float:
    return float(x.pow(2).mean().sqrt())


OPTIMIZERS: dict[str, tuple[Callable[[list[nn.Parameter]], torch.optim.Optimizer], str]] = {
    "adam": (lambda ps: torch.optim.Adam(ps, lr=LR, betas=(0.9, 0.999)), "exp_avg_sq"),
    "adam-betas": (lambda ps: torch.optim.Adam(ps, lr=LR, betas=(0.8, 0.99)), "exp_avg_sq"),
    "adamw": (lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=0.0), "exp_avg_sq"),
    "rmsprop": (lambda ps: torch.optim.RMSprop(ps, lr=LR, alpha=0.9), "square_avg"),
    "adagrad": (lambda ps: torch.optim.Adagrad(ps, lr=LR), "sum"),
}


def _second_moment_giving(opt: torch.optim.Optimizer, key: str, g: torch.Tensor, r: float,
                          step: float) -> torch.Tensor:
    """The value of ``key`` after the step for which a coordinate with m = 0 before the step
    and gradient ``g`` moves by exactly ``lr * r`` (eps neglected)."""
    group = opt.param_groups[0]
    if key == "exp_avg_sq":  # update = (1-b1) g / bc1 / sqrt(v / bc2)
        b1, b2 = group["betas"]
        bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
        return bc2 * ((1 - b1) * g / (bc1 * r)) ** 2
    return (g / r) ** 2  # RMSprop, Adagrad: update = g / sqrt(v)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_new_coordinates_move_exactly_like_the_old_ones(name):
    make, key = OPTIMIZERS[name]
    p, opt = _trained(make)
    q = _grow_rows(p, opt)
    step = float(opt.state[q]["step"]) + 1 if "step" in opt.state[q] else None
    delta, g = _first_step(q, opt)
    r = _rms(delta[:OLD]) / LR  # this step's update RMS of the old coordinates
    assert r > 0
    # every new coordinate moves by exactly lr * r (not just an RMS within 2x)
    torch.testing.assert_close(delta[OLD:].abs(), torch.full_like(delta[OLD:], LR * r),
                               rtol=1e-5, atol=0)
    assert torch.equal(delta[OLD:].sign(), -g[OLD:].sign())
    # ... which pins the second moment of the new coordinates to its closed form
    st = opt.state[q]
    want = _second_moment_giving(opt, key, g[OLD:], r, step or 0.0)
    torch.testing.assert_close(st[key][OLD:], want, rtol=1e-5, atol=0)
    if "exp_avg" in st:  # m = 0 before the step: m = (1 - b1) g after it
        b1 = opt.param_groups[0]["betas"][0]
        torch.testing.assert_close(st["exp_avg"][OLD:], (1 - b1) * g[OLD:], rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["adam", "rmsprop", "adagrad"])
def test_negative_control_c_zero_moves_new_coordinates_differently(name, monkeypatch):
    """The check above discriminates: with the pending initialisation dropped (v of the new
    coordinates left at the fallback ``mean(v_old)``) the same comparison fails."""
    import selfgrow.optim as so

    monkeypatch.setattr(so, "_lazy_capable", lambda group: False)
    make, _ = OPTIMIZERS[name]
    p, opt = _trained(make)
    q = _grow_rows(p, opt)
    delta, _ = _first_step(q, opt)
    r = _rms(delta[:OLD]) / LR
    ratio = delta[OLD:].abs() / (LR * r)
    assert not torch.allclose(ratio, torch.ones_like(ratio), rtol=0.05), ratio


def test_amsgrad_max_second_moment_of_new_coordinates():
    """AdamW(amsgrad): exp_avg_sq and max_exp_avg_sq of the new coordinates are both set to
    ``c g^2`` (``c`` from the documented formula), then stepped by Adam."""
    p, opt = _trained(lambda ps: torch.optim.AdamW(ps, lr=LR, amsgrad=True, weight_decay=0.0))
    q = _grow_rows(p, opt)
    t = float(opt.state[q]["step"])
    g = _grad(100, OLD + NEW, scale_new=0.05)
    st = opt.state[q]
    b1, b2 = opt.param_groups[0]["betas"]
    # the target: this step's update RMS of the old coordinates, as the code computes it
    m1 = b1 * st["exp_avg"][:OLD] + (1 - b1) * g[:OLD]
    v1 = b2 * st["exp_avg_sq"][:OLD] + (1 - b2) * g[:OLD] ** 2
    bc1, bc2 = 1 - b1 ** (t + 1), 1 - b2 ** (t + 1)
    r = _rms((m1 / bc1) / ((v1 / bc2).sqrt() + opt.param_groups[0]["eps"]))
    c = (((1 - b1) * math.sqrt(bc2) / (bc1 * r)) ** 2 - (1 - b2)) / b2  # documented _adam_c
    assert c > 0.5 * (1 - b2)  # far from the clamp at 0: c = 0 is a different value
    q.grad = g.clone()
    opt.step()
    st = opt.state[q]
    v_after = (b2 * c + 1 - b2) * g[OLD:] ** 2
    torch.testing.assert_close(st["exp_avg_sq"][OLD:], v_after, rtol=1e-6, atol=0)
    torch.testing.assert_close(st["max_exp_avg_sq"][OLD:],
                               torch.maximum(c * g[OLD:] ** 2, v_after), rtol=1e-6, atol=0)


# ------------------------------------------------------------------ brand-new tensors
def _grow_new_tensor(make: Callable[[list[nn.Parameter]], torch.optim.Optimizer]
                     ) -> tuple[nn.Parameter, torch.optim.Optimizer, dict]:
    p, opt = _trained(make)
    sib = {k: v.clone() for k, v in opt.state[p].items()}
    q = nn.Parameter(torch.zeros(4, COLS, dtype=DT))
    migrate(opt, {"a.w": p}, {"a.w": p, "a.w2": q}, {"a.w2": ParamMap(None)})
    assert LAZY_INIT_KEY in opt.state[q]
    return q, opt, sib


def test_brand_new_tensor_adam_moves_by_the_siblings_normalised_update():
    q, opt, sib = _grow_new_tensor(lambda ps: torch.optim.Adam(ps, lr=LR))
    b1, b2 = opt.param_groups[0]["betas"]
    t = float(sib["step"])
    m_hat, v_hat = sib["exp_avg"] / (1 - b1 ** t), sib["exp_avg_sq"] / (1 - b2 ** t)
    r = _rms(m_hat / (v_hat.sqrt() + opt.param_groups[0]["eps"]))  # documented target
    g = _grad(7, 4) * 0.05
    q.grad = g.clone()
    before = q.detach().clone()
    opt.step()
    delta = q.detach() - before
    torch.testing.assert_close(delta.abs(), torch.full_like(delta, LR * r), rtol=1e-5, atol=0)
    assert float(opt.state[q]["step"]) == t + 1  # the sibling's step count, stepped once


def test_brand_new_tensor_adagrad_moves_by_one_over_sqrt_t_plus_one():
    q, opt, sib = _grow_new_tensor(lambda ps: torch.optim.Adagrad(ps, lr=LR))
    t = float(sib["step"])
    g = _grad(7, 4) * 0.05
    q.grad = g.clone()
    before = q.detach().clone()
    opt.step()
    delta = q.detach() - before
    r = 1 / math.sqrt(t + 1)  # documented target (Adagrad after t comparable steps)
    torch.testing.assert_close(delta.abs(), torch.full_like(delta, LR * r), rtol=1e-5, atol=0)
    torch.testing.assert_close(opt.state[q]["sum"], (g / r) ** 2, rtol=1e-6, atol=0)
