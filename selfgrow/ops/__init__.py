"""Growth operators, and the names operator authors need.

Users call :func:`grow_` with a config from :func:`make_config`; operator authors subclass
:class:`Operator` with an :class:`OpConfig` dataclass, register it with
:func:`register_operator`, edit the model only through the :class:`Transaction` handed to
``apply`` and describe every re-indexed parameter with a :class:`ParamMap` (see
docs/extending.md). Each public module of this package registers its operators on import.
"""

from ..core import AxisMap, ParamMap, Roles, Transaction, regrid
from ._registry import (
    PRESERVATION_TOLERANCE,
    GrowthResult,
    OpConfig,
    Operator,
    ProbeFn,
    available_memory,
    build_config,
    default_probe_fn,
    estimate_growth,
    eval_output,
    get_operator,
    grow_,
    list_operators,
    make_config,
    meta_twin,
    op_config_from_dict,
    op_config_to_dict,
    output_tensor,
    preservation_error,
    preservation_tolerance,
    register_operator,
)

__all__ = [
    "AxisMap",
    "GrowthResult",
    "OpConfig",
    "Operator",
    "PRESERVATION_TOLERANCE",
    "ParamMap",
    "ProbeFn",
    "Roles",
    "Transaction",
    "available_memory",
    "build_config",
    "default_probe_fn",
    "estimate_growth",
    "eval_output",
    "get_operator",
    "grow_",
    "list_operators",
    "make_config",
    "meta_twin",
    "op_config_from_dict",
    "op_config_to_dict",
    "output_tensor",
    "preservation_error",
    "preservation_tolerance",
    "register_operator",
    "regrid",
]
