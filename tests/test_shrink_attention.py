"""heads_remove (``selfgrow.ops.shrink_attention``) on every transformer family: exact
removal of heads that contribute nothing with a negative control, the optimizer state of kept
coordinates, config / state-dict rebuilds, grow-then-remove round trips in both GQA modes,
refusals before any change, the magnitude criterion and shape-only sizing."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _families import FAMILIES
from _growth_checks import (
    adam_with_state,
    assert_unchanged,
    check_roundtrip,
    ops_of,
    probed_model,
    rel_err,
    snapshot,
    tolerance,
)

from selfgrow.adapters import get_adapter
from selfgrow.errors import GrowthConfigError, IncompatibleModelError
from selfgrow.ops import estimate_growth, grow_, make_config


def _tied(family: str) -> bool:
    return get_adapter(FAMILIES[family]()).dims().heads_tied_to_width


HEAD_FAMILIES = sorted(f for f in FAMILIES if not _tied(f))
TIED_FAMILIES = sorted(f for f in FAMILIES if _tied(f))
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float64, id="fp64")]


def test_the_module_registers_heads_remove() -> None:
    assert ops_of("shrink_attention") == ["heads_remove"]
    assert {"sg-preln", "sg-rms-rope-swiglu-gqa"} <= set(HEAD_FAMILIES)


def _rows(ref: Any, t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Canonical rows ``idx`` of a tensor stored like ``ref``'s weight."""
    return t[:, idx] if ref.transposed else t[idx]


def _cols(ref: Any, t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return t[idx] if ref.transposed else t[:, idx]


def _coords(heads: list[int], dh: int) -> torch.Tensor:
    return (torch.tensor(heads)[:, None] * dh + torch.arange(dh)[None, :]).reshape(-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", HEAD_FAMILIES)
def test_removing_zero_output_heads_is_exact_and_keeps_the_rest(family: str,
                                                                dtype: torch.dtype) -> None:
    m, args, fn = probed_model(family, dtype)
    d0 = get_adapter(m).dims()
    h, hkv, dh = d0.n_heads, d0.n_kv_heads, d0.head_dim
    grow_(m, make_config("heads_fresh", new_n_heads=2 * h))  # new whole groups at the end
    opt = adam_with_state(m, fn)
    ad = get_adapter(m)
    with torch.no_grad():  # training moved the new heads' o columns: zero them again
        for lv in ad.layer_views():
            w = lv.o.raw_weight()
            (w[h * dh:] if lv.o.transposed else w[:, h * dh:]).zero_()
    before = fn(m).detach()
    old = {(i, k): (getattr(ad.layer(i), k), {s: v.clone() for s, v in
                                              opt.state[getattr(ad.layer(i), k)
                                                        .raw_weight()].items()})
           for i in range(d0.n_layers) for k in ("q", "k", "o")}
    ev = grow_(m, make_config("heads_remove", n_remove=h), optimizer=opt, probe_fn=fn)
    tol = tolerance(family, dtype)
    assert ev.preservation["exact_expected"] and ev.preservation["max_rel"] <= tol
    assert rel_err(fn(m), before) <= tol
    ad = get_adapter(m)
    assert (ad.dims().n_heads, ad.dims().n_kv_heads) == (h, hkv)
    assert ev.extra["notes"]["removed"] == {i: list(range(h, 2 * h))
                                            for i in range(d0.n_layers)}
    kept_q, kept_kv = _coords(list(range(h)), dh), _coords(list(range(hkv)), dh)
    for (i, k), (ref, st_old) in old.items():  # kept coordinates' state bit-identical
        new_ref = getattr(ad.layer(i), k)
        st = opt.state[new_ref.raw_weight()]
        for s in ("exp_avg", "exp_avg_sq"):
            if k == "o":
                want = _cols(ref, st_old[s], kept_q)
            else:
                want = _rows(ref, st_old[s], kept_q if k == "q" else kept_kv)
            assert torch.equal(st[s], want), (i, k, s)
        assert torch.equal(st["step"], st_old["step"])
    check_roundtrip(m, args, get_adapter(m).dims().d_model)
    # negative control: removing one LIVE group (or head) changes the output
    g = h // hkv
    ev = grow_(m, make_config("heads_remove", n_remove=g), optimizer=opt, probe_fn=fn)
    assert not ev.preservation["exact_expected"] and ev.preservation["max_rel"] > 1e-3
    assert rel_err(fn(m), before) > 1e-3


@pytest.mark.parametrize("gqa", ["groups", "within"])
@pytest.mark.parametrize("family", HEAD_FAMILIES)
def test_heads_fresh_then_remove_restores_the_original(family: str, gqa: str) -> None:
    m, args, fn = probed_model(family)
    sd0 = {k: v.clone() for k, v in m.state_dict().items()}
    before = fn(m).detach()
    h = get_adapter(m).dims().n_heads
    hkv = get_adapter(m).dims().n_kv_heads
    grow_(m, make_config("heads_fresh", new_n_heads=2 * h, gqa=gqa, init_std=0.5))
    assert rel_err(fn(m), before) <= tolerance(family, torch.float64)
    ev = grow_(m, make_config("heads_remove", n_remove=h, gqa=gqa), probe_fn=fn)
    assert ev.preservation["exact_expected"]
    assert (get_adapter(m).dims().n_heads, get_adapter(m).dims().n_kv_heads) == (h, hkv)
    sd = m.state_dict()
    assert sd.keys() == sd0.keys()
    assert all(torch.equal(sd[k], v) for k, v in sd0.items())
    torch.testing.assert_close(fn(m), before, rtol=0, atol=0)


def test_given_heads_in_both_gqa_modes() -> None:
    m, args, fn = probed_model("sg-rms-rope-swiglu-gqa")  # H=4, Hkv=2, g=2, Dh=2
    ad = get_adapter(m)
    q0, k0, o0 = (ad.layer(1).q.weight(), ad.layer(1).k.weight(), ad.layer(1).o.weight())
    ev = grow_(m, make_config("heads_remove", heads=(2, 3)), probe_fn=fn)  # group 1
    ad = get_adapter(m)
    assert (ad.dims().n_heads, ad.dims().n_kv_heads) == (2, 1)
    assert not ev.preservation["exact_expected"]
    assert torch.equal(ad.layer(1).q.weight(), q0[:4]) and torch.equal(
        ad.layer(1).k.weight(), k0[:2]) and torch.equal(ad.layer(1).o.weight(), o0[:, :4])
    check_roundtrip(m, args, 8)
    m, args, fn = probed_model("sg-rms-rope-swiglu-gqa")
    ev = grow_(m, make_config("heads_remove", heads=(0, 3), gqa="within"))
    ad = get_adapter(m)
    assert (ad.dims().n_heads, ad.dims().n_kv_heads) == (2, 2)  # one query head per group
    keep = _coords([1, 2], 2)
    assert torch.equal(ad.layer(1).q.weight(), q0[keep]) and torch.equal(
        ad.layer(1).k.weight(), k0) and torch.equal(ad.layer(1).o.weight(), o0[:, keep])
    check_roundtrip(m, args, 8)


def test_magnitude_removes_the_least_important_heads_per_layer() -> None:
    m, _, _ = probed_model("sg-preln")  # H=2, Dh=4
    ad = get_adapter(m)
    with torch.no_grad():  # layer 0: head 1 tiny (o columns); layer 1: head 0 tiny (q rows)
        ad.layer(0).o.raw_weight()[:, 4:8] *= 1e-3
        ad.layer(1).q.raw_weight()[0:4] *= 1e-3
    ev = grow_(m, make_config("heads_remove", n_remove=1))
    assert ev.extra["notes"]["removed"] == {0: [1], 1: [0]}
    m, _, _ = probed_model("sg-rms-rope-swiglu-gqa")  # groups: the group with the smaller sum goes
    ad = get_adapter(m)
    with torch.no_grad():
        ad.layer(0).o.raw_weight()[:, 0:4] *= 1e-3  # group 0 = heads 0, 1 (Dh = 2)
        ad.layer(1).o.raw_weight()[:, 4:6] *= 1e-3  # only head 2 of group 1: within mode
    ev = grow_(m, make_config("heads_remove", n_remove=2))
    assert ev.extra["notes"]["removed"][0] == [0, 1]
    m2, _, _ = probed_model("sg-rms-rope-swiglu-gqa")
    ad = get_adapter(m2)
    with torch.no_grad():
        ad.layer(1).o.raw_weight()[:, 4:6] *= 1e-3
        ad.layer(1).o.raw_weight()[:, 0:2] *= 1e-3
    ev = grow_(m2, make_config("heads_remove", n_remove=2, gqa="within"))
    assert ev.extra["notes"]["removed"][1] == [0, 2]


GQA_BAD: list[tuple[dict[str, Any], type[Exception], str]] = [
    (dict(heads=(1,)), GrowthConfigError, r"only part of group\(s\) \[0\].*gqa='within'"),
    (dict(heads=(0, 1), gqa="within"), GrowthConfigError, r"remove \[2, 0\] from groups"),
    (dict(heads=(9,)), GrowthConfigError, r"heads \[9\] are out of range; valid: 0\.\.3"),
    (dict(heads=(2, 2)), GrowthConfigError, r"heads \[2\] are listed twice"),
    (dict(heads=(0.5,)), GrowthConfigError, "must be a list of query head indices"),
    (dict(heads=(True,)), GrowthConfigError, "must be a list of query head indices"),
    (dict(heads=(0, 1), n_remove=2), GrowthConfigError, "not both"),
    (dict(heads=(0, 1, 2, 3)), GrowthConfigError, r"gqa='groups'.*valid: 2$"),
    (dict(n_remove=1), GrowthConfigError, r"removing 1 of n_heads=4.*valid: 2$"),
    (dict(n_remove=4), GrowthConfigError, "at least one group stays"),
    (dict(n_remove=0), GrowthConfigError, "valid: 2"),
    (dict(n_remove=3, gqa="within"), GrowthConfigError, "each keeps one.*valid: 2"),
    (dict(n_remove=True), GrowthConfigError, "n_remove=True must be an integer"),
    (dict(n_remove=2, gqa="heads"), GrowthConfigError, "gqa mode.*groups.*within"),
    (dict(n_remove=2, criterion="taylor"), GrowthConfigError, "criterion.*magnitude"),
]


@pytest.mark.parametrize(("kw", "err", "msg"), GQA_BAD, ids=[str(k) for k, _, _ in GQA_BAD])
def test_bad_requests_raise_before_any_change(kw: dict[str, Any], err: type[Exception],
                                              msg: str) -> None:
    m, _, fn = probed_model("sg-rms-rope-swiglu-gqa")
    opt = adam_with_state(m, fn)
    snap = snapshot(m, opt)
    with pytest.raises(err, match=msg):
        grow_(m, make_config("heads_remove", **kw), optimizer=opt)
    assert_unchanged(m, snap, opt)


def test_multi_head_and_single_kv_group_limits() -> None:
    m, _, _ = probed_model("sg-preln")  # multi-head: g = 1, 'within' would remove every head
    with pytest.raises(GrowthConfigError, match="valid: none; use gqa='groups'"):
        grow_(m, make_config("heads_remove", n_remove=2, gqa="within"))
    m, _, _ = probed_model("sg-rms-rope-swiglu-gqa")
    grow_(m, make_config("heads_remove", n_remove=2, gqa="groups"))  # one KV group left
    with pytest.raises(GrowthConfigError, match="valid: none; use gqa='within'"):
        grow_(m, make_config("heads_remove", n_remove=1))
    grow_(m, make_config("heads_remove", n_remove=1, gqa="within"))
    assert get_adapter(m).dims().n_heads == 1


@pytest.mark.parametrize("family", TIED_FAMILIES)
def test_head_tied_families_are_refused_before_any_change(family: str) -> None:
    m, _, fn = probed_model(family)
    opt = adam_with_state(m, fn)
    snap = snapshot(m, opt)
    with pytest.raises(IncompatibleModelError, match="ties head_dim = d_model / n_heads"):
        grow_(m, make_config("heads_remove", n_remove=1), optimizer=opt)
    assert_unchanged(m, snap, opt)


@pytest.mark.parametrize("family", HEAD_FAMILIES)
def test_heads_remove_is_sized_from_shapes(family: str) -> None:
    m, _, _ = probed_model(family)
    d = get_adapter(m).dims()
    cfg = make_config("heads_remove", n_remove=d.n_heads // d.n_kv_heads)
    est = estimate_growth(m, cfg)
    grow_(m, cfg)
    assert est["params_after"] == sum(p.numel() for p in m.parameters()) < est["params_before"]
