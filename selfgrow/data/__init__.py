"""Offline real data loaders (nothing is downloaded; see DATA.md)."""

from .av_digits import PairedData, build_av_digits, default_cache_dir, load_av_mnist
from .digits import (
    ClassificationData,
    dataset_missing,
    list_datasets,
    load_dataset,
    load_digits,
    load_mnist,
    stratified_split,
)
from .drift import load_random_rbf, load_sea
from .text import (
    LMBatches,
    TextCorpus,
    eval_windows,
    list_corpora,
    load_corpus,
    load_python_stdlib,
    load_shakespeare,
)
from .vision import load_animal_mnist, load_fashion_mnist, load_mnist_animals

__all__ = [
    "ClassificationData",
    "LMBatches",
    "PairedData",
    "TextCorpus",
    "build_av_digits",
    "dataset_missing",
    "default_cache_dir",
    "eval_windows",
    "list_corpora",
    "list_datasets",
    "load_animal_mnist",
    "load_av_mnist",
    "load_corpus",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist",
    "load_mnist_animals",
    "load_python_stdlib",
    "load_random_rbf",
    "load_sea",
    "load_shakespeare",
    "stratified_split",
]
