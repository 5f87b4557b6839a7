"""Training-memory estimate vs measured peak on CPU, for the reference models.

Compares :func:`selfgrow.control.estimate_memory` (Adam, steady-state step) with
:func:`selfgrow.control.sizing.measure_peak_memory` (torch.profiler memory events) on the
selfgrow reference models and on plain torch models, and writes
``benchmarks/results/memory_estimate.{md,json}``. Target: every estimate within 15%.

Usage::

    .venv/bin/python benchmarks/memory_estimate.py
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import torch
from torch import nn

from selfgrow.control import estimate_memory
from selfgrow.control.sizing import measure_peak_memory
from selfgrow.models import build_model
from selfgrow.models.cnn import CNNConfig
from selfgrow.models.mlp import MLPConfig
from selfgrow.models.transformer import TransformerConfig

RESULTS = Path(__file__).resolve().parent / "results"


def cases() -> list[tuple[str, nn.Module, dict, torch.Tensor]]:
    tcfg = TransformerConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4,
                             head_dim=16, d_ff=256, max_seq_len=64)
    tcfg_big = TransformerConfig(vocab_size=512, d_model=128, n_layers=4, n_heads=4,
                                 n_kv_heads=2, head_dim=32, d_ff=512, max_seq_len=128,
                                 ffn="swiglu", norm="rmsnorm", positions="rope")
    return [
        ("GrowableMLP 784-256-128-10, batch 64",
         build_model(MLPConfig(in_features=784, hidden=(256, 128), n_classes=10)),
         {"input_shape": (784,)}, torch.randn(64, 784)),
        ("GrowableCNN 16-32 ch, 28x28, batch 32",
         build_model(CNNConfig(in_channels=1, image_size=28, channels=(16, 32), n_classes=10,
                               pool_after=(0, 1))),
         {"input_shape": (1, 28, 28)}, torch.randn(32, 1, 28, 28)),
        ("GrowableTransformer d64 L2, 8x64 tokens", build_model(tcfg),
         {"seq_len": 64, "vocab_size": 256}, torch.randint(0, 256, (8, 64))),
        ("GrowableTransformer d128 L4 GQA/SwiGLU/RoPE, 8x128 tokens", build_model(tcfg_big),
         {"seq_len": 128, "vocab_size": 512}, torch.randint(0, 512, (8, 128))),
        ("torch MLP 256-512-512-10, batch 64",
         nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.GELU(),
                       nn.Linear(512, 10)), {"input_shape": (256,)}, torch.randn(64, 256)),
        ("torch TransformerEncoder d64 L2, 16x32",
         nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, 128, batch_first=True), 2),
         {"input_shape": (32, 64)}, torch.randn(16, 32, 64)),
    ]


def main() -> int:
    torch.manual_seed(0)
    rows = []
    for name, model, spec, x in cases():
        est = estimate_memory(model, "adam", batch_size=x.shape[0], **spec)
        measured = measure_peak_memory(model, x)
        err = est["total"] / measured - 1
        rows.append({"model": name, "estimate_bytes": est["total"], "measured_bytes": measured,
                     "rel_error": err, "within_15pct": abs(err) <= 0.15})
    cmd = "python benchmarks/memory_estimate.py"
    lines = [
        "# Training-memory estimate vs measured peak (CPU, Adam, one steady-state step)",
        "",
        f"Command: `{cmd}` — torch {torch.__version__}, {platform.machine()}, "
        f"{os.cpu_count()} cores. Measured = bytes alive before the step + high-water mark of "
        "torch.profiler memory events during it.",
        "",
        "| model | estimate (MiB) | measured (MiB) | error |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['estimate_bytes'] / 2**20:.2f} | "
                     f"{r['measured_bytes'] / 2**20:.2f} | {r['rel_error']:+.1%} |")
    worst = max(abs(r["rel_error"]) for r in rows)
    lines += ["", f"Worst error {worst:.1%} (target <= 15%): "
              f"{'PASS' if worst <= 0.15 else 'FAIL'}"]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "memory_estimate.md").write_text(text)
    (RESULTS / "memory_estimate.json").write_text(
        json.dumps({"command": cmd, "torch": torch.__version__, "rows": rows}, indent=2) + "\n")
    return 0 if worst <= 0.15 else 1


if __name__ == "__main__":
    sys.exit(main())
