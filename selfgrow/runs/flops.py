"""Training FLOPs, counted with ``torch.utils.flop_counter.FlopCounterMode``.

A growing run changes architecture, so training FLOPs are counted per distinct architecture
and input shape: forward + backward of one mini-batch (attention, matmuls and convolutions;
elementwise ops are not counted), divided by its size, times the samples trained with that
architecture and input shape (a sequence-length warm-up changes the per-sample cost).

:func:`flop_counter` is the one ``FlopCounterMode`` every selfgrow driver uses: it adds the
formulas of the CPU kernels of ``scaled_dot_product_attention``
(``_scaled_dot_product_flash_attention_for_cpu`` and its backward), which the stock counter
does not know, so attention is counted on CPU as it is on CUDA (full T x T score matrix, also
for causal attention, PyTorch's convention).
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


def _sdpa_cpu_flop(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None,
                   **kwargs: Any) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return int(sdpa_flop_count(query, key, value))


def _sdpa_cpu_backward_flop(grad_out: Any, query: Any, key: Any, value: Any, *args: Any,
                            out_shape: Any = None, **kwargs: Any) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return int(sdpa_backward_flop_count(grad_out, query, key, value))


def _cpu_attention_mapping() -> dict[Any, Any]:
    aten = torch.ops.aten
    out: dict[Any, Any] = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        out[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flop
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        out[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _sdpa_cpu_backward_flop
    return out


def flop_counter() -> Any:
    """A silent ``torch.utils.flop_counter.FlopCounterMode`` that also counts the CPU
    attention kernels (see the module docstring). Use as ``with flop_counter() as fc: ...;
    fc.get_total_flops()``."""
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False, custom_mapping=_cpu_attention_mapping())


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
    m = copy.deepcopy(model)
    m.train()
    fc = flop_counter()
    with fc:
        loss_fn(m, x, y).backward()
    n = int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() else 1
    return fc.get_total_flops() / max(n, 1)


class FlopMeter:
    """Accumulates training FLOPs of a run whose architecture may change.

    ``meter.add(model, x, y)`` once per training step: FLOPs per sample are measured the first
    time an architecture (with this per-sample input shape) is seen, then
    ``samples * flops_per_sample`` is added. ``meter.add_flops(n)`` adds FLOPs counted
    elsewhere (a LiGO fitting phase, a schedule search's proxy runs).
    """

    def __init__(self, loss_fn: LossFn = _cross_entropy) -> None:
        self.loss_fn = loss_fn
        self.samples: dict[str, int] = {}
        self.flops_per_sample: dict[str, float] = {}
        self.extra = 0.0

    def add(self, model: nn.Module, x: Any, y: Any) -> float:
        """Count one training step on ``(x, y)``; returns the FLOPs it added."""
        key = arch_key(model)
        if isinstance(x, torch.Tensor) and x.dim() > 1:
            key += f"|input{tuple(x.shape[1:])}"
        if key not in self.flops_per_sample:
            self.flops_per_sample[key] = training_flops_per_sample(model, x, y, self.loss_fn)
        n = int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() else 1
        self.samples[key] = self.samples.get(key, 0) + n
        return self.flops_per_sample[key] * n

    def add_flops(self, flops: float) -> None:
        """Add FLOPs counted outside :meth:`add` (must be finite and >= 0)."""
        f = float(flops)
        if not (f >= 0.0 and f < float("inf")):
            raise ValueError(f"flops must be finite and >= 0, got {flops!r}")
        self.extra += f

    @property
    def total(self) -> float:
        """Training FLOPs so far."""
        return float(sum(self.flops_per_sample[k] * n for k, n in self.samples.items())
                     + self.extra)
