"""Growth operators. Each public module registers its operators on import."""

from ..core import Transaction
from ._registry import (
    GrowthResult,
    OpConfig,
    Operator,
    build_config,
    get_operator,
    grow_,
    list_operators,
    make_config,
    op_config_from_dict,
    op_config_to_dict,
    register_operator,
)

__all__ = [
    "GrowthResult",
    "OpConfig",
    "Operator",
    "Transaction",
    "build_config",
    "get_operator",
    "grow_",
    "list_operators",
    "make_config",
    "op_config_from_dict",
    "op_config_to_dict",
    "register_operator",
]
