"""GrowthCallback for transformers.Trainer: a small GPT-2 built from its config, trained by the
Trainer on Shakespeare bytes, grows twice (identity-inserted block, then d_model doubling),
is checkpointed after the second growth and resumed in a fresh Trainer, model and controller;
a third growth (FFN width) after the checkpoint checks that the resumed policy goes on where
it stopped. Weights, Adam state and event log equal those of the uninterrupted run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from selfgrow import GrowthController  # noqa: E402
from selfgrow.control.schedules import FixedSchedule  # noqa: E402
from selfgrow.control.signals import ValidationPlateau  # noqa: E402
from selfgrow.data.text import load_shakespeare  # noqa: E402
from selfgrow.errors import CheckpointError, GrowthConfigError, IncompatibleModelError  # noqa: E402
from selfgrow.events import read_events  # noqa: E402
from selfgrow.integrations.hf import GROWTH_FILE, GrowthCallback, read_growth_file  # noqa: E402

BLOCK = 32
SCHEDULE = [(3, "deepen"), (6, "widen"), (10, "widen_ffn")]  # depth, d_model, then FFN width


class _Blocks(torch.utils.data.Dataset):
    def __init__(self, tokens: torch.Tensor, n: int) -> None:
        self.x = tokens[: n * BLOCK].long().view(n, BLOCK)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "labels": self.x[i]}


@pytest.fixture(scope="module")
def data() -> tuple[_Blocks, _Blocks]:
    corpus = load_shakespeare()
    return _Blocks(corpus.train, 96), _Blocks(corpus.val, 16)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=256, n_positions=BLOCK, n_embd=16, n_layer=1,
                                  n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def _args(out: Path, **kw: object) -> transformers.TrainingArguments:
    base = dict(output_dir=str(out), max_steps=12, per_device_train_batch_size=8,
                learning_rate=3e-3, weight_decay=0.01, lr_scheduler_type="cosine",
                warmup_steps=2, save_strategy="steps", save_steps=8, logging_steps=4,
                report_to=[], seed=0, use_cpu=True, dataloader_num_workers=0,
                disable_tqdm=True)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def _run(out: Path, data, *, resume: bool = False, signals=(), policy=None, **kw):
    model = _model()
    probe = {"input_ids": data[1].x[:2]}
    ctrl = GrowthController(model, None, list(signals),
                            policy if policy is not None else FixedSchedule(SCHEDULE),
                            log_dir=str(out / "selfgrow"), probe=probe, measure_flops=False,
                            run_id="hf-test")
    cb = GrowthCallback(ctrl)
    trainer = transformers.Trainer(model=model, args=_args(out, **kw), train_dataset=data[0],
                                   eval_dataset=data[1], callbacks=[cb])
    trainer.train(resume_from_checkpoint=True if resume else None)
    return trainer, ctrl, cb


def _opt_state(trainer) -> dict[str, dict[str, torch.Tensor]]:
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else \
        trainer.optimizer
    return {names[id(p)]: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}


def _events(out: Path) -> list[tuple]:
    evs, bad = read_events(out / "selfgrow" / "events.jsonl")
    assert not bad
    return [(e.seq, e.kind, e.step, e.action.get("op"), e.params_after) for e in evs]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("hf") / "a"
    trainer, ctrl, cb = _run(out, data)
    return out, trainer, ctrl, cb


def test_grows_twice_inside_the_trainer(uninterrupted):
    out, trainer, ctrl, cb = uninterrupted
    growths = [e for e in ctrl.events if e.kind == "growth"]
    assert [(e.step, e.action["op"]) for e in growths] == [
        (3, "identity_insert"), (6, "widen_d_model"), (10, "ffn_net2wider")]
    assert all(e.preservation["max_rel"] < 1e-4 for e in growths)
    m = trainer.model
    assert (m.config.n_layer, m.config.n_embd) == (2, 32)
    # the Trainer's optimizer is the one the controller migrated: same object, every
    # parameter of the grown model in it, in named_parameters() order, with grown Adam state
    inner = trainer.optimizer.optimizer
    assert inner is ctrl.optimizer
    held = [p for g in inner.param_groups for p in g["params"]]
    assert {id(p) for p in held} == {id(p) for p in m.parameters()}
    order = {id(p): i for i, (_, p) in enumerate(m.named_parameters())}
    for g in inner.param_groups:
        idx = [order[id(p)] for p in g["params"]]
        assert idx == sorted(idx)
    for p, s in inner.state.items():
        assert s["exp_avg"].shape == p.shape and s["exp_avg_sq"].shape == p.shape
    sched = getattr(trainer.lr_scheduler, "scheduler", trainer.lr_scheduler)
    assert len(sched.base_lrs) == len(inner.param_groups) == 2
    # the loss the Trainer computed reached the controller every step
    assert ctrl.step == 12 and ctrl._last_loss is not None
    # growth events are in the Trainer's log history and in the checkpoint's trainer_state
    hist = [h for h in trainer.state.log_history if "selfgrow_event" in h]
    assert [(h["step"], h["selfgrow_op"]) for h in hist] == [
        (3, "identity_insert"), (6, "widen_d_model"), (10, "ffn_net2wider")]
    saved = json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())
    assert [h["step"] for h in saved["log_history"] if "selfgrow_event" in h] == [3, 6]
    g = read_growth_file(out / "checkpoint-8" / GROWTH_FILE)
    assert [c["type"] for c in g["history"]] == ["IdentityInsertConfig", "WidenDModelConfig"]
    assert g["shapes"]["transformer.wte.weight"] == [256, 32]


def test_resume_after_the_second_growth_equals_the_uninterrupted_run(uninterrupted, data,
                                                                     tmp_path):
    out, trainer, ctrl, cb = uninterrupted
    # the interrupted run: everything written up to the checkpoint at step 8 (after both
    # growths); what came later is gone (its events.jsonl keeps the later lines: rewound)
    out_b = tmp_path / "b"
    shutil.copytree(out, out_b)
    for extra in out_b.glob("checkpoint-*"):
        if extra.name != "checkpoint-8":
            shutil.rmtree(extra)
    t2, ctrl2, cb2 = _run(out_b, data, resume=True)
    assert (t2.model.config.n_layer, t2.model.config.n_embd) == (2, 32)
    assert len(cb2.history) == 3
    a = dict(trainer.model.named_parameters())
    b = dict(t2.model.named_parameters())
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=0, atol=0, msg=n)
    sa, sb = _opt_state(trainer), _opt_state(t2)
    assert sa.keys() == sb.keys()
    for n in sa:
        for k in sa[n]:
            torch.testing.assert_close(sb[n][k], sa[n][k], rtol=0, atol=0, msg=f"{n}.{k}")
    assert ctrl2.step == ctrl.step and ctrl2.n_growths == 3
    ev_a = _events(out)
    assert [e[2] for e in ev_a if e[1] == "growth"] == [3, 6, 10]
    assert _events(out_b) == ev_a  # rewound to step 8, then the same events again


def test_resume_without_the_growth_file_is_a_clear_error(uninterrupted, data, tmp_path):
    out, *_ = uninterrupted
    out_c = tmp_path / "c"
    shutil.copytree(out, out_c)
    for f in out_c.glob(f"checkpoint-*/{GROWTH_FILE}"):
        f.unlink()
    with pytest.raises(CheckpointError, match="no selfgrow_growth.pt"):
        _run(out_c, data, resume=True)


def test_resume_from_a_tampered_history_is_refused(uninterrupted, data, tmp_path):
    out, *_ = uninterrupted
    out_d = tmp_path / "d"
    shutil.copytree(out, out_d)
    for f in out_d.glob(f"checkpoint-*/{GROWTH_FILE}"):
        g = torch.load(f, weights_only=True)
        g["history"] = g["history"][:1]  # only the depth growth: the width is missing
        torch.save(g, f)
    with pytest.raises(CheckpointError, match="does not give"):
        _run(out_d, data, resume=True)


def test_eval_loss_reaches_validation_plateau(data, tmp_path):
    sig = ValidationPlateau(window=2)
    _, ctrl, _ = _run(tmp_path / "e", data, signals=[sig], policy=FixedSchedule([]),
                      eval_strategy="steps", eval_steps=3, max_steps=9, save_steps=100)
    # evaluations at steps 3 and 6 are reported at the next step; the one at 9 comes after
    # the last step
    assert sig.n_updates == 2


def test_bad_inputs(data, tmp_path):
    with pytest.raises(GrowthConfigError, match="GrowthController"):
        GrowthCallback(object())
    model, other = _model(), _model()
    ctrl = GrowthController(model, None, [], FixedSchedule(SCHEDULE), measure_flops=False)
    trainer = transformers.Trainer(model=other, args=_args(tmp_path / "f", max_steps=1),
                                   train_dataset=data[0], callbacks=[GrowthCallback(ctrl)])
    with pytest.raises(IncompatibleModelError, match="different model"):
        trainer.train()
