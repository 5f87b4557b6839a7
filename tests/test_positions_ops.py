"""extend_positions x every transformer family (registry-generated): exact on sequences of
length <= L, finite on longer ones, RoPE exact at every length, config/buffers updated,
negative control (stretching the whole table), optimizer rule for new rows, validation and
Hypothesis properties."""

from __future__ import annotations

import copy

import pytest
import torch
from _families import FAMILIES, HAS_HF, VOCAB, make_input, randomize_, run, selfgrow_model
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

from selfgrow.control.actions import resolve_action
from selfgrow.errors import GrowthConfigError, IncompatibleModelError
from selfgrow.models.transformer import GrowableTransformer
from selfgrow.ops import get_operator, grow_, make_config
from selfgrow.ops.positions import FILL_MODES, extend_table

POS_OPS = ops_of("positions")
NEW_LEN = 24


def _has_positions(family: str) -> bool:
    return not family.startswith("torch-enc")


def _max_len(model: nn.Module) -> int:
    c = model.config
    for a in ("max_seq_len", "n_positions", "max_position_embeddings"):
        if hasattr(c, a):
            return int(getattr(c, a))
    raise AssertionError("no length")


def _table(model: nn.Module) -> torch.Tensor | None:
    for n, p in model.named_parameters():
        if n.endswith(("pos_emb.weight", "position_embeddings.weight", "wpe.weight")):
            return p
    return None


def test_registry_has_extend_positions():
    assert POS_OPS == ["extend_positions"]
    assert get_operator("extend_positions").exact


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("fill", FILL_MODES)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_positions_matrix(family, fill, dtype):
    kw = dict(new_len=NEW_LEN, fill=fill)
    if not _has_positions(family):
        with pytest.raises(IncompatibleModelError, match="outside the module"):
            grown(family, "extend_positions", kw, dtype)
        return
    r = grown(family, "extend_positions", kw, dtype, optimizer=dtype == torch.float32)
    model = r["model"]
    assert _max_len(model) == NEW_LEN
    assert r["args"][0].shape[1] <= 12  # the probe is no longer than the old table
    assert r["exact"]
    assert r["err"] <= tolerance(family, dtype), (family, fill, r["err"])
    check_roundtrip(model, r["args"], r["c0"])
    # sequences longer than the old table now run and give finite outputs
    long = (torch.randint(0, VOCAB, (2, NEW_LEN), generator=torch.Generator().manual_seed(1)),)
    y = run(model, long)
    assert y.shape[1] == NEW_LEN and torch.isfinite(y).all()
    t = _table(model)
    if t is not None:
        assert t.shape[0] == NEW_LEN
    if dtype == torch.float32:
        check_grads(model, r["args"])
        check_grads(model, long)
        check_optimizer_step(model, r["opt"], long)


@pytest.mark.skipif(not HAS_HF, reason="transformers not installed")
def test_bert_buffers_and_hf_configs_record_the_new_length():
    m = FAMILIES["hf-bert"]()
    grow_(m, make_config("extend_positions", new_len=40))
    assert m.config.max_position_embeddings == 40
    assert torch.equal(m.embeddings.position_ids, torch.arange(40)[None])
    assert m.embeddings.token_type_ids.shape == (1, 40)
    assert m.embeddings.position_embeddings.num_embeddings == 40
    g = FAMILIES["hf-gpt2"]()
    grow_(g, make_config("extend_positions", new_len=40))
    assert g.config.n_positions == 40 and g.transformer.wpe.num_embeddings == 40
    ll = FAMILIES["hf-llama"]()
    grow_(ll, make_config("extend_positions", new_len=40))
    assert ll.config.max_position_embeddings == 40
    assert ll.model.rotary_emb.max_seq_len_cached == 40


@pytest.mark.parametrize("family", [f for f in sorted(FAMILIES) if "rope" in f or "llama" in f])
def test_rope_is_exact_at_every_length(family):
    """RoPE has nothing learned: outputs on length-L' sequences equal those of a model built
    with max length L' from the start (same weights)."""
    torch.manual_seed(0)
    model = randomize_(FAMILIES[family]()).double().eval()
    ref = copy.deepcopy(model)
    if isinstance(model, GrowableTransformer):
        ref.config.max_seq_len = NEW_LEN
    long = (torch.randint(0, VOCAB, (2, NEW_LEN), generator=torch.Generator().manual_seed(2)),)
    want = run(ref, long)
    grow_(model, make_config("extend_positions", new_len=NEW_LEN))
    torch.testing.assert_close(run(model, long), want, rtol=0, atol=0)


@pytest.mark.parametrize("fill", FILL_MODES)
def test_fill_modes(fill):
    old = torch.arange(12.0).view(4, 3)
    new = extend_table(old, 10, fill)
    assert new.shape == (10, 3) and torch.equal(new[:4], old)
    if fill == "copy_last":
        assert torch.equal(new[4:], old[3].expand(6, 3))
    elif fill == "tile":
        assert torch.equal(new[4:], old[torch.arange(4, 10) % 4])
    else:  # row p = table at p * 3 / 9: row 9 -> old row 3, row 6 -> old row 2
        torch.testing.assert_close(new[9], old[3])
        torch.testing.assert_close(new[6], old[2])
        torch.testing.assert_close(new[4], old[1] + (old[2] - old[1]) / 3)


@pytest.mark.parametrize("family", [f for f in sorted(FAMILIES) if _table(FAMILIES[f]())
                                    is not None])
def test_negative_control_stretching_the_whole_table(family):
    """Position interpolation over ALL rows (instead of keeping rows < L) changes outputs on
    short sequences: the operator must not do this."""
    r = grown(family, "extend_positions", dict(new_len=NEW_LEN, fill="interpolate"),
              torch.float64)
    assert r["err"] <= tolerance(family, torch.float64)
    t = _table(r["model"])
    L = 16 if not isinstance(r["model"], GrowableTransformer) else 12
    x = torch.linspace(0, L - 1, NEW_LEN, dtype=torch.float64)
    lo = x.floor().long().clamp(max=L - 1)
    hi = (lo + 1).clamp(max=L - 1)
    w = (x - lo)[:, None]
    old = t.detach()[:L].clone()
    with torch.no_grad():
        t.copy_(old[lo] * (1 - w) + old[hi] * w)
    err = rel_err(output(r["model"], r["args"], r["c0"]), r["before"])
    assert err > 1e-6, (family, err)


@pytest.mark.parametrize("family", [f for f in sorted(FAMILIES) if _has_positions(f)])
def test_grad_scale_claims_hold(family):
    """Old rows keep their gradient on short sequences; new rows are brand-new (masked)."""
    rtol = 1e-5 if family.startswith("hf-llama") else 1e-7
    n = check_grad_scales(family, make_config("extend_positions", new_len=NEW_LEN, fill="tile"),
                          rtol=rtol)
    assert n >= 6


def test_optimizer_new_rows_are_brand_new_coordinates():
    torch.manual_seed(0)
    model = randomize_(selfgrow_model())
    x = make_input(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    run(model, x).pow(2).mean().backward()
    opt.step()
    old = {k: v.clone() for k, v in opt.state[model.pos_emb.weight].items()}
    grow_(model, make_config("extend_positions", new_len=20, fill="tile"), optimizer=opt)
    st_ = opt.state[model.pos_emb.weight]
    assert torch.equal(st_["exp_avg"][:12], old["exp_avg"])
    assert torch.equal(st_["exp_avg_sq"][:12], old["exp_avg_sq"])
    assert torch.count_nonzero(st_["exp_avg"][12:]) == 0
    torch.testing.assert_close(st_["exp_avg_sq"][12:],
                               old["exp_avg_sq"].mean().expand(8, model.config.d_model))
    long = (torch.randint(0, VOCAB, (2, 20)),)
    opt.zero_grad()
    run(model, long).pow(2).mean().backward()
    opt.step()
    assert torch.isfinite(model.pos_emb.weight).all()


@pytest.mark.parametrize(
    "family,kw,err",
    [
        ("sg-preln", dict(new_len=12), GrowthConfigError),  # no growth
        ("sg-preln", dict(new_len=8), GrowthConfigError),  # shrinking
        ("sg-preln", dict(new_len=20, fill="mirror"), GrowthConfigError),
        ("sg-preln", dict(new_len=20.0), GrowthConfigError),
        ("torch-enc-preln", dict(new_len=20), IncompatibleModelError),
    ],
)
def test_invalid_requests_raise_before_any_change(family, kw, err):
    model = randomize_(FAMILIES[family]())
    snap = snapshot(model)
    with pytest.raises(err):
        grow_(model, make_config("extend_positions", **kw))
    assert_unchanged(model, snap)


@pytest.mark.skipif(not HAS_HF, reason="transformers not installed")
def test_llama_with_scaled_rope_is_refused():
    m = FAMILIES["hf-llama"]()
    m.config.rope_parameters = {"rope_theta": 10000.0, "rope_type": "linear", "factor": 2.0}
    snap = snapshot(m)
    with pytest.raises(IncompatibleModelError, match="rope_type='linear'"):
        grow_(m, make_config("extend_positions", new_len=32))
    assert_unchanged(m, snap)


def test_extend_context_action():
    model = randomize_(selfgrow_model())
    x = make_input(model)
    cfg = resolve_action("extend_context", model)
    assert cfg.name == "extend_positions" and cfg.new_len == 24
    ev = grow_(model, cfg, probe=x[0])
    assert model.config.max_seq_len == 24 and ev.preservation["max_rel"] == 0.0
    cfg = resolve_action("extend_context", model, new_len=30, fill="interpolate")
    assert cfg.fill == "interpolate"


# --------------------------------------------------------------------------- Hypothesis
@st.composite
def sg_configs(draw):
    return dict(
        vocab_size=11, d_model=draw(st.sampled_from([3, 4])), n_layers=draw(st.integers(1, 2)),
        n_heads=1, head_dim=2, d_ff=4, max_seq_len=draw(st.integers(2, 6)),
        norm=draw(st.sampled_from(["layernorm", "rmsnorm"])), norm_first=draw(st.booleans()),
        positions=draw(st.sampled_from(["learned", "learned", "rope"])),
        ffn=draw(st.sampled_from(["gelu", "swiglu"])), tie_embeddings=draw(st.booleans()),
        causal=draw(st.booleans()), bias=draw(st.booleans()),
    )


@settings(max_examples=200, deadline=None, derandomize=True)
@given(cfg=sg_configs(), extra=st.integers(1, 8), fill=st.sampled_from(FILL_MODES),
       t=st.integers(1, 6), seed=st.integers(0, 99))
def test_property_extend_positions(cfg, extra, fill, t, seed):
    T = min(t, cfg["max_seq_len"])
    kw = dict(new_len=cfg["max_seq_len"] + extra, fill=fill)
    model = check_exact_sg(cfg, make_config("extend_positions", **kw), seed, T=T)
    y = model(torch.randint(0, 11, (1, kw["new_len"])))
    assert torch.isfinite(y).all()


@pytest.mark.slow
@settings(max_examples=2000, deadline=None)
@given(cfg=sg_configs(), extra=st.integers(1, 12), fill=st.sampled_from(FILL_MODES),
       t=st.integers(1, 6), seed=st.integers(0, 999))
def test_property_extend_positions_slow(cfg, extra, fill, t, seed):
    T = min(t, cfg["max_seq_len"])
    kw = dict(new_len=cfg["max_seq_len"] + extra, fill=fill)
    check_exact_sg(cfg, make_config("extend_positions", **kw), seed, T=T)
