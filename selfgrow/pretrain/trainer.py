"""The training loop of a pre-training run: one model, one optimizer, one growth controller,
advanced to a point of the budget.

A :class:`Trainer` can be :meth:`branched <Trainer.branch>` (model, optimizer state, data
order, FLOP meter and stabiliser copied) so that a schedule search tries several growths
from one shared prefix. Everything that is random draws from the trainer's own generators
(data order) or the operators' seeded configs: two trainers built with the same arguments
take bitwise identical steps.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..control import GrowthController, Stabilizer
from ..core import rng_isolated
from ..data.text import LMBatches, eval_windows
from ..errors import GrowthConfigError
from ..events.record import GrowthEvent
from ..runs import FlopMeter
from .lr import lr_multiplier

__all__ = ["Budget", "EvalSet", "Trainer", "lm_loss"]


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats per token) of ``model(x)`` ``(B, T, V)`` on
    targets ``y`` ``(B, T)``."""
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


@dataclass(frozen=True)
class Budget:
    """The compute a run may spend: training FLOPs (``kind="flops"``) or training wall-clock
    seconds on this device (``kind="seconds"``)."""

    kind: str
    amount: float

    def __post_init__(self) -> None:
        if self.kind not in ("flops", "seconds"):
            raise GrowthConfigError(f"budget kind {self.kind!r}; valid: 'flops', 'seconds'")
        a = self.amount
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not (
            math.isfinite(a) and a > 0
        ):
            raise GrowthConfigError(
                f"budget_{self.kind}={a!r} is out of range; valid: a finite number > 0"
            )


class EvalSet:
    """Fixed validation windows (shared by every run of a comparison) and their loss.

    ``loss(model)`` is the mean next-token cross-entropy (nats/token) over the windows, at
    ``min(seq_len, model.config.max_seq_len)`` tokens of context (a model whose context is
    still short during a sequence-length warm-up is evaluated on windows it can read).
    """

    def __init__(self, stream: torch.Tensor, seq_len: int, n_windows: int = 64,
                 batch_size: int = 32) -> None:
        self.stream = stream
        self.seq_len = int(seq_len)
        self.n_windows = int(n_windows)
        self.batch_size = int(batch_size)
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def windows(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        if seq_len not in self._cache:
            # the same text at every context length: n_windows * seq_len tokens
            n = max(1, self.n_windows * self.seq_len // seq_len)
            self._cache[seq_len] = eval_windows(self.stream, seq_len, n)
        return self._cache[seq_len]

    @torch.no_grad()
    def loss(self, model: nn.Module, limit: int | None = None, seq_len: int | None = None
             ) -> float:
        t = min(self.seq_len, int(getattr(getattr(model, "config", None), "max_seq_len",
                                          self.seq_len)))
        if seq_len is not None:
            t = min(t, int(seq_len))
        x, y = self.windows(t)
        if limit is not None:
            x, y = x[:limit], y[:limit]
        was = model.training
        model.eval()
        dev = next(model.parameters()).device
        total, n = 0.0, 0
        try:
            for i in range(0, x.shape[0], self.batch_size):
                xb, yb = x[i:i + self.batch_size].to(dev), y[i:i + self.batch_size].to(dev)
                total += float(lm_loss(model, xb, yb)) * xb.numel()
                n += xb.numel()
        finally:
            model.train(was)
        return total / max(n, 1)


@dataclass
class Trainer:
    """State of one training trajectory (see the module docstring).

    Attributes:
        model: the live GrowableTransformer.
        optimizer: AdamW over ``model``'s parameters (migrated in place by every growth).
        controller: the growth controller (events, stabiliser, signals).
        batches: seeded random training windows.
        budget: what the run may spend.
        lr: peak learning rate; ``lr_schedule``/``warmup``/``decay``/``min_ratio`` shape it
            over progress (see :mod:`selfgrow.pretrain.lr`).
        tokens_per_step: tokens per optimizer step (batch = tokens_per_step // seq_len, so a
            sequence-length warm-up keeps the tokens per step).
        seq_len: current training context length.
        meter: training FLOPs (FlopCounterMode per architecture and input shape).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    controller: GrowthController
    batches: LMBatches
    budget: Budget
    lr: float
    lr_schedule: str = "wsd"
    warmup: float = 0.02
    decay: float = 0.2
    min_ratio: float = 0.0
    tokens_per_step: int = 2048
    seq_len: int = 128
    meter: FlopMeter = field(default_factory=lambda: FlopMeter(lm_loss))
    step: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    #: budget spent outside this trajectory's own steps (a search's losing branches)
    overhead: float = 0.0
    last_loss: float = float("nan")

    # --- progress ----------------------------------------------------------------------------
    @property
    def spent(self) -> float:
        """Budget units spent so far (FLOPs or seconds), overhead included."""
        own = self.meter.total if self.budget.kind == "flops" else self.train_seconds
        return own + self.overhead

    @property
    def progress(self) -> float:
        """Fraction of the budget spent, in [0, inf)."""
        return self.spent / self.budget.amount

    def lr_now(self) -> float:
        return self.lr * lr_multiplier(self.lr_schedule, self.progress, self.warmup,
                                       self.decay, self.min_ratio)

    # --- one step ------------------------------------------------------------------------------
    def train_step(self) -> float:
        """One optimizer step; returns its training loss (nats/token)."""
        t = self.seq_len
        b = max(1, self.tokens_per_step // t)
        dev = next(self.model.parameters()).device
        x, y = self.batches.sample(b, t)
        x, y = x.to(dev), y.to(dev)
        lr = self.lr_now()
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        t0 = time.perf_counter()
        self.model.train()
        loss = lm_loss(self.model, x, y)
        loss.backward()
        self.controller.observe(loss.detach(), step=self.step + 1)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        self.train_seconds += time.perf_counter() - t0
        with rng_isolated():
            self.meter.add(self.model, x, y)
        self.step += 1
        self.tokens += x.numel()
        self.last_loss = float(loss.detach())
        return self.last_loss

    def advance(self, until: float, on_step: Callable[[Trainer], None] | None = None,
                stop: Callable[[Trainer], bool] | None = None) -> None:
        """Train until ``progress >= until`` (or ``stop(self)`` is true before a step)."""
        while self.progress < until:
            if stop is not None and stop(self):
                return
            self.train_step()
            if on_step is not None:
                on_step(self)

    # --- growth --------------------------------------------------------------------------------
    def grow(self, config: Any, reason: str, at: float | None = None) -> GrowthEvent:
        """Grow through the controller (event logged, optimizer migrated, LR re-warmed); the
        event's trigger is ``schedule`` with the budget progress and the stage fraction."""
        return self.controller.grow(config, reason=reason, trigger={
            "signal": "schedule", "value": self.progress, "threshold": at})

    # --- branching -----------------------------------------------------------------------------
    def branch(self, controller_factory: Callable[[nn.Module, torch.optim.Optimizer],
                                                  GrowthController]) -> Trainer:
        """An independent copy of this trajectory (model, optimizer state, data order, FLOP
        meter, stabiliser state), with a new controller from ``controller_factory(model,
        optimizer)`` (its stabiliser, if any, gets this one's state)."""
        stab = self.controller.stabilizer
        if stab is not None:
            stab.detach()  # hooks hold the stabiliser; copy the optimizer without them
        try:
            model, opt = copy.deepcopy((self.model, self.optimizer))
        finally:
            if stab is not None:
                stab.attach(self.optimizer)
        ctl = controller_factory(model, opt)
        if stab is not None and ctl.stabilizer is not None:
            ctl.stabilizer.load_state_dict(stab.state_dict())
        batches = LMBatches(self.batches.stream)
        batches.load_state_dict(copy.deepcopy(self.batches.state_dict()))
        other = copy.copy(self)
        other.model, other.optimizer, other.controller, other.batches = model, opt, ctl, batches
        other.meter = copy.deepcopy(self.meter)
        ctl.step = self.controller.step
        return other


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1,
                   betas: Sequence[float] = (0.9, 0.95)) -> torch.optim.Optimizer:
    """AdamW as in GPT-style pre-training (decoupled weight decay on every parameter)."""
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=tuple(betas),  # type: ignore[arg-type]
                             weight_decay=weight_decay)


def default_stabilizer(rewarm_steps: int, lr_scale_after: float = 1.0,
                       clip_grad_norm: float | None = 1.0) -> Stabilizer:
    """LR re-warm-up over ``rewarm_steps`` after each growth (from 10%), optional permanent
    LR scale, global gradient clipping at 1.0 on every step."""
    return Stabilizer(rewarm_steps=rewarm_steps, rewarm_start=0.1,
                      lr_scale_after=lr_scale_after, clip_grad_norm=clip_grad_norm)
