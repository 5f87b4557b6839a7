"""selfgrow.checkpoint: grown shape rebuilt from config, optimizer by name, scheduler, RNG,
atomic writes, event-log cursor and rewind."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _growth_helpers import _DeepenConfig, _TinyNet, _TinyNetConfig, _WidenConfig, batch
from torch import nn

from selfgrow.checkpoint import (
    CheckpointError,
    EventCursor,
    get_rng_state,
    load_checkpoint,
    rewind_events,
    save_checkpoint,
    set_rng_state,
)
from selfgrow.errors import IncompatibleModelError
from selfgrow.events import GrowthEvent, JsonlSink, read_events
from selfgrow.models import model_config_dict
from selfgrow.models.cnn import CNNConfig
from selfgrow.models.mlp import MLPConfig
from selfgrow.ops import grow_


def _sched(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))


def _train(model: nn.Module, opt: torch.optim.Optimizer, sched: Any, steps: range) -> None:
    for s in steps:
        x, y = batch(0, s)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()


def _grown_run(opt_cls: type = torch.optim.AdamW, **kw: Any):
    torch.manual_seed(0)
    model = _TinyNet(_TinyNetConfig(hidden=(12, 10)))
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    rest = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    opt = opt_cls([{"params": decay}, {"params": rest, "lr": 3e-3}], lr=1e-2, **kw)
    sched = _sched(opt)
    _train(model, opt, sched, range(5))
    grow_(model, _WidenConfig(layer=0, add=5), optimizer=opt)
    grow_(model, _DeepenConfig(after=0), optimizer=opt)
    _train(model, opt, sched, range(5, 9))
    return model, opt, sched


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _opt_by_name(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, dict[str, Any]]:
    return {n: opt.state[p] for n, p in model.named_parameters() if p in opt.state}


@pytest.mark.parametrize(
    ("opt_cls", "kw"),
    [(torch.optim.AdamW, {}), (torch.optim.SGD, {"momentum": 0.9}), (torch.optim.RMSprop, {})],
)
def test_round_trip_rebuilds_grown_model_and_continues_bitwise(tmp_path, opt_cls, kw):
    model, opt, sched = _grown_run(opt_cls, **kw)
    assert model.config.hidden == (17, 17, 10)
    save_checkpoint(tmp_path / "c.pt", model, opt, scheduler=sched, extra={"step": 8})

    assert load_checkpoint(tmp_path / "c.pt").scheduler_state == sched.state_dict()
    ck = load_checkpoint(tmp_path / "c.pt", scheduler_factory=_sched)
    assert ck.extra == {"step": 8}
    assert ck.model.config == model.config
    assert ck.model_config["data"]["hidden"] == [17, 17, 10]
    assert type(ck.optimizer) is opt_cls
    assert _equal(_params(model), _params(ck.model))
    # optimizer: same groups (by name), hyper-parameters and state
    names = {id(p): n for n, p in model.named_parameters()}
    names2 = {id(p): n for n, p in ck.model.named_parameters()}
    for g, g2 in zip(opt.param_groups, ck.optimizer.param_groups, strict=True):
        assert [names[id(p)] for p in g["params"]] == [names2[id(p)] for p in g2["params"]]
        assert {k: v for k, v in g.items() if k != "params"} == {
            k: v for k, v in g2.items() if k != "params"
        }
    s1, s2 = _opt_by_name(model, opt), _opt_by_name(ck.model, ck.optimizer)
    assert s1.keys() == s2.keys() and s1
    for n in s1:
        for k, v in s1[n].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(s2[n][k])), (n, k)
    assert ck.scheduler.state_dict() == sched.state_dict()
    # training on continues identically, bit for bit
    _train(model, opt, sched, range(9, 14))
    _train(ck.model, ck.optimizer, ck.scheduler, range(9, 14))
    assert _equal(_params(model), _params(ck.model))
    assert ck.optimizer.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_negative_control_fresh_model_of_initial_config_does_not_fit(tmp_path):
    model, opt, _ = _grown_run()
    save_checkpoint(tmp_path / "c.pt", model, opt)
    small = _TinyNet(_TinyNetConfig(hidden=(12, 10)))
    payload = torch.load(tmp_path / "c.pt", weights_only=True)
    with pytest.raises(RuntimeError):
        small.load_state_dict(payload["model"]["state"])


def test_optimizer_state_is_keyed_by_name_and_factory_order_does_not_matter(tmp_path):
    model, opt, _ = _grown_run()
    save_checkpoint(tmp_path / "c.pt", model, opt)
    payload = torch.load(tmp_path / "c.pt", weights_only=True)
    assert set(payload["optimizer"]["state"]) == {n for n, _ in model.named_parameters()}
    assert payload["optimizer"]["groups"][1]["names"] == [
        n for n, _ in model.named_parameters() if not n.endswith("weight")
    ]

    def factory(m: nn.Module) -> torch.optim.Optimizer:  # same groups, reversed order inside
        w = [p for n, p in m.named_parameters() if n.endswith("weight")][::-1]
        b = [p for n, p in m.named_parameters() if not n.endswith("weight")][::-1]
        return torch.optim.AdamW([{"params": w}, {"params": b}], lr=0.5)

    ck = load_checkpoint(tmp_path / "c.pt", optimizer_factory=factory)
    s1, s2 = _opt_by_name(model, opt), _opt_by_name(ck.model, ck.optimizer)
    for n in s1:
        assert torch.equal(s1[n]["exp_avg"], s2[n]["exp_avg"]), n
    assert ck.optimizer.param_groups[1]["lr"] == 3e-3  # hyper-parameters come from the file

    def bad_factory(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(m.parameters())

    with pytest.raises(CheckpointError, match="param groups"):
        load_checkpoint(tmp_path / "c.pt", optimizer_factory=bad_factory)


def test_named_param_groups_round_trip(tmp_path):
    torch.manual_seed(0)
    model = _TinyNet(_TinyNetConfig())
    opt = torch.optim.Adam(model.named_parameters(), lr=1e-3)
    _train(model, opt, None, range(2))
    grow_(model, _WidenConfig(layer=0, add=2), optimizer=opt)
    save_checkpoint(tmp_path / "c.pt", model, opt)
    ck = load_checkpoint(tmp_path / "c.pt")
    assert ck.optimizer.param_groups[0]["param_names"] == [n for n, _ in model.named_parameters()]


def test_save_rejects_unregistered_model_and_foreign_optimizer_params(tmp_path):
    lin = nn.Linear(2, 2)
    with pytest.raises(IncompatibleModelError, match="supported families"):
        save_checkpoint(tmp_path / "c.pt", lin, torch.optim.SGD(lin.parameters(), lr=0.1))
    model = _TinyNet(_TinyNetConfig())
    extra = nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([*model.parameters(), extra], lr=0.1)
    with pytest.raises(CheckpointError, match="not a parameter of the model"):
        save_checkpoint(tmp_path / "c.pt", model, opt)
    assert not any(tmp_path.iterdir())


def test_ddp_style_wrapper_is_unwrapped(tmp_path):
    model = _TinyNet(_TinyNetConfig())
    wrapped = nn.DataParallel(model)
    save_checkpoint(tmp_path / "c.pt", wrapped, torch.optim.SGD(model.parameters(), lr=0.1))
    ck = load_checkpoint(tmp_path / "c.pt")
    assert _equal(_params(model), _params(ck.model))


def test_atomic_write_keeps_previous_checkpoint_when_save_fails(tmp_path, monkeypatch):
    model, opt, _ = _grown_run()
    path = save_checkpoint(tmp_path / "c.pt", model, opt, extra={"v": 1})
    before = path.read_bytes()
    real_save = torch.save

    def torn_save(obj: Any, f: Any, *a: Any, **k: Any) -> None:
        f.write(b"PK\x03\x04 partial")  # a torn write, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, opt, extra={"v": 2})
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
    assert load_checkpoint(path).extra == {"v": 1}


def test_load_rejects_garbage_and_other_files(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"a": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a selfgrow checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_rng_state_round_trip():
    state = get_rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_load_restores_rng_unless_asked_not_to(tmp_path):
    model, opt, _ = _grown_run()
    torch.manual_seed(123)
    save_checkpoint(tmp_path / "c.pt", model, opt)
    expected = torch.rand(4)
    load_checkpoint(tmp_path / "c.pt")
    assert torch.equal(torch.rand(4), expected)
    load_checkpoint(tmp_path / "c.pt", restore_rng=False)
    assert not torch.equal(torch.rand(4), expected)


# --- event log cursor ---------------------------------------------------------------------
def _ev(seq: int) -> GrowthEvent:
    return GrowthEvent(run_id="r", seq=seq, step=seq * 10, reason=f"e{seq}")


class _FakeController:
    """Minimal controller: state_dict/load_state_dict and a JSONL log in ``log_dir``."""

    def __init__(self, log_dir: Path) -> None:
        self.sinks = [JsonlSink(log_dir / "events.jsonl")]
        self.seq = 0
        self.loaded: dict[str, Any] | None = None

    def emit(self) -> None:
        self.sinks[0].emit(_ev(self.seq))
        self.seq += 1

    def state_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "run_id": "r"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loaded = dict(state)
        self.seq = state["seq"]


def test_event_cursor_rewinds_events_logged_after_the_checkpoint(tmp_path):
    model, opt, _ = _grown_run()
    ctrl = _FakeController(tmp_path)
    for _ in range(3):
        ctrl.emit()
    save_checkpoint(tmp_path / "c.pt", model, opt, controller=ctrl)
    for _ in range(2):  # logged after the checkpoint, then the run is killed mid-line
        ctrl.emit()
    with open(tmp_path / "events.jsonl", "a") as fh:
        fh.write('{"kind": "growth", "seq": 5, "ru')
    ctrl.sinks[0].close()

    ck = load_checkpoint(tmp_path / "c.pt")
    assert ck.event_cursor is not None and ck.event_cursor.seq == 3 and ck.event_cursor.lines == 3
    ctrl2 = _FakeController(tmp_path)  # reopens the log in append mode, like a resumed run
    assert ck.restore_controller(ctrl2) == 3
    assert ctrl2.loaded == {"seq": 3, "run_id": "r"}
    evs, bad = read_events(tmp_path / "events.jsonl")
    assert [e.seq for e in evs] == [0, 1, 2] and not bad
    for _ in range(2):  # the resumed run re-emits them: each event exactly once
        ctrl2.emit()
    ctrl2.sinks[0].close()
    evs, bad = read_events(tmp_path / "events.jsonl")
    assert [e.seq for e in evs] == [0, 1, 2, 3, 4] and not bad


def test_rewind_refuses_a_log_that_does_not_match(tmp_path):
    log = tmp_path / "events.jsonl"
    log.write_text(json.dumps(_ev(0).to_dict()) + "\n")
    cur = EventCursor.of_file(log, seq=1)
    assert rewind_events(log, cur) == 0
    log.write_text(json.dumps(_ev(7).to_dict()) + "\n" + json.dumps(_ev(8).to_dict()) + "\n")
    before = log.read_bytes()
    with pytest.raises(CheckpointError, match="does not continue"):
        rewind_events(log, cur)
    assert log.read_bytes() == before
    log.write_text("")
    with pytest.raises(CheckpointError, match="does not continue"):
        rewind_events(log, cur)
    log.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        rewind_events(log, cur)
    assert rewind_events(log, EventCursor.of_file(log)) == 0


def test_restore_controller_requires_controller_state(tmp_path):
    model, opt, _ = _grown_run()
    save_checkpoint(tmp_path / "c.pt", model, opt)
    ck = load_checkpoint(tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="without a controller"):
        ck.restore_controller(_FakeController(tmp_path))


def test_unloadable_state_fails_at_save_time_not_at_resume(tmp_path):
    from collections import deque

    model, opt, _ = _grown_run()
    with pytest.raises(CheckpointError, match=r"extra\.hist is a deque"):
        save_checkpoint(tmp_path / "c.pt", model, opt, extra={"hist": deque([1.0])})
    assert not any(tmp_path.iterdir())


def _registered_models() -> list[str]:
    from selfgrow.models import list_models

    return [m for m in list_models() if not m.startswith("_")]


#: small configs for model families whose config has required fields
_EXAMPLES: dict[str, dict[str, Any]] = {
    "CNNConfig": {"in_channels": 1, "image_size": 8, "channels": (4, 6), "n_classes": 3,
                  "pool_after": (0,)},
    "MLPConfig": {"in_features": 6, "hidden": (5, 4), "n_classes": 3},
    "MultimodalConfig": {
        "image": CNNConfig(in_channels=1, image_size=8, channels=(4,), n_classes=3),
        "audio": CNNConfig(in_channels=2, image_size=8, channels=(4,), n_classes=3,
                           spatial_dims=1),
        "fusion": MLPConfig(in_features=6, hidden=(5,), n_classes=3)},
    "TransformerConfig": {"vocab_size": 32, "d_model": 16, "n_layers": 2, "n_heads": 2,
                          "d_ff": 32, "max_seq_len": 8},
}


def _grow_by_actions(model: nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """Apply every action of the model's family that works with default arguments."""
    from selfgrow.control.actions import list_actions, resolve_action
    from selfgrow.errors import SelfgrowError

    done = []
    for action in list_actions(model):
        try:
            grow_(model, resolve_action(action, model), optimizer=opt)
        except SelfgrowError:
            continue  # needs arguments (e.g. which layers)
        done.append(action)
    return done


@pytest.mark.parametrize("config_name", _registered_models())
def test_every_registered_model_grown_by_its_actions_round_trips(tmp_path, config_name):
    from selfgrow.models import build_model
    from selfgrow.models._registry import _CONFIGS

    torch.manual_seed(0)
    model = build_model(_CONFIGS[config_name](**_EXAMPLES.get(config_name, {})))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad()
        sum(p.float().pow(2).sum() for p in model.parameters()).backward()
        opt.step()

    step()
    before = model_config_dict(model)
    grown = _grow_by_actions(model, opt)
    step()
    if grown:
        assert model_config_dict(model) != before, grown
    save_checkpoint(tmp_path / "c.pt", model, opt)
    ck = load_checkpoint(tmp_path / "c.pt")
    assert ck.model.config == model.config
    assert _equal(_params(model), _params(ck.model))
    # tied parameters stay tied (one Parameter registered under several names)
    names = [n for n, _ in model.named_parameters()]
    assert [n for n, _ in ck.model.named_parameters()] == names
    s1, s2 = _opt_by_name(model, opt), _opt_by_name(ck.model, ck.optimizer)
    assert s1.keys() == s2.keys() == set(names)
    assert all(torch.equal(s1[n]["exp_avg_sq"], s2[n]["exp_avg_sq"]) for n in names)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_checkpoint_between_growth_and_first_step_keeps_lazy_adam_init(tmp_path, amsgrad):
    """Brand-new tensors under Adam get their state at their first gradient (selfgrow.optim);
    a checkpoint taken before that step must resume bit-identically (marker kept exactly,
    step hook reinstalled)."""
    torch.manual_seed(0)
    model = _TinyNet(_TinyNetConfig(hidden=(12, 10)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, amsgrad=amsgrad)
    _train(model, opt, None, range(4))
    grow_(model, _DeepenConfig(after=0), optimizer=opt)
    new = model.layers[1].weight
    assert opt.state[new] and "exp_avg" not in opt.state[new]  # awaiting its first gradient
    save_checkpoint(tmp_path / "c.pt", model, opt)
    ck = load_checkpoint(tmp_path / "c.pt")
    _train(model, opt, None, range(4, 8))
    _train(ck.model, ck.optimizer, None, range(4, 8))
    assert _equal(_params(model), _params(ck.model))
