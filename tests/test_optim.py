"""Optimizer-state migration through classifier growth (Adam, AdamW, SGD with momentum).

Two param groups with different hyper-parameters (layers vs head); after Net2WiderNet or
identity insertion: untouched parameters keep their state objects and values, groups keep
their hyper-parameters and members, no parameter appears twice, the optimizer keeps stepping,
the first Adam update on copied / new coordinates has an RMS within 2x of old coordinates, and
state follows renamed layers by NAME.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfgrow import grow_
from selfgrow.models.cnn import CNNConfig, GrowableCNN
from selfgrow.models.mlp import GrowableMLP, MLPConfig
from selfgrow.ops import OpConfig
from selfgrow.ops.net2net import Net2DeeperConfig, Net2WiderConfig

FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "mlp": lambda: GrowableMLP(MLPConfig(in_features=64, hidden=(12, 10, 10), n_classes=10)),
    "cnn": lambda: GrowableCNN(
        CNNConfig(in_channels=1, image_size=8, channels=(4, 6, 6), n_classes=10, pool_after=(0,))
    ),
}
OPTIMIZERS: dict[str, Callable[[list[dict[str, Any]]], torch.optim.Optimizer]] = {
    "adam": lambda groups: torch.optim.Adam(groups),
    "adamw": lambda groups: torch.optim.AdamW(groups, weight_decay=0.01),
    "sgd": lambda groups: torch.optim.SGD(groups, momentum=0.9),
}
GROWTHS: dict[str, Callable[[nn.Module], OpConfig]] = {
    "wider0": lambda m: Net2WiderConfig(layer=0, new_width=_widths(m)[0] + 7),
    "wider_last": lambda m: Net2WiderConfig(layer=2, new_width=2 * _widths(m)[2]),
    "deeper0": lambda m: Net2DeeperConfig(layer=0),
    "deeper_last": lambda m: Net2DeeperConfig(layer=2),
}
LR = {"body": 1e-2, "head": 1e-3}


def _widths(model: nn.Module) -> tuple[int, ...]:
    return model.config.hidden if isinstance(model, GrowableMLP) else model.config.channels


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 1, 8, 8, generator=g) * 2 + 0.5, torch.randint(0, 10, (32,), generator=g)


def _step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    x, y = _batch(seed)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def _group_of(name: str) -> int:
    return 1 if name.startswith("head.") else 0


EQUAL_WIDTH: dict[str, Callable[[], nn.Module]] = {
    "mlp": lambda: GrowableMLP(MLPConfig(in_features=64, hidden=(10, 10, 10), n_classes=10)),
    "cnn": lambda: GrowableCNN(CNNConfig(1, 8, (6, 6, 6), n_classes=10, pool_after=(0,))),
}


def trained(
    family: str, optim: str, steps: int = 6, equal_width: bool = False
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A model after a few steps of ``optim`` with two param groups (layers, head)."""
    torch.manual_seed(0)
    model = (EQUAL_WIDTH if equal_width else FAMILIES)[family]()
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if _group_of(n) == 0], "lr": LR["body"]},
        {"params": [p for n, p in named if _group_of(n) == 1], "lr": LR["head"]},
    ]
    opt = OPTIMIZERS[optim](groups)
    for s in range(steps):
        _step(model, opt, s)
    return model, opt


def _hyper(opt: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [
        {k: v for k, v in g.items() if k not in ("params", "param_names")} for g in opt.param_groups
    ]


def _clone_state(st: dict[str, Any]) -> dict[str, Any]:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in st.items()}


CASES = [
    pytest.param(f, o, g, id=f"{f}-{o}-{g}") for f in FAMILIES for o in OPTIMIZERS for g in GROWTHS
]


@pytest.mark.parametrize("family,optim,growth", CASES)
def test_migration_keeps_untouched_state_groups_and_steps(family: str, optim: str, growth: str):
    model, opt = trained(family, optim)
    old_named = dict(model.named_parameters())
    old_state = {n: opt.state[p] for n, p in old_named.items()}
    old_values = {n: _clone_state(st) for n, st in old_state.items()}
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    hyper = _hyper(opt)

    grow_(model, GROWTHS[growth](model), optimizer=opt)
    new_named = dict(model.named_parameters())

    # untouched parameters: same object under the same name -> same state dict and tensors
    untouched = [n for n, p in new_named.items() if old_named.get(n) is p]
    assert untouched, "the growth should leave some parameters alone"
    for n in untouched:
        st = opt.state[new_named[n]]
        assert st is old_state[n]
        for k, v in old_values[n].items():
            assert st[k] is not None
            assert torch.equal(st[k], v) if isinstance(v, torch.Tensor) else st[k] == v
    # hyper-parameters and membership
    assert _hyper(opt) == hyper
    in_opt = [p for g in opt.param_groups for p in g["params"]]
    assert len(in_opt) == len({id(p) for p in in_opt}), "a parameter appears twice"
    assert {id(p) for p in in_opt} == {id(p) for p in model.parameters()}
    for gi, g in enumerate(opt.param_groups):
        ids = {id(p) for p in g["params"]}
        assert ids == {id(p) for n, p in new_named.items() if _group_of(n) == gi}
    assert set(opt.state) <= set(model.parameters()), "state of replaced tensors left behind"
    # keeps stepping, scheduler included
    before = {n: p.detach().clone() for n, p in new_named.items()}
    _step(model, opt, 100)
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [LR["body"] / 2, LR["head"] / 2]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    moved = [n for n, p in new_named.items() if not torch.equal(p, before[n])]
    assert len(moved) == len(new_named)


def _update_rms(delta: torch.Tensor) -> float:
    return float(delta.double().pow(2).mean().sqrt())


@pytest.mark.parametrize("optim", ["adam", "adamw"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_first_adam_update_on_copied_units_matches_old_ones(family: str, optim: str):
    model, opt = trained(family, optim)
    old = _widths(model)[0]
    grow_(model, Net2WiderConfig(layer=0, new_width=old + 7), optimizer=opt)
    name = "hidden.0.weight" if family == "mlp" else "blocks.0.conv.weight"
    p = dict(model.named_parameters())[name]
    before = p.detach().clone()
    _step(model, opt, 100)
    delta = p.detach() - before
    rms_old, rms_new = _update_rms(delta[:old]), _update_rms(delta[old:])
    assert rms_old > 0 and 0.5 <= rms_new / rms_old <= 2.0, (rms_new, rms_old)


def _first_update_rms_new_vs_old(family: str, optim: str) -> dict[str, float]:
    """RMS of the first update after identity insertion on the new layer's weight and on the
    weight of the (renamed) old layer right after it, in units of the group's lr."""
    model, opt = trained(family, optim)
    grow_(model, Net2DeeperConfig(layer=0), optimizer=opt)
    named = dict(model.named_parameters())
    prefix, suffix = ("hidden", "weight") if family == "mlp" else ("blocks", "conv.weight")
    names = {"new": f"{prefix}.1.{suffix}", "old": f"{prefix}.2.{suffix}"}
    before = {k: named[n].detach().clone() for k, n in names.items()}
    _step(model, opt, 100)
    return {k: _update_rms(named[n].detach() - before[k]) / LR["body"] for k, n in names.items()}


@pytest.mark.parametrize("optim", ["adam", "adamw"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_first_adam_update_on_new_layer_within_2x_of_old(family: str, optim: str):
    """Brand-new tensors get Adam state at their first gradient, sized so that their first
    update matches the sibling's normalised update (fresh step-0 state would move ~lr)."""
    rms = _first_update_rms_new_vs_old(family, optim)
    assert 0.5 <= rms["new"] / rms["old"] <= 2.0, rms
    assert rms["new"] < 0.9, rms  # not Adam's sign-like first step


def test_fresh_state_would_break_the_2x_rule(monkeypatch: pytest.MonkeyPatch):
    """Negative control: with the lazy initialisation disabled (plain fresh state), the new
    layer's first step is Adam's ~lr step and the same 2x check fails."""
    import selfgrow.optim as so

    monkeypatch.setattr(so, "_lazy_state", lambda *a, **k: {})
    rms = _first_update_rms_new_vs_old("mlp", "adam")
    assert rms["new"] > 0.9 and not (0.5 <= rms["new"] / rms["old"] <= 2.0), rms


def test_pending_lazy_state_survives_regrowth_and_state_dict_round_trip():
    from selfgrow.optim import LAZY_INIT_KEY, install_hooks

    model, opt = trained("mlp", "adam")
    grow_(model, Net2DeeperConfig(layer=0), optimizer=opt)
    grow_(model, Net2DeeperConfig(layer=0), optimizer=opt)  # again, before any step
    pending = [p for p in model.parameters() if LAZY_INIT_KEY in opt.state.get(p, {})]
    assert len(pending) >= 2
    # round trip through a fresh optimizer, as a resumed run would do
    groups = [{k: v for k, v in g.items()} for g in opt.param_groups]
    opt2 = torch.optim.Adam(groups)
    opt2.load_state_dict(opt.state_dict())
    install_hooks(opt2)
    _step(model, opt2, 100)
    assert all(LAZY_INIT_KEY not in opt2.state[p] for p in pending)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_copied_units_get_scaled_moments():
    """m' = m / c and v' = v / c**2 for every copy of a unit (original included)."""
    model, opt = trained("mlp", "adam")
    w_old = model.hidden[0].weight.detach().clone()
    st_old = _clone_state(opt.state[model.hidden[0].weight])
    st_old_next = _clone_state(opt.state[model.hidden[1].weight])
    grow_(model, Net2WiderConfig(layer=0, new_width=30), optimizer=opt)  # 12 -> 30: 2 or 3 copies
    w = model.hidden[0].weight.detach()
    src = [int((w_old == row).all(dim=1).nonzero()[0]) for row in w]
    counts = torch.bincount(torch.tensor(src), minlength=12)
    assert set(counts.tolist()) == {2, 3}
    st = opt.state[model.hidden[0].weight]
    for k, j in enumerate(src):
        c = float(counts[j])
        assert torch.allclose(st["exp_avg"][k], st_old["exp_avg"][j] / c)
        assert torch.allclose(st["exp_avg_sq"][k], st_old["exp_avg_sq"][j] / c**2)
    assert torch.equal(st["step"], st_old["step"])
    # hidden.1's columns read the copies: same gradient per column -> state gathered unscaled
    nxt_old = st_old_next
    nxt = opt.state[model.hidden[1].weight]
    assert torch.equal(nxt["exp_avg"], nxt_old["exp_avg"][:, src])
    assert torch.equal(nxt["exp_avg_sq"], nxt_old["exp_avg_sq"][:, src])


@pytest.mark.parametrize("optim", list(OPTIMIZERS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_state_follows_renamed_layers_by_name(family: str, optim: str):
    # equal widths: every old layer but the first has the shape of the inserted one, so a
    # migration by position or by (name, shape) would hand the wrong state to hidden.1/.2/.3
    model, opt = trained(family, optim, equal_width=True)
    prefix = "hidden" if family == "mlp" else "blocks"
    old_named = dict(model.named_parameters())
    old_state = {n: _clone_state(opt.state[p]) for n, p in old_named.items()}
    grow_(model, Net2DeeperConfig(layer=0), optimizer=opt)
    new_named = dict(model.named_parameters())
    assert len(new_named) > len(old_named)
    for n, p in new_named.items():
        parts = n.split(".")
        i = int(parts[1]) if parts[0] == prefix else -1
        if i == 1:  # the inserted identity layer: state set at its first gradient (Adam)
            expect = {"step", "selfgrow_lazy_init"} if optim in ("adam", "adamw") else set()
            assert set(opt.state.get(p, {})) == expect, n
            continue
        src = ".".join([prefix, str(i - 1), *parts[2:]]) if i > 1 else n
        assert p is old_named[src]
        st = opt.state[p]
        assert st.keys() == old_state[src].keys(), n
        for k, v in old_state[src].items():
            assert torch.equal(st[k], v) if isinstance(v, torch.Tensor) else st[k] == v
    # the check above discriminates: neighbouring layers' states differ
    key = "momentum_buffer" if optim == "sgd" else "exp_avg"
    suffix = "weight" if family == "mlp" else "conv.weight"
    a, b = f"{prefix}.1.{suffix}", f"{prefix}.2.{suffix}"
    assert old_named[a].shape == old_named[b].shape == new_named[a].shape
    assert not torch.equal(old_state[a][key], old_state[b][key])
    _step(model, opt, 100)
    assert all(torch.isfinite(p).all() for p in model.parameters())
