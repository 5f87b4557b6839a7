"""Shared checks for the transformer growth operators (depth and width test matrices)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from _families import FAMILIES, make_input, randomize_, run
from torch import nn

from selfgrow.adapters import get_adapter
from selfgrow.ops import get_operator, grow_, list_operators, make_config

FP32_TOL = 1e-5
FP64_TOL = 1e-12
#: HF LLaMA computes RMSNorm in fp32 even for fp64 inputs: fp64 exactness is limited to fp32
#: round-off of the norm statistics there (documented, not a growth error)
FP32_INTERNAL = ("hf-llama",)


def ops_of(module_suffix: str) -> list[str]:
    """Registered operators defined in ``selfgrow.ops.<module_suffix>`` (registry-driven)."""
    return [n for n in list_operators()
            if type(get_operator(n)).__module__ == f"selfgrow.ops.{module_suffix}"]


def is_lm(model: nn.Module) -> bool:
    return hasattr(model, "lm_head") or hasattr(model, "head")


def output(model: nn.Module, args: tuple, c0: int) -> torch.Tensor:
    """Model output comparable with the pre-growth one: logits, or the first ``c0``
    coordinates of a (widened) hidden state; nn encoders get their input tiled/padded."""
    if isinstance(model, nn.TransformerEncoder):
        c = get_adapter(model).dims().d_model
        x = args[0]
        if c != x.shape[-1]:
            reps = -(-c // x.shape[-1])
            x = x.repeat(1, 1, reps)[..., :c]
        args = (x,)
    y = run(model, args)
    return y if is_lm(model) else y[..., :c0]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def tolerance(family: str, dtype: torch.dtype) -> float:
    if dtype == torch.float32:
        return FP32_TOL
    return 1e-6 if family.startswith(FP32_INTERNAL) else FP64_TOL


def grown(family: str, op: str, kwargs: dict[str, Any], dtype: torch.dtype = torch.float32,
          seed: int = 0, optimizer: bool = False) -> dict[str, Any]:
    """Build a randomised tiny model of ``family``, grow it with ``op`` and measure."""
    torch.manual_seed(seed)
    model = randomize_(FAMILIES[family](), seed=seed).to(dtype).eval()
    args = make_input(model, dtype=dtype, seed=seed)
    c0 = get_adapter(model).dims().d_model
    before = output(model, args, c0).detach()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3) if optimizer else None
    if opt is not None:
        model.train()
        run(model, args).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        model.eval()
        before = output(model, args, c0).detach()
    cfg = make_config(op, **kwargs)
    ev = grow_(model, cfg, optimizer=opt, probe_fn=lambda m: output(m, args, c0))
    after = output(model, args, c0).detach()
    return dict(model=model, args=args, c0=c0, before=before, after=after, event=ev,
                err=rel_err(after, before), exact=ev.preservation["exact_expected"], opt=opt)


def check_roundtrip(model: nn.Module, args: tuple, c0: int) -> None:
    """A fresh model built from the grown config loads the grown state dict and gives the
    same outputs; config and modules agree."""
    ad = get_adapter(model)
    ad.check()
    fresh = ad.build_fresh().to(next(model.parameters()).dtype).eval()
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=True), None
    del missing, unexpected
    torch.testing.assert_close(output(fresh, args, c0), output(model, args, c0), rtol=0, atol=0)


def check_optimizer_step(model: nn.Module, opt: torch.optim.Optimizer, args: tuple) -> None:
    """After growth the migrated optimizer holds exactly the model's parameters, its state
    has their shapes, and a step leaves every parameter finite."""
    params = {id(p) for g in opt.param_groups for p in g["params"]}
    assert params == {id(p) for p in model.parameters()}
    for p, st in opt.state.items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.dim():
                assert v.shape == p.shape, k
    model.train()
    c = get_adapter(model).dims().d_model
    output(model, args, c).float().pow(2).mean().backward()
    opt.step()
    model.eval()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def check_grads(model: nn.Module, args: tuple) -> None:
    """Train-mode backward through the grown model gives finite gradients everywhere."""
    m = copy.deepcopy(model).train()
    c = get_adapter(m).dims().d_model
    output(m, args, c).float().pow(2).mean().backward()
    for n, p in m.named_parameters():
        if p.requires_grad:
            assert p.grad is not None or "pooler" in n, n
            if p.grad is not None:
                assert torch.isfinite(p.grad).all(), n
