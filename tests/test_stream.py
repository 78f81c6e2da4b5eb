"""Reading a recording as it is decoded: the same spectrogram, and memory that does not grow
with the recording's length."""

from __future__ import annotations

import subprocess
import sys
import wave

import numpy as np
import pytest
import torch

from susurrus import load_audio, log_mel_spectrogram
from susurrus.features import N_FRAMES, N_SAMPLES, MelStream
from susurrus.windows import FrameReader

from .conftest import AUDIO, requires_shared

pytestmark = requires_shared
LONG = AUDIO / "en_lj_LJ001-0001-0016_concat.flac"  # 111 s


@pytest.mark.parametrize("name", ["jfk.flac", LONG.name])
def test_stream_frames_equal_the_whole_spectrogram(name):
    path = AUDIO / name
    whole = log_mel_spectrogram(load_audio(str(path)), 80, padding=N_SAMPLES)
    stream = MelStream(str(path), 80)
    assert stream.content_frames == whole.shape[-1] - N_FRAMES
    assert stream.peak == pytest.approx(float(np.abs(load_audio(str(path))).max()))
    # Windows as transcription reads them: overlapping, forward, some skipped, the last
    # running into the padding.
    starts = [0, 2500, 2999, 9100, stream.content_frames - 100]
    for start in sorted(s for s in starts if s <= stream.content_frames):
        got = stream.frames(start, start + N_FRAMES)
        expected = whole[:, start : start + N_FRAMES]
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    # Going back decodes again from the top (clips out of order, a second transcription).
    assert torch.allclose(stream.frames(100, 200), whole[:, 100:200], atol=1e-5)


def test_streamed_transcript_equals_in_memory(tiny_en):
    streamed = tiny_en.transcribe(str(LONG), temperature=0.0)
    in_memory = tiny_en.transcribe(load_audio(str(LONG)), temperature=0.0)
    assert [s["tokens"] for s in streamed["segments"]] == [
        s["tokens"] for s in in_memory["segments"]
    ]


def test_streamed_batched_transcript_equals_in_memory(tiny_en):
    options = dict(temperature=0.0, batch_size=4)
    streamed = tiny_en.transcribe(str(LONG), **options)
    in_memory = tiny_en.transcribe(load_audio(str(LONG)), **options)
    assert len(streamed["segments"]) > 5
    assert [s["tokens"] for s in streamed["segments"]] == [
        s["tokens"] for s in in_memory["segments"]
    ]


def test_batched_reading_goes_forward_and_keeps_about_one_batch(tiny_en, monkeypatch):
    """Batched decoding of a stream never reads back (a MelStream would decode the file
    again from the top), and keeps the frames of about one batch of windows."""
    stream = MelStream(str(LONG), 80)
    starts, kept = [], []
    read = stream.frames

    def frames(start: int, stop: int) -> torch.Tensor:
        starts.append(start)
        return read(start, stop)

    stream.frames = frames
    call = FrameReader.__call__

    def spy(self, start: int, stop: int) -> torch.Tensor:
        out = call(self, start, stop)
        kept.append(self._frames.shape[1])
        return out

    monkeypatch.setattr(FrameReader, "__call__", spy)
    result = tiny_en.transcribe(stream, temperature=0.0, batch_size=2)
    assert "printing" in result["text"].lower(), result["text"]
    assert starts == sorted(starts), starts
    assert stream.content_frames > 3.5 * N_FRAMES  # 111 s: five windows
    assert 0 < max(kept) <= 3 * N_FRAMES, kept  # two windows and the next cut's search


PEAK_RSS = """
import resource, sys, susurrus
model = susurrus.load_model("tiny.en", device="cpu")
batch_size = None if sys.argv[3] == "none" else int(sys.argv[3])
result = model.transcribe(
    sys.argv[1], temperature=0.0, clip_timestamps=sys.argv[2], batch_size=batch_size
)
assert "printing" in result["text"].lower(), result["text"]
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.parametrize("batch_size", ["none", "4"])
def test_an_hour_needs_the_memory_of_ninety_seconds(tmp_path, batch_size):
    """An hour of audio, of which the first ninety seconds and the last thirty are decoded,
    against the first ninety seconds alone: peak RSS within 10% (the hour's samples alone
    would take 230 MB as float32), decoded one window at a time or in batches."""
    samples = load_audio(str(LONG))
    pcm = (np.clip(samples, -1, 1 - 1 / 32768) * 32768).astype("<i2").tobytes()
    hour, minutes = tmp_path / "hour.wav", tmp_path / "short.wav"
    for path, seconds in ((hour, 3600), (minutes, 90)):
        with wave.open(str(path), "wb") as f:
            f.setnchannels(1)
            f.setsampwidth(2)
            f.setframerate(16000)
            written = 0
            while written < seconds * 16000:
                part = pcm[: 2 * (seconds * 16000 - written)]
                f.writeframes(part)
                written += len(part) // 2

    def peak_kb(path, clips) -> int:
        run = subprocess.run(
            [sys.executable, "-c", PEAK_RSS, str(path), clips, batch_size],
            capture_output=True,
            text=True,
            check=True,
        )
        return int(run.stdout.split()[-1])

    short = peak_kb(minutes, "0,90")
    long = peak_kb(hour, "0,90,3570,3600")
    print(f"peak RSS: 90 s {short // 1024} MB, 1 h {long // 1024} MB")
    assert long <= 1.10 * short, (long, short)


@pytest.mark.parametrize("samples,padding", [(200, 40), (300, 100), (1000, 0), (16037, N_SAMPLES)])
def test_streamed_frames_equal_whole_signal_frames_for_any_padding(samples, padding):
    from susurrus.features import _log10_mel, _stream_log10_mel

    audio = np.random.default_rng(samples).standard_normal(samples).astype(np.float32)
    whole = _log10_mel(torch.from_numpy(audio), 80, padding, 6000)
    blocks = iter([audio[:150], audio[150:]])  # the first block too short for frame 0
    streamed = torch.cat([frames for frames, _ in _stream_log10_mel(blocks, 80, padding)], 1)
    assert streamed.shape == whole.shape
    assert torch.allclose(streamed, whole, atol=1e-6)
