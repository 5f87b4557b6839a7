"""Offline real data loaders (nothing is downloaded; see DATA.md)."""

from .digits import (
    ClassificationData,
    list_datasets,
    load_dataset,
    load_digits,
    load_mnist,
    stratified_split,
)

__all__ = [
    "ClassificationData",
    "list_datasets",
    "load_dataset",
    "load_digits",
    "load_mnist",
    "stratified_split",
]
