"""Abstract growth actions ("widen", "deepen", ...) resolved to a concrete operator config for
a given model family.

Policies speak in actions; each model family registers how an action becomes an operator
config for a live model (e.g. "widen" on a GrowableMLP -> Net2WiderNet on its narrowest hidden
layer). Lookup follows the model class's MRO.

Standard action names: ``widen``, ``deepen``, ``widen_ffn``, ``add_heads``, ``add_expert``,
``extend_context``, ``widen_layers`` (widen specific layers, e.g. saturated ones).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import GrowthConfigError, IncompatibleModelError
from ..ops._registry import OpConfig

ActionFn = Callable[..., OpConfig]
_ACTIONS: dict[tuple[type, str], ActionFn] = {}


def register_action(model_cls: type[nn.Module], action: str) -> Callable[[ActionFn], ActionFn]:
    """Decorator: ``@register_action(GrowableMLP, "widen") def f(model, **kw) -> OpConfig``."""

    def deco(fn: ActionFn) -> ActionFn:
        _ACTIONS[(model_cls, action)] = fn
        return fn

    return deco


def _load() -> None:
    from ..models._registry import _load as load_models
    from ..ops._registry import _load_builtin

    load_models()
    _load_builtin()


def list_actions(model: nn.Module) -> list[str]:
    """Actions available for this model's family."""
    _load()
    mro = type(model).__mro__
    return sorted({a for (cls, a) in _ACTIONS if cls in mro})


def resolve_action(action: str, model: nn.Module, **kwargs: Any) -> OpConfig:
    """Turn an action into an operator config for ``model``.

    Raises:
        IncompatibleModelError: no family of this model registers the action (lists those
            that it does).
        GrowthConfigError: the action's function rejects the arguments.
    """
    _load()
    for cls in type(model).__mro__:
        fn = _ACTIONS.get((cls, action))
        if fn is not None:
            try:
                return fn(model, **kwargs)
            except TypeError as e:
                raise GrowthConfigError(f"bad arguments for action {action!r}: {e}") from None
    raise IncompatibleModelError(
        f"action {action!r} is not available for {type(model).__name__}; available: "
        f"{', '.join(list_actions(model)) or 'none (register one with register_action)'}"
    )
