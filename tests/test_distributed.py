"""DDP growth: 2 processes (gloo, CPU), 3 growths; every rank ends bit-identical with the same
event log; a resumed DDP run matches; divergent growth is detected."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import _ddp_worker
import pytest
import torch
import torch.distributed as dist
from _growth_helpers import spawn_ranks

from selfgrow.events import read_events

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
WORLD = 2




def _spawn(out: Path, **kw: Any) -> list[dict[str, Any]]:
    out.mkdir(parents=True, exist_ok=True)
    spawn_ranks(_ddp_worker.run, lambda port: (WORLD, port, str(out), kw.get("sync_rng", True),
                                               kw.get("resume_at"), kw.get("explode_at")),
                WORLD, out)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("ddp")
    return out, _spawn(out)


def _same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ranks_grow_identically_and_log_the_same_events(plain):
    out, res = plain
    r0, r1 = res
    assert _same_params(r0["params"], r1["params"])  # bitwise across ranks
    assert r0["fingerprints"] == r1["fingerprints"] and len(r0["fingerprints"]) == 3
    assert [e["step"] for e in r0["events"]] == list(_ddp_worker.GROWTH_STEPS)
    assert r0["events"] == r1["events"]
    # signals saw the loss averaged over ranks (rank-local losses differ): identical states
    assert r0["signals"] == r1["signals"] and r0["signals"]["loss_plateau"]
    assert r0["reduced"]["a"] == 0.5 and torch.equal(r0["reduced"]["t"], torch.tensor([0.5, 1.0]))
    assert r0["reduced"]["n"] is None and r0["reduced"]["s"] == "x"
    assert (r0["reduced"]["i"], r1["reduced"]["i"]) == (0, 1)  # ints are ids, not averaged
    assert all(e["kind"] == "growth" and e["run_id"] == "ddp-test" for e in r0["events"])
    assert r0["params"]["layers.1.weight"].shape == (20, 17)  # widened, deepened, widened
    # optimizer holds the module's parameters; DDP re-wrapped around the grown module
    assert r0["optimizer_params"] == r0["n_params"] and r0["ddp_module_is_model"]
    # only rank 0 wrote events.jsonl, with the same events
    evs, bad = read_events(out / "events.jsonl")
    assert not bad
    on_disk = [{k: v for k, v in e.to_dict().items() if k not in _ddp_worker.VOLATILE}
               for e in evs]
    assert on_disk == r0["events"]
    assert not (out / "rank1").exists()


@pytest.mark.slow
def test_checkpoint_resume_under_ddp_matches_uninterrupted_run(tmp_path, plain):
    _, ref = plain
    res = _spawn(tmp_path / "resumed", resume_at=8)  # between growth 1 and growth 2
    assert _same_params(res[0]["params"], res[1]["params"])
    assert _same_params(res[0]["params"], ref[0]["params"])
    assert res[0]["fingerprints"] == ref[0]["fingerprints"]
    evs, bad = read_events(tmp_path / "resumed" / "events.jsonl")
    assert not bad and [e.seq for e in evs] == [0, 1, 2]


def test_negative_control_unsynchronised_growth_rng_is_detected(tmp_path):
    with pytest.raises(Exception, match="ranks disagree after growth"):
        _spawn(tmp_path / "nosync", sync_rng=False)


@pytest.mark.slow
def test_policy_error_on_rank_zero_raises_on_every_rank_instead_of_hanging(tmp_path):
    with pytest.raises(Exception, match="policy exploded|policy failed on rank 0"):
        _spawn(tmp_path / "explode", explode_at=3)


def test_fingerprint_handles_zero_dim_buffers():
    from selfgrow.control.distributed import model_fingerprint
    from selfgrow.models.transformer import GrowableTransformer, TransformerConfig

    bn = torch.nn.BatchNorm1d(3)  # num_batches_tracked is 0-dim
    a = model_fingerprint(bn)
    bn.num_batches_tracked += 1
    assert model_fingerprint(bn) != a
    assert len(model_fingerprint(GrowableTransformer(TransformerConfig()))) == 64


def test_the_one_controller_takes_a_strategy():
    from selfgrow.control import GrowthController, GrowthStrategy
    from selfgrow.errors import GrowthConfigError, SelfgrowError
    from selfgrow.models import build_model
    from selfgrow.models.mlp import MLPConfig

    model = build_model(MLPConfig(in_features=4, hidden=(3,), n_classes=2))
    ctrl = GrowthController(model, None, measure_flops=False)
    assert type(ctrl.distributed) is GrowthStrategy and ctrl.wrapped_model is model
    assert ctrl.state_dict()["distributed"] == {}
    with pytest.raises(GrowthConfigError, match="GrowthStrategy"):
        GrowthController(model, None, distributed="ddp")
    if not dist.is_initialized():
        from selfgrow.control import DDPStrategy

        with pytest.raises(SelfgrowError, match="not initialised"):
            DDPStrategy()
