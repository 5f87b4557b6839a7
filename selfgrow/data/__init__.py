"""Offline real data loaders (nothing is downloaded; see DATA.md)."""

from .digits import (
    ClassificationData,
    list_datasets,
    load_dataset,
    load_digits,
    load_mnist,
    stratified_split,
)
from .text import (
    LMBatches,
    TextCorpus,
    eval_windows,
    list_corpora,
    load_corpus,
    load_python_stdlib,
    load_shakespeare,
)

__all__ = [
    "LMBatches",
    "TextCorpus",
    "eval_windows",
    "list_corpora",
    "load_corpus",
    "load_python_stdlib",
    "load_shakespeare",
    "ClassificationData",
    "list_datasets",
    "load_dataset",
    "load_digits",
    "load_mnist",
    "stratified_split",
]
