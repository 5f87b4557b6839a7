"""Grow a ``torch.compile``-d transformer trained under bf16 autocast.

A 2-layer GrowableTransformer learns Shakespeare bytes with AdamW, compiled, its forward and
loss under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (fp32 master weights). A depth
growth (identity insertion, G_stack family) and an exact d_model widening (Net2WiderNet-style
duplication) happen mid-run. After each growth the script checks that the compiled wrapper
runs the grown model (its output equals the eager module's) and prints the event's
preservation record: the compute dtype, its documented bound (docs/precision.md) and the
measured error on the probe. The controller measures the probe where ``observe`` is called,
here outside autocast, so the record shows fp32 and its bound; a ``grow_`` called inside an
autocast region records bf16 and its bound (8e-2).

    .venv/bin/python examples/compile_amp_growth.py              # inductor, about 80 s here
    .venv/bin/python examples/compile_amp_growth.py --backend aot_eager   # about 18 s, no C++ build
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from selfgrow.control import FixedSchedule, GrowthController, LossPlateau
from selfgrow.data.text import load_shakespeare
from selfgrow.models.transformer import GrowableTransformer, tiny_config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--backend", default="inductor", help="torch.compile backend")
    ap.add_argument("--log-dir", default=None)
    args = ap.parse_args()
    tokens = load_shakespeare().train.long()
    torch.manual_seed(0)
    model = GrowableTransformer(tiny_config(vocab_size=256, d_model=32, n_layers=2, n_heads=4,
                                            head_dim=8, d_ff=64, max_seq_len=64))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    compiled = torch.compile(model, backend=args.backend)
    probe = tokens[:4 * 64].view(4, 64)
    ctrl = GrowthController(
        compiled, opt, signals=[LossPlateau(window=20)],
        policy=FixedSchedule([(args.steps // 3, "deepen"),
                              (2 * args.steps // 3, "widen", {"factor": 2})]),
        log_dir=args.log_dir, probe=probe)
    assert ctrl.model is model and ctrl.wrapped_model is compiled
    gen = torch.Generator().manual_seed(1)
    for step in range(1, args.steps + 1):
        i = torch.randint(0, len(tokens) - 65, (16,), generator=gen)
        x = torch.stack([tokens[j:j + 65] for j in i.tolist()])
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = ctrl.wrapped_model(x[:, :-1])
            loss = F.cross_entropy(logits.float().reshape(-1, 256), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        n = ctrl.n_growths
        ctrl.observe(loss=loss.detach())
        if ctrl.n_growths > n:
            ev = ctrl.events[-1]
            p = ev.preservation
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                diff = (compiled(probe).float() - model(probe).float()).abs().max().item()
            print(f"step {step}: {ev.action['name']} {ev.params_before:,} -> "
                  f"{ev.params_after:,} params; dtype {p['dtype']} bound {p['tolerance']:g} "
                  f"measured max_rel {p['max_rel']:.2e} (within: {p['within_tolerance']}); "
                  f"compiled vs eager after growth: max |dy| {diff:.1e}")
        if step % 20 == 0:
            print(f"step {step}: loss {loss.item():.3f}")
    ctrl.close()


if __name__ == "__main__":
    main()
