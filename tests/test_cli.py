"""The `susurrus` command as a user runs it: real files, real weights, real errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from susurrus.load import embedded_model_files

from .conftest import AUDIO, parity, requires_shared
from .test_audio import _wav_header_only, _write_media

pytestmark = requires_shared


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "susurrus", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


def reference_lines(model: str, file: str) -> list[str]:
    ref = next(r for r in parity(model, "beam5") if r["file"] == file)
    return [s["text"].strip() for s in ref["result"]["segments"]]


JFK_WORDS = (
    "and so my fellow americans ask not what your country can do for you "
    "ask what you can do for your country"
)


@pytest.mark.parametrize("model", ["tiny.en", "base"])
def test_jfk_writes_all_formats_with_reference_text(model, tmp_path):
    proc = run(str(AUDIO / "jfk.flac"), "--model", model, "-o", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    words = " ".join("".join(c for c in proc.stdout.lower() if c.isalpha() or c.isspace()).split())
    assert JFK_WORDS in words
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"jfk.{ext}" for ext in ("json", "srt", "tsv", "txt", "vtt")
    ]
    # The CLI defaults are the reference's: beam 5 at temperature 0.
    expected = reference_lines(model, "jfk.flac")
    assert (tmp_path / "jfk.txt").read_text().splitlines() == expected
    result = json.loads((tmp_path / "jfk.json").read_text())
    assert [s["text"].strip() for s in result["segments"]] == expected
    assert result["language"] == "en"
    srt = (tmp_path / "jfk.srt").read_text()
    assert srt.startswith("1\n00:00:00,000 --> ")
    assert (tmp_path / "jfk.vtt").read_text().startswith("WEBVTT\n\n00:00.000 --> ")
    assert (tmp_path / "jfk.tsv").read_text().startswith("start\tend\ttext\n0\t")


def test_bad_inputs_fail_alone_and_clearly(tmp_path):
    out = tmp_path / "out"
    text = tmp_path / "notes.mp3"
    text.write_text("not audio at all\n" * 50)
    video_only = _write_media(tmp_path / "silent_film.mp4", [], ("h264", 10), seconds=1.0)
    empty = _wav_header_only(tmp_path / "empty.wav")
    good = tmp_path / "jfk.flac"
    shutil.copyfile(AUDIO / "jfk.flac", good)
    proc = run(
        str(tmp_path / "missing.wav"),
        str(text),
        str(video_only),
        str(empty),
        str(good),
        "--model",
        "tiny.en",
        "-o",
        str(out),
        "--verbose",
        "False",
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("susurrus: error:")]
    assert errors == [
        f"susurrus: error: No such file: {tmp_path / 'missing.wav'}",
        f"susurrus: error: {text}: not an audio or video file FFmpeg can read",
        f"susurrus: error: {video_only}: has no audio stream",
        f"susurrus: error: {empty}: contains no audio samples",
    ]
    # The good file after the failures is still transcribed, and nothing else is written.
    assert sorted(p.name for p in out.iterdir()) == [
        f"jfk.{ext}" for ext in ("json", "srt", "tsv", "txt", "vtt")
    ]
    assert "country" in (out / "jfk.txt").read_text()


def test_unknown_model_and_language(tmp_path):
    proc = run(str(AUDIO / "jfk.flac"), "--model", "huge", "-o", str(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("susurrus: error: unknown model 'huge'")
    proc = run(str(AUDIO / "jfk.flac"), "--language", "Klingon", "-o", str(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "unknown language 'Klingon'" in proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("options,message", [
    (["--beam_size", "0"], "beam_size must be a whole number of at least 1, got 0"),
    (["--temperature", "-1"], "temperature must be 0 or more"),
    (["--best_of", "-1", "--temperature", "0.5"], "best_of must be a whole number"),
    (["--suppress_tokens", "abc"], "suppress_tokens must be token ids"),
    (["--suppress_tokens", "999999"], "999999 is not a token of this model"),
    (["--threads", "-1"], "argument --threads: expected a count of 0 or more"),
    (["--clip_timestamps", "abc"], "clip_timestamps must be seconds"),
])
def test_option_values_out_of_range_are_one_line(options, message, tmp_path):
    proc = run(str(AUDIO / "jfk.flac"), "--model", "tiny.en", "-o", str(tmp_path), *options)
    assert proc.returncode in (1, 2) and "Traceback" not in proc.stderr
    assert message in proc.stderr.strip().splitlines()[-1]
    assert list(tmp_path.iterdir()) == []


def test_inputs_that_would_write_the_same_outputs_are_refused_first(tmp_path):
    """a/jfk.flac and b/jfk.flac would both write jfk.*: the reference keeps the last
    without a word. Refused before any work (no model loaded: at once); the same file
    given twice is transcribed once; an output folder that is a file is said at once."""
    for folder, source in (("a", "jfk.flac"), ("b", "en_lj_LJ001-0008.flac")):
        (tmp_path / folder).mkdir()
        shutil.copy(AUDIO / source, tmp_path / folder / "jfk.flac")
    out = tmp_path / "out"
    proc = run("a/jfk.flac", "b/jfk.flac", "--model", "tiny.en", "-o", str(out), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        "susurrus: error: a/jfk.flac and b/jfk.flac would both be written as jfk.*: "
        "transcribe them into different folders (--output_dir)"
    )
    assert not out.exists()
    proc = run("a/jfk.flac", "./a/jfk.flac", "--model", "tiny.en", "-o", str(out), "-f", "txt",
               "--verbose", "False", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in out.iterdir()] == ["jfk.txt"]
    assert "ask what you can do for your country" in (out / "jfk.txt").read_text()
    proc = run("a/jfk.flac", "--model", "tiny.en", "-o", str(out / "jfk.txt"), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith("jfk.txt is a file, not a folder")


def test_truncated_weights(tmp_path):
    files = embedded_model_files("tiny.en")
    if files is None:
        pytest.skip("tiny.en is not installed")
    parts, config_dir = files
    model_dir = tmp_path / "broken"
    model_dir.mkdir()
    (model_dir / "model.bin").write_bytes(parts[0].read_bytes()[:1_000_000])
    shutil.copyfile(config_dir / "config.json", model_dir / "config.json")
    proc = run(str(AUDIO / "jfk.flac"), "--model", str(model_dir), "-o", str(tmp_path / "o"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "truncated or corrupt model file" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_chinese_by_name_and_in_other_containers(tmp_path):
    """`--language Chinese` works, and mp4 (h264 + aac) and mp2 give the flac's text."""
    from susurrus import load_audio

    name = "zh_aishell_BAC009S0724W0121.flac"
    speech = load_audio(AUDIO / name)
    seconds = len(speech) / 16000
    video = _write_media(
        tmp_path / "video.mp4",
        [("aac", 16000, "mono", speech, "chi")],
        ("h264", 10),
        seconds=seconds,
    )
    stream = _write_media(tmp_path / "stream.mp2", [("mp2", 16000, "mono", speech, None)])
    flac = tmp_path / "original.flac"
    shutil.copyfile(AUDIO / name, flac)
    out = tmp_path / "out"
    proc = run(
        str(flac),
        str(video),
        str(stream),
        "--language",
        "Chinese",
        "-f",
        "txt",
        "-o",
        str(out),
        "--verbose",
        "False",
    )
    assert proc.returncode == 0, proc.stderr
    expected = "\n".join(reference_lines("base", name)) + "\n"
    for stem in ("original", "video", "stream"):
        assert (out / f"{stem}.txt").read_text() == expected, stem


def test_output_format_and_quiet_progress(tmp_path):
    proc = run(
        str(AUDIO / "en_ls_61-70968-0002.flac"),
        "--model",
        "tiny.en",
        "-f",
        "srt",
        "--verbose",
        "False",
        "--beam_size",
        "None",
        "-o",
        str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["en_ls_61-70968-0002.srt"]
    assert "-->" not in proc.stdout  # no segment lines; tqdm's bar goes to stderr
    assert "frames" in proc.stderr
    assert "golden fortune" in (tmp_path / "en_ls_61-70968-0002.srt").read_text().lower()


def test_silent_file_is_an_answer_not_a_failure(tmp_path):
    import av

    path = tmp_path / "silence.wav"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=16000, layout="mono")
        frame = av.AudioFrame.from_ndarray(
            np.zeros((1, 16000 * 5), np.int16), format="s16", layout="mono"
        )
        frame.sample_rate = 16000
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    good = tmp_path / "jfk.flac"
    shutil.copyfile(AUDIO / "jfk.flac", good)
    proc = run(str(path), str(good), "--model", "tiny.en", "-o", str(tmp_path / "o"))
    # Digital silence is not decoded into hallucinated words, and is no failure either:
    # empty outputs, one warning line, exit 0; jfk still runs.
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        f"susurrus: warning: {path}: no speech found (the audio is silent)"
    )
    assert sorted(p.stem for p in (tmp_path / "o").iterdir()) == ["jfk"] * 5 + ["silence"] * 5
    result = json.loads((tmp_path / "o" / "silence.json").read_text())
    assert result == {"text": "", "segments": [], "language": "en", "no_speech": True}


def test_probe_text_and_json(tmp_path):
    proc = run("probe", str(AUDIO / "jfk.flac"))
    assert proc.returncode == 0, proc.stderr
    assert "Input #0, flac" in proc.stdout and "Audio: flac, 44100 Hz, stereo" in proc.stdout
    proc = run("probe", "--json", str(AUDIO / "jfk.flac"))
    info = json.loads(proc.stdout)
    assert info["streams"][0]["sample_rate"] == 44100 and info["duration"] == pytest.approx(
        11, abs=0.1
    )
    proc = run("probe", str(tmp_path / "nope.mkv"))
    assert (
        proc.returncode == 1
        and proc.stderr.strip() == f"susurrus: error: No such file: {tmp_path / 'nope.mkv'}"
    )


def test_version_and_help():
    proc = run("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("susurrus ")
    proc = run("--help")
    for flag in (
        "--model",
        "--beam_size",
        "--condition_on_previous_text",
        "--clip_timestamps",
        "--word_timestamps",
        "--no_speech_threshold",
        "--threads",
    ):
        assert flag in proc.stdout


def test_boolean_flag_spellings():
    from susurrus.cli import build_parser

    parse = build_parser().parse_args
    args = parse(
        ["a.wav", "--no-condition_on_previous_text", "--word_timestamps", "--fp16", "False"]
    )
    assert (args.condition_on_previous_text, args.word_timestamps, args.fp16) == (
        False,
        True,
        False,
    )
    args = parse(["a.wav", "--no-condition-on-previous-text", "--verbose", "True"])
    assert args.condition_on_previous_text is False and args.verbose is True
    args = parse(["a.wav", "--beam_size", "None", "--language", "None", "--temperature", "0.2"])
    assert args.beam_size is None and args.language is None and args.temperature == 0.2
    assert parse(["a.wav"]).beam_size == 5 and parse(["a.wav"]).best_of == 5
    with pytest.raises(SystemExit):
        parse(["a.wav", "--fp16", "maybe"])
