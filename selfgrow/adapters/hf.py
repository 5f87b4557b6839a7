"""Adapters for Hugging Face ``transformers`` families: BERT, GPT-2, LLaMA.

``transformers`` is optional: this module imports nothing from it; families are recognised by
class name and module path (``transformers.models.bert``...). Growth updates
``model.config`` (shared by every submodule) and the attributes HF attention modules cache
(``num_attention_heads``, ``attention_head_size``, ``head_dim``, ``split_size``, ...), so
``save_pretrained`` + ``AutoModel.from_pretrained`` rebuild the grown model.
"""

from __future__ import annotations

import copy
import importlib
import json
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


def _is_hf(model: nn.Module, family: str, names: tuple[str, ...]) -> bool:
    t = type(model)
    return t.__module__.startswith(f"transformers.models.{family}") and t.__name__ in names


def _prefix(p: str, rest: str) -> str:
    return f"{p}.{rest}" if p else rest


class _HFAdapter(TransformerAdapter):
    """Shared HF plumbing: config keys and build_fresh."""

    #: canonical dim -> HF config attribute
    config_keys: dict[str, str] = {}
    base_attr: str = ""  # attribute of the task model holding the base model ("" = itself)

    @property
    def base_path(self) -> str:
        if self.base_attr and hasattr(self.model, self.base_attr) and isinstance(
            getattr(self.model, self.base_attr), nn.Module
        ):
            return self.base_attr
        return ""

    @property
    def base(self) -> nn.Module:
        return self.model.get_submodule(self.base_path) if self.base_path else self.model

    def _cfg(self, key: str) -> int:
        v = getattr(self.model.config, self.config_keys[key])
        return int(v)

    def update_dims(self, tx: Transaction, **dims: Any) -> None:
        cfg = self.model.config
        for k, v in dims.items():
            if k not in self.config_keys:
                raise GrowthConfigError(
                    f"{self.family} cannot record dim {k!r}; valid: {sorted(self.config_keys)}"
                )
            attr = self.config_keys[k]
            if getattr(cfg, attr, None) != v:
                tx.set_attr(cfg, attr, int(v))
        self._sync_attention(tx)
        sync_module_attrs(tx, self.model)

    def _sync_attention(self, tx: Transaction) -> None:  # noqa: B027
        """Update attributes cached by attention/MLP modules from the config."""

    def after_set_layers(self, tx: Transaction, blocks: list[nn.Module]) -> None:
        for i, b in enumerate(blocks):
            for m in b.modules():
                if hasattr(m, "layer_idx") and m.layer_idx != i:
                    tx.set_attr(m, "layer_idx", i)

    def build_fresh(self) -> nn.Module:
        return type(self.model)(copy.deepcopy(self.model.config)).eval()

    def arch_spec(self) -> dict[str, Any]:
        """``{"class": "transformers....GPT2LMHeadModel", "config": config.to_dict()}``: the
        grown config (every operator updates it) rebuilds the grown model."""
        t = type(self.model)
        return {"class": f"{t.__module__}.{t.__qualname__}",
                "config": json.loads(self.model.config.to_json_string(use_diff=False))}

    @classmethod
    def build_from_spec(cls, spec: dict[str, Any]) -> nn.Module:
        path = spec.get("class") if isinstance(spec, dict) else None
        if not isinstance(path, str) or not path.startswith("transformers."):
            raise GrowthConfigError(
                f"not a Hugging Face model spec (class {path!r}); only classes of the "
                f"'transformers' package are rebuilt"
            )
        mod_name, _, name = path.rpartition(".")
        try:
            model_cls = getattr(importlib.import_module(mod_name), name)
        except (ImportError, AttributeError) as e:
            raise IncompatibleModelError(
                f"cannot import {path} to rebuild the checkpoint's model: {e} (pip install "
                f"transformers)"
            ) from e
        d = dict(spec["config"])
        try:
            config = model_cls.config_class.from_dict(d)
        except Exception:  # noqa: BLE001 - HF validators reject grown head counts (LLaMA)
            # a grown config can fail the family's own validator (hidden_size not a multiple
            # of the heads once add_heads kept head_dim): build with one head, then restore
            heads = {k: d[k] for k in ("num_attention_heads", "num_key_value_heads") if k in d}
            config = model_cls.config_class.from_dict({**d, **dict.fromkeys(heads, 1)})
            for k, v in heads.items():
                object.__setattr__(config, k, v)
        return model_cls(config)


@register_adapter
class BertAdapter(_HFAdapter):
    """HF ``BertModel`` (what ``AutoModel`` returns for BERT checkpoints such as
    all-MiniLM-L6-v2). Post-LN blocks; embeddings LayerNorm; no final norm; optional pooler
    (its dense layer reads and writes width C and is grown like the stream)."""

    family = "transformers.BertModel"
    config_keys = {
        "n_layers": "num_hidden_layers", "d_model": "hidden_size",
        "n_heads": "num_attention_heads", "d_ff": "intermediate_size",
    }

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return _is_hf(model, "bert", ("BertModel",))

    @property
    def layers_path(self) -> str:
        return "encoder.layer"

    def dims(self) -> TransformerDims:
        c = self.model.config
        h = int(c.num_attention_heads)
        return TransformerDims(
            n_layers=int(c.num_hidden_layers), d_model=int(c.hidden_size), n_heads=h,
            n_kv_heads=h, head_dim=int(c.hidden_size) // h, d_ff=int(c.intermediate_size),
            norm_first=False, norm="layernorm", heads_tied_to_width=True,
            norm_eps=float(c.layer_norm_eps),
        )

    def layer(self, i: int) -> LayerView:
        b = self.layers()[i]
        p = f"encoder.layer.{i}"
        s = b.attention.self
        return LayerView(
            index=i, path=p, module=b,
            q=ProjRef(f"{p}.attention.self.query", s.query),
            k=ProjRef(f"{p}.attention.self.key", s.key),
            v=ProjRef(f"{p}.attention.self.value", s.value),
            o=ProjRef(f"{p}.attention.output.dense", b.attention.output.dense),
            up=ProjRef(f"{p}.intermediate.dense", b.intermediate.dense),
            down=ProjRef(f"{p}.output.dense", b.output.dense),
            norm1=NormRef(f"{p}.attention.output.LayerNorm", b.attention.output.LayerNorm),
            norm2=NormRef(f"{p}.output.LayerNorm", b.output.LayerNorm),
        )

    def embeddings(self) -> list[EmbRef]:
        e = self.model.embeddings
        return [
            EmbRef("embeddings.word_embeddings", e.word_embeddings),
            EmbRef("embeddings.position_embeddings", e.position_embeddings),
            EmbRef("embeddings.token_type_embeddings", e.token_type_embeddings),
        ]

    def embed_norm(self) -> NormRef | None:
        return NormRef("embeddings.LayerNorm", self.model.embeddings.LayerNorm)

    def extra_projections(self) -> list[tuple[ProjRef, bool, bool]]:
        pooler = getattr(self.model, "pooler", None)
        if pooler is None:
            return []
        return [(ProjRef("pooler.dense", pooler.dense), True, True)]

    def _sync_attention(self, tx: Transaction) -> None:
        c = self.model.config
        h = int(c.num_attention_heads)
        dh = int(c.hidden_size) // h
        for blk in self.layers():
            s = blk.attention.self
            for attr, val in (("num_attention_heads", h), ("attention_head_size", dh),
                              ("all_head_size", h * dh), ("scaling", dh**-0.5)):
                if getattr(s, attr, val) != val:
                    tx.set_attr(s, attr, val)

    def check(self) -> None:
        super().check()
        c = self.model.config
        if getattr(c, "add_cross_attention", False):
            raise IncompatibleModelError("BERT with cross-attention is not supported")
        if c.hidden_size % c.num_attention_heads:
            raise IncompatibleModelError("BERT hidden_size not a multiple of the head count")


@register_adapter
class GPT2Adapter(_HFAdapter):
    """HF ``GPT2Model`` / ``GPT2LMHeadModel``: pre-LN, fused ``c_attn`` Conv1D (stored
    ``(in, out)``), final ``ln_f``, head tied to ``wte`` by default."""

    family = "transformers.GPT2"
    base_attr = "transformer"
    config_keys = {
        "n_layers": "n_layer", "d_model": "n_embd", "n_heads": "n_head", "d_ff": "n_inner",
    }

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return _is_hf(model, "gpt2", ("GPT2Model", "GPT2LMHeadModel"))

    @property
    def layers_path(self) -> str:
        return _prefix(self.base_path, "h")

    def dims(self) -> TransformerDims:
        c = self.model.config
        h = int(c.n_head)
        inner = c.n_inner if c.n_inner is not None else 4 * c.n_embd
        return TransformerDims(
            n_layers=int(c.n_layer), d_model=int(c.n_embd), n_heads=h, n_kv_heads=h,
            head_dim=int(c.n_embd) // h, d_ff=int(inner), norm_first=True,
            heads_tied_to_width=True, norm_eps=float(c.layer_norm_epsilon),
        )

    def layer(self, i: int) -> LayerView:
        b = self.layers()[i]
        p = f"{self.layers_path}.{i}"
        c = b.attn.embed_dim
        qkv = [ProjRef(f"{p}.attn.c_attn", b.attn.c_attn, rows=(j * c, (j + 1) * c),
                       transposed=True) for j in range(3)]
        return LayerView(
            index=i, path=p, module=b, q=qkv[0], k=qkv[1], v=qkv[2],
            o=ProjRef(f"{p}.attn.c_proj", b.attn.c_proj, transposed=True),
            up=ProjRef(f"{p}.mlp.c_fc", b.mlp.c_fc, transposed=True),
            down=ProjRef(f"{p}.mlp.c_proj", b.mlp.c_proj, transposed=True),
            norm1=NormRef(f"{p}.ln_1", b.ln_1), norm2=NormRef(f"{p}.ln_2", b.ln_2),
        )

    def embeddings(self) -> list[EmbRef]:
        bp = self.base_path
        return [EmbRef(_prefix(bp, "wte"), self.base.wte), EmbRef(_prefix(bp, "wpe"),
                                                                  self.base.wpe)]

    def final_norm(self) -> NormRef | None:
        return NormRef(_prefix(self.base_path, "ln_f"), self.base.ln_f)

    def head(self) -> ProjRef | None:
        lm = getattr(self.model, "lm_head", None)
        return None if lm is None else ProjRef("lm_head", lm, bias_attr=None)

    def update_dims(self, tx: Transaction, **dims: Any) -> None:
        c = self.model.config
        if c.n_inner is None and "d_model" in dims and "d_ff" not in dims:
            dims["d_ff"] = 4 * int(c.n_embd)  # keep the FFN width explicit when C changes
        super().update_dims(tx, **dims)

    def _sync_attention(self, tx: Transaction) -> None:
        c = self.model.config
        h, e = int(c.n_head), int(c.n_embd)
        for blk in self.layers():
            a = blk.attn
            scaling = (e // h) ** -0.5 if a.scale_attn_weights else 1.0
            for attr, val in (("embed_dim", e), ("num_heads", h), ("head_dim", e // h),
                              ("split_size", e), ("scaling", scaling)):
                if getattr(a, attr, val) != val:
                    tx.set_attr(a, attr, val)

    def check(self) -> None:
        super().check()
        c = self.model.config
        if c.scale_attn_by_inverse_layer_idx:
            raise IncompatibleModelError(
                "GPT-2 with scale_attn_by_inverse_layer_idx=True: moving a layer changes its "
                "attention scale, so growth cannot be function-preserving"
            )
        if getattr(c, "add_cross_attention", False):
            raise IncompatibleModelError("GPT-2 with cross-attention is not supported")


@register_adapter
class LlamaAdapter(_HFAdapter):
    """HF ``LlamaModel`` / ``LlamaForCausalLM``: pre-RMSNorm, RoPE, SwiGLU, GQA, explicit
    ``config.head_dim`` (heads independent of the width)."""

    family = "transformers.Llama"
    base_attr = "model"
    config_keys = {
        "n_layers": "num_hidden_layers", "d_model": "hidden_size",
        "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads",
        "head_dim": "head_dim", "d_ff": "intermediate_size",
    }

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return _is_hf(model, "llama", ("LlamaModel", "LlamaForCausalLM"))

    @property
    def layers_path(self) -> str:
        return _prefix(self.base_path, "layers")

    def dims(self) -> TransformerDims:
        c = self.model.config
        h = int(c.num_attention_heads)
        dh = getattr(c, "head_dim", None) or int(c.hidden_size) // h
        return TransformerDims(
            n_layers=int(c.num_hidden_layers), d_model=int(c.hidden_size), n_heads=h,
            n_kv_heads=int(c.num_key_value_heads), head_dim=int(dh),
            d_ff=int(c.intermediate_size), norm_first=True, norm="rmsnorm", gated=True,
            heads_tied_to_width=False, norm_eps=float(c.rms_norm_eps),
        )

    def layer(self, i: int) -> LayerView:
        b = self.layers()[i]
        p = f"{self.layers_path}.{i}"
        a, m = b.self_attn, b.mlp
        ab = "bias" if a.q_proj.bias is not None else None
        mb = "bias" if m.up_proj.bias is not None else None
        return LayerView(
            index=i, path=p, module=b,
            q=ProjRef(f"{p}.self_attn.q_proj", a.q_proj, bias_attr=ab),
            k=ProjRef(f"{p}.self_attn.k_proj", a.k_proj, bias_attr=ab),
            v=ProjRef(f"{p}.self_attn.v_proj", a.v_proj, bias_attr=ab),
            o=ProjRef(f"{p}.self_attn.o_proj", a.o_proj, bias_attr=ab),
            up=ProjRef(f"{p}.mlp.up_proj", m.up_proj, bias_attr=mb),
            gate=ProjRef(f"{p}.mlp.gate_proj", m.gate_proj, bias_attr=mb),
            down=ProjRef(f"{p}.mlp.down_proj", m.down_proj, bias_attr=mb),
            norm1=NormRef(f"{p}.input_layernorm", b.input_layernorm),
            norm2=NormRef(f"{p}.post_attention_layernorm", b.post_attention_layernorm),
        )

    def embeddings(self) -> list[EmbRef]:
        return [EmbRef(_prefix(self.base_path, "embed_tokens"), self.base.embed_tokens)]

    def final_norm(self) -> NormRef | None:
        return NormRef(_prefix(self.base_path, "norm"), self.base.norm)

    def head(self) -> ProjRef | None:
        lm = getattr(self.model, "lm_head", None)
        return None if lm is None else ProjRef("lm_head", lm, bias_attr=None)

    def update_dims(self, tx: Transaction, **dims: Any) -> None:
        c = self.model.config
        if "d_model" in dims and "head_dim" not in dims:
            dims["head_dim"] = self.dims().head_dim  # keep Dh explicit when C changes
        if getattr(c, "layer_types", None) is not None and "n_layers" in dims:
            lt = list(c.layer_types)
            n = int(dims["n_layers"])
            if len(set(lt)) > 1:
                raise IncompatibleModelError("LLaMA with mixed layer_types is not supported")
            tx.set_attr(c, "layer_types", (lt[:1] or ["full_attention"]) * n)
        super().update_dims(tx, **dims)

    def _sync_attention(self, tx: Transaction) -> None:
        c = self.model.config
        dh = int(c.head_dim)
        for blk in self.layers():
            a = blk.self_attn
            for attr, val in (("head_dim", dh), ("scaling", dh**-0.5),
                              ("num_key_value_groups",
                               int(c.num_attention_heads) // int(c.num_key_value_heads))):
                if getattr(a, attr, val) != val:
                    tx.set_attr(a, attr, val)
            for mod, attr, val in ((blk, "hidden_size", int(c.hidden_size)),
                                   (blk.mlp, "hidden_size", int(c.hidden_size)),
                                   (blk.mlp, "intermediate_size", int(c.intermediate_size))):
                if getattr(mod, attr, val) != val:
                    tx.set_attr(mod, attr, val)
