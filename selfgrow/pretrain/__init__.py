"""Progressive pre-training: grow a small transformer into a large one under a compute
budget (``grow_and_train``; ``selfgrow pretrain`` on the command line).

See :mod:`selfgrow.pretrain.api` for the strategies, :mod:`selfgrow.pretrain.shapes` for the
operators between shapes, :mod:`selfgrow.pretrain.lr` for WSD / cosine, and
:mod:`selfgrow.pretrain.search` for the budgeted schedule search.
"""

from .api import (
    SCHEDULES,
    PretrainResult,
    budget_for_tokens,
    flops_to_reach,
    format_summary,
    grow_and_train,
    load_pretrained,
    plan_stages,
    start_shape,
    training_flops_per_token,
)
from .lr import LR_SCHEDULES, lr_multiplier
from .shapes import Shape, config_for, growth_steps, parse_shape

__all__ = [
    "LR_SCHEDULES",
    "SCHEDULES",
    "PretrainResult",
    "Shape",
    "budget_for_tokens",
    "config_for",
    "flops_to_reach",
    "format_summary",
    "grow_and_train",
    "growth_steps",
    "load_pretrained",
    "lr_multiplier",
    "parse_shape",
    "plan_stages",
    "start_shape",
    "training_flops_per_token",
]
