"""``compound_grow``: several growth operators applied in ONE ``grow_`` call.

The steps run in order inside the single :class:`~selfgrow.core.Transaction` of
:func:`~selfgrow.ops.grow_`, so the growth is all-or-nothing: if any step fails (its
validation on the partially grown model, or its application), every earlier step is rolled
back and model and optimizer are left bit-identical. The optimizer is migrated once, from the
original parameters to the final ones, with the steps' ParamMaps composed by name.

Composition of two ParamMaps (``p1``: original -> intermediate, ``p2``: intermediate ->
final), used when a tensor is grown twice (e.g. ``widen_d_model`` then ``ffn_net2wider`` both
regrid ``ffn.up.weight``, along different or the same dims):

* ``source``: ``p1.source`` (None, i.e. a brand-new tensor in step 1, stays brand-new);
* per dim: ``index = i1[i2]`` where ``i2 >= 0``, ``-1`` where ``i2 == -1`` (new in step 2)
  and wherever ``i1`` gave -1 (new in step 1); an unchanged dim (None) in either map passes
  the other through;
* ``grad_scale = s1[i2] * s2`` (a copy of a copy receives the product of both shares).

Exactness: exact iff every step is exact (each step's own claim, evaluated on the model it
is applied to). This is what the CompoundGrow schedule uses (e.g. width + depth together, as
in bert2BERT / LiGO-style joint growth, and staged training's combined operators).
Sources: Shen et al. 2022 (staged training); Chen et al. 2022 (bert2BERT).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..core import Transaction
from ..errors import GrowthConfigError
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
class CompoundGrowConfig(OpConfig):
    """Apply ``steps`` (operator configs, in order) in one transaction.

    ``steps`` accepts OpConfig instances or their serialised dicts (``op_config_to_dict``);
    it is stored serialised so the config round-trips through JSON. EXACT iff every step is.
    """

    name: ClassVar[str] = "compound_grow"
    steps: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.steps, (list, tuple)):
            raise GrowthConfigError(f"steps must be a list of operator configs, got {self.steps!r}")
        self.steps = [
            op_config_to_dict(s) if isinstance(s, OpConfig) else copy.deepcopy(s)
            for s in self.steps
        ]

    def step_configs(self) -> list[OpConfig]:
        """The steps as OpConfig instances (GrowthConfigError if one is not a known config)."""
        return [op_config_from_dict(s) for s in self.steps]


def compose_param_maps(first: ParamMap, second: ParamMap) -> ParamMap:
    """The ParamMap of applying ``first`` then ``second`` (``second.source`` names the tensor
    that ``first`` produced). See the module docstring for the rule."""
    if first.source is None:
        return ParamMap(source=None)
    if first.unsqueeze is not None or second.unsqueeze is not None:
        raise GrowthConfigError(
            "CompoundGrow cannot compose a step that stacks a tensor into a new dimension "
            "(moe_upcycle / moe_drop_upcycle) with another step; apply it with its own grow_")
    nd = max(len(first.index), len(second.index))
    idx: list[torch.Tensor | None] = []
    s1: float | torch.Tensor = first.grad_scale
    for d in range(nd):
        i1 = first.index[d] if d < len(first.index) else None
        i2 = second.index[d] if d < len(second.index) else None
        if i2 is None:
            idx.append(i1)
            continue
        i2 = i2.long()
        if i1 is None:
            idx.append(i2)
        else:
            i1 = i1.long().to(i2.device)
            idx.append(torch.where(i2 >= 0, i1[i2.clamp(min=0)], torch.full_like(i2, -1)))
        if isinstance(s1, torch.Tensor) and s1.dim() > d and s1.shape[d] > 1:
            s1 = s1.index_select(d, i2.clamp(min=0).to(s1.device))
    s2 = second.grad_scale
    if isinstance(s1, torch.Tensor) or isinstance(s2, torch.Tensor):
        gs: float | torch.Tensor = torch.as_tensor(s1, dtype=torch.float64) * torch.as_tensor(
            s2, dtype=torch.float64)
        gs = gs.to(torch.float32)
    else:
        gs = float(s1) * float(s2)
    return ParamMap(source=first.source, index=tuple(idx), grad_scale=gs)


def compose_step_maps(
    first: dict[str, ParamMap], second: dict[str, ParamMap], final_names: set[str]
) -> dict[str, ParamMap]:
    """Compose the maps of two consecutive steps by name.

    Args:
        first: original -> intermediate maps (keys: intermediate names).
        second: intermediate -> final maps (keys: final names, sources: intermediate names).
        final_names: parameter names of the final model.

    Returns:
        original -> final maps (keys: final names).
    """
    out: dict[str, ParamMap] = {}
    for name, pm2 in second.items():
        src = pm2.source
        out[name] = compose_param_maps(first[src], pm2) if src in first else pm2
    for name, pm1 in first.items():
        if name not in out and name in final_names:
            out[name] = pm1  # untouched by the second step
    return out


@register_operator(CompoundGrowConfig)
class CompoundGrow(Operator):
    """Runs the steps of a :class:`CompoundGrowConfig` in one transaction."""

    exact = True

    def is_exact(self, model: nn.Module, config: OpConfig) -> bool:
        if not isinstance(config, CompoundGrowConfig):
            return False
        return all(get_operator(s).exact for s in config.step_configs())

    def validate(self, model: nn.Module, config: OpConfig) -> None:
        if not isinstance(config, CompoundGrowConfig):
            raise GrowthConfigError("expected CompoundGrowConfig")
        steps = config.step_configs()
        if not steps:
            raise GrowthConfigError("compound_grow needs at least one step")
        # later steps are validated on the partially grown model inside the transaction
        get_operator(steps[0]).validate(model, steps[0])

    def apply(self, model: nn.Module, config: OpConfig, tx: Transaction) -> GrowthResult:
        if not isinstance(config, CompoundGrowConfig):
            raise GrowthConfigError("expected CompoundGrowConfig")
        maps: dict[str, ParamMap] = {}
        exact = True
        notes: list[dict[str, Any]] = []
        for i, step in enumerate(config.step_configs()):
            op = get_operator(step)
            if i > 0:
                try:
                    op.validate(model, step)
                except GrowthConfigError as e:
                    raise GrowthConfigError(f"compound_grow step {i} ({step.name}): {e}") from e
            step_exact = op.is_exact(model, step)
            res = op.apply(model, step, tx)
            names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
            maps = compose_step_maps(maps, res.param_maps, names)
            exact = exact and step_exact and res.exact
            notes.append({"op": step.name, "exact": bool(step_exact and res.exact),
                          "notes": res.notes})
        return GrowthResult(param_maps=maps, exact=exact, notes={"steps": notes})


__all__ = ["CompoundGrowConfig", "compose_param_maps", "compose_step_maps"]
