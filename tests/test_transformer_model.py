"""GrowableTransformer: variants build, shapes, config round-trip, ramps, masked norms."""

from __future__ import annotations

import itertools

import pytest
import torch

from selfgrow.errors import GrowthConfigError
from selfgrow.models import build_model, model_config_dict
from selfgrow.models.transformer import GrowableTransformer, Norm, TransformerConfig, tiny_config

VARIANTS = [
    dict(norm=n, norm_first=nf, positions=p, ffn=f, n_kv_heads=kv, tie_embeddings=t)
    for n, nf, p, f, kv, t in itertools.product(
        ("layernorm", "rmsnorm"), (True, False), ("learned", "rope"), ("gelu", "swiglu"),
        (4, 2), (True, False),
    )
]


@pytest.mark.parametrize("kw", VARIANTS[::3] + [dict(causal=False, bias=False)])
def test_variants_forward_backward_and_rebuild(kw):
    torch.manual_seed(0)
    m = GrowableTransformer(tiny_config(**kw))
    x = torch.randint(0, 64, (2, 9))
    y = m(x)
    assert y.shape == (2, 9, 64)
    y.pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    m2 = build_model(model_config_dict(m))
    m2.load_state_dict(m.state_dict())
    assert torch.equal(m2(x), y.detach())


def test_param_names_are_stable():
    m = GrowableTransformer(tiny_config(ffn="swiglu", tie_embeddings=False))
    names = set(dict(m.named_parameters()))
    for n in ("tok_emb.weight", "pos_emb.weight", "layers.1.attn.q.weight", "layers.0.attn.o.bias",
              "layers.0.ffn.gate.weight", "layers.0.ffn.down.weight", "layers.0.norm1.weight",
              "layers.1.norm2.bias", "norm_f.weight", "head.weight"):
        assert n in names, n
    assert "layers.0.ramp" in m.state_dict()


def test_causal_mask_matches_padding_mask_of_ones():
    m = GrowableTransformer(tiny_config()).eval()
    x = torch.randint(0, 64, (2, 7))
    torch.testing.assert_close(m(x), m(x, attention_mask=torch.ones(2, 7)))
    # causality: changing a later token leaves earlier logits unchanged
    x2 = x.clone()
    x2[:, -1] = (x2[:, -1] + 1) % 64
    torch.testing.assert_close(m(x)[:, :-1], m(x2)[:, :-1])


def test_ramp_zero_is_identity_block_and_advance():
    m = GrowableTransformer(tiny_config(n_layers=3)).eval()
    x = torch.randint(0, 64, (2, 5))
    m.set_ramp(1, 0.0)
    ref = GrowableTransformer(tiny_config(n_layers=2)).eval()
    sd = {k.replace("layers.2.", "layers.1."): v for k, v in m.state_dict().items()
          if not k.startswith("layers.1.")}
    ref.load_state_dict(sd)
    assert torch.equal(m(x), ref(x))
    assert m.advance_ramps(0.5) is False and m.ramps() == [1.0, 0.5, 1.0]
    assert m.advance_ramps(0.5) is True
    with pytest.raises(GrowthConfigError):
        m.set_ramp(5, 0.0)


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_masked_norm_with_ones_equals_plain_and_ignores_masked_coords(kind):
    torch.manual_seed(0)
    plain = Norm(8, kind, 1e-5, True, masked=False)
    masked = Norm(8, kind, 1e-5, True, masked=True)
    masked.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(3, 8, dtype=torch.float64)
    plain, masked = plain.double(), masked.double()
    torch.testing.assert_close(plain(x), masked(x))
    masked.mask[6:] = 0
    big = Norm(6, kind, 1e-5, True, masked=False).double()
    x2 = x.clone()
    x2[:, 6:] = 100.0
    torch.testing.assert_close(masked(x2)[:, :6], big(x[:, :6]))


@pytest.mark.parametrize(
    "kw",
    [dict(norm="batch"), dict(n_kv_heads=3), dict(positions="rope", head_dim=5),
     dict(d_model=10, head_dim=None, n_heads=4), dict(dropout=1.5), dict(ffn="relu")],
)
def test_bad_configs_raise(kw):
    with pytest.raises(GrowthConfigError):
        tiny_config(**kw)


def test_config_defaults_resolve():
    c = TransformerConfig(d_model=32, n_heads=4)
    assert c.n_kv_heads == 4 and c.head_dim == 8
