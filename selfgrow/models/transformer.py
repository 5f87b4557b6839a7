"""GrowableTransformer: one readable, growable transformer (nanoGPT style).

One model class covers the variants the growth literature works with: decoder (causal) or
encoder, pre-LN or post-LN, LayerNorm or RMSNorm, learned or rotary positions, GELU or SwiGLU
FFN, multi-head or grouped-query attention, tied or untied embeddings. ``head_dim`` is a field
of its own (not ``d_model // n_heads``) so heads and the residual stream can grow
independently.

:class:`TransformerConfig` is the single source of truth for the shape: every growth
operator rewrites it, and ``GrowableTransformer(grown_config).load_state_dict(grown_sd)``
rebuilds a grown model exactly (the growth buffers ``layers.{i}.ramp`` and the optional norm
``mask`` are persistent buffers, so they travel with the state dict).

Parameter names (stable; operators and optimizer migration rely on them)::

    tok_emb.weight                      (V, C)
    pos_emb.weight                      (L, C)          positions == "learned" only
    layers.{i}.norm1.weight / .bias     (C,)            bias only for layernorm with bias=True
    layers.{i}.attn.q.weight / .bias    (H * Dh, C)
    layers.{i}.attn.k.weight / .bias    (Hkv * Dh, C)
    layers.{i}.attn.v.weight / .bias    (Hkv * Dh, C)
    layers.{i}.attn.o.weight / .bias    (C, H * Dh)
    layers.{i}.norm2.weight / .bias     (C,)
    layers.{i}.ffn.up.weight / .bias    (F, C)
    layers.{i}.ffn.gate.weight / .bias  (F, C)          ffn == "swiglu" only
    layers.{i}.ffn.down.weight / .bias  (C, F)
    layers.{i}.ramp                     ()              buffer, depth mask ramp m in [0, 1]

    MoE layers (``moe_experts[i] = E > 0``; :class:`~selfgrow.models.moe.MoEFFN`):
    layers.{i}.ffn.router.weight / .bias  (E, C) / (E,)
    layers.{i}.ffn.w_up / .w_gate       (E, F, C)       w_gate for ffn == "swiglu" only
    layers.{i}.ffn.b_up / .b_gate       (E, F)          bias=True only
    layers.{i}.ffn.w_down / .b_down     (E, C, F) / (E, C)
    layers.{i}.ffn.threshold            (E,)            moe_gate == "top_any" only
    layers.{i}.ffn.k_net.weight / .bias (K, C) / (K,)   moe_gate == "dynamic_k" only
    norm_f.weight / .bias               (C,)
    head.weight                         (V, C)          the same tensor as tok_emb.weight if tied

with B = batch, T = time, C = d_model, H = n_heads, Hkv = n_kv_heads, Dh = head_dim,
F = d_ff, V = vocab_size, L = max_seq_len.

Growth hooks:

* **Depth mask ramp** (masked structural growth, Yao et al. 2023): every block computes
  ``h <- m * block(h) + (1 - m) * h`` with ``m = layers.{i}.ramp`` (``torch.lerp``, so m = 0
  and m = 1 are bit-exact). m = 1 by default; a post-LN block inserted by
  ``identity_insert`` starts at m = 0 (an exact identity) and the stabiliser ramps it up with
  :meth:`GrowableTransformer.advance_ramps`.
* **Masked normalisation** (``config.norm_mask = True``): every norm holds a buffer ``mask``
  (C,) and computes its statistics over coordinates weighted by the mask, so residual
  coordinates added by ``widen_d_model_masked`` at mask 0 leave the function unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import GrowthConfigError, choices_message
from ._registry import register_model
from .moe import MoEFFN, check_moe_args, moe_auxiliary_loss

NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope")
FFNS = ("gelu", "swiglu")


@dataclass
class TransformerConfig:
    """Shape and variant of a :class:`GrowableTransformer` (single source of truth).

    Attributes:
        vocab_size: V, number of token ids.
        d_model: C, width of the residual stream.
        n_layers: number of blocks.
        n_heads: H, query heads.
        n_kv_heads: Hkv, key/value heads (grouped-query attention, Ainslie et al. 2023); must
            divide ``n_heads``; query head i reads KV head ``i // (H // Hkv)``. ``None`` -> H.
        head_dim: Dh, width of one head, independent of C so heads can be added without
            widening the stream. ``None`` -> ``d_model // n_heads``.
        d_ff: F, FFN hidden width.
        max_seq_len: L, longest sequence (size of the learned position table / RoPE cache).
        norm: ``"layernorm"`` or ``"rmsnorm"``.
        norm_first: pre-LN blocks ``h + f(LN(h))`` if True, post-LN ``LN(h + f(h))`` if False.
        positions: ``"learned"`` (table added to token embeddings) or ``"rope"`` (rotary, on
            q and k of every head; needs an even head_dim).
        ffn: ``"gelu"`` (up -> GELU -> down) or ``"swiglu"`` (down(silu(gate) * up)).
        tie_embeddings: the output head shares ``tok_emb.weight``.
        causal: decoder (causal self-attention) if True, encoder if False.
        bias: biases in linear layers and LayerNorm.
        dropout: dropout on attention probabilities and block outputs (training only).
        norm_eps: epsilon of every norm.
        rope_theta: RoPE base frequency.
        norm_mask: norms use masked statistics (set by ``widen_d_model_masked``).
        moe_experts: experts per layer, one entry per layer (0 = the dense FFN), or ``()``
            for a dense model; MoE layers are :class:`~selfgrow.models.moe.MoEFFN` with
            ``d_ff`` hidden units per expert.
        moe_top_k: k of top-k gating (the largest k of ``"dynamic_k"``), shared by every
            MoE layer.
        moe_gate: ``"topk"``, ``"dynamic_k"`` or ``"top_any"`` (see ``selfgrow.models.moe``).
        moe_capacity_factor: expert capacity factor, None = dropless.
    """

    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None
    head_dim: int | None = None
    d_ff: int = 256
    max_seq_len: int = 128
    norm: str = "layernorm"
    norm_first: bool = True
    positions: str = "learned"
    ffn: str = "gelu"
    tie_embeddings: bool = True
    causal: bool = True
    bias: bool = True
    dropout: float = 0.0
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    norm_mask: bool = False
    moe_experts: tuple[int, ...] = ()
    moe_top_k: int = 2
    moe_gate: str = "topk"
    moe_capacity_factor: float | None = None
    version = 1

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.n_heads <= 0 or self.d_model % self.n_heads:
                raise GrowthConfigError(
                    f"head_dim not given and d_model={self.d_model} is not a multiple of "
                    f"n_heads={self.n_heads}; pass head_dim explicitly"
                )
            self.head_dim = self.d_model // self.n_heads
        for f in ("vocab_size", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff",
                  "max_seq_len"):
            if int(getattr(self, f)) <= 0:
                raise GrowthConfigError(f"{f} must be positive, got {getattr(self, f)}")
        if self.n_layers < 0:
            raise GrowthConfigError(f"n_layers must be >= 0, got {self.n_layers}")
        if self.n_heads % self.n_kv_heads:
            raise GrowthConfigError(
                f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}"
            )
        if self.norm not in NORMS:
            raise GrowthConfigError(choices_message("norm", self.norm, NORMS))
        if self.positions not in POSITIONS:
            raise GrowthConfigError(choices_message("positions", self.positions, POSITIONS))
        if self.ffn not in FFNS:
            raise GrowthConfigError(choices_message("ffn", self.ffn, FFNS))
        if self.positions == "rope" and self.head_dim % 2:
            raise GrowthConfigError(f"rope needs an even head_dim, got {self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise GrowthConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        self._check_moe()

    def _check_moe(self) -> None:
        experts = self.moe_experts
        if not isinstance(experts, (tuple, list)) or any(
                isinstance(e, bool) or not isinstance(e, int) or e < 0 for e in experts):
            raise GrowthConfigError(f"moe_experts={experts!r} must be a tuple of integers >= 0 "
                                    f"(experts per layer, 0 = dense)")
        self.moe_experts = tuple(experts) if any(experts) else ()
        if self.moe_experts and len(self.moe_experts) != self.n_layers:
            raise GrowthConfigError(f"moe_experts has {len(self.moe_experts)} entries for "
                                    f"n_layers={self.n_layers}; valid: one per layer or ()")
        n = min((e for e in self.moe_experts if e), default=None)
        try:  # checked for a dense config too: a later moe_upcycle uses these fields
            check_moe_args(n if n is not None else max(self.moe_top_k, 1)
                           if isinstance(self.moe_top_k, int) else 1,
                           self.moe_top_k, self.moe_gate, self.moe_capacity_factor, self.ffn)
        except GrowthConfigError as e:
            raise GrowthConfigError(f"TransformerConfig moe_* fields: {e}") from None

    def experts_of(self, layer: int) -> int:
        """Experts of ``layer`` (0 = dense FFN)."""
        return self.moe_experts[layer] if self.moe_experts else 0


class Norm(nn.Module):
    """LayerNorm or RMSNorm over the last dimension, optionally with masked statistics.

    Unmasked it is exactly ``F.layer_norm`` / ``F.rms_norm``. Masked (a buffer ``mask`` (C,)
    with values in [0, 1]): mean and variance (or mean square) are averages weighted by the
    mask, ``mu = sum(m * x) / sum(m)``, so coordinates with m = 0 do not influence the
    statistics (masked structural growth, Yao et al. 2023).
    """

    def __init__(self, dim: int, kind: str, eps: float, bias: bool, masked: bool) -> None:
        super().__init__()
        self.kind = kind
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias and kind == "layernorm" else None
        self.mask: torch.Tensor | None
        self.register_buffer("mask", torch.ones(dim) if masked else None)

    @property
    def dim(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (..., C)."""
        if self.mask is None:
            if self.kind == "layernorm":
                return F.layer_norm(x, (self.dim,), self.weight, self.bias, self.eps)
            return F.rms_norm(x, (self.dim,), self.weight, self.eps)
        m = self.mask.to(x.dtype)
        denom = m.sum()
        if self.kind == "layernorm":
            mu = (x * m).sum(-1, keepdim=True) / denom
            xc = x - mu
            var = (xc * xc * m).sum(-1, keepdim=True) / denom
            y = xc * torch.rsqrt(var + self.eps)
        else:
            y = x * torch.rsqrt((x * x * m).sum(-1, keepdim=True) / denom + self.eps)
        y = y * self.weight
        return y + self.bias if self.bias is not None else y


def rope_cache(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables (T, Dh/2) of rotary embeddings (Su et al. 2021), fp32."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    ang = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv)
    return ang.cos().float(), ang.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of the head dim. x: (B, H, T, Dh)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    """Multi-head / grouped-query self-attention with separate q, k, v, o projections."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        c, h, hkv, dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        if hkv is None or dh is None:
            raise GrowthConfigError("TransformerConfig was not resolved (call __post_init__)")
        self.n_heads, self.n_kv_heads, self.head_dim = h, hkv, dh
        self.q = nn.Linear(c, h * dh, bias=cfg.bias)
        self.k = nn.Linear(c, hkv * dh, bias=cfg.bias)
        self.v = nn.Linear(c, hkv * dh, bias=cfg.bias)
        self.o = nn.Linear(h * dh, c, bias=cfg.bias)
        self.causal = cfg.causal
        self.dropout = cfg.dropout

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C). attn_mask: bool (B, 1, 1|T, T), True = attend."""
        B, T, _ = x.shape
        h, hkv, dh = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.q(x).view(B, T, h, dh).transpose(1, 2)  # (B, H, T, Dh)
        k = self.k(x).view(B, T, hkv, dh).transpose(1, 2)  # (B, Hkv, T, Dh)
        v = self.v(x).view(B, T, hkv, dh).transpose(1, 2)  # (B, Hkv, T, Dh)
        if rope is not None:
            cos, sin = rope[0][:T], rope[1][:T]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if hkv != h:  # query head i reads KV head i // (H // Hkv)
            k = k.repeat_interleave(h // hkv, dim=1)  # (B, H, T, Dh)
            v = v.repeat_interleave(h // hkv, dim=1)
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=self.causal and attn_mask is None,
        )  # (B, H, T, Dh)
        return self.o(y.transpose(1, 2).reshape(B, T, h * dh))  # (B, T, C)


class FFN(nn.Module):
    """Position-wise FFN: ``down(gelu(up(x)))`` or SwiGLU ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.kind = cfg.ffn
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        if cfg.ffn == "swiglu":
            self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, T, C)."""
        if self.kind == "swiglu":
            return self.down(F.silu(self.gate(x)) * self.up(x))  # (B, T, F) -> (B, T, C)
        return self.down(F.gelu(self.up(x)))


def moe_ffn(cfg: TransformerConfig, n_experts: int) -> MoEFFN:
    """The MoE layer of a block of ``cfg`` with ``n_experts`` experts of ``cfg.d_ff`` units."""
    return MoEFFN(cfg.d_model, cfg.d_ff, n_experts, top_k=cfg.moe_top_k, gate=cfg.moe_gate,
                  ffn=cfg.ffn, bias=cfg.bias, capacity_factor=cfg.moe_capacity_factor)


class Block(nn.Module):
    """One transformer block with a depth mask ramp.

    pre-LN:  ``b(h) = h + a`` with ``a = attn(norm1(h))``, then ``+ ffn(norm2(.))``
    post-LN: ``b(h) = norm2(g + ffn(g))`` with ``g = norm1(h + attn(h))``
    output:  ``lerp(h, b(h), ramp)`` = ``ramp * b(h) + (1 - ramp) * h``.
    """

    def __init__(self, cfg: TransformerConfig, index: int = 0) -> None:
        super().__init__()
        self.norm_first = cfg.norm_first
        self.norm1 = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.bias, cfg.norm_mask)
        self.attn = Attention(cfg)
        self.norm2 = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.bias, cfg.norm_mask)
        self.ffn: nn.Module = moe_ffn(cfg, cfg.experts_of(index)) if cfg.experts_of(index) \
            else FFN(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.register_buffer("ramp", torch.ones(()))

    def forward(
        self,
        h: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T, C) -> (B, T, C)."""
        if self.norm_first:
            x = h + self.drop(self.attn(self.norm1(h), rope, attn_mask))
            x = x + self.drop(self.ffn(self.norm2(x)))
        else:
            x = self.norm1(h + self.drop(self.attn(h, rope, attn_mask)))
            x = self.norm2(x + self.drop(self.ffn(x)))
        return torch.lerp(h, x, self.ramp.to(h.dtype))


@register_model(TransformerConfig)
class GrowableTransformer(nn.Module):
    """Token ids (B, T) -> logits (B, T, V); see the module docstring for names and hooks."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        # a copy: growth edits the model's config, never the caller's (which may build
        # other models, e.g. baselines)
        self.config = dataclasses.replace(config)
        c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        if c.positions == "learned":
            self.pos_emb = nn.Embedding(c.max_seq_len, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        self.layers = nn.ModuleList([Block(c, i) for i in range(c.n_layers)])
        self.norm_f = Norm(c.d_model, c.norm, c.norm_eps, c.bias, c.norm_mask)
        self.head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def _rope(self, T: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.config.positions != "rope":
            return None
        key = (T, device)
        cached = getattr(self, "_rope_cached", None)
        if cached is None or cached[0] != key or cached[1][0].shape[-1] * 2 != self.head_dim:
            cos, sin = rope_cache(T, self.head_dim, self.config.rope_theta)
            self._rope_cached = (key, (cos.to(device), sin.to(device)))
        return self._rope_cached[1]

    @property
    def head_dim(self) -> int:
        return int(self.config.head_dim or 0)

    def forward(
        self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits of every position.

        Args:
            idx: token ids (B, T), T <= max_seq_len.
            attention_mask: optional (B, T) with 1/True for real tokens, 0/False for padding
                (keys that must not be attended to).

        Returns:
            logits (B, T, V).
        """
        B, T = idx.shape
        if T > self.config.max_seq_len:
            raise GrowthConfigError(
                f"sequence length {T} > max_seq_len {self.config.max_seq_len}"
            )
        h = self.tok_emb(idx)  # (B, T, C)
        if self.config.positions == "learned":
            h = h + self.pos_emb(torch.arange(T, device=idx.device))  # (T, C) broadcast
        h = self.drop(h)
        mask = None
        if attention_mask is not None:
            keep = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
            if self.config.causal:
                tri = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
                keep = keep & tri  # (B, 1, T, T)
            mask = keep
        rope = self._rope(T, idx.device)
        for block in self.layers:
            h = block(h, rope, mask)  # (B, T, C)
        return self.head(self.norm_f(h))  # (B, T, V)

    # ------------------------------------------------------------------ growth helpers
    def set_ramp(self, layer: int, value: float) -> None:
        """Set the depth mask ramp m of block ``layer`` (0 = identity, 1 = full block)."""
        if not 0 <= layer < len(self.layers):
            raise GrowthConfigError(f"layer {layer} out of range [0, {len(self.layers)})")
        if not 0.0 <= value <= 1.0:
            raise GrowthConfigError(f"ramp value must be in [0, 1], got {value}")
        with torch.no_grad():
            self.layers[layer].ramp.fill_(value)

    def ramps(self) -> list[float]:
        """Current ramp value of every block."""
        return [float(b.ramp) for b in self.layers]

    @torch.no_grad()
    def advance_ramps(self, delta: float) -> bool:
        """Move every ramp (block ramps and norm masks) below 1 up by ``delta`` (clamped at 1).

        Call once per step with ``delta = 1 / T`` to ramp new blocks / coordinates in over T
        steps (Yao et al. 2023). Changes the function (that is its purpose).

        Returns:
            True when every ramp and mask is at 1 (nothing left to ramp).
        """
        if delta < 0:
            raise GrowthConfigError(f"delta must be >= 0, got {delta}")
        done = True
        for b in self.layers:
            b.ramp.add_(delta).clamp_(max=1.0)
            done = done and bool(b.ramp >= 1.0)
        for m in self.modules():
            if isinstance(m, Norm) and m.mask is not None:
                m.mask.add_(delta).clamp_(max=1.0)
                done = done and bool((m.mask >= 1.0).all())
        return done

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def moe_loss(self) -> torch.Tensor:
        """The MoE layers' auxiliary losses of the last forward (load balancing, z-loss,
        dynamic-gate penalty; :func:`selfgrow.models.moe.moe_auxiliary_loss`); 0 for a dense
        model. Add it to the training loss."""
        return moe_auxiliary_loss(self)


def tiny_config(**overrides: object) -> TransformerConfig:
    """A very small config for tests and examples (C=16, 2 layers, 4 heads of 4, V=64)."""
    base: dict[str, object] = dict(
        vocab_size=64, d_model=16, n_layers=2, n_heads=4, head_dim=4, d_ff=32, max_seq_len=16
    )
    base.update(overrides)
    return TransformerConfig(**base)  # type: ignore[arg-type]


__all__ = [
    "Attention",
    "moe_ffn",
    "Block",
    "FFN",
    "GrowableTransformer",
    "Norm",
    "TransformerConfig",
    "apply_rope",
    "rope_cache",
    "tiny_config",
]
