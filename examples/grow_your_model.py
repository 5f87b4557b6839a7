"""Grow models you already have: a plain nn.Sequential CNN and torchvision's resnet18, under
GrowthController (widen, then deepen), exactly, then checkpoint and resume. Real MNIST digits.
Run: .venv/bin/python examples/grow_your_model.py"""
import tempfile

import torch
import torchvision
from torch import nn

import selfgrow
from selfgrow import FixedSchedule, GrowthController, load_checkpoint, save_checkpoint
from selfgrow.data import load_mnist

data = load_mnist()
x, y = data.x_train[:512], data.y_train[:512]
cnn = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                    nn.Flatten(), nn.Linear(8 * 14 * 14, 10))
resnet = torchvision.models.resnet18(weights=None, num_classes=10)
for name, model, prep in [("Sequential CNN", cnn, lambda b: b),
                          ("resnet18", resnet, lambda b: b.expand(-1, 3, -1, -1))]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ctrl = GrowthController(model, opt, policy=FixedSchedule([(2, "widen"), (4, "deepen")]),
                            probe=prep(x[:16]))
    for step in range(6):
        i = torch.arange(step * 64, step * 64 + 64)
        loss = nn.functional.cross_entropy(model(prep(x[i])), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (ev := ctrl.observe(loss=loss)) is not None:
            print(f"{name}: {ev.action['name']} {ev.params_before:,} -> {ev.params_after:,} "
                  f"params, max rel output change {ev.preservation['max_rel']:.1e}")
    path = f"{tempfile.mkdtemp()}/ckpt.pt"
    save_checkpoint(path, model, opt, controller=ctrl)
    ck = load_checkpoint(path)
    model.eval(), ck.model.eval()
    same = torch.equal(model(prep(x[:16])), ck.model(prep(x[:16])))
    print(f"{name}: resumed {selfgrow.core.count_params(ck.model):,} params, outputs equal: {same}")
