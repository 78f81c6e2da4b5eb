"""Odd media that users really have: the right audio stream among several, quiet speech,
and recordings with no speech, which are an answer rather than a failure."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from susurrus.audio import (
    chosen_audio_stream,
    format_probe,
    is_silent,
    load_audio,
    probe,
    streams_with_sound,
)
from susurrus.errors import SusurrusError

from .conftest import AUDIO, parity, requires_shared
from .media_corpus import Track, excerpt, write_media, write_pcm16

pytestmark = requires_shared

JFK = AUDIO / "jfk.flac"
JFK_WORDS = (
    "and so my fellow americans ask not what your country can do for you "
    "ask what you can do for your country"
).split()
FAST = ["--model", "tiny.en", "--beam_size", "None", "--verbose", "False"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "susurrus", *args], capture_output=True, text=True, timeout=600
    )


def words(text: str) -> list[str]:
    return "".join(c for c in text.lower() if c.isalpha() or c.isspace()).split()


def stderr_lines(proc: subprocess.CompletedProcess) -> list[str]:
    # tqdm's progress bar shares stderr; keep the lines susurrus writes itself.
    return [line for line in proc.stderr.splitlines() if line.startswith("susurrus: ")]


@pytest.fixture(scope="module")
def jfk() -> np.ndarray:
    return load_audio(JFK)


# --- 1. several audio streams -----------------------------------------------------------------


def test_streams_ranked_as_ffmpeg_does(tmp_path: Path, jfk: np.ndarray) -> None:
    """Default disposition first, then the most channels, then the first: the stream the
    ffmpeg command (and so the reference whisper) decodes when nothing is mapped."""
    silence = np.zeros_like(jfk)
    cases = {
        # (tracks, the stream ffmpeg picks)
        "second_default.mka": ([Track(silence), Track(jfk, default=True)], 1),
        "first_default.mka": (
            [Track(silence, default=True), Track(jfk, layout="stereo")],
            0,
        ),
        "more_channels.mka": ([Track(silence), Track(jfk, layout="stereo")], 1),
        "equal.mka": ([Track(jfk), Track(silence)], 0),
        "film.mp4": ([Track(silence, "aac"), Track(jfk, "aac", default=True)], 1),
    }
    for name, (tracks, expected) in cases.items():
        path = write_media(tmp_path / name, tracks, video="h264" if name.endswith("mp4") else None)
        assert chosen_audio_stream(path) == expected, name
        assert np.array_equal(load_audio(path), load_audio(path, stream=expected)), name
        if name == "first_default.mka":
            # A silent default is still the default (as in ffmpeg); the other one is found.
            assert is_silent(load_audio(path)) and not is_silent(load_audio(path, stream=1))
            assert streams_with_sound(path, exclude=0) == [1]
        else:
            assert not is_silent(load_audio(path)), name


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="the ffmpeg command is not installed")
def test_stream_choice_matches_the_ffmpeg_command(tmp_path: Path, jfk: np.ndarray) -> None:
    """Where the ffmpeg command exists, it decodes the same stream (PCM: the same samples)."""
    silence = np.zeros_like(jfk)
    for name, tracks in {
        "a.mka": [Track(silence), Track(jfk, default=True)],
        "b.mka": [Track(silence), Track(jfk, layout="stereo")],
        "c.mka": [Track(jfk, default=True), Track(silence, layout="stereo")],
        "d.mka": [Track(silence, default=True), Track(jfk, layout="stereo")],
    }.items():
        path = write_media(
            tmp_path / name,
            [Track(t.signal, "pcm_s16le", 16000, t.layout, t.default) for t in tracks],
        )
        reference = subprocess.run(
            ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path)]
            + ["-f", "s16le", "-ac", "1", "-ar", "16000", "-"],
            capture_output=True,
            check=True,
        ).stdout
        ours = (load_audio(path) * 32768).astype("<i2").tobytes()
        assert ours == reference, name


def test_probe_marks_the_stream_used(tmp_path: Path, jfk: np.ndarray) -> None:
    path = write_media(
        tmp_path / "two.mka", [Track(np.zeros_like(jfk)), Track(jfk, layout="stereo", default=True)]
    )
    info = probe(path)
    assert info["audio_stream"] == 1
    assert [s["default"] for s in info["streams"]] == [False, True]
    lines = format_probe(info).splitlines()
    assert lines[-2].startswith("  Stream #0:1: Audio: flac, 16000 Hz, stereo")
    assert lines[-2].endswith(" (default)")
    assert lines[-1] == "    transcribed by default (--audio_stream 1)"
    proc = run("probe", str(path))
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith("(--audio_stream 1)")
    assert json.loads(run("probe", "--json", str(path)).stdout)["audio_stream"] == 1


def test_cli_names_the_stream_that_has_speech(tmp_path: Path, jfk: np.ndarray) -> None:
    """A recorder that writes an empty default track first: the transcript is empty, exit 0,
    and the warning names the `--audio_stream` that has the speech; a file whose speech is in
    the default second stream is transcribed without being told."""
    silence = np.zeros_like(jfk)
    recorder = write_media(
        tmp_path / "recorder.mka", [Track(silence, default=True), Track(jfk, layout="stereo")]
    )
    film = write_media(
        tmp_path / "film.mp4",
        [Track(silence, "aac"), Track(jfk, "aac", default=True)],
        video="h264",
    )
    out = tmp_path / "out"
    proc = run(str(recorder), str(film), *FAST, "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert stderr_lines(proc) == [
        f"susurrus: warning: {recorder}: no speech found: audio stream 0 is silent; "
        "audio stream 1 (--audio_stream 1) has sound"
    ]
    empty = json.loads((out / "recorder.json").read_text())
    assert empty["segments"] == [] and empty["text"] == "" and empty["no_speech"] is True
    assert (out / "recorder.txt").read_text() == ""
    assert words(json.loads((out / "film.json").read_text())["text"]) == JFK_WORDS
    # Following the advice gives the words.
    proc = run(str(recorder), "--audio_stream", "1", *FAST, "-f", "txt", "-o", str(out))
    assert proc.returncode == 0 and stderr_lines(proc) == []
    assert words((out / "recorder.txt").read_text()) == JFK_WORDS


# --- 2. quiet speech --------------------------------------------------------------------------


def test_quiet_speech_is_transcribed_and_never_invented(tmp_path: Path, jfk: np.ndarray) -> None:
    """jfk turned down by 50, 70 and 80 dB and stored as 16-bit samples (at -70 dB the peak is
    about -72 dBFS, 8 steps). The first two keep their words, which a -60 dBFS peak rule
    threw away; at -80 dB (3 steps) the words do not survive and nothing is made up."""
    files = {}
    for db in (50, 70, 80):
        files[db] = write_pcm16(tmp_path / f"jfk-{db}dB.flac", jfk * 10 ** (-db / 20))
        quiet = load_audio(files[db])
        assert 20 * np.log10(np.abs(quiet).max()) < -50  # all below the old -60/-50 rules
        assert not is_silent(quiet)  # but there is something to see
    out = tmp_path / "out"
    # Greedy: beam search 5 (the CLI's default) hears the same words at these three levels.
    proc = run(*map(str, files.values()), *FAST, "-f", "json", "-o", str(out))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    heard = {db: words(json.loads((out / f"jfk-{db}dB.json").read_text())["text"]) for db in files}
    assert heard[50] == JFK_WORDS
    # One word of 22 may change this far down ("ask" heard as "and"), no more.
    assert len(heard[70]) == len(JFK_WORDS)
    assert sum(a != b for a, b in zip(heard[70], JFK_WORDS)) <= 1
    assert set(heard[80]) <= set(JFK_WORDS)  # nothing that was not said
    if not heard[80]:
        assert stderr_lines(proc) == [f"susurrus: warning: {files[80]}: no speech found"]


def test_digital_silence_is_silent_but_one_step_is_not() -> None:
    assert is_silent(np.zeros(16000, np.float32)) and is_silent(np.zeros(0, np.float32))
    steps = np.zeros(16000, np.float32)
    steps[8000:8400] = np.sin(np.arange(400) / 3) * 3 / 32768  # a 3-step blip
    assert not is_silent(steps)


# --- 3. no speech is an answer ----------------------------------------------------------------


def _tones(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    notes = sum(np.sin(2 * np.pi * f * t) * (np.sin(np.pi * t * 2) > 0) for f in (262, 330, 392))
    return (0.2 * notes).astype(np.float32)


def test_no_speech_is_an_answer_not_a_failure(tmp_path: Path, base) -> None:
    """Silence, music and a recording of a quiet room: outputs with no segments, one warning
    line each, exit 0; only the unreadable file fails. The reference whisper (base, beam 5)
    also gives an empty result for the quiet room."""
    silence = write_pcm16(tmp_path / "silence.wav", np.zeros(5 * 16000), codec="pcm_s16le")
    music = write_pcm16(tmp_path / "music.flac", _tones(5.0))
    room = tmp_path / "room.flac"
    shutil.copyfile(AUDIO / "sv_nst_u0016001_nonspeech.flac", room)  # "silent while recording"
    missing = tmp_path / "missing.wav"
    out = tmp_path / "out"
    proc = run(str(silence), str(music), str(room), str(missing), "--model", "base", "-o", str(out))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr  # for the missing file only
    assert stderr_lines(proc) == [
        f"susurrus: warning: {silence}: no speech found (the audio is silent)",
        f"susurrus: warning: {music}: no speech found",
        f"susurrus: warning: {room}: no speech found",
        f"susurrus: error: No such file: {missing}",
    ]
    name = "sv_nst_u0016001_nonspeech.flac"
    reference = next(r for r in parity("base", "beam5") if r["file"] == name)
    assert reference["result"]["segments"] == []
    for stem in ("silence", "music", "room"):
        result = json.loads((out / f"{stem}.json").read_text())
        assert result["segments"] == [] and result["text"] == "" and result["no_speech"], stem
        assert (out / f"{stem}.txt").read_text() == ""
        assert (out / f"{stem}.srt").read_text() == ""
        assert (out / f"{stem}.vtt").read_text().startswith("WEBVTT")
    assert not any(p.stem == "missing" for p in out.iterdir())
    # The API: an empty text, and the reason.
    result = base.transcribe(str(silence))
    assert result["text"] == "" and result["segments"] == [] and result["no_speech"] is True
    assert base.transcribe(np.zeros(16000, np.float32))["no_speech"] is True
    speech = base.transcribe(excerpt(JFK, 3.0), language="en", beam_size=None)
    assert speech["text"].strip() and "no_speech" not in speech


def test_a_dangling_link_says_so(tmp_path: Path) -> None:
    link = tmp_path / "talk.wav"
    link.symlink_to(tmp_path / "moved-away.wav")
    loop = tmp_path / "loop.wav"
    loop.symlink_to(loop)
    for path in (link, loop):
        with pytest.raises(SusurrusError) as info:
            load_audio(path)
        assert str(info.value) == f"{path}: a link to nothing (its target does not exist)"
