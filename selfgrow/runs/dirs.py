"""Run directories: safe names, never overwriting, JSON files, package versions."""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import GrowthConfigError
from .summary import finite

RUN_NAME_RULE = (
    "a single path component of letters, digits, '-', '_' and '.', not starting with '.'"
)
_RUN_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def check_run_name(name: str) -> None:
    """Raise :class:`GrowthConfigError` unless ``name`` is a safe run-directory name."""
    if not isinstance(name, str) or not _RUN_NAME_RE.fullmatch(name):
        raise GrowthConfigError(f"--name {name!r} is not valid; it must be {RUN_NAME_RULE}")


def check_runs_dir(runs_dir: str | os.PathLike[str]) -> None:
    """Raise :class:`GrowthConfigError` if ``runs_dir`` is an existing non-directory or lies
    under one (checked without creating anything)."""
    p = Path(runs_dir)
    if p.exists() and not p.is_dir():
        raise GrowthConfigError(f"--runs-dir {str(p)!r} exists and is not a directory")
    for parent in p.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise GrowthConfigError(
                    f"--runs-dir {str(p)!r} cannot be created: {str(parent)!r} is not a directory"
                )
            break


def unique_run_dir(runs_dir: str | os.PathLike[str], name: str) -> Path:
    """``runs_dir/name``, or ``name-1``, ``name-2`` ... if taken (never overwrites)."""
    base = Path(runs_dir)
    cand = base / name
    i = 0
    while cand.exists():
        i += 1
        cand = base / f"{name}-{i}"
    return cand


def create_run_dir(runs_dir: str | os.PathLike[str], name: str) -> Path:
    """Validate ``name`` and ``runs_dir``, then create a fresh ``runs_dir/name[-k]``.

    Raises:
        GrowthConfigError: bad name, unusable ``runs_dir``, or the directory cannot be
            created (nothing is left behind).
    """
    check_run_name(name)
    check_runs_dir(runs_dir)
    run_dir = unique_run_dir(runs_dir, name)
    try:
        run_dir.mkdir(parents=True)
    except OSError as e:
        raise GrowthConfigError(
            f"--runs-dir {str(runs_dir)!r}: cannot create the run directory {str(run_dir)!r} "
            f"({e.strerror or e})"
        ) from e
    return run_dir


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON (non-finite floats become null), atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_text(json.dumps(finite(obj), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def package_versions(
    packages: Iterable[str] = ("selfgrow", "torch", "avalanche-lib", "mlxtend", "scikit-learn"),
) -> dict[str, str]:
    """``{"python": ..., package: version or "not installed"}`` for a run's config."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in packages:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _rel_command(path: str) -> str:
    r = os.path.relpath(path)
    if r.startswith(".."):
        r = os.path.abspath(path)
    elif os.sep not in r:
        r = "." + os.sep + r
    return shlex.quote(r)


def cli_command() -> str:
    """How to run ``selfgrow`` again from the current directory, the way this process was
    started: ``selfgrow`` when that is what PATH finds, else the script's path (e.g.
    ``.venv/bin/selfgrow`` after ``./scripts/demo``), else ``PYTHON -m selfgrow``."""
    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0) in ("selfgrow", "selfgrow.exe") and os.path.isfile(argv0):
        found = shutil.which("selfgrow")
        if found and os.path.realpath(found) == os.path.realpath(argv0):
            return "selfgrow"
        return _rel_command(argv0)
    return f"{_rel_command(sys.executable)} -m selfgrow"


def tensorboard_command() -> str:
    """``tensorboard`` of this Python environment, runnable from the current directory."""
    tb = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    if os.path.isfile(tb):
        return _rel_command(tb)
    return f"{_rel_command(sys.executable)} -m tensorboard.main"
