"""GrowthCallback for PyTorch Lightning: a small GPT-2 (built from its config, inside a
LightningModule) trained on Shakespeare bytes grows at steps 3 (identity-inserted block),
6 (d_model doubling) and 10 (FFN width); a run resumed from the checkpoint at step 8 in a new
Trainer, module and controller ends with the weights, Adam state and event log of the
uninterrupted run."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

pl = pytest.importorskip("pytorch_lightning")
transformers = pytest.importorskip("transformers")

from selfgrow import GrowthController  # noqa: E402
from selfgrow.control.schedules import FixedSchedule  # noqa: E402
from selfgrow.control.signals import ValidationPlateau  # noqa: E402
from selfgrow.data.text import load_shakespeare  # noqa: E402
from selfgrow.errors import CheckpointError, GrowthConfigError, IncompatibleModelError  # noqa: E402
from selfgrow.events import read_events  # noqa: E402
from selfgrow.integrations.lightning import HISTORY_KEY, GrowthCallback  # noqa: E402

BLOCK = 32
SCHEDULE = [(3, "deepen"), (6, "widen"), (10, "widen_ffn")]


class LitLM(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        cfg = transformers.GPT2Config(vocab_size=256, n_positions=BLOCK, n_embd=16, n_layer=1,
                                      n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        self.net = transformers.GPT2LMHeadModel(cfg)

    def training_step(self, batch: torch.Tensor, i: int) -> torch.Tensor:
        return self.net(input_ids=batch, labels=batch).loss

    def validation_step(self, batch: torch.Tensor, i: int) -> None:
        self.log("val_loss", self.net(input_ids=batch, labels=batch).loss)

    def configure_optimizers(self) -> dict:
        opt = torch.optim.AdamW(self.parameters(), lr=3e-3, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.05 * s))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class _ResumableLoader(torch.utils.data.DataLoader):
    """A DataLoader with ``state_dict`` / ``load_state_dict`` (batches served in the current
    epoch), which Lightning saves in its checkpoints: a plain DataLoader restarts an epoch
    that a checkpoint interrupted (one extra batch after an epoch-end checkpoint), so the
    resumed run would not see the uninterrupted run's batches."""

    def __init__(self, *a: object, **kw: object) -> None:
        super().__init__(*a, **kw)
        self._served = 0
        self._skip = 0

    def __iter__(self):
        it = super().__iter__()
        skip, self._skip = self._skip, 0
        for _ in range(skip):
            next(it)
        self._served = skip
        for b in it:
            self._served += 1
            yield b

    def state_dict(self) -> dict[str, int]:
        return {"served": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = int(state["served"])


@pytest.fixture(scope="module")
def loaders() -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    c = load_shakespeare()
    tr = c.train[: 32 * BLOCK].long().view(32, BLOCK)  # 4 batches of 8: 4 steps per epoch
    va = c.val[: 8 * BLOCK].long().view(8, BLOCK)
    return (_ResumableLoader(tr, batch_size=8, shuffle=False),
            torch.utils.data.DataLoader(va, batch_size=8))


def _fit(out: Path, loaders, *, ckpt: str | None = None, signals=(), policy=None,
         max_steps: int = 12, **trainer_kw):
    lit = LitLM()
    ctrl = GrowthController(lit.net, None, list(signals),
                            policy if policy is not None else FixedSchedule(SCHEDULE),
                            log_dir=str(out / "selfgrow"), measure_flops=False,
                            probe={"input_ids": next(iter(loaders[1]))[:2]}, run_id="lit-test")
    cb = GrowthCallback(ctrl)
    saver = pl.callbacks.ModelCheckpoint(dirpath=out / "ckpt", save_top_k=-1,
                                         every_n_epochs=1, save_on_train_epoch_end=True)
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1,
                         callbacks=[cb, saver], logger=pl.loggers.CSVLogger(out, name="csv"),
                         enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, log_every_n_steps=1,
                         **({"limit_val_batches": 0} | trainer_kw))
    trainer.fit(lit, loaders[0], loaders[1], ckpt_path=ckpt)
    return trainer, lit, ctrl, cb


def _events(out: Path) -> list[tuple]:
    evs, bad = read_events(out / "selfgrow" / "events.jsonl")
    assert not bad
    return [(e.seq, e.kind, e.step, e.action.get("op"), e.params_after) for e in evs]


def _opt_state(trainer, lit) -> dict[str, dict[str, torch.Tensor]]:
    names = {id(p): n for n, p in lit.named_parameters()}
    return {names[id(p)]: {k: v.clone() for k, v in s.items()}
            for p, s in trainer.optimizers[0].state.items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, loaders):
    out = tmp_path_factory.mktemp("lit") / "a"
    return (out, *_fit(out, loaders))


def test_grows_three_times_inside_lightning(uninterrupted):
    out, trainer, lit, ctrl, cb = uninterrupted
    growths = [e for e in ctrl.events if e.kind == "growth"]
    assert [(e.step, e.action["op"]) for e in growths] == [
        (3, "identity_insert"), (6, "widen_d_model"), (10, "ffn_net2wider")]
    assert all(e.preservation["max_rel"] < 1e-4 for e in growths)
    assert (lit.net.config.n_layer, lit.net.config.n_embd) == (2, 32)
    opt = trainer.optimizers[0]
    assert opt is ctrl.optimizer
    assert {id(p) for g in opt.param_groups for p in g["params"]} == \
        {id(p) for p in lit.parameters()}
    for p, s in opt.state.items():
        assert s["exp_avg"].shape == p.shape
    assert ctrl.step == 12
    # logged through LightningModule.log to the Trainer's logger
    rows = list(csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")))
    logged = {int(r["step"]): float(r["selfgrow/n_growths"]) for r in rows
              if r.get("selfgrow/n_growths")}
    # Lightning's step column counts from 0: optimizer step s is row s - 1
    assert [int(logged[s - 1]) for s in range(1, 13)] == [0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3]
    # the checkpoint at step 8 holds the history twice: callback state and model state dict
    ck = torch.load(out / "ckpt" / "epoch=1-step=8.ckpt", weights_only=True)
    hist = ck["callbacks"]["selfgrow.GrowthCallback"]["history"]
    assert [h["type"] for h in hist] == ["IdentityInsertConfig", "WidenDModelConfig"]
    assert ck["state_dict"][f"net.{HISTORY_KEY}"] == hist


def test_resume_equals_the_uninterrupted_run(uninterrupted, loaders, tmp_path):
    out, trainer, lit, ctrl, cb = uninterrupted
    import shutil

    out_b = tmp_path / "b"
    shutil.copytree(out, out_b)
    for f in (out_b / "ckpt").glob("*.ckpt"):
        if f.name != "epoch=1-step=8.ckpt":
            f.unlink()
    t2, lit2, ctrl2, cb2 = _fit(out_b, loaders, ckpt=str(out_b / "ckpt" / "epoch=1-step=8.ckpt"))
    assert len(cb2.history) == 3 and ctrl2.n_growths == 3
    a, b = dict(lit.named_parameters()), dict(lit2.named_parameters())
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=0, atol=0, msg=n)
    sa, sb = _opt_state(trainer, lit), _opt_state(t2, lit2)
    assert sa.keys() == sb.keys()
    for n in sa:
        for k in sa[n]:
            torch.testing.assert_close(sb[n][k], sa[n][k], rtol=0, atol=0, msg=f"{n}.{k}")
    assert _events(out_b) == _events(out)


def test_resume_with_a_tampered_history_is_refused(uninterrupted, loaders, tmp_path):
    out, *_ = uninterrupted
    ck = torch.load(out / "ckpt" / "epoch=1-step=8.ckpt", weights_only=True)
    ck["state_dict"][f"net.{HISTORY_KEY}"] = ck["state_dict"][f"net.{HISTORY_KEY}"][:1]
    bad = tmp_path / "bad.ckpt"
    torch.save(ck, bad)
    with pytest.raises(CheckpointError, match="does not give"):
        _fit(tmp_path / "c", loaders, ckpt=str(bad))


def test_val_loss_reaches_validation_plateau(loaders, tmp_path):
    sig = ValidationPlateau(window=2)
    _, _, ctrl, _ = _fit(tmp_path / "v", loaders, signals=[sig], policy=FixedSchedule([]),
                         max_steps=8, limit_val_batches=1)
    # validation at the end of epoch 0 (step 4) reaches the controller at step 5; the one at
    # the end of epoch 1 comes after the last step
    assert sig.n_updates == 1


def test_bad_inputs(loaders, tmp_path):
    with pytest.raises(GrowthConfigError, match="GrowthController"):
        GrowthCallback(object())
    other = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=256, n_positions=BLOCK, n_embd=16, n_layer=1, n_head=2))
    ctrl = GrowthController(other, None, [], FixedSchedule(SCHEDULE), measure_flops=False)
    with pytest.raises(GrowthConfigError, match="val_key"):
        GrowthCallback(ctrl, val_key="")
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         callbacks=[GrowthCallback(ctrl)])
    with pytest.raises(IncompatibleModelError, match="not part of the LightningModule"):
        trainer.fit(LitLM(), loaders[0])
