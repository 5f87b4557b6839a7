"""The only place where selfgrow mutates a model.

Every operator performs its changes through a :class:`Transaction`: replacing a submodule,
a parameter or buffer, or any attribute (including fields of the model's config dataclass).
Operators never write into existing tensors in place: new tensors are built and swapped in,
so undoing a change is swapping the old object back. If anything raises inside
``with Transaction() as tx:``, every change is undone in reverse order and the model is left
bit-identical to what it was (same objects, same tensors).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

_MISSING = object()


class Transaction:
    """Journal of reversible model edits; rolls back on exception.

    Usage::

        with Transaction() as tx:
            tx.replace_module(model.layers, "2", new_block)
            tx.set_parameter(model.head, "weight", new_weight)
            tx.set_attr(model.config, "n_layers", 7)
    """

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []
        self.committed = False

    # --- context manager -------------------------------------------------------------------
    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if exc_type is not None:
            self.rollback()
        else:
            self.committed = True
            self._undo.clear()
        return False

    def rollback(self) -> None:
        """Undo every recorded change, newest first."""
        while self._undo:
            self._undo.pop()()

    # --- edits -------------------------------------------------------------------------------
    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        """Set ``obj.name = value`` (any object, e.g. a config dataclass), reversibly."""
        old = obj.__dict__.get(name, _MISSING) if hasattr(obj, "__dict__") else _MISSING
        if old is _MISSING:
            old = getattr(obj, name, _MISSING)
        object.__setattr__(obj, name, value) if _is_frozen(obj) else setattr(obj, name, value)

        def undo() -> None:
            if old is _MISSING:
                delattr(obj, name)
            elif _is_frozen(obj):
                object.__setattr__(obj, name, old)
            else:
                setattr(obj, name, old)

        self._undo.append(undo)

    def replace_module(self, parent: nn.Module, name: str, new: nn.Module) -> nn.Module:
        """Replace ``parent.<name>`` (a child module; ``name`` may be an index of a
        ModuleList/Sequential) with ``new``, moved to the old module's device and dtype."""
        old = parent._modules[name]
        if old is not None:
            new = _match_device_dtype(new, old)
        parent._modules[name] = new

        def undo() -> None:
            parent._modules[name] = old

        self._undo.append(undo)
        return new

    def set_modules(self, parent: nn.Module, children: dict[str, nn.Module]) -> None:
        """Replace all children of a container (ModuleList / Sequential) at once, e.g. to
        insert or reorder layers. ``children`` maps the new keys ('0', '1', ...) to modules."""
        old = parent._modules.copy()
        parent._modules.clear()
        parent._modules.update(children)

        def undo() -> None:
            parent._modules.clear()
            parent._modules.update(old)

        self._undo.append(undo)

    def set_parameter(self, module: nn.Module, name: str, value: torch.Tensor | None) -> None:
        """Register a new parameter tensor under ``module.<name>`` (keeps requires_grad of the
        old parameter when there was one)."""
        old = module._parameters.get(name, _MISSING)
        if value is not None and not isinstance(value, nn.Parameter):
            rg = old.requires_grad if isinstance(old, nn.Parameter) else True
            value = nn.Parameter(value.detach(), requires_grad=rg)
        module._parameters[name] = value

        def undo() -> None:
            if old is _MISSING:
                del module._parameters[name]
            else:
                module._parameters[name] = old

        self._undo.append(undo)

    def set_buffer(self, module: nn.Module, name: str, value: torch.Tensor | None) -> None:
        """Register a new buffer tensor under ``module.<name>``."""
        old = module._buffers.get(name, _MISSING)
        module._buffers[name] = value

        def undo() -> None:
            if old is _MISSING:
                del module._buffers[name]
            else:
                module._buffers[name] = old

        self._undo.append(undo)

    def call(self, do: Callable[[], None], undo: Callable[[], None]) -> None:
        """Run an arbitrary reversible action (``undo`` restores what ``do`` changed)."""
        do()
        self._undo.append(undo)


def _is_frozen(obj: Any) -> bool:
    params = getattr(type(obj), "__dataclass_params__", None)
    return bool(params is not None and params.frozen)


def _match_device_dtype(new: nn.Module, like: nn.Module) -> nn.Module:
    ref = next(iter(like.parameters()), None)
    if ref is None:
        ref = next(iter(like.buffers()), None)
    if ref is None:
        return new
    if ref.is_floating_point():
        return new.to(device=ref.device, dtype=ref.dtype)
    return new.to(device=ref.device)


def module_path(root: nn.Module, target: nn.Module) -> str:
    """Dotted name of ``target`` inside ``root``; raises KeyError if absent."""
    for name, mod in root.named_modules():
        if mod is target:
            return name
    raise KeyError("module not found in model")


def get_parent(root: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    """Return ``(parent_module, child_name)`` for a dotted module path."""
    parts = dotted.split(".")
    parent = root
    for p in parts[:-1]:
        parent = getattr(parent, p) if not p.isdigit() else parent[int(p)]  # type: ignore[index]
    return parent, parts[-1]
