"""Core machinery: Transaction rollback, grow_ commit/rollback, by-name optimizer migration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

from selfgrow.errors import GrowthConfigError, IncompatibleModelError, IncompatibleOptimizerError
from selfgrow.ops import GrowthResult, OpConfig, Operator, Transaction, grow_, register_operator
from selfgrow.optim import ParamMap, migrate


class Pair(nn.Module):
    def __init__(self, d: int = 4, h: int = 3) -> None:
        super().__init__()
        self.a = nn.Linear(d, h)
        self.b = nn.Linear(h, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


@dataclass
class _DupConfig(OpConfig):
    """Test-only operator: duplicate hidden unit ``unit`` of Pair (Net2WiderNet by hand)."""

    name: ClassVar[str] = "_test_dup_unit"
    unit: int = 0


@register_operator(_DupConfig)
class _DupUnit(Operator):
    exact = True

    def validate(self, model: nn.Module, config: OpConfig) -> None:
        assert isinstance(config, _DupConfig)
        if not 0 <= config.unit < model.a.out_features:
            raise GrowthConfigError(f"unit {config.unit} out of range")

    def apply(self, model: nn.Module, config: OpConfig, tx: Transaction) -> GrowthResult:
        assert isinstance(config, _DupConfig)
        h = model.a.out_features
        idx = torch.cat([torch.arange(h), torch.tensor([config.unit])])
        a = nn.Linear(model.a.in_features, h + 1)
        b = nn.Linear(h + 1, model.b.out_features)
        a.weight.data = model.a.weight.data[idx].clone()
        a.bias.data = model.a.bias.data[idx].clone()
        counts = torch.bincount(idx, minlength=h).float()
        scale = 1.0 / counts[idx]
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


def _trained(opt_cls=torch.optim.Adam, **kw):
    torch.manual_seed(0)
    m = Pair()
    opt = opt_cls(m.parameters(), lr=1e-2, **kw)
    for _ in range(3):
        opt.zero_grad()
        m(torch.randn(8, 4)).pow(2).sum().backward()
        opt.step()
    return m, opt


def _snapshot(m, opt):
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    st = {
        id(p): {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
        for p, s in opt.state.items()
    }
    groups = [[id(p) for p in g["params"]] for g in opt.param_groups]
    return sd, st, groups, [type(mod) for mod in m.modules()]


def _same(a, b) -> bool:
    sd1, st1, g1, t1 = a
    sd2, st2, g2, t2 = b
    if g1 != g2 or t1 != t2 or sd1.keys() != sd2.keys() or st1.keys() != st2.keys():
        return False
    if any(not torch.equal(sd1[k], sd2[k]) for k in sd1):
        return False
    for k in st1:
        for kk in st1[k]:
            x, y = st1[k][kk], st2[k][kk]
            if isinstance(x, torch.Tensor) and not torch.equal(x, y):
                return False
    return True


def test_grow_is_exact_and_migrates_state():
    m, opt = _trained()
    x = torch.randn(16, 4)
    old = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in m.named_parameters()}
    ev = grow_(m, _DupConfig(unit=1), optimizer=opt, probe=x)
    assert ev.preservation["max_rel"] <= 1e-6
    assert ev.params_after > ev.params_before
    assert m.a.out_features == 4
    assert len({id(p) for g in opt.param_groups for p in g["params"]}) == 4
    assert all(p in opt.state for p in m.parameters())
    # unit 1 now has two copies (rows 1 and 3): each gets m/2 and v/4; other rows unchanged
    idx, share = torch.tensor([0, 1, 2, 1]), torch.tensor([1.0, 0.5, 1.0, 0.5])
    st = opt.state[m.a.weight]
    assert torch.equal(st["exp_avg"], old["a.weight"]["exp_avg"][idx] * share.view(-1, 1))
    assert torch.equal(st["exp_avg_sq"], old["a.weight"]["exp_avg_sq"][idx]
                       * share.view(-1, 1) ** 2)
    # b reads the copies: its columns' state is gathered unscaled; b.bias is carried 1:1
    stb = opt.state[m.b.weight]
    assert stb["exp_avg"].shape == (2, 4)  # widened (the old b.weight state was (2, 3))
    assert torch.equal(stb["exp_avg"], old["b.weight"]["exp_avg"][:, idx])
    for k, v in old["b.bias"].items():
        assert torch.equal(opt.state[m.b.bias][k], v), k
    opt.zero_grad()
    m(x).sum().backward()
    opt.step()  # still steps


def test_failure_in_the_middle_rolls_back_model_and_optimizer():
    m, opt = _trained()
    before = _snapshot(m, opt)

    def boom(_m):
        raise RuntimeError("injected")

    with pytest.raises(RuntimeError, match="injected"):
        grow_(m, _DupConfig(unit=0), optimizer=opt, probe=torch.randn(2, 4), check=boom)
    assert _same(before, _snapshot(m, opt))


def test_negative_control_snapshot_detects_change():
    m, opt = _trained()
    before = _snapshot(m, opt)
    grow_(m, _DupConfig(unit=0), optimizer=opt)
    assert not _same(before, _snapshot(m, opt))


def test_invalid_config_and_models_raise_before_change():
    m, opt = _trained()
    before = _snapshot(m, opt)
    with pytest.raises(GrowthConfigError):
        grow_(m, _DupConfig(unit=99), optimizer=opt)
    for p in m.parameters():
        p.requires_grad_(False)
    with pytest.raises(IncompatibleModelError):
        grow_(m, _DupConfig(unit=0), optimizer=opt)
    for p in m.parameters():
        p.requires_grad_(True)
    assert _same(before, _snapshot(m, opt))
    with pytest.raises(IncompatibleModelError):
        grow_(Pair().to("meta"), _DupConfig(unit=0))


def test_unsupported_optimizer_state_raises_before_change():
    m, opt = _trained(torch.optim.Rprop)  # per-element state selfgrow does not know
    before = _snapshot(m, opt)
    with pytest.raises(IncompatibleOptimizerError, match="Rprop"):
        grow_(m, _DupConfig(unit=0), optimizer=opt)
    assert _same(before, _snapshot(m, opt))


def test_transaction_restores_attributes_and_params():
    m = Pair()
    w = m.a.weight
    with pytest.raises(ValueError), Transaction() as tx:
        tx.set_parameter(m.a, "weight", torch.zeros(3, 4))
        tx.set_attr(m, "extra", 5)
        raise ValueError
    assert m.a.weight is w and not hasattr(m, "extra")


def test_migrate_new_coordinates_get_nonzero_second_moment():
    m, opt = _trained()
    old = dict(m.named_parameters())
    new_w = nn.Parameter(torch.cat([m.a.weight.data, torch.zeros(1, 4)]))
    m.a.weight = new_w
    idx = torch.tensor([0, 1, 2, -1])
    migrate(opt, old, dict(m.named_parameters()), {"a.weight": ParamMap("a.weight", (idx, None))})
    st = opt.state[new_w]
    assert torch.all(st["exp_avg"][3] == 0)
    assert torch.all(st["exp_avg_sq"][3] > 0)
    assert old["a.weight"] not in opt.state


def test_bad_model_and_unrelated_optimizer_are_refused_before_change():
    m, opt = _trained()
    with pytest.raises(IncompatibleModelError, match="nn.Module"):
        grow_("hello", _DupConfig(unit=0))  # type: ignore[arg-type]
    other = torch.optim.Adam(Pair().parameters())
    before = _snapshot(m, opt)
    with pytest.raises(IncompatibleOptimizerError, match="none of the model"):
        grow_(m, _DupConfig(unit=0), optimizer=other)
    assert _same(before, _snapshot(m, opt))


def test_preservation_error_compares_old_features_of_a_widened_output():
    from selfgrow.ops._registry import preservation_error

    y = torch.randn(3, 5, 4)
    same = preservation_error(y, torch.cat([y, y], dim=-1))
    assert same["max_abs"] == 0.0 and "first 4 of 8" in same["compared"]
    off = preservation_error(y, torch.cat([y + 1e-3, y], dim=-1))  # control: a real change
    assert off["max_abs"] > 9e-4
    assert preservation_error(y, y[:2])["max_rel"] == float("inf")
