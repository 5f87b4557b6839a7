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
    for fam in supported_families("transformer"):
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


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_docstring_recipe_net2wider_ffn_is_exact_on_every_family(family):
    """The recipe in selfgrow.adapters' docstring (what an FFN/heads operator does)."""
    from _families import make_input, randomize_
    from _growth_checks import output, rel_err

    from selfgrow.adapters import Roles, projection_plans, resize_params

    model = randomize_(FAMILIES[family]()).double().eval()
    args = make_input(model, dtype=torch.float64)
    ad = get_adapter(model)
    d = ad.dims()
    c0 = d.d_model
    before = output(model, args, c0)
    f = d.d_ff
    idx = torch.cat([torch.arange(f), torch.tensor([1, 1, 3])])
    units = Roles.from_index(idx, f)
    items = []
    for lv in ad.layer_views():
        items += [(lv.up, units.write, None), (lv.down, None, units.read)]
        if lv.gate is not None:
            items.append((lv.gate, units.write, None))
    with Transaction() as tx:
        maps = resize_params(tx, model, projection_plans(items))
        ad.update_dims(tx, d_ff=f + 3)
    ad.check()
    assert rel_err(output(model, args, c0), before) <= 1e-6  # HF LLaMA: fp32 RMSNorm
    assert all(m.source == n for n, m in maps.items())
    fresh = ad.build_fresh().double().eval()
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(output(fresh, args, c0), output(model, args, c0))
