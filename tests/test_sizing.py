"""Sizing: width rounding, training-memory estimate vs measured CPU peak, FLOPs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from selfgrow.control import estimate_memory, flops_per_sample, round_width
from selfgrow.control.sizing import measure_peak_memory
from selfgrow.errors import GrowthConfigError
from selfgrow.ops._registry import default_probe_fn


@pytest.mark.parametrize(
    "n,multiple,device,expect",
    [(1, None, "cpu", 8), (8, None, "cpu", 8), (9, None, "cpu", 16), (100, None, "cuda", 128),
     (64, None, "cuda", 64), (65, 32, None, 96), (7, 1, None, 7)],
)
def test_round_width(n, multiple, device, expect):
    assert round_width(n, multiple, device=device) == expect


@pytest.mark.parametrize("n,multiple", [(0, 8), (-3, None), (5, 0), (2.5, 8)])
def test_round_width_rejects(n, multiple):
    with pytest.raises(GrowthConfigError, match="valid"):
        round_width(n, multiple, device="cpu")


def _measured_peak(model: nn.Module, x: torch.Tensor) -> int:
    return measure_peak_memory(model, x)


REFERENCE = [
    ("mlp", lambda: nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512),
                                  nn.GELU(), nn.Linear(512, 10)), (256,), 64),
    ("cnn", lambda: nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)),
     (3, 32, 32), 32),
    ("transformer", lambda: nn.TransformerEncoder(
        nn.TransformerEncoderLayer(64, 4, 128, batch_first=True, dropout=0.1), 2), (32, 64), 16),
]


@pytest.mark.parametrize("name,make,shape,batch", REFERENCE, ids=[r[0] for r in REFERENCE])
def test_estimate_memory_within_15_percent_of_measured_peak(name, make, shape, batch):
    torch.manual_seed(0)
    model = make()
    est = estimate_memory(model, "adam", batch_size=batch, input_shape=shape)
    n = sum(p.numel() for p in model.parameters())
    assert est["params"] == est["grads"] == 4 * n and est["optimizer"] == 8 * n
    measured = _measured_peak(model, torch.randn(batch, *shape))
    assert 0.85 <= est["total"] / measured <= 1.15, (est, measured)


def _selfgrow_reference():
    from selfgrow.models import build_model
    from selfgrow.models.cnn import CNNConfig
    from selfgrow.models.mlp import MLPConfig
    from selfgrow.models.transformer import TransformerConfig

    return [
        ("GrowableMLP", build_model(MLPConfig(in_features=784, hidden=(256, 128), n_classes=10)),
         {"input_shape": (784,)}, torch.randn(64, 784)),
        ("GrowableCNN", build_model(CNNConfig(in_channels=1, image_size=28, channels=(16, 32),
                                              n_classes=10, pool_after=(0, 1))),
         {"input_shape": (1, 28, 28)}, torch.randn(32, 1, 28, 28)),
        ("GrowableTransformer", build_model(TransformerConfig(
            vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=16,
            d_ff=256, max_seq_len=64)),
         {"seq_len": 64, "vocab_size": 256}, torch.randint(0, 256, (8, 64))),
    ]


def test_estimate_memory_of_selfgrow_reference_models_within_15_percent():
    torch.manual_seed(0)
    for name, model, spec, x in _selfgrow_reference():
        est = estimate_memory(model, "adam", batch_size=x.shape[0], **spec)
        measured = measure_peak_memory(model, x)
        assert 0.85 <= est["total"] / measured <= 1.15, (name, est, measured)


def test_estimate_memory_scales_and_validates():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    state = torch.random.get_rng_state()
    small = estimate_memory(model, "sgd", batch_size=8, input_shape=(16,))
    assert torch.equal(torch.random.get_rng_state(), state)  # RNG untouched
    big = estimate_memory(model, "sgd", batch_size=80, input_shape=(16,))
    assert small["optimizer"] == 0 and big["activations"] > 9 * small["activations"]
    emb = nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 50))
    tok = estimate_memory(emb, "adamw", batch_size=4, seq_len=10, vocab_size=50)
    assert tok["activations"] > 0
    with pytest.raises(GrowthConfigError, match="optimizer_kind"):
        estimate_memory(model, "lion", input_shape=(16,))
    with pytest.raises(GrowthConfigError, match="input_shape"):
        estimate_memory(model)
    with pytest.raises(GrowthConfigError, match="batch_size"):
        estimate_memory(model, batch_size=0, input_shape=(16,))


def test_flops_per_sample_counts_matmuls():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).train()
    f = flops_per_sample(model, default_probe_fn(torch.randn(5, 4)))
    assert f == 2 * (4 * 3 + 3 * 2)
    assert model.training
