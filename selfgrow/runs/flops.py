"""Training FLOPs, counted with ``torch.utils.flop_counter.FlopCounterMode``.

A growing run changes architecture, so training FLOPs are counted per distinct architecture:
forward + backward of one mini-batch (attention, matmuls and convolutions; elementwise ops
are not counted), divided by its size, times the samples trained with that architecture.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

LossFn = Callable[[nn.Module, Any, Any], torch.Tensor]


def _cross_entropy(model: nn.Module, x: Any, y: Any) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def arch_key(model: nn.Module) -> str:
    """A string identifying ``model``'s architecture (its config, else its tensor shapes)."""
    cfg = getattr(model, "config", None)
    shapes = str([tuple(p.shape) for p in model.parameters()])
    return repr(cfg) + shapes if cfg is not None else shapes


def training_flops_per_sample(
    model: nn.Module, x: Any, y: Any, loss_fn: LossFn = _cross_entropy
) -> float:
    """Forward + backward FLOPs of one mini-batch ``(x, y)`` divided by its size (the leading
    dimension of ``x``), counted on a copy of ``model`` so the live model's gradients and
    RNG-dependent state are untouched. ``loss_fn(model, x, y)`` (default cross-entropy)."""
    from torch.utils.flop_counter import FlopCounterMode

    m = copy.deepcopy(model)
    m.train()
    fc = FlopCounterMode(display=False)
    with fc:
        loss_fn(m, x, y).backward()
    n = int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() else 1
    return fc.get_total_flops() / max(n, 1)


class FlopMeter:
    """Accumulates training FLOPs of a run whose architecture may change.

    ``meter.add(model, x, y)`` once per training step: FLOPs per sample are measured the first
    time an architecture is seen, then ``samples * flops_per_sample`` is added.
    """

    def __init__(self, loss_fn: LossFn = _cross_entropy) -> None:
        self.loss_fn = loss_fn
        self.samples: dict[str, int] = {}
        self.flops_per_sample: dict[str, float] = {}

    def add(self, model: nn.Module, x: Any, y: Any) -> None:
        key = arch_key(model)
        if key not in self.flops_per_sample:
            self.flops_per_sample[key] = training_flops_per_sample(model, x, y, self.loss_fn)
        n = int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() else 1
        self.samples[key] = self.samples.get(key, 0) + n

    @property
    def total(self) -> float:
        """Training FLOPs so far."""
        return float(sum(self.flops_per_sample[k] * n for k, n in self.samples.items()))
