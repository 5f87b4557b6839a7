"""Growth that survives torch.compile, mixed precision and gradient checkpointing (issue 13,
part 4).

* torch.compile: ``grow_`` / ``estimate_growth`` / ``GrowthController`` accept a compiled
  wrapper, grow its real module in place, and leave no stale graph: the wrapper's next call
  equals the eager grown module and recompiles (negative controls: a stale graph IS wrong
  when module guards are skipped, and growths without the reset exhaust dynamo's
  recompile limit). Backends: ``eager`` / ``aot_eager`` through dynamo's compile counters
  (fast); one inductor run is marked slow.
* Mixed precision: every exact operator x model family keeps the documented bound of its
  compute dtype (fp32, fp16, bf16 parameters; fp32 under bf16 autocast), parameters keep
  their dtype, and a bound must fail for a non-exact growth.
* Gradient checkpointing: HF GPT-2 / LLaMA with ``gradient_checkpointing_enable()`` grow in
  depth and width, every block (new ones included) still checkpoints, and the gradients
  equal a non-checkpointed twin's.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from _families import FAMILIES, HAS_HF, make_input, randomize_, run
from torch import nn

import selfgrow.ops._registry as registry
from selfgrow import GrowthController
from selfgrow.core import autocast_disabled, compute_dtype, is_compiled, unwrap_compiled
from selfgrow.errors import GrowthConfigError, IncompatibleModelError
from selfgrow.ops import (
    PRESERVATION_TOLERANCE,
    estimate_growth,
    get_operator,
    grow_,
    make_config,
    meta_twin,
    preservation_tolerance,
)
from selfgrow.ops import Transaction as Tx

_spec = importlib.util.spec_from_file_location(
    "selfgrow_precision_bench", Path(__file__).resolve().parents[1] / "benchmarks/precision.py")
precision = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
sys.modules[_spec.name] = precision  # type: ignore[union-attr]
_spec.loader.exec_module(precision)  # type: ignore[union-attr]

needs_hf = pytest.mark.skipif(not HAS_HF, reason="transformers not installed")


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model(family: str = "sg-preln", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_(FAMILIES[family](), seed=seed).eval()


# =========================================================================== torch.compile
def test_unwrap_compiled_returns_the_real_module() -> None:
    m = _model()
    c = torch.compile(m, backend="eager")
    assert is_compiled(c) and not is_compiled(m)
    assert unwrap_compiled(c) is m and unwrap_compiled(m) is m
    assert [id(p) for p in c.parameters()] == [id(p) for p in m.parameters()]
    with pytest.raises(IncompatibleModelError, match="got function"):
        unwrap_compiled(torch.compile(lambda x: x, backend="eager"))  # type: ignore[arg-type]


COMPILE_CASES = [("sg-preln", "identity_insert", dict(positions=(1,))),
                 ("sg-preln", "widen_d_model", {}),
                 ("sg-preln", "ffn_net2wider", dict(new_d_ff=21, seed=1)),
                 pytest.param("hf-llama", "identity_insert", dict(positions=(1,)),
                              marks=pytest.mark.skipif(not HAS_HF, reason="no transformers"))]


@pytest.mark.parametrize("family,op,kw", COMPILE_CASES)
def test_grow_compiled_model_matches_eager_and_recompiles(family: str, op: str, kw: dict
                                                          ) -> None:
    m = _model(family)
    x = make_input(m)
    cnt = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    cm = torch.compile(m, backend=cnt)
    opt = torch.optim.Adam(cm.parameters(), lr=1e-3)  # the wrapper's params: m's, same objects
    cm.train()
    run(cm, x).float().pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
    cm.eval()
    with torch.no_grad():
        y0 = run(cm, x)
    n0 = cnt.frame_count
    ev = grow_(cm, make_config(op, **kw), optimizer=opt, probe=x)
    assert ev.preservation["exact_expected"] and ev.preservation["within_tolerance"]
    assert ev.params_after > ev.params_before
    held = [p for g in opt.param_groups for p in g["params"]]
    assert {id(p) for p in held} == {id(p) for p in m.parameters()}
    assert {id(p) for p in cm.parameters()} == {id(p) for p in m.parameters()}
    with torch.no_grad():
        y_eager, y_comp = run(m, x), run(cm, x)
    assert cnt.frame_count == n0 + 1  # the wrapper traced the grown module afresh
    assert torch.allclose(y_comp, y_eager, rtol=0, atol=1e-6)
    c0 = y0.shape[-1]
    assert torch.allclose(y_comp[..., :c0], y0, rtol=1e-5, atol=1e-5)
    cm.train()  # training through the wrapper after growth: finite gradients on every tensor
    run(cm, x).float().pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters()
               if p.requires_grad and p.dim() > 0)
    opt.step()


def _skip_module_guards(backend: Any) -> nn.Module:
    # a compile whose guards skip nn.Module attributes (a documented speed option): dynamo
    # itself cannot notice a growth then
    return torch._dynamo.optimize(
        backend, guard_filter_fn=torch.compiler.skip_guard_on_all_nn_modules_unsafe)


def test_stale_compiled_graph_is_wrong_without_the_reset(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """Negative control: with module guards skipped, a growth that does not drop the compiled
    code leaves the OLD graph running (the inserted block is read in place of the old second
    block: a wrong output); ``grow_``'s reset makes the same wrapper right."""
    cfg = make_config("identity_insert", positions=(1,))
    m = _model()
    x = make_input(m)
    cm = _skip_module_guards(torch._dynamo.testing.CompileCounter())(m)
    with torch.no_grad():
        y0 = run(cm, x)
        monkeypatch.setattr(registry, "reset_compiled", lambda model: 0)
        grow_(cm, cfg)
        stale = run(cm, x)
    assert torch.equal(run(m, x), y0)  # the growth itself is exact (eager)
    assert not torch.allclose(stale, y0, atol=1e-3)  # ... but the stale graph is wrong

    monkeypatch.undo()
    torch._dynamo.reset()
    m = _model()
    cnt = torch._dynamo.testing.CompileCounter()
    cm = _skip_module_guards(cnt)(m)
    with torch.no_grad():
        y0 = run(cm, x)
        grow_(cm, cfg)
        assert torch.allclose(run(cm, x), run(m, x), rtol=0, atol=1e-6)
    assert torch.equal(run(m, x), y0) and cnt.frame_count == 2


def test_growths_do_not_exhaust_the_recompile_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every growth traces the grown model afresh; without the reset each growth adds a cache
    entry for the old shapes and, past ``recompile_limit``, dynamo silently runs eagerly."""

    def grow_four(disable_reset: bool) -> int:
        torch._dynamo.reset()
        if disable_reset:
            monkeypatch.setattr(registry, "reset_compiled", lambda model: 0)
        m = _model()
        x = make_input(m)
        cnt = torch._dynamo.testing.CompileCounter()
        cm = torch.compile(m, backend=cnt)
        with torch._dynamo.config.patch(recompile_limit=2), torch.no_grad():
            run(cm, x)
            for i in range(4):
                grow_(m, make_config("ffn_net2wider", new_d_ff=16 + 2 * (i + 1)))
                assert torch.allclose(run(cm, x), run(m, x), rtol=0, atol=1e-6)
        monkeypatch.undo()
        return cnt.frame_count

    assert grow_four(disable_reset=False) == 5  # the first trace + one per growth
    assert grow_four(disable_reset=True) < 5  # negative control: compilation gave up


def test_estimate_growth_and_meta_twin_accept_a_compiled_model() -> None:
    m = _model()
    cm = torch.compile(m, backend="eager")
    cfg = make_config("widen_d_model")
    assert estimate_growth(cm, cfg) == estimate_growth(m, cfg)
    twin = meta_twin(cm)
    assert not is_compiled(twin) and all(p.is_meta for p in twin.parameters())


def test_controller_grows_the_real_module_and_keeps_the_compiled_wrapper() -> None:
    m = _model()
    x = make_input(m)
    cm = torch.compile(m, backend="aot_eager")
    opt = torch.optim.AdamW(cm.parameters(), lr=1e-3)
    ctrl = GrowthController(cm, opt, probe=x[0])
    assert ctrl.model is m and ctrl.wrapped_model is cm
    for _ in range(2):  # the training loop calls the wrapper
        loss = run(ctrl.wrapped_model, x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        ctrl.observe(loss=loss)
    ev = ctrl.grow("deepen")
    assert ev.kind == "growth" and ev.preservation["within_tolerance"]
    assert ctrl.model is m and ctrl.wrapped_model is cm and m.config.n_layers == 3
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {
        id(p) for p in m.parameters()}
    with torch.no_grad():
        assert torch.allclose(run(ctrl.wrapped_model, x), run(m, x), rtol=0, atol=1e-6)
    other = _model(seed=1)  # a reassigned model is not run through the old wrapper
    ctrl.model = other
    assert ctrl.wrapped_model is other


@pytest.mark.slow
def test_grow_under_inductor() -> None:
    """The real compiler (inductor, needs a C compiler): a grown model's compiled output
    equals the eager one."""
    m = _model()
    x = make_input(m)
    cm = torch.compile(m)
    with torch.no_grad():
        run(cm, x)
        grow_(cm, make_config("widen_d_model"))
        assert torch.allclose(run(cm, x), run(m, x), rtol=1e-5, atol=1e-5)


# ========================================================================= mixed precision
def test_preservation_tolerance_is_dtype_aware() -> None:
    assert preservation_tolerance(torch.float32) == 1e-5
    assert preservation_tolerance(torch.float16) == PRESERVATION_TOLERANCE[torch.float16]
    assert (preservation_tolerance(torch.float64) < preservation_tolerance(torch.float32)
            < preservation_tolerance(torch.float16) < preservation_tolerance(torch.bfloat16))
    with pytest.raises(GrowthConfigError, match=r"torch.int64.*float32"):
        preservation_tolerance(torch.int64)
    m = _model()
    assert compute_dtype(m) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(m) == torch.bfloat16
        with autocast_disabled(m):
            assert compute_dtype(m) == torch.float32
    assert compute_dtype(m.to(torch.float16)) == torch.float16


@pytest.mark.parametrize("mode", list(precision.MODES))
def test_exact_operators_keep_the_documented_bound_of_their_dtype(mode: str) -> None:
    """Registry-generated: every exact operator x every model family that accepts it (the
    sweep of benchmarks/precision.py, one seed) stays within the bound of its compute dtype,
    grow_ records that bound, and growth leaves the parameters' dtype alone."""
    rows, not_measured, _ = precision.run_all([mode], seeds=[0])
    assert not_measured == ["component"]  # wraps another operator (multimodal components)
    assert {r["op"] for r in rows} == set(precision.exact_growth_operators()) - {"component"}
    pdtype, ac = precision.MODES[mode]
    bound = preservation_tolerance(ac or pdtype)
    worst = max(rows, key=lambda r: r["max_rel"])
    assert worst["max_rel"] <= bound, worst
    assert all(r["param_dtypes"] == [str(pdtype)] for r in rows)
    print(f"[precision] {mode}: {len(rows)} growths, max rel error {worst['max_rel']:.2e} "
          f"({worst['op']} on {worst['model']}), bound {bound:.0e}")


def test_fp32_tolerance_would_wrongly_flag_exact_bf16_growth() -> None:
    """Why the bound is per dtype: an exact growth of a bf16 model is far above fp32's
    1e-5 (round-off of bf16, not a growth error), yet within bf16's bound."""
    r = precision.measure("widen_d_model_masked", "sg-preln", "bf16")
    assert r is not None and r["exact_expected"]
    assert r["max_rel"] > PRESERVATION_TOLERANCE[torch.float32]
    assert r["max_rel"] <= preservation_tolerance(torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_bound_fails_for_a_non_exact_growth(dtype: torch.dtype) -> None:
    """Negative control: G_stack (not exact) on the same model breaks the bound, and grow_
    says so (``within_tolerance`` False)."""
    m = _model().to(dtype)
    x = make_input(m)
    ev = grow_(m, make_config("g_stack"), probe=x)
    assert not ev.preservation["exact_expected"]
    assert ev.preservation["dtype"] == str(dtype).removeprefix("torch.")
    assert ev.preservation["max_rel"] > preservation_tolerance(dtype)
    assert ev.preservation["within_tolerance"] is False


def test_ligo_under_autocast_keeps_fp32_weights() -> None:
    """grow_ does its weight arithmetic with autocast off: LiGO's products under bf16
    autocast would mix dtypes (negative control: the bare operator fails there)."""
    cfg = make_config("ligo", depth_factor=2, width_factor=2)
    m = _model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError, match="dtype"), Tx() as tx:
            get_operator(cfg).apply(copy.deepcopy(m), cfg, tx)
        ev = grow_(m, cfg, probe=make_input(m))
    assert {p.dtype for p in m.parameters()} == {torch.float32}
    assert ev.preservation["dtype"] == "bfloat16" and m.config.n_layers == 4


def test_model_trained_under_autocast_grows_with_its_optimizer() -> None:
    m = _model()
    x = make_input(m)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)

    def step() -> float:
        m.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = run(m, x).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return float(loss.detach())

    for _ in range(3):
        step()
    m.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ev = grow_(m, make_config("compound_grow", steps=[
            make_config("widen_d_model"), make_config("function_preserving_stack")]),
            optimizer=opt, probe=x)
    assert ev.preservation["exact_expected"] and ev.preservation["within_tolerance"]
    assert ev.preservation["tolerance"] == preservation_tolerance(torch.bfloat16)
    migrated = [p for p in m.parameters() if "exp_avg" in opt.state[p]]  # new tensors: fresh
    assert migrated
    for p in m.parameters():
        assert p.dtype == torch.float32
    for p in migrated:
        st = opt.state[p]
        assert st["exp_avg"].dtype == torch.float32 and st["exp_avg"].shape == p.shape
    assert all(torch.isfinite(torch.tensor(step())) for _ in range(2))


def test_moe_layer_runs_under_autocast() -> None:
    """MoE dispatch accumulates in the experts' dtype (it raised a dtype mismatch under
    autocast); upcycling a model trained under autocast stays within bf16's bound."""
    r = precision.measure("moe_upcycle", "sg-preln", "autocast-bf16")
    assert r is not None and r["max_rel"] <= preservation_tolerance(torch.bfloat16)
    m = _model()
    grow_(m, make_config("moe_upcycle", n_experts=2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = run(m.train(), make_input(m))
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_model_grows_with_adam(dtype: torch.dtype) -> None:
    m = _model().to(dtype)
    x = make_input(m)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3, eps=1e-4)
    m.train()
    run(m, x).float().pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
    m.eval()
    ev = grow_(m, make_config("widen_d_model"), optimizer=opt, probe=x)
    assert ev.preservation["within_tolerance"], ev.preservation
    for p in m.parameters():
        assert p.dtype == dtype
        st = opt.state[p]
        assert "exp_avg_sq" not in st or st["exp_avg_sq"].dtype == dtype
    m.train()
    run(m, x).float().pow(2).mean().backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in m.parameters())


# ================================================================ gradient checkpointing
def _count_checkpointed(model: nn.Module) -> dict[int, int]:
    """Wrap every block's checkpoint function with a call counter (block index -> calls)."""
    calls: dict[int, int] = {}
    for i, block in enumerate(_blocks(model)):
        fn = block._gradient_checkpointing_func
        calls[i] = 0

        def counting(*a: Any, _fn: Any = fn, _i: int = i, **k: Any) -> Any:
            calls[_i] += 1
            return _fn(*a, **k)

        block._gradient_checkpointing_func = counting
    return calls


def _checkpointing(model: nn.Module, on: bool) -> None:
    """HF's switch (``activation_checkpointing_*`` since transformers 5.x, formerly
    ``gradient_checkpointing_*``), non-reentrant."""
    name = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    if on:
        getattr(model, f"{name}_checkpointing_enable")(
            **{f"{name}_checkpointing_kwargs": {"use_reentrant": False}})
    else:
        getattr(model, f"{name}_checkpointing_disable")()


def _is_checkpointing(model: nn.Module) -> bool:
    return bool(getattr(model, "is_activation_checkpointing", None)
                if hasattr(model, "activation_checkpointing_enable")
                else model.is_gradient_checkpointing)


def _blocks(model: nn.Module) -> nn.ModuleList:
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


GC_CASES = [("identity_insert", dict(positions=(0, 2))), ("g_stack", {}),
            ("widen_d_model", {}), ("ffn_net2wider", dict(new_d_ff=40, seed=1))]


@needs_hf
@pytest.mark.parametrize("family", ["hf-gpt2", "hf-llama"])
@pytest.mark.parametrize("op,kw", GC_CASES, ids=[c[0] for c in GC_CASES])
def test_gradient_checkpointing_survives_growth(family: str, op: str, kw: dict) -> None:
    m = _model(family)
    m.config.use_cache = False
    _checkpointing(m, True)
    m.train()
    (x,) = make_input(m)
    n0 = len(_blocks(m))
    grow_(m, make_config(op, **kw))
    assert _is_checkpointing(m)
    assert len(_blocks(m)) >= n0
    assert all(b.gradient_checkpointing for b in _blocks(m))  # new blocks checkpoint too
    twin = copy.deepcopy(m)
    _checkpointing(twin, False)
    assert not _is_checkpointing(twin)
    calls = _count_checkpointed(m)
    m(x, labels=x).loss.backward()
    assert all(n == 1 for n in calls.values()), calls  # every block ran under checkpoint
    twin(x, labels=x).loss.backward()
    for (name, p), q in zip(m.named_parameters(), twin.parameters(), strict=True):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert torch.allclose(p.grad, q.grad, rtol=1e-6, atol=1e-7), name


@needs_hf
def test_checkpoint_counter_sees_a_block_that_does_not_checkpoint() -> None:
    """Negative control for the counter above: a block with checkpointing off is not
    counted."""
    m = _model("hf-gpt2")
    m.config.use_cache = False
    _checkpointing(m, True)
    m.train()
    grow_(m, make_config("identity_insert", positions=(1,)))
    _blocks(m)[1].gradient_checkpointing = False
    calls = _count_checkpointed(m)
    (x,) = make_input(m)
    m(x, labels=x).loss.backward()
    assert calls[1] == 0 and calls[0] == calls[2] == 1
