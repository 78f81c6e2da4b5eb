"""Subtitles from a real 3-minute recording through the command line, checked by parsers."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import srt
import webvtt

from susurrus import load_audio

from .conftest import AUDIO, manifest, requires_shared

pytestmark = requires_shared


def write_wav(path, samples: np.ndarray) -> None:
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=16000, layout="mono")
        pcm = (np.clip(samples, -1, 1) * 32767).astype(np.int16)[None, :]
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate = 16000
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


def test_readable_subtitles_from_three_minutes_of_speech(tmp_path):
    files = [r["file"] for r in manifest() if r["language"] == "en"]
    gap = np.zeros(8000, np.float32)
    audio = np.concatenate([np.concatenate([load_audio(AUDIO / f), gap]) for f in files])
    assert len(audio) >= 180 * 16000
    path = tmp_path / "talk.wav"
    write_wav(path, audio[: 180 * 16000])
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "susurrus",
            str(path),
            "--model",
            "tiny.en",
            "--verbose",
            "False",
            "--max_line_width",
            "42",
            "--max_line_count",
            "2",
            "--max_cps",
            "17",
            "-o",
            str(tmp_path),
            "-f",
            "all",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr
    cues = list(srt.parse((tmp_path / "talk.srt").read_text()))
    assert len(cues) > 20
    previous_end = None
    for cue in cues:
        start, end = cue.start.total_seconds(), cue.end.total_seconds()
        lines = cue.content.split("\n")
        assert cue.content.strip(), cue
        assert len(lines) <= 2 and all(len(line) <= 42 for line in lines), cue.content
        characters = len(cue.content.replace("\n", ""))
        assert characters / (end - start) <= 17 + 1e-6, (cue.content, start, end)
        assert previous_end is None or start >= previous_end
        previous_end = end
    vtt = list(webvtt.read(str(tmp_path / "talk.vtt")))
    assert [c.text for c in vtt] == [c.content for c in cues]
