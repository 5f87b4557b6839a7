"""Continual learning with growth: Avalanche :class:`GrowthPlugin`, offline class-incremental
benchmarks, and the ``selfgrow run`` experiment (:mod:`selfgrow.continual.runner`).

Needs ``avalanche-lib`` (``pip install 'selfgrow[continual]'``).
"""

from .benchmarks import Benchmark, build_benchmark, class_incremental, list_benchmarks
from .plugin import GrowthPlugin, check_optimizer_matches

__all__ = [
    "Benchmark",
    "GrowthPlugin",
    "build_benchmark",
    "check_optimizer_matches",
    "class_incremental",
    "list_benchmarks",
]
