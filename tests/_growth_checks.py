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


# --------------------------------------------------------------------------- shared helpers
# (FFN / heads / positions / compound operator tests)
def snapshot(model: nn.Module, opt: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Deep copy of the state dict, the config (if any) and the optimizer state."""
    cfg = getattr(model, "config", None)
    return dict(
        sd={k: v.clone() for k, v in model.state_dict().items()},
        cfg=copy.deepcopy(cfg.__dict__) if cfg is not None else None,
        opt=copy.deepcopy(opt.state_dict()) if opt is not None else None,
        params=[id(p) for p in model.parameters()],
    )


def assert_unchanged(model: nn.Module, snap: dict[str, Any],
                     opt: torch.optim.Optimizer | None = None) -> None:
    """Model (tensors, config, parameter objects) and optimizer are bit-identical to ``snap``."""
    sd = model.state_dict()
    assert sd.keys() == snap["sd"].keys()
    assert all(torch.equal(sd[k], snap["sd"][k]) for k in sd)
    assert [id(p) for p in model.parameters()] == snap["params"]
    cfg = getattr(model, "config", None)
    if cfg is not None:
        assert cfg.__dict__ == snap["cfg"]
    if opt is not None:
        now = opt.state_dict()
        assert now["param_groups"] == snap["opt"]["param_groups"]
        assert now["state"].keys() == snap["opt"]["state"].keys()
        for k, st in now["state"].items():
            for name, v in st.items():
                ref = snap["opt"]["state"][k][name]
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(ref)), (k, name)


def _proj_loss(model: nn.Module, args: tuple, c0: int, proj: torch.Tensor) -> torch.Tensor:
    y = output(model, args, c0) if isinstance(model, nn.TransformerEncoder) else run(model, args)
    if not is_lm(model) and y.shape[-1] != c0:  # widened stream: read the mean of the copies
        y = y.reshape(*y.shape[:-1], -1, c0).mean(-2)
    return (y * proj).sum()


def check_grad_scales(family: str, config: Any, seed: int = 0, rtol: float = 1e-7) -> int:
    """Apply ``config`` to a randomised fp64 ``family`` model and check the documented
    ParamMaps against real gradients: for every grown parameter, new grad == gathered old grad
    * grad_scale on non-new coordinates; parameters without a map keep their gradient.

    Returns:
        number of parameters checked.
    """
    from selfgrow.ops import Transaction

    torch.manual_seed(seed)
    model = randomize_(FAMILIES[family](), seed=seed).double().eval()
    args = make_input(model, dtype=torch.float64, seed=seed)
    c0 = get_adapter(model).dims().d_model
    out = run(model, args)
    proj = torch.randn(out.shape[:-1] + (out.shape[-1] if is_lm(model) else c0,),
                       dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    _proj_loss(model, args, c0, proj).backward()
    old = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    with Transaction() as tx:
        res = get_operator(config).apply(model, config, tx)
    _proj_loss(model, args, c0, proj).backward()
    checked = 0
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        pm = res.param_maps.get(name)
        if pm is None:
            if name in old and old[name].shape == p.shape:
                torch.testing.assert_close(p.grad, old[name], rtol=rtol, atol=1e-10, msg=name)
                checked += 1
            continue
        if pm.source is None or pm.source not in old:
            continue
        want, new_mask = pm.gather(old[pm.source], p.shape)
        gs = pm.grad_scale if isinstance(pm.grad_scale, float) else pm.grad_scale.double()
        want = want * gs
        keep = ~new_mask
        torch.testing.assert_close(p.grad[keep], want.expand(p.shape)[keep], rtol=rtol,
                                   atol=1e-10, msg=name)
        checked += 1
    return checked


def check_exact_sg(cfg_kw: dict[str, Any], config: Any, seed: int, T: int = 4,
                   tol: float = FP64_TOL) -> nn.Module:
    """Property-test body: a randomised fp64 GrowableTransformer built from ``cfg_kw`` keeps
    its output (max rel error <= tol) under ``config``; config and modules agree after."""
    from selfgrow.models.transformer import GrowableTransformer, TransformerConfig

    model = randomize_(GrowableTransformer(TransformerConfig(**cfg_kw)), seed=seed).double()
    model.eval()
    x = torch.randint(0, cfg_kw["vocab_size"], (2, T),
                      generator=torch.Generator().manual_seed(seed))
    ev = grow_(model, config, probe=x)
    assert ev.preservation["exact_expected"], (cfg_kw, config)
    assert ev.preservation["max_rel"] <= tol, (cfg_kw, config, ev.preservation)
    get_adapter(model).check()
    return model


def probed_model(family: str, dtype: torch.dtype = torch.float64
                 ) -> tuple[nn.Module, tuple, Any]:
    """A randomised tiny model of ``family`` in eval mode, its input and ``fn(model)``, the
    output comparable before and after a change (the shrink tests' starting point)."""
    torch.manual_seed(0)
    m = randomize_(FAMILIES[family](), seed=0).to(dtype).eval()
    args = make_input(m, dtype=dtype)
    c0 = get_adapter(m).dims().d_model
    return m, args, (lambda mm: output(mm, args, c0))


def adam_with_state(m: nn.Module, fn: Any) -> torch.optim.Adam:
    """Adam after two steps on ``fn(m)``'s squared output: populated state, no gradients,
    the model back in eval mode."""
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    m.train()
    for _ in range(2):
        opt.zero_grad()
        fn(m).float().pow(2).mean().backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    m.eval()
    return opt
