"""Adapters: how growth operators see a model family. Names for adapter authors.

Kinds: ``"transformer"`` (:class:`TransformerAdapter`: layers, attention, FFN, norms,
embeddings and the config of a transformer family) and ``"classifier"`` (feed-forward
classifiers: MLPs, CNNs, ResNets). See :mod:`selfgrow.adapters._base` for the API.

Transformer families: selfgrow ``GrowableTransformer``; ``torch.nn.TransformerEncoder``
(batch_first and norm_first either way); Hugging Face BERT (``BertModel``, incl.
all-MiniLM-L6-v2), GPT-2 (``GPT2Model``, ``GPT2LMHeadModel``) and LLaMA (``LlamaModel``,
``LlamaForCausalLM``) when ``transformers`` is installed (imported lazily).
"""

from ..core import AxisMap, Fill, ParamMap, Roles, Transaction, normal_fill, regrid, zeros_fill
from ._base import (
    ADAPTER_KINDS,
    Adapter,
    EmbRef,
    LayerView,
    NormRef,
    ProjRef,
    TransformerAdapter,
    TransformerDims,
    adapter_class,
    build_architecture,
    describe_architecture,
    find_adapter,
    get_adapter,
    projection_axes,
    projection_plans,
    register_adapter,
    resize_params,
    set_param,
    set_projection,
    supported_families,
    sync_module_attrs,
)

__all__ = [
    "ADAPTER_KINDS",
    "Adapter",
    "AxisMap",
    "EmbRef",
    "Fill",
    "LayerView",
    "NormRef",
    "ParamMap",
    "ProjRef",
    "Roles",
    "Transaction",
    "TransformerAdapter",
    "TransformerDims",
    "adapter_class",
    "build_architecture",
    "describe_architecture",
    "find_adapter",
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
