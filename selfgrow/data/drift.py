"""Seeded concept-drift data from ``river`` (generated locally; nothing is downloaded).

:func:`load_sea` draws the SEA stream (Street & Kim 2001) one concept after another: 3 features
uniform in ``[0, 10]``, label ``x0 + x1 > theta`` with ``theta`` = 8, 9, 7, 9.5 for river's
variants 0, 1, 2, 3; the third feature is irrelevant. :func:`load_random_rbf` draws RandomRBF
concepts of changing difficulty (many centroids: hard; few: easy), the self-evolving
benchmark's stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..errors import GrowthConfigError
from .digits import ClassificationData, _require, _version

#: river's SEA variant -> threshold on ``x0 + x1`` (river/datasets/synth/sea.py)
SEA_THRESHOLDS = {0: 8.0, 1: 9.0, 2: 7.0, 3: 9.5}


def _concept_seed(seed: int, k: int) -> int:
    """Seed of concept ``k``'s generator: distinct per concept, so the concepts do not share
    their inputs (river's SEA draws the same ``x`` for the same seed whatever the variant)."""
    return int(np.random.SeedSequence([seed, k]).generate_state(1)[0])


def load_sea(
    seed: int = 0,
    flatten: bool = True,
    variants: Sequence[int] = (0, 1, 2, 3),
    n_train: int = 2000,
    n_test: int = 500,
    noise: float = 0.1,
) -> ClassificationData:
    """The SEA abrupt-drift stream, one block per concept, from
    ``river.datasets.synth.SEA(variant=v, noise=noise, seed=...)``.

    Concept ``k`` (variant ``variants[k]``) takes the first ``n_train + n_test`` samples of its
    own generator: the first ``n_train`` for training, the rest for testing. ``x_train`` is
    the concatenation of the concepts' training blocks in order (``(K * n_train, 3)``), the
    same for ``x_test``; ``source["concepts"]`` gives each block's variant, threshold, seed and
    size. Features are standardised per feature with the mean/std of the pooled training
    blocks; labels are 0/1.

    ``noise`` defaults to 0.1: the original SEA protocol (and MOA's generator) flips 10% of
    the labels; river's own default is 0.0. The noise is in train AND test labels, so the best
    accuracy on a concept is about 90%.

    Args:
        seed: base seed; concept ``k`` uses a seed derived from ``(seed, k)``.
        flatten: accepted for the registry's uniform signature; the features are always flat.
        variants: river SEA variants (0..3) in stream order, repeats allowed.
        n_train: training samples per concept.
        n_test: test samples per concept.
        noise: fraction of labels flipped, in ``[0, 0.5)``.

    Raises:
        DataUnavailableError: ``river`` is not installed.
        GrowthConfigError: an unknown variant, sizes < 1 or noise out of range.
    """
    del flatten
    variants = [int(v) for v in variants]
    bad = [v for v in variants if v not in SEA_THRESHOLDS]
    if not variants or bad:
        raise GrowthConfigError(
            f"SEA variants {variants} invalid; valid choices: 0, 1, 2, 3 (at least one)")
    for label, n in (("n_train", n_train), ("n_test", n_test)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise GrowthConfigError(f"{label}={n!r} is out of range; valid: an integer >= 1")
    if not 0.0 <= noise < 0.5:
        raise GrowthConfigError(f"noise={noise!r} is out of range; valid: [0, 0.5)")
    synth = _require("river.datasets.synth", "river==0.26.1")
    xs_tr, ys_tr, xs_te, ys_te, concepts = [], [], [], [], []
    for k, v in enumerate(variants):
        s = _concept_seed(seed, k)
        rows = list(synth.SEA(variant=v, noise=noise, seed=s).take(n_train + n_test))
        x = np.array([[r[0][0], r[0][1], r[0][2]] for r in rows], dtype=np.float64)
        y = np.array([bool(r[1]) for r in rows], dtype=np.int64)
        xs_tr.append(x[:n_train])
        ys_tr.append(y[:n_train])
        xs_te.append(x[n_train:])
        ys_te.append(y[n_train:])
        concepts.append({"variant": v, "threshold": SEA_THRESHOLDS[v], "seed": s,
                         "n_train": n_train, "n_test": n_test})
    source: dict[str, Any] = {
        "dataset": "SEA concepts stream (Street & Kim 2001), river.datasets.synth.SEA",
        "noise": noise,
        "concepts": concepts,
    }
    return _pack("sea", xs_tr, ys_tr, xs_te, ys_te, 2, seed, source)


def _pack(name: str, xs_tr: list[np.ndarray], ys_tr: list[np.ndarray], xs_te: list[np.ndarray],
          ys_te: list[np.ndarray], num_classes: int, seed: int, source: dict[str, Any]
          ) -> ClassificationData:
    """Concatenate the concepts' blocks in stream order and standardise every feature with
    the mean / std of the pooled training blocks (recorded in ``source["normalise"]``)."""
    x_tr, x_te = np.concatenate(xs_tr), np.concatenate(xs_te)
    mean, std = x_tr.mean(axis=0), np.maximum(x_tr.std(axis=0), 1e-8)
    source = {
        **source,
        "package": "river",
        "version": _version("river"),
        "split_seed": seed,
        "n_train": len(x_tr),
        "n_test": len(x_te),
        "normalise": {"mean": mean.tolist(), "std": std.tolist(),
                      "scale": "per feature, pooled training blocks"},
    }

    def t(x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor((x - mean) / std, dtype=torch.float32).contiguous()

    return ClassificationData(
        name=name,
        x_train=t(x_tr),
        y_train=torch.as_tensor(np.concatenate(ys_tr)),
        x_test=t(x_te),
        y_test=torch.as_tensor(np.concatenate(ys_te)),
        num_classes=num_classes,
        source=source,
    )


def load_random_rbf(
    seed: int = 0,
    flatten: bool = True,
    centroids: Sequence[int] = (50, 2, 50, 2),
    n_train: int | Sequence[int] = 2000,
    n_test: int = 500,
    n_features: int = 10,
    n_classes: int = 5,
) -> ClassificationData:
    """A stream of RandomRBF concepts (river ``RandomRBF``, the MOA generator) whose
    difficulty changes: concept ``k`` draws its samples around ``centroids[k]`` random
    Gaussian centroids, each with a random class and weight. Many centroids make a complex
    decision boundary that needs capacity (50: a 2x8 MLP reaches about 80% prequential
    accuracy where 2x128 reaches about 91%); two centroids are an easy concept any small
    model solves. Every concept has its own generator (``seed_model`` and ``seed_sample``
    derived from ``(seed, k)``), so consecutive concepts are new tasks, not repeats.

    Concept ``k`` takes the first ``n_train[k] + n_test`` samples of its generator: the first
    ``n_train[k]`` for training (the stream, in order), the rest for testing.
    ``source["concepts"]`` gives each block's centroids, seeds and sizes. Features are
    standardised with the pooled training blocks' mean / std.

    Args:
        seed: base seed.
        flatten: accepted for the registry's uniform signature; the features are always flat.
        centroids: centroids per concept in stream order (each >= 1).
        n_train: training samples per concept (one int for all, or one per concept).
        n_test: test samples per concept.
        n_features: input features (>= 2).
        n_classes: classes (>= 2).

    Raises:
        DataUnavailableError: ``river`` is not installed.
        GrowthConfigError: an empty ``centroids``, a size out of range, or ``n_train`` of the
            wrong length.
    """
    del flatten
    cents = list(centroids) if not isinstance(centroids, (str, bytes)) else []
    if not cents or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in cents):
        raise GrowthConfigError(f"centroids={centroids!r} is invalid; valid: a non-empty list "
                                f"of integers >= 1, one per concept")
    sizes = [n_train] * len(cents) if isinstance(n_train, int) else list(n_train)
    if len(sizes) != len(cents):
        raise GrowthConfigError(f"n_train={n_train!r} has {len(sizes)} sizes for "
                                f"{len(cents)} concepts; give one int or one per concept")
    for label, n, lo in (*(("n_train", v, 1) for v in sizes), ("n_test", n_test, 1),
                         ("n_features", n_features, 2), ("n_classes", n_classes, 2)):
        if isinstance(n, bool) or not isinstance(n, int) or n < lo:
            raise GrowthConfigError(f"{label}={n!r} is out of range; valid: an integer >= {lo}")
    synth = _require("river.datasets.synth", "river==0.26.1")
    xs_tr, ys_tr, xs_te, ys_te, concepts = [], [], [], [], []
    for k, (c, n) in enumerate(zip(cents, sizes, strict=True)):
        s_model, s_sample = (_concept_seed(seed, 2 * k), _concept_seed(seed, 2 * k + 1))
        gen = synth.RandomRBF(seed_model=s_model, seed_sample=s_sample, n_classes=n_classes,
                              n_features=n_features, n_centroids=c)
        rows = list(gen.take(n + n_test))
        x = np.array([[r[0][j] for j in range(n_features)] for r in rows], dtype=np.float64)
        y = np.array([int(r[1]) for r in rows], dtype=np.int64)
        xs_tr.append(x[:n])
        ys_tr.append(y[:n])
        xs_te.append(x[n:])
        ys_te.append(y[n:])
        concepts.append({"centroids": c, "seed_model": s_model, "seed_sample": s_sample,
                         "n_train": n, "n_test": n_test})
    source: dict[str, Any] = {
        "dataset": "RandomRBF concepts stream (MOA), river.datasets.synth.RandomRBF",
        "n_features": n_features,
        "concepts": concepts,
    }
    return _pack("random_rbf", xs_tr, ys_tr, xs_te, ys_te, n_classes, seed, source)
