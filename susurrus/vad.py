"""Voice activity detection with Silero VAD, to decode only the parts of a recording with speech.

`speech_regions` finds speech on the original time line; `clip_timestamps_for` turns the regions
into the `clip_timestamps` list that `transcribe` accepts, so segment times stay absolute.
"""

from __future__ import annotations

import functools
import threading
import warnings
from typing import Any

import numpy as np
import torch

from .errors import SusurrusError
from .features import SAMPLE_RATE

# Defaults tuned for feeding Whisper rather than for tight speech boundaries:
# - Whisper decodes 30 s windows and every clip costs at least one window, so only silences long
#   enough to be worth skipping (and long enough to invite hallucinations) split a region.
# - Generous padding keeps word onsets and trailing consonants that the VAD scores as silence.
DEFAULT_THRESHOLD = 0.5
DEFAULT_MIN_SPEECH_MS = 250
DEFAULT_MIN_SILENCE_MS = 2000
DEFAULT_SPEECH_PAD_MS = 400

# Silero's own silence hysteresis before a region closes (its default).
_SILERO_MIN_SILENCE_MS = 100

_lock = threading.Lock()


@functools.cache
def _load_model() -> Any:
    try:
        # silero_vad sets torch's global thread count to 1 on import; keep the caller's setting.
        threads = torch.get_num_threads()
        try:
            from silero_vad import get_speech_timestamps, load_silero_vad
        finally:
            torch.set_num_threads(threads)
    except ImportError as e:
        raise SusurrusError(
            "voice activity detection needs the silero-vad package: pip install silero-vad"
        ) from e
    try:
        # The TorchScript model ships inside the package: no download. Its loader trips
        # DeprecationWarnings (importlib.resources.path, torch.jit.load) that the CLI would show.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            model = load_silero_vad()
    except Exception as e:  # any failure here means a broken install
        raise SusurrusError(f"could not load the Silero VAD model: {e}") from e
    return model, get_speech_timestamps


def ensure_available() -> None:
    """Load the Silero model now; SusurrusError when the package is missing or broken."""
    _load_model()


def speech_regions(
    audio: np.ndarray | torch.Tensor,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    min_speech_ms: int = DEFAULT_MIN_SPEECH_MS,
    min_silence_ms: int = DEFAULT_MIN_SILENCE_MS,
    speech_pad_ms: int = DEFAULT_SPEECH_PAD_MS,
) -> list[tuple[float, float]]:
    """Speech regions of 16 kHz mono `audio` as sorted, disjoint (start, end) pairs in seconds.

    `threshold`: speech probability above which a 32 ms frame counts as speech.
    `min_speech_ms`: shorter bursts (clicks, coughs) are dropped.
    `min_silence_ms`: pauses shorter than this are bridged, so they stay inside one region.
    `speech_pad_ms`: each region is then widened by this much on both sides (clamped to the
    audio; regions that then touch or overlap are merged).
    Even with min_silence_ms=0, silero needs 100 ms below its threshold to end a region.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be between 0 and 1, got {threshold}")
    if min(min_speech_ms, min_silence_ms, speech_pad_ms) < 0:
        raise ValueError("min_speech_ms, min_silence_ms and speech_pad_ms must not be negative")
    samples = torch.as_tensor(audio).detach().to("cpu", torch.float32)
    if samples.ndim != 1:
        raise SusurrusError(
            f"voice activity detection needs mono audio, got shape {tuple(samples.shape)}"
        )
    if samples.numel() == 0:
        return []
    model, get_speech_timestamps = _load_model()
    # The model carries recurrent state between frames, so one caller at a time. (Torch's
    # thread count is left alone: it is the whole process's, and other threads may be
    # decoding.)
    with _lock:
        found = get_speech_timestamps(
            samples,
            model,
            threshold=threshold,
            sampling_rate=SAMPLE_RATE,
            min_speech_duration_ms=min_speech_ms,
            # Short hysteresis only: gaps are bridged and padded below, because silero keeps
            # a region open to the end of the audio when the final silence is shorter than
            # its min_silence, which would swallow trailing silence.
            min_silence_duration_ms=_SILERO_MIN_SILENCE_MS,
            speech_pad_ms=0,
        )
    raw = [(r["start"] / SAMPLE_RATE, r["end"] / SAMPLE_RATE) for r in found]
    duration = samples.numel() / SAMPLE_RATE
    return _merge(raw, min_silence_ms / 1000.0, speech_pad_ms / 1000.0, duration)


def _merge(
    regions: list[tuple[float, float]], max_gap: float, pad: float, duration: float
) -> list[tuple[float, float]]:
    """Bridge gaps shorter than max_gap, pad by pad, clamp to [0, duration], merge overlaps."""
    bridged: list[tuple[float, float]] = []
    for start, end in sorted(regions):
        if bridged and start - bridged[-1][1] < max_gap:
            bridged[-1] = (bridged[-1][0], max(bridged[-1][1], end))
        else:
            bridged.append((start, end))
    merged: list[tuple[float, float]] = []
    for start, end in bridged:
        start, end = max(0.0, start - pad), min(duration, end + pad)
        if end <= start:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    # Millisecond precision is plenty, and keeps the numbers readable in logs and clip lists.
    return [(round(s, 3), round(e, 3)) for s, e in merged]


def clip_timestamps_for(regions: list[tuple[float, float]]) -> list[float]:
    """[start, end, start, end, ...] in seconds, the `clip_timestamps` form of `transcribe`.

    An empty list means no speech: `transcribe` reads an empty clip list as the whole recording,
    so the caller must skip decoding instead of passing it on.
    """
    return [float(t) for region in regions for t in region]
