"""Growth under FSDP2 (2 processes, gloo, CPU): a sharded GrowableTransformer grows three times
(deepen, widen_ffn, widen) mid-run; after each growth the gathered parameters, gradients and
AdamW state equal, bit for bit, those of the same growth done on one process; training goes on
sharded; a failed growth leaves everything as it was."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import _fsdp_worker as W
import pytest
import torch
import torch.distributed as dist
from _growth_helpers import spawn_ranks

from selfgrow.control import GrowthController
from selfgrow.errors import GrowthConfigError

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
WORLD = 2


def _spawn(out: Path, fail_at: int | None = None) -> list[dict[str, Any]]:
    out.mkdir(parents=True, exist_ok=True)
    spawn_ranks(W.run, lambda port: (WORLD, port, str(out), fail_at), WORLD, out)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return _spawn(tmp_path_factory.mktemp("fsdp"))


def _equal(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: max |diff| {(a.double() - b.double()).abs().max()}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: {sorted(a)} != {sorted(b)}"
        for k in a:
            _equal(a[k], b[k], f"{where}.{k}")
    else:
        assert a == b, where


def _load(model: torch.nn.Module, opt: torch.optim.Optimizer, snap: dict[str, Any]) -> None:
    """Put a gathered snapshot into a plain model and optimizer of the same architecture."""
    named = dict(model.named_parameters())
    assert {n: tuple(p.shape) for n, p in named.items()} == {
        n: tuple(t.shape) for n, t in snap["params"].items()}
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(snap["params"][n])
            p.grad = snap["grads"][n].clone() if n in snap["grads"] else None
    assert [[n for n, q in named.items() if any(q is r for r in g["params"])]
            for g in opt.param_groups] == snap["groups"]
    opt.state.clear()
    for n, st in snap["state"].items():
        opt.state[named[n]] = {k: v.clone() if isinstance(v, torch.Tensor) else v
                               for k, v in st.items()}


def test_growth_under_fsdp2_equals_the_same_growth_on_one_process(runs):
    r0, r1 = runs
    _equal(r0["final"], r1["final"], "rank0 vs rank1")  # the ranks' gathered model agrees
    assert [e[:2] for e in r0["events"]] == [(s, a) for s, a, _ in W.GROWTHS]
    ref = W.build()
    opt = W.make_optimizer(ref)
    for step, action, kw in W.GROWTHS:
        _load(ref, opt, r0["before"][step])
        if action == "widen_ffn":  # negative control: another growth seed gives other noise
            twin, twin_opt = copy.deepcopy((ref, opt))
            torch.manual_seed(r0["seeds"][step] + 1)
            GrowthController(twin, twin_opt).grow(action, **kw)
            with pytest.raises(AssertionError):
                _equal(W.full_state(twin, twin_opt), r0["after"][step])
        ctrl = GrowthController(ref, opt)
        torch.manual_seed(r0["seeds"][step])
        ctrl.grow(action, **kw)
        ctrl.close()
        got = W.full_state(ref, opt)
        _equal(got, r0["after"][step], f"growth {action} at step {step}")
    # the growths did something: deeper, wider FFN, wider d_model
    assert r0["events"][-1][2] > r0["events"][0][2]
    assert "layers.2.ffn.up.weight" in r0["final"]["params"]


def test_training_goes_on_sharded_after_each_growth(runs):
    r0, r1 = runs
    assert all(r0["sharded"]) and len(r0["sharded"]) == W.STEPS  # DTensor params throughout
    assert r0["opt_is_same"]  # the optimizer object was re-keyed in place
    assert all(torch.isfinite(torch.tensor(r0["losses"])))
    assert r0["local_numel"] < r0["numel"]  # each rank holds a shard of the grown model
    assert r0["local_numel"] + r1["local_numel"] == r0["numel"]
    # the first steps after growth moved the new parameters (lazily initialised Adam state)
    last = max(s for s, _, _ in W.GROWTHS)
    moved = [n for n, t in r0["final"]["params"].items()
             if not torch.equal(t, r0["after"][last]["params"][n])]
    assert "layers.2.ffn.up.weight" in moved


def test_failed_growth_under_fsdp2_changes_nothing(tmp_path):
    r0, r1 = _spawn(tmp_path, fail_at=3)
    assert r0["failed_n"] == 0
    _equal(r0["failed"], r0["before"][3], "after the failed growth")
    _equal(r1["failed"], r1["before"][3], "after the failed growth (rank 1)")


def test_fsdp2_strategy_refuses_bad_arguments():
    from selfgrow.control import FSDP2Strategy
    from selfgrow.errors import SelfgrowError

    with pytest.raises(SelfgrowError, match="not initialised"):
        FSDP2Strategy()
    with pytest.raises(GrowthConfigError, match="shard_modules"):
        FSDP2Strategy(shard_modules=3)  # type: ignore[arg-type]


def test_fsdp2_strategy_refuses_a_sharded_model_and_a_foreign_optimizer(tmp_path):
    spawn_ranks(W.refusals, lambda port: (port, str(tmp_path)), 1, tmp_path)
    msgs = torch.load(tmp_path / "refusals.pt")
    assert "already sharded" in msgs["sharded"] and "plain module" in msgs["sharded"]
    assert "not parameters of the model" in msgs["foreign"]
    assert "FSDP2Strategy(mesh=...)" in msgs["mesh_kw"]
