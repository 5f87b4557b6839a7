"""selfgrow: grow neural networks while they learn.

The names here are for users: grow a model (:func:`grow_`, :func:`make_config`,
:func:`list_operators`), control growth while training (:class:`GrowthController`, signals,
policies, :class:`Budget`, :class:`Stabilizer`, :func:`list_actions`,
:func:`register_action`), checkpoint and resume (:func:`save_checkpoint`,
:func:`load_checkpoint`), read the growth log (:func:`read_events`), and the errors.

Operator authors find their names in :mod:`selfgrow.ops` (``Operator``, ``OpConfig``,
``GrowthResult``, ``register_operator``, ``Transaction``, ``ParamMap``); adapter authors in
:mod:`selfgrow.adapters` (``TransformerAdapter``, ``register_adapter``, views and regridding).
Continual learning (Avalanche ``GrowthPlugin``, benchmarks) is in :mod:`selfgrow.continual`.
"""

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .control import (
    Budget,
    CapacityProbe,
    DDPStrategy,
    ExpertOverload,
    FixedSchedule,
    FSDP2Strategy,
    GradientSaturation,
    GrowthController,
    GrowthStrategy,
    IdleCapacity,
    LossPlateau,
    ReplayForgetting,
    Rule,
    RulePolicy,
    SkipReason,
    Stabilizer,
    ValidationPlateau,
    list_actions,
    register_action,
)
from .errors import (
    BudgetExceededError,
    CheckpointError,
    DataUnavailableError,
    DistributedGrowthError,
    EventFormatError,
    GrowthConfigError,
    GrowthFailedWarning,
    IncompatibleModelError,
    IncompatibleOptimizerError,
    InsufficientMemoryError,
    RunDirError,
    SelfgrowError,
    SelfgrowWarning,
)
from .events import GrowthEvent, read_events
from .models import build_model, list_models
from .ops import grow_, list_operators, make_config

__version__ = "0.1.0"

__all__ = [
    "Budget",
    "BudgetExceededError",
    "CapacityProbe",
    "Checkpoint",
    "CheckpointError",
    "DDPStrategy",
    "DataUnavailableError",
    "DistributedGrowthError",
    "EventFormatError",
    "ExpertOverload",
    "FSDP2Strategy",
    "FixedSchedule",
    "GradientSaturation",
    "GrowthConfigError",
    "GrowthController",
    "GrowthEvent",
    "GrowthFailedWarning",
    "GrowthStrategy",
    "IdleCapacity",
    "IncompatibleModelError",
    "IncompatibleOptimizerError",
    "InsufficientMemoryError",
    "LossPlateau",
    "ReplayForgetting",
    "Rule",
    "RulePolicy",
    "RunDirError",
    "SelfgrowError",
    "SelfgrowWarning",
    "SkipReason",
    "Stabilizer",
    "ValidationPlateau",
    "__version__",
    "build_model",
    "grow_",
    "list_actions",
    "list_models",
    "list_operators",
    "load_checkpoint",
    "make_config",
    "read_events",
    "register_action",
    "save_checkpoint",
]
