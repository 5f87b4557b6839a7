"""Per-rank body of tests/test_fsdp.py (spawned with torch.multiprocessing, gloo, CPU): a
GrowableTransformer sharded with FSDP2 grows three times (deepen, widen_ffn, widen) from a
FixedSchedule; the full parameters, gradients and optimizer state just before and just
after each growth are saved by rank 0 for the single-process reference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _growth_helpers import init_gloo
from torch import nn

from selfgrow.control import FixedSchedule, FSDP2Strategy, GradientSaturation, GrowthController
from selfgrow.core import full_tensor
from selfgrow.models.transformer import GrowableTransformer, tiny_config

GROWTHS = ((3, "deepen", {}), (6, "widen_ffn", {"factor": 2}), (9, "widen", {"factor": 2}))
STEPS = 12
VOCAB = 32


def build() -> nn.Module:
    torch.manual_seed(0)
    return GrowableTransformer(tiny_config(vocab_size=VOCAB, d_model=8, n_heads=2, head_dim=4,
                                           d_ff=16, max_seq_len=8, dropout=0.0))


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                              {"params": rest, "weight_decay": 0.0}], lr=3e-3)


def batch(step: int, rank: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randint(0, VOCAB, (4, 8), generator=g)
    return x.to(device), torch.roll(x, -1, dims=1).to(device)


def loss_of(model: nn.Module, step: int, rank: int, device: str = "cpu") -> torch.Tensor:
    x, y = batch(step, rank, device)
    return F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))


def full_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Whole tensors by FQN (a collective: every rank calls it)."""
    name = {id(p): n for n, p in model.named_parameters()}
    params = {n: full_tensor(p.detach()).cpu().clone() for n, p in model.named_parameters()}
    grads = {n: full_tensor(p.grad).cpu().clone() for n, p in model.named_parameters()
             if p.grad is not None}
    state = {name[id(p)]: {k: full_tensor(v).cpu().clone() if isinstance(v, torch.Tensor) else v
                           for k, v in st.items()} for p, st in opt.state.items()}
    groups = [[name[id(p)] for p in g["params"]] for g in opt.param_groups]
    return {"params": params, "grads": grads, "state": state, "groups": groups}


def run(rank: int, world: int, port: int, out: str, fail_at: int | None = None,
        device: str = "cpu") -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    if device == "cuda":  # one process per GPU, NCCL (tests/test_cuda.py)
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
        device = f"cuda:{rank}"
    else:
        init_gloo(rank, world, port)
    try:
        model = build().to(device)
        opt = make_optimizer(model)
        ctrl = GrowthController(
            model, opt, signals=[GradientSaturation()],
            policy=FixedSchedule([(s, a, kw) for s, a, kw in GROWTHS]),
            log_dir=str(Path(out) / "run"), run_id="fsdp-test",
            probe=batch(999, 0, device)[0],
            distributed=FSDP2Strategy(growth_seed=1234))
        rec: dict[str, Any] = {"before": {}, "after": {}, "seeds": {}, "losses": [],
                               "sharded": [], "failed": None}
        growth_steps = {s for s, _, _ in GROWTHS}
        for step in range(1, STEPS + 1):
            m = ctrl.wrapped_model
            opt.zero_grad()
            loss = loss_of(m, step, rank, device)
            loss.backward()
            opt.step()
            if step in growth_steps:
                rec["before"][step] = full_state(ctrl.model, opt)
                if fail_at == step:  # a growth that fails: everything must stay as it was
                    import selfgrow.control.controller as cc

                    orig = cc.grow_

                    def boom(*a: Any, **k: Any) -> Any:
                        raise RuntimeError("injected failure")

                    cc.grow_ = boom  # type: ignore[assignment]
                    try:
                        ctrl.observe(loss=loss)
                    finally:
                        cc.grow_ = orig  # type: ignore[assignment]
                    rec["failed"] = full_state(ctrl.model, opt)
                    rec["failed_n"] = ctrl.n_growths
                    continue
                ctrl.observe(loss=loss)
                rec["after"][step] = full_state(ctrl.model, opt)
                rec["seeds"][step] = ctrl.policy.last_seed
            else:
                ctrl.observe(loss=loss)
            rec["losses"].append(float(loss.detach()))
            rec["sharded"].append(all(isinstance(p, DTensor) for p in ctrl.model.parameters())
                                  and all(isinstance(p, DTensor) for g in opt.param_groups
                                          for p in g["params"]))
        rec["final"] = full_state(ctrl.model, opt)
        rec["local_numel"] = sum(p.to_local().numel() for p in ctrl.model.parameters())
        rec["numel"] = sum(p.numel() for p in ctrl.model.parameters())
        rec["events"] = [(e.step, e.action["name"], e.params_after) for e in ctrl.events]
        rec["opt_is_same"] = ctrl.optimizer is opt
        rec["signal"] = ctrl.signals[0].state_dict() if hasattr(ctrl.signals[0], "state_dict") \
            else None
        ctrl.close()
        torch.save(rec, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def refusals(rank: int, port: int, out: str) -> None:
    """Bad inputs to FSDP2Strategy in a 1-process gloo group: each message is recorded."""
    init_gloo(rank, 1, port)
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from selfgrow.errors import GrowthConfigError

    msgs: dict[str, str] = {}

    def record(key: str, fn: Any) -> None:
        try:
            fn()
            msgs[key] = "no error"
        except GrowthConfigError as e:
            msgs[key] = f"GrowthConfigError: {e}"

    try:
        sharded = build()
        fully_shard(sharded)
        record("sharded", lambda: GrowthController(sharded, None,
                                                   distributed=FSDP2Strategy()))
        m = build()
        other = torch.optim.AdamW([nn.Parameter(torch.zeros(3))])
        record("foreign", lambda: GrowthController(m, other, distributed=FSDP2Strategy()))
        record("mesh_kw", lambda: FSDP2Strategy(fsdp_kwargs={"mesh": None}))
        torch.save(msgs, Path(out) / "refusals.pt")
    finally:
        dist.destroy_process_group()
