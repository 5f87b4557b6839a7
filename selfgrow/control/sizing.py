"""Sizing helpers: hardware-friendly widths, training-memory and FLOP estimates.

* :func:`round_width` rounds a width up to a multiple that suits the device's matrix units
  (64 on CUDA, 8 on CPU by default).
* :func:`estimate_memory` estimates the peak bytes of one training step: parameters,
  gradients, optimizer state (from the optimizer kind) and activations. Activations are
  measured, not guessed: two small forward passes (batch 2 and 4) trace every op (a
  ``TorchDispatchMode``) and every tensor autograd saves
  (``torch.autograd.graph.saved_tensors_hooks``); backward's peak is simulated from that
  trace, and the per-sample slope is extrapolated linearly to ``batch_size``.
* :func:`measure_peak_memory` measures the real peak of one steady-state training step on
  CPU with ``torch.profiler`` (memory events), to check the estimate against.
* :func:`flops_per_sample` counts forward FLOPs with ``torch.utils.flop_counter``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..core import eval_mode
from ..errors import GrowthConfigError, choices_message

__all__ = [
    "OPTIMIZER_STATE_COPIES",
    "estimate_memory",
    "flops_per_sample",
    "measure_peak_memory",
    "round_width",
]

#: fp32-sized copies of every trainable parameter that an optimizer keeps as state
OPTIMIZER_STATE_COPIES = {
    "adam": 2,
    "adamw": 2,
    "adam_amsgrad": 3,
    "sgd": 0,
    "sgd_momentum": 1,
    "rmsprop": 1,
    "rmsprop_centered": 2,
    "none": 0,
}


def round_width(n: int, multiple: int | None = None, device: str | torch.device | None = None
                ) -> int:
    """Round ``n`` up to a multiple of ``multiple`` (at least one multiple).

    Args:
        n: requested width (units), >= 1.
        multiple: rounding unit; default 64 when ``device`` is CUDA (or, with no device given,
            when CUDA is available), else 8.
        device: the device the model lives on.

    Raises:
        GrowthConfigError: ``n`` or ``multiple`` < 1.
    """
    if multiple is None:
        dev = torch.device(device) if device is not None else None
        cuda = dev.type == "cuda" if dev is not None else torch.cuda.is_available()
        multiple = 64 if cuda else 8
    if not isinstance(n, int) or n < 1:
        raise GrowthConfigError(f"width n={n!r} is out of range; valid: an integer >= 1")
    if not isinstance(multiple, int) or multiple < 1:
        raise GrowthConfigError(f"multiple={multiple!r} is out of range; valid: an integer >= 1")
    return max(multiple, -(-n // multiple) * multiple)


def _make_input(
    batch: int,
    input_shape: Sequence[int] | None,
    seq_len: int | None,
    vocab_size: int | None,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    if input_shape is not None:
        return torch.randn(batch, *input_shape, dtype=dtype, device=device)
    if seq_len is not None:
        high = max(int(vocab_size or 2), 2)
        return torch.randint(0, high, (batch, seq_len), device=device)
    raise GrowthConfigError("estimate_memory needs input_shape=(...) or seq_len=... or make_input")


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    try:
        st = t.untyped_storage()
        return st.data_ptr(), st.nbytes()
    except RuntimeError:  # tensors without a plain storage (sparse, nested)
        return id(t), t.numel() * t.element_size()


def _forward_stats(model: nn.Module, x: Any, param_ptrs: set[int]) -> tuple[int, int]:
    """``(saved, backward_peak)`` in bytes for one forward pass: the distinct storages autograd
    saves for backward (plus the output), and a simulated peak of backward.

    The forward is traced op by op (a ``TorchDispatchMode``) while a saved-tensors hook notes
    which op saved which storage. Backward visits the ops in reverse; a saved storage is freed
    once the earliest op that saved it has been visited. At op ``i`` the live bytes are the
    storages still needed plus the gradient of the op's output and of its largest
    activation input; the peak is the maximum over ops.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    first_saver: dict[int, int] = {}  # storage -> index of the earliest op that saved it
    size: dict[int, int] = {}
    op_io: list[tuple[int, int]] = []  # per op: (output bytes, largest activation input bytes)

    def nbytes_of(ts: Any) -> list[int]:
        out = []
        for t in ts if isinstance(ts, (tuple, list)) else (ts,):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                ptr, nb = _storage_key(t)
                if ptr not in param_ptrs:  # weights (and views of them) are not activations
                    out.append(nb)
        return out

    class _Trace(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            op_io.append((sum(nbytes_of(out)), max(nbytes_of(list(args)), default=0)))
            return out

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr, nb = _storage_key(t)
        if ptr not in param_ptrs:
            size[ptr] = max(size.get(ptr, 0), nb)
            first_saver.setdefault(ptr, max(len(op_io) - 1, 0))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _Trace():
        out = model(**x) if isinstance(x, dict) else model(x)
    if isinstance(out, torch.Tensor):
        outs = [out]
    elif isinstance(out, dict):
        outs = [v for v in out.values() if isinstance(v, torch.Tensor)]
    elif isinstance(out, (tuple, list)):
        outs = [v for v in out if isinstance(v, torch.Tensor)]
    else:
        outs = []
    last = max(len(op_io) - 1, 0)
    for o in outs:
        ptr, nb = _storage_key(o)
        size.setdefault(ptr, nb)
        first_saver.setdefault(ptr, last)
    saved = sum(size.values())
    # bytes freed when backward has passed op i: storages whose earliest saver is i
    freed_at = [0] * (last + 1)
    for ptr, i in first_saver.items():
        freed_at[i] += size[ptr]
    live, peak = saved, saved
    for i in range(last, -1, -1):
        out_b, in_b = op_io[i] if i < len(op_io) else (0, 0)
        peak = max(peak, live + out_b + in_b)
        live -= freed_at[i]
    return saved, peak


def estimate_memory(
    model: nn.Module,
    optimizer_kind: str = "adam",
    batch_size: int = 1,
    seq_len: int | None = None,
    input_shape: Sequence[int] | None = None,
    dtype: torch.dtype | None = None,
    vocab_size: int | None = None,
    make_input: Callable[[int], Any] | None = None,
) -> dict[str, int]:
    """Estimate the memory of one training step, in bytes.

    Args:
        model: the model (not modified; a forward pass runs on a deep copy in train mode with
            the global RNG state preserved).
        optimizer_kind: one of :data:`OPTIMIZER_STATE_COPIES` (``"adam"``, ``"sgd"`` ...).
        batch_size: samples per step.
        seq_len: token sequence length (input = LongTensor ``(B, T)``).
        input_shape: per-sample shape of a float input ``(B, *input_shape)``.
        dtype: parameter/activation dtype (default: the model's).
        vocab_size: upper bound of token ids for ``seq_len`` inputs (default 2).
        make_input: ``batch -> input`` (tensor or kwargs dict) instead of the two above.

    Returns:
        ``{"params", "grads", "optimizer", "activations", "total"}`` in bytes, for a
        steady-state step (optimizer state already allocated). ``activations`` = the
        simulated backward peak (saved tensors still needed + gradients in flight, see
        ``_forward_stats``). ``total`` = params + grads + optimizer + max(activations, the
        optimizer step's temporaries ~ one parameter-sized buffer per state copy). Within 15%
        of :func:`measure_peak_memory` on the reference MLP, CNN and Transformer models on
        CPU (tests/test_sizing.py; ``benchmarks/memory_estimate.py`` prints the errors).

    Raises:
        GrowthConfigError: unknown optimizer kind, bad batch size, or no input description.
    """
    if optimizer_kind not in OPTIMIZER_STATE_COPIES:
        raise GrowthConfigError(
            choices_message("optimizer_kind", optimizer_kind, list(OPTIMIZER_STATE_COPIES))
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise GrowthConfigError(f"batch_size={batch_size!r} is out of range; valid: >= 1")
    params = list(model.parameters())
    if not params:
        raise GrowthConfigError("model has no parameters")
    p0 = params[0]
    dtype = dtype or p0.dtype
    esize = torch.empty((), dtype=dtype).element_size()
    n_all = sum(p.numel() for p in params)
    n_train = sum(p.numel() for p in params if p.requires_grad)
    p_bytes = n_all * esize
    g_bytes = n_train * esize
    o_bytes = n_train * 4 * OPTIMIZER_STATE_COPIES[optimizer_kind]

    clone = copy.deepcopy(model)
    if dtype != p0.dtype:
        clone = clone.to(dtype)
    clone.train()
    ptrs = {p.untyped_storage().data_ptr() for p in clone.parameters()}
    ptrs |= {b.untyped_storage().data_ptr() for b in clone.buffers()}

    def inp(b: int) -> Any:
        if make_input is not None:
            return make_input(b)
        return _make_input(b, input_shape, seq_len, vocab_size, dtype, p0.device)

    with torch.random.fork_rng(devices=[]):
        _, l2 = _forward_stats(clone, inp(2), ptrs)
        _, l4 = _forward_stats(clone, inp(4), ptrs)
    del clone
    # backward peak (saved tensors still needed + the gradients in flight), linear in batch
    acts = _linear(l2, l4, batch_size)
    # a foreach optimizer step materialises about one temporary per state copy's worth of
    # parameters (e.g. Adam's sqrt(v)); it peaks after the activations are freed
    step_tmp = g_bytes * OPTIMIZER_STATE_COPIES[optimizer_kind]
    return {
        "params": p_bytes,
        "grads": g_bytes,
        "optimizer": o_bytes,
        "activations": acts,
        "total": p_bytes + g_bytes + o_bytes + max(acts, step_tmp),
    }


def _linear(at2: int, at4: int, batch: int) -> int:
    """Extrapolate a byte count measured at batch 2 and 4 linearly to ``batch``."""
    per_sample = max(0.0, (at4 - at2) / 2.0)
    fixed = max(0.0, at2 - 2 * per_sample)
    return int(round(fixed + per_sample * batch))


@torch.no_grad()
def flops_per_sample(model: nn.Module, probe_fn: Callable[[nn.Module], torch.Tensor]) -> float:
    """Forward FLOPs of ``probe_fn(model)`` divided by the output's leading dimension.

    Runs in eval mode (each module's mode restored) with ``torch.utils.flop_counter``; counts
    matmuls/convolutions/attention (elementwise ops are not counted).
    """
    from ..runs.flops import flop_counter

    with eval_mode(model), flop_counter() as fc:
        out = probe_fn(model)
    n = int(out.shape[0]) if out.dim() > 0 else 1
    return float(fc.get_total_flops()) / max(n, 1)


def measure_peak_memory(
    model: nn.Module,
    x: Any,
    optimizer: Callable[[Any], torch.optim.Optimizer] | None = None,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
) -> int:
    """Measured peak bytes of one steady-state training step on CPU.

    Runs one warm-up step on a deep copy of ``model`` (so optimizer state exists), then a
    profiled step: the peak is the bytes alive before the step (parameters, the input,
    optimizer state) plus the high-water mark of the profiler's allocation events
    (``torch.profiler`` with ``profile_memory=True``) during the step.

    Args:
        model: the model (not modified).
        x: the input batch (a tensor, or a dict of keyword tensors).
        optimizer: ``params -> optimizer`` (default Adam, lr 1e-3).
        loss_fn: ``output -> scalar`` (default mean of squares of the output tensor).

    Returns:
        Peak bytes (int).
    """
    from torch.profiler import ProfilerActivity, profile

    from ..ops import output_tensor

    m = copy.deepcopy(model).train()
    opt = (optimizer or (lambda ps: torch.optim.Adam(ps, lr=1e-3)))(m.parameters())
    loss_fn = loss_fn or (lambda out: out.float().pow(2).mean())

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = m(**x) if isinstance(x, dict) else m(x)
        loss_fn(output_tensor(out)).backward()
        opt.step()

    step()
    opt.zero_grad(set_to_none=True)
    inputs = list(x.values()) if isinstance(x, dict) else [x]
    base = sum(p.numel() * p.element_size() for p in m.parameters())
    base += sum(t.numel() * t.element_size() for t in inputs if isinstance(t, torch.Tensor))
    base += sum(
        v.numel() * v.element_size()
        for st in opt.state.values()
        for v in st.values()
        if isinstance(v, torch.Tensor)
    )
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()  # type: ignore[union-attr]
        if e.name() == "[memory]"
    )
    cur = peak = 0
    for _, nb in events:
        cur += nb
        peak = max(peak, cur)
    return base + peak
