"""Continual learning with growth: Avalanche :class:`GrowthPlugin`, offline class-incremental
benchmarks, and the ``selfgrow run`` experiment (:mod:`selfgrow.continual.runner`).

Needs ``avalanche-lib`` (``pip install 'selfgrow[continual]'``); it is imported only when
``GrowthPlugin`` or a benchmark is first used, so ``selfgrow --help`` and ``selfgrow inspect``
stay fast.
"""

from __future__ import annotations

from typing import Any

from .benchmarks import Benchmark, build_benchmark, class_incremental, list_benchmarks

__all__ = [
    "Benchmark",
    "GrowthPlugin",
    "build_benchmark",
    "check_optimizer_matches",
    "class_incremental",
    "list_benchmarks",
]


def __getattr__(name: str) -> Any:  # lazy: importing avalanche takes seconds
    if name in ("GrowthPlugin", "check_optimizer_matches"):
        from . import plugin

        return getattr(plugin, name)
    raise AttributeError(f"module 'selfgrow.continual' has no attribute {name!r}")
