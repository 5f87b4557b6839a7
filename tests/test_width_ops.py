"""d_model width operators x every transformer family (registry-generated), negative
controls, the grad_scale claims, validation and Hypothesis properties."""

from __future__ import annotations

import math

import pytest
import torch
from _families import FAMILIES, HAS_HF, make_input, randomize_, run, selfgrow_model
from _growth_checks import (
    check_grads,
    check_optimizer_step,
    check_roundtrip,
    grown,
    is_lm,
    ops_of,
    output,
    rel_err,
    tolerance,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from selfgrow.adapters import get_adapter
from selfgrow.control.actions import resolve_action
from selfgrow.errors import GrowthConfigError, IncompatibleModelError
from selfgrow.ops import Transaction, get_operator, grow_, make_config

WIDTH_OPS = ops_of("width")
KW: dict[str, dict] = {
    "widen_d_model_pad": dict(new_d=12),
    "widen_d_model_masked": dict(new_d=11),
}
EXACT_OPS = [n for n in WIDTH_OPS if get_operator(n).exact]


def test_registry_has_the_width_operators():
    assert {"widen_d_model", "widen_d_model_masked", "widen_d_model_pad"} <= set(WIDTH_OPS)


def _applies(family: str, op: str, kw: dict) -> bool:
    try:
        get_operator(op).validate(FAMILIES[family](), make_config(op, **kw))
    except IncompatibleModelError:
        return False
    return True


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("op", WIDTH_OPS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_width_matrix(family, op, dtype):
    kw = KW.get(op, {})
    if not _applies(family, op, kw):
        with pytest.raises(IncompatibleModelError):
            grown(family, op, kw, dtype)
        return
    c0 = get_adapter(FAMILIES[family]()).dims().d_model
    r = grown(family, op, kw, dtype, optimizer=dtype == torch.float32)
    assert get_adapter(r["model"]).dims().d_model > c0
    if r["exact"]:
        assert r["err"] <= tolerance(family, dtype), (family, op, r["err"])
        assert r["event"].preservation["max_rel"] <= tolerance(family, dtype)
    else:
        print(f"[width] {family} {op} {dtype}: measured max rel error {r['err']:.3e}")
        assert math.isfinite(r["err"]), r["err"]  # finite (inf fails), reported
    check_roundtrip(r["model"], r["args"], r["c0"])
    if dtype == torch.float32:
        check_grads(r["model"], r["args"])
        check_optimizer_step(r["model"], r["opt"], r["args"])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_widen_with_symmetric_noise_factor3_stays_exact(family):
    r = grown(family, "widen_d_model", dict(factor=3, noise=0.2, seed=3), torch.float64)
    assert r["err"] <= tolerance(family, torch.float64)
    assert get_adapter(r["model"]).dims().d_model == 3 * r["c0"]
    # the noise really breaks the symmetry of the copies
    lv = get_adapter(r["model"]).layer(0)
    w = lv.up.weight()
    c = r["c0"]
    assert not torch.equal(w[:, :c], w[:, c:2 * c])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_negative_control_forgetting_to_divide_by_k(family):
    r = grown(family, "widen_d_model", {}, torch.float64)
    model = r["model"]
    ad = get_adapter(model)
    with torch.no_grad():
        ad.layer(0).up.raw_weight().mul_(2)  # as if the reader had not been divided by k
    err = rel_err(output(model, r["args"], r["c0"]), r["before"])
    assert err > 1e-6, (family, err)


@pytest.mark.parametrize("family", [f for f in sorted(FAMILIES) if "tied" not in f])
def test_negative_control_tied_final_norm_not_divided(family):
    r = grown(family, "widen_d_model", {}, torch.float64)
    ad = get_adapter(r["model"])
    if not ad.tied():
        pytest.skip("head not tied")
    with torch.no_grad():
        fn = ad.final_norm().module
        fn.weight.mul_(2)
        if getattr(fn, "bias", None) is not None:
            fn.bias.mul_(2)
    err = rel_err(output(r["model"], r["args"], r["c0"]), r["before"])
    assert err > 1e-6


@pytest.mark.parametrize("family", [f for f in sorted(FAMILIES) if f.startswith("sg-")])
def test_negative_control_masked_widening_with_open_mask(family):
    r = grown(family, "widen_d_model_masked", dict(new_d=11), torch.float64)
    r["model"].advance_ramps(1.0)  # new coordinates fully in: statistics change
    err = rel_err(output(r["model"], r["args"], r["c0"]), r["before"])
    assert err > 1e-6


def _loss(model: nn.Module, args: tuple, c0: int, proj: torch.Tensor) -> torch.Tensor:
    y = run(model, args)
    if not is_lm(model):  # a stream output: read it like a /k reader (mean of the copies)
        y = y.reshape(*y.shape[:-1], -1, c0).mean(-2)
    return (y * proj).sum()


@pytest.mark.parametrize("family", [f for f in sorted(FAMILIES)
                                    if not f.startswith("torch-enc")])
def test_grad_scale_claims_hold(family):
    """The documented grad_scale of every grown parameter equals (new grad / old grad)."""
    torch.manual_seed(0)
    model = randomize_(FAMILIES[family]()).double().eval()
    args = make_input(model, dtype=torch.float64)
    c0 = get_adapter(model).dims().d_model
    out = run(model, args)
    proj = torch.randn(out.shape[:-1] + (out.shape[-1] if is_lm(model) else c0,),
                       dtype=torch.float64)
    _loss(model, args, c0, proj).backward()
    old = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    with Transaction() as tx:
        res = get_operator("widen_d_model").apply(model, make_config("widen_d_model"), tx)
    _loss(model, args, c0, proj).backward()
    new = dict(model.named_parameters())
    checked = 0
    for name, pm in res.param_maps.items():
        if name not in old or new[name].grad is None:
            continue
        want, _ = pm.gather(old[name], new[name].shape)
        want = want * (pm.grad_scale if isinstance(pm.grad_scale, float)
                       else pm.grad_scale.double())
        torch.testing.assert_close(new[name].grad, want, rtol=1e-7, atol=1e-10, msg=name)
        checked += 1
    assert checked >= 8


@pytest.mark.parametrize(
    "family,op,kw,err",
    [
        ("sg-preln", "widen_d_model", dict(factor=1), GrowthConfigError),
        ("sg-preln", "widen_d_model", dict(factor=1.5), GrowthConfigError),
        ("sg-preln", "widen_d_model", dict(noise=-1.0), GrowthConfigError),
        ("sg-preln", "widen_d_model_pad", dict(new_d=6), GrowthConfigError),  # shrinking
        ("sg-preln", "widen_d_model_pad", dict(new_d=8), GrowthConfigError),  # no growth
        ("sg-preln", "widen_d_model_pad", dict(new_d=12, mode="copy"), GrowthConfigError),
        ("sg-preln", "widen_d_model_masked", dict(new_d=4), GrowthConfigError),
        ("sg-preln", "widen_d_model_masked", dict(new_d=9, init="ones"), GrowthConfigError),
        ("torch-enc-preln", "widen_d_model_pad", dict(new_d=10), GrowthConfigError),  # not / Dh
        ("torch-enc-preln", "widen_d_model_masked", dict(new_d=12), IncompatibleModelError),
    ],
)
def test_invalid_requests_raise_before_any_change(family, op, kw, err):
    model = FAMILIES[family]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(err):
        grow_(model, make_config(op, **kw))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k])
                                                  for k in before)


def test_config_disagreeing_with_modules_raises():
    model = selfgrow_model()
    model.config.d_model = 12
    with pytest.raises(IncompatibleModelError, match="disagrees"):
        grow_(model, make_config("widen_d_model"))


def test_widen_action_and_optimizer_step():
    torch.manual_seed(0)
    model = randomize_(selfgrow_model())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = make_input(model)
    run(model, x).pow(2).mean().backward()
    opt.step()
    ev = grow_(model, resolve_action("widen", model), optimizer=opt, probe=x[0])
    assert model.config.d_model == 16 and ev.preservation["max_rel"] <= 1e-5
    assert ev.optimizer["migrated"] > 0
    st_ = opt.state[model.tok_emb.weight]
    assert st_["exp_avg"].shape == model.tok_emb.weight.shape
    opt.zero_grad()
    run(model, x).pow(2).mean().backward()
    opt.step()
    assert resolve_action("widen", model, new_d=20).name == "widen_d_model_masked"


@pytest.mark.skipif(not HAS_HF, reason="transformers not installed")
def test_hf_configs_record_the_new_shape():
    for fam, key, heads_key in (("hf-bert", "hidden_size", "num_attention_heads"),
                                ("hf-gpt2", "n_embd", "n_head"),
                                ("hf-llama", "hidden_size", "num_attention_heads")):
        m = FAMILIES[fam]()
        h0 = getattr(m.config, heads_key)
        grow_(m, make_config("widen_d_model"))
        assert getattr(m.config, key) == 16
        tied_heads = fam != "hf-llama"
        assert getattr(m.config, heads_key) == (2 * h0 if tied_heads else h0)
    assert m.config.head_dim == 4


# --------------------------------------------------------------------------- Hypothesis
@st.composite
def sg_configs(draw):
    n_heads = draw(st.sampled_from([1, 2]))
    return dict(
        vocab_size=11, d_model=draw(st.sampled_from([3, 4, 6])),
        n_layers=draw(st.integers(1, 2)), n_heads=n_heads,
        n_kv_heads=draw(st.sampled_from([1, n_heads])), head_dim=2,
        d_ff=draw(st.sampled_from([4, 6])), max_seq_len=5,
        norm=draw(st.sampled_from(["layernorm", "rmsnorm"])), norm_first=draw(st.booleans()),
        positions=draw(st.sampled_from(["learned", "rope"])),
        ffn=draw(st.sampled_from(["gelu", "swiglu"])), tie_embeddings=draw(st.booleans()),
        causal=draw(st.booleans()), bias=draw(st.booleans()),
    )


def _check_exact(cfg_kw: dict, op: str, kw: dict, seed: int) -> None:
    from selfgrow.models.transformer import GrowableTransformer, TransformerConfig

    model = randomize_(GrowableTransformer(TransformerConfig(**cfg_kw)), seed=seed).double()
    model.eval()
    x = torch.randint(0, 11, (2, 4), generator=torch.Generator().manual_seed(seed))
    ev = grow_(model, make_config(op, **kw), probe=x)
    assert ev.preservation["exact_expected"]
    assert ev.preservation["max_rel"] <= 1e-12, (cfg_kw, op, kw, ev.preservation)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(cfg=sg_configs(), factor=st.integers(2, 3), noise=st.sampled_from([0.0, 0.1]),
       seed=st.integers(0, 99))
def test_property_widen_d_model(cfg, factor, noise, seed):
    _check_exact(cfg, "widen_d_model", dict(factor=factor, noise=noise, seed=seed), seed)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(cfg=sg_configs(), extra=st.integers(1, 5), init=st.sampled_from(["zero", "random"]),
       seed=st.integers(0, 99))
def test_property_widen_d_model_masked(cfg, extra, init, seed):
    kw = dict(new_d=cfg["d_model"] + extra, init=init, init_std=0.3, seed=seed)
    _check_exact(cfg, "widen_d_model_masked", kw, seed)


@pytest.mark.slow
@settings(max_examples=2000, deadline=None)
@given(cfg=sg_configs(), factor=st.integers(2, 4), seed=st.integers(0, 999))
def test_property_widen_d_model_slow(cfg, factor, seed):
    _check_exact(cfg, "widen_d_model", dict(factor=factor, noise=0.1, seed=seed), seed)
