"""The public API is tiered and sorted, errors live in one module, and every registry follows
one duplicate-name rule."""

from __future__ import annotations

import ast
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch import nn

import selfgrow
import selfgrow.adapters
import selfgrow.control
import selfgrow.ops
from selfgrow import errors
from selfgrow.errors import GrowthConfigError

OPERATOR_AUTHOR = {"Operator", "OpConfig", "GrowthResult", "register_operator", "Transaction",
                   "ParamMap", "AxisMap", "regrid"}
ADAPTER_AUTHOR = {"TransformerAdapter", "Adapter", "register_adapter", "ProjRef", "LayerView"}


@pytest.mark.parametrize("mod", [selfgrow, selfgrow.ops, selfgrow.adapters, selfgrow.control])
def test_all_is_sorted_and_resolves(mod):
    assert list(mod.__all__) == sorted(mod.__all__), mod.__name__
    for name in mod.__all__:
        assert hasattr(mod, name), f"{mod.__name__}.{name}"


def test_tiers():
    top = set(selfgrow.__all__)
    assert not top & OPERATOR_AUTHOR, top & OPERATOR_AUTHOR
    assert not top & ADAPTER_AUTHOR, top & ADAPTER_AUTHOR
    assert OPERATOR_AUTHOR <= set(selfgrow.ops.__all__)
    assert {"TransformerAdapter", "Adapter", "register_adapter"} <= set(selfgrow.adapters.__all__)
    assert {"grow_", "make_config", "GrowthController", "save_checkpoint",
            "register_action", "list_actions"} <= top


def test_every_error_class_lives_in_errors_and_is_exported():
    root = Path(selfgrow.__file__).parent
    outside = []
    for p in root.rglob("*.py"):
        if p.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                getattr(b, "id", getattr(b, "attr", "")).endswith(("Error", "Exception"))
                for b in node.bases
            ):
                outside.append(f"{p.relative_to(root)}:{node.name}")
    assert not outside, outside
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass)
               if issubclass(c, errors.SelfgrowError)]
    assert len(classes) >= 8
    for c in classes:
        assert c.__name__ in selfgrow.__all__, c.__name__


# --- one duplicate rule for every registry ---------------------------------------------------
def _operator_registry():
    from selfgrow.ops import GrowthResult, OpConfig, Operator, register_operator

    @dataclass
    class DupCfg(OpConfig):
        name: ClassVar[str] = "net2wider"  # taken by Net2WiderNet

    def make():
        class Other(Operator):
            def apply(self, model, config, tx):
                return GrowthResult()
        return Other

    selfgrow.list_operators()
    return lambda cls, **kw: register_operator(DupCfg, **kw)(cls), make


def _model_registry():
    from selfgrow.models import register_model
    from selfgrow.models.mlp import MLPConfig

    def make():
        class OtherMLP(nn.Module):
            def __init__(self, cfg):
                super().__init__()
        return OtherMLP

    selfgrow.list_models()
    return lambda cls, **kw: register_model(MLPConfig, **kw)(cls), make


class _Dummy(nn.Module):
    pass


def _first(model, **kw):
    return None


def _action_registry():
    import selfgrow.control.actions as ca
    from selfgrow.control import register_action

    def register(fn, **kw):
        ca._ACTIONS.setdefault((_Dummy, "widen"), _first)  # (on the test's copy of the table)
        return register_action(_Dummy, "widen", **kw)(fn)

    return register, lambda: (lambda model, **kw: None)


def _adapter_registry():
    from selfgrow.adapters import register_adapter, supported_families
    from selfgrow.adapters.torch_encoder import TorchEncoderAdapter

    supported_families()

    def make():
        class Other(TorchEncoderAdapter):
            pass
        return Other

    return lambda cls, **kw: register_adapter(cls, **kw), make


def _signal_registry():
    from selfgrow.control import LossPlateau, register_signal

    def make():
        class Other(LossPlateau):
            pass
        return Other

    return lambda cls, **kw: register_signal(cls, **kw), make


@pytest.mark.parametrize("setup", [_operator_registry, _model_registry, _action_registry,
                                   _adapter_registry, _signal_registry],
                         ids=["operators", "models", "actions", "adapters", "signals"])
def test_one_duplicate_rule(setup, monkeypatch):
    register, make = setup()
    # work on copies of the tables so the real registries are untouched
    import selfgrow.adapters._base as ab
    import selfgrow.control.actions as ca
    import selfgrow.control.signals as cs
    import selfgrow.models._registry as mr
    import selfgrow.ops._registry as opr

    for mod, attr in [(opr, "_OPERATOR_CLASSES"), (opr, "_OPERATORS"), (opr, "_CONFIGS"),
                      (mr, "_MODELS"), (mr, "_CONFIGS"), (ca, "_ACTIONS"),
                      (ab, "_ADAPTERS"), (cs, "SIGNALS")]:
        monkeypatch.setattr(mod, attr, dict(getattr(mod, attr)))
    other = make()
    with pytest.raises(GrowthConfigError, match="already registered.*override=True"):
        register(other)
    register(other, override=True)  # on purpose: allowed
    register(other)  # the same object again: a no-op
    register(make())  # the same class re-defined (a re-imported module): a no-op too


def test_negative_control_registries_really_are_guarded(monkeypatch):
    # with the guard disabled, the same duplicate goes through silently: the test above
    # would catch a registry that bypasses register_unique
    import selfgrow.control.signals as cs
    import selfgrow.core as core
    from selfgrow.control import LossPlateau

    monkeypatch.setattr(cs, "SIGNALS", dict(cs.SIGNALS))
    monkeypatch.setattr(cs, "register_unique",
                        lambda table, key, value, what, override=False: table.__setitem__(key,
                                                                                          value))

    class Other(LossPlateau):
        pass

    cs.register_signal(Other)
    assert cs.SIGNALS["loss_plateau"] is Other
    assert core.register_unique is not cs.register_unique


def test_make_config_and_dict_config_errors_list_valid_fields():
    with pytest.raises(GrowthConfigError, match="valid fields: .*new_width"):
        selfgrow.make_config("net2wider", widht=3)
    from selfgrow.ops import op_config_from_dict

    with pytest.raises(GrowthConfigError, match="valid fields"):
        op_config_from_dict({"type": "Net2WiderConfig", "version": 1, "data": {"widht": 3}})


def test_config_version_checked_on_load():
    from selfgrow.models import build_model

    d = {"type": "MLPConfig", "version": 99,
         "data": {"in_features": 4, "hidden": [3], "n_classes": 2}}
    with pytest.raises(GrowthConfigError, match="version 99.*reads up to version 1"):
        build_model(d)
    d["version"] = 1
    assert isinstance(build_model(d), nn.Module)


def test_skip_reasons_are_an_enum():
    from selfgrow.control import SkipReason
    from selfgrow.control.policies import BLOCK_REASONS

    assert set(BLOCK_REASONS) | {"error"} == {r.value for r in SkipReason}
    assert SkipReason.BUDGET == "budget"  # a str: JSON logs keep the plain value


def test_shared_helpers_written_once():
    from selfgrow.core import count_params, eval_mode

    m = nn.Sequential(nn.Linear(2, 3), nn.Dropout(0.5))
    m[1].eval()  # a submodule the user keeps in eval mode
    with eval_mode(m):
        assert not m.training
    assert m.training and not m[1].training
    assert count_params(m) == 9
    root = Path(selfgrow.__file__).parent
    defs = [p for p in root.rglob("*.py")
            if "def count_params" in p.read_text() or "def _zero_sum_noise(" in p.read_text()
            and "zero_sum_noise(" not in p.read_text().split("def _zero_sum_noise(")[1][:600]]
    assert [p.name for p in defs] == ["core.py"], defs
    torch.manual_seed(0)


def test_absurd_width_fails_fast_before_any_allocation():
    import time

    from selfgrow import InsufficientMemoryError, grow_, make_config

    model = selfgrow.build_model(selfgrow.models.mlp.MLPConfig(64, (8,), 10))
    opt = torch.optim.Adam(model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t0 = time.perf_counter()
    with pytest.raises(InsufficientMemoryError, match="bytes"):
        grow_(model, make_config("net2wider", layer=0, new_width=10**12), optimizer=opt)
    assert time.perf_counter() - t0 < 0.5
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(InsufficientMemoryError, match="max_bytes cap"):
        grow_(model, make_config("net2wider", layer=0, new_width=16), max_bytes=100)
    grow_(model, make_config("net2wider", layer=0, new_width=16), max_bytes=10**9)  # fits
