"""Synthesise a list of utterances with the eSpeak NG library of ``espeakng-loader``.

Run as a script in a fresh process by :mod:`selfgrow.data.av_digits` (never imported by
selfgrow itself): ``python _espeak_worker.py SPEC.json OUT.npz``. eSpeak NG keeps
wave-generator state (e.g. the pitch-flutter phase) across utterances, and neither
``espeak_Terminate`` nor a new ``espeak_Initialize`` resets it, so an utterance's samples depend
on every utterance synthesised before it in the process. A fresh process that synthesises the
utterances in a fixed order therefore gives byte-for-byte identical waveforms every time, for
voices without breath noise: variants with a ``breath`` line (e.g. ``f2``) differ from one
process to the next, and :mod:`selfgrow.data.av_digits` refuses them.

``SPEC.json`` holds ``{"items": [[text, voice, rate_wpm, pitch], ...]}``; ``OUT.npz`` gets
``samples`` (all waveforms concatenated, int16 at the library's sample rate), ``offsets``
(``(n + 1,)`` int64 boundaries), ``sample_rate`` and ``version`` (the library's version string).
This file imports only the standard library, numpy and ``espeakng_loader``.
"""

from __future__ import annotations

import ctypes
import json
import sys

import numpy as np

AUDIO_OUTPUT_SYNCHRONOUS = 2
ESPEAK_RATE = 1
ESPEAK_PITCH = 3
POS_CHARACTER = 1
ESPEAK_CHARS_UTF8 = 1


def synthesise(items: list[list]) -> tuple[np.ndarray, np.ndarray, int, str]:
    """Synthesise ``items`` (``[text, voice, rate_wpm, pitch]`` each) in order.

    Returns:
        ``(samples, offsets, sample_rate_hz, version)``: int16 samples of every utterance
        concatenated, ``(n + 1,)`` int64 offsets, the sample rate (22,050 Hz) and the library
        version string.

    Raises:
        RuntimeError: the library does not initialise, a voice is unknown, or synthesis fails.
    """
    import espeakng_loader

    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_Info.restype = ctypes.c_char_p
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_Synth.argtypes = [
        ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
        ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
    ]
    data_path = espeakng_loader.get_data_path().encode()
    rate_hz = lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path, 0)
    if rate_hz <= 0:
        raise RuntimeError(f"espeak_Initialize failed (returned {rate_hz})")
    version = (lib.espeak_Info(None) or b"unknown").decode()

    chunks: list[np.ndarray] = []
    callback_type = ctypes.CFUNCTYPE(
        ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

    def on_audio(wav, n, _events):  # noqa: ANN001 - ctypes callback
        if wav and n > 0:
            chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).astype(np.int16, copy=True))
        return 0

    callback = callback_type(on_audio)  # kept alive for the whole synthesis
    lib.espeak_SetSynthCallback(callback)

    waves: list[np.ndarray] = []
    for text, voice, rate, pitch in items:
        if lib.espeak_SetVoiceByName(str(voice).encode()) != 0:
            raise RuntimeError(f"eSpeak NG has no voice {voice!r}")
        lib.espeak_SetParameter(ESPEAK_RATE, int(rate), 0)
        lib.espeak_SetParameter(ESPEAK_PITCH, int(pitch), 0)
        chunks.clear()
        raw = str(text).encode()
        err = lib.espeak_Synth(raw, len(raw) + 1, 0, POS_CHARACTER, 0, ESPEAK_CHARS_UTF8,
                               None, None)
        if err != 0 or lib.espeak_Synchronize() != 0:
            raise RuntimeError(f"espeak_Synth failed on {text!r} with voice {voice!r} ({err})")
        waves.append(np.concatenate(chunks) if chunks else np.zeros(0, np.int16))
    offsets = np.zeros(len(waves) + 1, np.int64)
    offsets[1:] = np.cumsum([len(w) for w in waves])
    samples = np.concatenate(waves) if waves else np.zeros(0, np.int16)
    return samples, offsets, int(rate_hz), version


def main(argv: list[str]) -> int:
    """Entry point: ``argv = [SPEC.json, OUT.npz]``."""
    with open(argv[0], encoding="utf-8") as f:
        spec = json.load(f)
    samples, offsets, rate_hz, version = synthesise(spec["items"])
    with open(argv[1], "wb") as f:
        np.savez(f, samples=samples, offsets=offsets, sample_rate=np.int64(rate_hz),
                 version=np.array(version))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
