"""Models people already have (a plain nn.Sequential CNN, torchvision's resnet18) grow under
GrowthController with no registration, exactly, and checkpoint / resume to the grown shape."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfgrow import (
    FixedSchedule,
    GrowthController,
    IncompatibleModelError,
    list_actions,
    load_checkpoint,
    save_checkpoint,
)

torchvision = pytest.importorskip("torchvision")
ROOT = Path(__file__).resolve().parents[1]


def seq_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 8 * 8, 10))


def resnet18() -> nn.Module:
    return torchvision.models.resnet18(weights=None, num_classes=10)


MODELS = {"sequential_cnn": seq_cnn, "resnet18": resnet18}


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)


def _train(model, opt, ctrl, steps):
    for s in steps:
        x, y = _batch(s)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ctrl.observe(loss=loss)


@pytest.mark.parametrize("name", list(MODELS))
def test_actions_need_no_registration(name):
    assert {"widen", "deepen", "widen_layers"} <= set(list_actions(MODELS[name]()))


@pytest.mark.parametrize("name", list(MODELS))
def test_controller_grows_exactly_then_checkpoint_resume_continues_identically(name, tmp_path):
    torch.manual_seed(0)
    model = MODELS[name]()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    probe = _batch(99)[0]
    ctrl = GrowthController(model, opt, policy=FixedSchedule([(2, "widen"), (3, "deepen")]),
                            probe=probe, log_dir=tmp_path / "run")
    n0 = sum(p.numel() for p in model.parameters())
    _train(model, opt, ctrl, range(4))
    growths = [e for e in ctrl.events if e.kind == "growth"]
    assert [e.action["name"] for e in growths] == ["widen", "deepen"]
    for e in growths:
        assert e.preservation["exact_expected"] and e.preservation["max_rel"] <= 1e-5, e
    assert ctrl.optimizer is opt and sum(p.numel() for p in model.parameters()) > n0
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.parameters()}

    path = save_checkpoint(tmp_path / "ck.pt", model, opt, controller=ctrl)
    _train(model, opt, ctrl, range(4, 7))  # the uninterrupted run
    ck = load_checkpoint(path)
    ctrl2 = GrowthController(ck.model, ck.optimizer,
                             policy=FixedSchedule([(2, "widen"), (3, "deepen")]), probe=probe)
    ck.restore_controller(ctrl2)
    _train(ck.model, ck.optimizer, ctrl2, range(4, 7))  # the resumed run
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), ck.model.named_parameters(),
                                  strict=True):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_negative_control_resume_without_optimizer_state_differs(tmp_path):
    torch.manual_seed(0)
    model = seq_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ctrl = GrowthController(model, opt, policy=FixedSchedule([(2, "widen")]))
    _train(model, opt, ctrl, range(3))
    path = save_checkpoint(tmp_path / "ck.pt", model, None)
    _train(model, opt, ctrl, range(3, 5))
    ck = load_checkpoint(path)
    fresh = torch.optim.Adam(ck.model.parameters(), lr=1e-3)
    ctrl2 = GrowthController(ck.model, fresh)
    _train(ck.model, fresh, ctrl2, range(3, 5))
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), ck.model.parameters(),
                                                     strict=True))


def test_unknown_model_names_supported_families_and_how_to_add_one():
    class Mine(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Linear(3, 3)

        def forward(self, x):
            return self.w(x)

    m = Mine()
    with pytest.raises(IncompatibleModelError,
                       match="supported: .*torch.nn.Sequential.*register_action"):
        GrowthController(m, None, policy=FixedSchedule([(1, "widen")]))
    with pytest.raises(IncompatibleModelError, match="torchvision.ResNet"):
        save_checkpoint("/nonexistent/never-written.pt", m)


def test_sequential_with_unsupported_layer_is_refused_by_name():
    m = nn.Sequential(nn.Linear(4, 4), nn.LSTM(4, 4), nn.Linear(4, 2))
    from selfgrow import grow_, make_config

    with pytest.raises(IncompatibleModelError, match="layer 1 \\(LSTM\\).*supported layers"):
        grow_(m, make_config("net2wider", layer=0, new_width=8))


@pytest.mark.slow
def test_resnet50_widen_and_deepen_exact():
    from selfgrow import grow_, make_config

    m = torchvision.models.resnet50(weights=None).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        y0 = m(x)
        for cfg in (make_config("net2wider", layer=1, new_width=640),
                    make_config("net2deeper", layer=2)):
            grow_(m, cfg)
            y = m(x)
            assert float((y - y0).abs().max() / y0.abs().max()) <= 1e-5


def test_example_script_runs():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "grow_your_model.py")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("outputs equal: True") == 2, out.stdout


def test_inserted_modules_take_the_models_mode():
    from selfgrow import build_model, grow_, make_config
    from selfgrow.models.cnn import CNNConfig

    torch.manual_seed(0)
    m = build_model(CNNConfig(in_channels=1, image_size=8, channels=(4, 6), n_classes=3)).eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        y0 = m(x)
        grow_(m, make_config("net2deeper", layer=1))  # grown while in eval mode
        assert not any(mod.training for mod in m.modules())
        assert torch.allclose(m(x), y0, rtol=0, atol=1e-6)
