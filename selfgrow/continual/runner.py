"""The ``selfgrow run`` experiment: a growing model against two fixed baselines on an offline
class-incremental benchmark, with Avalanche doing the continual-learning bookkeeping.

Three variants share benchmark, strategy, optimizer, learning rate and seed:

* ``grown``: starts small; a :class:`~selfgrow.control.GrowthController` grows it while it
  learns (through :class:`~selfgrow.continual.plugin.GrowthPlugin`);
* ``fixed_small``: the same small starting model, never grown;
* ``fixed_grown``: a freshly initialised model of the grown run's final config.

Accuracy and forgetting come from Avalanche's ``accuracy_metrics`` / ``forgetting_metrics``
(a full test-stream evaluation after every experience). Training FLOPs are counted with
``torch.utils.flop_counter.FlopCounterMode``: forward + backward of one mini-batch per distinct
architecture, divided by its size, times the samples trained on with that architecture.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core import count_params
from ..errors import GrowthConfigError, choices_message
from ..runs import (
    FlopMeter,
    ScalarJsonlSink,
    check_run_name,
    check_runs_dir,
    create_run_dir,
    fmt,
    format_table,
    isatty,
    package_versions,
    write_json,
)
from .benchmarks import BENCHMARKS, Benchmark, build_benchmark

STRATEGIES = ("replay", "naive")
MODELS = ("mlp", "cnn")
VARIANTS = ("grown", "fixed_small", "fixed_grown")
VARIANT_LABELS = {
    "grown": "grown (selfgrow)",
    "fixed_small": "fixed small",
    "fixed_grown": "fixed, grown size",
}


@dataclass
class RunSpec:
    """Everything that defines a ``selfgrow run`` (written to ``config.json``).

    Attributes:
        benchmark: see :data:`~selfgrow.continual.benchmarks.BENCHMARKS`.
        strategy: ``"replay"`` (experience replay, ``mem_size`` samples) or ``"naive"``.
        model: ``"mlp"`` or ``"cnn"`` (small starting sizes ``width`` / ``channels``).
        mem_size: replay buffer size in samples.
        epochs: training epochs per experience.
        batch_size: mini-batch size (new data; replay adds as many buffer samples).
        lr: Adam learning rate, the same for all three variants.
        seed: seed of data split, initialisation and data order.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        baselines: also train the two fixed baselines.
        width: hidden width of the small MLP (one hidden layer).
        channels: channels of the first of the small CNN's two conv blocks.
        on_plateau: action fired by the LossPlateau signal.
        on_forgetting: action fired by the ReplayForgetting signal.
        widen_factor: width multiplier of the ``widen`` action.
        widen_noise: std of the noise added to copied units' incoming weights (Net2WiderNet
            ``noise_std``); makes the growth inexact by about this much. Default 0.
        widen_split_noise: exact symmetry breaking (Net2WiderNet ``split_noise``): copies of
            a unit share its outgoing weights unevenly (shares still sum to 1). Without any
            symmetry breaking twin units receive identical gradients forever and the extra
            width adds no capacity.
        plateau_window: LossPlateau horizon in optimizer steps.
        plateau_min_rel_drop: LossPlateau trigger (relative loss improvement per window).
        forgetting_threshold: ReplayForgetting trigger (accuracy drop on replayed samples).
        replay_eval_every: replay accuracy period in optimizer steps.
        cooldown: minimum optimizer steps between two growths.
        max_growths: growth limit.
        max_params: parameter budget of the grown model.
    """

    benchmark: str = "split-mnist"
    strategy: str = "replay"
    model: str = "mlp"
    mem_size: int = 300
    epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    device: str = "cpu"
    baselines: bool = True
    width: int = 8
    channels: int = 8
    on_plateau: str = "widen"
    on_forgetting: str = "widen"
    widen_factor: float = 2.0
    widen_noise: float = 0.0
    widen_split_noise: float = 0.5
    plateau_window: int = 60
    plateau_min_rel_drop: float = 0.02
    forgetting_threshold: float = 0.2
    replay_eval_every: int = 10
    cooldown: int = 100
    max_growths: int = 4
    max_params: float = 2e5

    def validate(self) -> None:
        """Check every name and range before anything is written.

        Raises:
            GrowthConfigError: unknown benchmark / strategy / model / action (lists the valid
                choices) or a value out of range.
        """
        if self.benchmark not in BENCHMARKS:
            raise GrowthConfigError(choices_message("benchmark", self.benchmark, list(BENCHMARKS)))
        if self.strategy not in STRATEGIES:
            raise GrowthConfigError(choices_message("strategy", self.strategy, STRATEGIES))
        if self.model not in MODELS:
            raise GrowthConfigError(choices_message("model", self.model, MODELS))
        actions = available_actions(self.model)
        for what, a in (("on-plateau", self.on_plateau), ("on-forgetting", self.on_forgetting)):
            if a not in actions:
                raise GrowthConfigError(choices_message(f"growth action ({what})", a, actions))
        for what, v, lo in (
            ("seed", self.seed, 0),
            ("epochs", self.epochs, 1),
            ("batch_size", self.batch_size, 1),
            ("mem_size", self.mem_size, 1),
            ("width", self.width, 1),
            ("channels", self.channels, 1),
            ("plateau_window", self.plateau_window, 1),
            ("replay_eval_every", self.replay_eval_every, 1),
            ("cooldown", self.cooldown, 0),
            ("max_growths", self.max_growths, 0),
        ):
            if int(v) < lo:
                raise GrowthConfigError(f"{what}={v} is out of range; valid: >= {lo}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise GrowthConfigError(f"lr={self.lr} is out of range; valid: > 0")
        if not self.widen_factor > 1:
            raise GrowthConfigError(f"widen_factor={self.widen_factor} must be > 1")
        if not (self.widen_noise >= 0 and math.isfinite(self.widen_noise)):
            raise GrowthConfigError(f"widen_noise={self.widen_noise} must be >= 0")
        if not (self.widen_split_noise >= 0 and math.isfinite(self.widen_split_noise)):
            raise GrowthConfigError(f"widen_split_noise={self.widen_split_noise} must be >= 0")
        resolve_device(self.device)


def available_actions(model_kind: str) -> list[str]:
    """Growth actions the model family offers (``widen``, ``deepen``, ...)."""
    from ..control.actions import list_actions

    return list_actions(build_small_model(model_kind, (1, 8, 8), 10, 4, 2))


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available else CPU.

    Raises:
        GrowthConfigError: unknown device or CUDA requested but unavailable.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise GrowthConfigError(f"device {device!r} requested but CUDA is not available")
        return torch.device(device)
    raise GrowthConfigError(choices_message("device", device, ["auto", "cpu", "cuda"]))


def build_small_model(
    kind: str, input_shape: tuple[int, ...], n_classes: int, width: int, channels: int
) -> nn.Module:
    """The small starting model of a run: an MLP with one hidden layer of ``width`` units, or
    a CNN with two conv blocks of ``channels`` and ``2 * channels`` channels, each followed by
    a 2x2 max-pool (global average pooling then needs the second block to see shapes)."""
    from ..models import build_model
    from ..models.cnn import CNNConfig
    from ..models.mlp import MLPConfig

    if kind == "mlp":
        return build_model(
            MLPConfig(in_features=math.prod(input_shape), hidden=(width,), n_classes=n_classes)
        )
    if kind == "cnn":
        return build_model(
            CNNConfig(
                in_channels=input_shape[0],
                image_size=input_shape[-1],
                channels=(channels, 2 * channels),
                n_classes=n_classes,
                pool_after=(0, 1),
            )
        )
    raise GrowthConfigError(choices_message("model", kind, MODELS))


def _make_recorder_plugin(
    on_epoch: Callable[[Any], None], on_iteration: Callable[[Any], None] | None = None
) -> Any:
    from avalanche.core import SupervisedPlugin

    class _Recorder(SupervisedPlugin):
        """Counts training samples per architecture (for FLOPs) and reports epochs."""

        def __init__(self) -> None:
            super().__init__()
            self.flops = FlopMeter()
            self.last_loss = float("nan")
            self.iterations = 0

        def before_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
            self.flops.add(strategy.model, strategy.mb_x, strategy.mb_y)

        def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
            self.last_loss = float(strategy.loss.detach())
            self.iterations += 1
            if on_iteration is not None:
                on_iteration(strategy)

        def after_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
            on_epoch(self)

        @property
        def total_flops(self) -> float:
            return self.flops.total

    return _Recorder()


@dataclass
class VariantResult:
    """Outcome of one variant (a row of the summary table)."""

    variant: str
    accuracy_matrix: list[list[float]] = field(default_factory=list)  # [after exp i][on exp j]
    avg_accuracy_per_exp: list[float] = field(default_factory=list)
    final_avg_accuracy: float = float("nan")
    avg_forgetting: float = float("nan")
    final_params: int = 0
    initial_params: int = 0
    train_flops: float = 0.0
    wall_seconds: float = 0.0
    n_growths: int = 0
    final_model_config: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in list(d.items()):
            if isinstance(v, float) and not math.isfinite(v):
                d[k] = None
        return d


def _metric(metrics: dict[str, Any], prefix: str, suffix: str = "") -> float:
    """Value of the first Avalanche metric named ``prefix...suffix`` (the task part of the
    name, e.g. ``/Task000``, appears only for task-aware benchmarks), else NaN."""
    for k, v in metrics.items():
        if k.startswith(prefix) and k.endswith(suffix):
            return float(v)
    return float("nan")


ACC_EXP = "Top1_Acc_Exp/eval_phase/test_stream"
BASELINE_LOG_EVERY = 5  # the grown run's GrowthPlugin(log_every=5)


STREAM_ACC = "Top1_Acc_Stream/eval_phase/test_stream"
STREAM_FORGET = "StreamForgetting/eval_phase/test_stream"


def train_variant(
    variant: str,
    model: nn.Module,
    spec: RunSpec,
    bench: Benchmark,
    run_dir: Path,
    *,
    grow: bool,
    print_fn: Callable[[str], None] = print,
    progress: bool = True,
) -> tuple[VariantResult, nn.Module, Any]:
    """Train one variant over every experience, evaluating the full test stream after each.

    Returns:
        ``(result, final_model, controller_or_None)``.
    """
    from avalanche.evaluation.metrics import accuracy_metrics, forgetting_metrics
    from avalanche.logging import TensorboardLogger
    from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin
    from avalanche.training.storage_policy import ExperienceBalancedBuffer
    from avalanche.training.supervised import Naive
    from tqdm import tqdm

    from ..events.tensorboard import TensorBoardSink

    device = resolve_device(spec.device)
    torch.manual_seed(spec.seed)
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=spec.lr)
    tb_dir = run_dir / "tb" / variant
    tb_logger = TensorboardLogger(tb_log_dir=str(tb_dir / "avalanche"))
    evaluator = EvaluationPlugin(
        accuracy_metrics(experience=True, stream=True),
        forgetting_metrics(experience=True, stream=True),
        loggers=[tb_logger],
    )
    n_exps = bench.n_experiences
    # bars only on a terminal: piped / redirected stderr gets the plain per-experience lines
    use_bar = bool(progress) and isatty(sys.stderr)
    bar = tqdm(
        total=n_exps * spec.epochs,
        desc=f"{VARIANT_LABELS[variant]:>18}",
        unit="ep",
        disable=not use_bar,
        dynamic_ncols=True,
        leave=True,
    )

    def on_epoch(rec: Any) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{rec.last_loss:.3f}", params=count_params(strategy.model))

    ctrl = None
    gplugin = None
    sinks: list[Any] = []
    on_iteration = None
    if grow:
        ctrl, gplugin, sinks = _make_controller(model, optimizer, spec, bench, run_dir, device)
    else:
        # the baselines' training scalars, with the grown run's tags and logging period
        base_tb = TensorBoardSink(tb_dir)
        sinks = [base_tb]

        def on_iteration(strat: Any) -> None:
            n = recorder.iterations
            if n % BASELINE_LOG_EVERY == 0 and math.isfinite(recorder.last_loss):
                base_tb.log_scalars(n, {"train/loss": recorder.last_loss,
                                        "model/params": float(count_params(strat.model))})

    recorder = _make_recorder_plugin(on_epoch, on_iteration)
    plugins: list[Any] = [recorder]
    if gplugin is not None:
        plugins.insert(0, gplugin)
    if spec.strategy == "replay":
        plugins.append(
            ReplayPlugin(
                mem_size=spec.mem_size,
                storage_policy=ExperienceBalancedBuffer(max_size=spec.mem_size, adaptive_size=True),
            )
        )
    strategy = Naive(
        model=model,
        optimizer=optimizer,
        criterion=nn.CrossEntropyLoss(),
        train_mb_size=spec.batch_size,
        train_epochs=spec.epochs,
        eval_mb_size=256,
        device=device,
        plugins=plugins,
        evaluator=evaluator,
        eval_every=-1,
    )
    res = VariantResult(variant=variant, initial_params=count_params(model))
    t0 = time.perf_counter()
    caught_cm = warnings.catch_warnings(record=True)
    caught = caught_cm.__enter__()
    try:
        for i, exp in enumerate(bench.scenario.train_stream):
            strategy.train(exp)
            metrics = strategy.eval(bench.scenario.test_stream)
            row = [_metric(metrics, ACC_EXP, f"Exp{j:03d}") for j in range(n_exps)]
            res.accuracy_matrix.append(row)
            seen = row[: i + 1]
            res.avg_accuracy_per_exp.append(sum(seen) / len(seen))
            res.final_avg_accuracy = _metric(metrics, STREAM_ACC)
            res.avg_forgetting = _metric(metrics, STREAM_FORGET)
            cells = " ".join(f"{a:.2f}" if j <= i else "  - " for j, a in enumerate(row))
            msg = (
                f"[{VARIANT_LABELS[variant]}] exp {i + 1}/{n_exps} classes "
                f"{bench.classes_per_experience[i]}: acc per exp [{cells}] "
                f"avg(seen)={res.avg_accuracy_per_exp[-1]:.3f} "
                f"params={count_params(strategy.model)}"
            )
            if use_bar:
                bar.write(msg)
            else:
                print_fn(msg)
            step_now = gplugin.step if gplugin else recorder.iterations
            for s in sinks:
                if isinstance(s, ScalarJsonlSink):
                    s.log_row({"kind": "eval", "step": step_now,
                               "experience": i, "accuracy": row})
                elif isinstance(s, TensorBoardSink):
                    s.log_scalars(step_now, {"eval/avg_acc_seen": res.avg_accuracy_per_exp[-1]})
    finally:
        # Avalanche 0.6 calls its own deprecated storage-policy API every experience and
        # resets the warning filters to print it each time: swallow those, show the rest once
        caught_cm.__exit__(None, None, None)
        shown = set()
        for w in caught:
            key = (w.category, str(w.message))
            if not issubclass(w.category, DeprecationWarning) and key not in shown:
                shown.add(key)
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        bar.close()
        tb_logger.writer.flush()
        tb_logger.writer.close()
        if ctrl is not None:
            ctrl.close()
        for s in sinks:
            s.close()
    res.wall_seconds = time.perf_counter() - t0
    final = strategy.model
    res.final_params = count_params(final)
    res.train_flops = float(recorder.total_flops)
    res.n_growths = len(gplugin.events) if gplugin is not None else 0
    from ..models import model_config_dict

    res.final_model_config = model_config_dict(final)
    return res, final, ctrl


def _make_controller(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    spec: RunSpec,
    bench: Benchmark,
    run_dir: Path,
    device: torch.device,
) -> tuple[Any, Any, list[Any]]:
    from ..control import (
        Budget,
        GrowthController,
        LossPlateau,
        ReplayForgetting,
        Rule,
        RulePolicy,
    )
    from ..events.tensorboard import TensorBoardSink
    from .plugin import GrowthPlugin

    def action_kwargs(action: str) -> dict[str, Any]:
        if action == "widen":
            return {
                "factor": spec.widen_factor,
                "noise_std": spec.widen_noise,
                "split_noise": spec.widen_split_noise,
            }
        return {}

    tb = TensorBoardSink(run_dir / "tb" / "grown")
    scalars = ScalarJsonlSink(run_dir / "metrics.jsonl")
    probe = bench.data.x_train[:64].to(device)
    ctrl = GrowthController(
        model,
        optimizer,
        signals=[
            ReplayForgetting(threshold=spec.forgetting_threshold, window=2),
            LossPlateau(window=spec.plateau_window, min_rel_drop=spec.plateau_min_rel_drop),
        ],
        policy=RulePolicy(
            [
                Rule("replay_forgetting", action=spec.on_forgetting,
                     kwargs=action_kwargs(spec.on_forgetting)),
                Rule("loss_plateau", action=spec.on_plateau, kwargs=action_kwargs(spec.on_plateau)),
            ],
            budget=Budget(max_params=spec.max_params),
            cooldown=spec.cooldown,
            max_growths=spec.max_growths,
        ),
        log_dir=str(run_dir),
        sinks=[tb, scalars],
        probe=probe,
        run_id=run_dir.name,
    )
    gplugin = GrowthPlugin(
        ctrl, replay_eval_every=spec.replay_eval_every, sinks=[tb, scalars], log_every=5
    )
    return ctrl, gplugin, [tb, scalars]


def controller_description(spec: RunSpec) -> dict[str, Any]:
    """The growth configuration as written to ``config.json``."""
    return {
        "signals": [
            {"type": "ReplayForgetting", "threshold": spec.forgetting_threshold, "window": 2},
            {"type": "LossPlateau", "window": spec.plateau_window,
             "min_rel_drop": spec.plateau_min_rel_drop},
        ],
        "rules": [
            {"signal": "replay_forgetting", "action": spec.on_forgetting},
            {"signal": "loss_plateau", "action": spec.on_plateau},
        ],
        "widen_factor": spec.widen_factor,
        "widen_noise": spec.widen_noise,
        "widen_split_noise": spec.widen_split_noise,
        "budget": {"max_params": spec.max_params},
        "cooldown": spec.cooldown,
        "max_growths": spec.max_growths,
    }


def run_experiment(
    spec: RunSpec,
    runs_dir: str | os.PathLike[str] = "runs",
    name: str | None = None,
    print_fn: Callable[[str], None] = print,
    progress: bool = True,
) -> tuple[Path, dict[str, Any]]:
    """Validate, create a fresh run directory, train every variant, write the summary.

    Returns:
        ``(run_dir, summary)``.

    Raises:
        GrowthConfigError: bad spec, bad ``name`` or unusable ``runs_dir`` (raised before
            anything is written).
        DataUnavailableError: a data package is missing (before anything is written).
    """
    spec.validate()
    run_name = name or f"{spec.benchmark}-{spec.model}-{spec.strategy}"
    check_run_name(run_name)
    check_runs_dir(runs_dir)
    bench = build_benchmark(spec.benchmark, seed=spec.seed)
    run_dir = create_run_dir(runs_dir, run_name)
    t_start = time.perf_counter()
    config = {
        "spec": dataclasses.asdict(spec),
        "benchmark": bench.describe(),
        "controller": controller_description(spec),
        "versions": package_versions(),
    }
    write_json(run_dir / "config.json", config)
    print_fn(
        f"selfgrow run -> {run_dir}  ({bench.name}: {bench.n_experiences} experiences, "
        f"{bench.data.source['n_train']} train / {bench.data.source['n_test']} test samples, "
        f"data: {bench.data.source['package']} {bench.data.source['version']})"
    )

    def small() -> nn.Module:
        torch.manual_seed(spec.seed)
        return build_small_model(
            spec.model, bench.data.input_shape, bench.data.num_classes, spec.width, spec.channels
        )

    results: dict[str, VariantResult] = {}
    grown_res, _, ctrl = train_variant(
        "grown", small(), spec, bench, run_dir, grow=True, print_fn=print_fn, progress=progress
    )
    results["grown"] = grown_res
    if spec.baselines:
        results["fixed_small"] = train_variant(
            "fixed_small", small(), spec, bench, run_dir, grow=False, print_fn=print_fn,
            progress=progress,
        )[0]
        from ..models import build_model

        torch.manual_seed(spec.seed)
        big = build_model(grown_res.final_model_config)
        results["fixed_grown"] = train_variant(
            "fixed_grown", big, spec, bench, run_dir, grow=False, print_fn=print_fn,
            progress=progress,
        )[0]
    events = [e.to_dict() for e in (ctrl.events if ctrl is not None else [])]
    summary = {
        "name": run_dir.name,
        "run_dir": str(run_dir),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "benchmark": bench.describe(),
        "data_source": bench.data.source,
        "strategy": spec.strategy,
        "model": spec.model,
        "lr": spec.lr,
        "epochs": spec.epochs,
        "versions": config["versions"],
        "variants": {k: v.to_dict() for k, v in results.items()},
        "growth_events": sum(1 for e in events if e.get("kind") == "growth"),
        "skipped_events": sum(1 for e in events if e.get("kind") == "skipped"),
        "wall_seconds_total": time.perf_counter() - t_start,
    }
    write_json(run_dir / "summary.json", summary)
    print_fn("")
    print_fn(format_summary_table(summary))
    return run_dir, summary


def format_summary_table(summary: dict[str, Any]) -> str:
    """Plain aligned text table of the variants in a summary (one row per variant)."""
    header = ["model", "final avg acc", "avg forgetting", "params", "train FLOPs",
              "wall s", "growths"]
    rows = []
    for key in VARIANTS:
        v = summary.get("variants", {}).get(key)
        if v is None:
            continue
        params = (
            f"{v['initial_params']:,} -> {v['final_params']:,}"
            if v["initial_params"] != v["final_params"] else f"{v['final_params']:,}"
        )
        rows.append([
            VARIANT_LABELS[key],
            fmt(v.get("final_avg_accuracy"), "{:.3f}"),
            fmt(v.get("avg_forgetting"), "{:.3f}"),
            params,
            fmt(v.get("train_flops"), "{:.3g}"),
            fmt(v.get("wall_seconds"), "{:.1f}"),
            str(v.get("n_growths", 0)),
        ])
    return format_table(header, rows)
