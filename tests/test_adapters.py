"""Adapters: every family is recognised, views have canonical shapes, config edits work."""

from __future__ import annotations

import pytest
import torch
from _families import FAMILIES, HAS_HF
from torch import nn

from selfgrow.adapters import (
    AxisMap,
    get_adapter,
    regrid,
    set_projection,
    supported_families,
)
from selfgrow.errors import IncompatibleModelError
from selfgrow.ops import Transaction


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_views_have_canonical_shapes(family):
    model = FAMILIES[family]()
    ad = get_adapter(model)
    ad.check()
    d = ad.dims()
    assert len(ad.layers()) == d.n_layers
    for lv in ad.layer_views():
        p = lv.projections()
        assert p["q"].weight().shape == (d.n_heads * d.head_dim, d.d_model)
        assert p["k"].weight().shape == (d.n_kv_heads * d.head_dim, d.d_model)
        assert p["o"].weight().shape == (d.d_model, d.n_heads * d.head_dim)
        assert p["up"].weight().shape == (d.d_ff, d.d_model)
        assert p["down"].weight().shape == (d.d_model, d.d_ff)
        assert ("gate" in p) == d.gated
        names = dict(model.named_parameters())
        for ref in p.values():
            assert ref.weight_name in names


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_set_projection_roundtrip_through_fused_storage(family):
    model = FAMILIES[family]()
    ad = get_adapter(model)
    lv = ad.layer(0)
    before = {k: r.weight() for k, r in lv.projections().items()}
    with pytest.raises(RuntimeError), Transaction() as tx:
        set_projection(tx, model, lv.k, weight=torch.zeros_like(before["k"]))
        assert torch.equal(ad.layer(0).k.weight(), torch.zeros_like(before["k"]))
        assert torch.equal(ad.layer(0).q.weight(), before["q"])  # fused neighbour intact
        raise RuntimeError("roll back")
    assert torch.equal(ad.layer(0).k.weight(), before["k"])


def test_unknown_model_names_families_and_register_adapter():
    with pytest.raises(IncompatibleModelError, match="register_adapter") as e:
        get_adapter(nn.Linear(2, 2))
    for fam in supported_families():
        assert fam in str(e.value)


@pytest.mark.skipif(not HAS_HF, reason="transformers not installed")
def test_update_dims_rewrites_hf_config():
    model = FAMILIES["hf-bert"]()
    ad = get_adapter(model)
    with Transaction() as tx:
        ad.update_dims(tx, n_layers=5)
    assert model.config.num_hidden_layers == 5
    with pytest.raises(IncompatibleModelError, match="disagrees"):
        ad.check()


def test_regrid_index_scale_and_fill():
    t = torch.arange(6.0).view(2, 3)
    m = AxisMap(torch.tensor([0, 1, 2, 0, -1]), value_scale=torch.tensor([.5, 1, 1, .5, 1]),
                grad_scale=torch.tensor([1.0, 1, 1, 1, 0]))
    new, pm = regrid(t, {1: m})
    assert new.tolist() == [[0, 1, 2, 0, 0], [1.5, 4, 5, 1.5, 0]]
    assert pm.index[0] is None and pm.index[1].tolist() == [0, 1, 2, 0, -1]
