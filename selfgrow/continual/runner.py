"""The ``selfgrow run`` experiment: a growing model against two fixed baselines on an offline
class-incremental benchmark, with Avalanche doing the continual-learning bookkeeping.

Three variants share benchmark, strategy, optimizer, learning rate and seed:

* ``grown``: starts small; a :class:`~selfgrow.control.GrowthController` grows it while it
  learns (through :class:`~selfgrow.continual.plugin.GrowthPlugin`);
* ``fixed_small``: the same small starting model, never grown;
* ``fixed_equal``: the small model's family at the width (MLP units, CNN channels; for the
  multimodal model the widths of the component the run grows) whose training FLOPs match the
  grown run's, picked before it trains from the two runs' measured FLOPs (see
  :func:`equal_flops_width`);
* ``fixed_grown``: a freshly initialised model of the grown run's final config.

Accuracy comes from Avalanche's ``accuracy_metrics`` (a full test-stream evaluation after
every experience); forgetting is Avalanche's StreamForgetting computed from the accuracy
matrix (:func:`average_forgetting`), so a resumed run reports it too. With several seeds
every variant is trained once per seed and the summary gives mean and std. Each variant is
checkpointed after every experience (``RUN_DIR/resume/``); :func:`resume_experiment`
continues an interrupted run from there. Training FLOPs are counted with
``torch.utils.flop_counter.FlopCounterMode``: forward + backward of one mini-batch per distinct
architecture, divided by its size, times the samples trained on with that architecture.
"""

from __future__ import annotations

import dataclasses
import json
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

from ..core import count_params, rng_isolated
from ..errors import CheckpointError, GrowthConfigError, choices_message
from ..runs import (
    FlopMeter,
    check_run_name,
    check_runs_dir,
    create_run_dir,
    fmt,
    format_table,
    isatty,
    package_versions,
    write_json,
)
from .benchmarks import (
    BENCHMARKS,
    PER_CLASS_BENCHMARKS,
    Benchmark,
    build_benchmark,
    check_n_per_class,
)

STRATEGIES = ("replay", "naive", "ewc", "online-ewc", "si", "mas", "lwf", "gem", "agem",
              "gdumb", "cumulative", "der", "pnn")
#: strategies that bring their own model (DER's DERNet, PNN's columns) and their own growth:
#: ``--growth auto`` gates DER's expansion with the capacity probe; PNN takes ``off`` only
EXPANSION_STRATEGIES = ("der", "pnn")
#: strategy -> (plugin, its regularisation strength's name, default strength); every
#: strategy is Avalanche's Naive template plus its plugin(s), GrowthPlugin listed first
STRATEGY_DEFAULTS: dict[str, dict[str, Any]] = {
    "naive": {}, "replay": {},
    "ewc": {"ewc_lambda": 10.0},
    "online-ewc": {"ewc_lambda": 10.0, "decay_factor": 0.5},
    "si": {"si_lambda": 1.0},
    "mas": {"lambda_reg": 1.0, "alpha": 0.5},
    "lwf": {"alpha": 1.0, "temperature": 2.0},
    "gem": {"memory_strength": 0.5},  # patterns per experience: mem_size / experiences
    "agem": {"sample_size": 64},
    "gdumb": {},  # a buffer of mem_size samples, the model re-trained on it each experience
    "cumulative": {},  # Avalanche's Cumulative: every past experience's data again (upper bound)
    "der": {"aux_weight": 1.0},  # DER + replay memory; its auxiliary loss's weight
    "pnn": {},  # Avalanche's PNNStrategy: a column per task (task-incremental only)
}
#: strategies whose plugin state is not in the run's checkpoints: an interrupted variant of
#: theirs restarts from its first experience on resume (said when it happens)
UNCHECKPOINTED = ("ewc", "online-ewc", "si", "mas", "lwf", "gem", "agem", "gdumb",
                  "cumulative", "der", "pnn")
MODELS = ("mlp", "cnn", "multimodal")
#: per model, the learning rate and epochs per experience ``selfgrow run`` uses unless given:
#: the small CNN (BatchNorm) needs a larger LR and more epochs than the MLP
#: (Split-MNIST-5k sweep in docs/continual.md: lr 1e-3 / 5 epochs reach 0.21 with the CNN);
#: the multimodal model also takes its starting sizes (``--width`` 16, ``--channels`` 4: the
#: small model of benchmarks/multimodal.py)
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "mlp": {"lr": 1e-3, "epochs": 5},
    "cnn": {"lr": 1e-2, "epochs": 10},
    "multimodal": {"lr": 1e-2, "epochs": 5, "width": 16, "channels": 4},
}
#: the components of the multimodal model a ``widen`` / ``deepen`` growth targets
COMPONENTS = ("image", "audio", "fusion")
#: embedding width of each encoder of the small multimodal model
MULTIMODAL_EMBED = 16
#: per model, the benchmarks it runs on (models not listed: every benchmark but those of
#: :data:`PER_CLASS_BENCHMARKS`, whose packed vector only an MLP or the multimodal model reads)
MODEL_BENCHMARKS: dict[str, tuple[str, ...]] = {"multimodal": PER_CLASS_BENCHMARKS}


def model_benchmarks(model: str) -> list[str]:
    """The benchmarks ``model`` (a :data:`MODELS` name) can run on."""
    if model in MODEL_BENCHMARKS:
        return list(MODEL_BENCHMARKS[model])
    if model == "mlp":
        return list(BENCHMARKS)
    return [b for b in BENCHMARKS if b not in PER_CLASS_BENCHMARKS]
GROWTH_MODES = ("auto", "off")
CLASS_ORDERS = ("seeded", "fixed")
VARIANTS = ("grown", "fixed_small", "fixed_equal", "fixed_grown")
VARIANT_LABELS = {
    "grown": "grown (selfgrow)",
    "fixed_small": "fixed small",
    "fixed_equal": "fixed, equal FLOPs",
    "fixed_grown": "fixed, grown size",
}

#: the variants' labels for the expansion strategies (their model is DER's or PNN's)
EXPANSION_LABELS = {
    "der": {"grown": "DER, probe-gated (selfgrow)", "fixed_small": "DER (every experience)"},
    "pnn": {"fixed_small": "PNN (a column per task)"},
}


def variant_label(variant: str, strategy: str | None = None) -> str:
    """The table label of ``variant`` (``strategy``: the run's, for DER's and PNN's)."""
    return EXPANSION_LABELS.get(strategy or "", {}).get(variant, VARIANT_LABELS[variant])


@dataclass
class RunSpec:
    """Everything that defines a ``selfgrow run`` (written to ``config.json``).

    Attributes:
        benchmark: see :data:`~selfgrow.continual.benchmarks.BENCHMARKS`.
        strategy: ``"replay"`` (experience replay, ``mem_size`` samples), ``"naive"``, or
            one of Avalanche's regularisation / memory strategies ``"ewc"``,
            ``"online-ewc"``, ``"si"``, ``"mas"``, ``"lwf"``, ``"gem"``, ``"agem"``,
            ``"gdumb"`` (defaults: :data:`STRATEGY_DEFAULTS`; ``reg_lambda`` overrides the
            regularisation strength), ``"cumulative"`` (upper bound), or an expansion method:
            ``"der"`` (DER + replay; extractors of the small model's body; with growth
            ``auto`` a new extractor is added only when the capacity probe says it pays) or
            ``"pnn"`` (Avalanche's PNN, columns of ``width`` units; task-incremental
            benchmarks and growth ``off`` only).
        reg_lambda: EWC / SI / MAS lambda, LwF alpha, GEM memory strength (None: default).
        model: ``"mlp"``, ``"cnn"`` (small starting sizes ``width`` / ``channels``) or
            ``"multimodal"`` (a ``GrowableMultimodal`` on the packed paired digits of
            ``split-av-mnist``: image and audio CNN encoders of ``channels`` /
            ``2 * channels`` channels, a fusion MLP of ``width`` units; ``selfgrow run``
            starts it at width 16, channels 4, see :data:`MODEL_DEFAULTS`).
        mem_size: replay buffer size in samples.
        epochs: training epochs per experience.
        batch_size: mini-batch size (new data; replay adds as many buffer samples).
        lr: Adam learning rate, the same for all three variants.
        seed: seed of data split, initialisation and data order.
        seeds: several seeds (overrides ``seed``): every variant is trained once per seed
            and the summary reports mean and std; ``None``: just ``seed``.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        baselines: also train the two fixed baselines.
        width: hidden width of the small MLP (one hidden layer); the multimodal model's
            fusion hidden width.
        channels: channels of the first of the small CNN's two conv blocks; of each
            encoder's first block in the multimodal model.
        component: multimodal model only: the component (``"image"``, ``"audio"`` or
            ``"fusion"``) the ``widen`` / ``deepen`` actions grow.
        n_per_class: ``split-av-mnist`` only: digits per class (3..500; ``None``: all 500),
            for quick runs and tests.
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
        max_params: parameter budget of the grown model (a growth that would exceed it is
            skipped, and logged as such).
        growth: ``"auto"`` (the grown variant and its baselines) or ``"off"`` (only the
            small model, trained fixed: the strategy alone).
        class_order: ``"seeded"`` (the order of the classes is drawn from the seed, as
            Avalanche does, and recorded in the summary) or ``"fixed"`` (``0, 1, ..., C-1``).
        task_incremental: give every sample its experience's task label and restrict the
            logits to the task's classes (task-incremental protocol; class-incremental
            splits only).
        probe_steps: capacity probe before every experience after the first
            (:class:`~selfgrow.continual.probe.CapacityProbe`): trials of this many steps for
            no growth, ``on_forgetting``'s action and ``deepen``; 0 disables it.
        probe_margin: the probe grows when a candidate's mean new/old accuracy beats no
            growth's by at least this much.
    """

    benchmark: str = "split-mnist"
    strategy: str = "replay"
    reg_lambda: float | None = None
    model: str = "mlp"
    mem_size: int = 300
    epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    seeds: list[int] | None = None
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
    growth: str = "auto"
    class_order: str = "seeded"
    task_incremental: bool = False
    probe_steps: int = 0
    probe_margin: float = 0.01
    component: str = "fusion"
    n_per_class: int | None = None

    def seed_list(self) -> list[int]:
        """The seeds the run trains with: ``seeds``, else ``[seed]``."""
        return list(self.seeds) if self.seeds is not None else [int(self.seed)]

    def validate(self) -> None:
        """Check every name and range before anything is written.

        Raises:
            GrowthConfigError: unknown benchmark / strategy / model / action (lists the valid
                choices) or a value out of range.
        """
        if self.benchmark not in BENCHMARKS:
            raise GrowthConfigError(choices_message("benchmark", self.benchmark, list(BENCHMARKS)))
        if self.class_order not in CLASS_ORDERS:
            raise GrowthConfigError(choices_message("class order", self.class_order,
                                                    CLASS_ORDERS))
        if self.growth not in GROWTH_MODES:
            raise GrowthConfigError(choices_message("growth", self.growth, GROWTH_MODES))
        if self.strategy not in STRATEGIES:
            raise GrowthConfigError(choices_message("strategy", self.strategy, STRATEGIES))
        if self.model not in MODELS:
            raise GrowthConfigError(choices_message("model", self.model, MODELS))
        fits = model_benchmarks(self.model)
        if self.benchmark not in fits:
            models = [m for m in MODELS if self.benchmark in model_benchmarks(m)]
            raise GrowthConfigError(
                f"--model {self.model} does not run on --benchmark {self.benchmark}; valid "
                f"choices for --model on it: {', '.join(models)} (--model {self.model} runs "
                f"on: {', '.join(fits)})")
        if self.component not in COMPONENTS:
            raise GrowthConfigError(choices_message("component", self.component, COMPONENTS))
        if self.component != "fusion" and self.model != "multimodal":
            raise GrowthConfigError(
                f"component={self.component!r} names a part of the multimodal model; valid "
                f"with --model {self.model}: fusion (unused); valid choices for --model: "
                "multimodal")
        check_n_per_class(self.benchmark, self.n_per_class)
        if not isinstance(self.task_incremental, bool):
            raise GrowthConfigError(
                f"task_incremental={self.task_incremental!r} must be True or False")
        kind = BENCHMARKS[self.benchmark].kind
        if self.task_incremental and kind != "class-incremental":
            offer = sorted(n for n, b in BENCHMARKS.items() if b.kind == "class-incremental")
            raise GrowthConfigError(
                f"--task-incremental needs a class-incremental benchmark; {self.benchmark!r} "
                f"is {kind}; valid choices: {', '.join(offer)}")
        if self.strategy == "pnn":
            if not self.task_incremental:
                from .expansion import PNN_REFUSAL

                raise GrowthConfigError(
                    f"{PNN_REFUSAL} (add --task-incremental; {self.benchmark!r} is run "
                    f"{kind} without it)")
            if self.growth != "off":
                raise GrowthConfigError(
                    "PNN adds a column per task by itself: run --strategy pnn with "
                    "--growth off; valid choices: off")
            if self.model != "mlp":
                raise GrowthConfigError(
                    "PNN (Avalanche's) is built from linear columns; valid choices for "
                    "--model with --strategy pnn: mlp")
        if self.strategy == "der" and self.model == "multimodal":
            raise GrowthConfigError(
                "DER's extractors are the small MLP's or CNN's body; valid choices for "
                "--model with --strategy der: mlp, cnn")
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
            ("probe_steps", self.probe_steps, 0),
        ):
            if int(v) < lo:
                raise GrowthConfigError(f"{what}={v} is out of range; valid: >= {lo}")
        if int(self.seed) > MAX_SEED:
            raise GrowthConfigError(f"seed={self.seed} is out of range; valid: 0 .. {MAX_SEED}")
        if self.seeds is not None:
            check_seeds(self.seeds)
        if not (self.max_params > 0 and math.isfinite(self.max_params)):
            raise GrowthConfigError(f"max_params={self.max_params} is out of range; valid: > 0")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise GrowthConfigError(f"lr={self.lr} is out of range; valid: > 0")
        if self.reg_lambda is not None:
            if self.strategy in ("naive", "replay", "agem", "gdumb", "cumulative", "der",
                                 "pnn"):
                raise GrowthConfigError(
                    f"reg_lambda applies to ewc, online-ewc, si, mas, lwf and gem, not "
                    f"--strategy {self.strategy}")
            if not (self.reg_lambda >= 0 and math.isfinite(self.reg_lambda)):
                raise GrowthConfigError(
                    f"reg_lambda={self.reg_lambda} is out of range; valid: >= 0")
        if not (self.probe_margin >= 0 and math.isfinite(self.probe_margin)):
            raise GrowthConfigError(f"probe_margin={self.probe_margin} is out of range; "
                                    "valid: >= 0")
        if not self.widen_factor > 1:
            raise GrowthConfigError(f"widen_factor={self.widen_factor} must be > 1")
        if not (self.widen_noise >= 0 and math.isfinite(self.widen_noise)):
            raise GrowthConfigError(f"widen_noise={self.widen_noise} must be >= 0")
        if not (self.widen_split_noise >= 0 and math.isfinite(self.widen_split_noise)):
            raise GrowthConfigError(f"widen_split_noise={self.widen_split_noise} must be >= 0")
        resolve_device(self.device)


#: the largest seed every generator of a run accepts (torch.manual_seed takes 64-bit values)
MAX_SEED = 2**63 - 1


def check_seeds(seeds: Any) -> list[int]:
    """``seeds`` as a list of distinct integers >= 0.

    Raises:
        GrowthConfigError: empty, not integers, negative or repeated (names the bad value).
    """
    if isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__iter__"):
        raise GrowthConfigError(f"seeds={seeds!r} must be a list of integers >= 0")
    out = list(seeds)
    if not out:
        raise GrowthConfigError("seeds is empty; valid: one or more distinct integers >= 0")
    for v in out:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_SEED:
            raise GrowthConfigError(
                f"seed {v!r} in seeds is out of range; valid: integers 0 .. {MAX_SEED}")
    dup = sorted({v for v in out if out.count(v) > 1})
    if dup:
        raise GrowthConfigError(f"seeds repeat {dup}; each seed may appear once")
    return out


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]`` (the ``--seeds`` argument).

    Raises:
        GrowthConfigError: not a comma-separated list of distinct integers >= 0.
    """
    parts = [t.strip() for t in str(text).split(",")]
    try:
        seeds = [int(t) for t in parts]
    except ValueError:
        bad = next(t for t in parts if not t.lstrip("-").isdigit())
        raise GrowthConfigError(
            f"--seeds {text!r}: {bad!r} is not an integer; valid: a comma-separated list of "
            "distinct integers >= 0, e.g. 0,1,2"
        ) from None
    try:
        return check_seeds(seeds)
    except GrowthConfigError as e:
        raise GrowthConfigError(f"--seeds {text!r}: {e}") from None


#: actions that remove parameters: not growth actions of ``selfgrow run`` (its runs grow on
#: a plateau or on forgetting; pruning is for the API and policies, ``"prune"``)
SHRINK_ACTIONS = ("prune", "remove_expert")


def available_actions(model_kind: str) -> list[str]:
    """Growth actions the model family offers (``widen``, ``deepen``, ...; the shrinking
    :data:`SHRINK_ACTIONS` left out)."""
    from ..control.actions import list_actions

    shape: tuple[int, ...] = (1, 8, 8)
    mods = None
    if model_kind == "multimodal":  # a tiny stand-in of the packed paired digits
        mods = {"image": (1, 8, 8), "audio": (4, 8)}
        shape = (64 + 32,)
    return [a for a in list_actions(build_small_model(model_kind, shape, 10, 4, 2, mods))
            if a not in SHRINK_ACTIONS]


def spec_benchmark(spec: RunSpec, seed: int) -> Benchmark:
    """The run's benchmark for ``seed``: class order drawn from the seed (``class_order=
    "seeded"``) or ``0..C-1`` (``"fixed"``), with task labels when ``task_incremental``."""
    return build_benchmark(spec.benchmark, seed=seed,
                           shuffle_classes=spec.class_order == "seeded",
                           task_incremental=spec.task_incremental,
                           n_per_class=spec.n_per_class)


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


def benchmark_modalities(bench: Benchmark) -> dict[str, tuple[int, ...]] | None:
    """``{modality: per-sample shape}`` of a benchmark of packed paired data (its
    ``data.source["packed"]``, :meth:`selfgrow.data.PairedData.packed`), else ``None``."""
    packed = bench.data.source.get("packed")
    if not isinstance(packed, dict):
        return None
    return {m: tuple(int(v) for v in s) for m, s in packed["input_shapes"].items()}


def multimodal_widths(width: int, channels: int) -> dict[str, tuple[int, ...]]:
    """The small multimodal model's component widths: each encoder ``(channels,
    2 * channels)``, the fusion ``(width,)``."""
    return {"image": (channels, 2 * channels), "audio": (channels, 2 * channels),
            "fusion": (width,)}


def build_multimodal_model(modalities: dict[str, tuple[int, ...]], n_classes: int,
                           widths: dict[str, tuple[int, ...]]) -> nn.Module:
    """A ``GrowableMultimodal`` for packed inputs of ``modalities`` (``{"image": (C, H, W),
    "audio": (n_mels, T)}``): 2-D / 1-D CNN encoders of ``widths[modality]`` channels (a 2x2
    / 2 max-pool after every block, BatchNorm, an embedding of :data:`MULTIMODAL_EMBED`) and a
    fusion MLP of ``widths["fusion"]`` hidden units, as in benchmarks/multimodal.py.

    Raises:
        GrowthConfigError: a modality other than ``image`` / ``audio``, or shapes the
            encoders cannot take.
    """
    from ..models import build_model
    from ..models.cnn import CNNConfig
    from ..models.mlp import MLPConfig
    from ..models.multimodal import MODALITIES, MultimodalConfig

    unknown = sorted(set(modalities) - set(MODALITIES))
    if unknown:
        raise GrowthConfigError(choices_message("modality", unknown[0], MODALITIES))

    def enc(m: str) -> CNNConfig | None:
        if m not in modalities:
            return None
        shape, w = modalities[m], widths[m]
        return CNNConfig(in_channels=shape[0], image_size=shape[-1], channels=w,
                         n_classes=MULTIMODAL_EMBED, pool_after=tuple(range(len(w))),
                         spatial_dims=len(shape) - 1)

    return build_model(MultimodalConfig(
        image=enc("image"), audio=enc("audio"),
        fusion=MLPConfig(in_features=MULTIMODAL_EMBED * len(modalities),
                         hidden=widths["fusion"], n_classes=n_classes)))


def build_small_model(
    kind: str, input_shape: tuple[int, ...], n_classes: int, width: int, channels: int,
    modalities: dict[str, tuple[int, ...]] | None = None,
) -> nn.Module:
    """The small starting model of a run: an MLP with one hidden layer of ``width`` units, or
    a CNN with two conv blocks of ``channels`` and ``2 * channels`` channels, each followed by
    a 2x2 max-pool (global average pooling then needs the second block to see shapes), or
    the multimodal model of :func:`build_multimodal_model` at :func:`multimodal_widths`
    (``modalities``: the packed input's layout, :func:`benchmark_modalities`).

    Raises:
        GrowthConfigError: unknown ``kind``, or ``"multimodal"`` without ``modalities`` or
            with an ``input_shape`` that is not their packed width.
    """
    from ..models import build_model
    from ..models.cnn import CNNConfig
    from ..models.mlp import MLPConfig

    if kind == "multimodal":
        if modalities is None:
            raise GrowthConfigError(
                "--model multimodal needs paired data packed into one vector; valid choices "
                f"for --benchmark: {', '.join(PER_CLASS_BENCHMARKS)}")
        packed = sum(math.prod(s) for s in modalities.values())
        if tuple(input_shape) != (packed,):
            raise GrowthConfigError(
                f"a packed multimodal input is ({packed},) "
                f"({' + '.join(f'{m} {s}' for m, s in modalities.items())}), got "
                f"{tuple(input_shape)}")
        return build_multimodal_model(modalities, n_classes, multimodal_widths(width, channels))
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


def build_expansion_model(spec: Any, bench: Benchmark) -> nn.Module:
    """The model of an expansion strategy (:data:`EXPANSION_STRATEGIES`): DER's
    :class:`~selfgrow.continual.expansion.DERNet` whose extractors are the small model's body
    (an MLP of ``width`` units or a CNN of ``channels`` / ``2 * channels``), or Avalanche's
    ``PNN`` with one layer of ``width`` units per column (its default is 100).

    Raises:
        GrowthConfigError: ``spec.strategy`` is not an expansion strategy.
    """
    shape = tuple(bench.data.input_shape)
    if spec.strategy == "der":
        import functools

        from .expansion import DERNet, der_extractor

        return DERNet(functools.partial(der_extractor, spec.model, shape, spec.width,
                                        (spec.channels, 2 * spec.channels)),
                      n_classes=bench.data.num_classes)
    if spec.strategy == "pnn":
        from avalanche.models import PNN

        return PNN(num_layers=1, in_features=math.prod(shape),
                   hidden_features_per_column=spec.width, adapter="mlp")
    raise GrowthConfigError(choices_message("expansion strategy", spec.strategy,
                                            EXPANSION_STRATEGIES))


def equal_flops_scaled(spec: Any) -> str:
    """What the fixed equal-FLOPs model scales: ``"width"`` (MLP hidden units),
    ``"channels"`` (CNN base channels) or, for the multimodal model, the component the run
    grows (``spec.component``: the fusion's hidden units, or that encoder's base channels
    ``c`` of ``(c, 2c)``), or ``"all"`` (every encoder's base channels, the fusion width in
    proportion) when ``widen_all`` is one of the run's actions."""
    if spec.model == "mlp":
        return "width"
    if spec.model == "cnn":
        return "channels"
    if "widen_all" in (spec.on_plateau, spec.on_forgetting):
        return "all"
    return str(spec.component)


def _equal_base(spec: Any, scaled: str) -> int:
    """The small model's size of the part :func:`equal_flops_scaled` scales."""
    return int(spec.width if scaled in ("width", "fusion") else spec.channels)


def equal_flops_model(spec: Any, bench: Benchmark, size: int,
                      scaled: str | None = None) -> nn.Module:
    """The small model with the part ``scaled`` (default :func:`equal_flops_scaled`) at
    ``size`` (freshly initialised from the global RNG)."""
    scaled = equal_flops_scaled(spec) if scaled is None else scaled
    shape, n = bench.data.input_shape, bench.data.num_classes
    if spec.model != "multimodal":
        return build_small_model(spec.model, shape, n,
                                 size if scaled == "width" else spec.width,
                                 size if scaled == "channels" else spec.channels)
    mods = benchmark_modalities(bench)
    if mods is None:
        raise GrowthConfigError(
            f"--model multimodal needs paired data packed into one vector; valid choices for "
            f"--benchmark: {', '.join(PER_CLASS_BENCHMARKS)}")
    if scaled == "all":
        widths = multimodal_widths(max(1, round(spec.width * size / spec.channels)), size)
    else:
        widths = multimodal_widths(spec.width, spec.channels)
        widths[scaled] = (size,) if scaled == "fusion" else (size, 2 * size)
    return build_multimodal_model(mods, n, widths)


def equal_flops_width(spec: Any, bench: Benchmark, grown_flops: float, small_flops: float,
                      max_factor: int = 64) -> dict[str, Any]:
    """The width (MLP hidden units, CNN base channels; multimodal: the grown component's
    width, see :func:`equal_flops_scaled`) of the fixed model whose training FLOPs match the
    grown run's, chosen before that model trains.

    Both fixed runs see the same samples as the grown one, so the target is
    ``f_small * grown_flops / small_flops`` training FLOPs per sample (forward + backward,
    :func:`selfgrow.runs.training_flops_per_sample` on a real batch); the width (from the
    small one up to ``max_factor`` times it) whose count is closest to it in ratio wins.

    Returns:
        ``{"width", "scaled", "target_flops_per_sample", "flops_per_sample",
        "small_flops_per_sample"}`` (``scaled``: what ``width`` sizes).
    """
    from ..runs import training_flops_per_sample

    x = bench.data.x_train[:8]
    y = torch.as_tensor(bench.data.y_train[:8]).long()
    scaled = equal_flops_scaled(spec)
    base = _equal_base(spec, scaled)

    def f(w: int) -> float:
        with rng_isolated():
            m = equal_flops_model(spec, bench, w, scaled)
        return training_flops_per_sample(m, x, y)

    f0 = f(base)
    target = f0 * grown_flops / max(small_flops, 1.0)
    lo, hi = base, base * max_factor
    while lo < hi:  # smallest width whose FLOPs reach the target (FLOPs grow with width)
        mid = (lo + hi) // 2
        if f(mid) < target:
            lo = mid + 1
        else:
            hi = mid
    cands = {w: f(w) for w in {max(base, lo - 1), lo}}
    best = min(cands, key=lambda w: abs(math.log(cands[w] / target)))
    return {"width": int(best), "scaled": scaled, "target_flops_per_sample": target,
            "flops_per_sample": cands[best], "small_flops_per_sample": f0}


def strategy_plugins(spec: Any, n_experiences: int) -> list[Any]:
    """Avalanche plugins of ``spec.strategy`` (none for naive; replay is built with its
    buffer by the caller), with :data:`STRATEGY_DEFAULTS` and ``spec.reg_lambda``."""
    from avalanche.training.plugins import (
        AGEMPlugin,
        EWCPlugin,
        GDumbPlugin,
        GEMPlugin,
        LwFPlugin,
        MASPlugin,
    )

    kw = dict(STRATEGY_DEFAULTS[spec.strategy])
    lam = spec.reg_lambda
    per_exp = max(1, spec.mem_size // max(1, n_experiences))
    st = spec.strategy
    if st == "ewc":
        return [EWCPlugin(ewc_lambda=kw["ewc_lambda"] if lam is None else lam)]
    if st == "online-ewc":
        return [EWCPlugin(ewc_lambda=kw["ewc_lambda"] if lam is None else lam, mode="online",
                          decay_factor=kw["decay_factor"])]
    if st == "si":  # Avalanche's SI with real weight snapshots (its own are views on CPU)
        from .regularizers import SnapshotSynapticIntelligencePlugin

        return [SnapshotSynapticIntelligencePlugin(
            si_lambda=kw["si_lambda"] if lam is None else lam)]
    if st == "mas":
        return [MASPlugin(lambda_reg=kw["lambda_reg"] if lam is None else lam,
                          alpha=kw["alpha"])]
    if st == "lwf":
        return [LwFPlugin(alpha=kw["alpha"] if lam is None else lam,
                          temperature=kw["temperature"])]
    if st == "gem":
        return [GEMPlugin(patterns_per_experience=per_exp,
                          memory_strength=kw["memory_strength"] if lam is None else lam)]
    if st == "agem":
        return [AGEMPlugin(patterns_per_experience=per_exp, sample_size=kw["sample_size"])]
    if st == "gdumb":
        return [GDumbPlugin(mem_size=spec.mem_size)]
    return []


def _make_recorder_plugin(
    on_epoch: Callable[[Any], None], on_iteration: Callable[[Any], None] | None = None,
    task_aware: bool = False,
) -> Any:
    """The run's recorder: training samples per architecture (FLOPs), epochs, iterations.
    ``task_aware``: the model is called ``model(x, task_labels)`` (PNN), and its FLOPs are
    counted on the mini-batch's own task labels."""
    import torch.nn.functional as F
    from avalanche.core import SupervisedPlugin

    class _Recorder(SupervisedPlugin):
        """Counts training samples per architecture (for FLOPs) and reports epochs."""

        def __init__(self) -> None:
            super().__init__()
            self._task: Any = None
            self.flops = FlopMeter(self._task_loss) if task_aware else FlopMeter()
            self.last_loss = float("nan")
            self.iterations = 0

        def _task_loss(self, model: nn.Module, x: Any, y: Any) -> torch.Tensor:
            return F.cross_entropy(model(x, self._task), y)

        def before_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
            self._task = strategy.mb_task_id
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
    """Outcome of one variant and seed (a row of the summary table).

    ``accuracy_matrix[i][j]``: test accuracy on experience ``j`` after training experience
    ``i`` (0-based ids); ``None`` for experiences not trained yet (``j > i``).
    """

    variant: str
    accuracy_matrix: list[list[float | None]] = field(default_factory=list)
    avg_accuracy_per_exp: list[float] = field(default_factory=list)
    final_avg_accuracy: float = float("nan")
    avg_forgetting: float = float("nan")
    bwt: float = float("nan")
    final_params: int = 0
    initial_params: int = 0
    train_flops: float = 0.0
    wall_seconds: float = 0.0
    n_growths: int = 0
    final_model_config: dict[str, Any] | None = None
    seed: int | None = None
    #: fixed_equal only: how its width was picked (width, target and picked FLOPs/sample)
    equal_flops: dict[str, Any] | None = None
    probe_flops: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in list(d.items()):
            if isinstance(v, float) and not math.isfinite(v):
                d[k] = None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VariantResult:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        for k in ("final_avg_accuracy", "avg_forgetting", "bwt"):
            if kw.get(k) is None:
                kw[k] = float("nan")
        return cls(**kw)


def _metric(metrics: dict[str, Any], prefix: str, suffix: str = "") -> float:
    """Value of the first Avalanche metric named ``prefix...suffix`` (the task part of the
    name, e.g. ``/Task000``, appears only for task-aware benchmarks), else NaN."""
    for k, v in metrics.items():
        if k.startswith(prefix) and k.endswith(suffix):
            return float(v)
    return float("nan")


def average_forgetting(matrix: list[list[float | None]]) -> float:
    """Avalanche's StreamForgetting after the last row: the mean over earlier experiences
    ``j`` of (accuracy on ``j`` right after training it) - (accuracy on ``j`` now); NaN
    after the first experience. Computed from the matrix so a resumed run gets it too."""
    i = len(matrix) - 1
    drops = [
        float(matrix[j][j]) - float(matrix[i][j])  # type: ignore[arg-type]
        for j in range(i)
        if matrix[j][j] is not None and matrix[i][j] is not None
    ]
    return sum(drops) / len(drops) if drops else float("nan")


def backward_transfer(matrix: list[list[float | None]]) -> float:
    """BWT (Lopez-Paz & Ranzato 2017, GEM) after the last row: the mean over earlier
    experiences ``j`` of (accuracy on ``j`` now) - (accuracy on ``j`` right after training
    it), i.e. ``-average_forgetting`` as Avalanche's StreamBWT computes it; used when the
    evaluator's value is missing (a resumed run's earlier experiences)."""
    f = average_forgetting(matrix)
    return -f if math.isfinite(f) else float("nan")


ACC_EXP = "Top1_Acc_Exp/eval_phase/test_stream"
BWT_STREAM = "StreamBWT/eval_phase/test_stream"
LOG_EVERY = 5  # training scalars (loss, parameters) every 5 optimizer steps, every variant
STREAM_ACC = "Top1_Acc_Stream/eval_phase/test_stream"

#: the one TensorBoard / metrics.jsonl tag scheme of a run: ``train/loss``, ``model/params``
#: (the parameter count), ``selfgrow/n_growths``, ``selfgrow/n_prunes``, ``selfgrow/n_anomalies``,
#: ``signal/<signal name>``, ``replay/...``, ``eval/...``
PARAM_TAG = "model/params"
LOSS_TAG = "train/loss"
_CONTROLLER_COUNTERS = ("selfgrow/n_growths", "selfgrow/n_prunes", "selfgrow/n_anomalies")


def _make_replay_buffer(mem_size: int) -> Any:
    """Avalanche's ``ExperienceBalancedBuffer(mem_size, adaptive_size=True)`` (the same
    reservoir sampling, drawing the same random numbers) that remembers which samples of
    each experience it keeps, so a resumed run rebuilds the identical buffer."""
    from avalanche.training.storage_policy import ExperienceBalancedBuffer, ReservoirSamplingBuffer

    class _TrackedBalancedBuffer(ExperienceBalancedBuffer):
        def __init__(self) -> None:
            super().__init__(max_size=mem_size, adaptive_size=True)
            self.kept: dict[int, list[int]] = {}

        def post_adapt(self, agent: Any, exp: Any) -> None:
            self._num_exps += 1
            lens = self.get_group_lengths(self._num_exps)
            data = exp.dataset
            # ReservoirSamplingBuffer.update_from_dataset on an empty buffer
            weights, order = torch.rand(len(data)).sort(descending=True)
            e = self._num_exps - 1
            self.kept[e] = order[: lens[-1]].tolist()
            self._set_group(e, data, weights[: lens[-1]])
            for (g, b), n in zip(list(self.buffer_groups.items()), lens, strict=True):
                b.resize(agent, n)
                self.kept[g] = self.kept[g][:n]

        def _set_group(self, e: int, data: Any, weights: torch.Tensor) -> None:
            b = ReservoirSamplingBuffer(len(self.kept[e]))
            b.buffer = data.subset(self.kept[e])
            b._buffer_weights = weights.clone()
            self.buffer_groups[e] = b

        def state_dict(self) -> dict[str, Any]:
            return {
                "num_exps": int(self._num_exps),
                "kept": {int(e): list(v) for e, v in self.kept.items()},
                "weights": {int(e): b._buffer_weights.clone()
                            for e, b in self.buffer_groups.items()},
            }

        def load_state_dict(self, state: dict[str, Any], train_stream: Any) -> None:
            self._num_exps = int(state["num_exps"])
            self.kept = {int(e): [int(i) for i in v] for e, v in state["kept"].items()}
            self.buffer_groups = {}
            for e in sorted(self.kept):
                self._set_group(e, train_stream[e].dataset, state["weights"][e])

    return _TrackedBalancedBuffer()


@dataclass
class _Slot:
    """Where one variant of one seed writes: its TensorBoard directory, run id, checkpoint."""

    variant: str
    seed: int
    tb_dir: Path
    run_id: str
    label: str
    checkpoint: Path | None = None
    after_experience: Callable[[str, int, int], None] | None = None


def train_variant(
    variant: str,
    model: nn.Module | None,
    spec: RunSpec,
    bench: Benchmark,
    run_dir: Path,
    *,
    grow: bool,
    print_fn: Callable[[str], None] = print,
    progress: bool = True,
    slot: _Slot | None = None,
    resume: bool = False,
) -> tuple[VariantResult, nn.Module, Any]:
    """Train one variant over every experience, evaluating the full test stream after each.

    With ``slot.checkpoint`` the variant is checkpointed before its first experience and
    after every one (model, optimizer, controller, GrowthPlugin, replay buffer, RNG states,
    results so far); ``resume=True`` continues from that checkpoint (``model`` unused).

    Returns:
        ``(result, final_model, controller_or_None)``.
    """
    from avalanche.evaluation.metrics import accuracy_metrics, bwt_metrics
    from avalanche.logging import TensorboardLogger
    from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin
    from avalanche.training.supervised import Naive
    from tqdm import tqdm

    from ..checkpoint import load_checkpoint, save_checkpoint
    from ..events.tensorboard import TensorBoardSink

    seed = spec.seed if slot is None else slot.seed
    slot = slot or _Slot(variant, seed, run_dir / "tb" / variant, run_dir.name,
                         variant_label(variant, spec.strategy))
    device = resolve_device(spec.device)
    ck = None
    if resume:
        if slot.checkpoint is None or not slot.checkpoint.is_file():
            raise GrowthConfigError(f"no checkpoint to resume {variant} (seed {seed}) from")
        ck = load_checkpoint(slot.checkpoint, restore_rng=False, map_location=device)
        model, optimizer = ck.model, ck.optimizer
        if optimizer is None:
            raise CheckpointError(f"checkpoint {slot.checkpoint} holds no optimizer to resume")
        saved = ck.extra
    else:
        if model is None:
            raise GrowthConfigError(f"train_variant({variant!r}) needs a model unless resuming")
        torch.manual_seed(seed)
        model = model.to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=spec.lr)
        saved = {}
    done = int(saved.get("exps_done", 0))
    tb_logger = TensorboardLogger(tb_log_dir=str(slot.tb_dir / "avalanche"))
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True, stream=True),
                                 bwt_metrics(stream=True), loggers=[tb_logger])
    n_exps = bench.n_experiences
    # bars only on a terminal: piped / redirected stderr gets the plain per-experience lines
    use_bar = bool(progress) and isatty(sys.stderr)
    bar = tqdm(
        total=n_exps * spec.epochs,
        initial=done * spec.epochs,
        desc=f"{slot.label:>18}",
        unit="ep",
        disable=not use_bar,
        dynamic_ncols=True,
        leave=True,
    )
    strategy: Any = None

    def on_epoch(rec: Any) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{rec.last_loss:.3f}", params=count_params(strategy.model))

    purge = int(saved["step"]) + 1 if resume else None  # hide the interrupted tail in TB
    ctrl = None
    gplugin = None
    scalars: Any = None
    on_iteration = None
    expansion = spec.strategy in EXPANSION_STRATEGIES
    if grow and not expansion:
        ctrl, gplugin, tb, scalars = _make_controller(
            model, optimizer, spec, bench, run_dir, device, slot, purge
        )
        if ck is not None:
            ck.restore_controller(ctrl)
            gplugin.load_state_dict(saved["plugin"])
    else:
        # the baselines' training scalars, with the grown run's tags and logging period
        tb = TensorBoardSink(slot.tb_dir, purge_step=purge)

        def on_iteration(strat: Any) -> None:
            n = recorder.iterations
            if n % LOG_EVERY == 0 and math.isfinite(recorder.last_loss):
                tb.log_scalars(n, {LOSS_TAG: recorder.last_loss,
                                   PARAM_TAG: float(count_params(strat.model))})

    recorder = _make_recorder_plugin(on_epoch, on_iteration, task_aware=spec.strategy == "pnn")
    plugins: list[Any] = [recorder]
    if gplugin is not None:
        plugins.insert(0, gplugin)
    der_plugin = None
    if spec.strategy == "der":
        from .expansion import DERPlugin

        gate = None
        if grow:  # selfgrow's DER-style growth: a new extractor only when the probe says so
            from .probe import CapacityProbe

            gate = CapacityProbe(candidates=("expand",), steps=spec.probe_steps or 10,
                                 batch_size=spec.batch_size, margin=spec.probe_margin,
                                 seed=seed)
        der_plugin = DERPlugin(STRATEGY_DEFAULTS["der"]["aux_weight"], gate=gate)
        plugins.insert(0, der_plugin)
    buffer = None
    if spec.strategy in ("replay", "der"):
        buffer = _make_replay_buffer(spec.mem_size)
        plugins.append(ReplayPlugin(mem_size=spec.mem_size, storage_policy=buffer))
    elif not expansion:
        plugins += strategy_plugins(spec, bench.n_experiences)
    task_labels = bool(getattr(bench, "task_labels", False))
    if task_labels and spec.strategy != "pnn":  # task-incremental: logits of the task only
        from .expansion import TaskLogitMask

        plugins.append(TaskLogitMask(bench.classes_per_experience, bench.data.num_classes))
    if spec.strategy == "pnn":  # the padding mask and the stream check of every PNN run
        from .expansion import with_pnn_plugins

        plugins = with_pnn_plugins(plugins, math.prod(bench.data.input_shape))
    template: Any = Naive
    if spec.strategy == "cumulative":
        from avalanche.training.supervised import Cumulative

        template = Cumulative
    if spec.strategy == "pnn":
        from avalanche.training import PNNStrategy

        template = PNNStrategy
    strategy = template(
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
    if ck is not None:
        res = VariantResult.from_dict(saved["result"])
        recorder.iterations = int(saved["recorder"]["iterations"])
        recorder.last_loss = float(saved["recorder"]["last_loss"])
        recorder.flops.samples = {str(k): int(v) for k, v in saved["recorder"]["samples"].items()}
        recorder.flops.flops_per_sample = {
            str(k): float(v) for k, v in saved["recorder"]["flops_per_sample"].items()}
        if buffer is not None and saved.get("buffer") is not None:
            buffer.load_state_dict(saved["buffer"], bench.scenario.train_stream)
        # Avalanche resets the optimizer state at a fresh strategy's first experience;
        # the loaded Adam state must survive: the strategy already knows these tensors
        strategy.optimized_param_id = dict(model.named_parameters())
        ck.restore_rng()
    else:
        res = VariantResult(variant=variant, initial_params=count_params(model), seed=seed)
    wall0 = float(saved.get("wall_seconds", 0.0))
    t0 = time.perf_counter()

    def step_now() -> int:
        return gplugin.step if gplugin is not None else recorder.iterations

    def checkpoint(exps_done: int) -> None:
        if slot.checkpoint is None or expansion:  # DERNet / PNN: restarted on resume
            return
        res.wall_seconds = wall0 + time.perf_counter() - t0
        extra: dict[str, Any] = {
            "variant": variant,
            "seed": seed,
            "exps_done": exps_done,
            "step": step_now(),
            "result": res.to_dict(),
            "wall_seconds": res.wall_seconds,
            "recorder": {
                "iterations": recorder.iterations,
                "last_loss": recorder.last_loss,
                "samples": dict(recorder.flops.samples),
                "flops_per_sample": dict(recorder.flops.flops_per_sample),
            },
            "buffer": buffer.state_dict() if buffer is not None else None,
        }
        if gplugin is not None:
            extra["plugin"] = gplugin.state_dict()
        tb.flush()
        save_checkpoint(slot.checkpoint, strategy.model, strategy.optimizer,
                        controller=ctrl,
                        extra=extra)

    caught_cm = warnings.catch_warnings(record=True)
    caught = caught_cm.__enter__()
    try:
        if ck is None:
            checkpoint(0)
        for i, exp in enumerate(bench.scenario.train_stream):
            if i < done:
                continue
            strategy.train(exp)
            # PNN evaluates the experiences seen so far only: Avalanche's PNN adds a column
            # for every task it is evaluated on, and only the newest column trains, so
            # evaluating unseen tasks would freeze random columns for them before they train
            test = (bench.scenario.test_stream[: i + 1] if spec.strategy == "pnn"
                    else bench.scenario.test_stream)
            metrics = strategy.eval(test)
            # experiences not trained yet have no accuracy to report: None (null in JSON)
            row: list[float | None] = [
                _metric(metrics, ACC_EXP, f"Exp{j:03d}") if j <= i else None
                for j in range(n_exps)
            ]
            res.accuracy_matrix.append(row)
            seen = [float(a) for a in row[: i + 1] if a is not None]
            res.avg_accuracy_per_exp.append(sum(seen) / len(seen))
            # task-labelled streams get one stream accuracy per task: average the experiences
            res.final_avg_accuracy = (res.avg_accuracy_per_exp[-1] if task_labels
                                      else _metric(metrics, STREAM_ACC))
            res.avg_forgetting = average_forgetting(res.accuracy_matrix)
            bwt = metrics.get(BWT_STREAM)
            res.bwt = float(bwt) if bwt is not None else backward_transfer(res.accuracy_matrix)
            cells = " ".join(f"{a:.2f}" if a is not None else "  - " for a in row)
            msg = (
                f"[{slot.label}] exp {i + 1}/{n_exps} classes "
                f"{bench.classes_per_experience[i]}: acc per exp [{cells}] "
                f"avg(seen)={res.avg_accuracy_per_exp[-1]:.3f} "
                f"params={count_params(strategy.model)}"
            )
            if use_bar:
                bar.write(msg)
            else:
                print_fn(msg)
            if scalars is not None:
                scalars.log_row({"run_id": slot.run_id, "kind": "eval", "step": step_now(),
                                 "experience": i, "accuracy": row})
            tb.log_scalars(step_now(), {"eval/avg_acc_seen": res.avg_accuracy_per_exp[-1]})
            checkpoint(i + 1)
            if slot.after_experience is not None:
                slot.after_experience(variant, seed, i)
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
        tb.close()
        if scalars is not None:
            scalars.close()
    res.wall_seconds = wall0 + time.perf_counter() - t0
    final = strategy.model
    res.final_params = count_params(final)
    res.train_flops = float(recorder.total_flops)
    if gplugin is not None:  # the capacity probe's trials are training compute too
        res.probe_flops = float(gplugin.probe_flops)
        res.train_flops += res.probe_flops
    res.n_growths = int(ctrl.n_growths) if ctrl is not None else 0
    if der_plugin is not None:
        res.probe_flops = float(der_plugin.gate_flops)
        res.train_flops += res.probe_flops
        res.n_growths = sum(final.extractor_added)
        res.final_model_config = {"kind": "der", "extractors": len(final.extractors),
                                  "extractor_added": list(final.extractor_added),
                                  "gate_reports": der_plugin.gate_reports}
    elif spec.strategy == "pnn":
        n_cols = int(final.layers[0].num_columns)
        res.n_growths = n_cols - 1
        res.final_model_config = {"kind": "pnn", "columns": n_cols,
                                  "hidden_per_column": spec.width}
    else:
        from ..models import model_config_dict

        res.final_model_config = model_config_dict(final)
    return res, final, ctrl


def _action_kwargs(spec: RunSpec, action: str, model: nn.Module) -> dict[str, Any]:
    """Arguments of a growth action in ``selfgrow run``: the widening settings for ``widen``
    and ``widen_layers`` (which widens every hidden layer of the starting model); on the
    multimodal model ``widen`` and ``deepen`` target ``spec.component`` and ``widen_all``
    widens every component."""
    widen = {"factor": spec.widen_factor, "noise_std": spec.widen_noise,
             "split_noise": spec.widen_split_noise}
    from ..models.multimodal import GrowableMultimodal

    if isinstance(model, GrowableMultimodal):  # widen / deepen one component; widen_all all
        if action == "widen":
            return {"component": spec.component, **widen}
        if action == "deepen":
            return {"component": spec.component}
        return widen if action == "widen_all" else {}
    if action == "widen":
        return widen
    if action == "widen_layers":
        from ..ops.net2net import classifier_adapter

        return {"layers": list(range(len(classifier_adapter(model).units()))), **widen}
    return {}


def _make_policy(spec: RunSpec, model: nn.Module) -> tuple[list[Any], Any]:
    from ..control import Budget, LossPlateau, ReplayForgetting, Rule, RulePolicy

    signals = [
        ReplayForgetting(threshold=spec.forgetting_threshold, window=2),
        LossPlateau(window=spec.plateau_window, min_rel_drop=spec.plateau_min_rel_drop),
    ]
    policy = RulePolicy(
        [
            Rule("replay_forgetting", action=spec.on_forgetting,
                 kwargs=_action_kwargs(spec, spec.on_forgetting, model)),
            Rule("loss_plateau", action=spec.on_plateau,
                 kwargs=_action_kwargs(spec, spec.on_plateau, model)),
        ],
        budget=Budget(max_params=spec.max_params),
        cooldown=spec.cooldown,
        max_growths=spec.max_growths,
    )
    return signals, policy


def check_controller(spec: RunSpec, model: nn.Module) -> None:
    """Build the run's controller on ``model`` without any log (writes nothing): every
    action and its arguments are checked as the real run will check them.

    Raises:
        GrowthConfigError: an action or its arguments do not fit the model.
    """
    from ..control import GrowthController

    signals, policy = _make_policy(spec, model)
    opt = torch.optim.Adam(model.parameters(), lr=spec.lr)
    GrowthController(model, opt, signals=signals, policy=policy, measure_flops=False).close()


def _make_controller(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    spec: RunSpec,
    bench: Benchmark,
    run_dir: Path,
    device: torch.device,
    slot: _Slot,
    purge_step: int | None = None,
) -> tuple[Any, Any, Any, Any]:
    from ..control import GrowthController
    from ..events.tensorboard import TensorBoardSink
    from .plugin import GrowthPlugin

    tb = TensorBoardSink(slot.tb_dir, purge_step=purge_step)
    probe = bench.data.x_train[:64].to(device)
    signals, policy = _make_policy(spec, model)
    ctrl = GrowthController(
        model,
        optimizer,
        signals=signals,
        policy=policy,
        log_dir=str(run_dir),
        sinks=[tb],
        probe=probe,
        run_id=slot.run_id,
        scalar_every=LOG_EVERY,
    )
    scalars = ctrl.metrics_sink  # metrics.jsonl, rows tagged with the run id
    probe = None
    if spec.probe_steps > 0:
        from .probe import CapacityProbe

        cands = tuple(dict.fromkeys([spec.on_forgetting, "deepen"]))
        probe = CapacityProbe(
            candidates=cands,
            action_kwargs={a: _action_kwargs(spec, a, model) for a in cands},
            steps=spec.probe_steps, batch_size=spec.batch_size, margin=spec.probe_margin,
            seed=slot.seed)
    gplugin = GrowthPlugin(
        ctrl, replay_eval_every=spec.replay_eval_every, sinks=[tb, scalars],
        capacity_probe=probe,
    )
    return ctrl, gplugin, tb, scalars


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
        "widen_layers": "every hidden layer of the starting model",
        "component": spec.component if spec.model == "multimodal" else None,
        "budget": {"max_params": spec.max_params},
        "cooldown": spec.cooldown,
        "max_growths": spec.max_growths,
        "capacity_probe": ({"steps": spec.probe_steps, "margin": spec.probe_margin,
                            "candidates": list(dict.fromkeys([spec.on_forgetting, "deepen"]))}
                           if spec.probe_steps > 0 else None),
    }


# ---------------------------------------------------------------------------------------------
# several seeds: mean and std per variant
# ---------------------------------------------------------------------------------------------
#: per-variant numbers reported as mean and std over seeds
AGGREGATED = ("final_avg_accuracy", "avg_forgetting", "bwt", "final_params", "initial_params",
              "train_flops", "wall_seconds", "n_growths")


def _mean_std(values: list[Any]) -> tuple[float | int | None, float | None]:
    xs = [float(v) for v in values
          if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    if not xs:
        return None, None
    mean = sum(xs) / len(xs)
    std = (math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
           if len(xs) > 1 else None)
    if all(isinstance(v, int) for v in values) and mean == int(mean):
        return int(mean), std
    return mean, std


def _elementwise_mean(rows: list[list[Any]]) -> list[Any]:
    out = []
    for vals in zip(*rows, strict=False):
        if all(isinstance(v, list) for v in vals):
            out.append(_elementwise_mean(list(vals)))
        else:
            m, _ = _mean_std(list(vals))
            out.append(None if any(v is None for v in vals) else m)
    return out


def aggregate_seeds(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """One variant over seeds: every field of :data:`AGGREGATED` as the mean, plus
    ``<field>_std`` (sample standard deviation; None for a single seed), the element-wise
    mean of ``accuracy_matrix`` and ``avg_accuracy_per_exp``, ``seeds`` and ``n_seeds``.
    ``final_model_config`` is kept when every seed ends with the same one (else None)."""
    out: dict[str, Any] = {"variant": per_seed[0]["variant"],
                           "seeds": [r.get("seed") for r in per_seed],
                           "n_seeds": len(per_seed)}
    for f in AGGREGATED:
        out[f], out[f"{f}_std"] = _mean_std([r.get(f) for r in per_seed])
    for f in ("accuracy_matrix", "avg_accuracy_per_exp"):
        out[f] = _elementwise_mean([r.get(f) or [] for r in per_seed])
    cfgs = [r.get("final_model_config") for r in per_seed]
    out["final_model_config"] = cfgs[0] if all(c == cfgs[0] for c in cfgs) else None
    return out


# ---------------------------------------------------------------------------------------------
# the experiment
# ---------------------------------------------------------------------------------------------
STATE_DIR = "resume"
STATUS_FILE = "status.json"


def _status(run_dir: Path, status: str, progress: str = "") -> None:
    write_json(run_dir / STATUS_FILE, {
        "status": status, "progress": progress,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })


def _check_fits(spec: RunSpec, bench: Benchmark) -> None:
    """The starting model, sized on the meta device (nothing allocated), must fit: weights,
    gradients and Adam's two moments, against the memory available on the run's device.

    Raises:
        InsufficientMemoryError: it cannot (names --width / --channels).
    """
    from ..errors import InsufficientMemoryError
    from ..ops import available_memory

    with torch.device("meta"):
        model = build_small_model(spec.model, bench.data.input_shape, bench.data.num_classes,
                                  spec.width, spec.channels, benchmark_modalities(bench))
    need = count_params(model) * 4 * 4
    free = available_memory(resolve_device(spec.device))
    if free is not None and need > free:
        flag = f"--width {spec.width}" if spec.model == "mlp" else f"--channels {spec.channels}"
        raise InsufficientMemoryError(
            f"the starting {spec.model} ({flag}) has {count_params(model):,} parameters and "
            f"needs about {need / 2**30:.1f} GiB for weights, gradients and Adam state; "
            f"{free / 2**30:.1f} GiB are available: choose a smaller {flag.split()[0]}"
        )


def preflight(spec: RunSpec, runs_dir: str | os.PathLike[str], name: str | None
              ) -> tuple[str, Benchmark, list[str]]:
    """Every check of a run before anything is written: the spec, name, runs directory,
    data, every growth action with its arguments on the real starting model, and the
    parameter budget.

    Returns:
        ``(run_name, benchmark of the first seed, warnings)``; a warning says when the
        starting model already has more parameters than ``max_params`` (no growth can fit).
    """
    spec.validate()
    run_name = name or f"{spec.benchmark}-{spec.model}-{spec.strategy}"
    check_run_name(run_name)
    check_runs_dir(runs_dir)
    bench = spec_benchmark(spec, spec.seed_list()[0])
    _check_fits(spec, bench)
    model = build_small_model(spec.model, bench.data.input_shape, bench.data.num_classes,
                              spec.width, spec.channels, benchmark_modalities(bench))
    check_controller(spec, model)
    notes = []
    n = count_params(model)
    if n > spec.max_params:
        notes.append(
            f"the starting model already has {n:,} parameters, over the growth budget "
            f"--max-params {spec.max_params:,.0f}: it will never grow (raise --max-params)"
        )
    return run_name, bench, notes


class RunBudgetWarning(UserWarning):
    """The starting model is already over the run's parameter budget."""


def run_experiment(
    spec: RunSpec,
    runs_dir: str | os.PathLike[str] = "runs",
    name: str | None = None,
    print_fn: Callable[[str], None] = print,
    progress: bool = True,
    *,
    after_experience: Callable[[str, int, int], None] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Validate, create a fresh run directory, train every variant for every seed, write the
    summary.

    ``status.json`` says ``running`` from the start, ``interrupted`` / ``failed`` when the
    run stops early (it can then be continued with :func:`resume_experiment`) and
    ``complete`` at the end. ``after_experience(variant, seed, experience_id)`` is called
    after each experience's checkpoint.

    Returns:
        ``(run_dir, summary)``.

    Raises:
        GrowthConfigError: bad spec, bad ``name`` or unusable ``runs_dir`` (raised before
            anything is written).
        DataUnavailableError: a data package is missing (before anything is written).
    """
    run_name, bench, notes = preflight(spec, runs_dir, name)
    for note in notes:
        print_fn(f"warning: {note}")
        warnings.warn(note, RunBudgetWarning, stacklevel=2)
    run_dir = create_run_dir(runs_dir, run_name)
    config = {
        "spec": dataclasses.asdict(spec),
        "benchmark": bench.describe(),
        "controller": controller_description(spec),
        "versions": package_versions(),
    }
    write_json(run_dir / "config.json", config)
    _status(run_dir, "running", "starting")
    (run_dir / STATE_DIR).mkdir()
    write_json(run_dir / STATE_DIR / "state.json", {"completed": {}})
    return _run(spec, run_dir, config, bench, print_fn, progress, after_experience, resumed=False)


def load_resumable(run_dir: str | os.PathLike[str]) -> tuple[Path, RunSpec]:
    """The run directory and spec of an unfinished ``selfgrow run``.

    Raises:
        RunDirError: not a directory of ``selfgrow run``, already complete, or written by a
            version that kept no checkpoints (the message says which).
    """
    from ..errors import RunDirError

    d = Path(run_dir)
    if not d.is_dir():
        raise RunDirError(f"--resume {str(d)!r}: no such run directory")
    try:
        status = json.loads((d / STATUS_FILE).read_text(encoding="utf-8")).get("status")
    except (OSError, ValueError, AttributeError):
        status = None
    if status == "complete" or (status is None and (d / "summary.json").is_file()):
        raise RunDirError(f"--resume {str(d)!r}: this run is already complete")
    try:
        config = json.loads((d / "config.json").read_text(encoding="utf-8"))
        spec_d = config["spec"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RunDirError(f"--resume {str(d)!r}: not a selfgrow run directory (config.json "
                          f"unreadable: {type(e).__name__})") from e
    if not (d / STATE_DIR / "state.json").is_file():
        raise RunDirError(f"--resume {str(d)!r}: the run kept no checkpoints to resume from")
    names = {f.name for f in dataclasses.fields(RunSpec)}
    spec = RunSpec(**{k: v for k, v in spec_d.items() if k in names})
    spec.validate()
    return d, spec


def resume_experiment(
    run_dir: str | os.PathLike[str],
    print_fn: Callable[[str], None] = print,
    progress: bool = True,
    *,
    after_experience: Callable[[str, int, int], None] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Continue an interrupted :func:`run_experiment` from its last per-experience
    checkpoint: finished variants are kept, the interrupted one is rebuilt (grown
    architecture, optimizer, controller, plugin, replay buffer, RNG states) and continues
    with the next experience; events and metrics logged after the checkpoint are dropped
    first (the resumed run logs them again)."""
    d, spec = load_resumable(run_dir)
    config = json.loads((d / "config.json").read_text(encoding="utf-8"))
    bench = spec_benchmark(spec, spec.seed_list()[0])
    _status(d, "running", "resuming")
    return _run(spec, d, config, bench, print_fn, progress, after_experience, resumed=True)


def _run(
    spec: RunSpec,
    run_dir: Path,
    config: dict[str, Any],
    bench0: Benchmark,
    print_fn: Callable[[str], None],
    progress: bool,
    after_experience: Callable[[str, int, int], None] | None,
    resumed: bool,
) -> tuple[Path, dict[str, Any]]:
    from ..models import build_model

    seeds = spec.seed_list()
    multi = len(seeds) > 1
    state_path = run_dir / STATE_DIR / "state.json"
    ckpt = run_dir / STATE_DIR / "checkpoint.pt"
    state = json.loads(state_path.read_text(encoding="utf-8"))
    completed: dict[str, dict[str, Any]] = state.get("completed", {})
    current = state.get("current")
    t_start = time.perf_counter() - float(state.get("wall_seconds_total", 0.0))
    print_fn(
        f"selfgrow run {'(resumed) ' if resumed else ''}-> {run_dir}  ({bench0.name}: "
        f"{bench0.n_experiences} experiences, {bench0.data.source['n_train']} train / "
        f"{bench0.data.source['n_test']} test samples, data: {bench0.data.source['package']} "
        f"{bench0.data.source['version']}"
        + (f"; seeds {', '.join(map(str, seeds))}" if multi else "") + ")"
    )
    if spec.growth == "off":
        variants = ["fixed_small"]
    elif spec.strategy in EXPANSION_STRATEGIES:  # DER: the gated one beside plain DER
        variants = ["grown", "fixed_small"] if spec.baselines else ["grown"]
    else:
        variants = list(VARIANTS) if spec.baselines else ["grown"]
    progress_text = "starting"

    def on_exp(variant: str, seed: int, i: int) -> None:
        nonlocal progress_text
        progress_text = (f"seed {seed}, {variant}, experience {i + 1}/{bench0.n_experiences}"
                         " done")
        state["current"] = {"seed": seed, "variant": variant}
        state["wall_seconds_total"] = time.perf_counter() - t_start
        write_json(state_path, state)
        _status(run_dir, "running", progress_text)
        if after_experience is not None:
            after_experience(variant, seed, i)

    try:
        for seed in seeds:
            bench = bench0 if seed == seeds[0] else spec_benchmark(spec, seed)
            state.setdefault("class_orders", {})[str(seed)] = bench.classes_per_experience
            done = completed.setdefault(str(seed), {})

            def small(seed: int = seed, bench: Benchmark = bench) -> nn.Module:
                torch.manual_seed(seed)
                if spec.strategy in EXPANSION_STRATEGIES:
                    return build_expansion_model(spec, bench)
                return build_small_model(spec.model, bench.data.input_shape,
                                         bench.data.num_classes, spec.width, spec.channels,
                                         benchmark_modalities(bench))

            for variant in variants:
                if variant in done:
                    continue
                slot = _Slot(
                    variant, seed,
                    run_dir / "tb" / (f"seed{seed}/{variant}" if multi else variant),
                    f"{run_dir.name}-seed{seed}" if multi else run_dir.name,
                    variant_label(variant, spec.strategy) + (f" s{seed}" if multi else ""),
                    checkpoint=ckpt, after_experience=on_exp,
                )
                cont = bool(resumed and current == {"seed": seed, "variant": variant}
                            and ckpt.is_file())
                if cont and spec.strategy in UNCHECKPOINTED:
                    print_fn(f"resume: --strategy {spec.strategy} keeps plugin state that is "
                             f"not checkpointed; {variant} (seed {seed}) restarts from its "
                             f"first experience")
                    cont = False
                model: nn.Module | None = None
                pick = (equal_flops_width(spec, bench, done["grown"]["train_flops"],
                                          done["fixed_small"]["train_flops"])
                        if variant == "fixed_equal" else None)
                if not cont:
                    if variant == "fixed_grown":
                        torch.manual_seed(seed)
                        model = build_model(done["grown"]["final_model_config"])
                    elif pick is not None:  # fixed_equal
                        torch.manual_seed(seed)
                        model = equal_flops_model(spec, bench, pick["width"], pick["scaled"])
                    else:
                        model = small()
                state["current"] = {"seed": seed, "variant": variant}
                write_json(state_path, state)
                res = train_variant(variant, model, spec, bench, run_dir,
                                    grow=variant == "grown", print_fn=print_fn,
                                    progress=progress, slot=slot, resume=cont)[0]
                res.equal_flops = pick
                done[variant] = res.to_dict()
                state["current"] = None
                write_json(state_path, state)
    except BaseException as e:
        status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        state["wall_seconds_total"] = time.perf_counter() - t_start
        write_json(state_path, state)
        _status(run_dir, status, progress_text)
        from ..runs import cli_command

        print_fn(f"\nrun {status} after {progress_text}; it is incomplete. Continue it with:\n"
                 f"  {cli_command()} run --resume {run_dir}")
        raise

    summary = _summary(spec, run_dir, config, bench0, completed, seeds,
                       time.perf_counter() - t_start)
    summary["class_orders"] = state.get("class_orders", {})
    write_json(run_dir / "summary.json", summary)
    _status(run_dir, "complete", "done")
    import shutil

    shutil.rmtree(run_dir / STATE_DIR, ignore_errors=True)
    print_fn("")
    print_fn(format_summary_table(summary))
    return run_dir, summary


def _summary(
    spec: RunSpec, run_dir: Path, config: dict[str, Any], bench: Benchmark,
    completed: dict[str, dict[str, Any]], seeds: list[int], wall: float,
) -> dict[str, Any]:
    from ..events import read_events

    ev_path = run_dir / "events.jsonl"
    events = read_events(ev_path)[0] if ev_path.is_file() else []
    per_seed = {str(s): completed[str(s)] for s in seeds}
    names = list(per_seed[str(seeds[0])])
    variants = {v: aggregate_seeds([per_seed[str(s)][v] for s in seeds]) for v in names}
    if len(seeds) == 1:  # one seed: the variant's own result, with the aggregate fields
        variants = {v: {**per_seed[str(seeds[0])][v], **{k: a for k, a in agg.items()
                                                        if k.endswith("_std") or k in
                                                        ("seeds", "n_seeds")}}
                    for v, agg in variants.items()}
    return {
        "name": run_dir.name,
        "run_dir": str(run_dir),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "status": "complete",
        "benchmark": bench.describe(),
        "data_source": bench.data.source,
        "strategy": spec.strategy,
        "model": spec.model,
        "lr": spec.lr,
        "epochs": spec.epochs,
        "seeds": seeds,
        "versions": config["versions"],
        "variants": variants,
        "per_seed": per_seed,
        "growth_events": sum(1 for e in events if e.kind == "growth"),
        "prune_events": sum(1 for e in events if e.kind == "prune"),
        "skipped_events": sum(1 for e in events if e.kind == "skipped"),
        "wall_seconds_total": wall,
    }


def format_summary_table(summary: dict[str, Any]) -> str:
    """Plain aligned text table of the variants in a summary (one row per variant); with
    several seeds the numbers are ``mean ± std`` over the seeds."""
    header = ["model", "final avg acc", "avg forgetting", "params", "train FLOPs",
              "wall s", "growths"]
    rows = []

    def cell(v: dict[str, Any], key: str, f: str) -> str:
        text = fmt(v.get(key), f)
        std = v.get(f"{key}_std")
        return text if std is None or text == "n/a" else f"{text} ± {fmt(std, f)}"

    seeds = summary.get("seeds") or []
    for key in VARIANTS:
        v = summary.get("variants", {}).get(key)
        if v is None:
            continue
        if len(seeds) > 1:
            params = cell(v, "final_params", "{:,.0f}")
        else:
            params = (
                f"{v['initial_params']:,} -> {v['final_params']:,}"
                if v["initial_params"] != v["final_params"] else f"{v['final_params']:,}"
            )
        rows.append([
            variant_label(key, summary.get("strategy")),
            cell(v, "final_avg_accuracy", "{:.3f}"),
            cell(v, "avg_forgetting", "{:.3f}"),
            params,
            cell(v, "train_flops", "{:.3g}"),
            cell(v, "wall_seconds", "{:.1f}"),
            cell(v, "n_growths", "{:.3g}") if len(seeds) > 1 else str(v.get("n_growths", 0)),
        ])
    table = format_table(header, rows)
    if len(seeds) > 1:
        table = f"mean ± std over seeds {', '.join(map(str, seeds))}:\n{table}"
    return table
