"""Subtitle cue limits (max_cps, min/max cue duration) on a realistic three-minute transcript,
and the guarantee that with the limits off the srt and vtt files are byte for byte unchanged."""

from __future__ import annotations

import copy
import hashlib
import io
import random
import sys
import types
import warnings
from datetime import timedelta

import numpy as np
import pytest
import srt
import webvtt

from susurrus.writers import MAX_CUE_DELAY_S, WriteSRT, WriteVTT

# (sentence, characters per second while speaking, pause after it in seconds)
SCRIPT = [
    ("Good evening, and welcome to the programme.", 13.0, 0.6),
    (
        "Tonight we are looking at how cities plan for floods, and what happens when the plans "
        "fail.",
        14.0,
        0.4,
    ),
    (
        "Our first guest has spent twenty years studying river defences along the northern coast.",
        14.5,
        1.2,
    ),
    ("Thank you.", 8.0, 3.6),
    ("So, where do we start?", 12.0, 0.5),
    (
        "Well, the honest answer is that most of the barriers we rely on were designed for a "
        "climate that no longer exists.",
        15.0,
        0.3,
    ),
    (
        "They were built to a standard that assumed a once-in-a-century storm, and we now see "
        "those storms every decade or so.",
        15.5,
        0.8,
    ),
    ("That changes the arithmetic completely.", 12.5, 4.2),
    # One long word said fast: it alone is over 17 characters a second.
    ("Supercalifragilisticexpialidocious!", 40.0, 1.5),
    ("Sorry, that was my phone.", 13.0, 2.0),
    # The very fast passage: 22 characters a second with barely a gap between words.
    (
        "And then of course there is the question of money, because nobody wants to pay for a "
        "wall that might never be needed, and by the time it is needed it is already too late "
        "to build it.",
        22.0,
        3.4,
    ),
    ("Right.", 9.0, 0.9),
    ("Let us take a short break and come back to that.", 13.5, 5.0),
    ("We are back.", 11.0, 0.7),
    ("Before the break you said the arithmetic had changed.", 14.0, 0.5),
    ("Can you give us an example that our viewers might recognise from their own town?", 14.5, 1.0),
    ("Certainly.", 10.0, 0.6),
    (
        "Take the market square in my home town, which flooded three times in the last ten years "
        "after not flooding at all for the previous fifty.",
        15.0,
        0.4,
    ),
    ("The shops there now keep sandbags by the door as a matter of routine.", 14.0, 3.2),
    ("Is that sustainable?", 11.0, 0.8),
    ("No.", 6.0, 0.4),
    (
        "Not in the long run, and the insurers have already noticed, which is why premiums in "
        "that street have doubled.",
        15.0,
        1.1,
    ),
    ("What would you do if you were in charge?", 13.0, 0.6),
    (
        "I would start by giving the water somewhere to go, upstream, long before it reaches the "
        "houses.",
        14.5,
        0.5,
    ),
    (
        "Wetlands, flood meadows, even car parks that are designed to fill up once a year.",
        14.0,
        0.9,
    ),
    ("It is cheaper than concrete and it works with the river rather than against it.", 14.5, 4.5),
    (
        "And what about the people who live right on the coast, where there is no upstream?",
        14.5,
        0.7,
    ),
    ("That is harder, and I will not pretend otherwise.", 13.0, 0.6),
    (
        "Some places will need to move, slowly, over a generation, and we should start planning "
        "that conversation now rather than after the next disaster.",
        15.0,
        3.8,
    ),
    ("Thank you for joining us.", 12.0, 0.5),
    ("That is all we have time for tonight.", 13.0, 0.5),
    ("Good night.", 9.0, 0.0),
]


def build_result(script: list[tuple[str, float, float]] = SCRIPT, start: float = 1.2) -> dict:
    """One segment per sentence; each word lasts its length at the sentence's rate, +-20 %.

    After the fifth sentence comes a segment the transcriber cleared (zero length, no text).
    """
    rng = random.Random(7)
    segments: list[dict] = []
    t = start
    for n, (sentence, cps, pause) in enumerate(script):
        words = []
        gap = 0.0
        for token in sentence.split(" "):
            spoken = max(0.12, (len(token) + 1) / cps * rng.uniform(0.8, 1.2))
            # A breath after a comma; fast talkers barely pause at all.
            gap = 0.18 if token.endswith(",") and cps < 20 else 0.02
            words.append(
                {
                    "word": " " + token,
                    "start": round(t, 3),
                    "end": round(t + spoken, 3),
                    "probability": 0.9,
                }
            )
            t += spoken + gap
        t -= gap
        text = "".join(w["word"] for w in words)
        segments.append(
            {"seek": 0, "start": words[0]["start"], "end": words[-1]["end"], "text": text}
        )
        segments[-1]["words"] = words
        if n == 4:
            segments.append({"seek": 0, "start": round(t, 3), "end": round(t, 3), "text": ""})
            segments[-1]["words"] = []
        t += pause
    for i, segment in enumerate(segments):
        segment["id"] = i
    return {"text": "".join(s["text"] for s in segments), "segments": segments, "language": "en"}


RESULT = build_result()


def without_words(result: dict) -> dict:
    segments = [{k: v for k, v in s.items() if k != "words"} for s in result["segments"]]
    return {**result, "segments": segments}


def render(writer: type, result: dict, options: dict | None = None, **kwargs) -> str:
    out = io.StringIO()
    writer(".").write_result(result, out, options, **kwargs)
    return out.getvalue()


def parse(text: str, extension: str) -> list[tuple[float, float, str]]:
    """(start, end, text) of each cue, read back with the srt or webvtt library."""
    if extension == "srt":
        subs = list(srt.parse(text))
        assert [s.index for s in subs] == list(range(1, len(subs) + 1))
        return [(s.start.total_seconds(), s.end.total_seconds(), s.content) for s in subs]
    captions = webvtt.from_string(text).captions
    # start_in_seconds drops the milliseconds: read the normalised HH:MM:SS.mmm strings.
    return [(_vtt_seconds(c.start), _vtt_seconds(c.end), c.raw_text) for c in captions]


def _vtt_seconds(stamp: str) -> float:
    hours, minutes, seconds = stamp.split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def chars(text: str) -> int:
    return len(text.replace("\n", ""))


def check_well_formed(cues: list[tuple[float, float, str]]) -> None:
    """In order, no overlaps, no empty text, positive durations."""
    assert cues
    previous_end = 0.0
    for start, end, text in cues:
        assert text.strip(), "empty cue"
        assert start >= previous_end - 1e-9, f"overlap at {start}"
        assert end > start
        previous_end = end


def spoken_spans(
    cues: list[tuple[float, float, str]], result: dict = RESULT
) -> list[tuple[float, float]]:
    """When each cue's words are spoken; asserts the cues hold every word, in order."""
    words = [w for s in result["segments"] for w in s.get("words", [])]
    spans = []
    position = 0
    for _, _, text in cues:
        n = len(text.split())
        assert [w["word"].strip() for w in words[position : position + n]] == text.split()
        spans.append((words[position]["start"], words[position + n - 1]["end"]))
        position += n
    assert position == len(words)
    return spans


WRITERS = [WriteSRT, WriteVTT]


def test_the_transcript_is_realistic() -> None:
    segments = RESULT["segments"]
    assert segments[-1]["end"] > 180
    pauses = [b["start"] - a["end"] for a, b in zip(segments, segments[1:])]
    assert sum(p > 3 for p in pauses) >= 5
    fast = [s for s in segments if s["text"] and len(s["text"]) / (s["end"] - s["start"]) > 19]
    assert len(fast) == 2  # the long word and the fast passage


# ---------------------------------------------------------------- limits off: nothing changes

# sha256 (first 16 hex digits) of the writers' output for RESULT, taken before the cue limits
# were added. "segments" is the segment-level form without the cleared segment (the only input
# whose output changed: an empty cue is no longer written, see test_empty_segments_are_skipped).
BEFORE = {
    ("plain", "srt"): "521eccdd7e58c58f",
    ("plain", "vtt"): "7ea1b65329f64746",
    ("width_count", "srt"): "43a991e56746ee8c",
    ("width_count", "vtt"): "5e92eb291f8f2771",
    ("width", "srt"): "978505e0043907c9",
    ("width", "vtt"): "cd89edd7fdbd2a35",
    ("words_per_line", "srt"): "89ca1f0059529d79",
    ("words_per_line", "vtt"): "593b4cc5bdd40616",
    ("highlight", "srt"): "809e6c72fe660039",
    ("highlight", "vtt"): "246a90710e54b0cc",
    ("width_count_highlight", "srt"): "f0a4a0ed1e11ad69",
    ("width_count_highlight", "vtt"): "be2d3e810eeebbcf",
    ("segments", "srt"): "521eccdd7e58c58f",
    ("segments", "vtt"): "7ea1b65329f64746",
}
VARIANTS = {
    "plain": {},
    "width_count": {"max_line_width": 42, "max_line_count": 2},
    "width": {"max_line_width": 42},
    "words_per_line": {"max_words_per_line": 5},
    "highlight": {"highlight_words": True},
    "width_count_highlight": {"max_line_width": 42, "max_line_count": 2, "highlight_words": True},
}


@pytest.mark.parametrize("writer", WRITERS, ids=lambda w: w.extension)
@pytest.mark.parametrize("variant", [*VARIANTS, "segments"])
def test_limits_off_output_unchanged(writer: type, variant: str) -> None:
    if variant == "segments":
        result = without_words(RESULT)
        result["segments"] = [s for s in result["segments"] if s["text"]]
        options: dict = {}
    else:
        result, options = RESULT, dict(VARIANTS[variant])
    # Explicit None / 0 for the new options is the same as leaving them out.
    options.update(max_cps=None, min_cue_duration=None, max_cue_duration=0)
    text = render(writer, result, options)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    assert digest == BEFORE[variant, writer.extension]
    check_well_formed(parse(text, writer.extension))


def test_input_is_not_modified() -> None:
    result = copy.deepcopy(RESULT)
    options = {"max_line_width": 42, "max_line_count": 2, "max_cps": 17, "max_cue_duration": 5}
    render(WriteSRT, result, options)
    render(WriteVTT, result, {**options, "highlight_words": True})
    assert result == RESULT


# ---------------------------------------------------------------- limits on

LIMITS = [
    {"max_cps": 17},
    {"max_cps": 17, "min_cue_duration": 1.5},
    {"max_cps": 17, "max_cue_duration": 5.0},
    {"max_cps": 15, "min_cue_duration": 1.2, "max_cue_duration": 6.0},
    {"min_cue_duration": 2.0},
    {"max_cue_duration": 3.0},
]


@pytest.mark.parametrize("writer", WRITERS, ids=lambda w: w.extension)
@pytest.mark.parametrize("limits", LIMITS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_limits_hold_with_line_layout(writer: type, limits: dict) -> None:
    options = {"max_line_width": 42, "max_line_count": 2, **limits}
    cues = parse(render(writer, RESULT, options), writer.extension)
    check_well_formed(cues)
    for start, end, text in cues:
        lines = text.split("\n")
        assert len(lines) <= 2
        assert all(len(line) <= 42 for line in lines)
        duration = end - start
        if "max_cps" in limits:
            assert chars(text) / duration <= limits["max_cps"], (start, text)
        if "min_cue_duration" in limits:
            assert duration >= limits["min_cue_duration"] - 1e-9, (start, text)
        if "max_cue_duration" in limits:
            assert duration <= limits["max_cue_duration"] + 1e-9, (start, text)
    for (start, end, text), (first, last) in zip(cues, spoken_spans(cues)):
        # Never before its words, never later than the allowed delay, and on screen at least
        # until they have been said (unless max_cue_duration cuts a long word short).
        assert first - 1e-9 <= start <= first + MAX_CUE_DELAY_S + 1e-9
        assert end >= last - 1e-9 or len(text.split()) == 1


@pytest.mark.parametrize("writer", WRITERS, ids=lambda w: w.extension)
def test_limits_hold_with_segment_cues(writer: type) -> None:
    # No line layout: one cue per segment, split only by max_cue_duration.
    cues = parse(render(writer, RESULT, max_cps=17.0, max_cue_duration=7.0), writer.extension)
    check_well_formed(cues)
    assert all(chars(t) / (e - s) <= 17 and e - s <= 7 + 1e-9 for s, e, t in cues)
    # Splits fall at sentence and clause ends where there is one.
    pieces = [t for _, _, t in cues if t.count(" ") > 3]
    assert sum(t.endswith((".", ",", "?", "!")) for t in pieces) / len(pieces) > 0.8


def test_fast_passage_is_delayed_then_catches_up() -> None:
    options = {"max_line_width": 42, "max_line_count": 2, "max_cps": 17}
    cues = parse(render(WriteSRT, RESULT, options), "srt")
    spans = spoken_spans(cues)
    first = next(i for i, c in enumerate(cues) if "And then of course" in c[2])
    last = next(i for i, c in enumerate(cues) if "too late" in c[2])
    delays = [cues[i][0] - spans[i][0] for i in range(first, last + 1)]
    assert len(delays) >= 3
    assert delays == sorted(delays) and 0 < delays[-1] <= MAX_CUE_DELAY_S
    # The pause after the passage absorbs the delay: "Right." is on time.
    assert cues[last + 1][2].startswith("Right.")
    assert cues[last + 1][0] == pytest.approx(spans[last + 1][0])


def test_a_word_too_fast_to_read_lasts_into_the_pause() -> None:
    word = "Supercalifragilisticexpialidocious!"
    cues = parse(render(WriteVTT, RESULT, max_cps=17, max_cue_duration=3.0), "vtt")
    i = next(i for i, c in enumerate(cues) if c[2] == word)
    start, end, _ = cues[i]
    spoken = spoken_spans(cues)[i]
    assert len(word) / (spoken[1] - spoken[0]) > 30
    assert start == pytest.approx(spoken[0])
    assert end - start == pytest.approx(len(word) / 17, abs=0.002)


def test_when_the_delay_runs_out_reading_speed_gives_way() -> None:
    # Two minutes of non-stop speech at 30 characters a second: no pause to catch up in.
    rng = random.Random(3)
    vocabulary = "the of a river flood plan money wall storm town coast water barrier".split()
    sentence = " ".join(rng.choice(vocabulary) for _ in range(700))
    result = build_result([(sentence, 30.0, 0.0)])
    options = {"max_line_width": 42, "max_line_count": 2, "max_cps": 17, "min_cue_duration": 1}
    cues = parse(render(WriteSRT, result, options), "srt")
    check_well_formed(cues)
    words = [w for w in result["segments"][0]["words"]]
    position = 0
    for start, _, text in cues:
        n = len(text.split())
        # Each cue shows while its own words are still being spoken or just after.
        assert words[position]["start"] - 1e-9 <= start
        assert start <= words[position]["start"] + MAX_CUE_DELAY_S + 1e-9
        position += n
    rates = [chars(t) / (e - s) for s, e, t in cues]
    # The documented compromise: most cues still get more reading time than spoken time.
    assert np.median(rates) < 30
    assert max(rates) > 17


@pytest.mark.parametrize("writer", WRITERS, ids=lambda w: w.extension)
def test_highlighted_words_with_limits(writer: type) -> None:
    options = {
        "max_line_width": 42,
        "max_line_count": 2,
        "highlight_words": True,
        "max_cps": 17,
        "min_cue_duration": 1.0,
    }
    cues = parse(render(writer, RESULT, options), writer.extension)
    check_well_formed(cues)
    plain = parse(render(writer, RESULT, {**options, "highlight_words": False}), writer.extension)
    # The highlighted cues exactly tile each plain cue, one underlined word at a time.
    for start, end, text in plain:
        inside = [c for c in cues if start - 1e-9 <= c[0] and c[1] <= end + 1e-9]
        assert inside[0][0] == pytest.approx(start) and inside[-1][1] == pytest.approx(end)
        assert all(c[2].replace("<u>", "").replace("</u>", "") == text for c in inside)
        assert sum("<u>" in c[2] for c in inside) == len(text.split())


# ---------------------------------------------------------------- cue text hygiene


@pytest.mark.parametrize("writer", WRITERS, ids=lambda w: w.extension)
@pytest.mark.parametrize("limits", [{}, {"max_cps": 17}])
def test_empty_segments_are_skipped(writer: type, limits: dict) -> None:
    # A cleared segment in a segment-level result: the reference writes an empty cue for it.
    result = without_words(RESULT)
    assert any(s["text"] == "" for s in result["segments"])
    cues = parse(render(writer, result, limits), writer.extension)
    check_well_formed(cues)
    assert len(cues) == len(result["segments"]) - 1


@pytest.mark.parametrize("writer", WRITERS, ids=lambda w: w.extension)
def test_first_segment_cleared_without_word_timestamps(writer: type) -> None:
    # The reference transcriber gives a cleared segment "words": [] even without word
    # timestamps; its writers then drop every other cue. Here they fall back to segment cues.
    result = without_words(RESULT)
    result["segments"][0] = {**result["segments"][0], "text": "", "words": []}
    cues = parse(render(writer, result), writer.extension)
    check_well_formed(cues)
    assert len(cues) == len(result["segments"]) - 2


@pytest.mark.parametrize("writer", WRITERS, ids=lambda w: w.extension)
def test_arrow_in_a_word_cannot_break_the_file(writer: type) -> None:
    result = copy.deepcopy(RESULT)
    result["segments"][0]["words"][1]["word"] = " -->"
    for options in ({}, {"max_cps": 17}, {"highlight_words": True}):
        cues = parse(render(writer, result, options), writer.extension)
        check_well_formed(cues)
        assert "->" in cues[0][2] and "-->" not in cues[0][2]


def test_segment_cues_are_retimed_and_warn_when_too_long() -> None:
    result = without_words(RESULT)
    with pytest.warns(UserWarning, match="max_cue_duration needs word timestamps"):
        text = render(WriteSRT, result, max_cps=12, max_cue_duration=4.0)
    cues = parse(text, "srt")
    check_well_formed(cues)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cues = parse(render(WriteSRT, result, min_cue_duration=2.5), "srt")
    assert all(e - s >= 2.5 - 1e-9 for s, e, _ in cues)


@pytest.mark.parametrize(
    "options",
    [
        {"max_cps": -1},
        {"max_cps": float("inf")},
        {"min_cue_duration": 5, "max_cue_duration": 2},
        {"max_cue_duration": float("nan")},
    ],
)
def test_bad_limits(options: dict) -> None:
    with pytest.raises(ValueError):
        render(WriteSRT, RESULT, options)


def test_srt_times_are_exact_milliseconds() -> None:
    cues = list(srt.parse(render(WriteSRT, RESULT, max_cps=17, min_cue_duration=1.3)))
    assert all(c.start % timedelta(milliseconds=1) == timedelta(0) for c in cues)


# ---------------------------------------------------------------- command line


class _Model:
    is_multilingual = True
    dims = types.SimpleNamespace(n_mels=80)


@pytest.fixture
def fake_run(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """Run the CLI with a stand-in model and transcriber; returns (exit code, transcribe kwargs)."""
    from susurrus import load

    calls: list[dict] = []

    def transcribe_many(model, audios, *, options, **kwargs):
        for audio in audios:
            calls.append({"word_timestamps": options.word_timestamps})
            yield audio, copy.deepcopy(RESULT)

    monkeypatch.setattr(load, "load_model", lambda *a, **k: _Model())
    module = sys.modules["susurrus.transcribe"]
    monkeypatch.setattr(module, "read_recording", lambda *a, **k: np.full(16000, 0.1, np.float32))
    monkeypatch.setattr(module, "transcribe_many", transcribe_many)

    def run(*argv: str) -> tuple[int, dict | None]:
        from susurrus.cli import transcribe_main

        calls.clear()
        code = transcribe_main(["talk.wav", "-o", str(tmp_path), "-f", "srt", *argv])
        return code, (calls[0] if calls else None)

    return run


def test_cli_cue_flags_turn_on_word_timestamps(fake_run, tmp_path) -> None:
    code, kwargs = fake_run("--max_cps", "17", "--max_line_width", "42", "--max_line_count", "2")
    assert code == 0 and kwargs is not None and kwargs["word_timestamps"] is True
    cues = parse((tmp_path / "talk.srt").read_text(encoding="utf-8"), "srt")
    check_well_formed(cues)
    assert all(chars(t) / (e - s) <= 17 for s, e, t in cues)
    code, kwargs = fake_run("--min_cue_duration", "1.5", "--max_cue_duration", "5")
    assert code == 0 and kwargs["word_timestamps"] is True
    cues = parse((tmp_path / "talk.srt").read_text(encoding="utf-8"), "srt")
    assert all(1.5 - 1e-9 <= e - s <= 5 + 1e-9 for s, e, _ in cues)
    # Without them nothing changes: --max_line_width still asks for --word_timestamps.
    code, kwargs = fake_run()
    assert code == 0 and kwargs["word_timestamps"] is False
    with pytest.raises(SystemExit):
        fake_run("--max_line_width", "42")


@pytest.mark.parametrize(
    "argv",
    [
        ("--max_cps", "0"),
        ("--max_cps", "inf"),
        ("--min_cue_duration", "-1"),
        ("--min_cue_duration", "4", "--max_cue_duration", "2"),
    ],
)
def test_cli_rejects_bad_cue_flags(fake_run, argv: tuple[str, ...], capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        fake_run(*argv)
    assert exc.value.code == 2
    assert "cue_duration" in capsys.readouterr().err or "max_cps" in argv[0]
