"""Imports every public operator module of :mod:`selfgrow.ops` so that they register."""

from __future__ import annotations

import importlib
import pkgutil

from . import __path__ as _ops_path

for _m in pkgutil.iter_modules(_ops_path):
    if not _m.name.startswith("_"):
        importlib.import_module(f"{__package__}.{_m.name}")
