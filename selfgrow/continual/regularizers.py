"""Regulariser state of Avalanche strategies carried through a growth.

EWC (separate and online), Synaptic Intelligence and MAS keep per-parameter tensors keyed by
parameter name: anchors (the weights saved after an experience, SI's ``old_theta`` /
``new_theta``), importances (EWC's Fisher diagonal, SI's omega, MAS's Omega) and SI's path
integrals (``trajectory``, ``cum_trajectory``). After a growth they still have the old
shapes and values, so EWC's penalty compares the grown model to the wrong tensors (measured:
0 -> 0.23 right after an exact widening) and online EWC and SI crash on their shape
assertions. :func:`follow_growth` maps every such tensor through the growth's
:class:`~selfgrow.optim.ParamTransition` (the operator's ParamMaps): anchors of copies are
the source's anchor scaled like the weight, importances are split among the copies and
divided by the square of the value scale, path integrals are split among the copies, and
new coordinates are anchored at their current value with zero importance. Right after an
EXACT growth every penalty is therefore unchanged (tested, with a negative control); brand
new tensors get zero state, listed in model order (online EWC merges importances by
position and SI reads every allowed parameter).

GDumb re-trains a copy of its initial model on its buffer at every experience: the growth's
operator is applied to that initial model too (``config``), so the capacity the controller
added persists while GDumb's from-scratch semantics stay (the initial weights grown
function-preservingly, never the trained ones).

LwF needs nothing (its previous model is a copy kept at its own architecture); GEM and
A-GEM recompute their reference gradients from memory at every iteration.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from avalanche.training.plugins import SynapticIntelligencePlugin
from torch import nn

from ..optim import ParamTransition

__all__ = ["SnapshotSynapticIntelligencePlugin", "follow_growth", "resets_model"]


class SnapshotSynapticIntelligencePlugin(SynapticIntelligencePlugin):  # type: ignore[misc]
    """Avalanche's Synaptic Intelligence (Zenke et al. 2017) with real snapshots.

    Avalanche 0.6 stores the weights at the start of an experience and before each update as
    ``param.detach().cpu().flatten()``: on CPU that is a VIEW of the live parameter, so the
    "old" weights move with the optimizer step, every path-integral increment
    ``g * (new - old)`` is 0 and SI never regularises. This subclass copies those two
    snapshots right after Avalanche takes them; everything else is Avalanche's (same
    arguments, same state layout, so :func:`follow_growth` maps it).
    """

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        super().before_training_exp(strategy, **kwargs)
        for d in self.ewc_data[0].values():
            d.data = d.data.clone()

    def before_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        super().before_training_iteration(strategy, **kwargs)
        for d in self.syn_data["old_theta"].values():
            d.data = d.data.clone()


def _param_data(name: str, t: torch.Tensor) -> Any:
    from avalanche.training.utils import ParamData

    return ParamData(name, t.shape, init_tensor=t.clone(), device=t.device)


def _map_dict(d: dict[str, Any], tr: ParamTransition, rule: str, names: list[str],
              model: dict[str, nn.Parameter], flat: bool, prefix: str = "") -> dict[str, Any]:
    """A new ``{name: ParamData}`` in ``names`` order: mapped from ``d`` where the source has
    state, else zero state (anchors: the current value)."""
    out: dict[str, Any] = {}
    for n in names:
        p = model[n].detach()
        src = tr.source_of(n)
        t = tr.map(n, d[src].data, rule) if src is not None and src in d else None
        if t is None:  # a brand-new tensor: no penalty
            t = p.clone() if rule == "anchor" else torch.zeros_like(p)
        if flat:
            t = t.reshape(-1)
        out[n] = _param_data(f"{prefix}{n}", t.to(device=p.device))
    return out


def follow_growth(plugins: list[Any], model: nn.Module, transition: ParamTransition,
                  config: Any = None) -> list[str]:
    """Map the per-parameter state of the Avalanche regularisation plugins in ``plugins``
    (EWCPlugin, SynapticIntelligencePlugin, MASPlugin; others are left alone) to ``model``
    grown by ``transition``, and grow GDumbPlugin's initial model with ``config`` (the
    operator config of the growth) when given.

    Returns:
        the class names of the plugins whose state was mapped.
    """
    from avalanche.training.plugins import (
        EWCPlugin,
        GDumbPlugin,
        MASPlugin,
        SynapticIntelligencePlugin,
    )

    named = dict(model.named_parameters())
    names = list(named)
    done: list[str] = []
    for pl in plugins:
        if isinstance(pl, EWCPlugin):
            for e in list(pl.saved_params):
                pl.saved_params[e] = _map_dict(pl.saved_params[e], transition, "anchor", names,
                                               named, False)
            for e in list(pl.importances):
                pl.importances[e] = _map_dict(pl.importances[e], transition, "importance",
                                              names, named, False, "imp_")
            done.append(type(pl).__name__)
        elif isinstance(pl, SynapticIntelligencePlugin):
            if not pl.ewc_data[0]:
                continue  # nothing recorded yet: SI creates its state at the next experience
            allowed = [n for n, _ in SynapticIntelligencePlugin.allowed_parameters(
                model, pl.excluded_parameters)]
            anchors = _map_dict(pl.ewc_data[0], transition, "anchor", allowed, named, True)
            imps = _map_dict(pl.ewc_data[1], transition, "importance", allowed, named, True,
                             "imp_")
            pl.ewc_data = (anchors, imps)
            rules = {"old_theta": "anchor", "new_theta": "anchor", "grad": "accumulator",
                     "trajectory": "accumulator", "cum_trajectory": "accumulator"}
            for key, rule in rules.items():
                pl.syn_data[key] = _map_dict(pl.syn_data[key], transition, rule, allowed,
                                             named, True, f"{key}_")
            done.append(type(pl).__name__)
        elif isinstance(pl, MASPlugin):
            if pl.params:
                pl.params = _map_dict(pl.params, transition, "anchor", names, named, False)
            if pl.importance:
                pl.importance = _map_dict(pl.importance, transition, "importance", names,
                                          named, False)
            done.append(type(pl).__name__)
        elif isinstance(pl, GDumbPlugin) and config is not None and pl.init_model is not None:
            from ..ops import grow_

            grow_(pl.init_model, copy.deepcopy(config))
            done.append(type(pl).__name__)
    return done


def resets_model(plugins: list[Any]) -> bool:
    """Whether a plugin replaces the strategy's model by a fresh copy at each experience
    (GDumb): the strategy's model is then the authority, not the controller's."""
    from avalanche.training.plugins import GDumbPlugin

    return any(isinstance(p, GDumbPlugin) for p in plugins)
