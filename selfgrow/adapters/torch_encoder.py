"""Adapter for ``torch.nn.TransformerEncoder`` (stack of ``nn.TransformerEncoderLayer``).

The "config" of this family is its module attributes: ``TransformerEncoder.num_layers``,
``MultiheadAttention.embed_dim / num_heads / head_dim / kdim / vdim``; fused q/k/v live in
``self_attn.in_proj_weight`` (3C, C) as rows [0, C), [C, 2C), [2C, 3C). Heads are tied to the
width (``head_dim = embed_dim // num_heads``).
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from ..core import Transaction
from ..errors import GrowthConfigError, IncompatibleModelError
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


@register_adapter
class TorchEncoderAdapter(TransformerAdapter):
    """``nn.TransformerEncoder`` (batch_first either way, norm_first either way)."""

    family = "torch.nn.TransformerEncoder"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, nn.TransformerEncoder)

    @property
    def layers_path(self) -> str:
        return "layers"

    def _first(self) -> nn.TransformerEncoderLayer:
        layers = self.layers()
        if len(layers) == 0:
            raise IncompatibleModelError("nn.TransformerEncoder with no layers")
        lyr = layers[0]
        if not isinstance(lyr, nn.TransformerEncoderLayer):
            raise IncompatibleModelError(
                f"layer type {type(lyr).__name__} is not nn.TransformerEncoderLayer"
            )
        if not lyr.self_attn._qkv_same_embed_dim:
            raise IncompatibleModelError("MultiheadAttention with kdim/vdim != embed_dim")
        return lyr

    def dims(self) -> TransformerDims:
        lyr = self._first()
        a = lyr.self_attn
        return TransformerDims(
            n_layers=int(self.model.num_layers), d_model=a.embed_dim, n_heads=a.num_heads,
            n_kv_heads=a.num_heads, head_dim=a.head_dim, d_ff=lyr.linear1.out_features,
            norm_first=bool(lyr.norm_first), norm="layernorm", gated=False,
            heads_tied_to_width=True, norm_eps=float(lyr.norm1.eps),
        )

    def layer(self, i: int) -> LayerView:
        lyr = self.layers()[i]
        p = f"layers.{i}"
        a = lyr.self_attn
        c = a.embed_dim
        has_b = a.in_proj_bias is not None
        qkv = [
            ProjRef(f"{p}.self_attn", a, "in_proj_weight", "in_proj_bias" if has_b else None,
                    rows=(j * c, (j + 1) * c))
            for j in range(3)
        ]
        ob = "bias" if a.out_proj.bias is not None else None
        lb = "bias" if lyr.linear1.bias is not None else None
        return LayerView(
            index=i, path=p, module=lyr, q=qkv[0], k=qkv[1], v=qkv[2],
            o=ProjRef(f"{p}.self_attn.out_proj", a.out_proj, bias_attr=ob),
            up=ProjRef(f"{p}.linear1", lyr.linear1, bias_attr=lb),
            down=ProjRef(f"{p}.linear2", lyr.linear2, bias_attr=lb),
            norm1=NormRef(f"{p}.norm1", lyr.norm1), norm2=NormRef(f"{p}.norm2", lyr.norm2),
        )

    def embeddings(self) -> list[EmbRef]:
        return []

    def final_norm(self) -> NormRef | None:
        return NormRef("norm", self.model.norm) if self.model.norm is not None else None

    def update_dims(self, tx: Transaction, **dims: Any) -> None:
        for k in dims:
            if k not in ("n_layers", "d_model", "n_heads", "head_dim", "d_ff", "n_kv_heads"):
                raise GrowthConfigError(f"unknown dim {k!r}")
        if "n_layers" in dims and self.model.num_layers != dims["n_layers"]:
            tx.set_attr(self.model, "num_layers", int(dims["n_layers"]))
        for lyr in self.layers():
            a = lyr.self_attn
            c = a.in_proj_weight.shape[1]
            h = int(dims.get("n_heads", a.num_heads))
            for attr, val in (("embed_dim", c), ("kdim", c), ("vdim", c), ("num_heads", h),
                              ("head_dim", c // h)):
                if getattr(a, attr) != val:
                    tx.set_attr(a, attr, val)
        sync_module_attrs(tx, self.model)

    def arch_spec(self) -> dict[str, Any]:
        """Constructor arguments of the (grown) encoder and its layers."""
        import torch.nn.functional as F

        lyr = self._first()
        d = self.dims()
        acts = {F.relu: "relu", F.gelu: "gelu"}
        act = lyr.activation if isinstance(lyr.activation, str) else acts.get(lyr.activation)
        if act is None:
            raise IncompatibleModelError(
                f"nn.TransformerEncoder with activation {lyr.activation!r} cannot be described "
                f"for a checkpoint (only 'relu' and 'gelu')"
            )
        norm = self.model.norm
        return {"d_model": d.d_model, "nhead": d.n_heads, "dim_feedforward": d.d_ff,
                "num_layers": d.n_layers, "dropout": lyr.dropout.p, "activation": act,
                "layer_norm_eps": d.norm_eps, "batch_first": lyr.self_attn.batch_first,
                "norm_first": d.norm_first, "bias": lyr.linear1.bias is not None,
                "final_norm": None if norm is None else {"eps": norm.eps,
                                                         "bias": norm.bias is not None},
                "enable_nested_tensor": bool(self.model.enable_nested_tensor)}

    @classmethod
    def build_from_spec(cls, spec: dict[str, Any]) -> nn.Module:
        try:
            layer = nn.TransformerEncoderLayer(
                spec["d_model"], spec["nhead"], spec["dim_feedforward"], dropout=spec["dropout"],
                activation=spec["activation"], layer_norm_eps=spec["layer_norm_eps"],
                batch_first=spec["batch_first"], norm_first=spec["norm_first"],
                bias=spec["bias"],
            )
            fn = spec["final_norm"]
            norm = None if fn is None else nn.LayerNorm(spec["d_model"], eps=fn["eps"],
                                                         bias=fn["bias"])
            return nn.TransformerEncoder(layer, spec["num_layers"], norm=norm,
                                         enable_nested_tensor=spec["enable_nested_tensor"])
        except (KeyError, TypeError) as e:
            raise GrowthConfigError(f"malformed nn.TransformerEncoder spec {spec!r}: {e}") from e

    def build_fresh(self) -> nn.Module:
        lyr = self._first()
        d = self.dims()
        new_layer = nn.TransformerEncoderLayer(
            d.d_model, d.n_heads, d.d_ff, dropout=lyr.dropout.p,
            activation=lyr.activation, layer_norm_eps=d.norm_eps,
            batch_first=lyr.self_attn.batch_first, norm_first=d.norm_first,
            bias=lyr.linear1.bias is not None,
        )
        norm = copy.deepcopy(self.model.norm)
        if norm is not None:
            norm = nn.LayerNorm(d.d_model, eps=norm.eps, bias=norm.bias is not None)
        return nn.TransformerEncoder(
            new_layer, d.n_layers, norm=norm,
            enable_nested_tensor=self.model.enable_nested_tensor,
        )
