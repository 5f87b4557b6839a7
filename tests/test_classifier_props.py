"""Property-based exactness of the classifier operators (net2wider, net2deeper) over random
MLP and CNN configurations: 200 cases each in the default suite, 2000 under ``slow``."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from selfgrow import build_model, grow_
from selfgrow.models.cnn import CNNConfig
from selfgrow.models.mlp import MLPConfig
from selfgrow.ops.net2net import Net2DeeperConfig, Net2WiderConfig

TOL = 1e-5  # fp32 max relative error of an exact operator (eval mode)


@st.composite
def classifiers(draw: st.DrawFn) -> tuple[torch.nn.Module, torch.Tensor]:
    seed = draw(st.integers(0, 10_000))
    torch.manual_seed(seed)
    if draw(st.booleans()):
        d_in = draw(st.integers(1, 12))
        hidden = tuple(draw(st.lists(st.integers(1, 10), min_size=1, max_size=3)))
        model = build_model(MLPConfig(in_features=d_in, hidden=hidden,
                                      n_classes=draw(st.integers(2, 5))))
        x = torch.randn(6, d_in) * 2
    else:
        size = draw(st.integers(4, 8))
        channels = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=2)))
        model = build_model(CNNConfig(
            in_channels=draw(st.integers(1, 2)), image_size=size, channels=channels,
            n_classes=draw(st.integers(2, 5)), kernel_size=draw(st.sampled_from([1, 3, 5])),
            batchnorm=draw(st.booleans())))
        x = torch.randn(6, model.config.in_channels, size, size) * 2
        with torch.no_grad():  # non-trivial BatchNorm running statistics
            for _ in range(3):
                model(torch.randn_like(x) * 3 + 1)
    return model.eval(), x


def _rel_err(model: torch.nn.Module, cfg: object, x: torch.Tensor) -> float:
    ev = grow_(model, cfg, probe=x)  # type: ignore[arg-type]
    return float(ev.preservation["max_rel"])


def _widths(model: torch.nn.Module) -> tuple[int, ...]:
    c = model.config
    return c.hidden if isinstance(c, MLPConfig) else c.channels


def _check_wider(case, extra: int, split: float, seed: int, layer_pick: int) -> None:
    model, x = case
    w = _widths(model)
    layer = layer_pick % len(w)
    cfg = Net2WiderConfig(layer=layer, new_width=w[layer] + extra, split_noise=split, seed=seed)
    assert _rel_err(model, cfg, x) <= TOL


def _check_deeper(case, layer_pick: int) -> None:
    model, x = case
    cfg = Net2DeeperConfig(layer=layer_pick % len(_widths(model)))
    assert _rel_err(model, cfg, x) <= TOL


@settings(max_examples=200, deadline=None, derandomize=True)
@given(case=classifiers(), extra=st.integers(1, 12), split=st.sampled_from([0.0, 0.3, 1.0]),
       seed=st.integers(0, 99), layer_pick=st.integers(0, 5))
def test_property_net2wider_exact(case, extra, split, seed, layer_pick):
    _check_wider(case, extra, split, seed, layer_pick)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(case=classifiers(), layer_pick=st.integers(0, 5))
def test_property_net2deeper_exact(case, layer_pick):
    _check_deeper(case, layer_pick)


@pytest.mark.slow
@settings(max_examples=2000, deadline=None)
@given(case=classifiers(), extra=st.integers(1, 12), split=st.sampled_from([0.0, 0.3, 1.0]),
       seed=st.integers(0, 99), layer_pick=st.integers(0, 5), deeper=st.booleans())
def test_property_classifier_ops_slow(case, extra, split, seed, layer_pick, deeper):
    if deeper:
        _check_deeper(case, layer_pick)
    else:
        _check_wider(case, extra, split, seed, layer_pick)


def test_property_check_has_teeth():
    """Negative control: the same check fails for an inexact growth (incoming-weight noise)."""
    torch.manual_seed(0)
    model = build_model(MLPConfig(in_features=5, hidden=(4,), n_classes=3)).eval()
    x = torch.randn(6, 5)
    assert _rel_err(model, Net2WiderConfig(layer=0, new_width=8, noise_std=0.5), x) > TOL
