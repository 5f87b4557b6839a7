"""Reference growable models (config dataclass = source of truth for shape)."""

from ._registry import (
    build_model,
    is_registered_model,
    list_models,
    model_config_dict,
    register_model,
)

__all__ = [
    "build_model",
    "is_registered_model",
    "list_models",
    "model_config_dict",
    "register_model",
]
