"""DDP: every rank applies rank 0's decision, even when the policy would decide differently
per rank; compared per rank BEFORE the DDP re-wrap could copy rank 0's parameters over."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import _ddp_decision_worker as w
import pytest
import torch
import torch.distributed as dist
from _growth_helpers import spawn_ranks

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
WORLD = 2


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out: Path = tmp_path_factory.mktemp("ddp-decide")
    spawn_ranks(w.run, lambda port: (WORLD, port, str(out)), WORLD, out)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_every_rank_applies_rank_zeros_decision(ranks):
    r0, r1 = ranks
    # the initial wrap plus one re-wrap per growth, on every rank
    assert len(r0["handed_to_ddp"]) == len(r1["handed_to_ddp"]) == 1 + len(w.GROW_AT)
    for k, (a, b) in enumerate(zip(r0["handed_to_ddp"], r1["handed_to_ddp"], strict=True)):
        assert a["hidden"] == b["hidden"] and a["shapes"] == b["shapes"], k
        # the grown module as each rank built it, before DDP broadcast rank 0's values
        assert a["fingerprint"] == b["fingerprint"], f"ranks grew differently (wrap {k})"
    assert r0["steps"] == r1["steps"] == list(w.GROW_AT)
    assert r0["actions"] == r1["actions"]
    assert all(a["config"]["data"]["units"] == list(w.UNITS[0]) for a in r1["actions"])


def test_the_policy_runs_on_rank_zero_only(ranks):
    r0, r1 = ranks
    assert r0["calls_on_rank"] == {0: w.STEPS}
    assert r1["calls_on_rank"] == {}


def test_negative_control_rank_local_decisions_differ():
    """The check has teeth: what each rank's policy would choose grows different models."""
    from _growth_helpers import _TinyNet, _TinyNetConfig

    from selfgrow.control.distributed import model_fingerprint
    from selfgrow.ops import grow_

    prints = []
    for rank in (0, 1):
        torch.manual_seed(0)
        m = _TinyNet(_TinyNetConfig(hidden=(12,)))
        grow_(m, w._SplitUnitsConfig(layer=0, units=w.UNITS[rank]))
        prints.append(model_fingerprint(m))
    assert prints[0] != prints[1]
