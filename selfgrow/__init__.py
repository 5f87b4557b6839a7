"""selfgrow: grow neural networks while they learn.

Growth operators (``grow_``, ``list_operators``), optimizer-state migration
(:mod:`selfgrow.optim`), a self-adaptive :class:`GrowthController` with signals and policies,
a growth event log, and an Avalanche plugin (:mod:`selfgrow.continual`).
"""

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .control import (
    Budget,
    FixedSchedule,
    GrowthController,
    LossPlateau,
    ReplayForgetting,
    Rule,
    RulePolicy,
    Stabilizer,
)
from .errors import (
    BudgetExceededError,
    DataUnavailableError,
    GrowthConfigError,
    IncompatibleModelError,
    IncompatibleOptimizerError,
    SelfgrowError,
)
from .events import GrowthEvent, read_events
from .models import build_model, list_models
from .ops import OpConfig, get_operator, grow_, list_operators, make_config, register_operator

__version__ = "0.1.0"

__all__ = [
    "Budget",
    "Checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "BudgetExceededError",
    "FixedSchedule",
    "GrowthController",
    "LossPlateau",
    "ReplayForgetting",
    "Rule",
    "RulePolicy",
    "Stabilizer",
    "DataUnavailableError",
    "GrowthConfigError",
    "GrowthEvent",
    "IncompatibleModelError",
    "IncompatibleOptimizerError",
    "OpConfig",
    "SelfgrowError",
    "__version__",
    "build_model",
    "get_operator",
    "grow_",
    "list_models",
    "list_operators",
    "make_config",
    "read_events",
    "register_operator",
]
