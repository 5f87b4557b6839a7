"""Serialisation of config dataclasses as ``{"type", "version", "data"}`` (torchao style)."""

from __future__ import annotations

import dataclasses
from typing import Any

from .errors import GrowthConfigError, choices_message


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """``{"type": ClassName, "version": cfg.version or 1, "data": {field: value}}``."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise GrowthConfigError(f"expected a config dataclass instance, got {type(cfg).__name__}")
    data = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, tuple):
            v = list(v)
        elif dataclasses.is_dataclass(v) and not isinstance(v, type):
            v = config_to_dict(v)  # a nested config (e.g. a multimodal model's encoders)
        data[f.name] = v
    return {"type": type(cfg).__name__, "version": getattr(cfg, "version", 1), "data": data}


def config_from_dict(d: dict[str, Any], registry: dict[str, type]) -> Any:
    """Inverse of :func:`config_to_dict` over a ``{ClassName: cls}`` registry."""
    if not isinstance(d, dict) or "type" not in d:
        raise GrowthConfigError(f"not a serialised config: {d!r}")
    cls = registry.get(d["type"])
    if cls is None:
        raise GrowthConfigError(choices_message("config type", d["type"], list(registry)))
    have = getattr(cls, "version", 1)
    got = d.get("version", 1)
    if isinstance(got, bool) or not isinstance(got, int) or got < 1:
        raise GrowthConfigError(f"{d['type']}: config version {got!r} is not a version number")
    if got > have:
        raise GrowthConfigError(
            f"{d['type']} was saved with config version {got}; this selfgrow reads up to "
            f"version {have}: upgrade selfgrow to load it"
        )
    names = {f.name: f for f in dataclasses.fields(cls)}
    data = dict(d.get("data", {}))
    unknown = set(data) - set(names)
    if unknown:
        raise GrowthConfigError(
            f"unknown fields {sorted(unknown)} for {cls.__name__}; valid fields: "
            f"{', '.join(names)}"
        )
    for k, v in list(data.items()):
        if isinstance(v, list) and "tuple" in str(names[k].type):
            data[k] = tuple(v)
        elif isinstance(v, dict) and v.get("type") in registry and "data" in v:
            data[k] = config_from_dict(v, registry)  # a nested config of the same registry
    return cls(**data)
