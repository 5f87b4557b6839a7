"""Growth between ``backward()`` and ``step()`` (gradient accumulation): accumulated ``.grad``
tensors follow the parameter map, so the pending step updates every parameter.

Checked against the model grown BEFORE the backward passes: for an exact operator the
migrated gradient of every tensor derived from an old one equals the gradient the grown model
computes on the same micro-batches (copies get their share, new coordinates 0), and a run
that grows mid-accumulation updates the same set of tensors as a run that grows after the
step. Before the fix the grown tensors had ``grad=None`` and the pending step updated only
the untouched output bias.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from selfgrow import GrowthController, build_model, grow_
from selfgrow.models.cnn import CNNConfig
from selfgrow.models.mlp import MLPConfig
from selfgrow.ops.net2net import Net2DeeperConfig, Net2WiderConfig

torch.set_default_dtype(torch.float32)


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(MLPConfig(in_features=64, hidden=(8,), n_classes=10)).double()


def _cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    m = build_model(CNNConfig(in_channels=1, image_size=8, channels=(3, 4), n_classes=10,
                              pool_after=(0,)))
    return m.double().eval()  # BatchNorm in eval: the function (and so its gradient) is exact


def _batches(model: torch.nn.Module, n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    shape = (16, 1, 8, 8) if "CNN" in type(model).__name__ else (16, 64)
    return [(torch.randn(shape, generator=g, dtype=torch.float64),
             torch.randint(0, 10, (16,), generator=g)) for _ in range(n)]


def _backward(model: torch.nn.Module, batches: list) -> None:
    for x, y in batches:
        F.cross_entropy(model(x), y).backward()


CASES = {
    "mlp-net2wider": (_mlp, Net2WiderConfig(layer=0, new_width=13, seed=3)),
    "cnn-net2wider": (_cnn, Net2WiderConfig(layer=1, new_width=7, seed=3)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_accumulated_gradients_equal_the_grown_models_gradients(case):
    make, cfg = CASES[case]
    model = make()
    batches = _batches(model)
    _backward(model, batches[:2])  # two micro-batches accumulated ...
    grow_(model, cfg)  # ... grow ...
    _backward(model, batches[2:])  # ... and one more into the migrated .grad
    got = {n: p.grad for n, p in model.named_parameters()}

    ref = copy.deepcopy(model)  # the same grown weights, gradients from scratch
    ref.zero_grad(set_to_none=True)
    _backward(ref, batches)
    for n, p in ref.named_parameters():
        assert got[n] is not None, f"{n}: accumulated gradient dropped by the growth"
        torch.testing.assert_close(got[n], p.grad, rtol=1e-9, atol=1e-12, msg=n)


def test_split_noise_copies_get_their_documented_mean_share():
    """With ``split_noise`` the outgoing shares differ per output row, so a copy's incoming
    gradient is no fixed multiple of its source's: the migrated gradient is the documented
    mean share ``1/c`` of the source's (docs/optimizer-after-growth.md); every other tensor's
    gradient equals the grown model's exactly."""
    model = _mlp()
    batches = _batches(model, 2)
    _backward(model, batches)
    w_old = model.hidden[0].weight.detach().clone()
    g_old = {n: p.grad.clone() for n, p in model.named_parameters()}
    grow_(model, Net2WiderConfig(layer=0, new_width=16, split_noise=0.5, seed=3))
    w_new = model.hidden[0].weight.detach()
    src = torch.cdist(w_new, w_old).argmin(1)  # noise_std=0: copies have identical rows
    counts = torch.bincount(src, minlength=w_old.shape[0]).double()
    torch.testing.assert_close(model.hidden[0].weight.grad,
                               g_old["hidden.0.weight"][src] / counts[src, None])
    torch.testing.assert_close(model.hidden[0].bias.grad,
                               g_old["hidden.0.bias"][src] / counts[src])
    got = {n: p.grad for n, p in model.named_parameters()}
    ref = copy.deepcopy(model)
    ref.zero_grad(set_to_none=True)
    _backward(ref, batches)
    for n, p in ref.named_parameters():
        if not n.startswith("hidden.0."):
            torch.testing.assert_close(got[n], p.grad, rtol=1e-9, atol=1e-12, msg=n)


def test_brand_new_tensors_get_zero_gradients_and_old_ones_are_kept():
    model = _mlp()
    batches = _batches(model, 1)
    _backward(model, batches)
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    grow_(model, Net2DeeperConfig(layer=0))
    named = dict(model.named_parameters())
    new = [n for n in named if n not in before]
    assert new, "net2deeper added no tensor"
    for n in new:
        assert named[n].grad is not None and not named[n].grad.any(), n
    for n, g in before.items():
        torch.testing.assert_close(named[n].grad, g, msg=n)


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.Adam])
def test_the_pending_step_updates_every_tensor_like_growing_after_the_step(opt_cls):
    cfg = Net2WiderConfig(layer=0, new_width=13, seed=3)

    def changed(grow_before_step: bool) -> set[str]:
        model = _mlp()
        opt = opt_cls(model.parameters(), lr=1e-2)
        _backward(model, _batches(model, 1))
        if grow_before_step:
            grow_(model, cfg, optimizer=opt)
        w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), w0[n])}

    after = changed(grow_before_step=False)
    mid = changed(grow_before_step=True)
    assert after == {n for n, _ in _mlp().named_parameters()}
    assert mid == after, f"the pending step skipped {sorted(after - mid)}"


def test_adam_new_tensors_wait_for_a_nonzero_gradient():
    """A brand-new tensor gets a zero migrated gradient: its lazy Adam state (v = c * g**2 at
    its first gradient) must wait for a nonzero gradient instead of setting v = 0."""
    from selfgrow.optim import LAZY_INIT_KEY

    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for x, y in _batches(model, 3):  # some Adam history
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    opt.zero_grad()
    _backward(model, _batches(model, 1))
    grow_(model, Net2DeeperConfig(layer=0), optimizer=opt)
    waiting = [p for p, st in opt.state.items() if LAZY_INIT_KEY in st]
    assert waiting, "the inserted layer should await its first gradient"
    opt.step()  # the pending step: the new tensors' migrated gradients are 0
    assert all(LAZY_INIT_KEY in opt.state[p] for p in waiting), "initialised from a zero gradient"
    opt.zero_grad()
    _backward(model, _batches(model, 1))
    opt.step()  # the first real gradient sets their state
    for p in waiting:
        st = opt.state[p]
        assert LAZY_INIT_KEY not in st
        assert torch.isfinite(st["exp_avg_sq"]).all() and (st["exp_avg_sq"] > 0).any()


def test_controller_grow_mid_accumulation_keeps_gradients():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctrl = GrowthController(model, opt)
    _backward(model, _batches(model, 1))
    ctrl.grow("widen", factor=2.0)
    assert all(p.grad is not None for p in model.parameters())
