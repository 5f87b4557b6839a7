"""GrowableMultimodal: an image encoder, an audio encoder and a fusion MLP, each growable.

``GrowableMultimodal(MultimodalConfig(image=CNNConfig(...), audio=CNNConfig(...,
spatial_dims=1), fusion=MLPConfig(...)))``::

    image (B, C_img, H, W) -> image: GrowableCNN (2-D), head = embedding  e_img (B, D_img)
    audio (B, n_mels, T)   -> audio: GrowableCNN (1-D over frames)        e_aud (B, D_aud)
    concat [e_img, e_aud] (B, D_img + D_aud)
      -> fusion: GrowableMLP (hidden layers, head)                        logits (B, n_classes)

An encoder's ``n_classes`` is its embedding width ``D``; the encoders' heads are linear
projections to the embedding. Either encoder may be left out (``image=None`` or
``audio=None``): the unimodal baselines are the same class. The components are the
submodules ``"image"``, ``"audio"`` and ``"fusion"`` (:attr:`growth_components`), which the
``component`` operator (:mod:`selfgrow.ops.component`) grows one at a time with the existing
classifier operators (Net2WiderNet, identity insertion, unit removal), leaving the other
components' parameters and optimizer state untouched.

Inputs: ``model(image, audio)``, or ONE packed tensor ``model(x)`` with
``x = model.pack(image, audio)`` of shape (B, C_img*H*W + n_mels*T) (image first), so a
paired sample travels through any single-tensor pipeline (TensorDataset, Avalanche
benchmarks, FLOP counting). ``model.config`` is derived from the three components' configs,
so it always reflects their grown shapes, and ``build_model(model.config)`` rebuilds a grown
model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..errors import GrowthConfigError, IncompatibleModelError
from ._registry import register_model
from .cnn import CNNConfig, GrowableCNN
from .mlp import GrowableMLP, MLPConfig

#: the modalities, in packing and concatenation order
MODALITIES = ("image", "audio")


@dataclass(frozen=True)
class MultimodalConfig:
    """Shape of a :class:`GrowableMultimodal`.

    Attributes:
        image: the image encoder (2-D :class:`~selfgrow.models.cnn.CNNConfig`; its
            ``n_classes`` is the image embedding width), or None for an audio-only model.
        audio: the audio encoder (a 1-D CNNConfig over log-mel frames: ``in_channels`` =
            mel bins, ``image_size`` = frames, ``spatial_dims=1``), or None for image-only.
        fusion: the fusion MLP; ``in_features`` must be the sum of the embedding widths.

    Raises:
        GrowthConfigError: no encoder, a wrongly typed part, an audio encoder that is not
            1-D, or a fusion input width that is not the sum of the embedding widths.
    """

    version: ClassVar[int] = 1

    image: CNNConfig | None
    audio: CNNConfig | None
    fusion: MLPConfig

    def __post_init__(self) -> None:
        if self.image is None and self.audio is None:
            raise GrowthConfigError("a MultimodalConfig needs an image or an audio encoder")
        for name in MODALITIES:
            part = getattr(self, name)
            if part is not None and not isinstance(part, CNNConfig):
                raise GrowthConfigError(
                    f"MultimodalConfig.{name} must be a CNNConfig or None, got "
                    f"{type(part).__name__}")
        if not isinstance(self.fusion, MLPConfig):
            raise GrowthConfigError(
                f"MultimodalConfig.fusion must be an MLPConfig, got {type(self.fusion).__name__}")
        if self.image is not None and self.image.spatial_dims != 2:
            raise GrowthConfigError("the image encoder must be 2-D (spatial_dims=2)")
        if self.audio is not None and self.audio.spatial_dims != 1:
            raise GrowthConfigError(
                "the audio encoder must be 1-D over frames (spatial_dims=1, in_channels = mel "
                "bins, image_size = frames)")
        d = sum(self.embedding_dims.values())
        if self.fusion.in_features != d:
            raise GrowthConfigError(
                f"fusion.in_features={self.fusion.in_features} must be the sum of the "
                f"embedding widths {self.embedding_dims} = {d}")

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities present, in packing order."""
        return tuple(m for m in MODALITIES if getattr(self, m) is not None)

    @property
    def embedding_dims(self) -> dict[str, int]:
        """``{modality: D}``, the encoders' output (embedding) widths."""
        return {m: getattr(self, m).n_classes for m in self.modalities}

    @property
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        """``{modality: per-sample input shape}``: image (C, H, W), audio (n_mels, T)."""
        out = {}
        for m in self.modalities:
            c = getattr(self, m)
            out[m] = (c.in_channels, *(c.image_size,) * c.spatial_dims)
        return out

    @property
    def packed_features(self) -> int:
        """Width of one packed sample (the sum of the modalities' input sizes)."""
        return sum(math.prod(s) for s in self.input_shapes.values())

    def replace(self, **changes: object) -> MultimodalConfig:
        """A copy with ``changes`` applied (configs are immutable)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


@register_model(MultimodalConfig)
class GrowableMultimodal(nn.Module):
    """Image and audio encoders and a fusion MLP; see the module docstring."""

    def __init__(self, config: MultimodalConfig) -> None:
        super().__init__()
        if not isinstance(config, MultimodalConfig):
            raise GrowthConfigError(
                f"GrowableMultimodal needs a MultimodalConfig, got {type(config).__name__}")
        self.image = GrowableCNN(config.image) if config.image is not None else None
        self.audio = GrowableCNN(config.audio) if config.audio is not None else None
        self.fusion = GrowableMLP(config.fusion)
        self._config: MultimodalConfig | None = None

    @property
    def config(self) -> MultimodalConfig:
        """The current shape, read from the components' own (grown) configs (the same object
        until a component's config changes)."""
        parts = {"image": None if self.image is None else self.image.config,
                 "audio": None if self.audio is None else self.audio.config,
                 "fusion": self.fusion.config}
        cached = self._config
        if cached is None or any(getattr(cached, k) is not v for k, v in parts.items()):
            cached = MultimodalConfig(**parts)  # type: ignore[arg-type]
            self._config = cached
        return cached

    @property
    def components(self) -> list[str]:
        """The components this model has (``"image"`` / ``"audio"`` when present, then
        ``"fusion"``)."""
        return [*self.config.modalities, "fusion"]

    @property
    def growth_components(self) -> tuple[str, ...]:
        """The submodules the ``component`` operator may grow (:attr:`components`)."""
        return tuple(self.components)

    def encoder(self, modality: str) -> GrowableCNN:
        """The encoder of ``modality``.

        Raises:
            IncompatibleModelError: the model has no such encoder (names the ones it has).
        """
        enc = getattr(self, modality, None) if modality in MODALITIES else None
        if enc is None:
            raise IncompatibleModelError(
                f"no {modality!r} encoder; this model has: {', '.join(self.config.modalities)}")
        return enc

    def pack(self, image: torch.Tensor | None = None, audio: torch.Tensor | None = None
             ) -> torch.Tensor:
        """One (B, packed_features) tensor from the modality batches (image first)."""
        given = {"image": image, "audio": audio}
        parts = []
        for m in self.config.modalities:
            t = given[m]
            if t is None:
                raise IncompatibleModelError(f"pack needs the {m!r} batch")
            parts.append(t.flatten(1))
        return torch.cat(parts, dim=1)

    def unpack(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{modality: (B, *input_shape)}`` from a packed (B, packed_features) batch.

        Raises:
            IncompatibleModelError: ``x`` is not (B, packed_features).
        """
        cfg = self.config
        shapes = cfg.input_shapes
        if x.dim() != 2 or x.shape[1] != cfg.packed_features:
            raise IncompatibleModelError(
                f"a packed multimodal batch is (B, {cfg.packed_features}) "
                f"({' + '.join(f'{m} {s}' for m, s in shapes.items())}); got {tuple(x.shape)}")
        sizes = [math.prod(s) for s in shapes.values()]
        chunks = torch.split(x, sizes, dim=1)
        return {m: c.reshape(-1, *shapes[m]) for m, c in zip(shapes, chunks, strict=True)}

    def inputs(self, x: torch.Tensor, audio: torch.Tensor | None = None
               ) -> dict[str, torch.Tensor]:
        """The modality batches of a call ``model(x)`` (packed) or ``model(image, audio)``."""
        mods = self.config.modalities
        if audio is not None:
            return {"image": x, "audio": audio}
        if len(mods) == 1 and x.dim() == len(self.config.input_shapes[mods[0]]) + 1:
            return {mods[0]: x}
        return self.unpack(x)

    def embed(self, x: torch.Tensor, audio: torch.Tensor | None = None
              ) -> dict[str, torch.Tensor]:
        """``{modality: embedding (B, D_m)}``."""
        return {m: self.encoder(m)(t) for m, t in self.inputs(x, audio).items()}

    def fuse(self, embeddings: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits (B, n_classes) from ``{modality: (B, D_m)}`` (concatenated in order)."""
        return self.fusion(torch.cat([embeddings[m] for m in self.config.modalities], dim=1))

    def forward(self, x: torch.Tensor, audio: torch.Tensor | None = None) -> torch.Tensor:
        """``model(packed)`` or ``model(image, audio)`` -> logits (B, n_classes)."""
        return self.fuse(self.embed(x, audio))


__all__ = ["MODALITIES", "GrowableMultimodal", "MultimodalConfig"]
