"""Shrink operators (``selfgrow.ops.shrink``), registry-driven over every transformer
family: exactness where claimed with a negative control, the optimizer state of kept
coordinates, state-dict round trips, and refusals before any change."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _families import FAMILIES, make_input, randomize_
from _growth_checks import ops_of, output, rel_err

from selfgrow.adapters import get_adapter
from selfgrow.errors import GrowthConfigError, IncompatibleModelError
from selfgrow.ops import grow_, make_config

SHRINK_OPS = ops_of("shrink")
TOL = 1e-12


def test_the_shrink_module_registers_its_operators() -> None:
    assert set(SHRINK_OPS) == {"ffn_remove_units", "ffn_fold_duplicates"}


def _setup(family: str) -> tuple[Any, tuple, int, Any]:
    torch.manual_seed(0)
    m = randomize_(FAMILIES[family](), seed=0).double().eval()
    args = make_input(m, dtype=torch.float64)
    c0 = get_adapter(m).dims().d_model
    return m, args, c0, (lambda mm: output(mm, args, c0))


def _adam(m: torch.nn.Module, fn: Any) -> torch.optim.Adam:
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        fn(m).float().pow(2).mean().backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return opt


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fold_undoes_net2wider_exactly(family: str) -> None:
    m, args, c0, fn = _setup(family)
    sd0 = {k: v.clone() for k, v in m.state_dict().items()}
    before = fn(m).detach()
    f = get_adapter(m).dims().d_ff
    grow_(m, make_config("ffn_net2wider", new_d_ff=f + 3, noise=0.1, seed=1))
    ev = grow_(m, make_config("ffn_fold_duplicates"), probe_fn=fn)
    assert ev.preservation["exact_expected"] and ev.preservation["max_rel"] < TOL
    assert rel_err(fn(m), before) < TOL and get_adapter(m).dims().d_ff == f
    sd = m.state_dict()  # the original parameters come back (the noise cancels in the sum)
    assert sd.keys() == sd0.keys()
    assert all(torch.allclose(sd[k], v, rtol=0, atol=1e-12) for k, v in sd0.items())
    # negative control: folding units that are not duplicates changes the function
    m2, _, _, fn2 = _setup(family)
    ev = grow_(m2, make_config("ffn_fold_duplicates", atol=1e9), probe_fn=fn2)
    assert not ev.preservation["exact_expected"] and ev.preservation["max_rel"] > 1e-3
    assert get_adapter(m2).dims().d_ff == 1


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_removing_zero_fanout_units_is_exact_and_keeps_the_rest(family: str) -> None:
    m, args, c0, fn = _setup(family)
    f = get_adapter(m).dims().d_ff
    grow_(m, make_config("ffn_zero_fanout", new_d_ff=f + 2))
    opt = _adam(m, fn)
    ad = get_adapter(m)
    with torch.no_grad():  # training moved the new units' outgoing columns: zero them again
        for i in range(ad.dims().n_layers):
            down = ad.layer(i).down
            w = down.raw_weight()
            (w[f:] if down.transposed else w[:, f:]).zero_()
    before = fn(m).detach()
    up = ad.layer(0).up
    st_up = {k: v.clone() for k, v in opt.state[up.raw_weight()].items()}
    ev = grow_(m, make_config("ffn_remove_units", units=(f, f + 1)), optimizer=opt, probe_fn=fn)
    assert ev.preservation["exact_expected"] and ev.preservation["max_rel"] < TOL
    assert rel_err(fn(m), before) < TOL and get_adapter(m).dims().d_ff == f
    up = get_adapter(m).layer(0).up
    st = opt.state[up.raw_weight()]
    rows = slice(0, f)
    for k in ("exp_avg", "exp_avg_sq"):  # kept units' state bit-identical
        old, new = st_up[k], st[k]
        assert torch.equal(new, old[:, rows] if up.transposed else old[rows])
    # negative control: removing the two least important LIVE units changes the function
    ev = grow_(m, make_config("ffn_remove_units", n_remove=2), optimizer=opt, probe_fn=fn)
    assert not ev.preservation["exact_expected"] and ev.preservation["max_rel"] > 1e-6
    assert get_adapter(m).dims().d_ff == f - 2


def test_magnitude_removes_the_least_important_units_per_layer() -> None:
    m, _, _, fn = _setup("sg-preln")
    ad = get_adapter(m)
    with torch.no_grad():  # layer 0: units 3 and 5 are tiny; layer 1: units 0 and 1
        ad.layer(0).up.raw_weight()[[3, 5]] *= 1e-3
        ad.layer(1).down.raw_weight()[:, [0, 1]] *= 1e-3
    ev = grow_(m, make_config("ffn_remove_units", n_remove=2))
    assert ev.extra["notes"]["removed"] == {0: [3, 5], 1: [0, 1]}
    fresh = type(m)(m.config).double()
    fresh.load_state_dict(m.state_dict())  # the shrunk config rebuilds the model
    x = make_input(m)
    assert torch.equal(fresh.eval()(*x), m.eval()(*x))


@pytest.mark.parametrize(("kw", "err", "msg"), [
    (dict(units=(0, 99)), GrowthConfigError, r"units \[99\] are out of range; valid: 0\.\.15"),
    (dict(units=(1, 1)), GrowthConfigError, r"units \[1\] are listed twice"),
    (dict(units=(0.5,)), GrowthConfigError, "must be a list of unit indices"),
    (dict(units=(True,)), GrowthConfigError, "must be a list of unit indices"),
    (dict(units=(1, 2), n_remove=2), GrowthConfigError, "not both"),
    (dict(units=tuple(range(16))), GrowthConfigError, "at least one unit stays"),
    (dict(n_remove=16), GrowthConfigError, "valid: 1..15"),
    (dict(n_remove=0), GrowthConfigError, "valid: 1..15"),
    (dict(units=(0,), n_remove=3), GrowthConfigError, "not both"),
    (dict(n_remove=2, criterion="taylor"), GrowthConfigError, "criterion.*magnitude"),
])
def test_remove_units_refuses_bad_requests_before_any_change(kw: dict[str, Any],
                                                             err: type[Exception],
                                                             msg: str) -> None:
    m, _, _, _ = _setup("sg-preln")
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(err, match=msg):
        grow_(m, make_config("ffn_remove_units", **kw))
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in sd.items())


def test_fold_refuses_a_model_without_duplicates_or_uneven_layers() -> None:
    m, _, _, fn = _setup("sg-preln")
    with pytest.raises(IncompatibleModelError, match="no duplicated FFN units"):
        grow_(m, make_config("ffn_fold_duplicates"))
    with pytest.raises(GrowthConfigError, match="atol=-1"):
        grow_(m, make_config("ffn_fold_duplicates", atol=-1.0))
    ad = get_adapter(m)
    with torch.no_grad():  # layer 0 gets two dead units, layer 1 none: uneven widths
        ad.layer(0).down.raw_weight()[:, [2, 3]] = 0
    with pytest.raises(IncompatibleModelError, match="different widths"):
        grow_(m, make_config("ffn_fold_duplicates"))


def test_fold_undoes_a_per_layer_net2wider_exactly() -> None:
    """ffn_net2wider(layers=[0]) copies units in layer 0 and gives layer 1 zero fan-out
    units: the fold folds the copies and drops the zero fan-out units, exactly."""
    m, _, _, fn = _setup("sg-preln")
    sd0 = {k: v.clone() for k, v in m.state_dict().items()}
    grow_(m, make_config("ffn_net2wider", new_d_ff=20, layers=[0], noise=0.1))
    ev = grow_(m, make_config("ffn_fold_duplicates"), probe_fn=fn)
    assert ev.preservation["max_rel"] < TOL and get_adapter(m).dims().d_ff == 16
    assert all(torch.allclose(m.state_dict()[k], v, atol=1e-12) for k, v in sd0.items())


def test_shrinks_are_sized_from_shapes() -> None:
    from selfgrow.ops import estimate_growth

    m, _, _, _ = _setup("sg-preln")
    before = sum(p.numel() for p in m.parameters())
    per_unit = 2 * (2 * 8 + 1)  # 2 layers x (up row + down column + up bias)
    for kw in (dict(units=(1, 2)), dict(n_remove=2)):
        est = estimate_growth(m, make_config("ffn_remove_units", **kw))
        assert est["params_after"] == before - 2 * per_unit, kw
    grow_(m, make_config("ffn_net2wider", new_d_ff=18))
    est = estimate_growth(m, make_config("ffn_fold_duplicates"))  # upper bound: unfolded
    assert est["params_after"] == est["params_before"]


def test_fold_is_fast_on_a_wide_ffn() -> None:
    import time

    from selfgrow.models.transformer import GrowableTransformer, tiny_config

    m = GrowableTransformer(tiny_config(d_ff=2048, d_model=32, n_heads=4, head_dim=8))
    grow_(m, make_config("ffn_net2wider", new_d_ff=2304))
    t0 = time.perf_counter()
    grow_(m, make_config("ffn_fold_duplicates"))
    assert time.perf_counter() - t0 < 10.0 and m.config.d_ff == 2048
