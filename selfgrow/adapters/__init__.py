"""Adapters: how growth operators find layers, attention, FFN, norms, embeddings and the
config of a transformer family. See :mod:`selfgrow.adapters._base` for the API.

Families: selfgrow ``GrowableTransformer``; ``torch.nn.TransformerEncoder`` (batch_first and
norm_first either way); Hugging Face BERT (``BertModel``, incl. all-MiniLM-L6-v2), GPT-2
(``GPT2Model``, ``GPT2LMHeadModel``) and LLaMA (``LlamaModel``, ``LlamaForCausalLM``) when
``transformers`` is installed (imported lazily).
"""

from ._base import (
    AxisMap,
    EmbRef,
    LayerView,
    NormRef,
    ProjRef,
    Roles,
    TransformerAdapter,
    TransformerDims,
    get_adapter,
    normal_fill,
    projection_axes,
    projection_plans,
    register_adapter,
    regrid,
    resize_params,
    set_param,
    set_projection,
    supported_families,
    sync_module_attrs,
    zeros_fill,
)

__all__ = [
    "AxisMap",
    "EmbRef",
    "LayerView",
    "NormRef",
    "ProjRef",
    "Roles",
    "TransformerAdapter",
    "TransformerDims",
    "get_adapter",
    "normal_fill",
    "projection_axes",
    "projection_plans",
    "register_adapter",
    "regrid",
    "resize_params",
    "set_param",
    "set_projection",
    "supported_families",
    "sync_module_attrs",
    "zeros_fill",
]
