"""The control layer's one action table: abstract growth actions ("widen", "deepen", ...)
resolved to a concrete operator config for a live model.

Policies speak in actions. Resolution order for ``resolve_action(action, model)``:

1. a function registered for the model's class (or a base class, by MRO) with
   :func:`register_action` (users teaching the controller their own models);
2. else the built-in action of the model's adapter kind (:func:`register_family_action`):
   every family :func:`selfgrow.adapters.get_adapter` understands gets the actions of its
   kind with no registration (HF BERT / GPT-2 / LLaMA, ``nn.TransformerEncoder``, ...).

Standard action names: ``widen``, ``deepen``, ``widen_ffn``, ``add_heads``, ``add_expert``,
``extend_context``, ``widen_layers`` (widen specific layers, e.g. saturated ones), ``prune``
(remove the least important or the given units: classifier units, transformer FFN units).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from ..adapters import ADAPTER_KINDS, find_adapter, supported_families
from ..core import register_unique
from ..errors import GrowthConfigError, IncompatibleModelError, SelfgrowError, choices_message
from ..ops import OpConfig

ActionFn = Callable[..., OpConfig]
_ACTIONS: dict[tuple[type, str], ActionFn] = {}
_FAMILY_ACTIONS: dict[tuple[str, str], ActionFn] = {}


def register_action(
    model_cls: type[nn.Module], action: str, *, override: bool = False
) -> Callable[[ActionFn], ActionFn]:
    """Decorator: ``@register_action(MyModel, "widen") def f(model, **kw) -> OpConfig``.

    Raises:
        GrowthConfigError: ``(model_cls, action)`` is already registered to another function
            (pass ``override=True`` to replace it), or ``model_cls`` is not a class.
    """
    if not isinstance(model_cls, type):
        raise GrowthConfigError(f"register_action needs a model class, got {model_cls!r}")
    if not isinstance(action, str) or not action.isidentifier():
        raise GrowthConfigError(f"action name must be a non-empty identifier, got {action!r}")

    def deco(fn: ActionFn) -> ActionFn:
        if not callable(fn):
            raise GrowthConfigError(
                f"register_action({model_cls.__name__}, {action!r}) needs a function "
                f"model, **kwargs -> operator config, got {fn!r}"
            )
        register_unique(_ACTIONS, (model_cls, action), fn,
                        f"action for {model_cls.__name__}", override=override)
        return fn

    return deco


def register_family_action(
    kind: str, action: str, *, override: bool = False
) -> Callable[[ActionFn], ActionFn]:
    """Decorator registering the built-in ``action`` of every family of adapter ``kind``.

    Raises:
        GrowthConfigError: unknown kind, or the action is already registered for it.
    """
    if kind not in ADAPTER_KINDS:
        raise GrowthConfigError(choices_message("adapter kind", kind, ADAPTER_KINDS))

    def deco(fn: ActionFn) -> ActionFn:
        register_unique(_FAMILY_ACTIONS, (kind, action), fn, f"{kind} action",
                        override=override)
        return fn

    return deco


def _load() -> None:
    from . import family_actions  # noqa: F401 - registers the built-in actions


def _own_actions(model: nn.Module) -> dict[str, ActionFn]:
    mro = type(model).__mro__
    found: dict[str, ActionFn] = {}
    for cls in reversed(mro):  # most derived last, so it wins
        for (c, a), fn in _ACTIONS.items():
            if c is cls:
                found[a] = fn
    return found


def _family_actions(model: nn.Module) -> dict[str, ActionFn]:
    ad = find_adapter(model)
    if ad is None:
        return {}
    return {a: fn for (k, a), fn in _FAMILY_ACTIONS.items() if k == ad.kind}


def available_actions(model: nn.Module) -> dict[str, ActionFn]:
    """``{action: function}`` for ``model``: its class's registered actions over the built-in
    actions of its adapter kind."""
    _load()
    return {**_family_actions(model), **_own_actions(model)}


def list_actions(model: nn.Module) -> list[str]:
    """Actions available for this model, sorted.

    Raises:
        IncompatibleModelError: ``model`` is not an ``nn.Module`` (e.g. a model NAME).
    """
    if not isinstance(model, nn.Module):
        raise IncompatibleModelError(
            f"list_actions needs the model (an nn.Module), got {type(model).__name__} "
            f"{model!r:.60}"
        )
    return sorted(available_actions(model))


def unsupported_model_message(model: nn.Module) -> str:
    """Why ``model`` has no actions, naming the supported families and how to add one."""
    return (
        f"{type(model).__name__} is not a family selfgrow understands; supported: "
        f"{', '.join(supported_families())} (and selfgrow's own models). Teach the controller "
        f"with selfgrow.control.register_action({type(model).__name__}, 'widen')(fn) where "
        f"fn(model, **kwargs) returns an operator config, or add an adapter "
        f"(selfgrow.adapters.register_adapter); see docs/extending.md"
    )


def unknown_action_message(action: object, model: nn.Module, available: Iterable[str]) -> str:
    """The one message for an action a model does not offer: the actions it offers and how
    to add one (or, for a model no adapter handles, the supported families)."""
    avail = sorted(available)
    if not avail:
        return f"action {action!r}: {unsupported_model_message(model)}"
    return (
        f"action {action!r} is not available for {type(model).__name__}; available: "
        f"{', '.join(avail)} (add one with selfgrow.register_action)"
    )


def resolve_action(action: str, model: nn.Module, **kwargs: Any) -> OpConfig:
    """Turn an action into an operator config for ``model``.

    Raises:
        IncompatibleModelError: the model offers no such action (lists those it offers, or
            the supported families when it offers none).
        GrowthConfigError: the action's function rejects the arguments (names them).
    """
    if not isinstance(action, str):
        raise GrowthConfigError(
            f"an action is a name (see list_actions(model)) or an operator config "
            f"(make_config(name, **fields)); got {type(action).__name__} {action!r:.80}"
        )
    table = available_actions(model)
    fn = table.get(action)
    if fn is None:
        raise IncompatibleModelError(unknown_action_message(action, model, table))
    sig = inspect.signature(fn)
    try:
        sig.bind(model, **kwargs)
    except TypeError as e:
        valid = [n for n, p in list(sig.parameters.items())[1:]
                 if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        raise GrowthConfigError(
            f"bad arguments for action {action!r}: {e}; valid arguments: "
            f"{', '.join(valid) or 'none'}") from None
    try:
        cfg = fn(model, **kwargs)
    except (TypeError, ValueError) as e:  # a wrongly typed argument (factor="2" ...)
        if isinstance(e, SelfgrowError):  # the action's own, precise error
            raise
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise GrowthConfigError(
            f"bad arguments for action {action!r} ({args}): {type(e).__name__}: {e}"
        ) from None
    if not isinstance(cfg, OpConfig):
        raise GrowthConfigError(
            f"action {action!r} returned {type(cfg).__name__}, not an operator config"
        )
    return cfg
