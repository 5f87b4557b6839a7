"""Exception hierarchy of selfgrow.

Every user-facing check raises one of these (never ``assert``), with the bad value and,
where there is a finite set, the valid choices.
"""

from __future__ import annotations


class SelfgrowError(Exception):
    """Base class of every error raised by selfgrow."""


class GrowthConfigError(SelfgrowError, ValueError):
    """An operator, signal, policy or run configuration is invalid (raised before any change)."""


class IncompatibleModelError(SelfgrowError, TypeError):
    """The model (or one of its modules) is not supported by the requested operation."""


class IncompatibleOptimizerError(SelfgrowError, TypeError):
    """The optimizer holds state that selfgrow does not know how to migrate."""


class BudgetExceededError(SelfgrowError):
    """A growth would exceed the configured budget (parameters, memory or FLOPs)."""


class EventFormatError(SelfgrowError, ValueError):
    """A growth event record is malformed (wrong schema version, unknown kind, not an object)."""


class InsufficientMemoryError(BudgetExceededError):
    """A growth would allocate more memory than is available on the device (or than an
    explicit cap); raised from shapes alone, before anything is allocated."""


class DataUnavailableError(SelfgrowError, RuntimeError):
    """A data set or pretrained model is missing; the message names the package to install."""


class CheckpointError(SelfgrowError):
    """A checkpoint cannot be written, read or applied (the message says why and what to do)."""


class DistributedGrowthError(SelfgrowError):
    """Ranks disagree after a growth (different parameters or different growth counts)."""


class RunDirError(SelfgrowError):
    """The run directory is missing, is not a directory, or holds no selfgrow run files."""


class SelfgrowWarning(UserWarning):
    """Base class of every warning selfgrow issues (filter them with this class)."""


class GrowthFailedWarning(SelfgrowWarning):
    """A growth the policy decided could not be applied (incompatible optimizer, operator
    error, probe failure ...): model, optimizer and gradients are unchanged, a ``skipped``
    event with the reason is logged, and training goes on. ``GrowthController(strict=True)``
    raises the underlying error instead."""


def choices_message(kind: str, value: object, choices: list[str] | tuple[str, ...]) -> str:
    """Format 'unknown <kind> <value>; valid choices: a, b, c'."""
    return f"unknown {kind} {value!r}; valid choices: {', '.join(sorted(choices))}"
