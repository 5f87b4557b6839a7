"""Mixture-of-experts FFN layer: a linear router, three gates, vectorised dispatch, routing
statistics.

``MoEFFN`` replaces a dense FFN ``(B, T, C) -> (B, T, C)`` of the reference transformer
(``TransformerConfig.moe_experts``) or works on its own. Expert ``e`` is the dense FFN of the
transformer, ``down_e(act(up_e(x)))`` (GELU) or ``down_e(silu(gate_e(x)) * up_e(x))``
(SwiGLU), stored as stacked tensors so that an expert is one index along dim 0 (experts are
added and removed as real tensors, never as a masked pre-allocated pool)::

    router.weight (E, C)   router.bias (E,)
    w_up   (E, F, C)   b_up   (E, F)
    w_gate (E, F, C)   b_gate (E, F)       ffn == "swiglu" only
    w_down (E, C, F)   b_down (E, C)
    threshold (E,)                         gate == "top_any" only
    k_net.weight (K, C)   k_net.bias (K,)  gate == "dynamic_k" only

with E = experts, C = d_model, F = hidden units per expert, K = ``top_k`` (the largest k).

Routing of a token x (N = tokens in the batch):

* router logits ``l = router(x)`` (N, E), probabilities ``p = softmax(l)`` in fp32;
* a gate selects experts (a 0/1 mask ``s`` (N, E)):

  - ``"topk"``: the ``top_k`` most probable experts (Shazeer et al. 2017; GShard, Lepikhin
    et al. 2021; Switch, Fedus et al. 2022 for k = 1);
  - ``"dynamic_k"``: a linear ``k_net`` predicts k in ``1..top_k`` per token and the k most
    probable experts are selected; k is sampled with the straight-through Gumbel-softmax in
    training and is the argmax in evaluation; ``k_loss`` = mean expected k (the efficiency
    penalty);
  - ``"top_any"`` (DynMoE, Guo et al. 2024): expert e is selected when ``l_e > threshold_e``
    (trainable per-expert thresholds, straight-through sigmoid gradient), so a token may use
    any number of experts; ``k_loss`` = mean soft number of active experts. A token that
    clears no threshold is routed to its best expert ``argmax(l - threshold)``, the SAME rule
    in training and evaluation (DynMoE gives it a zero output in training and top-1 in
    evaluation, which makes the two modes disagree);

* weights ``w = p * s / sum(p * s)``: the selected experts' probabilities renormalised to sum
  to 1 (Mixtral-style), so a mixture of identical experts is exactly that expert (upcycling
  is exact); output ``y = sum_e w_e expert_e(x)``. For a token with a single selected
  expert the weight is 1 whatever its probability, which would leave the router without
  gradient (top-1): there the normaliser is held constant in the backward pass (the value is
  unchanged; the router gets Switch's gradient ``dp / p``);
* optional expert capacity (``capacity_factor``): each expert takes at most
  ``ceil(capacity_factor * A / E)`` of the A token-expert assignments of the batch, in token
  order; an assignment over capacity is dropped (weight 0, the token keeps its residual).
  The default ``None`` is dropless.

Dispatch is vectorised: the (token, expert) assignments are sorted by expert, the tokens
gathered once, each expert runs ONE batched matmul on its contiguous slice (a loop over the E
experts, never over tokens), and the weighted results are scattered back with one
``index_add_``. :func:`moe_reference_forward` is the per-token reference the tests compare
with.

Auxiliary losses of the last forward (add ``MoEFFN.loss()`` or
:func:`moe_auxiliary_loss` to the training loss):

* ``aux_loss``: Switch / GShard load balancing ``E * sum_e f_e * P_e`` with ``f_e`` the
  fraction of assignments routed to e and ``P_e`` the mean router probability (1 at uniform);
* ``z_loss``: router z-loss ``mean(logsumexp(l)^2)`` (ST-MoE, Zoph et al. 2022);
* ``k_loss``: the dynamic gates' efficiency penalty (0 for ``"topk"``).

Routing statistics (detached, counted in every forward, training and evaluation):
:meth:`MoEFFN.routing_stats` (the ``ExpertOverload`` signal's input: per-expert load fraction,
mean active k, histogram of active k, dropped fraction) and per-experience statistics under a
tag (:func:`set_routing_tag`, :func:`routing_stats_by_tag`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core import in_measurement
from ..errors import GrowthConfigError, choices_message

GATES = ("topk", "dynamic_k", "top_any")
EXPERT_FFNS = ("gelu", "swiglu")


def _number(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def _pos_int(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise GrowthConfigError(f"{name}={v!r} is out of range; valid: an integer >= 1")
    return v


def check_moe_args(
    n_experts: Any, top_k: Any, gate: Any, capacity_factor: Any, ffn: Any = "gelu"
) -> None:
    """Validate MoE settings (shared by :class:`MoEFFN` and ``TransformerConfig``).

    Raises:
        GrowthConfigError: naming the bad value and the valid choices.
    """
    _pos_int("n_experts", n_experts)
    _pos_int("top_k", top_k)
    if gate not in GATES:
        raise GrowthConfigError(choices_message("MoE gate", gate, GATES))
    if ffn not in EXPERT_FFNS:
        raise GrowthConfigError(choices_message("expert ffn", ffn, EXPERT_FFNS))
    if gate != "top_any" and top_k > n_experts:
        raise GrowthConfigError(
            f"top_k={top_k} > n_experts={n_experts}; valid: 1..{n_experts}")
    if capacity_factor is not None and (not _number(capacity_factor) or capacity_factor <= 0):
        raise GrowthConfigError(f"capacity_factor={capacity_factor!r} is out of range; valid: "
                                f"None (dropless) or a number > 0")


class MoEFFN(nn.Module):
    """Mixture-of-experts FFN ``(..., C) -> (..., C)``; see the module docstring.

    Args:
        d_model: C.
        d_ff: F, hidden units of each expert.
        n_experts: E >= 1.
        top_k: k of ``"topk"``; the largest k of ``"dynamic_k"``; unused by ``"top_any"``.
        gate: ``"topk"``, ``"dynamic_k"`` or ``"top_any"``.
        ffn: expert activation, ``"gelu"`` or ``"swiglu"``.
        bias: biases in the experts (the router always has one).
        capacity_factor: None (dropless, default) or > 0.
        aux_weight, z_weight, k_weight: weights of the auxiliary losses in :meth:`loss`
            (defaults: Switch's 0.01, ST-MoE's 0.001, 0.01).
        gumbel_tau: temperature of the dynamic-k Gumbel-softmax.
        threshold_tau: temperature of top-any's straight-through sigmoid.
        init_std: std of the normal init of every weight (biases and thresholds 0).

    Raises:
        GrowthConfigError: any argument out of range (see :func:`check_moe_args`).
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        n_experts: int,
        top_k: int = 2,
        gate: str = "topk",
        *,
        ffn: str = "gelu",
        bias: bool = True,
        capacity_factor: float | None = None,
        aux_weight: float = 0.01,
        z_weight: float = 0.001,
        k_weight: float = 0.01,
        gumbel_tau: float = 1.0,
        threshold_tau: float = 1.0,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        _pos_int("d_model", d_model)
        _pos_int("d_ff", d_ff)
        check_moe_args(n_experts, top_k, gate, capacity_factor, ffn)
        for name, v in (("aux_weight", aux_weight), ("z_weight", z_weight),
                        ("k_weight", k_weight), ("init_std", init_std)):
            if not _number(v) or v < 0:
                raise GrowthConfigError(f"{name}={v!r} is out of range; valid: a number >= 0")
        for name, v in (("gumbel_tau", gumbel_tau), ("threshold_tau", threshold_tau)):
            if not _number(v) or v <= 0:
                raise GrowthConfigError(f"{name}={v!r} is out of range; valid: a number > 0")
        E, C, Fh = n_experts, d_model, d_ff
        self.gate_kind = gate
        self.kind = ffn
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.aux_weight, self.z_weight, self.k_weight = aux_weight, z_weight, k_weight
        self.gumbel_tau, self.threshold_tau = gumbel_tau, threshold_tau
        std = init_std
        self.router = nn.Linear(C, E)
        nn.init.normal_(self.router.weight, std=std)
        nn.init.zeros_(self.router.bias)
        self.w_up = nn.Parameter(torch.randn(E, Fh, C) * std)
        self.w_gate = nn.Parameter(torch.randn(E, Fh, C) * std) if ffn == "swiglu" else None
        self.w_down = nn.Parameter(torch.randn(E, C, Fh) * std)
        self.b_up = nn.Parameter(torch.zeros(E, Fh)) if bias else None
        self.b_gate = nn.Parameter(torch.zeros(E, Fh)) if bias and ffn == "swiglu" else None
        self.b_down = nn.Parameter(torch.zeros(E, C)) if bias else None
        self.threshold = nn.Parameter(torch.zeros(E)) if gate == "top_any" else None
        if gate == "dynamic_k":
            self.k_net: nn.Linear | None = nn.Linear(C, top_k)
            nn.init.normal_(self.k_net.weight, std=std)
            nn.init.zeros_(self.k_net.bias)
        else:
            self.k_net = None
        self.aux_loss: torch.Tensor | None = None
        self.z_loss: torch.Tensor | None = None
        self.k_loss: torch.Tensor | None = None
        self.stats_tag: str | None = None
        self._window = _StatsSum(E)
        self._last_read: dict[str, Any] | None = None
        self._tagged: dict[str, _StatsSum] = {}

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles leave out the last forward's losses (graph tensors that
        ``copy.deepcopy`` refuses, and that belong to that forward only)."""
        state = self.__dict__.copy()
        state["aux_loss"] = state["z_loss"] = state["k_loss"] = None
        return state

    # ------------------------------------------------------------------ shapes
    @property
    def n_experts(self) -> int:
        return int(self.w_up.shape[0])

    @property
    def d_ff(self) -> int:
        return int(self.w_up.shape[1])

    @property
    def d_model(self) -> int:
        return int(self.w_up.shape[2])

    def expert_params(self) -> dict[str, nn.Parameter]:
        """``{attribute: parameter}`` of every stacked expert tensor (dim 0 = expert)."""
        out = {}
        for n in ("w_up", "w_gate", "w_down", "b_up", "b_gate", "b_down"):
            p = getattr(self, n)
            if p is not None:
                out[n] = p
        return out

    # ------------------------------------------------------------------ routing
    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gate a flat batch ``x`` (N, C).

        Returns:
            ``(logits (N, E) fp32, weights (N, E) fp32, selected (N, E) bool)``: weights are
            zero outside the selection, sum to 1 over it, and carry the gate's gradients;
            capacity is not applied yet.
        """
        logits, _, w, selected = self._route(x)
        return logits, w, selected

    def _route(self, x: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`route` plus the router probabilities (N, E) (reused by the losses)."""
        logits = self.router(x)  # (N, E), routed in fp32 at least (fp64 models in fp64)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        probs = logits.softmax(-1)
        E = logits.shape[-1]
        if self.gate_kind == "topk":
            idx = probs.topk(self.top_k, dim=-1).indices  # (N, k)
            sel = torch.zeros_like(probs).scatter_(1, idx, 1.0)
            self.k_loss = None
        elif self.k_net is not None:  # dynamic_k
            K = min(self.top_k, E)
            kl = self.k_net(x).to(logits.dtype)[:, :K]  # (N, K): k = 1..K
            if self.training:
                onehot = F.gumbel_softmax(kl, tau=self.gumbel_tau, hard=True)
            else:
                onehot = F.one_hot(kl.argmax(-1), K).to(kl.dtype)
            active = onehot.flip(-1).cumsum(-1).flip(-1)  # (N, K): rank r active iff k > r
            idx = probs.topk(K, dim=-1).indices
            sel = torch.zeros_like(probs).scatter(1, idx, active)
            ks = torch.arange(1, K + 1, dtype=kl.dtype, device=kl.device)
            self.k_loss = (kl.softmax(-1) * ks).sum(-1).mean()
        elif self.threshold is not None:  # top_any
            margin = logits - self.threshold.to(logits.dtype)  # (N, E)
            hard = margin > 0
            none = ~hard.any(-1)
            if bool(none.any()):  # the same fallback in training and evaluation: top-1
                hard = hard.clone()
                hard[none, margin[none].argmax(-1)] = True
            soft = torch.sigmoid(margin / self.threshold_tau)
            sel = hard.to(soft.dtype) + soft - soft.detach()
            self.k_loss = soft.sum(-1).mean()
        else:
            raise GrowthConfigError(f"MoEFFN gate {self.gate_kind!r} is missing its "
                                    f"parameters (k_net / threshold); rebuild the layer")
        sd = sel.detach()
        # a token whose gate is NaN (non-finite input) goes to every expert, so the NaN
        # reaches its output instead of silently becoming a zero (no expert selected)
        selected = (sd > 0.5) | sd.isnan() | probs.detach().isnan()
        w = probs * sel  # every token selects >= 1 expert and p > 0: the sum is > 0
        denom = w.sum(-1, keepdim=True)
        # a token with ONE expert has weight p / p = 1 whatever p is, so the renormalised
        # weight gives its router no gradient: there the normaliser is a constant in the
        # backward pass (value unchanged, Switch's gradient dp / p)
        single = selected.sum(-1, keepdim=True) == 1
        denom = torch.where(single, denom.detach(), denom)
        return logits, probs, w / denom, selected

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (..., C)."""
        shape = x.shape
        if shape[-1] != self.d_model:
            raise GrowthConfigError(f"MoEFFN expects inputs (..., {self.d_model}), got "
                                    f"{tuple(shape)}")
        xf = x.reshape(-1, shape[-1])  # (N, C)
        N, E = xf.shape[0], self.n_experts
        if N == 0:  # no token: zero losses (still connected to the router), nothing counted
            zero = self.router.weight.sum() * 0.0
            self.aux_loss, self.z_loss = zero, zero
            self.k_loss = zero if self.gate_kind != "topk" else None
            return x.new_zeros(shape)
        logits, probs, w, selected = self._route(xf)
        tok, exp = selected.nonzero(as_tuple=True)  # (A,), token-major order
        dropped = 0
        if self.capacity_factor is not None and tok.numel():
            cap = max(1, math.ceil(self.capacity_factor * tok.numel() / E))
            sel_i = selected.long()
            pos = (sel_i.cumsum(0) - 1)[tok, exp]  # position of each assignment in its expert
            keep = pos < cap
            dropped = int((~keep).sum())
            tok, exp = tok[keep], exp[keep]
        counts = torch.bincount(exp, minlength=E)  # (E,) assignments per expert, once
        y = self._dispatch(xf, w, tok, exp, counts)
        self._losses(logits, probs, counts)
        self._record(selected, counts, N, dropped)
        return y.reshape(shape)

    def _dispatch(self, xf: torch.Tensor, w: torch.Tensor, tok: torch.Tensor,
                  exp: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Sorted-by-expert dispatch: one batched FFN per expert over its slice."""
        order = torch.argsort(exp, stable=True)
        tok_s, exp_s = tok[order], exp[order]
        xs = xf.index_select(0, tok_s)  # (A, C)
        outs = []
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                outs.append(self.expert_forward(e, xs[start:start + n]))
            start += n
        if not outs:
            return torch.zeros_like(xf)
        ys = torch.cat(outs, 0)  # (A, C)
        ws = w[tok_s, exp_s].to(ys.dtype)[:, None]
        # the experts' dtype (bf16 under autocast, like a dense nn.Linear FFN), not x's
        out = ys.new_zeros(xf.shape)
        return out.index_add(0, tok_s, ys * ws)

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e``'s FFN on ``x`` (M, C) -> (M, C)."""
        h = x @ self.w_up[e].t()
        if self.b_up is not None:
            h = h + self.b_up[e]
        if self.w_gate is not None:  # swiglu
            g = x @ self.w_gate[e].t()
            if self.b_gate is not None:
                g = g + self.b_gate[e]
            h = F.silu(g) * h
        else:
            h = F.gelu(h)
        y = h @ self.w_down[e].t()
        return y + self.b_down[e] if self.b_down is not None else y

    def _losses(self, logits: torch.Tensor, probs: torch.Tensor, counts: torch.Tensor) -> None:
        E = logits.shape[-1]
        f = counts.to(probs.dtype) / counts.sum().clamp_min(1)
        self.aux_loss = E * (f * probs.mean(0)).sum()
        self.z_loss = torch.logsumexp(logits, -1).pow(2).mean()

    def loss(self) -> torch.Tensor:
        """``aux_weight * aux_loss + z_weight * z_loss + k_weight * k_loss`` of the last
        forward (a scalar with gradients; 0 before the first forward)."""
        if self.aux_loss is None or self.z_loss is None:
            return self.router.weight.new_zeros(())
        total = self.aux_weight * self.aux_loss + self.z_weight * self.z_loss
        if self.k_loss is not None:
            total = total + self.k_weight * self.k_loss
        return total

    # ------------------------------------------------------------------ statistics
    @torch.no_grad()
    def _record(self, selected: torch.Tensor, counts: torch.Tensor, N: int, dropped: int
                ) -> None:
        if in_measurement():  # grow_'s probe, a FLOP count: not training or evaluation data
            return
        counts = counts.detach().cpu()
        k_hist = torch.bincount(selected.sum(-1).cpu(), minlength=self.n_experts + 1)
        sums = [self._window]
        if self.stats_tag is not None:
            sums.append(self._tagged.setdefault(self.stats_tag, _StatsSum(self.n_experts)))
        for s in sums:
            s.add(counts, k_hist, N, dropped)

    def routing_stats(self, reset: bool = True) -> dict[str, Any]:
        """Routing statistics of the forwards since the previous read (``reset=True``, what
        the ``ExpertOverload`` signal calls once per controller update); when nothing ran
        since, the previous read again.

        Returns:
            ``{"load": Tensor (E,) fraction of assignments per expert (sums to 1),
            "active_k": mean experts per token, "max_k": the gate's k (E for top-any),
            "k_hist": Tensor (E + 1,) tokens per number of active experts,
            "tokens": tokens seen, "dropped": fraction of assignments over capacity}``.
        """
        if self._window.tokens == 0 and self._last_read is not None:
            return dict(self._last_read)
        out = self._window.summary(self.max_k)
        if reset:
            self._last_read = out
            self._window = _StatsSum(self.n_experts)
        return out

    @property
    def max_k(self) -> int:
        return self.n_experts if self.gate_kind == "top_any" else min(self.top_k,
                                                                     self.n_experts)

    def tagged_stats(self) -> dict[str, dict[str, Any]]:
        """``{tag: routing statistics}`` accumulated under each :attr:`stats_tag`."""
        return {t: s.summary(self.max_k) for t, s in self._tagged.items()}

    def reset_stats(self) -> None:
        """Forget the window, the last read and every tag's statistics."""
        self._window = _StatsSum(self.n_experts)
        self._last_read = None
        self._tagged = {}

    def extra_repr(self) -> str:
        cap = "dropless" if self.capacity_factor is None else f"capacity={self.capacity_factor}"
        return (f"d_model={self.d_model}, d_ff={self.d_ff}, n_experts={self.n_experts}, "
                f"gate={self.gate_kind}, top_k={self.top_k}, ffn={self.kind}, {cap}")


class _StatsSum:
    """Running sums of routing counts (CPU tensors)."""

    def __init__(self, n_experts: int) -> None:
        self.counts = torch.zeros(n_experts, dtype=torch.long, device="cpu")
        self.k_hist = torch.zeros(n_experts + 1, dtype=torch.long, device="cpu")
        self.tokens = 0
        self.dropped = 0

    def add(self, counts: torch.Tensor, k_hist: torch.Tensor, n: int, dropped: int) -> None:
        if counts.numel() != self.counts.numel():  # the layer gained or lost experts
            self.__init__(counts.numel())  # type: ignore[misc]
        self.counts += counts
        self.k_hist += k_hist[: self.k_hist.numel()]
        self.tokens += n
        self.dropped += dropped

    def remapped(self, index: torch.Tensor) -> _StatsSum:
        """A copy re-indexed to new experts: new expert ``n`` takes old expert
        ``index[n]``'s count (0 where ``index[n] = -1``, a brand-new expert)."""
        idx = torch.as_tensor(index, dtype=torch.long).cpu()
        out = _StatsSum(int(idx.numel()))
        out.counts = torch.where(idx >= 0, self.counts[idx.clamp(min=0)], 0)
        n = min(out.k_hist.numel(), self.k_hist.numel())
        out.k_hist[:n] = self.k_hist[:n]
        out.k_hist[n - 1] += self.k_hist[n:].sum()
        out.tokens, out.dropped = self.tokens, self.dropped
        return out

    def summary(self, max_k: int) -> dict[str, Any]:
        assigned = int((self.k_hist * torch.arange(self.k_hist.numel())).sum())
        total = int(self.counts.sum())
        load = (self.counts.double() / total if total else
                torch.full((self.counts.numel(),), 1.0 / max(self.counts.numel(), 1),
                           dtype=torch.float64))
        return {
            "load": load,
            "active_k": assigned / self.tokens if self.tokens else 0.0,
            "max_k": max_k,
            "k_hist": self.k_hist.clone(),
            "tokens": self.tokens,
            "dropped": self.dropped / assigned if assigned else 0.0,
        }


# ---------------------------------------------------------------------------------------------
# model-level helpers
# ---------------------------------------------------------------------------------------------
def moe_layers(model: nn.Module) -> dict[str, MoEFFN]:
    """``{module name: MoEFFN}`` of every MoE layer of ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MoEFFN)}


def moe_auxiliary_loss(model: nn.Module) -> torch.Tensor:
    """Sum of :meth:`MoEFFN.loss` over the model's MoE layers (0 without any)."""
    layers = list(moe_layers(model).values())
    if not layers:
        p = next(model.parameters(), None)
        return torch.zeros(()) if p is None else p.new_zeros(())
    return sum((m.loss() for m in layers[1:]), layers[0].loss())


def set_routing_tag(model: nn.Module, tag: str | None) -> None:
    """Count the following forwards of every MoE layer under ``tag`` (e.g. ``"exp3"``, one
    tag per experience / task); None stops tagging.

    Raises:
        GrowthConfigError: ``tag`` not a string or None.
    """
    if tag is not None and not isinstance(tag, str):
        raise GrowthConfigError(f"routing tag must be a string or None, got {tag!r}")
    for m in moe_layers(model).values():
        m.stats_tag = tag


def routing_stats_by_tag(model: nn.Module) -> dict[str, dict[str, dict[str, Any]]]:
    """``{tag: {layer name: routing statistics}}`` (see :meth:`MoEFFN.routing_stats`)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name, m in moe_layers(model).items():
        for tag, st in m.tagged_stats().items():
            out.setdefault(tag, {})[name] = st
    return out


def routing_scalars(model: nn.Module, reset: bool = False) -> dict[str, float]:
    """Flat ``{"moe/<layer>/load_max": ..., ".../active_k", ".../entropy", ".../dropped"}``
    of the current window, for TensorBoard / metrics (``reset=False`` leaves the window to
    the ``ExpertOverload`` signal)."""
    out: dict[str, float] = {}
    for name, m in moe_layers(model).items():
        st = m.routing_stats(reset=reset)
        load = st["load"].clamp_min(1e-30)
        n = load.numel()
        ent = float(-(st["load"] * load.log()).sum()) / math.log(n) if n > 1 else 1.0
        out[f"moe/{name}/load_max"] = float(st["load"].max())
        out[f"moe/{name}/active_k"] = float(st["active_k"])
        out[f"moe/{name}/entropy"] = ent
        out[f"moe/{name}/dropped"] = float(st["dropped"])
    return out


@torch.no_grad()
def moe_reference_forward(layer: MoEFFN, x: torch.Tensor) -> torch.Tensor:
    """Per-token reference of :meth:`MoEFFN.forward` (a Python loop over tokens and their
    experts; for tests only). Uses the layer's own gate (call it in eval mode, or with the
    same RNG state for dynamic-k training), dropless only.

    Raises:
        GrowthConfigError: a layer with a capacity factor.
    """
    if layer.capacity_factor is not None:
        raise GrowthConfigError("moe_reference_forward is dropless only")
    xf = x.reshape(-1, x.shape[-1])
    _, w, selected = layer.route(xf)
    out = torch.zeros_like(xf)
    for i in range(xf.shape[0]):
        for e in selected[i].nonzero().flatten().tolist():
            out[i] += w[i, e].to(xf.dtype) * layer.expert_forward(e, xf[i:i + 1])[0]
    return out.reshape(x.shape)


__all__ = [
    "EXPERT_FFNS",
    "GATES",
    "MoEFFN",
    "check_moe_args",
    "moe_auxiliary_loss",
    "moe_layers",
    "moe_reference_forward",
    "routing_scalars",
    "routing_stats_by_tag",
    "set_routing_tag",
]
