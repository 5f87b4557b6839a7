"""``component``: apply any growth (or shrink) operator to ONE named submodule of a model.

A composite model (e.g. :class:`~selfgrow.models.multimodal.GrowableMultimodal`: an image
encoder, an audio encoder and a fusion block) is grown a component at a time:
``make_config("component", component="audio", step=make_config("net2wider", layer=0,
new_width=32))`` runs ``net2wider`` on ``model.get_submodule("audio")`` inside the one
transaction of :func:`~selfgrow.ops.grow_`, and the step's ParamMaps are re-keyed from the
component's parameter names (``blocks.0.conv.weight``) to the model's
(``audio.blocks.0.conv.weight``). Parameters outside the component are not touched, so their
values and their optimizer state stay bit-identical (tested), and the function preservation is
measured on the WHOLE model's probe output.

Valid components: the names in ``model.growth_components`` when the model declares them (a
tuple of submodule paths), else any submodule path of the model.

Exactness: exactly the step's (its own claim, evaluated on the component). A step that removes
capacity (:attr:`~selfgrow.ops.Operator.shrinks`) makes the component growth a prune too.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from ..core import Transaction
from ..errors import GrowthConfigError, IncompatibleModelError, choices_message
from ..optim import ParamMap
from ._registry import (
    GrowthResult,
    OpConfig,
    Operator,
    get_operator,
    op_config_from_dict,
    op_config_to_dict,
    register_operator,
)


@dataclass
class ComponentConfig(OpConfig):
    """Apply ``step`` (an operator config, or its serialised dict) to submodule ``component``.

    ``step`` is stored serialised (``op_config_to_dict``) so the config round-trips through
    JSON, like :class:`~selfgrow.ops.compound.CompoundGrowConfig`'s steps.

    Attributes:
        component: dotted submodule path (``"audio"``, ``"fusion"``); see the module docstring
            for the valid names.
        step: the operator config to apply to that submodule.
    """

    name: ClassVar[str] = "component"
    component: str = ""
    step: Any = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.component, str) or not self.component:
            raise GrowthConfigError(
                f"component={self.component!r} must be a submodule name such as 'audio'"
            )
        if isinstance(self.step, ComponentConfig) or (
            isinstance(self.step, dict) and self.step.get("type") == "ComponentConfig"
        ):
            raise GrowthConfigError(
                "component steps do not nest: give the inner component's full dotted path "
                "instead (component='a.b')"
            )
        if isinstance(self.step, OpConfig):
            self.step = op_config_to_dict(self.step)
        elif isinstance(self.step, dict) and "type" in self.step:
            self.step = copy.deepcopy(self.step)
        else:
            raise GrowthConfigError(
                f"step must be an operator config (make_config(name, **fields)) or its "
                f"serialised dict, got {type(self.step).__name__} {self.step!r:.80}"
            )
        try:
            self.step_config()
        except GrowthConfigError as e:
            raise GrowthConfigError(f"component {self.component!r} step: {e}") from None

    def step_config(self) -> OpConfig:
        """The step as an OpConfig (GrowthConfigError if it is not a known config)."""
        return op_config_from_dict(self.step)


def component_names(model: nn.Module) -> list[str]:
    """The components of ``model`` that :class:`ComponentConfig` may name: its declared
    ``growth_components``, else every submodule path."""
    declared = getattr(model, "growth_components", None)
    if declared is not None:
        return [str(c) for c in declared]
    return [n for n, _ in model.named_modules() if n]


def resolve_component(model: nn.Module, component: str) -> nn.Module:
    """``model``'s submodule ``component``.

    Raises:
        GrowthConfigError: no such component (names the valid ones).
    """
    names = component_names(model)
    if component not in names:
        raise GrowthConfigError(choices_message(
            f"component of {type(model).__name__}", component, names[:40]))
    return model.get_submodule(component)


def prefix_param_maps(maps: dict[str, ParamMap], prefix: str) -> dict[str, ParamMap]:
    """Re-key a component's ParamMaps (and their sources) to the enclosing model's names."""
    out = {}
    for name, pm in maps.items():
        src = None if pm.source is None else f"{prefix}.{pm.source}"
        out[f"{prefix}.{name}"] = ParamMap(source=src, index=pm.index, grad_scale=pm.grad_scale,
                                           unsqueeze=pm.unsqueeze)
    return out


def _check(config: OpConfig) -> ComponentConfig:
    if not isinstance(config, ComponentConfig):
        raise GrowthConfigError(f"expected ComponentConfig, got {type(config).__name__}")
    return config


@register_operator(ComponentConfig)
class ComponentGrow(Operator):
    """Runs a :class:`ComponentConfig`'s step on its component; see the module docstring."""

    #: the class claim; the claim of one application is its step's (:meth:`is_exact`)
    exact = True

    def is_exact(self, model: nn.Module, config: OpConfig) -> bool:
        cfg = _check(config)
        step = cfg.step_config()
        return get_operator(step).is_exact(resolve_component(model, cfg.component), step)

    def is_shrink(self, config: OpConfig) -> bool:
        step = _check(config).step_config()
        return get_operator(step).is_shrink(step)

    def validate(self, model: nn.Module, config: OpConfig) -> None:
        cfg = _check(config)
        step = cfg.step_config()
        sub = resolve_component(model, cfg.component)
        try:
            get_operator(step).validate(sub, step)
        except (GrowthConfigError, IncompatibleModelError) as e:
            raise type(e)(f"component {cfg.component!r}: {e}") from e

    def apply(self, model: nn.Module, config: OpConfig, tx: Transaction) -> GrowthResult:
        cfg = _check(config)
        step = cfg.step_config()
        sub = resolve_component(model, cfg.component)
        op = get_operator(step)
        exact = op.is_exact(sub, step)
        res = op.apply(sub, step, tx)
        notes = {"component": cfg.component, "op": step.name, "notes": res.notes}
        return GrowthResult(param_maps=prefix_param_maps(res.param_maps, cfg.component),
                            exact=exact and res.exact, notes=notes)


__all__ = ["ComponentConfig", "component_names", "prefix_param_maps", "resolve_component"]
