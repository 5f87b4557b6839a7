"""Optimizer-state migration: a representative operator per growth dimension x every supported
optimizer (Adam, Adam+amsgrad, AdamW, SGD momentum / Nesterov, RMSprop plain / centered /
momentum), with two param groups (decay / no-decay, different lr).

Per cell (GROWTH-MATH.md, "Optimizer state after growth"; :mod:`selfgrow.optim`):

* untouched parameters (same name, same object, no ParamMap) keep their state dict object
  and bit-identical tensors;
* every migrated tensor has state of its new shape, its source's step count, and sits in its
  source's param group; hyper-parameters of every group are kept; no parameter appears
  twice; the optimizer holds exactly the model's parameters and no stale state;
* copied coordinates follow ``m * s`` (first moments: exp_avg, momentum_buffer, grad_avg) and
  ``v * s**2`` (second moments: exp_avg_sq, max_exp_avg_sq, square_avg), ``s`` the
  ParamMap's grad_scale;
* brand-new coordinates inside grown tensors: first moments 0, second moments > 0;
* brand-new tensors: empty state or the lazy Adam marker;
* Adam family: the first update's RMS on brand-new coordinates (with a gradient) is within 2x
  of the RMS on the old coordinates of the same tensor, and on brand-new tensors within 2x
  of the tensor they were derived from / their sibling;
* a step works and leaves everything finite.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from _families import FAMILIES as TRANSFORMER_FAMILIES
from _families import make_input, randomize_
from _growth_checks import output
from torch import nn

from selfgrow.adapters import get_adapter
from selfgrow.models.cnn import CNNConfig, GrowableCNN
from selfgrow.models.mlp import GrowableMLP, MLPConfig
from selfgrow.ops import get_operator, grow_, list_operators, make_config
from selfgrow.optim import (
    FIRST_MOMENT_KEYS,
    LAZY_INIT_KEY,
    LAZY_MASK_KEY,
    MAX_NORM_KEYS,
    PARAM_KEYS,
    SECOND_MOMENT_KEYS,
    UPDATE_KEYS,
    ParamMap,
    _sibling,
)

CLASSIFIERS: dict[str, Callable[[], nn.Module]] = {
    "mlp": lambda: GrowableMLP(MLPConfig(in_features=16, hidden=(12, 10), n_classes=5)),
    "cnn": lambda: GrowableCNN(CNNConfig(in_channels=1, image_size=8, channels=(6, 8),
                                         n_classes=5, pool_after=(0,))),
}
FAMILIES: dict[str, Callable[[], nn.Module]] = {**TRANSFORMER_FAMILIES, **CLASSIFIERS}

OPTIMIZERS: dict[str, Callable[[list[dict[str, Any]]], torch.optim.Optimizer]] = {
    "adam": lambda g: torch.optim.Adam(g, lr=1e-3),
    "adam-amsgrad": lambda g: torch.optim.Adam(g, lr=1e-3, amsgrad=True),
    "adamw": lambda g: torch.optim.AdamW(g, lr=1e-3, weight_decay=0.01),
    "sgd-momentum": lambda g: torch.optim.SGD(g, lr=1e-2, momentum=0.9),
    "sgd-nesterov": lambda g: torch.optim.SGD(g, lr=1e-2, momentum=0.9, nesterov=True),
    "rmsprop": lambda g: torch.optim.RMSprop(g, lr=1e-3),
    "rmsprop-centered": lambda g: torch.optim.RMSprop(g, lr=1e-3, centered=True),
    "rmsprop-momentum": lambda g: torch.optim.RMSprop(g, lr=1e-3, momentum=0.9),
    "nadam": lambda g: torch.optim.NAdam(g, lr=1e-3),
    "radam": lambda g: torch.optim.RAdam(g, lr=1e-3),
    "adamax": lambda g: torch.optim.Adamax(g, lr=1e-3),
    "adagrad": lambda g: torch.optim.Adagrad(g, lr=1e-2),
    "adadelta": lambda g: torch.optim.Adadelta(g, lr=1.0),
    "asgd": lambda g: torch.optim.ASGD(g, lr=1e-2),
}
ADAM_FAMILY = ("adam", "adam-amsgrad", "adamw")
#: optimizers whose first update after growth is checked against the 2x rule
TWO_X_OPTS = ADAM_FAMILY + ("radam",)  # NAdam 2.8x, Adagrad 0.37-2.3x on new tensors
#: optimizers whose new coordinates get their second moment at the first gradient
LAZY_COORD_OPTS = ADAM_FAMILY + ("rmsprop", "rmsprop-momentum", "nadam", "radam", "adagrad",
                                 "adadelta")
SECOND_MOMENT_OPTS = ADAM_FAMILY + ("rmsprop", "rmsprop-centered", "rmsprop-momentum")


def _d(m: nn.Module) -> Any:
    return get_adapter(m).dims()


#: (id, dimension, family, operator, kwargs or kwargs(model)). Operators not registered (yet)
#: are skipped; ``test_every_dimension_is_represented`` checks the coverage.
REPS: list[tuple[str, str, str, str, Any]] = [
    ("identity_insert-sg", "depth", "sg-preln", "identity_insert", dict(positions=(1,))),
    ("fp_stack-gpt2", "depth", "hf-gpt2", "function_preserving_stack", {}),
    ("g_stack-llama", "depth", "hf-llama", "g_stack", {}),
    ("widen-sg-gqa", "d_model", "sg-rms-rope-swiglu-gqa", "widen_d_model", {}),
    ("widen-torch", "d_model", "torch-enc-preln", "widen_d_model", {}),
    ("pad-random-sg", "d_model", "sg-preln", "widen_d_model_pad",
     dict(new_d=12, mode="random", init_std=0.3)),
    ("masked-sg", "d_model", "sg-postln", "widen_d_model_masked", dict(new_d=11)),
    ("ffn-net2wider-sg", "ffn", "sg-rms-rope-swiglu-gqa", "ffn_net2wider",
     lambda m: dict(new_d_ff=_d(m).d_ff + 5)),
    ("ffn-zero-fanout-sg", "ffn", "sg-preln", "ffn_zero_fanout",
     lambda m: dict(new_d_ff=_d(m).d_ff + 4)),
    ("heads-clone-sg-gqa", "heads", "sg-rms-rope-swiglu-gqa", "heads_clone",
     lambda m: dict(new_n_heads=2 * _d(m).n_heads)),
    ("heads-fresh-sg", "heads", "sg-preln", "heads_fresh",
     lambda m: dict(new_n_heads=2 * _d(m).n_heads)),
    ("heads-remove-sg-gqa", "shrink-heads", "sg-rms-rope-swiglu-gqa", "heads_remove",
     dict(n_remove=2)),
    ("remove-layers-llama", "shrink-depth", "hf-llama", "remove_layers", dict(layers=(0,))),
    ("ligo-sg-gqa", "learned", "sg-rms-rope-swiglu-gqa", "ligo",
     dict(depth_factor=2, width_factor=2)),
    ("net2wider-mlp", "classifier", "mlp", "net2wider", dict(layer=0, new_width=19)),
    ("net2wider-cnn", "classifier", "cnn", "net2wider", dict(layer=(0, 1), new_width=(9, 12))),
    ("net2deeper-mlp", "classifier", "mlp", "net2deeper", dict(layer=0)),
    ("net2deeper-cnn", "classifier", "cnn", "net2deeper", dict(layer=1)),
    ("remove-units-mlp", "classifier", "mlp", "remove_units", dict(layer=(0, 1), n_remove=3)),
    ("remove-units-cnn", "classifier", "cnn", "remove_units",
     dict(layer=(0, 1), units=((1, 4), (0, 2, 7)))),
]
#: dimensions that must have a registered representative once their module exists
DIM_MODULES = {"depth": "depth", "d_model": "width", "ffn": "ffn", "heads": "heads",
               "classifier": "net2net", "learned": "learned",
               "shrink-heads": "shrink_attention", "shrink-depth": "shrink_depth"}


def test_every_dimension_is_represented():
    registered = set(list_operators())
    modules = {type(get_operator(n)).__module__.rsplit(".", 1)[-1] for n in registered}
    for dim, mod in DIM_MODULES.items():
        if mod not in modules:
            continue  # that dimension has no operator module (yet)
        ops = [op for _, d, _, op, _ in REPS if d == dim and op in registered]
        assert ops, f"no registered representative operator for dimension {dim!r}"


# ------------------------------------------------------------------------------ training
def _input(model: nn.Module, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    if isinstance(model, GrowableMLP):
        return (torch.randn(16, 1, 4, 4, generator=g),)
    if isinstance(model, GrowableCNN):
        return (torch.randn(16, 1, 8, 8, generator=g),)
    return make_input(model, batch=4, seed=seed)


def _loss(model: nn.Module, seed: int, c0: int) -> torch.Tensor:
    args = _input(model, seed)
    if isinstance(model, (GrowableMLP, GrowableCNN)):
        y = model(*args)
    else:
        y = output(model, args, c0)
    target = torch.randn(y.shape, generator=torch.Generator().manual_seed(1000 + seed))
    return (y.float() - target).pow(2).mean()


def _group_of(name: str, p: nn.Parameter) -> int:
    """Two groups: weights (decay, base lr) and 1-D tensors (no decay, half lr)."""
    return 1 if p.dim() <= 1 else 0


def trained(family: str, optim: str, steps: int = 12
            ) -> tuple[nn.Module, torch.optim.Optimizer, int]:
    torch.manual_seed(0)
    model = randomize_(FAMILIES[family](), seed=0).train()
    c0 = 0 if isinstance(model, (GrowableMLP, GrowableCNN)) else _d(model).d_model
    named = list(model.named_parameters())
    groups: list[dict[str, Any]] = [
        {"params": [p for n, p in named if _group_of(n, p) == 0]},
        {"params": [p for n, p in named if _group_of(n, p) == 1], "weight_decay": 0.0},
    ]
    opt = OPTIMIZERS[optim](groups)
    opt.param_groups[1]["lr"] = opt.param_groups[0]["lr"] / 2
    for s in range(steps):
        opt.zero_grad()
        _loss(model, s, c0).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt, c0


def _hyper(opt: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [{k: v for k, v in g.items() if k not in ("params", "param_names")}
            for g in opt.param_groups]


def _clone(st: dict[str, Any]) -> dict[str, Any]:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in st.items()}


def _rms(t: torch.Tensor) -> float:
    return float(t.double().pow(2).mean().sqrt()) if t.numel() else 0.0


def _effective_maps(old: dict[str, nn.Parameter], new: dict[str, nn.Parameter],
                    maps: dict[str, ParamMap]) -> dict[str, ParamMap | None]:
    """What plan_migration does per new name: its ParamMap, ``None`` for untouched."""
    out: dict[str, ParamMap | None] = {}
    for n, p in new.items():
        if n in maps:
            out[n] = maps[n]
        elif old.get(n) is p:
            out[n] = None
        elif n in old and old[n].shape == p.shape:
            out[n] = ParamMap(source=n)
        else:
            out[n] = ParamMap(source=None)
    return out


def _scale(pm: ParamMap, like: torch.Tensor) -> torch.Tensor:
    s = pm.grad_scale
    if isinstance(s, torch.Tensor):
        return s.to(dtype=like.dtype).expand_as(like)
    return torch.full_like(like, float(s))


CELLS = [pytest.param(r[0], o, id=f"{r[0]}-{o}") for r in REPS for o in OPTIMIZERS]
REP_BY_ID = {r[0]: r for r in REPS}


@pytest.mark.parametrize("rep,optim", CELLS)
def test_optimizer_migration_matrix(rep, optim, monkeypatch):
    _, _, family, op, kw = REP_BY_ID[rep]
    if op not in list_operators():
        pytest.skip(f"operator {op!r} not registered")
    if family not in FAMILIES:
        pytest.skip(f"family {family!r} not available")
    model, opt, c0 = trained(family, optim)
    kwargs = kw(model) if callable(kw) else kw

    old_named = dict(model.named_parameters())
    old_group = {n: gi for gi, g in enumerate(opt.param_groups) for n, p in old_named.items()
                 if any(p is q for q in g["params"])}
    old_state = {n: (opt.state[p], _clone(opt.state[p])) for n, p in old_named.items()
                 if p in opt.state}
    hyper = _hyper(opt)

    operator = get_operator(op)
    captured: dict[str, Any] = {}
    real_apply = operator.apply

    def spy(model_: nn.Module, config: Any, tx: Any) -> Any:
        res = real_apply(model_, config, tx)
        captured["maps"] = dict(res.param_maps)
        return res

    monkeypatch.setattr(operator, "apply", spy)
    grow_(model, make_config(op, **kwargs), optimizer=opt)
    new_named = dict(model.named_parameters())
    eff = _effective_maps(old_named, new_named, captured["maps"])

    # groups: hyper-parameters, membership, no duplicates, no stale state
    assert _hyper(opt) == hyper
    in_opt = [p for g in opt.param_groups for p in g["params"]]
    assert len(in_opt) == len({id(p) for p in in_opt}), "a parameter appears twice"
    assert {id(p) for p in in_opt} == {id(p) for p in model.parameters()}
    assert {id(p) for p in opt.state} <= {id(p) for p in model.parameters()}, "stale state"
    group = {id(p): gi for gi, g in enumerate(opt.param_groups) for p in g["params"]}

    n_untouched = n_copied = 0
    for n, pm in eff.items():
        p = new_named[n]
        st = opt.state.get(p, {})
        if pm is None:  # untouched
            n_untouched += 1
            assert group[id(p)] == old_group[n], n
            if n in old_state:
                assert st is old_state[n][0], f"{n}: state object replaced"
                for k, v in old_state[n][1].items():
                    assert torch.equal(st[k], v), f"{n}: {k} changed"
            continue
        if pm.source is None:  # brand-new tensor
            assert all(k == LAZY_INIT_KEY or v.dim() == 0 for k, v in st.items()), (n, set(st))
            continue
        assert group[id(p)] == old_group[pm.source], f"{n} left its source's group"
        old_st = old_state[pm.source][1]
        markers = {LAZY_MASK_KEY, LAZY_INIT_KEY}
        assert st.keys() - markers == old_st.keys(), (n, st.keys(), old_st.keys())
        if markers & st.keys():  # new coordinates awaiting their first gradient
            assert markers <= st.keys() and optim in LAZY_COORD_OPTS, (n, optim)
        for k, v in st.items():
            if k == LAZY_INIT_KEY:  # NaN: target taken from the old coordinates at that step
                continue
            if not isinstance(v, torch.Tensor) or v.dim() == 0:
                assert torch.equal(v, old_st[k]), f"{n}: {k} (step count) changed"
                continue
            assert v.shape == p.shape, (n, k, v.shape, p.shape)
            if k == LAZY_MASK_KEY:
                _, mask = pm.gather(old_named[pm.source].detach(), p.shape)
                assert torch.equal(v != 0, mask), f"{n}: marker is not the new coordinates"
                continue
            vals, mask = pm.gather(old_st[k], p.shape)
            s = _scale(pm, vals)
            if k in FIRST_MOMENT_KEYS:
                want = vals * s
                assert torch.all(v[mask] == 0), f"{n}: {k} not 0 on new coordinates"
            elif k in SECOND_MOMENT_KEYS:
                want = vals * s * s
                assert torch.all(v[mask] > 0), f"{n}: {k} not > 0 on new coordinates"
            elif k in MAX_NORM_KEYS:
                want = vals * s
            elif k in UPDATE_KEYS:
                want = vals
            elif k in PARAM_KEYS:  # ASGD's average restarts at the grown parameter
                assert torch.equal(v, p.detach()), f"{n}: {k} is not the grown parameter"
                continue
            else:
                raise AssertionError(f"unexpected state key {k}")
            keep = ~mask
            power = 1 if k in FIRST_MOMENT_KEYS else 2
            torch.testing.assert_close(v[keep], want[keep], rtol=1e-6, atol=1e-30,
                                       msg=f"{n}: {k} != source * s^{power}")
        n_copied += 1
    assert n_copied + n_untouched > 0

    # first step after growth
    before = {n: p.detach().clone() for n, p in new_named.items()}
    opt.zero_grad()
    _loss(model, 99, c0).backward()
    grads = {n: (p.grad.detach().clone() if p.grad is not None else None)
             for n, p in new_named.items()}
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if optim in TWO_X_OPTS:
        _check_first_update_rms(eff, new_named, before, grads, old_named)
    opt.zero_grad()
    _loss(model, 100, c0).backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _check_first_update_rms(eff: dict[str, ParamMap | None], new: dict[str, nn.Parameter],
                            before: dict[str, torch.Tensor],
                            grads: dict[str, torch.Tensor | None],
                            old: dict[str, nn.Parameter]) -> None:
    delta = {n: new[n].detach() - before[n] for n in new}
    heir: dict[str, str] = {}  # old name -> a new name carrying its state
    for n, pm in eff.items():
        if pm is None:
            heir.setdefault(n, n)
        elif pm.source is not None:
            heir.setdefault(pm.source, n)
    checked = 0
    for n, pm in eff.items():
        g = grads[n]
        if pm is None or g is None:
            continue
        if pm.source is not None:  # new coordinates inside a grown tensor
            _, mask = pm.gather(old[pm.source].detach(), new[n].shape)
            live = mask & (g != 0)
            if not live.any() or (~mask).sum() == 0:
                continue
            r_new, r_old = _rms(delta[n][live]), _rms(delta[n][~mask])
            assert r_old > 0 and 0.5 <= r_new / r_old <= 2.0, (n, r_new, r_old)
            checked += 1
        elif bool((g != 0).any()):  # brand-new tensor vs its sibling's heir
            sib = _sibling(n, [o for o in old if o in heir])
            if sib is None:
                continue
            r_new, r_sib = _rms(delta[n]), _rms(delta[heir[sib]])
            assert r_sib > 0 and 0.5 <= r_new / r_sib <= 2.0, (n, heir[sib], r_new, r_sib)
            checked += 1
    if any(pm is not None and pm.source is None for pm in eff.values()):
        assert checked, "brand-new tensors but no first-update RMS was compared"


def _pad_first_update_ratios() -> list[float]:
    """RMS(first update on new coordinates) / RMS(on old coordinates) per grown tensor after
    widen_d_model_pad(mode="random") under Adam."""
    model, opt, c0 = trained("sg-preln", "adam")
    old = dict(model.named_parameters())
    grow_(model, make_config("widen_d_model_pad", new_d=12, mode="random", init_std=0.3),
          optimizer=opt)
    new = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in new.items()}
    opt.zero_grad()
    _loss(model, 99, c0).backward()
    opt.step()
    out = []
    for n, p in new.items():
        if n in old and old[n].shape != p.shape:
            d = p.detach() - before[n]
            new_coords = torch.ones(p.shape, dtype=torch.bool)  # pad appends coordinates
            new_coords[tuple(slice(0, s) for s in old[n].shape)] = False
            out.append(_rms(d[new_coords]) / _rms(d[~new_coords]))
    return out


def test_new_coordinates_first_update_within_2x():
    ratios = _pad_first_update_ratios()
    assert ratios and all(0.5 <= r <= 2.0 for r in ratios), ratios


def test_negative_control_placeholder_v_breaks_the_2x_rule(monkeypatch):
    """With the first-gradient sizing disabled (m = 0, v = mean(v_old) kept), the first update
    of new coordinates is several times smaller than that of the old ones."""
    import selfgrow.optim as so

    monkeypatch.setattr(so, "_lazy_capable", lambda group: False)
    ratios = _pad_first_update_ratios()
    assert min(ratios) < 0.5, ratios


def test_pending_new_coordinates_survive_state_dict_round_trip():
    from selfgrow.optim import install_hooks

    model, opt, c0 = trained("sg-preln", "adam-amsgrad")
    grow_(model, make_config("widen_d_model_masked", new_d=10), optimizer=opt)
    grow_(model, make_config("widen_d_model_masked", new_d=12), optimizer=opt)  # pending again
    w = model.tok_emb.weight
    assert int(opt.state[w][LAZY_MASK_KEY].sum()) == w.shape[0] * 4
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": g["params"]}
              for g in opt.param_groups]
    opt2 = torch.optim.Adam(groups)
    opt2.load_state_dict(opt.state_dict())  # the bool marker comes back as a float tensor
    install_hooks(opt2)
    opt2.zero_grad()
    _loss(model, 5, c0).backward()
    # at the start of the mask ramp the new coordinates' gradients are exactly 0: their state
    # waits for a nonzero gradient (v = c * 0 would make that one's update huge)
    assert not w.grad[opt2.state[w][LAZY_MASK_KEY] != 0].any()
    opt2.step()
    assert LAZY_MASK_KEY in opt2.state[w]
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
    opt2.step()
    assert all(LAZY_MASK_KEY not in st for st in opt2.state.values())
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.LBFGS(ps),
    lambda ps: type("MyOpt", (torch.optim.Optimizer,), {"step": lambda self, c=None: None})(
        ps, {"lr": 0.1}),
], ids=["lbfgs", "unknown"])
def test_optimizers_that_cannot_follow_growth_are_refused_up_front(make):
    from selfgrow import GrowthController, IncompatibleOptimizerError

    model = GrowableMLP(MLPConfig(in_features=4, hidden=(3,), n_classes=2))
    opt = make(list(model.parameters()))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(IncompatibleOptimizerError, match="supported optimizers: .*Adagrad"):
        grow_(model, make_config("net2wider", layer=0, new_width=5), optimizer=opt)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert model.config.hidden == (3,)
    with pytest.raises(IncompatibleOptimizerError, match="cannot follow growth"):
        GrowthController(model, opt)


def test_registered_optimizer_is_accepted():
    from selfgrow.optim import _EXTRA_OPTIMIZERS, check_optimizer_supported, register_optimizer

    class MySGD(torch.optim.Optimizer):
        def __init__(self, ps):
            super().__init__(ps, {"lr": 0.1})

        def step(self, closure=None):
            return None

    model = GrowableMLP(MLPConfig(in_features=4, hidden=(3,), n_classes=2))
    try:
        register_optimizer(MySGD)
        check_optimizer_supported(MySGD(model.parameters()))
    finally:
        _EXTRA_OPTIMIZERS.pop("MySGD", None)
