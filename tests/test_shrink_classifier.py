"""remove_units (``selfgrow.ops.shrink_classifier``) and the ``"prune"`` actions.

Exactness when the removed units' fan-out is zero (fp64 1e-12, fp32 1e-5; BatchNorm models in
train mode too) with a negative control (removing live units), Net2WiderNet undone exactly,
the optimizer state of kept coordinates bit-identical (Adam, SGD momentum), the
Flatten-aware column removal, config / state_dict round trips, shape-only size estimates,
refusals that leave model and optimizer bit-identical, and the actions' resolution. The
registry-driven matrices (tests/test_classifier_ops.py, test_transactional.py,
test_optim_matrix.py, test_inexact_structure.py) run the operator on every classifier
family as well.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfgrow import build_model, grow_
from selfgrow.adapters import build_architecture, describe_architecture, find_adapter
from selfgrow.control.actions import list_actions, resolve_action
from selfgrow.errors import GrowthConfigError
from selfgrow.models.cnn import CNNConfig, GrowableCNN
from selfgrow.models.mlp import GrowableMLP, MLPConfig
from selfgrow.ops import estimate_growth, get_operator, make_config, meta_twin
from selfgrow.ops.net2net import Net2WiderConfig, hidden_widths
from selfgrow.ops.shrink import FFNRemoveUnitsConfig
from selfgrow.ops.shrink_classifier import RemoveUnitsConfig, importance

FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "mlp": lambda: GrowableMLP(MLPConfig(in_features=64, hidden=(12, 10), n_classes=10)),
    "cnn-bn": lambda: GrowableCNN(CNNConfig(1, 8, (6, 8), 10, pool_after=(0,))),
    "cnn-nobn": lambda: GrowableCNN(CNNConfig(1, 8, (6, 8), 10, batchnorm=False,
                                              pool_after=(1,))),
    "seq-cnn-flatten": lambda: nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10)),
}
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
REMOVED = (1, 4)  # units removed from layers 0 and 1


def _x(n: int = 32, dtype: torch.dtype = torch.float32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64).to(dtype)


def trained(family: str, dtype: torch.dtype = torch.float32, optim: str = "adam",
            steps: int = 3) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = FAMILIES[family]().to(dtype)
    if optim == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    x, y = _x(32, dtype, seed=2) * 2 + 0.5, torch.arange(32) % 10
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def zero_fanout_(model: nn.Module, layer: int, units: tuple[int, ...]) -> None:
    unit = find_adapter(model, "classifier").units()[layer]
    with torch.no_grad():
        for r in unit.consumers:
            cols = (torch.tensor(units).view(-1, 1) * r.group
                    + torch.arange(r.group).view(1, -1)).flatten()
            getattr(r.module, r.attr)[:, cols] = 0


def _out(model: nn.Module, x: torch.Tensor, train: bool = False) -> torch.Tensor:
    was = model.training
    model.train(train)
    with torch.no_grad():
        y = model(x)
    model.train(was)
    return y


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _both_layers() -> RemoveUnitsConfig:
    return RemoveUnitsConfig(layer=(0, 1), units=(REMOVED, REMOVED))


# ------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_zero_fanout_units_are_removed_exactly(family: str, dtype: torch.dtype) -> None:
    model, opt = trained(family, dtype)
    for i in (0, 1):
        zero_fanout_(model, i, REMOVED)
    x = _x(64, dtype) * 3
    before = _out(model, x)
    before_train = _out(copy.deepcopy(model), x, train=True)  # updates BN running stats
    n_before = sum(p.numel() for p in model.parameters())
    ev = grow_(model, _both_layers(), optimizer=opt, probe=x)
    assert ev.preservation["exact_expected"] is True
    assert ev.preservation["max_rel"] <= TOL[dtype]
    assert _rel(_out(model, x), before) <= TOL[dtype]
    assert _rel(_out(model, x, train=True), before_train) <= TOL[dtype]  # batch stats too
    assert sum(p.numel() for p in model.parameters()) == ev.params_after < n_before
    assert hidden_widths(model) == tuple(w - 2 for w in ev.extra["notes"]["widths_before"])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_negative_control_removing_live_units_breaks_the_check(family: str) -> None:
    model, opt = trained(family, torch.float64)
    x = _x(64, torch.float64) * 3
    before = _out(model, x)
    assert not get_operator("remove_units").is_exact(model, _both_layers())
    ev = grow_(model, _both_layers(), optimizer=opt, probe=x)
    assert ev.preservation["exact_expected"] is False
    assert _rel(_out(model, x), before) > 1e-4 and ev.preservation["max_rel"] > 1e-4


def test_one_nonzero_outgoing_weight_makes_it_inexact() -> None:
    model, _ = trained("mlp", torch.float64)
    zero_fanout_(model, 0, (3,))
    cfg = RemoveUnitsConfig(layer=0, units=(3,))
    assert get_operator("remove_units").is_exact(model, cfg)
    with torch.no_grad():
        model.hidden[1].weight[7, 3] = 1e-3
    assert not get_operator("remove_units").is_exact(model, cfg)


@pytest.mark.parametrize("family", ["mlp", "cnn-bn"])
def test_net2wider_then_fold_shares_and_remove_copies_restores_the_model(family: str) -> None:
    """Net2WiderNet (noise 0) copies units and splits their outgoing weights; summing each
    copy's outgoing share back into its source and removing the copies (now zero fan-out)
    is exact and gives back the original parameters."""
    model, _ = trained(family, torch.float64)
    sd0 = {k: v.clone() for k, v in model.state_dict().items()}
    x = _x(32, torch.float64)
    before = _out(model, x)
    w = hidden_widths(model)[0]
    grow_(model, Net2WiderConfig(layer=0, new_width=w + 3, seed=1))
    unit = find_adapter(model, "classifier").units()[0]
    prod = dict(model.named_parameters())[unit.producers[0].name].detach()
    src = [int((prod[:w] - prod[j]).flatten(1).abs().sum(1).argmin()) for j in range(w, w + 3)]
    with torch.no_grad():
        for r in unit.consumers:
            t = getattr(r.module, r.attr)
            for j, s in zip(range(w, w + 3), src, strict=True):
                t[:, s] += t[:, j]
                t[:, j] = 0
    ev = grow_(model, RemoveUnitsConfig(layer=0, units=(w, w + 1, w + 2)), probe=x)
    assert ev.preservation["exact_expected"] and ev.preservation["max_rel"] <= 1e-12
    assert _rel(_out(model, x), before) <= 1e-12
    sd = model.state_dict()
    assert sd.keys() == sd0.keys()
    for k, v in sd0.items():
        torch.testing.assert_close(sd[k], v, rtol=0, atol=1e-12, msg=k)


# ------------------------------------------------------------------------------ importance
def test_magnitude_removes_the_least_important_units_per_layer() -> None:
    model, _ = trained("mlp", torch.float64)
    with torch.no_grad():  # layer 0: units 2, 7 tiny incoming; layer 1: unit 5 tiny outgoing
        model.hidden[0].weight[[2, 7]] *= 1e-4
        model.head.weight[:, 5] *= 1e-4
    ev = grow_(model, RemoveUnitsConfig(layer=(0, 1), n_remove=(2, 1)))
    assert ev.extra["notes"]["removed"] == {0: [2, 7], 1: [5]}
    assert ev.extra["notes"]["criterion"] == "magnitude"


def test_magnitude_counts_the_batchnorm_gain() -> None:
    model, _ = trained("cnn-bn", torch.float64)
    with torch.no_grad():
        model.blocks[0].bn.weight[4] = 1e-6
    unit = find_adapter(model, "classifier").units()[0]
    imp = importance(unit)
    assert int(imp.argmin()) == 4
    w_in = model.blocks[0].conv.weight.detach().flatten(1).norm(dim=1)
    w_out = model.blocks[1].conv.weight.detach().transpose(0, 1).flatten(1).norm(dim=1)
    gamma = model.blocks[0].bn.weight.detach().abs()
    torch.testing.assert_close(imp, w_in * w_out * gamma, rtol=1e-12, atol=0)
    ev = grow_(model, RemoveUnitsConfig(layer=0, n_remove=1))
    assert ev.extra["notes"]["removed"] == {0: [4]}


def test_flatten_consumer_loses_the_columns_of_each_removed_channel() -> None:
    model, _ = trained("seq-cnn-flatten", torch.float64)
    old = model[7].weight.detach().clone()  # (10, 8 * 16)
    grow_(model, RemoveUnitsConfig(layer=1, units=(0, 6)))
    keep = [c for c in range(8) if c not in (0, 6)]
    cols = [c * 16 + k for c in keep for k in range(16)]
    assert torch.equal(model[7].weight, old[:, cols]) and model[7].in_features == 6 * 16
    assert model[4].out_channels == 6


# ------------------------------------------------------------------------------ optimizer
def _rows_cols(family: str) -> list[tuple[str, int | None, int | None]]:
    """(parameter, unit layer of its rows, unit layer of its columns)."""
    if family == "mlp":
        return [("hidden.0.weight", 0, None), ("hidden.0.bias", 0, None),
                ("hidden.1.weight", 1, 0), ("hidden.1.bias", 1, None), ("head.weight", None, 1),
                ("head.bias", None, None)]
    return [("blocks.0.conv.weight", 0, None), ("blocks.0.bn.weight", 0, None),
            ("blocks.0.bn.bias", 0, None), ("blocks.1.conv.weight", 1, 0),
            ("head.weight", None, 1), ("head.bias", None, None)]


@pytest.mark.parametrize("optim,keys", [("adam", ("exp_avg", "exp_avg_sq")),
                                        ("sgd", ("momentum_buffer",))])
@pytest.mark.parametrize("family", ["mlp", "cnn-bn"])
def test_kept_optimizer_state_is_bit_identical(family: str, optim: str,
                                               keys: tuple[str, ...]) -> None:
    model, opt = trained(family, optim=optim)
    named = dict(model.named_parameters())
    old = {n: {k: opt.state[named[n]][k].clone() for k in keys} for n, _, _ in
           _rows_cols(family)}
    old_step = {n: opt.state[p].get("step") for n, p in named.items()}
    widths = hidden_widths(model)
    keep = [torch.tensor([u for u in range(w) if u not in REMOVED]) for w in widths]
    grow_(model, _both_layers(), optimizer=opt)
    named = dict(model.named_parameters())
    for n, r, c in _rows_cols(family):
        p = named[n]
        st = opt.state[p]
        for k in keys:
            want = old[n][k]
            if r is not None:
                want = want.index_select(0, keep[r])
            if c is not None:
                want = want.index_select(1, keep[c])
            assert st[k].shape == p.shape, (n, k)
            assert torch.equal(st[k], want), (n, k)  # kept: bit-identical; removed: gone
        if old_step[n] is not None:
            assert torch.equal(st["step"], old_step[n])
    opt.zero_grad()
    F.cross_entropy(model(_x(8)), torch.arange(8)).backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_accumulated_gradients_follow_the_kept_units() -> None:
    model, _ = trained("mlp")
    F.cross_entropy(model(_x(8)), torch.arange(8)).backward()
    g = model.hidden[0].weight.grad.clone()
    grow_(model, RemoveUnitsConfig(layer=0, units=REMOVED))
    keep = [u for u in range(12) if u not in REMOVED]
    assert torch.equal(model.hidden[0].weight.grad, g[keep])


# ------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("family", list(FAMILIES))
def test_config_and_state_dict_round_trip(family: str) -> None:
    model, opt = trained(family)
    grow_(model, RemoveUnitsConfig(layer=(0, 1), n_remove=(2, 3)), optimizer=opt)
    x = _x(8)
    specs: list[Any] = [describe_architecture(model)]
    if isinstance(model, (GrowableMLP, GrowableCNN)):
        specs.append(model.config)
    for spec in specs:
        fresh = build_architecture(spec) if spec is specs[0] else build_model(spec)
        fresh.load_state_dict(model.state_dict())  # strict: same names and shapes
        assert torch.equal(_out(fresh, x), _out(model, x))
    if isinstance(model, GrowableMLP):
        assert model.config.hidden == (10, 7)
    elif isinstance(model, GrowableCNN):
        assert model.config.channels == (4, 5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_estimate_growth_sizes_from_shapes(family: str) -> None:
    for cfg in (RemoveUnitsConfig(layer=(0, 1), n_remove=(2, 3)), _both_layers()):
        model, _ = trained(family)
        est = estimate_growth(model, cfg)
        ev = grow_(model, cfg)
        assert est["params_after"] == ev.params_after < est["params_before"]
    twin = meta_twin(FAMILIES[family]())
    assert not get_operator("remove_units").is_exact(twin, _both_layers())


# ------------------------------------------------------------------------------ refusals
def _snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> Any:
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    ids = [(n, id(p)) for n, p in model.named_parameters()]
    st = {id(p): {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
          for p, s in opt.state.items()}
    return sd, ids, st, getattr(model, "config", None)


def _same(a: Any, b: Any) -> bool:
    (sd1, i1, st1, c1), (sd2, i2, st2, c2) = a, b
    return (i1 == i2 and c1 is c2 and sd1.keys() == sd2.keys()
            and all(torch.equal(sd1[k], sd2[k]) for k in sd1) and st1.keys() == st2.keys()
            and all(torch.equal(v, st2[p][k]) if isinstance(v, torch.Tensor) else v == st2[p][k]
                    for p in st1 for k, v in st1[p].items()))


BAD = [
    (dict(layer=2, n_remove=1), r"layer 2 out of range; valid: 0\.\.1"),
    (dict(layer=-1, n_remove=1), r"layer -1 out of range; valid: 0\.\.1"),
    (dict(layer=True, n_remove=1), "layer must be an int"),
    (dict(layer=(0, 0), n_remove=1), "lists a layer twice"),
    (dict(layer=0, units=(0, 12)), r"units \[12\] of hidden\.0 are out of range; valid: 0\.\.11"),
    (dict(layer=0, units=(3, 3)), r"units \[3\] of hidden\.0 are listed twice"),
    (dict(layer=0, units=(0.5,)), r"must be a list of unit indices; valid: 0\.\.11"),
    (dict(layer=0, units=(True,)), "must be a list of unit indices"),
    (dict(layer=0, units=tuple(range(12))), r"valid: 1\.\.11 \(at least one unit stays\)"),
    (dict(layer=0, units=()), r"removing 0 of the 12 units"),
    (dict(layer=0, units=(1,), n_remove=1), "not both"),
    (dict(layer=(0, 1), units=(1, 2)), "one tuple per layer"),
    (dict(layer=(0, 1), units=((1,),)), "one tuple per layer"),
    (dict(layer=0, n_remove=0), r"removing 0 of the 12 units of hidden\.0.*valid: 1\.\.11"),
    (dict(layer=1, n_remove=10), r"removing 10 of the 10 units of hidden\.1.*valid: 1\.\.9"),
    (dict(layer=0, n_remove=2.0), "n_remove=2.0 must be an integer"),
    (dict(layer=(0, 1), n_remove=(1,)), "one count per layer"),
    (dict(layer=0, n_remove=1, criterion="taylor"), "criterion 'taylor'; valid choices: magnitude"),
]


@pytest.mark.parametrize("kw,msg", BAD, ids=[str(i) for i in range(len(BAD))])
def test_invalid_requests_leave_model_and_optimizer_unchanged(kw: dict[str, Any],
                                                              msg: str) -> None:
    model, opt = trained("mlp")
    before = _snapshot(model, opt)
    with pytest.raises(GrowthConfigError, match=msg):
        grow_(model, make_config("remove_units", **kw), optimizer=opt, probe=_x(4))
    assert _same(before, _snapshot(model, opt))
    assert not get_operator("remove_units").is_exact(model, RemoveUnitsConfig(**kw))


# ------------------------------------------------------------------------------ actions
def test_classifier_prune_action_resolves() -> None:
    model, _ = trained("mlp")
    assert "prune" in list_actions(model)
    assert resolve_action("prune", model, fraction=0.25) == RemoveUnitsConfig(
        layer=(0, 1), n_remove=(3, 3))  # 12 * 0.25 = 3; 10 * 0.25 = 2.5 -> 3 (half up)
    assert resolve_action("prune", model, n_remove=2, layer="hidden.1") == RemoveUnitsConfig(
        layer=(1,), n_remove=(2,))
    assert resolve_action("prune", model, fraction=0.01, layer=0) == RemoveUnitsConfig(
        layer=(0,), n_remove=(1,))  # at least one unit goes
    assert resolve_action("prune", model, units={"hidden.1": [4, 1], 0: (2,)}) == (
        RemoveUnitsConfig(layer=(0, 1), units=((2,), (4, 1))))
    assert resolve_action("prune", model, units=[3], layer=1) == RemoveUnitsConfig(
        layer=1, units=(3,))
    ev = grow_(model, resolve_action("prune", model, fraction=0.5))
    assert hidden_widths(model) == (6, 5) and ev.params_after < ev.params_before


@pytest.mark.parametrize("kw,msg", [
    (dict(), "exactly one of fraction, n_remove, units; got none"),
    (dict(fraction=0.5, n_remove=1), "got fraction, n_remove"),
    (dict(fraction=1.0), r"fraction=1\.0 is out of range; valid: a number in \(0, 1\)"),
    (dict(fraction=0.0), r"fraction=0\.0 is out of range"),
    (dict(fraction=float("nan")), "fraction=nan is out of range"),
    (dict(units=[1]), "needs exactly one layer"),
    (dict(units={0: [1]}, layer=0), "leave layer=None"),
    (dict(n_remove=1, layer="head.weight"), "unknown hidden layer 'head.weight'"),
])
def test_classifier_prune_action_errors(kw: dict[str, Any], msg: str) -> None:
    with pytest.raises(GrowthConfigError, match=msg):
        resolve_action("prune", FAMILIES["mlp"](), **kw)


def test_transformer_prune_action_resolves_to_ffn_remove_units() -> None:
    from _families import FAMILIES as TRANSFORMERS

    model = TRANSFORMERS["sg-preln"]()
    f = find_adapter(model, "transformer").dims().d_ff
    assert "prune" in list_actions(model)
    assert resolve_action("prune", model, fraction=0.25) == FFNRemoveUnitsConfig(
        n_remove=f // 4)
    assert resolve_action("prune", model, n_remove=3) == FFNRemoveUnitsConfig(n_remove=3)
    assert resolve_action("prune", model, units=[0, 5]) == FFNRemoveUnitsConfig(units=(0, 5))
    with pytest.raises(GrowthConfigError, match="not a mapping"):
        resolve_action("prune", model, units={0: [1]})
    with pytest.raises(GrowthConfigError, match="fraction=2"):
        resolve_action("prune", model, fraction=2)
    with pytest.raises(GrowthConfigError, match="exactly one"):
        resolve_action("prune", model)
    grow_(model, resolve_action("prune", model, fraction=0.25))
    assert find_adapter(model, "transformer").dims().d_ff == f - f // 4


def test_controller_prunes_by_action_name() -> None:
    from selfgrow.control import FixedSchedule, GrowthController

    model, opt = trained("mlp")
    ctrl = GrowthController(model, opt, policy=FixedSchedule(
        [(2, "prune", {"fraction": 0.5}), (3, "prune", {"units": {1: [0]}})]))
    for _ in range(4):
        ctrl.observe(loss=1.0)
    growths = [e for e in ctrl.events if e.kind == "prune"]  # a schedule's shrink: a prune
    assert [e.action["op"] for e in growths] == ["remove_units", "remove_units"]
    assert ctrl.n_prunes == 2 and ctrl.n_growths == 0
    assert hidden_widths(model) == (6, 4)
    assert growths[0].params_after < growths[0].params_before
