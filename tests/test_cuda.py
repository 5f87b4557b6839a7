"""The operators, the controller and FSDP2 growth on a CUDA GPU (``-m cuda``; skipped without
one). ``scripts/gpu_check`` runs these and ``benchmarks/ops_cost.py --quick --device cuda``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from selfgrow.control import FixedSchedule, GrowthController, LossPlateau
from selfgrow.errors import GrowthConfigError, IncompatibleModelError
from selfgrow.models.transformer import GrowableTransformer, tiny_config
from selfgrow.ops import get_operator, grow_, list_operators, make_config

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
DEV = "cuda"
#: arguments for operators that need them on the tiny transformer (the rest take defaults)
KW = {
    "identity_insert": dict(positions=(1,)), "g_insert": dict(positions=(1,)),
    "g_random": dict(n_new=1, positions=(1,)), "widen_d_model_pad": dict(new_d=24),
    "widen_d_model_masked": dict(new_d=24), "ffn_net2wider": dict(new_d_ff=48),
    "ffn_zero_fanout": dict(new_d_ff=48), "heads_clone": dict(new_n_heads=6),
    "heads_fresh": dict(new_n_heads=6), "extend_positions": dict(new_len=32),
    "ffn_remove_units": dict(n_remove=8), "heads_remove": dict(n_remove=1),
    "remove_layers": dict(layers=(1,)),
}


def _model() -> GrowableTransformer:
    torch.manual_seed(0)
    return GrowableTransformer(tiny_config(dropout=0.0)).to(DEV)


def _adam(model: torch.nn.Module) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 64, (2, 16), device=DEV)
    F.cross_entropy(model(x).reshape(-1, 64), x.reshape(-1)).backward()
    opt.step()
    opt.zero_grad()
    return opt


def _applicable() -> list[str]:
    out = []
    m = GrowableTransformer(tiny_config())
    for op in list_operators():
        if op.startswith("_"):
            continue
        try:
            get_operator(op).validate(m, make_config(op, **KW.get(op, {})))
        except (IncompatibleModelError, GrowthConfigError):
            continue
        out.append(op)
    return out


@pytest.mark.parametrize("op", _applicable())
def test_operator_on_cuda_keeps_its_guarantee(op):
    torch.backends.cuda.matmul.allow_tf32 = False
    model = _model()
    opt = _adam(model)
    probe = torch.randint(0, 64, (4, 16), device=DEV)
    cfg = make_config(op, **KW.get(op, {}))
    exact = get_operator(op).is_exact(model, cfg)
    ev = grow_(model, cfg, optimizer=opt, probe=probe)
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert all(v.device.type == "cuda" for st in opt.state.values() for v in st.values()
               if isinstance(v, torch.Tensor) and v.dim() > 0)
    if exact and ev.preservation.get("exact_expected"):
        assert ev.preservation["max_rel"] < 1e-4, ev.preservation
    x = torch.randint(0, 64, (2, 16), device=DEV)
    F.cross_entropy(model(x).reshape(-1, 64), x.reshape(-1)).backward()
    opt.step()  # the migrated state steps on the GPU
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_controller_grows_on_cuda(tmp_path):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ctrl = GrowthController(model, opt, [LossPlateau(window=4)],
                            FixedSchedule([(3, "deepen"), (6, "widen_ffn", {"factor": 2})]),
                            log_dir=str(tmp_path), probe=torch.randint(0, 64, (2, 16),
                                                                       device=DEV))
    for _ in range(10):
        x = torch.randint(0, 64, (4, 16), device=DEV)
        opt.zero_grad()
        loss = F.cross_entropy(model(x).reshape(-1, 64), x.reshape(-1))
        loss.backward()
        opt.step()
        ctrl.observe(loss=loss)
    ctrl.close()
    assert ctrl.n_growths == 2 and model.config.n_layers == 3
    assert all(e.preservation["max_rel"] < 1e-4 for e in ctrl.events)


def test_fsdp2_growth_on_one_gpu_equals_plain_growth(tmp_path):
    import _fsdp_worker as W
    import test_fsdp as T
    from _growth_helpers import spawn_ranks

    spawn_ranks(W.run, lambda port: (1, port, str(tmp_path), None, "cuda"), 1, tmp_path)
    r0 = torch.load(Path(tmp_path) / "rank0.pt", weights_only=False)
    assert [e[:2] for e in r0["events"]] == [(s, a) for s, a, _ in W.GROWTHS]
    ref = W.build().to(DEV)
    opt = W.make_optimizer(ref)
    for step, action, kw in W.GROWTHS:
        T._load(ref, opt, {k: ({n: t.to(DEV) for n, t in v.items()} if k in ("params", "grads")
                               else {n: {a: b.to(DEV) if isinstance(b, torch.Tensor) else b
                                         for a, b in st.items()} for n, st in v.items()}
                               if k == "state" else v)
                           for k, v in r0["before"][step].items()})
        ctrl = GrowthController(ref, opt)
        torch.manual_seed(r0["seeds"][step])
        ctrl.grow(action, **kw)
        T._equal(W.full_state(ref, opt), r0["after"][step], f"{action} at {step}")
