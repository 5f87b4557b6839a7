"""The growth event record: one JSON object per line in ``events.jsonl``."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import EventFormatError

SCHEMA_VERSION = 1

#: event kinds: a growth that happened, a prune (a shrink operator: capacity removed) that
#: happened, one the policy wanted but skipped (budget, cooldown, max growths ...), and an
#: anomaly (non-finite loss) seen by the controller.
EVENT_KINDS = ("growth", "prune", "skipped", "anomaly")
#: the kinds that changed the model's structure
STRUCTURE_KINDS = ("growth", "prune")


@dataclass
class GrowthEvent:
    """One decision of selfgrow (schema in docs/DESIGN.md; ``schema_version`` = 1).

    Units: ``wall_time`` UNIX seconds; ``step`` optimizer steps seen by the controller;
    ``op_seconds`` seconds spent in the operator plus optimizer migration;
    ``flops_per_sample_*`` forward FLOPs for one probe sample (None when not measured);
    ``preservation.max_abs`` = max |y_after - y_before| over the probe batch in eval mode,
    ``preservation.max_rel`` = max_abs / max |y_before|.
    """

    kind: str = "growth"
    run_id: str = ""
    seq: int = -1
    wall_time: float = 0.0
    step: int | None = None
    epoch: int | None = None
    experience: int | None = None
    trigger: dict[str, Any] = field(default_factory=dict)  # signal, value, threshold, window
    action: dict[str, Any] = field(default_factory=dict)  # op, config
    reason: str = ""
    params_before: int = 0
    params_after: int = 0
    flops_per_sample_before: float | None = None
    flops_per_sample_after: float | None = None
    # max_abs, max_rel, probe_size, exact_expected
    preservation: dict[str, Any] = field(default_factory=dict)
    op_seconds: float = 0.0
    optimizer: dict[str, Any] = field(default_factory=dict)  # migrated, zero_init, rule
    lr_after: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return jsonable(dataclasses.asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=False, allow_nan=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GrowthEvent:
        """Build from a parsed JSON object; unknown keys go to ``extra``; raises
        :class:`~selfgrow.errors.EventFormatError` on a wrong schema version, an unknown kind
        or a non-object."""
        if not isinstance(d, dict):
            raise EventFormatError(f"event must be a JSON object, got {type(d).__name__}")
        ver = d.get("schema_version", SCHEMA_VERSION)
        if ver != SCHEMA_VERSION:
            raise EventFormatError(
                f"unsupported schema_version {ver!r} (this selfgrow reads {SCHEMA_VERSION})"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        ev = cls(**known)
        if extra:
            ev.extra = {**ev.extra, **extra}
        if ev.kind not in EVENT_KINDS:
            raise EventFormatError(
                f"unknown event kind {ev.kind!r}; valid: {', '.join(EVENT_KINDS)}"
            )
        return ev


def as_float(v: Any) -> float | None:
    """``v`` as a Python float when it is a real number (Python, NumPy or a one-element
    tensor), else None (strings, containers, multi-element tensors)."""
    import numbers

    import numpy as np
    import torch

    if isinstance(v, numbers.Real | np.generic) and not isinstance(v, np.str_ | np.bytes_):
        return float(v)
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return float(v.detach())
    return None


def jsonable(x: Any) -> Any:
    """Make a value JSON-safe: tensors/numpy to Python, non-finite floats to strings."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):
        return jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)
