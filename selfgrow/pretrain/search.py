"""``search``: a budgeted growth-schedule search (the survey's "optimal growth strategy").

Candidates are growth operators applied at the same point of the budget. The small model is
trained ONCE up to that point (the shared prefix); every candidate is a branch of it
(:meth:`Trainer.branch`: model, optimizer state and data order copied), grown, and trained
for a short proxy horizon. The predictor is the validation loss a short while after growth
(landscape-aware growing, LAG: Jiang et al. 2024, "the loss shortly after growth predicts the
final ranking"). Successive halving (Jamieson & Talwalkar 2016): every round keeps the better
half and doubles the horizon, until one candidate is left; it continues as the run.

The search's own FLOPs count against the budget: every losing branch's FLOPs after the
branch point are added to the winner's ``overhead``, so the winner trains only for what is
left (``summary["search"]["flops"]``). The winner keeps the training it got during the
search (nothing is thrown away but the losers).

Hardware awareness: before anything is tried, the grown shape's step time and peak memory
are measured on the device (:func:`measure_shape`); a shape that would not fit in the
available memory is refused (never tried). :func:`fastest_width` rounds a width to the
multiple (8, 16, 32, 64) that measures the highest training throughput on the device.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import GrowthConfigError, InsufficientMemoryError, choices_message
from ..models.transformer import GrowableTransformer, TransformerConfig
from ..ops import available_memory
from .shapes import DEPTH_OPS
from .trainer import Trainer, lm_loss

__all__ = ["fastest_width", "measure_shape", "run_search"]

SEARCH_OPS = (*DEPTH_OPS, "ligo")


def measure_shape(config: TransformerConfig, tokens_per_step: int, seq_len: int,
                  device: torch.device, steps: int = 3) -> dict[str, float]:
    """Measured seconds per AdamW training step and peak bytes of ``config`` on ``device``.

    CPU peak: :func:`selfgrow.control.sizing.measure_peak_memory` (profiler allocation
    events); CUDA: ``torch.cuda.max_memory_allocated``. A fresh model is built (seeded
    locally), the caller's model is not touched.
    """
    from ..control.sizing import measure_peak_memory
    from ..core import rng_isolated

    with rng_isolated():
        torch.manual_seed(0)
        m = GrowableTransformer(config).to(device)
        b = max(1, tokens_per_step // seq_len)
        x = torch.randint(0, config.vocab_size, (b, seq_len), device=device)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            lm_loss(m, x, x).backward()
            opt.step()

        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peak = float(torch.cuda.max_memory_allocated(device))
        else:
            with _quiet_fd2():  # the profiler's C++ side logs to fd 2 on CPU-only machines
                peak = float(measure_peak_memory(m, x, loss_fn=lambda out: out.float().mean()))
        return {"seconds_per_step": (time.perf_counter() - t0) / steps, "peak_bytes": peak}


@contextlib.contextmanager
def _quiet_fd2() -> Iterator[None]:
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def fastest_width(d_model: int, n_heads: int, make_config: Callable[[int], TransformerConfig],
                  tokens_per_step: int, seq_len: int, device: torch.device,
                  multiples: Sequence[int] = (8, 16, 32, 64)) -> tuple[int, dict[int, float]]:
    """Round ``d_model`` up to the multiple that measures the highest throughput.

    Candidates are ``ceil(d_model / m) * m`` for each ``m`` (kept only when divisible by
    ``n_heads``); throughput = useful FLOPs (those of ``d_model``) per measured second, so a
    wider candidate wins only if the device runs it faster per unit of requested work.

    Returns:
        ``(width, {candidate: seconds_per_step})``.
    """
    cands = sorted({int(math.ceil(d_model / m) * m) for m in multiples} | {d_model})
    cands = [c for c in cands if c % n_heads == 0]
    times = {c: measure_shape(make_config(c), tokens_per_step, seq_len, device)[
        "seconds_per_step"] for c in cands}
    best = min(times, key=lambda c: (times[c], c))
    return best, times


def _check_fits(config: TransformerConfig, tokens_per_step: int, seq_len: int,
                device: torch.device) -> dict[str, float]:
    meas = measure_shape(config, tokens_per_step, seq_len, device)
    free = available_memory(device)
    if free is not None and meas["peak_bytes"] > free:
        raise InsufficientMemoryError(
            f"search: the grown shape needs about {meas['peak_bytes'] / 2**20:.0f} MiB per "
            f"training step (measured on {device}), {free / 2**20:.0f} MiB are available; "
            f"it is never tried"
        )
    return meas


def run_search(
    tr: Trainer,
    run: Any,
    plan: Sequence[tuple[float, Any]],
    target_cfg: TransformerConfig,
    ops: list[str],
    horizon: float,
    branch_controller: Callable[[nn.Module, torch.optim.Optimizer], Any],
    on_step: Callable[[Trainer], None],
    grow_fn: Callable[..., dict[str, Any]],
    ligo: dict[str, Any] | None = None,
) -> tuple[Trainer, dict[str, Any]]:
    """Successive halving over ``ops`` at the plan's single boundary (see module docstring).

    Returns:
        ``(winner trainer, report)``; the winner's controller is ``tr``'s logged controller
        (events of its growth land in the run's log), its ``overhead`` holds the losers'
        FLOPs.

    Raises:
        GrowthConfigError: unknown operators, fewer than 1, a plan that is not one boundary,
            or a horizon that does not fit the budget.
        InsufficientMemoryError: the grown shape does not fit the device.
    """
    bad = [o for o in ops if o not in SEARCH_OPS]
    if bad or not ops:
        raise GrowthConfigError(choices_message("search operator", bad[0] if bad else ops,
                                                SEARCH_OPS))
    if len(plan) != 1:
        raise GrowthConfigError(f"search grows at one boundary; got {len(plan)} stages")
    at, _ = plan[0]
    rounds = max(1, math.ceil(math.log2(len(ops))))
    end = at + horizon * (2 ** rounds - 1)
    if not 0.0 < horizon or end >= 0.9:
        raise GrowthConfigError(
            f"search_horizon={horizon!r}: growth at {at:.0%} plus {rounds} halving rounds ends "
            f"at {end:.0%} of the budget; valid: > 0 with the search over before 90%"
        )
    dev = next(tr.model.parameters()).device
    fit = _check_fits(target_cfg, tr.tokens_per_step, min(target_cfg.max_seq_len,
                                                          tr.seq_len * 1), dev)
    tr.advance(at, on_step=on_step)
    base_flops = tr.meter.total
    shadow = copy.copy(run)
    shadow.sinks, shadow.curve, shadow.growths, shadow.eval_points = [], [], [], []
    live: list[tuple[str, Trainer, dict[str, Any]]] = []
    for op in ops:
        b = tr.branch(branch_controller)
        g = grow_fn(b, shadow, target_cfg, op, f"search candidate {op}",
                    dict(ligo or {"steps": 100, "lr": 1e-2}), at)
        live.append((op, b, g))
    table: list[dict[str, Any]] = []
    point = at
    for r in range(rounds):
        point += horizon * 2 ** r
        scores = []
        for op, b, _ in live:
            b.advance(point)
            v = run.evals.loss(b.model)
            scores.append(v)
            table.append({"round": r + 1, "op": op, "checkpoint": point, "val_loss": v,
                          "flops": b.meter.total})
        order = sorted(range(len(live)), key=lambda i: scores[i])
        live = [live[i] for i in order[: max(1, math.ceil(len(live) / 2))]]
        if len(live) == 1:
            break
    losers = [row for row in table if row["op"] != live[0][0]]
    op, win, g = live[0]
    # FLOPs the losers spent after the branch point (their last row holds their total)
    spent: dict[str, float] = {}
    for row in losers:
        spent[row["op"]] = max(spent.get(row["op"], 0.0), row["flops"] - base_flops)
    overhead = float(sum(spent.values()))
    # the winner continues under the run's logged controller
    ctl = tr.controller
    stab_state = win.controller.stabilizer.state_dict() if win.controller.stabilizer else None
    ctl.model = win.model
    ctl.optimizer = win.optimizer
    if stab_state is not None and ctl.stabilizer is not None:
        ctl.stabilizer.load_state_dict(stab_state)
    ctl.step = win.controller.step
    ctl.n_growths = win.controller.n_growths
    ctl.last_growth_step = win.controller.last_growth_step
    ctl.last_attempt_step = win.controller.last_attempt_step
    ranking = ", ".join(f"{row['op']} {row['val_loss']:.4f}" for row in table
                        if row["round"] == 1)
    for ev in win.controller.events:
        ev.reason = (f"search: {op} won successive halving at {at:.0%} of the budget "
                     f"(round-1 val loss: {ranking}); search overhead {overhead:.3g} FLOPs")
        ev.run_id, ev.seq = ctl.run_id, ctl.seq
        ctl.seq += 1
        ctl.events.append(ev)
        for s in ctl.sinks:
            s.emit(ev)
    win.controller = ctl
    win.overhead = tr.overhead + overhead
    g["reason"] = win.controller.events[-1].reason if win.controller.events else g["reason"]
    run.growths.append(g)
    for row in table:
        ms = ctl.metrics_sink
        if ms is not None:
            ms.log_row({"kind": "search", **row})
    report = {"winner": op, "grow_at": at, "rounds": table, "flops": overhead,
              "flops_fraction_of_budget": overhead / tr.budget.amount
              if tr.budget.kind == "flops" else None,
              "target_measured": fit, "horizon": horizon}
    return win, report
