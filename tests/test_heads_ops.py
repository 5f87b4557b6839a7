"""Attention-head operators x every transformer family (registry-generated): MHA and GQA in
both modes, head-tied families refused, negative controls (incl. plain query-head
repetition on GQA), grad_scale claims, validation and Hypothesis properties."""

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
from torch import nn

from selfgrow.adapters import get_adapter, projection_plans, resize_params
from selfgrow.adapters._base import Roles
from selfgrow.control.actions import resolve_action
from selfgrow.errors import GrowthConfigError, IncompatibleModelError
from selfgrow.ops import Transaction, get_operator, grow_, make_config
from selfgrow.ops.heads import _coords

HEAD_OPS = ops_of("heads")
EXACT_OPS = [n for n in HEAD_OPS if get_operator(n).exact]
GQA_FAMILIES = [f for f in sorted(FAMILIES) if f in ("sg-rms-rope-swiglu-gqa", "hf-llama",
                                                     "hf-llama-tied")]


def _dims(family: str):
    return get_adapter(FAMILIES[family]()).dims()


def _tied(family: str) -> bool:
    return _dims(family).heads_tied_to_width


def _kw(op: str, family: str, gqa: str) -> dict:
    d = _dims(family)
    g = d.n_heads // d.n_kv_heads
    new = d.n_heads + g if gqa == "groups" else d.n_heads + d.n_kv_heads
    kw = dict(new_n_heads=new, gqa=gqa)
    if op == "heads_fresh":
        kw["init_std"] = 0.3
    return kw


def test_registry_has_the_head_operators():
    assert {"heads_clone", "heads_fresh"} <= set(HEAD_OPS)
    assert set(EXACT_OPS) == set(HEAD_OPS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("gqa", ["groups", "within"])
@pytest.mark.parametrize("op", HEAD_OPS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_heads_matrix(family, op, gqa, dtype):
    kw = _kw(op, family, gqa)
    if _tied(family):
        with pytest.raises(IncompatibleModelError, match="widen_d_model"):
            grown(family, op, kw, dtype)
        return
    d0 = _dims(family)
    r = grown(family, op, kw, dtype, optimizer=dtype == torch.float32)
    d = get_adapter(r["model"]).dims()
    assert d.n_heads == kw["new_n_heads"] and d.head_dim == d0.head_dim
    assert d.d_model == d0.d_model
    if gqa == "within":
        assert d.n_kv_heads == d0.n_kv_heads
    else:
        assert d.n_heads // d.n_kv_heads == d0.n_heads // d0.n_kv_heads
    assert r["exact"]
    assert r["err"] <= tolerance(family, dtype), (family, op, gqa, r["err"])
    assert r["event"].preservation["max_rel"] <= tolerance(family, dtype)
    check_roundtrip(r["model"], r["args"], r["c0"])
    if dtype == torch.float32:
        check_grads(r["model"], r["args"])
        check_optimizer_step(r["model"], r["opt"], r["args"])


@pytest.mark.parametrize("family", GQA_FAMILIES)
@pytest.mark.parametrize("gqa,mult", [("groups", 2), ("groups", 3), ("within", 2),
                                      ("within", 3)])
def test_gqa_large_growth_and_noise_stay_exact(family, gqa, mult):
    d = _dims(family)
    r = grown(family, "heads_clone", dict(new_n_heads=mult * d.n_heads, gqa=gqa, noise=0.3),
              torch.float64)
    assert r["err"] <= tolerance(family, torch.float64), r["err"]
    nd = get_adapter(r["model"]).dims()
    want_kv = d.n_kv_heads * mult if gqa == "groups" else d.n_kv_heads
    assert (nd.n_heads, nd.n_kv_heads) == (mult * d.n_heads, want_kv)


def _plain_repeat_query_heads(model: nn.Module, factor: int = 2) -> None:
    """The reported bug: tile the query heads (q rows copied, o columns split), KV untouched."""
    ad = get_adapter(model)
    d = ad.dims()
    heads = torch.arange(factor * d.n_heads) % d.n_heads
    roles = Roles.from_index(_coords(heads, d.head_dim), d.n_heads * d.head_dim)
    items = []
    for lv in ad.layer_views():
        items += [(lv.q, roles.write, None), (lv.o, None, roles.read)]
    with Transaction() as tx:
        resize_params(tx, model, projection_plans(items))
        ad.update_dims(tx, n_heads=factor * d.n_heads)


@pytest.mark.parametrize("family", GQA_FAMILIES)
def test_negative_control_plain_query_head_repetition_breaks_gqa(family):
    torch.manual_seed(0)
    model = randomize_(FAMILIES[family]()).double().eval()
    args = make_input(model, dtype=torch.float64)
    c0 = get_adapter(model).dims().d_model
    before = output(model, args, c0)
    h = get_adapter(model).dims().n_heads
    bad = randomize_(FAMILIES[family]()).double().eval()
    _plain_repeat_query_heads(bad)
    err_bad = rel_err(output(bad, args, c0), before)
    assert err_bad > 1e-3, err_bad
    # the same head count, keeping every query head with its KV head, is exact
    good = randomize_(FAMILIES[family]()).double().eval()
    grow_(good, make_config("heads_clone", new_n_heads=2 * h, gqa="within"))
    assert rel_err(output(good, args, c0), before) <= tolerance(family, torch.float64)


@pytest.mark.parametrize("family", [f for f in sorted(FAMILIES) if not _tied(f)])
def test_negative_control_output_columns_not_split(family):
    d = _dims(family)
    r = grown(family, "heads_clone", dict(new_n_heads=2 * d.n_heads), torch.float64)
    assert r["err"] <= tolerance(family, torch.float64)
    with torch.no_grad():  # every head has 2 copies: unsplit columns = o * 2
        get_adapter(r["model"]).layer(0).o.raw_weight().mul_(2)
    err = rel_err(output(r["model"], r["args"], r["c0"]), r["before"])
    assert err > 1e-6, (family, err)


@pytest.mark.parametrize("family", [f for f in sorted(FAMILIES) if not _tied(f)])
def test_negative_control_fresh_heads_with_random_output_columns(family):
    d = _dims(family)
    r = grown(family, "heads_fresh", _kw("heads_fresh", family, "groups"), torch.float64)
    o = get_adapter(r["model"]).layer(0).o.raw_weight()
    with torch.no_grad():
        o[:, d.n_heads * d.head_dim:].normal_(0, 0.5)
    err = rel_err(output(r["model"], r["args"], r["c0"]), r["before"])
    assert err > 1e-6, (family, err)


@pytest.mark.parametrize("gqa", ["groups", "within"])
@pytest.mark.parametrize("op", HEAD_OPS)
@pytest.mark.parametrize("family", [f for f in sorted(FAMILIES) if not _tied(f)])
def test_grad_scale_claims_hold(family, op, gqa):
    """q rows of clones get 1/c, k/v rows of cloned KV heads 1/c, o columns 1; unmapped
    parameters (incl. k/v in 'within' mode) keep their gradient."""
    rtol = 1e-5 if family.startswith("hf-llama") else 1e-7
    n = check_grad_scales(family, make_config(op, **_kw(op, family, gqa)), rtol=rtol)
    assert n >= 10


@pytest.mark.parametrize(
    "family,kw,err,match",
    [
        ("sg-rms-rope-swiglu-gqa", dict(new_n_heads=5), GrowthConfigError, "n_heads \\+ k\\*2"),
        ("sg-rms-rope-swiglu-gqa", dict(new_n_heads=7, gqa="within"), GrowthConfigError,
         "multiple of n_kv_heads=2"),
        ("sg-rms-rope-swiglu-gqa", dict(new_n_heads=6, gqa="sideways"), GrowthConfigError,
         "gqa mode"),
        ("sg-rms-rope-swiglu-gqa", dict(new_n_heads=4), GrowthConfigError, "> current"),
        ("sg-rms-rope-swiglu-gqa", dict(new_n_heads=8, sources=[0, 2]), GrowthConfigError,
         "sources"),
        ("sg-rms-rope-swiglu-gqa", dict(new_n_heads=8, gqa="within", sources=[0]),
         GrowthConfigError, "groups' only"),
        ("sg-preln", dict(new_n_heads=3, noise=-1.0), GrowthConfigError, "noise"),
        ("torch-enc-preln", dict(new_n_heads=3), IncompatibleModelError, "widen_d_model"),
    ],
)
def test_invalid_requests_raise_before_any_change(family, kw, err, match):
    model = randomize_(FAMILIES[family]())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = make_input(model)
    run(model, x).float().pow(2).mean().backward()
    opt.step()
    snap = snapshot(model, opt)
    with pytest.raises(err, match=match):
        grow_(model, make_config("heads_clone", **kw), optimizer=opt)
    assert_unchanged(model, snap, opt)


@pytest.mark.parametrize("family", [f for f in ("hf-bert", "hf-gpt2") if f in FAMILIES])
def test_head_tied_hf_families_are_refused_with_advice(family):
    model = FAMILIES[family]()
    snap = snapshot(model)
    for op in HEAD_OPS:
        with pytest.raises(IncompatibleModelError, match="heads can only grow with width"):
            grow_(model, make_config(op, new_n_heads=4))
    assert_unchanged(model, snap)


def test_clone_optimizer_moments():
    torch.manual_seed(0)
    model = randomize_(selfgrow_model(n_heads=4, n_kv_heads=2, head_dim=2))
    x = make_input(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    run(model, x).pow(2).mean().backward()
    opt.step()
    q_old = {k: v.clone() for k, v in opt.state[model.layers[0].attn.q.weight].items()}
    k_old = {k: v.clone() for k, v in opt.state[model.layers[0].attn.k.weight].items()}
    grow_(model, make_config("heads_clone", new_n_heads=6, sources=[1]), optimizer=opt)
    q = opt.state[model.layers[0].attn.q.weight]
    k = opt.state[model.layers[0].attn.k.weight]
    # new group 2 copies group 1 (KV head 1, query heads 2, 3): halves of m, quarters of v
    torch.testing.assert_close(q["exp_avg"][8:12], q_old["exp_avg"][4:8] / 2)
    torch.testing.assert_close(q["exp_avg"][4:8], q_old["exp_avg"][4:8] / 2)
    torch.testing.assert_close(q["exp_avg"][0:4], q_old["exp_avg"][0:4])
    torch.testing.assert_close(k["exp_avg_sq"][4:6], k_old["exp_avg_sq"][2:4] / 4)
    opt.zero_grad()
    run(model, x).pow(2).mean().backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_add_heads_action():
    model = randomize_(selfgrow_model(n_heads=4, n_kv_heads=2, head_dim=2))
    x = make_input(model)
    cfg = resolve_action("add_heads", model)
    assert cfg.name == "heads_clone" and cfg.new_n_heads == 6
    ev = grow_(model, cfg, probe=x[0])
    assert (model.config.n_heads, model.config.n_kv_heads) == (6, 3)
    assert ev.preservation["max_rel"] <= 1e-5
    cfg = resolve_action("add_heads", model, new_n_heads=9, gqa="within", fresh=True)
    assert cfg.name == "heads_fresh"
    ev = grow_(model, cfg, probe=x[0])
    assert (model.config.n_heads, model.config.n_kv_heads) == (9, 3)
    assert ev.preservation["max_rel"] <= 1e-5


# --------------------------------------------------------------------------- Hypothesis
@st.composite
def sg_configs(draw):
    n_kv = draw(st.sampled_from([1, 2]))
    return dict(
        vocab_size=11, d_model=draw(st.sampled_from([3, 4])), n_layers=draw(st.integers(1, 2)),
        n_heads=n_kv * draw(st.sampled_from([1, 2, 3])), n_kv_heads=n_kv, head_dim=2,
        d_ff=4, max_seq_len=5,
        norm=draw(st.sampled_from(["layernorm", "rmsnorm"])), norm_first=draw(st.booleans()),
        positions=draw(st.sampled_from(["learned", "rope"])),
        ffn=draw(st.sampled_from(["gelu", "swiglu"])), tie_embeddings=draw(st.booleans()),
        causal=draw(st.booleans()), bias=draw(st.booleans()),
    )


def _new_heads(cfg: dict, gqa: str, k: int) -> int:
    h, hkv = cfg["n_heads"], cfg["n_kv_heads"]
    return h + k * (h // hkv) if gqa == "groups" else h + k * hkv


@settings(max_examples=200, deadline=None, derandomize=True)
@given(cfg=sg_configs(), gqa=st.sampled_from(["groups", "within"]), k=st.integers(1, 3),
       noise=st.sampled_from([0.0, 0.2]), seed=st.integers(0, 99))
def test_property_heads_clone(cfg, gqa, k, noise, seed):
    kw = dict(new_n_heads=_new_heads(cfg, gqa, k), gqa=gqa, noise=noise, seed=seed)
    check_exact_sg(cfg, make_config("heads_clone", **kw), seed)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(cfg=sg_configs(), gqa=st.sampled_from(["groups", "within"]), k=st.integers(1, 3),
       seed=st.integers(0, 99))
def test_property_heads_fresh(cfg, gqa, k, seed):
    kw = dict(new_n_heads=_new_heads(cfg, gqa, k), gqa=gqa, init_std=0.5, seed=seed)
    check_exact_sg(cfg, make_config("heads_fresh", **kw), seed)


@pytest.mark.slow
@pytest.mark.parametrize("op", EXACT_OPS)
@settings(max_examples=2000, deadline=None)
@given(cfg=sg_configs(), gqa=st.sampled_from(["groups", "within"]), k=st.integers(1, 4),
       seed=st.integers(0, 999))
def test_property_heads_slow(op, cfg, gqa, k, seed):
    kw = dict(new_n_heads=_new_heads(cfg, gqa, k), gqa=gqa, seed=seed)
    kw.update(noise=0.2) if op == "heads_clone" else kw.update(init_std=0.5)
    check_exact_sg(cfg, make_config(op, **kw), seed)
