"""Multimodal growth: the 1-D GrowableCNN, GrowableMultimodal (packing, configs, checkpoints),
the ``component`` operator (isolation of the other components, function preservation,
errors), the multimodal family actions and the per-modality signals and policies."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfgrow import GrowthConfigError, GrowthController, build_model
from selfgrow.control.modality import (
    ComponentSaturation,
    ModalityImbalance,
    fusion_plateau,
    modality_aware_policy,
    modality_scores,
    uniform_policy,
)
from selfgrow.control.policies import PolicyContext, Rule, RulePolicy
from selfgrow.control.signals import Signal
from selfgrow.errors import IncompatibleModelError
from selfgrow.models import model_config_dict
from selfgrow.models.cnn import CNNConfig, GrowableCNN
from selfgrow.models.mlp import MLPConfig
from selfgrow.models.multimodal import GrowableMultimodal, MultimodalConfig
from selfgrow.ops import get_operator, grow_, make_config
from selfgrow.ops._registry import op_config_from_dict, op_config_to_dict
from selfgrow.ops.component import ComponentConfig

EMB = 4
IMAGE = CNNConfig(in_channels=1, image_size=8, channels=(4, 4), n_classes=EMB, pool_after=(0,))
AUDIO = CNNConfig(in_channels=3, image_size=8, channels=(4, 4), n_classes=EMB, spatial_dims=1)
N_CLASSES = 3
PACKED = 1 * 8 * 8 + 3 * 8
COMPONENTS = ("image", "audio", "fusion")
#: one step per operator kind, valid on every component (CNN block 0 / MLP hidden layer 0)
STEPS = {
    "net2wider": dict(layer=0, new_width=7),
    "net2deeper": dict(layer=0),
    "remove_units": dict(layer=0, n_remove=1),
}


def _config(image: bool = True, audio: bool = True, hidden: tuple[int, ...] = (6,)
            ) -> MultimodalConfig:
    d = EMB * (int(image) + int(audio))
    return MultimodalConfig(image=IMAGE if image else None, audio=AUDIO if audio else None,
                            fusion=MLPConfig(in_features=d, hidden=hidden, n_classes=N_CLASSES))


def _batch(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randn(n, 3, 8, generator=g)


def _model(seed: int = 0, **kw: Any) -> GrowableMultimodal:
    torch.manual_seed(seed)
    return GrowableMultimodal(_config(**kw)).eval()


def _adam_with_state(model: nn.Module, x: torch.Tensor) -> torch.optim.Adam:
    """Adam after two train-mode steps (populated state, BatchNorm statistics moved off their
    defaults), no gradients left, the model back in eval mode."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()
    return opt


# --------------------------------------------------------------------------- isolation checker
def _outside(name: str, component: str) -> bool:
    return not name.startswith(f"{component}.")


def snapshot_outside(model: nn.Module, opt: torch.optim.Optimizer, component: str
                     ) -> dict[str, Any]:
    """Parameters (object and value), their Adam state and the buffers outside ``component``."""
    params, state = {}, {}
    for n, p in model.named_parameters():
        if _outside(n, component):
            params[n] = (p, p.detach().clone())
            state[n] = {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                        for k, v in opt.state[p].items()}
    buffers = {n: b.clone() for n, b in model.named_buffers() if _outside(n, component)}
    return dict(params=params, state=state, buffers=buffers, component=component)


def outside_changes(model: nn.Module, opt: torch.optim.Optimizer, snap: dict[str, Any]
                    ) -> list[str]:
    """Every difference outside the component since ``snap`` (empty = untouched)."""
    comp = snap["component"]
    out = []
    now = {n: p for n, p in model.named_parameters() if _outside(n, comp)}
    if now.keys() != snap["params"].keys():
        out.append(f"parameter names {sorted(now.keys() ^ snap['params'].keys())}")
    for n, (obj, val) in snap["params"].items():
        p = now.get(n)
        if p is None:
            continue
        if p is not obj:
            out.append(f"{n}: new Parameter object")
        if p.dtype != val.dtype or p.shape != val.shape or not torch.equal(p.detach(), val):
            out.append(f"{n}: value")
        st = opt.state.get(p, {})
        ref = snap["state"][n]
        if set(st) != set(ref):
            out.append(f"{n}: optimizer state keys {sorted(st)} != {sorted(ref)}")
        for k in ("exp_avg", "exp_avg_sq", "step"):
            if k in ref and k in st and not torch.equal(torch.as_tensor(st[k]),
                                                        torch.as_tensor(ref[k])):
                out.append(f"{n}: optimizer {k}")
    bufs = {n: b for n, b in model.named_buffers() if _outside(n, comp)}
    if bufs.keys() != snap["buffers"].keys():
        out.append("buffer names")
    for n, b in snap["buffers"].items():
        if n in bufs and not torch.equal(bufs[n], b):
            out.append(f"{n}: buffer")
    return out


@pytest.mark.parametrize("op", sorted(STEPS))
@pytest.mark.parametrize("component", COMPONENTS)
def test_component_growth_leaves_the_other_components_bit_identical(component, op):
    model = _model()
    x = model.pack(*_batch())
    opt = _adam_with_state(model, x)
    snap = snapshot_outside(model, opt, component)
    assert snap["params"] and snap["buffers"]
    steps = {n: opt.state[p]["step"].clone() for n, p in model.named_parameters()}
    before_cfg = model.config
    commits = []
    ev = grow_(model, make_config("component", component=component,
                                  step=make_config(op, **STEPS[op])),
               optimizer=opt, probe=x, on_commit=commits.append)
    assert outside_changes(model, opt, snap) == []
    # the step's ParamMaps are re-keyed to the model's names (sources included), so the
    # component's own parameters keep (migrated) Adam state of their new shapes
    (tr,) = commits
    names = dict(model.named_parameters())
    assert tr.maps and all(n.startswith(f"{component}.") and n in names for n in tr.maps)
    assert all(pm.source is None or pm.source.startswith(f"{component}.")
               for pm in tr.maps.values())
    for n, p in names.items():
        st = opt.state[p]
        if n in tr.maps and tr.maps[n].source is None:  # a brand-new tensor (inserted layer)
            assert "step" in st, n
            continue
        assert {"exp_avg", "exp_avg_sq", "step"} <= set(st), n
        assert st["exp_avg"].shape == st["exp_avg_sq"].shape == p.shape, n
        if n in steps:
            assert torch.equal(st["step"], steps[n]), n
    # the component itself did change (the check is not vacuous) and the others' configs not
    assert getattr(model.config, component) != getattr(before_cfg, component)
    for other in set(COMPONENTS) - {component}:
        assert getattr(model.config, other) == getattr(before_cfg, other)
    assert ev.action["op"] == "component"
    # the optimizer holds exactly the model's parameters and can step
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {
        id(p) for p in model.parameters()}
    model.train()
    model(x).pow(2).mean().backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_isolation_checker_detects_changes():
    """Negative control: every kind of change outside the component is reported."""
    model = _model()
    x = model.pack(*_batch())
    opt = _adam_with_state(model, x)
    snap = snapshot_outside(model, opt, "audio")
    assert outside_changes(model, opt, snap) == []
    w = model.image.head.weight
    with torch.no_grad():
        w[0, 0] += 1e-6
    assert outside_changes(model, opt, snap) == ["image.head.weight: value"]
    with torch.no_grad():
        w[0, 0] = snap["params"]["image.head.weight"][1][0, 0]
    assert outside_changes(model, opt, snap) == []
    opt.state[model.fusion.head.bias]["exp_avg_sq"][0] += 1.0
    assert outside_changes(model, opt, snap) == ["fusion.head.bias: optimizer exp_avg_sq"]
    opt.state[model.fusion.head.bias]["exp_avg_sq"].copy_(
        snap["state"]["fusion.head.bias"]["exp_avg_sq"])
    st = opt.state[model.fusion.head.weight]
    st["step"] = st["step"] + 1
    assert outside_changes(model, opt, snap) == ["fusion.head.weight: optimizer step"]
    st["step"] = snap["state"]["fusion.head.weight"]["step"].clone()
    model.image.blocks[0].bn.running_mean.add_(0.5)
    assert outside_changes(model, opt, snap) == ["image.blocks.0.bn.running_mean: buffer"]
    model.image.blocks[0].bn.running_mean.copy_(
        snap["buffers"]["image.blocks.0.bn.running_mean"])
    # a replaced Parameter object with the same value (and state moved over) is caught too
    old = model.fusion.head.bias
    model.fusion.head.bias = nn.Parameter(old.detach().clone())
    opt.state[model.fusion.head.bias] = opt.state.pop(old)
    assert outside_changes(model, opt, snap) == ["fusion.head.bias: new Parameter object"]
    # and a change INSIDE the component is not reported
    opt.state[old] = opt.state.pop(model.fusion.head.bias)
    model.fusion.head.bias = old
    assert outside_changes(model, opt, snap) == []
    with torch.no_grad():
        model.audio.head.weight.add_(1.0)
    assert outside_changes(model, opt, snap) == []


# --------------------------------------------------------------------------- preservation
@pytest.mark.parametrize("op", ["net2wider", "net2deeper"])
@pytest.mark.parametrize("component", COMPONENTS)
def test_component_growth_preserves_the_whole_models_function(component, op):
    model = _model(seed=1)
    x = model.pack(*_batch(seed=1))
    _adam_with_state(model, x)
    y0 = model(x).detach()
    ev = grow_(model, make_config("component", component=component,
                                  step=make_config(op, **STEPS[op])), probe=x)
    assert ev.preservation["exact_expected"] is True
    assert ev.preservation["max_rel"] <= 1e-5
    rel = float((model(x).detach() - y0).abs().max() / y0.abs().max())
    assert rel <= 1e-5
    assert ev.params_after > ev.params_before


def test_component_remove_units_is_a_measured_shrink():
    model = _model(seed=1)
    x = model.pack(*_batch(seed=1))
    ev = grow_(model, make_config("component", component="audio",
                                  step=make_config("remove_units", layer=0, n_remove=1)),
               probe=x)
    assert ev.preservation["exact_expected"] is False
    assert ev.params_after < ev.params_before
    assert model.config.audio.channels == (3, 4)


# --------------------------------------------------------------------------- 1-D CNN
def test_one_d_cnn_uses_1d_layers_and_grows_exactly():
    torch.manual_seed(0)
    m = GrowableCNN(CNNConfig(in_channels=3, image_size=8, channels=(4, 5), n_classes=2,
                              pool_after=(0,), spatial_dims=1)).eval()
    kinds = {type(mod) for mod in m.modules()}
    assert {nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d} <= kinds
    assert not kinds & {nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d}
    x = torch.randn(4, 3, 8)
    assert m(x).shape == (4, 2)
    ev = grow_(m, make_config("net2wider", layer=1, new_width=9), probe=x)
    assert ev.preservation["max_rel"] <= 1e-5
    assert m.config.channels == (4, 9) and m.blocks[1].conv.weight.shape == (9, 4, 3)
    assert isinstance(m.blocks[1].bn, nn.BatchNorm1d) and m.blocks[1].bn.num_features == 9


# --------------------------------------------------------------------------- packing
def test_packed_and_two_tensor_forward_agree_and_pack_round_trips():
    model = _model()
    img, aud = _batch()
    x = model.pack(img, aud)
    assert x.shape == (6, PACKED) == (6, model.config.packed_features)
    torch.testing.assert_close(model(x), model(img, aud), rtol=0, atol=0)
    parts = model.unpack(x)
    assert list(parts) == ["image", "audio"]
    assert torch.equal(parts["image"], img) and torch.equal(parts["audio"], aud)
    assert torch.equal(model.pack(**parts), x)
    emb = model.embed(x)
    assert {k: v.shape for k, v in emb.items()} == {"image": (6, EMB), "audio": (6, EMB)}
    torch.testing.assert_close(model.fuse(emb), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(6, PACKED - 1), (6, PACKED + 3), (6, 1, PACKED)])
def test_a_bad_packed_shape_names_the_expected_width(shape):
    model = _model()
    with pytest.raises(IncompatibleModelError, match=rf"\(B, {PACKED}\)"):
        model(torch.randn(*shape))


def test_pack_needs_every_present_modality():
    model = _model()
    with pytest.raises(IncompatibleModelError, match="'audio'"):
        model.pack(_batch()[0])


@pytest.mark.parametrize("which", ["image", "audio"])
def test_unimodal_models(which):
    model = _model(image=which == "image", audio=which == "audio")
    img, aud = _batch()
    t = img if which == "image" else aud
    assert model.growth_components == (which, "fusion")
    assert model.config.modalities == (which,)
    packed = model.pack(**{which: t})
    torch.testing.assert_close(model(packed), model(t), rtol=0, atol=0)
    assert model(t).shape == (6, N_CLASSES)
    other = "audio" if which == "image" else "image"
    with pytest.raises(IncompatibleModelError, match=f"no '{other}' encoder"):
        model.encoder(other)
    with pytest.raises(GrowthConfigError, match="component"):
        grow_(model, make_config("component", component=other,
                                 step=make_config("net2wider", layer=0, new_width=8)))
    ev = grow_(model, make_config("component", component=which,
                                  step=make_config("net2wider", layer=0, new_width=8)), probe=t)
    assert ev.preservation["max_rel"] <= 1e-5
    assert getattr(model.config, which).channels[0] == 8


# --------------------------------------------------------------------------- configs
def _fusion(d: int = 2 * EMB) -> MLPConfig:
    return MLPConfig(in_features=d, hidden=(6,), n_classes=N_CLASSES)


@pytest.mark.parametrize("kw, match", [
    (dict(image=None, audio=None), "needs an image or an audio encoder"),
    (dict(audio=IMAGE.replace(in_channels=3)), "audio encoder must be 1-D"),
    (dict(image=AUDIO.replace(in_channels=1)), "image encoder must be 2-D"),
    (dict(fusion=_fusion(2 * EMB + 1)), r"fusion.in_features=9 must be the sum"),
    (dict(audio=None), r"fusion.in_features=8 must be the sum"),
    (dict(image=MLPConfig(in_features=8, hidden=(4,), n_classes=4)), "must be a CNNConfig"),
    (dict(fusion=AUDIO), "fusion must be an MLPConfig"),
])
def test_multimodal_config_validation(kw, match):
    base = dict(image=IMAGE, audio=AUDIO, fusion=_fusion())
    with pytest.raises(GrowthConfigError, match=match):
        MultimodalConfig(**{**base, **kw})


def test_cnn_spatial_dims_is_validated():
    with pytest.raises(GrowthConfigError, match="spatial_dims 3; valid choices: 1, 2"):
        CNNConfig(in_channels=1, image_size=8, channels=(4,), n_classes=2, spatial_dims=3)
    with pytest.raises(GrowthConfigError, match="MultimodalConfig"):
        GrowableMultimodal(IMAGE)


def _grown_model() -> tuple[GrowableMultimodal, torch.Tensor]:
    model = _model(seed=2)
    x = model.pack(*_batch(seed=2))
    opt = _adam_with_state(model, x)
    for comp, op in (("audio", "net2wider"), ("image", "net2deeper"), ("fusion", "net2wider"),
                     ("audio", "remove_units")):
        grow_(model, make_config("component", component=comp, step=make_config(op, **STEPS[op])),
              optimizer=opt)
    return model, x


def test_checkpoint_round_trip_of_a_grown_model():
    model, x = _grown_model()
    assert model.config.audio.channels == (6, 4)
    assert model.config.image.channels == (4, 4, 4)
    assert model.config.fusion.hidden == (7,)
    d = model_config_dict(model)
    d2 = json.loads(json.dumps(d))
    assert d2 == d
    fresh = build_model(d2)
    assert isinstance(fresh, GrowableMultimodal) and fresh.config == model.config
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.eval()
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    assert build_model(model.config).config == model.config


def test_config_is_derived_from_the_components():
    model = _model()
    c0 = model.config
    assert model.config is c0  # cached while nothing grows
    grow_(model, make_config("component", component="fusion",
                             step=make_config("net2wider", layer=0, new_width=9)))
    assert model.config is not c0 and model.config.fusion is model.fusion.config
    assert model.config.fusion.hidden == (9,) and c0.fusion.hidden == (6,)


def test_component_config_serialises():
    cfg = make_config("component", component="audio",
                      step=make_config("net2wider", layer=0, new_width=16))
    assert isinstance(cfg, ComponentConfig) and isinstance(cfg.step, dict)
    d = op_config_to_dict(cfg)
    back = op_config_from_dict(json.loads(json.dumps(d)))
    assert back == cfg
    assert back.step_config() == make_config("net2wider", layer=0, new_width=16)


# --------------------------------------------------------------------------- component errors
def test_unknown_component_lists_the_valid_names():
    model = _model()
    with pytest.raises(GrowthConfigError, match="video") as e:
        grow_(model, make_config("component", component="video",
                                 step=make_config("net2wider", layer=0, new_width=8)))
    for name in COMPONENTS:
        assert name in str(e.value)


def test_component_config_refuses_nesting_and_non_configs():
    inner = make_config("component", component="audio",
                        step=make_config("net2wider", layer=0, new_width=8))
    with pytest.raises(GrowthConfigError, match="do not nest"):
        make_config("component", component="fusion", step=inner)
    with pytest.raises(GrowthConfigError, match="do not nest"):
        make_config("component", component="fusion", step=op_config_to_dict(inner))
    for bad in (42, "net2wider", {"layer": 0}, None):
        with pytest.raises(GrowthConfigError, match="step must be an operator config"):
            make_config("component", component="audio", step=bad)
    for bad in ("", 3):
        with pytest.raises(GrowthConfigError, match="must be a submodule name"):
            make_config("component", component=bad, step=make_config("net2deeper"))


def test_an_invalid_step_names_the_component_and_changes_nothing():
    model = _model()
    x = model.pack(*_batch())
    opt = _adam_with_state(model, x)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    ostate = copy.deepcopy(opt.state_dict())
    cfg0 = model.config
    with pytest.raises(GrowthConfigError, match="component 'audio'"):
        grow_(model, make_config("component", component="audio",
                                 step=make_config("net2wider", layer=5, new_width=8)),
              optimizer=opt, probe=x)
    assert model.config == cfg0
    now = model.state_dict()
    assert now.keys() == sd.keys() and all(torch.equal(now[k], sd[k]) for k in sd)
    after = opt.state_dict()
    for k, st in ostate["state"].items():
        for name, v in st.items():
            assert torch.equal(torch.as_tensor(after["state"][k][name]), torch.as_tensor(v))


# --------------------------------------------------------------------------- shrink, actions
def test_is_shrink_follows_the_step():
    shrink = make_config("component", component="audio",
                         step=make_config("remove_units", layer=0, n_remove=1))
    grow = make_config("component", component="audio",
                       step=make_config("net2wider", layer=0, new_width=16))
    assert get_operator(shrink).is_shrink(shrink) is True
    assert get_operator(grow).is_shrink(grow) is False


class Scripted(Signal):
    """Triggered on the steps listed in ``on`` (a test double)."""

    name = "scripted"

    def __init__(self, on: set[int], name: str) -> None:
        super().__init__(threshold=0.5, window=1, name=name)
        self.on = on

    def update(self, step: int, metrics: Any) -> None:
        self.value = 1.0 if step in self.on else 0.0
        self.triggered = step in self.on


def test_component_prune_rule_needs_direction_prune_and_prunes():
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    sig = [Scripted({1}, "idle")]
    kw = dict(component="audio", fraction=0.25)
    with pytest.raises(GrowthConfigError, match="removes capacity"):
        GrowthController(model, opt, sig, RulePolicy([Rule("idle", "prune", kwargs=kw)]))
    ctrl = GrowthController(model, opt, [Scripted({1}, "idle")],
                            RulePolicy([Rule("idle", "prune", kwargs=kw, direction="prune")]),
                            probe=model.pack(*_batch()), measure_flops=False)
    loss = model(model.pack(*_batch())).pow(2).mean()
    loss.backward()
    ctrl.observe(loss=loss)
    ev = [e for e in ctrl.events if e.kind == "prune"]
    assert len(ev) == 1 and "-> prune audio" in ev[0].reason
    assert model.config.audio.channels == (3, 3)
    assert model.config.image == IMAGE
    ctrl.close()


def test_multimodal_actions():
    from selfgrow.control.actions import resolve_action

    model = _model()
    cfg = resolve_action("widen", model, component="image")
    assert isinstance(cfg, ComponentConfig) and cfg.component == "image"
    assert cfg.step_config().name == "net2wider"
    assert resolve_action("deepen", model, component="fusion").step_config().name == "net2deeper"
    assert resolve_action("prune", model, component="audio",
                          fraction=0.25).step_config().name == "remove_units"
    allw = resolve_action("widen_all", model)
    assert allw.name == "compound_grow"
    assert [op_config_from_dict(s).component for s in allw.steps] == list(COMPONENTS)
    with pytest.raises(GrowthConfigError, match="image, audio, fusion"):
        resolve_action("widen", model, component=None)
    with pytest.raises(GrowthConfigError, match="non-empty list"):
        resolve_action("widen_all", model, components="audio")
    with pytest.raises(GrowthConfigError, match="video"):
        resolve_action("widen", model, component="video")


# --------------------------------------------------------------------------- modality signals
def _audio_knocked_out(seed: int = 3) -> tuple[GrowableMultimodal, torch.Tensor, torch.Tensor]:
    """A model fitted to random labels on a 16-sample batch from the IMAGE alone: the audio
    encoder's head is zero (its embedding is 0 for every sample) and frozen."""
    model = _model(seed=seed)
    with torch.no_grad():
        model.audio.head.weight.zero_()
        model.audio.head.bias.zero_()
    for p in model.audio.parameters():
        p.requires_grad_(False)
    x = model.pack(*_batch(n=16, seed=seed))
    y = torch.randint(0, N_CLASSES, (16,), generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    return model, x, y


def _rate(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float(F.softmax(logits.double(), dim=1).gather(1, y.view(-1, 1)).mean())


def test_modality_scores_on_a_model_with_a_dead_audio_encoder():
    model, x, y = _audio_knocked_out()
    s = modality_scores(model, x, y)
    assert set(s) == {"image", "audio", "fused"}
    with torch.no_grad():
        emb = model.embed(x)
        base = _rate(model.fuse({k: v.mean(0, keepdim=True).expand_as(v)
                                 for k, v in emb.items()}), y)
    assert s["audio"] == pytest.approx(base, abs=1e-6)
    assert s["image"] == pytest.approx(s["fused"], abs=1e-6)
    assert s["image"] > s["audio"] * 1.2, s
    acc = modality_scores(model, x, y, score="accuracy")
    with torch.no_grad():
        knocked = model.fuse({k: v.mean(0, keepdim=True).expand_as(v) for k, v in emb.items()})
        fused = model(x)
    assert acc["audio"] == float((knocked.argmax(1) == y).double().mean())
    assert acc["image"] == acc["fused"] == float((fused.argmax(1) == y).double().mean())
    # the tuple input form gives the same scores; BatchNorm statistics untouched
    rm = model.image.blocks[0].bn.running_mean.clone()
    assert modality_scores(model, _batch(n=16, seed=3), y) == pytest.approx(s)
    assert torch.equal(model.image.blocks[0].bn.running_mean, rm)
    with pytest.raises(GrowthConfigError, match="accuracy, prob"):
        modality_scores(model, x, y, score="f1")
    with pytest.raises(IncompatibleModelError, match="lacks embed, fuse"):
        modality_scores(GrowableCNN(IMAGE), torch.randn(2, 1, 8, 8), y[:2])


def test_modality_imbalance_names_the_lagging_modality():
    model, x, y = _audio_knocked_out()
    sig = ModalityImbalance((x, y), threshold=1.1, window=2, every=1)
    sig.bind(model)
    sig.update(1, {})
    assert not sig.triggered  # the window is not full yet
    sig.update(2, {})
    st = sig.state()
    assert sig.triggered and st["triggered"]
    assert st["component"] == "audio" and st["dominant"] == "image"
    assert st["value"] == pytest.approx(st["scores"]["image"] / st["scores"]["audio"], rel=1e-4)
    # max_fused: a solved task is not grown
    capped = ModalityImbalance((x, y), threshold=1.1, window=1, every=1, max_fused=0.01)
    capped.bind(model)
    capped.update(1, {})
    assert not capped.triggered and capped.value > 1.1
    # state round trip
    fresh = ModalityImbalance((x, y), threshold=1.1, window=2, every=1)
    fresh.load_state_dict(json.loads(json.dumps(sig.state_dict())))
    assert fresh.scores == sig.scores and list(fresh._history) == list(sig._history)
    fresh.bind(model)
    fresh.update(3, {})
    sig.update(3, {})
    assert fresh.state() == sig.state()
    sig.on_growth(3)
    sig.update(4, {})
    assert not sig.triggered  # history cleared by the growth


def test_modality_imbalance_validation():
    model, x, y = _audio_knocked_out()
    with pytest.raises(IncompatibleModelError, match="ModalityImbalance.*GrowableCNN lacks"):
        ModalityImbalance((x, y)).bind(GrowableCNN(IMAGE))
    for kw, match in [(dict(threshold=1.0), "threshold"), (dict(max_fused=0.0), "max_fused"),
                      (dict(max_fused=1.5), "max_fused"), (dict(score="f1"), "accuracy, prob"),
                      (dict(window=0), "window")]:
        with pytest.raises(GrowthConfigError, match=match):
            ModalityImbalance((x, y), **kw)
    for probe in (x, (x,), (x, [0, 1])):
        with pytest.raises(GrowthConfigError, match="probe must be"):
            ModalityImbalance(probe)


def test_modality_imbalance_needs_two_modalities():
    model = _model(audio=False)
    x = _batch()[0]
    sig = ModalityImbalance((x, torch.zeros(6, dtype=torch.long)), window=1, every=1)
    sig.bind(model)
    sig.update(1, {})
    assert sig.value is None and not sig.triggered


def test_component_saturation_groups_layers_by_component():
    model = _model()
    sig = ComponentSaturation(window=2, history=10, threshold=1.0)
    sig.bind(model)
    assert sig.include == [f"{c}.*" for c in COMPONENTS]
    for step in range(1, 6):
        model.zero_grad(set_to_none=True)
        for n, p in model.named_parameters():
            # ||g|| / ||w|| rising (no decay: saturated): slowly in the audio encoder, fast in
            # the image encoder; the fusion gets no gradient at all
            if n.startswith("audio.") and n.endswith("weight"):
                p.grad = p.detach() * (0.1 + 0.01 * step)
            elif n.startswith("image.") and n.endswith("weight"):
                p.grad = p.detach() * 0.1 * step**2
        sig.update(step, {})
    st = sig.state()
    assert sig.triggered
    assert st["component"] == "image" and st["components"] == ["image", "audio"]
    assert set(st["component_scores"]) == {"image", "audio"}
    assert st["component_scores"]["image"] == pytest.approx(2.05 / 1.1)
    assert st["component_scores"]["audio"] == pytest.approx(0.145 / 0.13)
    assert sig.saturated and all(layer.split(".")[0] in ("image", "audio")
                                 for layer in sig.saturated)
    # only the audio encoder asking for change: it is named
    for step in range(6, 12):
        model.zero_grad(set_to_none=True)
        for n, p in model.named_parameters():
            if n.startswith("audio.") and n.endswith("weight"):
                p.grad = p.detach() * (0.1 + 0.01 * step)
        sig.update(step, {})
    st = sig.state()
    assert st["component"] == "audio" and st["components"] == ["audio"]
    # an explicit list restricts the watched components
    only = ComponentSaturation(components=["image", "fusion"], window=2, history=10)
    only.bind(model)
    with pytest.warns(UserWarning, match="no gradients"):
        for step in range(1, 6):
            only.update(step, {})
    assert not only.triggered and "component" not in only.state()
    with pytest.raises(GrowthConfigError, match="list of component names"):
        ComponentSaturation(components="audio")
    with pytest.raises(IncompatibleModelError, match="growth_components"):
        ComponentSaturation().bind(GrowableCNN(IMAGE))


def test_modality_aware_policy_rule_order():
    """Imbalance first, then saturation (each naming its component), then the fusion."""
    pol = modality_aware_policy(action_kwargs={"factor": 2.0})
    off = {"triggered": False, "value": 0.0}
    imb = {"triggered": True, "value": 2.0, "threshold": 1.5, "component": "audio"}
    sat = {"triggered": True, "value": 3.0, "threshold": 1.0, "component": "image"}
    flat = {"triggered": True, "value": 0.0, "threshold": 0.01}
    ctx = PolicyContext(step=10, n_params=1000)
    for states, comp in [
        (dict(modality_imbalance=imb, component_saturation=sat, fusion_plateau=flat), "audio"),
        (dict(modality_imbalance=off, component_saturation=sat, fusion_plateau=flat), "image"),
        (dict(modality_imbalance=off, component_saturation=off, fusion_plateau=flat), "fusion"),
    ]:
        d, why = pol.decide(states, ctx)
        assert d is not None and d.go, why
        assert d.action == "widen" and d.kwargs == {"factor": 2.0, "component": comp}
        assert why.endswith(f"-> widen {comp}")
    d, _ = pol.decide(dict(modality_imbalance=off, component_saturation=off,
                           fusion_plateau=off), ctx)
    assert d is None


def test_policies_are_validated():
    with pytest.raises(GrowthConfigError, match="at least one signal"):
        modality_aware_policy(imbalance=None, saturation=None, plateau=None)
    assert fusion_plateau(window=5).name == "fusion_plateau"


# --------------------------------------------------------------------------- end to end
def _stream(n_steps: int, seed: int = 0):
    """Labels a function of the IMAGE only (the sign of its mean pixel and of one row)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_steps):
        img, aud = torch.randn(16, 1, 8, 8, generator=g), torch.randn(16, 3, 8, generator=g)
        y = (img.mean(dim=(1, 2, 3)) > 0).long() + (img[:, 0, 0].mean(1) > 0).long()
        yield img, aud, y


def _train(ctrl: GrowthController, n_steps: int) -> None:
    model = ctrl.model
    for img, aud, y in _stream(n_steps):
        model.train()
        loss = F.cross_entropy(model(model.pack(img, aud)), y)
        ctrl.optimizer.zero_grad()
        loss.backward()
        ctrl.optimizer.step()
        ctrl.observe(loss=loss)


def test_modality_aware_policy_grows_the_lagging_encoder():
    model = _model(seed=4)
    img, aud, y = next(_stream(1, seed=99))
    probe = model.pack(img, aud)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sig = ModalityImbalance((probe, y), threshold=1.05, window=1, every=5)
    pol = modality_aware_policy(saturation=None, plateau=None, max_growths=1,
                                action_kwargs={"factor": 2.0})
    ctrl = GrowthController(model, opt, [sig], pol, probe=probe, measure_flops=False)
    before = model.config
    _train(ctrl, 40)
    growths = [e for e in ctrl.events if e.kind == "growth"]
    assert len(growths) == 1, [(e.kind, e.reason) for e in ctrl.events]
    ev = growths[0]
    comp = ev.trigger["component"]
    # the labels depend on the image only: the audio encoder is the one that lags
    assert comp == "audio" and ev.trigger["dominant"] == "image"
    assert ev.trigger["signal"] == "modality_imbalance"
    assert f"-> widen {comp}" in ev.reason
    assert set(ev.trigger["scores"]) == {"image", "audio", "fused"}
    assert ev.preservation["max_rel"] <= 1e-5
    grown = getattr(model.config, comp)
    assert grown.channels[0] > getattr(before, comp).channels[0]
    for other in set(COMPONENTS) - {comp}:
        assert getattr(model.config, other) == getattr(before, other)
    ctrl.close()


def test_uniform_policy_widens_every_component_in_one_event():
    model = _model(seed=5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    pol = uniform_policy(signals=("flat",), max_growths=1, action_kwargs={"factor": 2.0})
    ctrl = GrowthController(model, opt, [Scripted({3}, "flat")], pol,
                            probe=model.pack(*_batch()), measure_flops=False)
    before = model.config
    _train(ctrl, 5)
    growths = [e for e in ctrl.events if e.kind == "growth"]
    assert len(growths) == 1
    ev = growths[0]
    assert ev.action["op"] == "compound_grow"
    assert ev.preservation["max_rel"] <= 1e-5
    assert model.config.image.channels[0] > before.image.channels[0]
    assert model.config.audio.channels[0] > before.audio.channels[0]
    assert model.config.fusion.hidden[0] > before.fusion.hidden[0]
    ctrl.close()
