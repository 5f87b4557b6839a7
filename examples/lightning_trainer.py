"""Grow a GPT-2 inside a PyTorch Lightning ``Trainer``: the same small model as
``examples/hf_trainer.py``, wrapped in a LightningModule; each loss plateau adds a block.
``python examples/lightning_trainer.py [out_dir]`` (about 30 s on 2 CPU cores). Resume with
``trainer.fit(LitLM(), dl, ckpt_path=...)`` on a new Trainer: the network regrows first."""

from __future__ import annotations

import sys
import tempfile

import pytorch_lightning as pl
import torch
import transformers

from selfgrow import GrowthController, LossPlateau, Rule, RulePolicy
from selfgrow.data.text import load_shakespeare
from selfgrow.integrations.lightning import GrowthCallback

BLOCK = 64


class LitLM(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=256, n_positions=BLOCK, n_embd=32, n_layer=1, n_head=4,
            bos_token_id=0, eos_token_id=0))

    def training_step(self, batch: torch.Tensor, i: int) -> torch.Tensor:
        loss = self.net(input_ids=batch, labels=batch).loss
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> dict:
        opt = torch.optim.AdamW(self.parameters(), lr=2e-3)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=400)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def main(out: str) -> None:
    text = load_shakespeare()
    data = text.train[: 2000 * BLOCK].long().view(2000, BLOCK)
    lit = LitLM()
    ctrl = GrowthController(
        lit.net, None, [LossPlateau(window=30, min_rel_drop=0.01)],
        RulePolicy([Rule("loss_plateau", "deepen")], max_growths=2, cooldown=60,
                   warmup_steps=60),
        log_dir=f"{out}/selfgrow",
        probe={"input_ids": text.val[: 4 * BLOCK].long().view(4, BLOCK)})
    trainer = pl.Trainer(max_steps=400, accelerator="cpu", devices=1, default_root_dir=out,
                         callbacks=[GrowthCallback(ctrl)], enable_progress_bar=False,
                         logger=pl.loggers.CSVLogger(out, name="csv"),
                         enable_model_summary=False)
    trainer.fit(lit, torch.utils.data.DataLoader(data, batch_size=16, shuffle=True))
    for e in ctrl.events:
        if e.kind == "growth":
            print(f"step {e.step}: {e.action['op']} ({e.reason}), {e.params_before:,} -> "
                  f"{e.params_after:,} params")
    print(f"final: n_layer={lit.net.config.n_layer}; selfgrow/n_params in "
          f"{trainer.logger.log_dir}/metrics.csv; events: selfgrow inspect {out}/selfgrow")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="selfgrow-lit-"))
