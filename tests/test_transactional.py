"""Transactional growth, generated from the operator registry.

Every registered operator x every model family it applies to (transformer families of
``_families.py`` plus the reference MLP and CNN classifiers) is grown with failures injected

* in the MIDDLE of the operator: the N-th edit the operator makes through its
  :class:`~selfgrow.ops.Transaction` raises, before or right after the edit is recorded
  (N = 1, 2, 3, the middle one and the last one);
* after ``apply``: in the optimizer-migration planner, in the ``check=`` hook and in the
  post-growth probe;

and after each failure model (state_dict values, parameter / buffer / module objects, module
types, cached size attributes, requires_grad, config) and optimizer (param groups, their
hyper-parameters, state objects and tensors, step hooks) must be bit-identical to before.
After all the failed attempts a real growth must give bit-identically the same model as
growing an untouched twin (no residue of the failures).

Invalid requests (shrinking, a factor that does not divide, out-of-range layers, bad
enumerations, a frozen model, a model on the meta device, a config that disagrees with the
modules) must raise before any Transaction is even opened.

A new operator is picked up automatically; ``test_every_operator_has_a_case`` fails until it
applies to at least one family here (add its non-default arguments to ``KW``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from _families import FAMILIES as TRANSFORMER_FAMILIES
from _families import make_input, randomize_, selfgrow_model
from _growth_checks import output
from torch import nn

import selfgrow.ops._registry as registry
from selfgrow.adapters import get_adapter
from selfgrow.errors import GrowthConfigError, IncompatibleModelError
from selfgrow.models.cnn import CNNConfig, GrowableCNN
from selfgrow.models.mlp import GrowableMLP, MLPConfig
from selfgrow.models.multimodal import GrowableMultimodal, MultimodalConfig
from selfgrow.models.transformer import TransformerConfig
from selfgrow.ops import Transaction, get_operator, grow_, list_operators, make_config

# ------------------------------------------------------------------------------ the table
CLASSIFIERS: dict[str, Callable[[], nn.Module]] = {
    "mlp": lambda: GrowableMLP(MLPConfig(in_features=16, hidden=(6, 5), n_classes=3)),
    "cnn": lambda: GrowableCNN(CNNConfig(in_channels=1, image_size=8, channels=(3, 4),
                                         n_classes=3, pool_after=(0,))),
    "cnn1d": lambda: GrowableCNN(CNNConfig(in_channels=3, image_size=8, channels=(3, 4),
                                           n_classes=3, pool_after=(0,), spatial_dims=1)),
    "multimodal": lambda: GrowableMultimodal(MultimodalConfig(
        image=CNNConfig(in_channels=1, image_size=8, channels=(3, 4), n_classes=4,
                        pool_after=(0,)),
        audio=CNNConfig(in_channels=3, image_size=8, channels=(3, 4), n_classes=4,
                        pool_after=(0,), spatial_dims=1),
        fusion=MLPConfig(in_features=8, hidden=(6, 5), n_classes=3))),
}
#: MoE transformers (selfgrow's): the MoE operators' families; dense-layer operators refuse
#: them with IncompatibleModelError
MOE_FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "sg-moe-topk": lambda: selfgrow_model(moe_experts=(3, 0)),
    "sg-moe-dynamic-k-swiglu": lambda: selfgrow_model(ffn="swiglu", moe_gate="dynamic_k",
                                                      moe_experts=(3, 3)),
    "sg-moe-top-any-nobias": lambda: selfgrow_model(bias=False, moe_gate="top_any",
                                                    moe_experts=(0, 3)),
}
FAMILIES: dict[str, Callable[[], nn.Module]] = {**TRANSFORMER_FAMILIES, **CLASSIFIERS,
                                                **MOE_FAMILIES}

KwFn = Callable[[nn.Module], dict[str, Any]]


def _widths(m: nn.Module) -> tuple[int, ...]:
    if isinstance(m, GrowableMultimodal):
        return m.fusion.config.hidden
    return m.config.hidden if isinstance(m, GrowableMLP) else m.config.channels


def _dims(m: nn.Module) -> Any:
    return get_adapter(m).dims()


def _max_len(m: nn.Module) -> int:
    cfg = m.config
    for a in ("max_seq_len", "n_positions", "max_position_embeddings"):
        if hasattr(cfg, a):
            return int(getattr(cfg, a))
    raise AttributeError("no maximum sequence length")


def _first_moe_layer(m: nn.Module) -> int:
    experts = getattr(getattr(m, "config", None), "moe_experts", ())
    return next((i for i, e in enumerate(experts) if e), 0)


def _component(m: nn.Module) -> str:
    """The component the ``component`` recipe grows: a multimodal model's fusion; elsewhere
    the head (a plain Linear, which the operators refuse: not a family of this table)."""
    return "fusion" if isinstance(m, GrowableMultimodal) else "head"


def _compound_steps(m: nn.Module) -> dict[str, Any]:
    if isinstance(m, GrowableMLP | GrowableCNN):
        w = _widths(m)
        return dict(steps=[make_config("net2wider", layer=0, new_width=w[0] + 2),
                           make_config("net2deeper", layer=1)])
    return dict(steps=[make_config("identity_insert", positions=(1,)),
                       make_config("widen_d_model")])


#: non-default arguments per operator (a dict, or a function of the model); operators not
#: listed run with their defaults. Chosen so the operator touches several places (middle
#: insertions, more than one layer) and the injected failures land mid-way.
KW: dict[str, dict[str, Any] | KwFn] = {
    "net2wider": lambda m: dict(layer=(0, 1), new_width=(_widths(m)[0] + 3, _widths(m)[1] + 2)),
    "net2deeper": dict(layer=0),
    "g_insert": dict(positions=(0, 2)),
    "g_random": dict(n_new=2, positions=(1, 2)),
    "identity_insert": dict(positions=(1, 2)),
    "widen_d_model_pad": dict(new_d=12),
    "widen_d_model_masked": dict(new_d=11),
    "ffn_net2wider": lambda m: dict(new_d_ff=_dims(m).d_ff + 5),
    "ffn_zero_fanout": lambda m: dict(new_d_ff=_dims(m).d_ff + 4),
    "heads_clone": lambda m: dict(new_n_heads=2 * _dims(m).n_heads),
    "heads_fresh": lambda m: dict(new_n_heads=2 * _dims(m).n_heads),
    "extend_positions": lambda m: dict(new_len=_max_len(m) + 4),
    "compound_grow": _compound_steps,
    "moe_upcycle": dict(n_experts=3),
    "moe_drop_upcycle": dict(n_experts=3),
    "add_expert": lambda m: dict(layer=_first_moe_layer(m), source=0),
    "remove_expert": lambda m: dict(layer=_first_moe_layer(m), expert=1),
    "grow_top_k": dict(new_k=3),
    "ffn_remove_units": dict(n_remove=2),
    "ffn_fold_duplicates": dict(atol=1e9),  # folds every unit into one: a real edit
    "remove_units": dict(layer=(0, 1), n_remove=(2, 1)),
    "heads_remove": lambda m: dict(n_remove=_dims(m).n_heads // _dims(m).n_kv_heads),
    "remove_layers": dict(n_remove=1),
    # a multimodal model's fusion grown through the component operator (a compound of two
    # steps, so the injected failures land mid-way); other families have no such component
    "component": lambda m: dict(component=_component(m), step=make_config(
        "compound_grow", steps=[make_config("net2wider", layer=0, new_width=_widths(m)[0] + 2),
                                make_config("net2deeper", layer=1)])),
}

#: Transaction methods that edit the model (the injection points)
EDITS = ("set_attr", "replace_module", "set_modules", "set_parameter", "set_buffer", "call")


def public_ops() -> list[str]:
    return [n for n in list_operators() if not n.startswith("_")]


def op_kwargs(op: str, model: nn.Module) -> dict[str, Any]:
    kw = KW.get(op, {})
    return dict(kw(model) if callable(kw) else kw)


#: operators whose KW recipe reads dimensions of one kind of family only
RECIPE_KIND: dict[str, str] = {
    "net2wider": "classifier",
    "ffn_net2wider": "transformer",
    "ffn_zero_fanout": "transformer",
    "heads_clone": "transformer",
    "heads_fresh": "transformer",
    "extend_positions": "transformer",
    "ffn_remove_units": "transformer",
    "ffn_fold_duplicates": "transformer",
    "remove_units": "classifier",
    "heads_remove": "transformer",
    "remove_layers": "transformer",
    "component": "classifier",
}
#: (operator, family) pairs excluded by hand, with the reason
EXCLUDED: dict[tuple[str, str], str] = {
    ("extend_positions", "torch-enc-preln"): "nn.TransformerEncoder has no position table",
    ("extend_positions", "torch-enc-postln"): "nn.TransformerEncoder has no position table",
}


def _kind(family: str) -> str:
    return "classifier" if family in CLASSIFIERS else "transformer"


def _applies(op: str, family: str, model: nn.Module) -> bool:
    """Whether ``op`` applies to ``family``: excluded explicitly above, or refused by the
    operator with IncompatibleModelError (its "not this model" answer). Any other error of the
    recipe or the operator is a bug and propagates (nothing is swallowed)."""
    if RECIPE_KIND.get(op, _kind(family)) != _kind(family) or (op, family) in EXCLUDED:
        return False
    cfg = make_config(op, **op_kwargs(op, model))
    try:
        get_operator(op).validate(model, cfg)
    except IncompatibleModelError:
        return False
    return True


def build_cases() -> list[tuple[str, str]]:
    models = {f: make() for f, make in FAMILIES.items()}
    return [(op, fam) for op in public_ops() for fam in sorted(FAMILIES)
            if _applies(op, fam, models[fam])]


CASES = build_cases()


def test_every_operator_has_a_case():
    covered = {op for op, _ in CASES}
    missing = [op for op in public_ops() if op not in covered]
    assert not missing, (
        f"operators {missing} apply to no family of this table; add their arguments to KW "
        f"(or a family they support to FAMILIES)"
    )


# ------------------------------------------------------------------------------ model setup
def _input(model: nn.Module, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    if isinstance(model, GrowableMLP):
        return (torch.randn(4, 1, 4, 4, generator=g),)
    if isinstance(model, GrowableCNN):
        c, d = model.config.in_channels, model.config.spatial_dims
        return (torch.randn(4, c, *(8,) * d, generator=g),)
    if isinstance(model, GrowableMultimodal):
        return (torch.randn(4, model.config.packed_features, generator=g),)
    return make_input(model, seed=seed)


def probe_fn(model: nn.Module, args: tuple) -> Callable[[nn.Module], torch.Tensor]:
    if isinstance(model, (GrowableMLP, GrowableCNN, GrowableMultimodal)):
        return lambda m: m(*args)
    c0 = get_adapter(model).dims().d_model
    return lambda m: output(m, args, c0)


def setup(family: str, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, tuple]:
    """Randomised model of ``family`` and an Adam with two param groups and populated state
    (three steps), deterministic in ``seed``."""
    torch.manual_seed(seed)
    model = randomize_(FAMILIES[family](), seed=seed).eval()
    args = _input(model, seed)
    params = list(model.parameters())
    half = len(params) // 2
    opt = torch.optim.Adam([{"params": params[:half]},
                            {"params": params[half:], "lr": 3e-3, "betas": (0.8, 0.99)}],
                           lr=1e-3)
    fn = probe_fn(model, args)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        fn(model).float().pow(2).mean().backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()
    return model, opt, args


# ------------------------------------------------------------------------------ snapshots
_PRIMITIVE = (int, float, bool, str, type(None), torch.dtype, torch.device)


def _plain(v: Any) -> bool:
    if isinstance(v, _PRIMITIVE):
        return True
    if isinstance(v, (tuple, list)):
        return all(_plain(x) for x in v)
    return False


def _config_view(model: nn.Module) -> Any:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    if hasattr(cfg, "to_dict"):  # transformers configs
        return (type(cfg), cfg.to_dict())
    if dataclasses.is_dataclass(cfg):
        return (type(cfg), dataclasses.asdict(cfg))
    return copy.deepcopy(vars(cfg))


def snapshot(model: nn.Module, opt: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Everything the transaction guarantees to restore (values are cloned; objects are
    kept by reference so identity can be checked)."""
    snap: dict[str, Any] = {
        "values": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "params": list(model.named_parameters(remove_duplicate=False)),
        "buffers": list(model.named_buffers(remove_duplicate=False)),
        "modules": list(model.named_modules(remove_duplicate=False)),
        "attrs": [(n, {k: v for k, v in vars(m).items() if _plain(v)})
                  for n, m in model.named_modules(remove_duplicate=False)],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "config": _config_view(model),
        "config_obj": getattr(model, "config", None),
    }
    if opt is not None:
        snap["groups"] = [
            (list(g["params"]), {k: copy.deepcopy(v) for k, v in g.items() if k != "params"})
            for g in opt.param_groups
        ]
        snap["state"] = {
            p: (st, {k: (v, v.clone() if isinstance(v, torch.Tensor) else v)
                     for k, v in st.items()})
            for p, st in opt.state.items()
        }
        snap["hooks"] = list(getattr(opt, "_optimizer_step_pre_hooks", {}).values())
        snap["hooked"] = getattr(opt, "_selfgrow_hooked", False)
    return snap


def _same_objects(a: list[tuple[str, Any]], b: list[tuple[str, Any]], what: str) -> None:
    assert [n for n, _ in a] == [n for n, _ in b], f"{what} names changed"
    for (n, x), (_, y) in zip(a, b, strict=True):
        assert x is y, f"{what} {n!r} is a different object"


def assert_unchanged(before: dict[str, Any], model: nn.Module,
                     opt: torch.optim.Optimizer | None, where: str) -> None:
    now = snapshot(model, opt)
    assert before["values"].keys() == now["values"].keys(), f"{where}: state_dict keys"
    for k, v in before["values"].items():
        w = now["values"][k]
        assert v.dtype == w.dtype and v.shape == w.shape and torch.equal(v, w), \
            f"{where}: state_dict[{k!r}] changed"
    _same_objects(before["params"], now["params"], f"{where}: parameter")
    _same_objects(before["buffers"], now["buffers"], f"{where}: buffer")
    _same_objects(before["modules"], now["modules"], f"{where}: module")
    for (n, a), (_, b) in zip(before["attrs"], now["attrs"], strict=True):
        assert a == b, f"{where}: attributes of module {n!r} changed: {a} != {b}"
    assert before["requires_grad"] == now["requires_grad"], f"{where}: requires_grad"
    assert before["config"] == now["config"], f"{where}: config changed"
    assert before["config_obj"] is now["config_obj"], f"{where}: config object replaced"
    if opt is None:
        return
    assert len(before["groups"]) == len(now["groups"]), f"{where}: number of param groups"
    for gi, ((pa, ha), (pb, hb)) in enumerate(zip(before["groups"], now["groups"],
                                                  strict=True)):
        assert len(pa) == len(pb) and all(x is y for x, y in zip(pa, pb, strict=True)), \
            f"{where}: members of param group {gi}"
        assert ha == hb, f"{where}: hyper-parameters of param group {gi}"
    assert set(map(id, before["state"])) == set(map(id, now["state"])), \
        f"{where}: optimizer state keys"
    for p, (st, vals) in before["state"].items():
        st_now = now["state"][p][0]
        assert st_now is st, f"{where}: optimizer state dict object replaced"
        assert vals.keys() == st_now.keys(), f"{where}: optimizer state keys of a param"
        for k, (obj, val) in vals.items():
            assert st_now[k] is obj, f"{where}: optimizer state {k!r} replaced"
            if isinstance(val, torch.Tensor):
                assert torch.equal(st_now[k], val), f"{where}: optimizer state {k!r} changed"
            else:
                assert st_now[k] == val, f"{where}: optimizer state {k!r} changed"
    assert now["hooks"] == before["hooks"] and now["hooked"] == before["hooked"], \
        f"{where}: optimizer step hooks changed"


# ------------------------------------------------------------------------------ injection
class Injected(RuntimeError):
    """The failure injected by these tests."""


class EditCounter:
    """Wrap every Transaction edit method; raise ``Injected`` at the ``fail_at``-th edit,
    ``before`` or after the original edit ran (0 = never raise, just count)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.n = 0
        self.fail_at = 0
        self.after = False
        originals = {m: getattr(Transaction, m) for m in EDITS}
        counter = self

        def wrap(orig: Callable[..., Any]) -> Callable[..., Any]:
            def edit(tx: Transaction, *a: Any, **k: Any) -> Any:
                counter.n += 1
                hit = counter.n == counter.fail_at
                if hit and not counter.after:
                    raise Injected(f"before edit {counter.n} ({orig.__name__})")
                out = orig(tx, *a, **k)
                if hit:
                    raise Injected(f"after edit {counter.n} ({orig.__name__})")
                return out

            return edit

        for m, orig in originals.items():
            monkeypatch.setattr(Transaction, m, wrap(orig))

    def arm(self, fail_at: int, after: bool) -> None:
        self.n, self.fail_at, self.after = 0, fail_at, after


def _injection_points(total: int) -> list[int]:
    return sorted({n for n in (1, 2, 3, (total + 1) // 2, total) if 1 <= n <= total})


@pytest.mark.parametrize("op,family", CASES, ids=[f"{o}-{f}" for o, f in CASES])
def test_failure_mid_operator_rolls_back_bit_identically(op, family, monkeypatch):
    model, opt, args = setup(family)
    cfg = make_config(op, **op_kwargs(op, model))
    fn = probe_fn(model, args)
    before = snapshot(model, opt)
    y0 = fn(model).detach().clone()
    counter = EditCounter(monkeypatch)

    # count the edits of this growth on an identical twin
    twin, _, _ = setup(family)
    counter.arm(0, False)
    grow_(twin, make_config(op, **op_kwargs(op, twin)))
    total = counter.n
    assert total >= 1, f"{op} made no edit through its Transaction"

    for n in _injection_points(total):
        for after in (False, True):
            counter.arm(n, after)
            with pytest.raises(Injected):
                grow_(model, cfg, optimizer=opt, probe_fn=fn)
            assert_unchanged(before, model, opt, f"{op} on {family}, edit {n}/{total} "
                                                 f"({'after' if after else 'before'})")
    counter.arm(0, False)

    # failures after apply: optimizer planning, the check hook, the post-growth probe
    real_plan = registry.plan_migration

    def failing_plan(*a: Any, **k: Any) -> Any:
        real_plan(*a, **k)
        raise Injected("plan_migration")

    monkeypatch.setattr(registry, "plan_migration", failing_plan)
    with pytest.raises(Injected):
        grow_(model, cfg, optimizer=opt, probe_fn=fn)
    assert_unchanged(before, model, opt, f"{op} on {family}, plan_migration")
    monkeypatch.setattr(registry, "plan_migration", real_plan)

    seen: list[nn.Module] = []

    def failing_check(m: nn.Module) -> None:
        seen.append(m)
        raise Injected("check")

    with pytest.raises(Injected):
        grow_(model, cfg, optimizer=opt, probe_fn=fn, check=failing_check)
    assert seen == [model]
    assert_unchanged(before, model, opt, f"{op} on {family}, check hook")

    calls = []

    def failing_probe(m: nn.Module) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 2:
            raise Injected("probe after growth")
        return fn(m)

    # the probe's failure becomes the project's error, naming it (the cause is kept)
    with pytest.raises(IncompatibleModelError, match="probe could not run") as ei:
        grow_(model, cfg, optimizer=opt, probe_fn=failing_probe)
    assert isinstance(ei.value.__cause__, Injected)
    assert_unchanged(before, model, opt, f"{op} on {family}, probe after growth")
    torch.testing.assert_close(fn(model), y0, rtol=0, atol=0)

    # the model still grows, and exactly like an untouched twin (no residue)
    ref, ref_opt, _ = setup(family)
    grow_(ref, make_config(op, **op_kwargs(op, ref)), optimizer=ref_opt)
    grow_(model, cfg, optimizer=opt)
    sd, sd_ref = model.state_dict(), ref.state_dict()
    assert sd.keys() == sd_ref.keys()
    for k in sd:
        assert torch.equal(sd[k], sd_ref[k]), f"{op} on {family}: {k} differs from the twin"
    assert _config_view(model) == _config_view(ref)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        st, st_ref = opt.state.get(p, {}), ref_opt.state.get(q, {})
        assert st.keys() == st_ref.keys()
        for k in st:  # (NaN markers compare equal to NaN)
            torch.testing.assert_close(st[k], st_ref[k], rtol=0, atol=0, equal_nan=True,
                                       msg=f"{op} on {family}: state {k} differs")
    with pytest.raises(AssertionError):  # positive control: the snapshot sees a real growth
        assert_unchanged(before, model, opt, "after growth")


# ------------------------------------------------------------------------------ invalid requests
class TxSpy:
    """Counts Transactions opened (an invalid request must raise before the first one)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.opened = 0
        orig = Transaction.__enter__
        spy = self

        def enter(tx: Transaction) -> Transaction:
            spy.opened += 1
            return orig(tx)

        monkeypatch.setattr(Transaction, "__enter__", enter)


def _expect_rejected(model: nn.Module, opt: torch.optim.Optimizer | None, cfg: Any,
                     err: type[Exception] | tuple[type[Exception], ...],
                     monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    spy = TxSpy(monkeypatch)
    before = snapshot(model, opt)
    with pytest.raises(err):
        grow_(model, cfg, optimizer=opt)
    assert spy.opened == 0, f"{where}: raised only after a Transaction was opened"
    assert_unchanged(before, model, opt, where)


def _n_layers(model: nn.Module) -> int:
    if isinstance(model, (GrowableMLP, GrowableCNN, GrowableMultimodal)):
        return len(_widths(model))
    return get_adapter(model).dims().n_layers


def invalid_variants(op: str, model: nn.Module) -> list[tuple[str, dict[str, Any]]]:
    """Invalid versions of the operator's valid arguments, derived from its config fields:
    factors that are not integers >= 2, shrinking / non-growing target sizes, layers and
    positions out of range, negative noise, unknown enumeration values."""
    base = op_kwargs(op, model)
    cls = get_operator(op).config_cls
    n = _n_layers(model)
    out: list[tuple[str, dict[str, Any]]] = []
    for f in dataclasses.fields(cls):
        name = f.name
        cur = base.get(name, f.default)
        bad: list[Any] = []
        if name == "factor":
            bad = [1, 0, -2, 2.5]
        elif name.startswith("new_") and isinstance(cur, int):
            bad = [1, 0, -4]  # shrinking (every family here has sizes >= 2)
        elif name.startswith("new_") and isinstance(cur, tuple):
            bad = [tuple(1 for _ in cur)]
        elif name in ("layer", "layers"):
            bad = [n + 3, -1] if isinstance(cur, int) else [(n + 3,), (-1,)]
        elif name == "positions":
            bad = [(n + 3,), (-1,)]
        elif name in ("noise", "atol") or name.endswith("_std"):
            bad = [-1.0, math.nan]
        elif isinstance(cur, str):
            bad = ["no-such-choice"]
        elif name == "steps":  # compound_grow: no step, an unknown step config
            bad = [[], [{"type": "NoSuchConfig", "data": {}}]]
        elif name == "step":  # component: an unknown step config, an invalid step
            bad = [{"type": "NoSuchConfig", "data": {}},
                   make_config("net2wider", layer=n + 3, new_width=64)]
        out += [(f"{name}={b!r}", {**base, name: b}) for b in bad]
    return out


@pytest.mark.parametrize("op,family", CASES, ids=[f"{o}-{f}" for o, f in CASES])
def test_invalid_arguments_raise_before_any_change(op, family, monkeypatch):
    model, opt, _ = setup(family)
    variants = invalid_variants(op, model)
    assert variants, f"no invalid variant derived from the fields of {op}'s config"
    reached = 0
    for label, kw in variants:
        try:
            cfg = make_config(op, **kw)
        except GrowthConfigError:
            continue  # rejected when the config is built: fine as well
        _expect_rejected(model, opt, cfg, GrowthConfigError, monkeypatch, f"{op} {label}")
        reached += 1
    assert reached, f"{op}: every invalid variant was refused by make_config; none by grow_"


@pytest.mark.parametrize("op,family", CASES, ids=[f"{o}-{f}" for o, f in CASES])
def test_frozen_and_meta_models_are_rejected(op, family, monkeypatch):
    model, opt, _ = setup(family)
    cfg = make_config(op, **op_kwargs(op, model))
    for p in model.parameters():
        p.requires_grad_(False)
    _expect_rejected(model, opt, cfg, IncompatibleModelError, monkeypatch, f"{op} frozen")

    meta = FAMILIES[family]().to("meta")
    spy = TxSpy(monkeypatch)
    params = list(meta.parameters())
    with pytest.raises(IncompatibleModelError, match="meta"):
        grow_(meta, make_config(op, **op_kwargs(op, FAMILIES[family]())))
    assert spy.opened == 0
    assert all(a is b for a, b in zip(params, meta.parameters(), strict=True))


def _corrupt_config(model: nn.Module) -> None:
    """Make the model's config disagree with its modules (one layer too many / a width
    that is not the module's)."""
    if isinstance(model, GrowableMultimodal):
        _corrupt_config(model.fusion)  # its config is read from the components'
    elif isinstance(model, GrowableMLP | GrowableCNN):
        w = _widths(model)
        key = "hidden" if isinstance(model, GrowableMLP) else "channels"
        model.config = model.config.replace(**{key: (w[0] + 1, *w[1:])})
    elif isinstance(model, nn.TransformerEncoder):
        model.num_layers += 1
    elif isinstance(model.config, TransformerConfig):
        model.config.n_layers += 1
    else:
        model.config.num_hidden_layers += 1


@pytest.mark.parametrize("op,family", CASES, ids=[f"{o}-{f}" for o, f in CASES])
def test_config_disagreeing_with_modules_is_rejected(op, family, monkeypatch):
    model, opt, _ = setup(family)
    cfg = make_config(op, **op_kwargs(op, model))
    _corrupt_config(model)
    _expect_rejected(model, opt, cfg, IncompatibleModelError, monkeypatch,
                     f"{op} on {family} with a corrupted config")


#: specific invalid requests (family, op, kwargs, error)
SPECIFIC: list[tuple[str, str, dict[str, Any], type[Exception]]] = [
    ("torch-enc-preln", "widen_d_model_pad", dict(new_d=10), GrowthConfigError),  # not / Dh
    ("sg-preln", "widen_d_model", dict(factor=1.5), GrowthConfigError),
    ("sg-preln", "widen_d_model_pad", dict(new_d=8), GrowthConfigError),  # no growth
    ("sg-preln", "g_random", dict(n_new=2, positions=(1,)), GrowthConfigError),
    ("torch-enc-preln", "widen_d_model_masked", dict(new_d=12), IncompatibleModelError),
    ("torch-enc-postln", "identity_insert", dict(post_ln="ramp"), IncompatibleModelError),
    ("mlp", "net2wider", dict(layer=(0, 1), new_width=(9,)), GrowthConfigError),
    ("mlp", "net2wider", dict(layer=(0, 0), new_width=(9, 9)), GrowthConfigError),
    ("cnn", "net2wider", dict(layer=1, new_width=4), GrowthConfigError),  # no growth
    ("cnn", "net2deeper", dict(layer=2), GrowthConfigError),
    ("mlp", "g_stack", {}, IncompatibleModelError),
    ("sg-preln", "net2wider", dict(layer=0, new_width=9), IncompatibleModelError),
]


@pytest.mark.parametrize("family,op,kw,err", SPECIFIC,
                         ids=[f"{f}-{o}-{i}" for i, (f, o, _, _) in enumerate(SPECIFIC)])
def test_specific_invalid_requests(family, op, kw, err, monkeypatch):
    if family not in FAMILIES:
        pytest.skip(f"{family} not available")
    model, opt, _ = setup(family)
    _expect_rejected(model, opt, make_config(op, **kw), err, monkeypatch, f"{op} {kw}")
