"""Live transcription: confirmed words never retracted, the words of real speech fed in
chunks, nothing from silence or music, streams sharing one engine, and `susurrus live`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import jiwer
import numpy as np
import pytest
from whisper_normalizer.english import EnglishTextNormalizer

from susurrus import Engine, LiveSession, load_audio, transcribe
from susurrus.live import Resampler, words_text

from .conftest import AUDIO, manifest, requires_shared

pytestmark = requires_shared
ROOT = Path(__file__).resolve().parents[1]
norm = EnglishTextNormalizer()
SPEECH = ["jfk.flac", "en_ls_1995-1837-0001.flac"]


def truth(name: str) -> str:
    return next(row["transcript"] for row in manifest() if row["file"] == name)


def feed_live(model, samples: np.ndarray, chunk: float = 0.5, **kwargs) -> tuple[dict, list]:
    """The transcript of `samples` fed in `chunk`-second pieces, and a snapshot of the
    confirmed words after each event."""
    snapshots: list[list[tuple[str, float, float]]] = []
    session: LiveSession

    def on_event(event) -> None:
        snapshots.append([(w["word"], w["start"], w["end"]) for w in session.confirmed])

    session = LiveSession(model, on_event=on_event, **kwargs)
    step = int(chunk * 16000)
    for i in range(0, len(samples), step):
        session.feed(samples[i : i + step])
    return session.finish(), snapshots


@pytest.fixture(scope="module")
def live_runs(tiny_en):
    return {name: feed_live(tiny_en, load_audio(str(AUDIO / name))) for name in SPEECH}


def test_confirmed_words_are_never_retracted(live_runs):
    for name, (result, snapshots) in live_runs.items():
        assert len(snapshots) > 5, name  # words came out while the audio was still arriving
        final = [(w["word"], w["start"], w["end"]) for s in result["segments"] for w in s["words"]]
        for before, after in zip(snapshots, snapshots[1:]):
            assert after[: len(before)] == before, name
        assert final[: len(snapshots[-1])] == snapshots[-1]
        # Words come out before the end: the first confirmed ones long before the last chunk.
        first = next(s for s in snapshots if s)
        assert len(first) < len(final) / 2, name


def test_words_in_half_second_chunks_match_offline_decoding(tiny_en, live_runs):
    expected, live, offline = [], [], []
    for name, (result, _) in live_runs.items():
        expected.append(norm(truth(name)))
        live.append(norm(result["text"]))
        offline.append(norm(transcribe(tiny_en, str(AUDIO / name), temperature=0.0)["text"]))
    live_wer, offline_wer = jiwer.wer(expected, live), jiwer.wer(expected, offline)
    print(f"live WER {live_wer:.4f}, offline {offline_wer:.4f}")
    # The target: within one point of offline decoding.
    assert live_wer <= offline_wer + 0.01, (live_wer, offline_wer, live)
    # Word times are in order and inside the audio.
    for name, (result, _) in live_runs.items():
        words = [w for s in result["segments"] for w in s["words"]]
        assert all(a["end"] <= b["start"] + 1e-6 for a, b in zip(words, words[1:])), name
        duration = len(load_audio(str(AUDIO / name))) / 16000
        assert words[-1]["end"] <= duration + 0.05


def music(seconds: float, seed: int = 0) -> np.ndarray:
    """Chords of harmonic tones changing every half second, with a drum-like click."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    out = np.zeros_like(t)
    for start in np.arange(0, seconds, 0.5):
        root = 220 * 2 ** (rng.integers(0, 12) / 12)
        part = (t >= start) & (t < start + 0.5)
        for ratio in (1, 1.25, 1.5):
            for harmonic in (1, 2, 3):
                out[part] += np.sin(2 * np.pi * root * ratio * harmonic * t[part]) / harmonic
        click = (t >= start) & (t < start + 0.02)
        out[click] += rng.normal(0, 1, click.sum())
    return (0.1 * out / np.abs(out).max()).astype(np.float32)


@pytest.mark.parametrize("kind", ["silence", "music", "nonspeech clip"])
def test_no_words_from_silence_or_music(tiny_en, kind):
    if kind == "silence":
        rng = np.random.default_rng(1)
        samples = (rng.normal(0, 1e-4, 8 * 16000)).astype(np.float32)  # a quiet room
    elif kind == "music":
        samples = music(8.0)
    else:
        samples = load_audio(str(AUDIO / "sv_nst_u0016001_nonspeech.flac"))
    result, snapshots = feed_live(tiny_en, samples)
    assert result["segments"] == [] and result.get("no_speech") is True
    assert all(s == [] for s in snapshots)


def test_other_rates_and_int16(tiny_en):
    name = "en_ls_61-70968-0002.flac"
    samples = load_audio(str(AUDIO / name))
    # The same speech at 48 kHz as int16: resampled on the way in, chunk by chunk.
    t48 = np.arange(len(samples) * 3) / 48000
    upsampled = np.interp(t48, np.arange(len(samples)) / 16000, samples)
    pcm = np.round(upsampled * 32767).astype(np.int16)
    session = LiveSession(tiny_en)
    for i in range(0, len(pcm), 24000):
        session.feed(pcm[i : i + 24000], sample_rate=48000)
    text = session.finish()["text"]
    assert jiwer.wer(norm(truth(name)), norm(text)) <= 0.15, text
    assert abs(session.audio_time - len(samples) / 16000) < 0.01
    # The resampler gives the same samples whatever the chunking.
    whole = Resampler(48000)(upsampled.astype(np.float32))
    resampler = Resampler(48000)
    pieces = [upsampled[i : i + 1000].astype(np.float32) for i in range(0, len(upsampled), 1000)]
    parts = np.concatenate([resampler(piece) for piece in pieces])
    assert len(parts) == len(whole) and np.allclose(parts, whole, atol=1e-6)


@pytest.mark.parametrize("worker", [False, True], ids=["feeders-step", "worker"])
def test_two_streams_share_one_engines_batches(tiny_en, worker):
    # One table: on a busy machine a second lane could take one stream's decodes each time.
    engine = Engine(tiny_en, max_batch=4, worker=worker, lanes=False)
    names = ["en_ls_61-70968-0002.flac", "en_arctic_a0024.flac"]
    results: dict[str, str] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def stream(name: str) -> None:
        try:
            samples = load_audio(str(AUDIO / name))
            session = LiveSession(engine)
            start.wait()
            for i in range(0, len(samples), 8000):
                session.feed(samples[i : i + 8000])
            results[name] = session.finish()["text"]
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=stream, args=(n,)) for n in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors
    for name in names:
        assert jiwer.wer(norm(truth(name)), norm(results[name])) <= 0.2, results
    # Decoding steps advanced more than one row on average: the streams were batched.
    assert engine.row_steps > engine.steps
    assert engine.stats()["sources"] == 0


def test_finish_confirms_the_last_decode_when_it_heard_everything(tiny_en):
    samples = load_audio(str(AUDIO / "en_arctic_a0024.flac"))
    session = LiveSession(tiny_en)
    for i in range(0, len(samples), 8000):
        session.feed(samples[i : i + 8000])
    shown = [w["word"] for w in session.confirmed + session.tentative]
    decodes = session.decodes
    result = session.finish()
    # No decode of the same audio again: the words shown last are the final ones.
    assert session.decodes == decodes
    assert [w["word"] for s in result["segments"] for w in s["words"]] == shown
    assert jiwer.wer(norm(truth("en_arctic_a0024.flac")), norm(result["text"])) <= 0.15


def test_unsure_word_waits_for_the_word_after_it(tiny_en):
    def decode(*words: tuple[str, float, float, float]) -> list[dict]:
        return [{"word": w, "start": a, "end": b, "probability": p} for w, a, b, p in words]

    session = LiveSession(tiny_en, language="en", vad=False)
    session._speech = [(0.0, 6.0)]
    # "there" is unsure and the word after it too: it waits, though two decodes agree
    # and a second and a half was heard after it.
    first = decode((" and", 0.0, 0.3, 0.99), (" that", 0.3, 0.6, 0.99),
                   (" there", 0.6, 0.9, 0.6), (" arrangement", 0.9, 1.4, 0.3))
    session._agree(first, False, 0.0, 2.0)
    assert session._agree([dict(w) for w in first], False, 0.0, 2.5) != []
    assert words_text(session.confirmed) == "and that"
    # Once the next word is agreed on and sure, the unsure word before it is confirmed.
    later = decode((" and", 0.0, 0.3, 0.99), (" that", 0.3, 0.6, 0.99),
                   (" their", 0.6, 0.9, 0.7), (" arrangement", 0.9, 1.4, 0.95),
                   (" on", 1.4, 1.6, 0.99))
    session._agree(later, False, 0.0, 3.0)
    session._agree([dict(w) for w in later], False, 0.0, 3.5)
    assert words_text(session.confirmed) == "and that their arrangement"


def test_words_text_joins_words():
    assert words_text([{"word": " Hello"}, {"word": " world."}]) == "Hello world."


# -- the command line ---------------------------------------------------------------------


def live_cli(*args: str, stdin: bytes | None = None, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "susurrus", "live", *args], input=stdin, capture_output=True,
        env=env, cwd=cwd, timeout=300,
    )


def test_cli_file_writes_outputs(tmp_path):
    name = "en_arctic_a0024.flac"
    done = live_cli(str(AUDIO / name), "--model", "tiny.en", "-o", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    stem = tmp_path / "en_arctic_a0024"
    result = json.loads(stem.with_suffix(".json").read_text())
    assert jiwer.wer(norm(truth(name)), norm(result["text"])) <= 0.15
    assert stem.with_suffix(".srt").read_text().startswith("1\n00:00:")
    assert stem.with_suffix(".vtt").read_text().startswith("WEBVTT")
    # Not a terminal: the confirmed lines, plain.
    assert norm(done.stdout.decode()) == norm(result["text"])
    assert "\033[" not in done.stdout.decode()


def test_cli_stdin_raw_and_container(tmp_path):
    name = "en_ls_61-70968-0002.flac"
    samples = load_audio(str(AUDIO / name))
    raw = np.round(samples * 32767).astype("<i2").tobytes()
    done = live_cli("-", "--model", "tiny.en", "-f", "txt", "-o", str(tmp_path), stdin=raw,
                    cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "live.txt").read_text()
    assert jiwer.wer(norm(truth(name)), norm(text)) <= 0.15, text
    # A FLAC file on stdin is told from raw PCM by its first bytes.
    done = live_cli("-", "--model", "tiny.en", "-f", "txt", "--name", "piped", "-o",
                    str(tmp_path), stdin=(AUDIO / name).read_bytes(), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "piped.txt").read_text() == text


def test_cli_errors_are_one_line(tmp_path):
    done = live_cli("--model", "tiny.en", cwd=tmp_path)  # the microphone: none here
    lines = done.stderr.decode().strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "microphone" in lines[0], lines
    done = live_cli(str(tmp_path / "missing.wav"), "--model", "tiny.en", cwd=tmp_path)
    lines = done.stderr.decode().strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "No such file" in lines[0], lines


def test_terminal_display_redraws_the_tentative_tail_in_place():
    import io

    from susurrus.live import LiveEvent
    from susurrus.live_cli import Display

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    def word(text: str) -> dict:
        return {"word": text, "start": 0.0, "end": 0.0}

    out = Terminal()
    display = Display(out)
    display(LiveEvent([], [word(" Ask"), word(" not")], 1.0))
    display(LiveEvent([word(" Ask"), word(" not.")], [word(" What")], 2.0))
    display.close()
    text = out.getvalue()
    # The tail is dimmed and redrawn on the same line; a finished sentence gets its own line.
    assert "\r\033[K Ask\033[2m not\033[0m" not in text  # confirmed text is never dimmed
    assert "\r\033[K\033[2m Ask not\033[0m" in text
    assert "Ask not.\n" in text
    assert text.endswith("\r\033[K")
    plain = io.StringIO()
    display = Display(plain)
    display(LiveEvent([word(" Ask"), word(" not.")], [word(" What")], 2.0))
    display(LiveEvent([word(" What")], [], 3.0))
    display.close()
    assert plain.getvalue() == "Ask not.\nWhat\n"
