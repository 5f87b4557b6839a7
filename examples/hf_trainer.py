"""Grow a GPT-2 inside ``transformers.Trainer``: a 1-block, d_model-32 model built from its
config trains on Shakespeare bytes; each loss plateau adds a block (identity insertion, exact),
twice at most. ``python examples/hf_trainer.py [out_dir]`` (about 30 s on 2 CPU cores)."""

from __future__ import annotations

import sys
import tempfile

import torch
import transformers

from selfgrow import GrowthController, LossPlateau, Rule, RulePolicy
from selfgrow.data.text import load_shakespeare
from selfgrow.integrations.hf import GrowthCallback

BLOCK = 64


class Blocks(torch.utils.data.Dataset):
    def __init__(self, tokens: torch.Tensor, n: int) -> None:
        self.x = tokens[: n * BLOCK].long().view(n, BLOCK)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "labels": self.x[i]}


def main(out: str) -> None:
    text = load_shakespeare()
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=256, n_positions=BLOCK, n_embd=32, n_layer=1, n_head=4,
        bos_token_id=0, eos_token_id=0))
    ctrl = GrowthController(
        model, None, [LossPlateau(window=30, min_rel_drop=0.01)],
        RulePolicy([Rule("loss_plateau", "deepen")], max_growths=2, cooldown=60,
                   warmup_steps=60),
        log_dir=f"{out}/selfgrow", probe={"input_ids": Blocks(text.val, 4).x})
    args = transformers.TrainingArguments(
        output_dir=out, max_steps=400, per_device_train_batch_size=16, learning_rate=2e-3,
        lr_scheduler_type="cosine", warmup_steps=20, logging_steps=100, save_steps=200,
        report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args,
                                   train_dataset=Blocks(text.train, 2000),
                                   callbacks=[GrowthCallback(ctrl)])
    trainer.train()
    for h in trainer.state.log_history:
        if "selfgrow_event" in h:
            print(f"step {h['step']}: {h['selfgrow_op']} ({h['selfgrow_reason']}), "
                  f"{h['selfgrow_params_before']:,} -> {h['selfgrow_params_after']:,} params")
    print(f"final: n_layer={model.config.n_layer} n_embd={model.config.n_embd}; "
          f"events: selfgrow inspect {out}/selfgrow; resume: trainer.train("
          f"resume_from_checkpoint=True) on a new Trainer with the same small model")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="selfgrow-hf-"))
