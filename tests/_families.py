"""Tiny random models of every supported transformer family (shared by the growth tests)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from selfgrow.models.transformer import GrowableTransformer, tiny_config

try:
    import transformers as _tf
except ImportError:  # pragma: no cover - transformers is optional
    _tf = None

HAS_HF = _tf is not None
VOCAB = 40


def selfgrow_model(**kw: object) -> nn.Module:
    base: dict[str, object] = dict(vocab_size=VOCAB, d_model=8, n_heads=2, head_dim=4, d_ff=16,
                                   max_seq_len=12)
    base.update(kw)
    return GrowableTransformer(tiny_config(**base))


def torch_encoder(norm_first: bool, final_norm: bool = False) -> nn.Module:
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True,
                                       norm_first=norm_first)
    norm = nn.LayerNorm(8) if final_norm else None
    return nn.TransformerEncoder(layer, 2, norm=norm, enable_nested_tensor=False)


def bert() -> nn.Module:
    cfg = _tf.BertConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=16, max_position_embeddings=16,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return _tf.BertModel(cfg).eval()


def gpt2(lm_head: bool = True) -> nn.Module:
    cfg = _tf.GPT2Config(vocab_size=VOCAB, n_embd=8, n_layer=2, n_head=2, n_positions=16,
                         bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                         attn_pdrop=0.0)
    return (_tf.GPT2LMHeadModel if lm_head else _tf.GPT2Model)(cfg).eval()


def llama(lm_head: bool = True, tie: bool = False) -> nn.Module:
    cfg = _tf.LlamaConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=4,
                          intermediate_size=16, max_position_embeddings=16,
                          tie_word_embeddings=tie)
    return (_tf.LlamaForCausalLM if lm_head else _tf.LlamaModel)(cfg).eval()


def randomize_(model: nn.Module, seed: int = 0, std: float = 0.3) -> nn.Module:
    """Give every parameter (norm gains/biases included) non-trivial random values so that
    exactness checks cannot pass by accident (zero biases, unit gains)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * std
            if p.dim() == 1 and ("norm" in n.lower() or "ln_" in n):
                p.copy_(1.0 + noise if n.endswith("weight") else noise)
            else:
                p.copy_(noise)
    return model


#: family name -> (factory, is_sequence_model_taking_embeddings)
FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "sg-preln": lambda: selfgrow_model(),
    "sg-postln": lambda: selfgrow_model(norm_first=False),
    "sg-rms-rope-swiglu-gqa": lambda: selfgrow_model(
        norm="rmsnorm", positions="rope", ffn="swiglu", n_heads=4, n_kv_heads=2, head_dim=2),
    "sg-untied-nobias-encoder": lambda: selfgrow_model(tie_embeddings=False, bias=False,
                                                       causal=False),
    "sg-postln-rms-untied": lambda: selfgrow_model(norm_first=False, norm="rmsnorm",
                                                   tie_embeddings=False),
    "torch-enc-preln": lambda: torch_encoder(True, final_norm=True),
    "torch-enc-postln": lambda: torch_encoder(False),
}
if HAS_HF:
    FAMILIES.update({
        "hf-bert": bert,
        "hf-gpt2": gpt2,
        "hf-gpt2-base": lambda: gpt2(lm_head=False),
        "hf-llama": llama,
        "hf-llama-tied": lambda: llama(tie=True),
    })


def make_input(model: nn.Module, batch: int = 2, T: int = 6, seed: int = 0,
               dtype: torch.dtype = torch.float32) -> tuple:
    """Positional args for ``model``: token ids for LMs, (B, T, C) floats for nn encoders."""
    g = torch.Generator().manual_seed(seed)
    if isinstance(model, nn.TransformerEncoder):
        c = model.layers[0].self_attn.embed_dim
        return (torch.randn(batch, T, c, generator=g, dtype=torch.float64).to(dtype),)
    return (torch.randint(0, VOCAB, (batch, T), generator=g),)


def run(model: nn.Module, args: tuple) -> torch.Tensor:
    out = model(*args)
    if isinstance(out, torch.Tensor):
        return out
    for attr in ("logits", "last_hidden_state"):
        v = getattr(out, attr, None)
        if v is not None:
            return v
    return out[0]
