"""Registry of growable reference models: config dataclass <-> model class.

Every growable model keeps its config dataclass in ``model.config``; that config is the single
source of truth for its shape and every operator updates it. ``build_model(config)`` rebuilds a
model of exactly that shape, which is how checkpoints of grown models are restored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from .._config import config_from_dict, config_to_dict
from ..core import register_unique
from ..errors import GrowthConfigError, IncompatibleModelError

_MODELS: dict[str, type[nn.Module]] = {}
_CONFIGS: dict[str, type] = {}


def register_model(
    config_cls: type, *, override: bool = False
) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: ``@register_model(MLPConfig) class GrowableMLP(nn.Module)``; the model
    class must accept the config as its only constructor argument.

    Raises:
        GrowthConfigError: the config class name is already registered to another model
            class (pass ``override=True`` to replace it).
    """

    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        register_unique(_MODELS, config_cls.__name__, cls, "model config", override=override)
        _CONFIGS[config_cls.__name__] = config_cls
        return cls

    return deco


def _load() -> None:
    import importlib
    import pkgutil

    from . import __path__ as p

    for m in pkgutil.iter_modules(p):
        if not m.name.startswith("_"):
            importlib.import_module(f"{__package__}.{m.name}")


def build_model(config: Any) -> nn.Module:
    """Build a fresh model from a registered config instance or its serialised dict."""
    _load()
    if isinstance(config, dict):
        config = config_from_dict(config, _CONFIGS)
    cls = _MODELS.get(type(config).__name__)
    if cls is None:
        raise GrowthConfigError(
            f"no model registered for config {type(config).__name__}; registered: "
            f"{', '.join(sorted(_MODELS))}"
        )
    return cls(config)


def model_config_dict(model: nn.Module) -> dict[str, Any]:
    """Serialised config of a registered growable model (``{type, version, data}``)."""
    cfg = getattr(model, "config", None)
    _load()
    if cfg is None or type(cfg).__name__ not in _CONFIGS:
        raise IncompatibleModelError(
            f"{type(model).__name__} is not a registered selfgrow model (no known .config); "
            f"registered configs: {', '.join(sorted(_CONFIGS))}"
        )
    return config_to_dict(cfg)


def is_registered_model(model: nn.Module) -> bool:
    """True if ``model`` carries the config of a registered selfgrow model."""
    _load()
    cfg = getattr(model, "config", None)
    return cfg is not None and _MODELS.get(type(cfg).__name__) is type(model)


def list_models() -> list[str]:
    _load()
    return sorted(_CONFIGS)
