"""Sequence-length growth: ``extend_positions`` (L -> L' positions).

Learned absolute position tables ``P: (L, C)`` (selfgrow ``positions="learned"``, HF BERT
``position_embeddings``, HF GPT-2 ``wpe``) become ``(L', C)``: rows ``< L`` are kept bit for
bit and the new rows ``L .. L'-1`` are filled by

* ``"copy_last"``: every new row = ``P[L-1]``;
* ``"interpolate"``: new row p = the old table linearly interpolated at the fractional
  position ``p (L-1) / (L'-1)`` (the whole old table stretched over L' positions, as in
  position interpolation, Chen et al. 2023, but only the NEW rows take these values);
* ``"tile"``: new row p = ``P[p mod L]`` (the old table repeated; Longformer, Beltagy et al.
  2020, initialises its 4096 positions by copying BERT's 512 this way).

EXACT on sequences of length ``<= L``: position t < L reads row t, unchanged, and nothing else
depends on L (causal and padding masks are built from the actual length). Sequences longer
than L are new territory: their outputs are finite but have no "old" value to preserve.

Rotary positions (selfgrow ``positions="rope"``, HF LLaMA with ``rope_type="default"``) have
nothing learned: only the recorded maximum length changes (``max_seq_len`` /
``max_position_embeddings``, and the LLaMA rotary module's cached lengths); the rotation
angles of every position are unchanged, so this is exact for every length. RoPE variants
whose frequencies depend on the maximum length (``linear``, ``dynamic``, ``yarn``,
``llama3``) are refused: extend them through their own scaling settings.

Config and buffers: ``max_seq_len`` (selfgrow), ``max_position_embeddings`` (BERT, LLaMA),
``n_positions`` (GPT-2); BERT's ``position_ids`` (1, L') and ``token_type_ids`` (1, L')
buffers are rebuilt (arange / zeros), so ``position_ids[:, :T]`` works for T up to L'.
``nn.TransformerEncoder`` has no positions of its own (they are added outside the module):
refused with IncompatibleModelError.

Optimizer (decided here): new rows are brand-new coordinates (ParamMap index -1: ``m = 0``,
``v`` = mean of the old rows' ``v``), whatever the fill. They are not copies sharing a
gradient with their source: only sequences longer than L reach them, and there they receive
a gradient of their own, so neither the source row's moments nor a ``1/c`` split describe it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..adapters import AxisMap, TransformerAdapter, get_adapter, resize_params, sync_module_attrs
from ..core import Transaction
from ..errors import GrowthConfigError, IncompatibleModelError, choices_message
from ._registry import GrowthResult, OpConfig, Operator, register_operator

FILL_MODES = ("copy_last", "interpolate", "tile")


@dataclass(frozen=True)
class _Positions:
    """Where one family keeps its positions: learned table (param name) or None (RoPE), the
    config object and attribute recording the maximum length."""

    table: str | None
    cfg: Any
    cfg_attr: str


def _positions(ad: TransformerAdapter) -> _Positions:
    fam = ad.family
    m = ad.model
    if fam == "selfgrow.GrowableTransformer":
        learned = m.config.positions == "learned"
        return _Positions("pos_emb.weight" if learned else None, m.config, "max_seq_len")
    if fam == "transformers.BertModel":
        if getattr(m.config, "position_embedding_type", "absolute") != "absolute":
            raise IncompatibleModelError(
                f"BERT with position_embedding_type={m.config.position_embedding_type!r}: only "
                f"absolute learned positions are supported"
            )
        return _Positions("embeddings.position_embeddings.weight", m.config,
                          "max_position_embeddings")
    if fam == "transformers.GPT2":
        for e in ad.embeddings():
            if e.path.endswith("wpe"):
                return _Positions(e.weight_name, m.config, "n_positions")
    if fam == "transformers.Llama":
        rp = getattr(m.config, "rope_parameters", None) or getattr(m.config, "rope_scaling", None)
        rtype = (rp or {}).get("rope_type", (rp or {}).get("type", "default"))
        if rtype != "default":
            raise IncompatibleModelError(
                f"LLaMA rope_type={rtype!r} depends on max_position_embeddings; extend the "
                f"context through its own scaling settings (only rope_type='default' is "
                f"extended by extend_positions)"
            )
        return _Positions(None, m.config, "max_position_embeddings")
    raise IncompatibleModelError(
        f"{fam} has no position table or length of its own (nn.TransformerEncoder: positions "
        f"are added outside the module; extend them there); extend_positions supports "
        f"selfgrow GrowableTransformer, HF BERT, GPT-2 and LLaMA"
    )


def extend_table(old: torch.Tensor, new_len: int, fill: str) -> torch.Tensor:
    """Rows ``< L`` of ``old (L, C)`` kept, rows ``L .. new_len-1`` filled by ``fill``.

    Returns:
        (new_len, C) tensor, same dtype/device as ``old`` (new rows computed in fp64).
    """
    L = old.shape[0]
    o = old.detach().double()
    p = torch.arange(L, new_len, device=old.device)
    if fill == "copy_last":
        rows = o[L - 1].expand(new_len - L, -1)
    elif fill == "tile":
        rows = o[p % L]
    else:
        x = p.double() * (L - 1) / max(new_len - 1, 1)
        lo = x.floor().long().clamp(max=L - 1)
        hi = (lo + 1).clamp(max=L - 1)
        w = (x - lo.double())[:, None]
        rows = o[lo] * (1 - w) + o[hi] * w
    return torch.cat([old.detach(), rows.to(old.dtype)], dim=0)


@dataclass
class ExtendPositionsConfig(OpConfig):
    """Extend the maximum sequence length to ``new_len``.

    Learned tables keep rows ``< L`` and fill new rows by ``fill`` (``"copy_last"``,
    ``"interpolate"`` or ``"tile"``); RoPE models only record the new length. EXACT on
    sequences of length ``<= L`` (and for RoPE at every length); new rows are brand-new
    coordinates for the optimizer. Sources: Beltagy et al. 2020 (Longformer: copied position
    tables); Chen et al. 2023 (position interpolation); docs/GROWTH-MATH.md, sequence length.
    """

    name: ClassVar[str] = "extend_positions"
    new_len: int = 0
    fill: str = "copy_last"


@register_operator(ExtendPositionsConfig)
class ExtendPositions(Operator):
    exact = True

    def validate(self, model: nn.Module, config: OpConfig) -> None:
        if not isinstance(config, ExtendPositionsConfig):
            raise GrowthConfigError("expected ExtendPositionsConfig")
        if config.fill not in FILL_MODES:
            raise GrowthConfigError(choices_message("fill", config.fill, FILL_MODES))
        ad = get_adapter(model)
        ad.check()
        pos = _positions(ad)
        cur = int(getattr(pos.cfg, pos.cfg_attr))
        n = config.new_len
        if not isinstance(n, int) or isinstance(n, bool) or n <= cur:
            raise GrowthConfigError(
                f"new_len must be an integer > current maximum length {cur}, got {n!r}"
            )
        if pos.table is not None:
            rows = dict(model.named_parameters())[pos.table].shape[0]
            if rows != cur:
                raise IncompatibleModelError(
                    f"{pos.table} has {rows} rows but the config says {cur} positions "
                    f"(config disagrees with modules)"
                )

    def apply(self, model: nn.Module, config: OpConfig, tx: Transaction) -> GrowthResult:
        if not isinstance(config, ExtendPositionsConfig):
            raise GrowthConfigError("expected ExtendPositionsConfig")
        ad = get_adapter(model)
        pos = _positions(ad)
        L, n = int(getattr(pos.cfg, pos.cfg_attr)), config.new_len
        maps = {}
        if pos.table is not None:
            old = dict(model.named_parameters())[pos.table]
            new_table = extend_table(old, n, config.fill)
            index = torch.cat([torch.arange(L), torch.full((n - L,), -1)])

            def fill(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
                     ) -> torch.Tensor:
                return new_table.to(device=device, dtype=dtype)

            maps = resize_params(tx, model, {pos.table: {0: AxisMap(index)}}, fill=fill)
        tx.set_attr(pos.cfg, pos.cfg_attr, n)
        self._buffers(tx, ad, n)
        sync_module_attrs(tx, model)
        return GrowthResult(param_maps=maps, exact=True, notes={
            "max_len": [L, n], "fill": config.fill if pos.table is not None else "rope",
        })

    @staticmethod
    def _buffers(tx: Transaction, ad: TransformerAdapter, n: int) -> None:
        m = ad.model
        if ad.family == "transformers.BertModel":
            emb = m.embeddings
            pid = emb.position_ids
            tx.set_buffer(emb, "position_ids",
                          torch.arange(n, dtype=pid.dtype, device=pid.device).expand((1, -1)))
            if getattr(emb, "token_type_ids", None) is not None:
                tt = emb.token_type_ids
                tx.set_buffer(emb, "token_type_ids",
                              torch.zeros((1, n), dtype=tt.dtype, device=tt.device))
        if ad.family == "transformers.Llama":
            for mod in m.modules():
                for attr in ("max_seq_len_cached", "original_max_seq_len"):
                    if type(mod).__name__.endswith("RotaryEmbedding") and hasattr(mod, attr):
                        tx.set_attr(mod, attr, n)


__all__ = ["FILL_MODES", "ExtendPositionsConfig", "extend_table"]
