"""Output writers: exact bytes per format, subtitle parsers accept the files, atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import srt
import webvtt

from susurrus import writers
from susurrus.errors import SusurrusError
from susurrus.writers import format_timestamp, get_writer

# Segment-level result: a CJK segment, a segment past the one-hour mark, "-->" and a tab in text.
SEGMENT_RESULT = {
    "text": " Hello world. 你好，世界。 The arrow --> points\there.",
    "segments": [
        {"id": 0, "start": 0.0, "end": 2.5, "text": " Hello world."},
        {"id": 1, "start": 2.5, "end": 65.123, "text": " 你好，世界。"},
        {"id": 2, "start": 3725.0004, "end": 3727.8996, "text": " The arrow --> points\there."},
    ],
    "language": "en",
}

EXPECTED_TXT = "Hello world.\n你好，世界。\nThe arrow --> points\there.\n"

EXPECTED_VTT = (
    "WEBVTT\n"
    "\n"
    "00:00.000 --> 00:02.500\n"
    "Hello world.\n"
    "\n"
    "00:02.500 --> 01:05.123\n"
    "你好，世界。\n"
    "\n"
    "01:02:05.000 --> 01:02:07.900\n"
    "The arrow -> points\there.\n"
    "\n"
)

EXPECTED_SRT = (
    "1\n"
    "00:00:00,000 --> 00:00:02,500\n"
    "Hello world.\n"
    "\n"
    "2\n"
    "00:00:02,500 --> 00:01:05,123\n"
    "你好，世界。\n"
    "\n"
    "3\n"
    "01:02:05,000 --> 01:02:07,900\n"
    "The arrow -> points\there.\n"
    "\n"
)

EXPECTED_TSV = (
    "start\tend\ttext\n"
    "0\t2500\tHello world.\n"
    "2500\t65123\t你好，世界。\n"
    "3725000\t3727900\tThe arrow --> points here.\n"
)


def _words(*items: tuple[str, float, float]) -> list[dict]:
    return [{"word": w, "start": s, "end": e, "probability": 0.9} for w, s, e in items]


# Word-level result: a >3 s pause between the segments, and the second one past one hour.
WORD_RESULT = {
    "text": " The quick brown fox leaps high. jumps over",
    "segments": [
        {
            "id": 0,
            "start": 0.0,
            "end": 3.0,
            "text": " The quick brown fox leaps high.",
            "words": _words(
                (" The", 0.0, 0.4),
                (" quick", 0.4, 0.9),
                (" brown", 1.0, 1.5),
                (" fox", 1.5, 2.0),
                (" leaps", 2.1, 2.6),
                (" high.", 2.6, 3.0),
            ),
        },
        {
            "id": 1,
            "start": 3601.0,
            "end": 3603.0,
            "text": " jumps over",
            "words": _words((" jumps", 3601.0, 3601.6), (" over", 3601.8, 3603.0)),
        },
    ],
    "language": "en",
}


def _write(fmt: str, out: Path, result: dict, options: dict | None = None, **kw) -> str:
    get_writer(fmt, out)(result, "/some/where/talk.wav", options, **kw)
    return (out / f"talk.{fmt}").read_bytes().decode("utf-8")


def _entries(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


# ---------------------------------------------------------------- format_timestamp


@pytest.mark.parametrize(
    ("seconds", "hours", "marker", "expected"),
    [
        (0.0, False, ".", "00:00.000"),
        (0.0, True, ",", "00:00:00,000"),
        (59.9995, False, ".", "01:00.000"),  # rounds up into the next minute
        (61.0014, False, ".", "01:01.001"),
        (3599.9994, False, ".", "59:59.999"),
        (3600.0, False, ".", "01:00:00.000"),  # hours appear once non-zero
        (45296.789, True, ",", "12:34:56,789"),
        (360000.0, False, ".", "100:00:00.000"),
    ],
)
def test_format_timestamp(seconds: float, hours: bool, marker: str, expected: str) -> None:
    assert format_timestamp(seconds, always_include_hours=hours, decimal_marker=marker) == expected


def test_format_timestamp_rejects_negative() -> None:
    with pytest.raises(ValueError):
        format_timestamp(-0.5)


# ---------------------------------------------------------------- segment-level formats


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [("txt", EXPECTED_TXT), ("vtt", EXPECTED_VTT), ("srt", EXPECTED_SRT), ("tsv", EXPECTED_TSV)],
)
def test_segment_formats_exact(tmp_path: Path, fmt: str, expected: str) -> None:
    assert _write(fmt, tmp_path, SEGMENT_RESULT) == expected


def test_json_is_ascii_escaped_without_trailing_newline(tmp_path: Path) -> None:
    result = {
        "text": " 你好 --> ok",
        "segments": [{"id": 0, "start": 0.0, "end": 1.5, "text": " 你好 --> ok"}],
        "language": "zh",
    }
    expected = (
        r'{"text": " \u4f60\u597d --> ok", "segments": [{"id": 0, "start": 0.0, "end": 1.5, '
        r'"text": " \u4f60\u597d --> ok"}], "language": "zh"}'
    )
    assert _write("json", tmp_path, result) == expected


def test_json_accepts_numpy_scalars(tmp_path: Path) -> None:
    result = {"text": "", "segments": [], "avg": np.float32(0.5), "ids": np.array([1, 2])}
    expected = '{"text": "", "segments": [], "avg": 0.5, "ids": [1, 2]}'
    assert _write("json", tmp_path, result) == expected


def test_empty_result(tmp_path: Path) -> None:
    result = {"text": "", "segments": [], "language": "en"}
    assert _write("txt", tmp_path, result) == ""
    assert _write("vtt", tmp_path, result) == "WEBVTT\n\n"
    assert _write("srt", tmp_path, result) == ""
    assert _write("tsv", tmp_path, result) == "start\tend\ttext\n"


def test_subtitles_parse_in_order(tmp_path: Path) -> None:
    subs = list(srt.parse(_write("srt", tmp_path, SEGMENT_RESULT)))
    assert [s.index for s in subs] == [1, 2, 3]
    contents = [s.content for s in subs]
    assert contents == ["Hello world.", "你好，世界。", "The arrow -> points\there."]
    assert subs[2].start.total_seconds() == pytest.approx(3725.0)
    assert all(a.start <= b.start for a, b in zip(subs, subs[1:], strict=False))

    captions = webvtt.from_string(_write("vtt", tmp_path, SEGMENT_RESULT)).captions
    assert [c.start for c in captions] == ["00:00:00.000", "00:00:02.500", "01:02:05.000"]
    assert [c.end for c in captions] == ["00:00:02.500", "00:01:05.123", "01:02:07.900"]
    assert captions[1].text == "你好，世界。"


def test_output_name_uses_stem_only(tmp_path: Path) -> None:
    get_writer("txt", tmp_path)(SEGMENT_RESULT, Path("/x/my.talk.final.mp3"), None)
    get_writer("txt", tmp_path)(SEGMENT_RESULT, "noextension", None)
    assert _entries(tmp_path) == ["my.talk.final.txt", "noextension.txt"]


def test_all_writes_five_files_and_creates_dir(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "out"
    get_writer("all", out)(SEGMENT_RESULT, "talk.flac", {"max_line_width": None})
    assert _entries(out) == ["talk.json", "talk.srt", "talk.tsv", "talk.txt", "talk.vtt"]
    assert (out / "talk.srt").read_text(encoding="utf-8") == EXPECTED_SRT


def test_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(SusurrusError, match="unknown output format 'docx'"):
        get_writer("docx", tmp_path)


# ---------------------------------------------------------------- word-level subtitles


def test_words_default_one_cue_per_segment(tmp_path: Path) -> None:
    assert _write("vtt", tmp_path, WORD_RESULT) == (
        "WEBVTT\n"
        "\n"
        "00:00.000 --> 00:03.000\n"
        "The quick brown fox leaps high.\n"
        "\n"
        "01:00:01.000 --> 01:00:03.000\n"
        "jumps over\n"
        "\n"
    )


def test_words_line_width_and_count(tmp_path: Path) -> None:
    # Width 10 wraps to a second line; a third line or a >3 s pause starts a new cue.
    options = {"max_line_width": 10, "max_line_count": 2, "highlight_words": False}
    assert _write("srt", tmp_path, WORD_RESULT, options) == (
        "1\n"
        "00:00:00,000 --> 00:00:02,000\n"
        "The quick\n"
        "brown fox\n"
        "\n"
        "2\n"
        "00:00:02,100 --> 00:00:03,000\n"
        "leaps\n"
        "high.\n"
        "\n"
        "3\n"
        "01:00:01,000 --> 01:00:03,000\n"
        "jumps over\n"
        "\n"
    )
    subs = list(srt.parse((tmp_path / "talk.srt").read_text(encoding="utf-8")))
    assert [s.content for s in subs] == ["The quick\nbrown fox", "leaps\nhigh.", "jumps over"]


def test_words_line_width_alone_keeps_segments(tmp_path: Path) -> None:
    # Without max_line_count the segment boundaries are kept and lines simply wrap.
    assert _write("srt", tmp_path, WORD_RESULT, {"max_line_width": 10}) == (
        "1\n"
        "00:00:00,000 --> 00:00:03,000\n"
        "The quick\n"
        "brown fox\n"
        "leaps\n"
        "high.\n"
        "\n"
        "2\n"
        "01:00:01,000 --> 01:00:03,000\n"
        "jumps over\n"
        "\n"
    )


def test_words_max_words_per_line(tmp_path: Path) -> None:
    expected = (
        "1\n00:00:00,000 --> 00:00:00,900\nThe quick\n\n"
        "2\n00:00:01,000 --> 00:00:02,000\nbrown fox\n\n"
        "3\n00:00:02,100 --> 00:00:03,000\nleaps high.\n\n"
        "4\n01:00:01,000 --> 01:00:03,000\njumps over\n\n"
    )
    assert _write("srt", tmp_path, WORD_RESULT, {"max_words_per_line": 2}) == expected
    # Keyword arguments work like the options dict (the reference CLI passes them that way).
    assert _write("srt", tmp_path, WORD_RESULT, max_words_per_line=2) == expected


def test_words_highlight(tmp_path: Path) -> None:
    # One cue per word with it underlined; gaps between words get an un-highlighted cue.
    line = "The quick brown fox leaps high."
    assert _write("vtt", tmp_path, WORD_RESULT, {"highlight_words": True}) == (
        "WEBVTT\n\n"
        "00:00.000 --> 00:00.400\n<u>The</u> quick brown fox leaps high.\n\n"
        "00:00.400 --> 00:00.900\nThe <u>quick</u> brown fox leaps high.\n\n"
        f"00:00.900 --> 00:01.000\n{line}\n\n"
        "00:01.000 --> 00:01.500\nThe quick <u>brown</u> fox leaps high.\n\n"
        "00:01.500 --> 00:02.000\nThe quick brown <u>fox</u> leaps high.\n\n"
        f"00:02.000 --> 00:02.100\n{line}\n\n"
        "00:02.100 --> 00:02.600\nThe quick brown fox <u>leaps</u> high.\n\n"
        "00:02.600 --> 00:03.000\nThe quick brown fox leaps <u>high.</u>\n\n"
        "01:00:01.000 --> 01:00:01.600\n<u>jumps</u> over\n\n"
        "01:00:01.600 --> 01:00:01.800\njumps over\n\n"
        "01:00:01.800 --> 01:00:03.000\njumps <u>over</u>\n\n"
    )
    captions = webvtt.read(tmp_path / "talk.vtt").captions
    assert len(captions) == 11
    starts = [c.start_in_seconds for c in captions]
    assert starts == sorted(starts)


def test_words_highlight_keeps_line_break_outside_tag(tmp_path: Path) -> None:
    options = {"max_line_width": 10, "max_line_count": 2, "highlight_words": True}
    text = _write("srt", tmp_path, WORD_RESULT, options)
    # Cue 3 is the plain gap cue 00:00:00,900 --> 00:00:01,000.
    assert "4\n00:00:01,000 --> 00:00:01,500\nThe quick\n<u>brown</u> fox\n\n" in text


def test_tsv_and_txt_ignore_words(tmp_path: Path) -> None:
    assert _write("txt", tmp_path, WORD_RESULT) == "The quick brown fox leaps high.\njumps over\n"
    assert _write("tsv", tmp_path, WORD_RESULT) == (
        "start\tend\ttext\n0\t3000\tThe quick brown fox leaps high.\n3601000\t3603000\tjumps over\n"
    )


# ---------------------------------------------------------------- atomic writes


def test_atomic_write_leaves_only_final_files(tmp_path: Path) -> None:
    for fmt in ("txt", "vtt", "srt", "tsv", "json"):
        get_writer(fmt, tmp_path)(SEGMENT_RESULT, "a.wav", None)
        get_writer(fmt, tmp_path)(SEGMENT_RESULT, "a.wav", None)  # overwrite in place
    assert _entries(tmp_path) == ["a.json", "a.srt", "a.tsv", "a.txt", "a.vtt"]


def _explode_midway(self, result, file, options=None, **kwargs):
    file.write("1\n00:00:00,000 --> ")
    file.flush()
    raise RuntimeError("boom")


def test_failure_midwrite_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writers.WriteSRT, "write_result", _explode_midway)
    with pytest.raises(RuntimeError, match="boom"):
        get_writer("srt", tmp_path)(SEGMENT_RESULT, "talk.wav", None)
    assert _entries(tmp_path) == []


def test_failure_midwrite_keeps_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "talk.srt").write_text("previous transcript\n", encoding="utf-8")
    monkeypatch.setattr(writers.WriteSRT, "write_result", _explode_midway)
    with pytest.raises(RuntimeError):
        get_writer("srt", tmp_path)(SEGMENT_RESULT, "talk.wav", None)
    assert _entries(tmp_path) == ["talk.srt"]
    assert (tmp_path / "talk.srt").read_text(encoding="utf-8") == "previous transcript\n"


def test_os_error_becomes_susurrus_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writers.os, "fsync", no_space)
    with pytest.raises(SusurrusError, match=r"could not write .*talk\.txt: No space left"):
        get_writer("txt", tmp_path)(SEGMENT_RESULT, "talk.wav", None)
    assert _entries(tmp_path) == []


def test_final_file_mode_follows_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        get_writer("txt", tmp_path)(SEGMENT_RESULT, "talk.wav", None)
    finally:
        os.umask(old)
    assert (tmp_path / "talk.txt").stat().st_mode & 0o777 == 0o644
