"""Mixture of experts: the MoEFFN layer (routing, vectorised dispatch against a per-token
reference, capacity, train / eval consistency, auxiliary losses, routing statistics) and the
MoE operators of ``selfgrow.ops.experts`` (exactness with negative controls, optimizer state,
state-dict round trips, the controller's add_expert action)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from _growth_checks import rel_err

from selfgrow.control.actions import resolve_action
from selfgrow.control.signals import ExpertOverload
from selfgrow.errors import GrowthConfigError, IncompatibleModelError
from selfgrow.models.moe import (
    GATES,
    MoEFFN,
    moe_auxiliary_loss,
    moe_reference_forward,
    routing_scalars,
    routing_stats_by_tag,
    set_routing_tag,
)
from selfgrow.models.transformer import GrowableTransformer, TransformerConfig, tiny_config
from selfgrow.ops import grow_, make_config

FP64_TOL = 1e-12


def _layer(gate: str = "topk", ffn: str = "gelu", **kw: Any) -> MoEFFN:
    torch.manual_seed(0)
    return MoEFFN(8, 12, 4, top_k=2, gate=gate, ffn=ffn, init_std=0.5, **kw).double()


def _x(n: int = 40, c: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------------------ the layer
@pytest.mark.parametrize("ffn", ["gelu", "swiglu"])
@pytest.mark.parametrize("gate", GATES)
def test_vectorised_dispatch_equals_per_token_reference(gate: str, ffn: str) -> None:
    m = _layer(gate, ffn)
    x = _x()
    for training in (False, True):
        m.train(training)
        with torch.random.fork_rng():
            torch.manual_seed(5)
            y = m(x)
        with torch.random.fork_rng():
            torch.manual_seed(5)  # dynamic-k draws the same Gumbel noise
            ref = moe_reference_forward(m, x)
        assert rel_err(y, ref) < FP64_TOL, (gate, ffn, training)
    # negative control: a wrong weight per assignment must not pass the same check
    m.eval()
    _, w, _ = m.route(x)
    tok, exp = w.nonzero(as_tuple=True)
    bad = torch.zeros_like(x).index_add(0, tok, torch.stack(
        [m.expert_forward(int(e), x[int(t):int(t) + 1])[0] for t, e in zip(tok, exp, strict=True)]))
    assert rel_err(bad, m(x)) > 1e-3


def test_topk_selects_k_experts_and_weights_sum_to_one() -> None:
    m = _layer("topk").eval()
    logits, w, sel = m.route(_x())
    assert (sel.sum(-1) == 2).all()
    assert torch.allclose(w.sum(-1), torch.ones(40, dtype=w.dtype))
    assert torch.equal(sel, torch.zeros_like(sel).scatter(1, logits.topk(2).indices, True))


def test_top_any_token_with_no_expert_is_routed_the_same_in_training_and_eval() -> None:
    """A token that clears no threshold goes to its best expert, in both modes (DynMoE gives
    it a zero output in training and top-1 in evaluation)."""
    m = _layer("top_any")
    with torch.no_grad():
        m.threshold.fill_(1e3)  # nobody clears a threshold
    x = _x()
    m.train()
    y_train = m(x)
    m.eval()
    y_eval = m(x)
    assert torch.equal(y_train, y_eval)
    best = (m.router(x) - m.threshold).argmax(-1)
    top1 = torch.stack([m.expert_forward(int(e), x[i:i + 1])[0] for i, e in enumerate(best)])
    assert rel_err(y_eval, top1) < FP64_TOL
    assert m.routing_stats()["active_k"] == 1.0
    assert y_train.abs().sum() > 0  # not DynMoE's zero output in training


def test_dynamic_k_is_argmax_in_eval_and_sampled_in_training() -> None:
    m = _layer("dynamic_k")
    x = _x(200)
    m.eval()
    k_eval = m.route(x)[2].sum(-1)
    want = m.k_net(x).argmax(-1) + 1
    assert torch.equal(k_eval, want)
    m.train()
    torch.manual_seed(0)
    ks = torch.stack([m.route(x)[2].sum(-1) for _ in range(5)])
    assert (ks != k_eval).any()  # Gumbel sampling in training
    assert m.k_loss is not None and 1.0 <= float(m.k_loss) <= 2.0
    m(x).sum().backward()
    assert m.k_net.weight.grad is not None and m.k_net.weight.grad.abs().sum() > 0


def test_capacity_drops_assignments_over_capacity_in_token_order() -> None:
    m = _layer("topk", capacity_factor=0.5).eval()
    x = _x(40)
    y = m(x)
    st = m.routing_stats()
    cap = math.ceil(0.5 * 80 / 4)
    assert st["dropped"] > 0
    assert int(torch.round(torch.as_tensor(st["load"]) * (80 * (1 - st["dropped"]))).max()) <= cap
    _, w, sel = m.route(x)
    keep = (sel.long().cumsum(0) - 1 < cap) & sel
    ref = torch.zeros_like(x)
    for t, e in keep.nonzero().tolist():
        ref[t] += w[t, e] * m.expert_forward(e, x[t:t + 1])[0]
    assert rel_err(y, ref) < FP64_TOL


def test_auxiliary_losses() -> None:
    m = _layer("topk")
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.bias.zero_()
    x = _x()
    m(x)
    # uniform router: P_e = 1/E, f sums to 1 -> E * sum f_e / E = 1
    assert abs(float(m.aux_loss) - 1.0) < 1e-12
    assert abs(float(m.z_loss) - math.log(4) ** 2) < 1e-12
    assert torch.allclose(m.loss(), 0.01 * m.aux_loss + 0.001 * m.z_loss)
    with torch.no_grad():
        m.router.bias.copy_(torch.tensor([5.0, 0, 0, 0]))
    m(x)
    assert float(m.aux_loss) > 1.5  # one expert takes half the assignments with p ~ 0.98


def test_routing_stats_tags_and_reset() -> None:
    model = GrowableTransformer(tiny_config(moe_experts=(4, 0), moe_top_k=2))
    x = torch.randint(0, 64, (2, 8))
    set_routing_tag(model, "exp0")
    model(x)
    set_routing_tag(model, "exp1")
    model(x)
    model(x)
    set_routing_tag(model, None)
    tags = routing_stats_by_tag(model)
    assert set(tags) == {"exp0", "exp1"}
    assert tags["exp0"]["layers.0.ffn"]["tokens"] == 16
    assert tags["exp1"]["layers.0.ffn"]["tokens"] == 32
    m = model.layers[0].ffn
    st = m.routing_stats()
    assert st["tokens"] == 48 and st["active_k"] == 2.0 and st["max_k"] == 2
    assert abs(float(st["load"].sum()) - 1.0) < 1e-12
    assert int(st["k_hist"][2]) == 48 and int(st["k_hist"].sum()) == 48
    assert m.routing_stats()["tokens"] == 48  # nothing new: the previous read again
    model(x)
    assert m.routing_stats()["tokens"] == 16  # the window restarted at the read
    sc = routing_scalars(model)
    assert set(sc) == {f"moe/layers.0.ffn/{k}" for k in ("load_max", "active_k", "entropy",
                                                          "dropped")}
    with pytest.raises(GrowthConfigError, match="routing tag"):
        set_routing_tag(model, 3)  # type: ignore[arg-type]


def test_expert_overload_signal_reads_the_model() -> None:
    model = GrowableTransformer(tiny_config(moe_experts=(4, 4)))
    with torch.no_grad():
        model.layers[1].ffn.router.bias.copy_(torch.tensor([9.0, 0, 0, 0]))
    sig = ExpertOverload(threshold=0.4, window=1)
    sig.bind(model)
    assert sig.requires == ()
    model(torch.randint(0, 64, (2, 8)))
    sig.update(1, {})
    assert sig.value >= 0.5 and sig.layers["layers.1.ffn"]["expert"] == 0


@pytest.mark.parametrize(("kw", "msg"), [
    (dict(n_experts=0), "n_experts=0"),
    (dict(top_k=5), "top_k=5 > n_experts=4"),
    (dict(gate="switch"), "MoE gate.*topk"),
    (dict(capacity_factor=0), "capacity_factor=0"),
    (dict(ffn="relu"), "expert ffn"),
    (dict(aux_weight=-1), "aux_weight"),
])
def test_layer_refuses_bad_arguments(kw: dict[str, Any], msg: str) -> None:
    args = dict(d_model=8, d_ff=12, n_experts=4) | kw
    with pytest.raises(GrowthConfigError, match=msg):
        MoEFFN(**args)


def test_config_validates_moe_fields() -> None:
    with pytest.raises(GrowthConfigError, match="one per layer"):
        tiny_config(moe_experts=(4,))
    with pytest.raises(GrowthConfigError, match="integers >= 0"):
        tiny_config(moe_experts=(4, -1))
    with pytest.raises(GrowthConfigError, match="top_k=3 > n_experts=2"):
        tiny_config(moe_experts=(2, 4), moe_top_k=3)
    assert tiny_config(moe_experts=(0, 0)).moe_experts == ()


# ------------------------------------------------------------------------------ operators
def _model(gate: str = "topk", ffn: str = "gelu", experts: tuple[int, ...] = (),
           seed: int = 0) -> GrowableTransformer:
    torch.manual_seed(seed)
    m = GrowableTransformer(tiny_config(ffn=ffn, moe_gate=gate, moe_experts=experts))
    with torch.no_grad():  # distinct, non-trivial experts and routers
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        for b in m.layers:  # top-any: tokens activate several experts
            if getattr(b.ffn, "threshold", None) is not None:
                b.ffn.threshold.fill_(-3.0)
    return m.double().eval()


def _ids(seed: int = 2) -> torch.Tensor:
    return torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(seed))


def _adam(m: torch.nn.Module, x: torch.Tensor) -> torch.optim.Adam:
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        m.train()
        (m(x).pow(2).mean() + m.moe_loss()).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    m.eval()
    return opt


def _roundtrip(m: GrowableTransformer) -> None:
    fresh = GrowableTransformer(TransformerConfig(**{
        k: getattr(m.config, k) for k in m.config.__dataclass_fields__})).double()
    fresh.load_state_dict(m.state_dict())
    x = _ids(7)
    assert torch.equal(fresh.eval()(x), m.eval()(x))


@pytest.mark.parametrize("ffn", ["gelu", "swiglu"])
@pytest.mark.parametrize("gate", GATES)
def test_upcycle_is_exact_for_every_gate(gate: str, ffn: str) -> None:
    m = _model(gate, ffn)
    x = _ids()
    opt = _adam(m, x)
    up_state = {k: v.clone() for k, v in opt.state[m.layers[1].ffn.up.weight].items()}
    before = m(x)
    ev = grow_(m, make_config("moe_upcycle", n_experts=4), optimizer=opt, probe=x)
    assert ev.preservation["exact_expected"] and ev.preservation["max_rel"] < FP64_TOL
    assert rel_err(m(x), before) < FP64_TOL
    assert m.config.moe_experts == (4, 4)
    w_up = m.layers[1].ffn.w_up
    st = opt.state[w_up]
    for e in range(4):  # every expert starts from the dense FFN's Adam state, scaled 1/E
        assert torch.allclose(st["exp_avg"][e], up_state["exp_avg"] / 4)
        assert torch.allclose(st["exp_avg_sq"][e], up_state["exp_avg_sq"] / 16)
    _roundtrip(m)
    opt.zero_grad()
    m.train()
    (m(x).pow(2).mean() + m.moe_loss()).backward()
    opt.step()  # training goes on
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_drop_upcycle_reinitialises_half_of_each_expert_and_is_not_exact() -> None:
    m = _model()
    x = _ids()
    dense = {n: p.detach().clone() for n, p in m.layers[0].ffn.named_parameters()}
    before = m(x)
    ev = grow_(m, make_config("moe_drop_upcycle", n_experts=4, layers=(0,), seed=3), probe=x)
    moe = m.layers[0].ffn
    F_ = m.config.d_ff
    changed = []
    for e in range(4):
        rows = (moe.w_up[e] != dense["up.weight"]).any(1)
        cols = (moe.w_down[e] != dense["down.weight"]).any(0)
        assert torch.equal(rows, cols) and int(rows.sum()) == F_ // 2
        assert torch.equal(moe.w_up[e][~rows], dense["up.weight"][~rows])  # the rest kept
        assert (moe.b_up[e][rows] == 0).all()
        changed.append(rows)
    assert any(not torch.equal(changed[0], c) for c in changed[1:])  # different per expert
    err = rel_err(m(x), before)
    assert not ev.preservation["exact_expected"] and err > 1e-4
    assert abs(ev.preservation["max_rel"] - err) < 1e-9 * max(1.0, err)
    assert m.config.moe_experts == (4, 0)
    _roundtrip(m)


def _last_layer_tokens_routed_to(m: GrowableTransformer, x: torch.Tensor, e: int) -> torch.Tensor:
    """(B*T,) bool: tokens whose last-layer routing selects expert ``e`` (the per-token
    output of the last block depends on that token's MoE input only)."""
    captured: dict[str, torch.Tensor] = {}
    moe = m.layers[-1].ffn
    h = moe.register_forward_pre_hook(lambda mod, a: captured.setdefault("x", a[0]))
    m(x)
    h.remove()
    return moe.route(captured["x"].reshape(-1, moe.d_model))[2][:, e]


@pytest.mark.parametrize("gate", GATES)
def test_add_expert_exactness_per_gate(gate: str) -> None:
    m = _model(gate, experts=(0, 4))
    x = _ids()
    opt = _adam(m, x)
    moe = m.layers[1].ffn
    m(x)
    src = int(moe.routing_stats(reset=False)["load"].argmax())  # the default: the busiest
    routed = _last_layer_tokens_routed_to(m, x, src)
    before = m(x)
    st_before = {k: v.clone() for k, v in opt.state[moe.w_up].items()}
    ev = grow_(m, make_config("add_expert", layer=1), optimizer=opt, probe=x)
    assert ev.extra["notes"]["source"] == src and m.config.moe_experts == (0, 5)
    moe = m.layers[1].ffn
    after = m(x)
    diff = (after - before).abs().amax(-1).reshape(-1)
    st = opt.state[moe.w_up]
    if gate == "top_any":  # the log-2 split: exact, the pair shares the source's state
        assert torch.equal(moe.w_up[4], moe.w_up[src])
        assert ev.preservation["exact_expected"] and ev.preservation["max_rel"] < FP64_TOL
        assert torch.allclose(st["exp_avg"][src], st_before["exp_avg"][src] * 0.5)
    else:  # the copy starts at the source's logit, with symmetry-breaking noise
        assert not ev.preservation["exact_expected"]
        rel = (moe.w_up[4] - moe.w_up[src]).std() / moe.w_up[src].std()
        assert 0.003 < float(rel) < 0.03  # noise = 0.01 of the tensor's std
        picks_copy = _last_layer_tokens_routed_to(m, x, 4)
        assert 0 < int(picks_copy.sum())  # the copy gets tokens at once
        assert diff[~picks_copy].max() < FP64_TOL * before.abs().max()  # exact elsewhere
        # every token the busiest expert had keeps it or its copy (halving both would drop
        # the pair from tokens where it was marginal)
        kept = _last_layer_tokens_routed_to(m, x, src) | picks_copy
        assert bool(kept[routed].all())
        assert torch.equal(st["exp_avg"][src], st_before["exp_avg"][src])
    for e in range(4):  # the other experts' Adam state is bit-identical
        if e != src:
            assert torch.equal(st["exp_avg"][e], st_before["exp_avg"][e])
    assert torch.allclose(st["exp_avg"][4], st_before["exp_avg"][src] * 0.5)
    _roundtrip(m)


@pytest.mark.parametrize("gate", ["topk", "dynamic_k"])
def test_add_expert_keeps_a_balanced_router_alive(gate: str) -> None:
    """A trial found that halving the pair's logits under top-2 pushed both copies out of
    every token's top-2 on a balanced router (the busiest expert deleted in effect). After
    the growth and some training, the source and its copy both still get tokens."""
    torch.manual_seed(0)
    m = GrowableTransformer(tiny_config(moe_experts=(4, 4), moe_gate=gate))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))

    def steps(n: int) -> None:
        for _ in range(n):
            opt.zero_grad()
            (torch.nn.functional.cross_entropy(m(x)[:, :-1].reshape(-1, 64),
                                               x[:, 1:].reshape(-1)) + m.moe_loss()).backward()
            opt.step()

    steps(3)
    grow_(m, make_config("add_expert", layer=0, source=0), optimizer=opt, probe=x)
    steps(10)
    load = m.layers[0].ffn.routing_stats()["load"]
    assert load[0] > 0 and load[4] > 0, load


def test_add_expert_negative_control_without_the_log2_split() -> None:
    """The same copy without the - log 2 on the pair's logits changes the function under
    top-any (the copy doubles the source's share)."""
    m = _model("top_any", experts=(0, 3))
    x = _ids()
    m(x)
    assert m.layers[1].ffn.routing_stats(reset=False)["active_k"] > 1.5
    before = m(x)
    grow_(m, make_config("add_expert", layer=1))
    moe = m.layers[1].ffn
    with torch.no_grad():
        moe.router.bias[moe.router.bias.shape[0] - 1] += math.log(2)
        src = int((moe.w_up[:-1] == moe.w_up[-1]).flatten(1).all(1).nonzero()[0])
        moe.router.bias[src] += math.log(2)
        moe.threshold[-1] += math.log(2)
        moe.threshold[src] += math.log(2)
    assert rel_err(m(x), before) > 1e-4


def test_remove_expert_exact_when_it_gets_no_mass_and_keeps_the_others_state() -> None:
    m = _model("topk", experts=(0, 4))
    moe = m.layers[1].ffn
    with torch.no_grad():
        moe.router.bias[2] = -1e4  # expert 2 is never selected
    x = _ids()
    opt = _adam(m, x)
    m(x)
    assert float(m.layers[1].ffn.routing_stats(reset=False)["load"][2]) == 0.0
    st_before = {k: v.clone() for k, v in opt.state[m.layers[1].ffn.w_down].items()}
    before = m(x)
    ev = grow_(m, make_config("remove_expert", layer=1), optimizer=opt, probe=x)
    assert ev.extra["notes"]["expert"] == 2 and ev.extra["notes"]["load_of_removed"] == 0.0
    assert rel_err(m(x), before) < FP64_TOL and m.config.moe_experts == (0, 3)
    st = opt.state[m.layers[1].ffn.w_down]
    assert torch.equal(st["exp_avg"], st_before["exp_avg"][[0, 1, 3]])
    assert torch.equal(st["exp_avg_sq"], st_before["exp_avg_sq"][[0, 1, 3]])
    _roundtrip(m)
    # negative control: removing a loaded expert changes the function (and says so)
    m(x)
    busiest = int(m.layers[1].ffn.routing_stats(reset=False)["load"].argmax())
    before = m(x)
    ev = grow_(m, make_config("remove_expert", layer=1, expert=busiest), probe=x)
    assert ev.preservation["max_rel"] > 1e-4 and not ev.preservation["exact_expected"]


@pytest.mark.parametrize("gate", ["topk", "dynamic_k"])
def test_grow_top_k_mixes_more_experts(gate: str) -> None:
    m = _model(gate, experts=(4, 4))
    x = _ids()
    opt = _adam(m, x)
    ev = grow_(m, make_config("grow_top_k", new_k=3), optimizer=opt, probe=x)
    assert m.config.moe_top_k == 3 and all(b.ffn.top_k == 3 for b in m.layers)
    assert not ev.preservation["exact_expected"]
    if gate == "topk":
        m(x)
        assert m.layers[0].ffn.routing_stats()["active_k"] == 3.0
        assert ev.preservation["max_rel"] > 1e-6
    else:
        assert m.layers[0].ffn.k_net.weight.shape[0] == 3
    _roundtrip(m)


@pytest.mark.parametrize(("model_kw", "op", "kw", "err", "msg"), [
    ({}, "add_expert", dict(layer=0), IncompatibleModelError, "needs an MoE layer"),
    (dict(experts=(0, 3)), "add_expert", dict(layer=0), GrowthConfigError,
     r"not an MoE layer; valid: \[1\]"),
    (dict(experts=(0, 3)), "add_expert", dict(layer=1), GrowthConfigError,
     "no routing statistics yet"),
    (dict(experts=(0, 3)), "add_expert", dict(layer=1, source=3), GrowthConfigError,
     "source=3"),
    (dict(experts=(0, 3)), "add_expert", dict(layer=1, source=0, router_init="x"),
     GrowthConfigError, "router_init"),
    (dict(experts=(0, 2)), "remove_expert", dict(layer=1, expert=0), GrowthConfigError,
     "top_k=2 needs"),
    (dict(gate="dynamic_k", experts=(0, 2)), "remove_expert", dict(layer=1, expert=0),
     GrowthConfigError, "top_k=2 needs"),
    (dict(experts=(4, 4)), "moe_upcycle", {}, IncompatibleModelError, "nothing to upcycle"),
    (dict(experts=(0, 4)), "moe_upcycle", dict(gate="top_any"), GrowthConfigError,
     "must match"),
    ({}, "moe_upcycle", dict(n_experts=1), GrowthConfigError, "n_experts=1"),
    ({}, "moe_upcycle", dict(layers=(5,)), GrowthConfigError, "not distinct dense"),
    ({}, "moe_drop_upcycle", dict(drop_ratio=0), GrowthConfigError, "drop_ratio=0"),
    (dict(experts=(4, 4)), "grow_top_k", dict(new_k=5), GrowthConfigError, "valid: 3..4"),
    (dict(gate="top_any", experts=(4, 4)), "grow_top_k", dict(new_k=3), IncompatibleModelError,
     "no k"),
])
def test_moe_operators_refuse_bad_requests_before_any_change(
        model_kw: dict[str, Any], op: str, kw: dict[str, Any], err: type[Exception],
        msg: str) -> None:
    m = _model(**model_kw)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    cfg = dict(vars(m.config))
    with pytest.raises(err, match=msg):
        grow_(m, make_config(op, **kw))
    assert vars(m.config) == cfg
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in sd.items())


def test_dense_operators_refuse_moe_models() -> None:
    m = _model(experts=(0, 3))
    with pytest.raises(IncompatibleModelError, match="MoE operators are moe_upcycle"):
        grow_(m, make_config("ffn_net2wider", new_d_ff=40))
    with pytest.raises(IncompatibleModelError, match="MoE layers"):
        grow_(m, make_config("g_stack"))


def test_controller_action_adds_an_expert_to_the_overloaded_layer() -> None:
    m = _model("topk", experts=(3, 3))
    with torch.no_grad():
        m.layers[0].ffn.router.bias.copy_(torch.tensor([9.0, 0, 0]))
    m(_ids())
    cfg = resolve_action("add_expert", m)
    assert cfg.layer == 0 and type(cfg).name == "add_expert"
    grow_(m, cfg)
    assert m.config.moe_experts == (4, 3)
    with pytest.raises(IncompatibleModelError, match="no MoE layer"):
        resolve_action("add_expert", _model())


def test_moe_auxiliary_loss_of_a_dense_model_is_zero() -> None:
    m = _model()
    assert float(moe_auxiliary_loss(m)) == 0.0 and float(m.moe_loss()) == 0.0


def test_controller_grows_an_overloaded_moe_while_training(tmp_path: Any) -> None:
    """ExpertOverload -> RulePolicy add_expert on a live MoE transformer: the expert is added
    in the overloaded layer, the event log records it with the signal's per-layer state,
    Adam's state of the other parameters survives and training goes on; TensorBoard scalars
    carry the routing statistics."""
    from selfgrow.control.controller import GrowthController
    from selfgrow.control.policies import Rule, RulePolicy
    from selfgrow.events.jsonl import read_events

    torch.manual_seed(0)
    m = GrowableTransformer(tiny_config(moe_experts=(0, 3)))
    with torch.no_grad():
        m.layers[1].ffn.router.bias.copy_(torch.tensor([6.0, 0.0, 0.0]))  # expert 0 hoards
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    x = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    ctrl = GrowthController(m, opt, signals=[ExpertOverload(threshold=0.45, window=2)],
                            policy=RulePolicy([Rule("expert_overload", "add_expert")],
                                              max_growths=1),
                            log_dir=str(tmp_path), probe=x, scalar_every=1)
    emb_state = None
    for step in range(6):
        opt.zero_grad()
        logits = m(x)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64),
                                                 x[:, 1:].reshape(-1)) + m.moe_loss()
        loss.backward()
        opt.step()
        if step == 1:
            emb_state = opt.state[m.tok_emb.weight]["exp_avg"].clone()
        ctrl.observe(loss=loss)
    ctrl.close()
    growths = [e for e in ctrl.events if e.kind == "growth"]
    assert len(growths) == 1 and m.config.moe_experts == (0, 4)
    ev = growths[0]
    assert ev.action["op"] == "add_expert" and ev.extra["notes"]["source"] == 0
    assert ev.trigger["signal"] == "expert_overload"
    assert ev.trigger["layers"] == ["layers.1.ffn"] and ev.trigger["value"] > 0.45
    assert emb_state is not None and m.tok_emb.weight in opt.state
    logged = read_events(tmp_path / "events.jsonl")[0]
    assert [e.action["op"] for e in logged if e.kind == "growth"] == ["add_expert"]
    scalars = (tmp_path / "metrics.jsonl").read_text()
    assert "moe/layers.1.ffn/load_max" in scalars


# ------------------------------------------------------------------------------ merging
def _dense(seed: int, **kw: Any) -> GrowableTransformer:
    return _model(seed=seed, **kw)


@pytest.mark.parametrize("ffn", ["gelu", "swiglu"])
def test_grow_by_merging_one_hot_router_reproduces_each_source_ffn(ffn: str) -> None:
    from selfgrow.ops.experts import grow_by_merging

    base = _dense(0, ffn=ffn)
    models = [_dense(s, ffn=ffn) for s in (1, 2, 3)]
    snaps = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    merged = grow_by_merging(base, models, top_k=1)
    assert merged.config.moe_experts == (3, 3)
    h = torch.randn(2, 5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    for i, layer in enumerate(merged.layers):
        moe = layer.ffn
        for e, m in enumerate(models):
            with torch.no_grad():  # a one-hot router: every token to expert e
                moe.router.weight.zero_()
                moe.router.bias.fill_(-1e4)
                moe.router.bias[e] = 0.0
            assert torch.equal(moe(h), m.layers[i].ffn(h)) or rel_err(
                moe(h), m.layers[i].ffn(h)) < FP64_TOL
        # negative control: routing to another model's expert does not reproduce model 0
        assert rel_err(moe(h), models[0].layers[i].ffn(h)) > 1e-3
    # non-FFN parameters: the mean over the models
    mean = torch.stack([m.tok_emb.weight.detach() for m in models]).mean(0)
    assert torch.allclose(merged.tok_emb.weight, mean, atol=1e-15)
    assert all(torch.equal(v, m.state_dict()[k]) for m, sn in zip(models, snaps, strict=True)
               for k, v in sn.items())  # the sources are untouched


def test_grow_by_merging_with_base_non_ffn_reproduces_base() -> None:
    from selfgrow.ops.experts import grow_by_merging

    base = _dense(0)
    merged = grow_by_merging(base, [base, _dense(1)], non_ffn="base", top_k=1).double().eval()
    with torch.no_grad():
        for b in merged.layers:
            b.ffn.router.weight.zero_()
            b.ffn.router.bias.copy_(torch.tensor([0.0, -1e4]))
    x = _ids()
    assert rel_err(merged(x), base(x)) < FP64_TOL
    _roundtrip(merged)


def test_grow_by_merging_refuses_mismatched_models() -> None:
    from selfgrow.ops.experts import grow_by_merging

    base = _dense(0)
    with pytest.raises(IncompatibleModelError, match="d_ff=32.*base has 16|d_ff"):
        grow_by_merging(base, [base, GrowableTransformer(tiny_config(d_ff=64)).double()])
    with pytest.raises(GrowthConfigError, match="at least 2 models"):
        grow_by_merging(base, [base])
    with pytest.raises(GrowthConfigError, match="non_ffn"):
        grow_by_merging(base, [base, _dense(1)], non_ffn="sum")
    with pytest.raises(IncompatibleModelError, match="already has MoE layers"):
        grow_by_merging(base, [base, _model(experts=(2, 2))])
    with pytest.raises(IncompatibleModelError, match="valid: a dense selfgrow"):
        grow_by_merging(base, [base, torch.nn.Linear(2, 2)])


def test_top1_router_gets_a_gradient_from_the_main_loss() -> None:
    """Renormalised top-1 weights are exactly 1; the router must still learn from the loss
    (the normaliser is constant in the backward pass for single-expert tokens)."""
    m = MoEFFN(8, 12, 4, top_k=1).double()
    x = _x()
    y = m(x)
    assert torch.allclose(m.route(x)[1].sum(-1), torch.ones(40, dtype=torch.float64))
    y.pow(2).sum().backward()  # no auxiliary loss in this backward
    assert m.router.weight.grad is not None and m.router.weight.grad.abs().sum() > 0


def test_a_trained_moe_model_can_be_deep_copied() -> None:
    """Copies (the capacity probe, LwF's previous model) must work right after a forward
    whose auxiliary losses still hold their graph."""
    import copy

    m = _model(experts=(3, 3))
    m.train()
    m(_ids())
    assert m.layers[0].ffn.aux_loss is not None and m.layers[0].ffn.aux_loss.requires_grad
    c = copy.deepcopy(m)
    assert c.layers[0].ffn.aux_loss is None and m.layers[0].ffn.aux_loss is not None
    assert torch.equal(c.eval()(_ids()), m.eval()(_ids()))


def test_checkpoint_of_a_grown_moe_rebuilds_it(tmp_path: Any) -> None:
    """save_checkpoint / load_checkpoint after upcycling and add_expert: the config (experts
    per layer, gate, k) rebuilds the grown model; weights and Adam state load by name."""
    from selfgrow.checkpoint import load_checkpoint, save_checkpoint

    m = GrowableTransformer(tiny_config())
    x = _ids()
    opt = _adam(m, x)
    grow_(m, make_config("moe_upcycle", n_experts=3, layers=(1,), gate="dynamic_k"),
          optimizer=opt)
    grow_(m, make_config("add_expert", layer=1, source=2), optimizer=opt)
    opt.zero_grad()
    m.train()
    (m(x).pow(2).mean() + m.moe_loss()).backward()
    opt.step()
    save_checkpoint(tmp_path / "ck.pt", m, opt)
    ck = load_checkpoint(tmp_path / "ck.pt")
    assert ck.model.config.moe_experts == (0, 4) and ck.model.config.moe_gate == "dynamic_k"
    m.eval()
    ck.model.eval()
    assert torch.equal(ck.model(x), m(x))
    w = dict(ck.model.named_parameters())["layers.1.ffn.w_up"]
    assert torch.equal(ck.optimizer.state[w]["exp_avg"], opt.state[m.layers[1].ffn.w_up]["exp_avg"])


# ------------------------------------------------------------------------------ trial findings
@pytest.mark.parametrize("gate", GATES)
def test_an_empty_batch_gives_zero_losses_and_counts_nothing(gate: str) -> None:
    m = _layer(gate)
    y = m(torch.zeros(0, 8, dtype=torch.float64))
    assert y.shape == (0, 8)
    assert float(m.loss()) == 0.0 and m.routing_stats()["tokens"] == 0
    model = GrowableTransformer(tiny_config(moe_experts=(2, 2), moe_gate=gate))
    model(torch.zeros(2, 0, dtype=torch.long))
    assert torch.isfinite(model.moe_loss())


@pytest.mark.parametrize("gate", GATES)
def test_non_finite_inputs_reach_the_output_for_every_gate(gate: str) -> None:
    m = _layer(gate).eval()
    x = _x(4)
    x[1, 3] = float("nan")
    y = m(x)
    assert y[1].isnan().all() and torch.isfinite(y[[0, 2, 3]]).all()


def test_growth_probe_forwards_are_not_counted_in_routing_stats() -> None:
    m = _model(experts=(3, 3))
    x = _ids()
    m(x)  # 30 tokens
    grow_(m, make_config("add_expert", layer=0, source=1), probe=x)
    assert m.layers[0].ffn.routing_stats(reset=False)["tokens"] == 0  # restarted, no probe
    assert m.layers[1].ffn.routing_stats(reset=False)["tokens"] == 30  # probe passes: not counted


def test_grow_top_k_dynamic_new_k_values_start_least_likely() -> None:
    m = _model("dynamic_k", experts=(4, 4))
    x = _ids()
    m(x)
    hist0 = m.layers[0].ffn.routing_stats()["k_hist"].clone()
    grow_(m, make_config("grow_top_k", new_k=4))
    m(x)
    hist = m.layers[0].ffn.routing_stats()["k_hist"]
    assert int(hist[3:].sum()) == 0 and torch.equal(hist[:3], hist0[:3])


@pytest.mark.parametrize(("kw", "msg"), [
    (dict(init_std=-1.0), "init_std=-1.0"),
    (dict(init_std=float("nan")), "init_std=nan"),
    (dict(aux_weight=True), "aux_weight=True"),
])
def test_layer_refuses_bad_numbers(kw: dict[str, Any], msg: str) -> None:
    with pytest.raises(GrowthConfigError, match=msg):
        MoEFFN(8, 12, 4, **kw)


def test_train_router_and_merging_refuse_bad_input() -> None:
    from selfgrow.data.text import LMBatches
    from selfgrow.ops.experts import grow_by_merging, train_router_

    m = _model(experts=(2, 2))
    data = LMBatches(torch.randint(0, 64, (500,)), seed=0)
    for kw, msg in ((dict(batch_size=0), "batch_size=0"), (dict(seq_len=2.5), "seq_len=2.5"),
                    (dict(lr=True), "lr=True"), (dict(steps=0), "steps=0")):
        with pytest.raises(GrowthConfigError, match=msg):
            train_router_(m, data, **kw)
    base = _dense(0)
    with pytest.raises(IncompatibleModelError, match="float32 on cpu, base is torch.float64"):
        grow_by_merging(base, [base, _dense(1).float()])


def test_dense_config_validates_its_moe_fields() -> None:
    with pytest.raises(GrowthConfigError, match="moe_.*top_k=-3"):
        tiny_config(moe_top_k=-3)
    with pytest.raises(GrowthConfigError, match="moe_.*capacity_factor=-5"):
        tiny_config(moe_capacity_factor=-5)
