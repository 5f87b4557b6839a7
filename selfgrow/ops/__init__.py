"""Growth operators. Each public module registers its operators on import."""

from ._registry import (
    GrowthResult,
    OpConfig,
    Operator,
    get_operator,
    grow_,
    list_operators,
    make_config,
    op_config_from_dict,
    op_config_to_dict,
    register_operator,
)
from ._surgery import Transaction

__all__ = [
    "GrowthResult",
    "OpConfig",
    "Operator",
    "Transaction",
    "get_operator",
    "grow_",
    "list_operators",
    "make_config",
    "op_config_from_dict",
    "op_config_to_dict",
    "register_operator",
]
