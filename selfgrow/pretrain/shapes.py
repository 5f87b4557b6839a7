"""Transformer shapes of a pre-training run and the exact operators between two shapes.

A :class:`Shape` is the (layers, d_model, heads, seq_len) tuple of the CompoundGrow
literature (Gu et al. 2021). Every shape of one run shares the target's ``head_dim``
(``d_model / heads`` of the target), so width growth adds whole heads and keeps each head's
width: ``widen_d_model`` duplicates the residual stream, ``heads_clone`` clones heads and
``ffn_net2wider`` duplicates FFN units (``d_ff = ffn_mult * d_model``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..errors import GrowthConfigError, choices_message
from ..models.transformer import TransformerConfig
from ..ops import OpConfig
from ..ops.depth import (
    FunctionPreservingStackConfig,
    GInterleaveConfig,
    GRepeatConfig,
    GStackConfig,
    IdentityInsertConfig,
)
from ..ops.ffn import FFNNet2WiderConfig
from ..ops.heads import HeadsCloneConfig
from ..ops.positions import ExtendPositionsConfig
from ..ops.width import WidenDModelConfig

__all__ = ["DEPTH_OPS", "Shape", "config_for", "growth_steps", "parse_shape"]

#: depth operator of each depth schedule (registry names)
DEPTH_OPS = ("g_stack", "g_repeat", "g_interleave", "function_preserving_stack")


@dataclass(frozen=True)
class Shape:
    """``(n_layers, d_model, n_heads, seq_len)`` of a GrowableTransformer."""

    n_layers: int
    d_model: int
    n_heads: int
    seq_len: int

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise GrowthConfigError(
                    f"shape {f.name}={v!r} is out of range; valid: an integer >= 1"
                )
        if self.d_model % self.n_heads:
            raise GrowthConfigError(
                f"shape d_model={self.d_model} is not a multiple of n_heads={self.n_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.n_layers, self.d_model, self.n_heads, self.seq_len)

    def __str__(self) -> str:
        return ",".join(str(v) for v in self.as_tuple())

    @classmethod
    def of(cls, value: Any) -> Shape:
        """A Shape from a Shape, a 4-tuple/list, a ``"L,D,H,T"`` string or a
        TransformerConfig (``seq_len = max_seq_len``)."""
        if isinstance(value, Shape):
            return value
        if isinstance(value, TransformerConfig):
            return cls(value.n_layers, value.d_model, value.n_heads, value.max_seq_len)
        if isinstance(value, str):
            return parse_shape(value)
        if isinstance(value, (tuple, list)) and len(value) == 4:
            return cls(*value)
        raise GrowthConfigError(
            f"a shape is (layers, d_model, heads, seq_len) or 'LAYERS,D_MODEL,HEADS,SEQ_LEN', "
            f"got {value!r}"
        )


def parse_shape(text: str) -> Shape:
    """``"4,128,4,128"`` -> Shape(4, 128, 4, 128). Raises GrowthConfigError naming the text."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 4 or not all(p.isdigit() for p in parts):
        raise GrowthConfigError(
            f"shape {text!r} must be four positive integers LAYERS,D_MODEL,HEADS,SEQ_LEN, "
            f"e.g. 4,128,4,128"
        )
    return Shape(*(int(p) for p in parts))


def config_for(shape: Shape, base: TransformerConfig, head_dim: int, ffn_mult: int
               ) -> TransformerConfig:
    """The TransformerConfig of ``shape``: ``base``'s variant fields (norm, positions, ffn,
    tying ...), ``head_dim`` per head (the target's), ``d_ff = ffn_mult * d_model``.

    Raises:
        GrowthConfigError: ``shape.d_model != shape.n_heads * head_dim``.
    """
    if shape.n_heads * head_dim != shape.d_model:
        raise GrowthConfigError(
            f"shape {shape}: d_model={shape.d_model} != heads {shape.n_heads} x head_dim "
            f"{head_dim} (every shape of a run keeps the target's head width)"
        )
    return dataclasses.replace(
        base, n_layers=shape.n_layers, d_model=shape.d_model, n_heads=shape.n_heads,
        n_kv_heads=shape.n_heads, head_dim=head_dim, d_ff=ffn_mult * shape.d_model,
        max_seq_len=max(shape.seq_len, 1),
    )


def ligo_config(src: TransformerConfig, dst: TransformerConfig, pattern: str = "stack"
                ) -> list[OpConfig]:
    """The LiGO growth from ``src`` to ``dst``: ``[LiGOConfig(factors, pattern)]`` plus
    ``extend_positions`` when the learned position table grows (LiGO itself keeps the
    sequence length). The first config is the one :func:`~selfgrow.ops.learned.fit_ligo`
    fits.

    Raises:
        GrowthConfigError: a dimension shrinks or does not grow by a whole multiple, the head
            width differs, or nothing grows but the sequence length.
    """
    from ..ops.learned import LiGOConfig

    if src.head_dim != dst.head_dim:
        raise GrowthConfigError(
            f"head widths differ ({src.head_dim} vs {dst.head_dim}); LiGO keeps head_dim")
    cfg = LiGOConfig(depth_factor=_ratio("n_layers", src.n_layers, dst.n_layers),
                     width_factor=_ratio("d_model", src.d_model, dst.d_model),
                     heads_factor=_ratio("n_heads", src.n_heads, dst.n_heads),
                     ffn_factor=_ratio("d_ff", src.d_ff, dst.d_ff), pattern=pattern)
    steps: list[OpConfig] = [cfg]
    if dst.max_seq_len > src.max_seq_len and dst.positions == "learned":
        steps.append(ExtendPositionsConfig(new_len=dst.max_seq_len))
    return steps


def _ratio(what: str, old: int, new: int) -> int:
    if new < old or new % old:
        raise GrowthConfigError(
            f"{what} cannot grow from {old} to {new}: growth needs a whole multiple "
            f"(new = k x old, k >= 1)"
        )
    return new // old


def growth_steps(
    src: TransformerConfig,
    dst: TransformerConfig,
    depth_op: str = "function_preserving_stack",
    *,
    noise: float = 0.1,
    interleave_noise: float = 0.01,
    seed: int = 0,
) -> list[OpConfig]:
    """Operator configs that grow a model of config ``src`` into ``dst``, in order: width
    (``widen_d_model`` with exact symmetric noise, ``heads_clone`` with exact noise,
    ``ffn_net2wider`` duplicating every unit with exact zero-sum noise), then depth
    (``depth_op`` by an integer factor; a depth increase that is not a multiple appends exact
    identity blocks), then the learned position table (``extend_positions``, copy_last).

    Every step is exact except the plain G_stack family (``g_stack``, ``g_repeat``,
    ``g_interleave``: each copy applies its block again; ``grow_`` measures the error) and
    ``extend_positions`` for positions the model has never used (not seen by shorter inputs).

    Raises:
        GrowthConfigError: a dimension shrinks or does not grow by a whole multiple, the
            head width differs, or ``depth_op`` is unknown (message lists the valid ones).
    """
    if depth_op not in DEPTH_OPS:
        raise GrowthConfigError(choices_message("depth operator", depth_op, DEPTH_OPS))
    if src.head_dim != dst.head_dim:
        raise GrowthConfigError(
            f"head widths differ ({src.head_dim} vs {dst.head_dim}); every shape of a run "
            f"keeps head_dim = target d_model / heads"
        )
    steps: list[OpConfig] = []
    k = _ratio("d_model", src.d_model, dst.d_model)
    if k > 1:
        steps.append(WidenDModelConfig(factor=k, noise=noise, seed=seed))
        if dst.n_heads != src.n_heads:
            steps.append(HeadsCloneConfig(new_n_heads=dst.n_heads, noise=noise, seed=seed + 1))
    elif dst.n_heads != src.n_heads:
        raise GrowthConfigError(
            f"n_heads {src.n_heads} -> {dst.n_heads} without widening d_model changes head_dim"
        )
    f_ff = _ratio("d_ff", src.d_ff, dst.d_ff)
    if f_ff > 1:
        steps.append(FFNNet2WiderConfig(
            new_d_ff=dst.d_ff, sources=[u % src.d_ff for u in range(dst.d_ff - src.d_ff)],
            noise=noise, seed=seed + 2))
    if dst.n_layers < src.n_layers:
        raise GrowthConfigError(f"n_layers cannot shrink from {src.n_layers} to {dst.n_layers}")
    if dst.n_layers > src.n_layers:
        f, rest = divmod(dst.n_layers, src.n_layers)
        if f >= 2:
            if depth_op == "g_stack":
                steps.append(GStackConfig(factor=f))
            elif depth_op == "g_repeat":
                steps.append(GRepeatConfig(factor=f))
            elif depth_op == "g_interleave":
                steps.append(GInterleaveConfig(factor=f, noise=interleave_noise, seed=seed + 3))
            else:
                steps.append(FunctionPreservingStackConfig(factor=f, pattern="stack"))
            n = f * src.n_layers
        else:
            rest, n = dst.n_layers - src.n_layers, src.n_layers
        if rest:
            steps.append(IdentityInsertConfig(positions=tuple([n] * rest), seed=seed + 4))
    if dst.max_seq_len > src.max_seq_len and dst.positions == "learned":
        steps.append(ExtendPositionsConfig(new_len=dst.max_seq_len))
    return steps
