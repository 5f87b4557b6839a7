"""Capacity probing before an experience: does growing help on the data that just arrived?

Before training experience ``k >= 1`` the probe runs a short trial for "no growth" and for
every candidate action (``widen``, ``deepen``, ...) on copies of the model and optimizer:
``steps`` optimizer steps on the new experience's data (mixed with half of the stored samples
of past experiences, like replay), then it measures accuracy on held-out new samples and on
the other half of the stored old samples. A candidate's score is the mean of the two
accuracies; the best candidate is recommended when it beats "no growth" by at least
``margin``. So the model grows before an experience only when a trial says the extra width
(or depth) learns the new classes better without losing the old ones, and the kind of growth
is the one the trial preferred. This is the "evaluate capacity" step of the self-growing
survey's continual loop (a short trial on the new data measuring the drop on old data),
made to choose between width and depth.

Every trial starts from the same copies and draws its batches from the same seeded
generator, so the candidates differ only by their architecture. The live model, its
optimizer and the global RNG are untouched. The trials' training FLOPs are counted
(:attr:`ProbeReport.flops`) so a run can charge them to its budget.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core import count_params, rng_isolated
from ..errors import GrowthConfigError


@dataclass
class ProbeTrial:
    """One candidate's trial: ``action`` (None = no growth), accuracies after the trial on
    held-out new samples and on held-out stored old samples (fractions in [0, 1]), their
    mean ``score``, and the parameter count of the candidate model."""

    action: str | None
    new_accuracy: float
    old_accuracy: float
    score: float
    params: int


@dataclass
class ProbeReport:
    """Outcome of :meth:`CapacityProbe.run`.

    Attributes:
        trials: one :class:`ProbeTrial` per candidate, "no growth" first.
        choice: the recommended action, or None (no candidate beat no growth by ``margin``).
        gain: best candidate's score minus no growth's (accuracy points as a fraction).
        flops: training + evaluation FLOPs the trials cost (FlopCounterMode count).
        samples: training samples seen by all trials together.
    """

    trials: list[ProbeTrial]
    choice: str | None
    gain: float
    flops: float
    samples: int = 0
    old_baseline: float = float("nan")

    def describe(self) -> str:
        """One line for the event's reason, e.g. ``capacity probe: widen +0.031 (...)``."""
        base = self.trials[0]
        parts = [f"{t.action}: {t.score - base.score:+.3f}" for t in self.trials[1:]]
        head = (f"capacity probe chose {self.choice} ({self.gain:+.3f} mean new/old accuracy "
                if self.choice else "capacity probe: no growth (")
        return (f"{head}over no growth {base.score:.3f}; {', '.join(parts)}; new acc "
                f"{base.new_accuracy:.3f}, old acc {base.old_accuracy:.3f})")

    def to_dict(self) -> dict[str, Any]:
        return {"choice": self.choice, "gain": self.gain, "flops": self.flops,
                "samples": self.samples,
                "trials": [vars(t).copy() for t in self.trials]}


@dataclass
class CapacityProbe:
    """Short trials that decide whether, and how, to grow before an experience.

    Args:
        candidates: growth actions to try (names from ``selfgrow.control.list_actions``).
        action_kwargs: per action, its arguments (e.g. ``{"widen": {"factor": 2.0}}``).
        steps: optimizer steps per trial.
        batch_size: new samples per step (plus as many stored old samples when there are).
        margin: minimum score gain (fraction of accuracy) over no growth to recommend a
            candidate.
        held_out: fraction of the new experience's samples (at most ``max_new``) kept to
            measure new-data accuracy.
        max_new: new samples drawn for the trial (train + held out).
        seed: seed of the trial's sample order (the same for every candidate).

    Raises:
        GrowthConfigError: a value out of range (named), no candidates.
    """

    candidates: tuple[str, ...] = ("widen", "deepen")
    action_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    steps: int = 40
    batch_size: int = 32
    margin: float = 0.01
    held_out: float = 0.25
    max_new: int = 800
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.candidates or not all(isinstance(c, str) for c in self.candidates):
            raise GrowthConfigError(
                f"candidates={self.candidates!r} must be a non-empty list of action names")
        for what, v, lo in (("steps", self.steps, 1), ("batch_size", self.batch_size, 1),
                            ("max_new", self.max_new, 4)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise GrowthConfigError(f"{what}={v!r} is out of range; valid: integer >= {lo}")
        if not (0.0 < self.held_out < 1.0):
            raise GrowthConfigError(f"held_out={self.held_out} is out of range; valid: (0, 1)")
        if not (math.isfinite(self.margin) and self.margin >= 0):
            raise GrowthConfigError(f"margin={self.margin} is out of range; valid: >= 0")
        self.candidates = tuple(self.candidates)

    def run(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        new: tuple[torch.Tensor, torch.Tensor],
        old: tuple[torch.Tensor, torch.Tensor] | None,
        allowed: list[str] | None = None,
        loss_fn: nn.Module | None = None,
        apply: Callable[[str | None, nn.Module, torch.optim.Optimizer], None] | None = None,
    ) -> ProbeReport:
        """Run the trials on copies of ``model`` and ``optimizer``.

        Args:
            model: the live model (not modified).
            optimizer: its optimizer (not modified; copied with the model so the trial
                continues from the same Adam state, migrated by each growth).
            new: ``(x, y)`` samples of the new experience, ``x`` of the model's input shape.
            old: ``(x, y)`` stored samples of past experiences, or None.
            allowed: candidates to consider (e.g. those that fit the budget); default all.
            loss_fn: training loss (default cross-entropy).
            apply: ``apply(candidate, model_copy, optimizer_copy)`` prepares one trial's
                copies in place, the "no growth" trial included (``candidate`` None); for
                models whose candidates are not controller actions (DER: expand with or
                without a new extractor). Default: no growth does nothing, a candidate is
                applied with ``resolve_action`` and ``grow_`` (optimizer migrated).

        Returns:
            The :class:`ProbeReport`.
        """
        from ..control.actions import resolve_action
        from ..ops import grow_
        from ..runs import training_flops_per_sample

        loss_fn = loss_fn or nn.CrossEntropyLoss()
        device = next(model.parameters()).device
        with rng_isolated():
            g = torch.Generator().manual_seed(self.seed)
            nx, ny = new
            idx = torch.randperm(len(nx), generator=g)[: self.max_new]
            n_hold = max(1, int(round(self.held_out * len(idx))))
            new_tr = (nx[idx[n_hold:]], ny[idx[n_hold:]])
            new_te = (nx[idx[:n_hold]], ny[idx[:n_hold]])
            old_tr = old_te = None
            if old is not None and len(old[0]) >= 2:
                oi = torch.randperm(len(old[0]), generator=g)
                half = len(oi) // 2
                old_tr = (old[0][oi[:half]], old[1][oi[:half]])
                old_te = (old[0][oi[half:]], old[1][oi[half:]])
            if len(new_tr[0]) < 1:
                raise GrowthConfigError(
                    f"the capacity probe needs new samples to train on; got {len(nx)}")
            schedule = [
                (torch.randint(len(new_tr[0]), (self.batch_size,), generator=g),
                 torch.randint(len(old_tr[0]), (self.batch_size,), generator=g)
                 if old_tr is not None else None)
                for _ in range(self.steps)
            ]
            trials: list[ProbeTrial] = []
            flops = 0.0
            samples = 0
            cands: list[str | None] = [None] + [c for c in self.candidates
                                                if allowed is None or c in allowed]
            old_base = float("nan")
            for ci, cand in enumerate(cands):
                torch.manual_seed(self.seed + ci)
                m, opt = copy.deepcopy((model, optimizer))
                if apply is not None:
                    apply(cand, m, opt)
                elif cand is not None:
                    cfg = resolve_action(cand, m, **self.action_kwargs.get(cand, {}))
                    grow_(m, cfg, optimizer=opt)
                if ci == 0 and old_te is not None:
                    old_base = _accuracy(m, old_te, device)
                m.train()
                fps: float | None = None
                for ni, oi_ in schedule:
                    x, y = new_tr[0][ni], new_tr[1][ni]
                    if oi_ is not None and old_tr is not None:
                        x = torch.cat([x, old_tr[0][oi_]])
                        y = torch.cat([y, old_tr[1][oi_]])
                    x, y = x.to(device), y.to(device)
                    if fps is None:
                        fps = training_flops_per_sample(m, x, y)
                    opt.zero_grad(set_to_none=True)
                    loss_fn(m(x), y).backward()
                    opt.step()
                    samples += len(x)
                    flops += (fps or 0.0) * len(x)
                new_acc = _accuracy(m, new_te, device)
                old_acc = _accuracy(m, old_te, device) if old_te is not None else new_acc
                trials.append(ProbeTrial(cand, new_acc, old_acc, 0.5 * (new_acc + old_acc),
                                         count_params(m)))
                n_eval = len(new_te[0]) + (len(old_te[0]) if old_te is not None else 0)
                flops += (fps or 0.0) / 3.0 * n_eval  # forward only: about a third
                del m, opt
        base = trials[0].score
        best = max(trials[1:], key=lambda t: t.score, default=None)
        gain = (best.score - base) if best is not None else 0.0
        choice = best.action if best is not None and gain >= self.margin else None
        return ProbeReport(trials, choice, gain, flops, samples, old_base)


def _accuracy(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor] | None,
              device: torch.device) -> float:
    if data is None or len(data[0]) == 0:
        return float("nan")
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            correct = 0
            for i in range(0, len(data[0]), 512):
                x = data[0][i:i + 512].to(device)
                y = data[1][i:i + 512].to(device)
                correct += int((model(x).argmax(-1) == y).sum())
    finally:
        model.train(was)
    return correct / len(data[0])
