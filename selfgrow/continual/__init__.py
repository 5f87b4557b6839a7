"""Continual learning with growth: Avalanche :class:`GrowthPlugin`, offline class-incremental
benchmarks, the field's expansion methods (DER, PNN: :mod:`selfgrow.continual.expansion`) and
the ``selfgrow run`` experiment (:mod:`selfgrow.continual.runner`).

Needs ``avalanche-lib`` (``pip install 'selfgrow[continual]'``); it is imported only when
``GrowthPlugin``, an expansion method or a benchmark is first used, so ``selfgrow --help`` and
``selfgrow inspect`` stay fast.
"""

from __future__ import annotations

from typing import Any

from .benchmarks import (
    BENCHMARKS,
    SCENARIO_KINDS,
    Benchmark,
    BenchmarkSpec,
    benchmark_info,
    build_benchmark,
    class_incremental,
    list_benchmarks,
    permuted_domain_incremental,
    sea_drift,
    split_counts,
)

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "BenchmarkSpec",
    "DERNet",
    "DERPlugin",
    "GrowthPlugin",
    "SCENARIO_KINDS",
    "benchmark_info",
    "build_benchmark",
    "check_optimizer_matches",
    "check_task_incremental",
    "class_incremental",
    "der_extractor",
    "der_strategy",
    "list_benchmarks",
    "permuted_domain_incremental",
    "pnn_strategy",
    "sea_drift",
    "split_counts",
]

#: names of :mod:`selfgrow.continual.expansion` (DER, PNN), imported on first use
_EXPANSION = ("DERNet", "DERPlugin", "check_task_incremental", "der_extractor",
              "der_strategy", "pnn_strategy")


def __getattr__(name: str) -> Any:  # lazy: importing avalanche takes seconds
    if name in ("GrowthPlugin", "check_optimizer_matches"):
        from . import plugin

        return getattr(plugin, name)
    if name in _EXPANSION:
        from . import expansion

        return getattr(expansion, name)
    raise AttributeError(f"module 'selfgrow.continual' has no attribute {name!r}")
