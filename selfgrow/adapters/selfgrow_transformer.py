"""Adapter for selfgrow's own :class:`~selfgrow.models.transformer.GrowableTransformer`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core import Transaction
from ..errors import GrowthConfigError, IncompatibleModelError
from ..models.moe import MoEFFN
from ..models.transformer import GrowableTransformer, Norm
from ._base import (
    EmbRef,
    LayerView,
    NormRef,
    ProjRef,
    TransformerAdapter,
    TransformerDims,
    register_adapter,
    sync_module_attrs,
)

#: dense-layer operators refuse MoE transformers (their FFNs are expert stacks)
_MOE_REFUSAL = (
    "selfgrow.GrowableTransformer with MoE layers (moe_experts={}): this operator works on "
    "dense FFN layers; the MoE operators are moe_upcycle, moe_drop_upcycle, add_expert, "
    "remove_expert, grow_top_k (selfgrow.ops.experts)"
)

_DIM_FIELDS = ("n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff")


@register_adapter
class SelfgrowTransformerAdapter(TransformerAdapter):
    """GrowableTransformer: config in ``model.config`` (TransformerConfig); supports the depth
    mask ramp and masked normalisation."""

    family = "selfgrow.GrowableTransformer"
    supports_ramp = True
    supports_norm_mask = True

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, GrowableTransformer)

    @property
    def layers_path(self) -> str:
        return "layers"

    def dims(self) -> TransformerDims:
        c = self.model.config
        return TransformerDims(
            n_layers=c.n_layers, d_model=c.d_model, n_heads=c.n_heads,
            n_kv_heads=int(c.n_kv_heads), head_dim=int(c.head_dim), d_ff=c.d_ff,
            norm_first=c.norm_first, norm=c.norm, gated=c.ffn == "swiglu",
            heads_tied_to_width=False, norm_eps=c.norm_eps,
        )

    def layer(self, i: int) -> LayerView:
        b = self.layers()[i]
        if isinstance(b.ffn, MoEFFN):
            raise IncompatibleModelError(_MOE_REFUSAL.format(self.model.config.moe_experts))
        p = f"layers.{i}"
        bias = "bias" if self.model.config.bias else None
        gate = b.ffn.gate if hasattr(b.ffn, "gate") else None
        return LayerView(
            index=i, path=p, module=b,
            q=ProjRef(f"{p}.attn.q", b.attn.q, bias_attr=bias),
            k=ProjRef(f"{p}.attn.k", b.attn.k, bias_attr=bias),
            v=ProjRef(f"{p}.attn.v", b.attn.v, bias_attr=bias),
            o=ProjRef(f"{p}.attn.o", b.attn.o, bias_attr=bias),
            up=ProjRef(f"{p}.ffn.up", b.ffn.up, bias_attr=bias),
            gate=None if gate is None else ProjRef(f"{p}.ffn.gate", gate, bias_attr=bias),
            down=ProjRef(f"{p}.ffn.down", b.ffn.down, bias_attr=bias),
            norm1=NormRef(f"{p}.norm1", b.norm1),
            norm2=NormRef(f"{p}.norm2", b.norm2),
        )

    def embeddings(self) -> list[EmbRef]:
        e = [EmbRef("tok_emb", self.model.tok_emb)]
        if self.model.config.positions == "learned":
            e.append(EmbRef("pos_emb", self.model.pos_emb))
        return e

    def final_norm(self) -> NormRef | None:
        return NormRef("norm_f", self.model.norm_f)

    def head(self) -> ProjRef | None:
        return ProjRef("head", self.model.head, bias_attr=None)

    def update_dims(self, tx: Transaction, **dims: Any) -> None:
        bad = set(dims) - set(_DIM_FIELDS)
        if bad:
            raise GrowthConfigError(f"unknown dims {sorted(bad)}; valid: {_DIM_FIELDS}")
        cfg = self.model.config
        for k, v in dims.items():
            if getattr(cfg, k) != v:
                tx.set_attr(cfg, k, int(v))
        for blk in self.layers():
            a = blk.attn
            for attr, key in (("n_heads", "n_heads"), ("n_kv_heads", "n_kv_heads"),
                              ("head_dim", "head_dim")):
                want = int(getattr(cfg, key))
                if getattr(a, attr) != want:
                    tx.set_attr(a, attr, want)
        sync_module_attrs(tx, self.model)

    def set_ramp(self, tx: Transaction, block: nn.Module, value: float) -> None:
        tx.set_buffer(block, "ramp", torch.full((), float(value), dtype=block.ramp.dtype,
                                                device=block.ramp.device))

    def enable_norm_mask(self, tx: Transaction) -> None:
        """Give every norm a mask buffer of ones and set ``config.norm_mask = True``."""
        for m in self.model.modules():
            if isinstance(m, Norm) and m.mask is None:
                tx.set_buffer(m, "mask", torch.ones(m.dim, device=m.weight.device,
                                                    dtype=m.weight.dtype))
        if not self.model.config.norm_mask:
            tx.set_attr(self.model.config, "norm_mask", True)

    def build_fresh(self) -> nn.Module:
        import copy

        return GrowableTransformer(copy.deepcopy(self.model.config))

    def check(self) -> None:
        if self.model.config.moe_experts:
            raise IncompatibleModelError(_MOE_REFUSAL.format(self.model.config.moe_experts))
        super().check()
        c = self.model.config
        if self.model.tok_emb.weight.shape != (c.vocab_size, c.d_model):
            raise IncompatibleModelError(
                f"tok_emb has shape {tuple(self.model.tok_emb.weight.shape)}, config implies "
                f"({c.vocab_size}, {c.d_model}) (config disagrees with modules)"
            )
