"""Growth control: signals measure, policies decide, the controller acts and records.

Public API::

    from selfgrow.control import (GrowthController, LossPlateau, ReplayForgetting,
        ValidationPlateau, GradientSaturation, ExpertOverload, CapacityProbe, IdleCapacity,
        RulePolicy, Rule,
        Budget, FixedSchedule, Decision, Stabilizer)
"""

from .actions import (
    list_actions,
    register_action,
    register_family_action,
    resolve_action,
)
from .controller import GrowthController
from .distributed import DDPStrategy, DistributedGrowthController
from .fsdp import FSDP2Strategy
from .modality import (
    ComponentSaturation,
    ModalityImbalance,
    fusion_plateau,
    modality_aware_policy,
    modality_scores,
    uniform_policy,
)
from .policies import Budget, Decision, Policy, PolicyContext, Rule, RulePolicy, SkipReason
from .schedules import FixedSchedule
from .signals import (
    CapacityProbe,
    ExpertOverload,
    GradientSaturation,
    LossPlateau,
    ReplayForgetting,
    Signal,
    ValidationPlateau,
    list_signals,
    make_signal,
    register_signal,
)
from .sizing import estimate_memory, flops_per_sample, round_width
from .stabilize import Stabilizer
from .strategy import GrowthStrategy
from .utility import IdleCapacity, IdleExperts

__all__ = [
    "Budget",
    "CapacityProbe",
    "ComponentSaturation",
    "DDPStrategy",
    "Decision",
    "DistributedGrowthController",
    "ExpertOverload",
    "FSDP2Strategy",
    "FixedSchedule",
    "GradientSaturation",
    "GrowthController",
    "GrowthStrategy",
    "IdleCapacity",
    "IdleExperts",
    "LossPlateau",
    "ModalityImbalance",
    "Policy",
    "PolicyContext",
    "ReplayForgetting",
    "Rule",
    "RulePolicy",
    "Signal",
    "SkipReason",
    "Stabilizer",
    "ValidationPlateau",
    "estimate_memory",
    "flops_per_sample",
    "fusion_plateau",
    "list_actions",
    "list_signals",
    "make_signal",
    "modality_aware_policy",
    "modality_scores",
    "register_action",
    "register_family_action",
    "register_signal",
    "resolve_action",
    "round_width",
    "uniform_policy",
]
