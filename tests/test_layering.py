"""Architecture rules, checked on the source: dependencies run one way, and no module reaches
into another package's private module.

Layers (lower never imports higher, lazily inside functions included)::

    errors < core, _config < optim, events, models, runs < adapters < ops < control
           < checkpoint < continual < inspect_run, cli, integrations

``selfgrow.core`` (Transaction, ParamMap, regrid ...) imports nothing of selfgrow but
``errors``. Operators never import the controller.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import selfgrow

ROOT = Path(selfgrow.__file__).parent

#: layer of each top-level part of selfgrow (first component after "selfgrow.")
LAYER = {
    "errors": 0,
    "core": 1,
    "_config": 1,
    "optim": 2,
    "events": 2,
    "models": 2,
    "runs": 2,
    "data": 2,
    "adapters": 3,
    "ops": 4,
    "control": 5,
    "checkpoint": 6,
    "continual": 7,
    "pretrain": 7,
    "integrations": 8,
    "inspect_run": 8,
    "cli": 9,
    "ddp_demo": 9,
    "__main__": 9,
}


def _modules() -> list[tuple[str, Path]]:
    out = []
    for p in sorted(ROOT.rglob("*.py")):
        rel = p.relative_to(ROOT).with_suffix("")
        parts = ["selfgrow", *rel.parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append((".".join(parts), p))
    return out


def _imports(mod: str, path: Path) -> list[str]:
    """Absolute names of every selfgrow module ``mod`` imports (top-level and lazy)."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    pkg = mod if is_pkg else mod.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("selfgrow")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("selfgrow"):
                continue
            found.append(target)
            # ``from . import x`` / ``from .pkg import sub``: the names may be modules
            for a in node.names:
                cand = f"{target}.{a.name}"
                if (ROOT.parent / (cand.replace(".", "/") + ".py")).exists() or (
                    ROOT.parent / cand.replace(".", "/") / "__init__.py"
                ).exists():
                    found.append(cand)
    return found


def _part(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


MODULES = _modules()


def test_every_part_has_a_layer():
    missing = sorted({_part(m) for m, _ in MODULES if _part(m) and _part(m) not in LAYER})
    assert not missing, f"add these parts of selfgrow to LAYER: {missing}"


@pytest.mark.parametrize("mod,path", MODULES, ids=[m for m, _ in MODULES])
def test_dependencies_run_one_way(mod, path):
    me = _part(mod)
    if not me:
        return  # selfgrow/__init__.py is the user-facing facade over every layer
    bad = [
        t for t in _imports(mod, path)
        if _part(t) and _part(t) != me and LAYER[_part(t)] > LAYER[me]
    ]
    assert not bad, f"{mod} (layer {LAYER[me]}) imports higher layers: {bad}"


def test_core_imports_only_errors():
    path = ROOT / "core.py"
    deps = {_part(t) for t in _imports("selfgrow.core", path)}
    assert deps <= {"errors"}, deps


def test_operators_do_not_import_the_controller():
    for mod, path in MODULES:
        if mod.startswith("selfgrow.ops"):
            assert not [t for t in _imports(mod, path) if t.startswith("selfgrow.control")], mod


def _private_owner(target: str) -> str | None:
    """The package owning ``target`` if ``target`` names a private module, else None."""
    parts = target.split(".")
    for i, p in enumerate(parts):
        if p.startswith("_") and p not in ("__init__", "__main__"):
            return ".".join(parts[:i])
    return None


@pytest.mark.parametrize("mod,path", MODULES, ids=[m for m, _ in MODULES])
def test_no_module_imports_another_packages_private_module(mod, path):
    bad = []
    for t in _imports(mod, path):
        owner = _private_owner(t)
        if owner is not None and not (mod == owner or mod.startswith(owner + ".")):
            bad.append(t)
    assert not bad, f"{mod} imports private modules of other packages: {bad}"


def test_negative_control_the_checks_see_a_violation(tmp_path):
    # the same analysis on a file that breaks both rules must flag it
    f = tmp_path / "width.py"
    f.write_text("from ..control.actions import register_action\nfrom ..adapters._base import x\n")
    deps = _imports("selfgrow.ops.width", f)
    assert "selfgrow.control.actions" in deps and "selfgrow.adapters._base" in deps
    assert LAYER[_part("selfgrow.control.actions")] > LAYER["ops"]
    assert _private_owner("selfgrow.adapters._base") == "selfgrow.adapters"
