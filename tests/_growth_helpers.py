"""Test-only growable model and operators (names start with "_") for checkpoint, resume and
DDP tests, so these tests do not depend on the reference model families.

``_TinyNet``: ``x (B, d_in) -> [Linear -> ReLU -> Dropout] * len(hidden) -> head (B, d_out)``.
Operators:

* ``_tiny_widen`` (Net2WiderNet): adds ``add`` hidden units to layer ``layer``, each a copy of
  a unit drawn from the GLOBAL torch RNG (so resume and DDP must reproduce RNG state); the
  outgoing weights of every copy group are divided by the group size. Exact.
* ``_tiny_deepen``: inserts an identity Linear after layer ``after`` (input is post-ReLU, so
  non-negative: exact); renames every later layer, which exercises by-name migration.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from selfgrow.models import register_model
from selfgrow.ops import GrowthResult, OpConfig, Operator, Transaction, register_operator
from selfgrow.optim import ParamMap


@dataclass
class _TinyNetConfig:
    d_in: int = 8
    hidden: tuple[int, ...] = (16,)
    d_out: int = 4
    dropout: float = 0.0


@register_model(_TinyNetConfig)
class _TinyNet(nn.Module):
    def __init__(self, config: _TinyNetConfig) -> None:
        super().__init__()
        self.config = config
        dims = (config.d_in, *config.hidden)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:], strict=False))
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(dims[-1], config.d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = self.drop(torch.relu(layer(x)))  # (B, hidden[i])
        return self.head(x)  # (B, d_out)


def _reader(model: _TinyNet, i: int) -> tuple[nn.Module, str]:
    """(parent, child name) of the Linear reading layer i's output."""
    if i + 1 < len(model.layers):
        return model.layers, str(i + 1)
    return model, "head"


@dataclass
class _WidenConfig(OpConfig):
    name: ClassVar[str] = "_tiny_widen"
    layer: int = 0
    add: int = 4


@register_operator(_WidenConfig)
class _TinyWiden(Operator):
    exact = True

    def apply(self, model: nn.Module, config: OpConfig, tx: Transaction) -> GrowthResult:
        if not isinstance(model, _TinyNet) or not isinstance(config, _WidenConfig):
            raise TypeError("_tiny_widen needs a _TinyNet and a _WidenConfig")
        i = config.layer
        src = model.layers[i]
        h = src.out_features
        idx = torch.cat([torch.arange(h), torch.randint(0, h, (config.add,))])  # global RNG
        return split_units(model, i, idx, tx)


def split_units(model: _TinyNet, i: int, idx: torch.Tensor, tx: Transaction) -> GrowthResult:
    """Net2WiderNet of hidden layer ``i`` of a _TinyNet: new unit ``j`` copies old unit
    ``idx[j]``; the reader's columns are divided by each unit's copy count (exact)."""
    src = model.layers[i]
    scale = 1.0 / torch.bincount(idx, minlength=src.out_features).float()[idx]
    new = nn.Linear(src.in_features, len(idx))
    new.weight.data = src.weight.data[idx].clone()
    new.bias.data = src.bias.data[idx].clone()
    parent, child = _reader(model, i)
    rd = parent._modules[child]
    new_rd = nn.Linear(len(idx), rd.out_features)
    new_rd.weight.data = rd.weight.data[:, idx] * scale
    new_rd.bias.data = rd.bias.data.clone()
    tx.replace_module(model.layers, str(i), new)
    tx.replace_module(parent, child, new_rd)
    hidden = list(model.config.hidden)
    hidden[i] = len(idx)
    tx.set_attr(model, "config", dataclasses.replace(model.config, hidden=tuple(hidden)))
    rd_name = f"layers.{i + 1}" if parent is model.layers else "head"
    w, b = f"layers.{i}.weight", f"layers.{i}.bias"
    return GrowthResult(param_maps={
        w: ParamMap(w, (idx, None), scale.view(-1, 1)),
        b: ParamMap(b, (idx,), scale),
        f"{rd_name}.weight": ParamMap(f"{rd_name}.weight", (None, idx)),
    })


def init_gloo(rank: int, world: int, port: int) -> None:
    """One thread per worker and a CPU (gloo) process group on localhost:``port``."""
    import datetime
    import faulthandler
    import os

    import torch.distributed as dist

    faulthandler.enable()  # a native crash in a worker prints its Python stack

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )


@dataclass
class _DeepenConfig(OpConfig):
    name: ClassVar[str] = "_tiny_deepen"
    after: int = 0


@register_operator(_DeepenConfig)
class _TinyDeepen(Operator):
    exact = True

    def apply(self, model: nn.Module, config: OpConfig, tx: Transaction) -> GrowthResult:
        if not isinstance(model, _TinyNet) or not isinstance(config, _DeepenConfig):
            raise TypeError("_tiny_deepen needs a _TinyNet and a _DeepenConfig")
        a = config.after
        h = model.layers[a].out_features
        ident = nn.Linear(h, h)
        ident.weight.data = torch.eye(h)
        ident.bias.data = torch.zeros(h)
        old = list(model.layers)
        new_layers = [*old[: a + 1], ident, *old[a + 1 :]]
        maps: dict[str, ParamMap] = {}
        for j in range(a + 1, len(old)):
            for p in ("weight", "bias"):
                maps[f"layers.{j + 1}.{p}"] = ParamMap(f"layers.{j}.{p}")
        maps[f"layers.{a + 1}.weight"] = ParamMap(None)
        maps[f"layers.{a + 1}.bias"] = ParamMap(None)
        tx.set_modules(model.layers, {str(k): m for k, m in enumerate(new_layers)})
        hidden = list(model.config.hidden)
        hidden.insert(a + 1, h)
        tx.set_attr(model, "config", dataclasses.replace(model.config, hidden=tuple(hidden)))
        return GrowthResult(param_maps=maps)


def batch(seed: int, step: int, n: int = 16, d_in: int = 8, d_out: int = 4):
    """The batch of ``step``: a pure function of (seed, step), so data order survives resume."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    x = torch.randn(n, d_in, generator=g)
    y = torch.randn(n, d_out, generator=g)
    return x, y


def free_port() -> int:
    """A TCP port on localhost that was free a moment ago."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn_ranks(fn: Callable[..., None], args: Callable[[int], tuple[Any, ...]],
                nprocs: int, out: Path | None = None) -> None:
    """``torch.multiprocessing.spawn(fn, args(port), nprocs)`` on a fresh port, rerun ONCE when
    a worker was killed by a signal (a native crash such as gloo's intermittent
    ``free(): invalid pointer`` at teardown; faulthandler prints its stack above). A Python
    exception in a worker, or a second native crash, fails the test as usual; the rerun is
    reported as a warning so it stays visible, and starts from an emptied ``out``."""
    import shutil
    import warnings

    import torch.multiprocessing as mp

    try:
        mp.spawn(fn, args=args(free_port()), nprocs=nprocs, join=True)
    except mp.ProcessExitedException as e:
        if not e.signal_name:
            raise
        warnings.warn(f"a worker died from {e.signal_name} (native crash); rerunning once",
                      RuntimeWarning, stacklevel=2)
        if out is not None:
            shutil.rmtree(out)
            out.mkdir(parents=True)
        mp.spawn(fn, args=args(free_port()), nprocs=nprocs, join=True)
