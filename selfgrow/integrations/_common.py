"""What every trainer callback does the same way: the growth history, log cursors, the
optimizer's parameter order and the LR scheduler check after a growth, and regrowing a model
in place from a saved history."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from ..checkpoint import EventCursor, _controller_events_path, rewind_events
from ..errors import CheckpointError, GrowthConfigError, IncompatibleModelError
from ..ops import grow_, op_config_from_dict

logger = logging.getLogger("selfgrow.integrations")


def check_controller(controller: Any, who: str) -> None:
    """Raise GrowthConfigError unless ``controller`` is a GrowthController."""
    from ..control.controller import GrowthController

    if not isinstance(controller, GrowthController):
        raise GrowthConfigError(f"{who} needs a GrowthController, got "
                                f"{type(controller).__name__}")


def shapes(sd: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of the tensors of a state dict."""
    return {k: tuple(v.shape) for k, v in sd.items() if isinstance(v, torch.Tensor)}


def new_changes(controller: Any, n_seen: int) -> tuple[list[Any], int]:
    """The growth / prune events the controller logged since it had ``n_seen`` events, and
    its event count now."""
    new = controller.events[n_seen:]
    return [e for e in new if e.kind in ("growth", "prune")], len(controller.events)


def describe(ev: Any) -> str:
    return f"{ev.kind} {ev.action.get('op')} ({ev.reason}): {ev.params_before} -> " \
           f"{ev.params_after} parameters"


def repair_optimizer(opt: torch.optim.Optimizer | None, module: nn.Module,
                     schedulers: list[Any]) -> None:
    """After a growth: put each param group's parameters in ``module.named_parameters()``
    order (the order a trainer that builds its optimizer on the grown model lists them, so a
    positional optimizer checkpoint stays valid) and check that every LR scheduler still has
    one base LR per param group (the scheduler objects are unchanged).

    Raises:
        IncompatibleModelError: a scheduler's group count no longer matches.
    """
    if opt is None:
        return
    order = {id(p): i for i, (_, p) in enumerate(module.named_parameters())}
    for g in opt.param_groups:
        g["params"].sort(key=lambda p: order.get(id(p), len(order)))
    for sched in schedulers:
        inner = getattr(sched, "scheduler", sched)
        base = getattr(inner, "base_lrs", None)
        if base is not None and len(base) != len(opt.param_groups):
            raise IncompatibleModelError(
                f"after growth the optimizer has {len(opt.param_groups)} param groups, its LR "
                f"scheduler {type(inner).__name__} {len(base)}: selfgrow's operators keep the "
                f"groups; a custom migration rule that adds groups needs a new scheduler")


def log_cursors(controller: Any) -> dict[str, Any]:
    """Cursors of the controller's ``events.jsonl`` and ``metrics.jsonl`` (flushed first)."""
    ev_path = _controller_events_path(controller)
    ms = controller.metrics_sink
    if ms is not None:
        ms.flush()
    return {
        "events": asdict(EventCursor.of_file(ev_path, controller.seq)) if ev_path else None,
        "metrics": asdict(EventCursor.of_file(ms.path)) if ms is not None else None,
    }


def restore_controller(controller: Any, state: Mapping[str, Any], cursors: Mapping[str, Any]
                       ) -> None:
    """Rewind the controller's logs to ``cursors`` (events logged after the checkpoint are
    dropped) and load its ``state``."""
    ev_path = _controller_events_path(controller)
    if cursors.get("events") and ev_path is not None:
        rewind_events(ev_path, EventCursor(**cursors["events"]))
    ms = controller.metrics_sink
    if cursors.get("metrics") and ms is not None:
        ms.flush()
        rewind_events(ms.path, EventCursor(**cursors["metrics"]))
    controller.load_state_dict(state)


def replay(module: nn.Module, history: list[dict[str, Any]],
           expected: Mapping[str, tuple[int, ...]], where: str) -> None:
    """Regrow ``module`` in place by applying the saved operator configs in order, then check
    that its state dict has the ``expected`` shapes.

    Raises:
        CheckpointError: the replayed model's shapes differ (nothing is rolled back: the
            model was not the run's starting model).
    """
    for cfg in history:
        grow_(module, op_config_from_dict(cfg), optimizer=None)
    now = shapes(module.state_dict())
    bad = sorted(k for k, s in expected.items() if now.get(k) != s)
    if bad:
        raise CheckpointError(
            f"replaying the {len(history)} growths of {where} does not give the checkpoint's "
            f"shapes (first: {bad[0]} {now.get(bad[0])} vs {tuple(expected[bad[0]])}); was the "
            f"model built as at the start of the run?")
    logger.info("selfgrow: rebuilt the grown model (%d growths) from %s", len(history), where)
