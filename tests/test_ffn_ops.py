"""FFN width operators x every transformer family (registry-generated), negative controls,
grad_scale claims, optimizer moments, validation and Hypothesis properties."""

from __future__ import annotations

import pytest
import torch
from _families import FAMILIES, make_input, randomize_, run, selfgrow_model
from _growth_checks import (
    assert_unchanged,
    check_exact_sg,
    check_grad_scales,
    check_grads,
    check_optimizer_step,
    check_roundtrip,
    grown,
    ops_of,
    output,
    rel_err,
    snapshot,
    tolerance,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from selfgrow.adapters import get_adapter
from selfgrow.control.actions import resolve_action
from selfgrow.errors import GrowthConfigError
from selfgrow.ops import get_operator, grow_, make_config

FFN_OPS = ops_of("ffn")
EXACT_OPS = [n for n in FFN_OPS if get_operator(n).exact]


def _d_ff(family: str) -> int:
    return get_adapter(FAMILIES[family]()).dims().d_ff


def _kw(op: str, family: str) -> dict:
    f = _d_ff(family)
    return {"ffn_net2wider": dict(new_d_ff=f + 5, seed=1),
            "ffn_zero_fanout": dict(new_d_ff=f + 3, init_std=0.3)}[op]


def test_registry_has_the_ffn_operators():
    assert {"ffn_net2wider", "ffn_zero_fanout"} <= set(FFN_OPS)
    assert set(EXACT_OPS) == set(FFN_OPS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("op", FFN_OPS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_ffn_matrix(family, op, dtype):
    kw = _kw(op, family)
    r = grown(family, op, kw, dtype, optimizer=dtype == torch.float32)
    assert get_adapter(r["model"]).dims().d_ff == kw["new_d_ff"]
    assert r["exact"]
    assert r["err"] <= tolerance(family, dtype), (family, op, r["err"])
    assert r["event"].preservation["max_rel"] <= tolerance(family, dtype)
    check_roundtrip(r["model"], r["args"], r["c0"])
    if dtype == torch.float32:
        check_grads(r["model"], r["args"])
        check_optimizer_step(r["model"], r["opt"], r["args"])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_net2wider_noise_and_layer_selection_stay_exact(family):
    f = _d_ff(family)
    r = grown(family, "ffn_net2wider", dict(new_d_ff=2 * f, sources=list(range(f)),
                                             noise=0.3, layers=[1]), torch.float64)
    assert r["err"] <= tolerance(family, torch.float64), r["err"]
    ad = get_adapter(r["model"])
    down1, down0 = ad.layer(1).down.weight(), ad.layer(0).down.weight()
    # layer 1: copies with zero-sum noise -> the two copies' columns differ but sum to w
    assert not torch.allclose(down1[:, :f], down1[:, f:])
    up1 = ad.layer(1).up.weight()
    assert torch.equal(up1[:f], up1[f:])
    # layer 0 (not selected): zero fan-out units
    assert torch.count_nonzero(down0[:, f:]) == 0
    assert r["event"].extra["notes"]["zero_fanout_layers"] == [0]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_negative_control_forgetting_to_divide_by_copies(family):
    f = _d_ff(family)
    r = grown(family, "ffn_net2wider", dict(new_d_ff=2 * f, sources=list(range(f))),
              torch.float64)
    assert r["err"] <= tolerance(family, torch.float64)
    ref = get_adapter(r["model"]).layer(0).down
    with torch.no_grad():  # every unit has 2 copies: undivided outgoing columns = w * 2
        ref.raw_weight().mul_(2)
    err = rel_err(output(r["model"], r["args"], r["c0"]), r["before"])
    assert err > 1e-6, (family, err)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_negative_control_zero_fanout_with_random_fanout(family):
    f = _d_ff(family)
    r = grown(family, "ffn_zero_fanout", dict(new_d_ff=f + 4, init_std=0.5), torch.float64)
    assert r["err"] == 0.0 or r["err"] <= tolerance(family, torch.float64)
    ref = get_adapter(r["model"]).layer(0).down
    w = ref.raw_weight()
    with torch.no_grad():  # outgoing columns of the new units not zero
        if ref.transposed:
            w[f:].normal_(0, 0.5)
        else:
            w[:, f:].normal_(0, 0.5)
    err = rel_err(output(r["model"], r["args"], r["c0"]), r["before"])
    assert err > 1e-6, (family, err)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("op", FFN_OPS)
def test_grad_scale_claims_hold(family, op):
    """new grad == gathered old grad * grad_scale (copies: 1/c on incoming rows)."""
    kw = _kw(op, family)
    if op == "ffn_net2wider":
        kw = dict(kw, new_d_ff=_d_ff(family) + 7, layers=[0])  # layer 1: zero fan-out
    rtol = 1e-5 if family.startswith("hf-llama") else 1e-7
    assert check_grad_scales(family, make_config(op, **kw), rtol=rtol) >= 6


def test_optimizer_moments_of_copies_and_new_units():
    torch.manual_seed(0)
    model = randomize_(selfgrow_model(ffn="swiglu"))
    x = make_input(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    run(model, x).pow(2).mean().backward()
    opt.step()
    old_up = {k: v.clone() for k, v in opt.state[model.layers[0].ffn.up.weight].items()}
    old_gate_v = opt.state[model.layers[0].ffn.gate.weight]["exp_avg_sq"].clone()
    f = model.config.d_ff
    ev = grow_(model, make_config("ffn_net2wider", new_d_ff=f + 2, sources=[3, 3]),
               optimizer=opt, probe=x[0])
    assert ev.preservation["max_rel"] <= 1e-5
    st_ = opt.state[model.layers[0].ffn.up.weight]
    # unit 3 now has 3 copies: rows 3, f, f+1 get m/3 and v/9; other rows unchanged
    for r in (3, f, f + 1):
        torch.testing.assert_close(st_["exp_avg"][r], old_up["exp_avg"][3] / 3)
        torch.testing.assert_close(st_["exp_avg_sq"][r], old_up["exp_avg_sq"][3] / 9)
    torch.testing.assert_close(st_["exp_avg"][0], old_up["exp_avg"][0])
    gv = opt.state[model.layers[0].ffn.gate.weight]["exp_avg_sq"]
    torch.testing.assert_close(gv[f], old_gate_v[3] / 9)
    down = opt.state[model.layers[0].ffn.down.weight]
    assert down["exp_avg"].shape == (model.config.d_model, f + 2)
    # zero fan-out: new coordinates m = 0, v = mean of the old v
    ev = grow_(model, make_config("ffn_zero_fanout", new_d_ff=f + 4), optimizer=opt)
    st_ = opt.state[model.layers[0].ffn.up.weight]
    assert torch.count_nonzero(st_["exp_avg"][f + 2:]) == 0
    assert bool((st_["exp_avg_sq"][f + 2:] > 0).all())
    opt.zero_grad()
    run(model, x).pow(2).mean().backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(new_d_ff=16), "new_d_ff"),  # no growth
        (dict(new_d_ff=8), "new_d_ff"),  # shrinking
        (dict(new_d_ff=17.5), "new_d_ff"),
        (dict(new_d_ff=18, sources=[0]), "sources"),  # wrong count
        (dict(new_d_ff=18, sources=[0, 16]), "sources"),  # not a unit
        (dict(new_d_ff=18, layers=[2]), "layers"),
        (dict(new_d_ff=18, layers=[0, 0]), "duplicates"),
        (dict(new_d_ff=18, noise=-0.1), "noise"),
    ],
)
def test_invalid_net2wider_requests_raise_before_any_change(kw, match):
    model = randomize_(selfgrow_model())
    x = make_input(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    run(model, x).pow(2).mean().backward()
    opt.step()
    snap = snapshot(model, opt)
    with pytest.raises(GrowthConfigError, match=match):
        grow_(model, make_config("ffn_net2wider", **kw), optimizer=opt, probe=x[0])
    assert_unchanged(model, snap, opt)


def test_invalid_zero_fanout_raises_before_any_change():
    model = randomize_(selfgrow_model())
    snap = snapshot(model)
    for kw in (dict(new_d_ff=10), dict(new_d_ff=20, init_std=-1.0)):
        with pytest.raises(GrowthConfigError):
            grow_(model, make_config("ffn_zero_fanout", **kw))
    assert_unchanged(model, snap)


def test_failure_inside_apply_rolls_back():
    model = randomize_(selfgrow_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = make_input(model)
    run(model, x).pow(2).mean().backward()
    opt.step()
    snap = snapshot(model, opt)

    def boom(m):
        raise RuntimeError("injected")

    with pytest.raises(RuntimeError, match="injected"):
        grow_(model, make_config("ffn_net2wider", new_d_ff=20), optimizer=opt, check=boom)
    assert_unchanged(model, snap, opt)


def test_widen_ffn_action():
    model = randomize_(selfgrow_model())
    x = make_input(model)
    cfg = resolve_action("widen_ffn", model)
    assert cfg.name == "ffn_net2wider" and cfg.new_d_ff == 32
    ev = grow_(model, cfg, probe=x[0])
    assert model.config.d_ff == 32 and ev.preservation["max_rel"] <= 1e-5
    assert resolve_action("widen_ffn", model, new_d_ff=40).new_d_ff == 40
    with pytest.raises(GrowthConfigError):
        resolve_action("widen_ffn", model, factor=1)


# --------------------------------------------------------------------------- Hypothesis
@st.composite
def sg_configs(draw):
    n_kv = draw(st.sampled_from([1, 2]))
    return dict(
        vocab_size=11, d_model=draw(st.sampled_from([3, 4])), n_layers=draw(st.integers(1, 2)),
        n_heads=n_kv * draw(st.sampled_from([1, 2])), n_kv_heads=n_kv, head_dim=2,
        d_ff=draw(st.sampled_from([2, 3, 5])), max_seq_len=5,
        norm=draw(st.sampled_from(["layernorm", "rmsnorm"])), norm_first=draw(st.booleans()),
        positions=draw(st.sampled_from(["learned", "rope"])),
        ffn=draw(st.sampled_from(["gelu", "swiglu"])), tie_embeddings=draw(st.booleans()),
        causal=draw(st.booleans()), bias=draw(st.booleans()),
    )


@settings(max_examples=200, deadline=None, derandomize=True)
@given(cfg=sg_configs(), extra=st.integers(1, 6), noise=st.sampled_from([0.0, 0.2]),
       all_layers=st.booleans(), seed=st.integers(0, 99))
def test_property_ffn_net2wider(cfg, extra, noise, all_layers, seed):
    kw = dict(new_d_ff=cfg["d_ff"] + extra, noise=noise, seed=seed, init_std=0.3,
              layers=None if all_layers else [0])
    check_exact_sg(cfg, make_config("ffn_net2wider", **kw), seed)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(cfg=sg_configs(), extra=st.integers(1, 6), seed=st.integers(0, 99))
def test_property_ffn_zero_fanout(cfg, extra, seed):
    kw = dict(new_d_ff=cfg["d_ff"] + extra, init_std=0.5, seed=seed)
    check_exact_sg(cfg, make_config("ffn_zero_fanout", **kw), seed)


@pytest.mark.slow
@pytest.mark.parametrize("op", EXACT_OPS)
@settings(max_examples=2000, deadline=None)
@given(cfg=sg_configs(), extra=st.integers(1, 9), seed=st.integers(0, 999))
def test_property_ffn_slow(op, cfg, extra, seed):
    kw = dict(new_d_ff=cfg["d_ff"] + extra, seed=seed, init_std=0.5)
    if op == "ffn_net2wider":
        kw["noise"] = 0.2
    check_exact_sg(cfg, make_config(op, **kw), seed)


# --------------------------------------------------------------------------- optimizer 2x rule
NEW_COORD_CASES = [
    ("ffn_zero_fanout", dict(new_d_ff=24), "layers.0.ffn.down.weight",
     (slice(None), slice(16, None))),
    ("heads_fresh", dict(new_n_heads=4), "layers.0.attn.o.weight", (slice(None), slice(8, None))),
    ("extend_positions", dict(new_len=20), "pos_emb.weight", (slice(12, None),)),
]


@pytest.mark.parametrize("op,kw,pname,new", NEW_COORD_CASES)
def test_first_update_rms_on_new_coordinates_within_2x(op, kw, pname, new):
    """New coordinates inside a grown tensor get v set at their first gradient (selfgrow.optim)
    so that their first Adam update has the RMS of the old coordinates' update."""
    ratio = _first_update_ratio(op, kw, pname, new)
    assert 0.5 <= ratio <= 2.0, ratio


@pytest.mark.parametrize("op,kw,pname,new", NEW_COORD_CASES)
def test_new_coordinates_with_mean_v_fail_the_2x_rule(op, kw, pname, new, monkeypatch):
    """Negative control: without the first-gradient init (v = mean of old v, the fallback)
    the same check fails."""
    import selfgrow.optim as so

    monkeypatch.setattr(so, "_lazy_capable", lambda group: False)
    ratio = _first_update_ratio(op, kw, pname, new)
    assert not 0.5 <= ratio <= 2.0, ratio


def _first_update_ratio(op, kw, pname, new) -> float:
    torch.manual_seed(0)
    model = selfgrow_model()
    x = make_input(model, T=12)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(30):
        opt.zero_grad()
        run(model, x).logsumexp(-1).mean().backward()
        opt.step()
    grow_(model, make_config(op, **kw), optimizer=opt)
    x2 = (torch.randint(0, 40, (2, 20)),) if op == "extend_positions" else x
    p = dict(model.named_parameters())[pname]
    before = p.detach().clone()
    opt.zero_grad()
    run(model, x2).logsumexp(-1).mean().backward()
    opt.step()
    d = p.detach() - before
    mask = torch.zeros_like(d, dtype=torch.bool)
    mask[new] = True
    return float(d[mask].pow(2).mean().sqrt() / d[~mask].pow(2).mean().sqrt())
