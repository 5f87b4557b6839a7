"""Where the controller runs: the distribution strategy a :class:`GrowthController` takes.

A strategy keeps the ranks of a distributed run in lock-step around the one controller; the
controller calls it at fixed points:

==========================  ================================================================
``setup``                   at construction: unwrap the model, choose this rank's log
                            directory and the run id every rank shares
``wrap_policy``             the policy that decides (e.g. on rank 0 only, then broadcast)
``reduce``                  every ``observe``: the metrics before the signals see them
``attempts``                growth decisions received so far (a change means a growth was
                            tried at this step, on every rank)
``before_manual`` / ``after_manual``   around ``controller.grow`` / ``prune``
``growth_scope``            around one growth attempt (resolve, operator, optimizer
                            migration): a sharding strategy gathers a plain model here and
                            re-shards the grown one, or restores everything on error
``plain_view``              a plain module of the model's architecture (shapes only) for
                            sizing a growth before it is tried
``after_change``            after a growth was tried: check the ranks agree, re-wrap
``wrapped``                 the module the training loop calls (``controller.wrapped_model``)
``state_dict``              what a resumed run needs (shared growth seed, counters)
==========================  ================================================================

:class:`GrowthStrategy` itself is one process: every hook is a no-op, ``wrapped`` is the
model. :class:`~selfgrow.control.distributed.DDPStrategy` is the DDP implementation,
:class:`~selfgrow.control.fsdp.FSDP2Strategy` the FSDP2 (``fully_shard``) one.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["GrowthStrategy"]


class GrowthStrategy:
    """Single-process strategy (the default): nothing to reduce, broadcast or re-wrap."""

    #: short name recorded in controller descriptions
    name = "single"

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer | None,
              log_dir: str | None, run_id: str | None
              ) -> tuple[nn.Module, str | None, str | None]:
        """Called first by the controller. Returns ``(model, log_dir, run_id)`` to use."""
        return model, log_dir, run_id

    def wrap_policy(self, policy: Any) -> Any:
        return policy

    def bind(self, controller: Any) -> None:
        """Called last by the controller's constructor (build wrappers here)."""

    def reduce(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        return dict(metrics)

    def attempts(self) -> int:
        """Growth decisions to go received so far (0 when the strategy does not count)."""
        return 0

    def before_manual(self, step: int) -> None:
        """Before ``controller.grow`` / ``prune`` applies a change."""

    def after_manual(self) -> None:
        """After ``controller.grow`` / ``prune`` returned or raised."""

    @contextmanager
    def growth_scope(self, controller: Any) -> Iterator[None]:
        """Around one growth attempt. Inside it ``controller.model`` and
        ``controller.optimizer`` are what the operator edits (plain tensors); an exception
        leaves the scope with the model, optimizer and gradients as they were before it."""
        yield

    def plain_view(self, model: nn.Module) -> nn.Module:
        """A module with ``model``'s architecture that operators can run on as a shape-only
        twin (the model itself when it is not sharded)."""
        return model

    def after_change(self, controller: Any, n_before: int) -> None:
        """After a growth was tried (``controller.n_changes`` was ``n_before``)."""

    def wrapped(self, model: nn.Module) -> nn.Module:
        """The module the training loop calls."""
        return model

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
