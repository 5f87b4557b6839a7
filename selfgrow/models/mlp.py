"""A growable multi-layer perceptron classifier.

``GrowableMLP(MLPConfig(in_features=64, hidden=(32, 32), n_classes=10))``::

    x (B, *) -> flatten (B, in_features)
      -> hidden.0: Linear(in_features, hidden[0]) -> act
      -> hidden.1: Linear(hidden[0], hidden[1])   -> act
      ...
      -> head: Linear(hidden[-1], n_classes)       -> logits (B, n_classes)

Parameter names are stable and readable: ``hidden.<i>.weight``, ``hidden.<i>.bias``,
``head.weight``, ``head.bias``. ``model.config`` is the single source of truth for the shape;
growth operators (:mod:`selfgrow.ops.net2net`) update it, so
``build_model(model.config).load_state_dict(model.state_dict())`` always works.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import GrowthConfigError, choices_message
from ._registry import register_model

#: elementwise activations; Net2WiderNet is exact for all of them, identity insertion
#: (Net2DeeperNet) only for ``"relu"``.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "tanh": torch.tanh,
}


@dataclass(frozen=True)
class MLPConfig:
    """Shape of a :class:`GrowableMLP`.

    Attributes:
        in_features: input features; inputs of shape ``(B, *)`` are flattened to
            ``(B, in_features)`` (784 for MNIST 28x28, 64 for sklearn digits 8x8).
        hidden: widths of the hidden layers (at least one).
        n_classes: number of output logits.
        activation: one of :data:`ACTIVATIONS`.
    """

    version: ClassVar[int] = 1

    in_features: int
    hidden: tuple[int, ...]
    n_classes: int
    activation: str = "relu"

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if self.in_features < 1 or self.n_classes < 1:
            raise GrowthConfigError(
                f"in_features and n_classes must be >= 1, got {self.in_features}, {self.n_classes}"
            )
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise GrowthConfigError(
                f"hidden must be a non-empty tuple of widths >= 1, got {self.hidden}"
            )
        if self.activation not in ACTIVATIONS:
            raise GrowthConfigError(choices_message("activation", self.activation, ACTIVATIONS))

    def replace(self, **changes: object) -> MLPConfig:
        """A copy with ``changes`` applied (configs are immutable)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


@register_model(MLPConfig)
class GrowableMLP(nn.Module):
    """Linear -> activation stack -> Linear head; see the module docstring for shapes."""

    def __init__(self, config: MLPConfig) -> None:
        super().__init__()
        # a copy: growth edits the model's config, never the caller's (which may build
        # other models, e.g. baselines)
        self.config = dataclasses.replace(config)
        widths = (config.in_features, *config.hidden)
        self.hidden = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)
        )
        self.head = nn.Linear(config.hidden[-1], config.n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, *) with prod(*) == in_features -> logits (B, n_classes)."""
        act = ACTIVATIONS[self.config.activation]
        h = x.flatten(1)  # (B, in_features)
        for layer in self.hidden:
            h = act(layer(h))  # (B, hidden[i])
        return self.head(h)  # (B, n_classes)
