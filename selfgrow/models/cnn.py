"""A small growable convolutional classifier (fast on CPU for 28x28 MNIST / 8x8 digits), 2-D
over images or 1-D over sequences (e.g. log-mel frames, ``spatial_dims=1``).

``GrowableCNN(CNNConfig(in_channels=1, image_size=28, channels=(16, 32), n_classes=10,
pool_after=(0, 1)))``::

    x (B, in_channels, H, W)
      -> blocks.0: conv Conv2d(in_channels, channels[0], k, padding=k//2)
                   bn BatchNorm2d(channels[0]) -> ReLU -> [MaxPool2d(2) if 0 in pool_after]
      -> blocks.1: ...                                   (B, channels[i], H_i, W_i)
      -> global average pool                             (B, channels[-1])
      -> head: Linear(channels[-1], n_classes)           logits (B, n_classes)

With ``spatial_dims=1`` the blocks are ``Conv1d`` / ``BatchNorm1d`` / ``MaxPool1d(2)`` over
``x`` (B, in_channels, L) (for audio: channels = mel bins, L = frames) and the pool averages
over L. With ``batchnorm=True`` the convs have no bias (BatchNorm's beta plays that role); with
``batchnorm=False`` each block is conv (with bias) -> ReLU. Parameter names:
``blocks.<i>.conv.weight``, ``blocks.<i>.bn.weight`` / ``.bias`` (buffers
``running_mean``, ``running_var``, ``num_batches_tracked``), ``head.weight``, ``head.bias``.
``model.config`` is the single source of truth for the shape.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import GrowthConfigError, choices_message
from ._registry import register_model

#: supported ``CNNConfig.spatial_dims``: 1 (Conv1d over sequences) and 2 (Conv2d over images)
SPATIAL_DIMS = (1, 2)
#: (conv, batchnorm, max-pool) classes per spatial dimensionality
LAYERS: dict[int, tuple[type[nn.Module], type[nn.Module], type[nn.Module]]] = {
    1: (nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d),
    2: (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d),
}


@dataclass(frozen=True)
class CNNConfig:
    """Shape of a :class:`GrowableCNN`.

    Attributes:
        in_channels: channels of the input image (1 for MNIST / digits).
        image_size: input height = width in pixels; bounds how many 2x2 pools fit.
        channels: output channels of each conv block (at least one block).
        n_classes: number of output logits.
        kernel_size: odd conv kernel size, padding ``kernel_size // 2`` keeps H and W.
        batchnorm: BatchNorm2d after every conv (conv bias disabled then).
        pool_after: indices of the blocks followed by a 2x2 max-pool (a 2-max-pool in 1-D).
        spatial_dims: 2 (images, ``Conv2d``) or 1 (sequences, ``Conv1d``); ``image_size`` is
            then the sequence length.
    """

    version: ClassVar[int] = 1

    in_channels: int
    image_size: int
    channels: tuple[int, ...]
    n_classes: int
    kernel_size: int = 3
    batchnorm: bool = True
    pool_after: tuple[int, ...] = ()
    spatial_dims: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "pool_after", tuple(sorted({int(i) for i in self.pool_after})))
        if self.in_channels < 1 or self.n_classes < 1 or self.image_size < 1:
            raise GrowthConfigError(
                f"in_channels, image_size and n_classes must be >= 1, got {self.in_channels}, "
                f"{self.image_size}, {self.n_classes}"
            )
        if not self.channels or any(c < 1 for c in self.channels):
            raise GrowthConfigError(
                f"channels must be a non-empty tuple of widths >= 1, got {self.channels}"
            )
        if self.spatial_dims not in SPATIAL_DIMS:
            raise GrowthConfigError(choices_message("spatial_dims", self.spatial_dims,
                                                    [str(d) for d in SPATIAL_DIMS]))
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise GrowthConfigError(f"kernel_size must be odd and >= 1, got {self.kernel_size}")
        bad = [i for i in self.pool_after if not 0 <= i < len(self.channels)]
        if bad:
            raise GrowthConfigError(
                f"pool_after indices {bad} out of range; valid: 0..{len(self.channels) - 1}"
            )
        if self.image_size >> len(self.pool_after) < 1:
            raise GrowthConfigError(
                f"{len(self.pool_after)} 2x2 pools do not fit an image of size {self.image_size}"
            )

    def replace(self, **changes: object) -> CNNConfig:
        """A copy with ``changes`` applied (configs are immutable)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


class ConvBlock(nn.Module):
    """conv -> bn (or Identity) -> ReLU -> pool (max-pool of 2 or Identity), in 1-D or 2-D."""

    def __init__(
        self, c_in: int, c_out: int, kernel_size: int, batchnorm: bool, pool: bool,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        conv, bn, maxpool = LAYERS[spatial_dims]
        self.conv = conv(c_in, c_out, kernel_size, padding=kernel_size // 2, bias=not batchnorm)
        self.bn: nn.Module = bn(c_out) if batchnorm else nn.Identity()
        self.pool: nn.Module = maxpool(2) if pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, c_in, H, W) -> (B, c_out, H', W') with H' = H // 2 when pooling, else H (in 1-D:
        (B, c_in, L) -> (B, c_out, L'))."""
        return self.pool(F.relu(self.bn(self.conv(x))))


@register_model(CNNConfig)
class GrowableCNN(nn.Module):
    """Conv blocks -> global average pool -> Linear head; see the module docstring."""

    def __init__(self, config: CNNConfig) -> None:
        super().__init__()
        # a copy: growth edits the model's config, never the caller's (which may build
        # other models, e.g. baselines)
        self.config = dataclasses.replace(config)
        c_in = (config.in_channels, *config.channels[:-1])
        self.blocks = nn.ModuleList(
            ConvBlock(a, b, config.kernel_size, config.batchnorm, i in config.pool_after,
                      config.spatial_dims)
            for i, (a, b) in enumerate(zip(c_in, config.channels, strict=True))
        )
        self.head = nn.Linear(config.channels[-1], config.n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, in_channels, H, W) (1-D: (B, in_channels, L)) -> logits (B, n_classes)."""
        h = x
        for block in self.blocks:
            h = block(h)  # (B, channels[i], H_i, W_i) or (B, channels[i], L_i)
        pooled = h.flatten(2).mean(dim=2)  # global average pool: (B, channels[-1])
        return self.head(pooled)  # (B, n_classes)
