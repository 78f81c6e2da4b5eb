"""Voice activity detection: speech regions on real recordings, none on silence, noise and tones."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch

from susurrus import vad
from susurrus.errors import SusurrusError

from .conftest import AUDIO, requires_shared

requires_silero = pytest.mark.skipif(
    importlib.util.find_spec("silero_vad") is None, reason="silero-vad is not installed"
)

SR = 16_000
MINUTE = 60 * SR


def _load(name: str) -> np.ndarray:
    from susurrus import load_audio

    return load_audio(str(AUDIO / name))


def _total(regions: list[tuple[float, float]]) -> float:
    return sum(end - start for start, end in regions)


def _assert_well_formed(regions: list[tuple[float, float]], duration: float) -> None:
    previous_end = -1.0
    for start, end in regions:
        assert 0.0 <= start < end <= duration + 1e-6
        assert start > previous_end
        previous_end = end


def _notes(seed: int, note_s: float = 0.5) -> np.ndarray:
    """Melody of plucked notes with three harmonics: an onset and a decay every note_s."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(note_s * SR)) / SR
    envelope = np.minimum(1.0, t / 0.01) * np.exp(-2.0 * t)
    notes = []
    for _ in range(MINUTE // len(t) + 1):
        f = 440.0 * 2 ** ((rng.integers(48, 84) - 69) / 12)
        tone = sum(np.sin(2 * np.pi * f * k * t) / k for k in (1, 2, 3))
        notes.append(0.3 * envelope * tone / 1.8)
    return np.concatenate(notes)[:MINUTE].astype(np.float32)


def _chords(seed: int) -> np.ndarray:
    """Sustained three-note chords of pure sinusoids, changing every second."""
    rng = np.random.default_rng(seed)
    t = np.arange(SR) / SR
    chords = []
    for _ in range(60):
        freqs = 440.0 * 2 ** ((rng.integers(45, 80, 3) - 69) / 12)
        chords.append(0.2 * sum(np.sin(2 * np.pi * f * t) for f in freqs) / 3)
    return np.concatenate(chords).astype(np.float32)


# --- pure helpers (no model) ---


def test_merge_bridges_pads_clamps() -> None:
    raw = [(5.0, 6.0), (0.2, 1.0), (1.5, 2.0), (9.8, 9.9)]
    # 1.0 -> 1.5 is bridged (gap < 2 s); 2.0 -> 5.0 is not; padding clamps to [0, 10].
    assert vad._merge(raw, 2.0, 0.4, 10.0) == [(0.0, 2.4), (4.6, 6.4), (9.4, 10.0)]
    # Padding alone can make neighbours overlap: they merge.
    assert vad._merge([(1.0, 2.0), (2.5, 3.0)], 0.1, 0.4, 10.0) == [(0.6, 3.4)]
    assert vad._merge([], 2.0, 0.4, 10.0) == []


def test_clip_timestamps_for() -> None:
    assert vad.clip_timestamps_for([(0.5, 2.25), (7.0, 9.5)]) == [0.5, 2.25, 7.0, 9.5]
    assert vad.clip_timestamps_for([]) == []


def test_bad_input() -> None:
    assert vad.speech_regions(np.zeros(0, np.float32)) == []
    with pytest.raises(SusurrusError, match="mono"):
        vad.speech_regions(np.zeros((2, SR), np.float32))
    with pytest.raises(ValueError):
        vad.speech_regions(np.zeros(SR, np.float32), threshold=1.5)


def test_missing_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    vad._load_model.cache_clear()
    monkeypatch.setitem(sys.modules, "silero_vad", None)  # makes the import fail
    try:
        with pytest.raises(SusurrusError, match="pip install silero-vad"):
            vad.speech_regions(np.zeros(SR, np.float32))
    finally:
        vad._load_model.cache_clear()


# --- the model on real speech ---


@requires_shared
@requires_silero
def test_jfk_regions_cover_the_speech() -> None:
    audio = _load("jfk.flac")
    duration = len(audio) / SR
    regions = vad.speech_regions(audio)
    _assert_well_formed(regions, duration)
    # One region (the pauses are all under 2 s) spanning the speech, ~0.35 s to ~10.6 s.
    assert len(regions) == 1
    start, end = regions[0]
    assert start <= 0.3 and end >= 10.6

    # Tight settings expose the pauses between the four phrases.
    tight = vad.speech_regions(torch.from_numpy(audio), min_silence_ms=100, speech_pad_ms=0)
    _assert_well_formed(tight, duration)
    assert len(tight) == 4
    assert 0.2 <= tight[0][0] <= 0.5
    assert 10.4 <= tight[-1][1] <= 10.8


@requires_shared
@requires_silero
def test_trailing_silence_is_left_out() -> None:
    # Speech ends with "thanks" at ~25.3 s; the last ~1.4 s is room noise.
    audio = _load("en_mfa_acoustic_corpus.flac")
    duration = len(audio) / SR
    regions = vad.speech_regions(audio)
    _assert_well_formed(regions, duration)
    assert regions[0][0] <= 1.0  # first words at ~1.1 s
    assert 25.3 <= regions[-1][1] <= duration - 0.8
    raw = vad.speech_regions(audio, min_silence_ms=0, speech_pad_ms=0)
    assert 25.0 <= raw[-1][1] <= 25.6


@requires_shared
@requires_silero
def test_regions_stay_on_the_original_time_line() -> None:
    speech = _load("jfk.flac")
    silence = np.zeros(20 * SR, np.float32)
    audio = np.concatenate([silence, speech, silence, speech, silence[: 5 * SR]])
    regions = vad.speech_regions(audio)
    _assert_well_formed(regions, len(audio) / SR)
    offset = 20 + len(speech) / SR + 20
    assert len(regions) == 2
    assert regions[0][0] == pytest.approx(20 + 0.35 - 0.4, abs=0.15)
    assert regions[0][1] == pytest.approx(20 + 10.6 + 0.4, abs=0.15)
    assert regions[1][0] == pytest.approx(offset + 0.35 - 0.4, abs=0.15)
    assert regions[1][1] == pytest.approx(offset + 10.6 + 0.4, abs=0.15)
    clips = vad.clip_timestamps_for(regions)
    assert clips == [regions[0][0], regions[0][1], regions[1][0], regions[1][1]]


# --- the model on a minute of non-speech ---


@requires_silero
def test_no_regions_in_silence_and_noise() -> None:
    rng = np.random.default_rng(0)
    assert vad.speech_regions(np.zeros(MINUTE, np.float32)) == []
    for level in (0.01, 0.1):  # -40 dBFS and -20 dBFS RMS white noise
        noise = (level * rng.standard_normal(MINUTE)).astype(np.float32)
        assert vad.speech_regions(noise) == []


@requires_silero
def test_tones() -> None:
    # Sustained pure-tone chords: never speech.
    assert vad.speech_regions(_chords(4)) == []
    # Plucked harmonic notes: silero 6 scores a few onsets as speech (probability up to ~0.98)
    # and reports brief bursts, mostly in the first seconds while its recurrent state settles.
    # They stay short and rare: decoding them costs one window and no_speech_threshold drops them.
    raw = vad.speech_regions(_notes(1), min_silence_ms=0, speech_pad_ms=0)
    assert all(end - start < 1.5 for start, end in raw)
    assert _total(raw) < 0.05 * 60
    regions = vad.speech_regions(_notes(1))
    assert _total(regions) < 0.1 * 60


@requires_silero
def test_thread_setting_is_restored() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        vad.speech_regions(np.zeros(SR, np.float32))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# --- transcription with --vad ---


@requires_silero
def test_vad_transcript_keeps_the_original_time_line(tiny_en) -> None:
    """Speech after 12 s of noise: decoded from the speech region, timed on the file's clock."""
    from susurrus import load_audio

    rng = np.random.default_rng(0)
    speech = load_audio(AUDIO / "jfk.flac")
    noise = (rng.standard_normal(12 * SR) * 0.003).astype(np.float32)
    audio = np.concatenate([noise, speech, noise])
    plain = tiny_en.transcribe(speech, temperature=0.0)
    result = tiny_en.transcribe(audio, temperature=0.0, vad=True)
    assert result["text"] == plain["text"]
    assert result["segments"][0]["start"] >= 11.5
    assert result["segments"][-1]["end"] == pytest.approx(
        12 + plain["segments"][-1]["end"], abs=0.6
    )


@requires_silero
def test_vad_gives_no_text_on_silence_noise_and_tones(tiny_en) -> None:
    rng = np.random.default_rng(1)
    t = np.arange(60 * SR) / SR
    tones = sum(np.sin(2 * np.pi * f * t) for f in (220.0, 277.2, 329.6)) * 0.1
    inputs = {
        "silence": np.zeros(60 * SR, np.float32),
        "noise": (rng.standard_normal(60 * SR) * 0.01).astype(np.float32),
        "tones": tones.astype(np.float32),
    }
    for name, audio in inputs.items():
        result = tiny_en.transcribe(audio, temperature=0.0, vad=True)
        assert result["text"] == "" and result["segments"] == [], name


def _melody(seconds: int = 60) -> np.ndarray:
    """Plucked notes, a new one every half second: music-like, no speech."""
    t = np.arange(seconds * SR) / SR
    notes = 220 * 2 ** (np.floor(t * 2) % 8 / 12)
    pluck = np.exp(-3 * ((t * 2) % 1))
    return (0.3 * np.sin(2 * np.pi * np.cumsum(notes) / SR) * pluck).astype(np.float32)


@requires_silero
def test_no_text_on_music_with_vad(base) -> None:
    """Greedy at T=0 alone writes '1.5% 1.5% ...' over this melody; with VAD, nothing."""
    assert base.transcribe(_melody(), vad=True)["segments"] == []
