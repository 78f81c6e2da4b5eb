"""Transcript writers (txt, vtt, srt, tsv, json) whose files match the reference whisper tool's
byte for byte; every file is written atomically so an interrupted run leaves no partial output."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TextIO

from .errors import SusurrusError

# Options that shape word-level subtitles, accepted in the options dict or as keyword arguments.
WORD_OPTIONS = ("max_line_width", "max_line_count", "highlight_words", "max_words_per_line")
# Cue timing limits for srt and vtt, beyond the reference; each is off unless set. See
# SubtitlesWriter.iterate_result.
CUE_OPTIONS = ("max_cps", "min_cue_duration", "max_cue_duration")

# To give fast speech its reading time, a cue may appear at most this long after its first word;
# beyond that the previous cue is cut short instead (and may then break max_cps).
MAX_CUE_DELAY_S = 2.0

# A word starting more than this many seconds after the previous one opens a new cue (only when
# both max_line_width and max_line_count are set, as in the reference).
_LONG_PAUSE_S = 3.0
_UNLIMITED = 1000
_LEADING_SPACE_RE = re.compile(r"^(\s*)(.*)$")
# Word endings that make a good place to split a cue, best first.
_SENTENCE_END = tuple(".?!…。？！")
_CLAUSE_END = tuple(",;:，、；：")


def format_timestamp(
    seconds: float, always_include_hours: bool = False, decimal_marker: str = "."
) -> str:
    """[HH:]MM:SS.mmm, rounded to the millisecond; hours appear when non-zero or requested."""
    if seconds < 0:
        raise ValueError(f"non-negative timestamp expected, got {seconds}")
    total_ms = round(float(seconds) * 1000.0)
    hours, rest = divmod(total_ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1_000)
    hours_part = f"{hours:02d}:" if always_include_hours or hours > 0 else ""
    return f"{hours_part}{minutes:02d}:{secs:02d}{decimal_marker}{millis:03d}"


def _json_default(value: Any) -> Any:
    # numpy/torch scalars and arrays sneak into results; plain Python types never reach here.
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _open_temp(path: str) -> tuple[int, str]:
    directory, name = os.path.split(path)
    while True:
        tmp = os.path.join(directory, f".{name}.{secrets.token_hex(6)}.tmp")
        try:
            # 0o666 lets the umask decide the final mode, like a plain open() would.
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def _atomic_write(path: str, write: Callable[[TextIO], None]) -> None:
    fd, tmp = _open_temp(path)
    try:
        # newline="\n": identical bytes on every platform.
        with open(fd, "w", encoding="utf-8", newline="\n") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def output_stem(audio_path: str | os.PathLike) -> str:
    """The name of a recording's outputs, without their extension: its file's name
    without its own (talk.mp3: talk.txt, talk.srt, ...)."""
    return os.path.splitext(os.path.basename(os.fspath(audio_path)))[0]


class ResultWriter:
    """Writes one transcript file named after the audio file into output_dir."""

    extension: str

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.output_dir = os.fspath(output_dir)

    def output_path(self, audio_path: str | os.PathLike) -> str:
        return os.path.join(self.output_dir, f"{output_stem(audio_path)}.{self.extension}")

    def __call__(
        self,
        result: dict,
        audio_path: str | os.PathLike,
        options: dict | None = None,
        **kwargs: Any,
    ) -> None:
        path = self.output_path(audio_path)
        try:
            os.makedirs(self.output_dir, exist_ok=True)
            _atomic_write(path, lambda f: self.write_result(result, f, options, **kwargs))
        except OSError as e:
            raise SusurrusError(f"could not write {path}: {e.strerror or e}") from e

    def write_result(
        self, result: dict, file: TextIO, options: dict | None = None, **kwargs: Any
    ) -> None:
        raise NotImplementedError


class WriteTXT(ResultWriter):
    extension = "txt"

    def write_result(
        self, result: dict, file: TextIO, options: dict | None = None, **kwargs: Any
    ) -> None:
        for segment in result["segments"]:
            file.write(segment["text"].strip() + "\n")


def _first_word_start(segments: list[dict]) -> float | None:
    for segment in segments:
        for word in segment.get("words") or ():
            return word["start"]
    return segments[0]["start"] if segments else None


def _underline(word: str) -> str:
    # Keep the leading space / line break outside the tag, as the reference does.
    return _LEADING_SPACE_RE.sub(r"\1<u>\2</u>", word)


class SubtitlesWriter(ResultWriter):
    """Shared cue generation for srt and vtt."""

    always_include_hours: bool
    decimal_marker: str

    def format_timestamp(self, seconds: float) -> str:
        return format_timestamp(seconds, self.always_include_hours, self.decimal_marker)

    def iterate_result(
        self,
        result: dict,
        options: dict | None = None,
        *,
        max_line_width: int | None = None,
        max_line_count: int | None = None,
        highlight_words: bool = False,
        max_words_per_line: int | None = None,
        max_cps: float | None = None,
        min_cue_duration: float | None = None,
        max_cue_duration: float | None = None,
    ) -> Iterator[tuple[str, str, str]]:
        """Yield (start, end, text) for each cue.

        With none of the cue options set, the cues are the reference tool's (except that cues
        with no text are left out, and "-->" never reaches the text). The cue options:

        max_cps: most characters per second (line breaks not counted) a cue may ask a viewer
            to read. Cues get their reading time by lasting into the pause after them; in fast
            speech the next cue then appears a little late (at most MAX_CUE_DELAY_S after its
            first word). Where even that is not enough, the earlier cue keeps a higher rate.
        min_cue_duration: seconds every cue stays on screen, got the same way.
        max_cue_duration: longer cues are split between words, preferring sentence and clause
            ends and pauses; lengthening never takes a cue past it. A single word spoken for
            longer, or a segment without word timestamps, stays one cue.
        Splitting needs word timestamps (segments with "words"); without them the segments
            are retimed whole.
        """
        options = options or {}
        # Falsy keyword values fall back to the options dict, matching the reference.
        max_line_width = max_line_width or options.get("max_line_width")
        max_line_count = max_line_count or options.get("max_line_count")
        highlight_words = highlight_words or bool(options.get("highlight_words", False))
        max_words_per_line = max_words_per_line or options.get("max_words_per_line")
        limits = _CueLimits.from_options(
            max_cps or options.get("max_cps"),
            min_cue_duration or options.get("min_cue_duration"),
            max_cue_duration or options.get("max_cue_duration"),
        )
        # Segment boundaries are kept unless both line width and line count are given.
        preserve_segments = max_line_count is None or max_line_width is None
        max_line_width = max_line_width or _UNLIMITED
        max_words_per_line = max_words_per_line or _UNLIMITED

        segments = result["segments"]
        # Word cues as the reference: when the first segment has words. Unlike the reference,
        # a segment with text but no words (a mixed result) falls back to segment cues rather
        # than silently losing that text.
        word_mode = bool(segments) and "words" in segments[0]
        if word_mode and any("words" not in s for s in segments if s["text"].strip()):
            word_mode = False
        if not word_mode:
            if limits is None:
                for segment in segments:
                    text = _cue_text(segment["text"].strip())
                    # The reference writes an empty cue for a cleared segment; players and
                    # parsers disagree on what that means, so it is left out.
                    if text:
                        start = self.format_timestamp(segment["start"])
                        yield start, self.format_timestamp(segment["end"]), text
                return
            cues = [
                _Cue(_ms(segment["start"]), _ms(segment["end"]), text, [])
                for segment in segments
                if (text := _cue_text(segment["text"].strip()))
            ]
            if limits.max_ms is not None and any(c.end - c.start > limits.max_ms for c in cues):
                warnings.warn(
                    "max_cue_duration needs word timestamps to split cues; "
                    "longer segments are kept whole",
                    stacklevel=2,
                )
            for cue in _retime(cues, limits):
                yield self._ms_timestamp(cue.start), self._ms_timestamp(cue.end), cue.text
            return

        word_cues = _word_cues(
            segments, max_line_width, max_line_count, max_words_per_line, preserve_segments
        )
        if limits is not None:
            yield from self._limited_cues(word_cues, limits, highlight_words)
            return
        for cue in word_cues:
            words = [timing["word"] for timing in cue]
            text = "".join(words)
            if not text.strip():
                continue
            cue_start = self.format_timestamp(cue[0]["start"])
            cue_end = self.format_timestamp(cue[-1]["end"])
            if not highlight_words:
                yield cue_start, cue_end, _cue_text(text)
                continue
            # One cue per word with that word underlined, plus plain cues filling any gaps.
            previous_end = cue_start
            for i, timing in enumerate(cue):
                start = self.format_timestamp(timing["start"])
                end = self.format_timestamp(timing["end"])
                if previous_end != start:
                    yield previous_end, start, _cue_text(text)
                marked = "".join(_underline(w) if j == i else w for j, w in enumerate(words))
                yield start, end, _cue_text(marked)
                previous_end = end

    def _ms_timestamp(self, ms: int) -> str:
        return self.format_timestamp(ms / 1000.0)

    def _limited_cues(
        self, word_cues: Iterator[list[dict]], limits: _CueLimits, highlight_words: bool
    ) -> Iterator[tuple[str, str, str]]:
        cues = []
        for words in word_cues:
            cue = _Cue.from_words(words)
            if cue.text.strip():
                cues.extend(_split(cue, limits))
        for cue in _retime(cues, limits):
            start, end = self._ms_timestamp(cue.start), self._ms_timestamp(cue.end)
            if not highlight_words:
                yield start, end, _cue_text(cue.text)
                continue
            # As the reference, but word times follow the cue when retiming moved it, and stay
            # inside it, so highlighted cues never overlap their neighbours.
            shift = cue.start - _ms(cue.words[0]["start"])
            texts = [w["word"] for w in cue.words]
            previous = cue.start
            for i, timing in enumerate(cue.words):
                word_start = min(max(_ms(timing["start"]) + shift, previous), cue.end)
                word_end = min(max(_ms(timing["end"]) + shift, word_start), cue.end)
                if word_end == word_start:
                    continue
                if word_start > previous:
                    gap_start, gap_end = (
                        self._ms_timestamp(previous),
                        self._ms_timestamp(word_start),
                    )
                    yield gap_start, gap_end, _cue_text(cue.text)
                marked = "".join(_underline(w) if j == i else w for j, w in enumerate(texts))
                word_times = self._ms_timestamp(word_start), self._ms_timestamp(word_end)
                yield *word_times, _cue_text(marked)
                previous = word_end
            if previous < cue.end:
                yield self._ms_timestamp(previous), end, _cue_text(cue.text)


def _cue_text(text: str) -> str:
    # "-->" in a cue would read as a timing line.
    return text.replace("-->", "->")


def _ms(seconds: float) -> int:
    # The same rounding as format_timestamp, so limits hold on the written times.
    return round(float(seconds) * 1000.0)


def _chars(text: str) -> int:
    """Characters a viewer reads: line breaks do not count."""
    return len(text) - text.count("\n")


@dataclass
class _CueLimits:
    max_cps: float | None
    min_ms: int
    max_ms: int | None

    @classmethod
    def from_options(
        cls, max_cps: float | None, min_duration: float | None, max_duration: float | None
    ) -> _CueLimits | None:
        if not (max_cps or min_duration or max_duration):
            return None
        for name, value in (
            ("max_cps", max_cps),
            ("min_cue_duration", min_duration),
            ("max_cue_duration", max_duration),
        ):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value}")
        if min_duration and max_duration and min_duration > max_duration:
            raise ValueError(
                f"min_cue_duration ({min_duration}) is longer than max_cue_duration "
                f"({max_duration})"
            )
        return cls(
            float(max_cps) if max_cps else None,
            _ms(min_duration) if min_duration else 0,
            _ms(max_duration) if max_duration else None,
        )

    def need(self, cue: _Cue) -> int:
        """Milliseconds the cue should stay on screen: reading time or minimum duration."""
        reading = math.ceil(_chars(cue.text) * 1000 / self.max_cps) if self.max_cps else 0
        return max(reading, self.min_ms)


@dataclass
class _Cue:
    """A cue in integer milliseconds; words are its word timings (display text in "word")."""

    start: int
    end: int
    text: str
    words: list[dict]

    @classmethod
    def from_words(cls, words: list[dict]) -> _Cue:
        start = _ms(words[0]["start"])
        end = max(start, _ms(words[-1]["end"]))
        return cls(start, end, "".join(w["word"] for w in words), words)


def _split(cue: _Cue, limits: _CueLimits) -> list[_Cue]:
    """Split a cue between words until every part fits max_cue_duration, spoken and read."""
    if limits.max_ms is None or len(cue.words) < 2:
        return [cue]

    def fits(part: _Cue) -> bool:
        return max(part.end - part.start, limits.need(part)) <= limits.max_ms

    if fits(cue):
        return [cue]

    def parts(k: int) -> tuple[_Cue, _Cue]:
        rest = [dict(cue.words[k], word=cue.words[k]["word"].lstrip()), *cue.words[k + 1 :]]
        return _Cue.from_words(cue.words[:k]), _Cue.from_words(rest)

    def span(part: _Cue) -> int:
        return max(part.end - part.start, limits.need(part))

    def niceness(k: int) -> tuple[int, int]:
        before, after = cue.words[k - 1]["word"].rstrip(), cue.words[k]["word"]
        if before.endswith(_SENTENCE_END):
            rank = 3
        elif before.endswith(_CLAUSE_END):
            rank = 2
        elif after.startswith("\n"):
            rank = 1  # an existing line break
        else:
            rank = 0
        return rank, _ms(cue.words[k]["start"]) - _ms(cue.words[k - 1]["end"])

    candidates = [(k, *parts(k)) for k in range(1, len(cue.words))]
    fitting = [c for c in candidates if fits(c[1]) and fits(c[2])]
    if fitting:
        # One split does it: take the most natural place, then the most even one.
        _, left, right = max(fitting, key=lambda c: (*niceness(c[0]), -max(span(c[1]), span(c[2]))))
        return [left, right]
    # Several splits needed: halve as evenly as possible and go on with each half.
    _, left, right = min(candidates, key=lambda c: max(span(c[1]), span(c[2])))
    return _split(left, limits) + _split(right, limits)


def _retime(cues: list[_Cue], limits: _CueLimits) -> list[_Cue]:
    """Give each cue its reading time / minimum duration without overlapping its neighbours.

    A cue lasts into the pause after it; when there is none, the next cue starts later, by at
    most MAX_CUE_DELAY_S, after which the earlier cue is cut short. Lengthening never takes a
    cue past max_cue_duration, and never shortens the time its words are spoken.
    """
    max_delay = _ms(MAX_CUE_DELAY_S)
    out: list[_Cue] = []
    for cue in cues:
        start = cue.start
        if out and out[-1].end > start:
            start = out[-1].end
            if start - cue.start > max_delay:
                start = max(cue.start + max_delay, out[-1].start + 1)
                out[-1].end = start
        end = max(cue.end, start + limits.need(cue), start + 1)
        if limits.max_ms is not None:
            end = max(min(end, start + limits.max_ms), cue.end, start + 1)
        out.append(_Cue(start, end, cue.text, cue.words))
    return out


def _word_cues(
    segments: list[dict],
    max_line_width: int,
    max_line_count: int | None,
    max_words_per_line: int,
    preserve_segments: bool,
) -> Iterator[list[dict]]:
    """Group word timings into cues; a word's text gets a leading "\\n" when it opens a new line
    inside a cue, and is stripped when it starts a line."""
    line_len = 0
    line_count = 1
    cue: list[dict] = []
    last_start = _first_word_start(segments) or 0.0
    for segment in segments:
        words = segment.get("words") or []
        for chunk_start in range(0, len(words), max_words_per_line):
            chunk = words[chunk_start : chunk_start + max_words_per_line]
            for i, original in enumerate(chunk):
                timing = dict(original)
                long_pause = not preserve_segments and timing["start"] - last_start > _LONG_PAUSE_S
                has_room = line_len + len(timing["word"]) <= max_line_width
                # Each segment (and each max_words_per_line chunk) opens a new cue.
                seg_break = i == 0 and len(cue) > 0 and preserve_segments
                if line_len > 0 and has_room and not long_pause and not seg_break:
                    line_len += len(timing["word"])
                else:
                    timing["word"] = timing["word"].strip()
                    cue_full = max_line_count is not None and (
                        long_pause or line_count >= max_line_count
                    )
                    if (len(cue) > 0 and cue_full) or seg_break:
                        yield cue
                        cue = []
                        line_count = 1
                    elif line_len > 0:
                        line_count += 1
                        timing["word"] = "\n" + timing["word"]
                    line_len = len(timing["word"].strip())
                cue.append(timing)
                last_start = timing["start"]
    if cue:
        yield cue


class WriteVTT(SubtitlesWriter):
    extension = "vtt"
    always_include_hours = False
    decimal_marker = "."

    def write_result(
        self, result: dict, file: TextIO, options: dict | None = None, **kwargs: Any
    ) -> None:
        file.write("WEBVTT\n\n")
        for start, end, text in self.iterate_result(result, options, **kwargs):
            file.write(f"{start} --> {end}\n{text}\n\n")


class WriteSRT(SubtitlesWriter):
    extension = "srt"
    always_include_hours = True
    decimal_marker = ","

    def write_result(
        self, result: dict, file: TextIO, options: dict | None = None, **kwargs: Any
    ) -> None:
        cues = self.iterate_result(result, options, **kwargs)
        for index, (start, end, text) in enumerate(cues, start=1):
            file.write(f"{index}\n{start} --> {end}\n{text}\n\n")


class WriteTSV(ResultWriter):
    """start<TAB>end<TAB>text with integer milliseconds, immune to locale decimal separators."""

    extension = "tsv"

    def write_result(
        self, result: dict, file: TextIO, options: dict | None = None, **kwargs: Any
    ) -> None:
        file.write("start\tend\ttext\n")
        for segment in result["segments"]:
            start = round(1000 * float(segment["start"]))
            end = round(1000 * float(segment["end"]))
            text = segment["text"].strip().replace("\t", " ")
            file.write(f"{start}\t{end}\t{text}\n")


class WriteJSON(ResultWriter):
    extension = "json"

    def write_result(
        self, result: dict, file: TextIO, options: dict | None = None, **kwargs: Any
    ) -> None:
        # Default json.dump settings (ASCII escapes, no trailing newline) as the reference.
        json.dump(result, file, default=_json_default)


_WRITERS: dict[str, type[ResultWriter]] = {
    "txt": WriteTXT,
    "vtt": WriteVTT,
    "srt": WriteSRT,
    "tsv": WriteTSV,
    "json": WriteJSON,
}

OUTPUT_FORMATS = (*_WRITERS, "all")


def get_writer(
    output_format: str, output_dir: str | os.PathLike
) -> Callable[[dict, str, dict | None], None]:
    """A callable `writer(result, audio_path, options=None, **word_options)` for the format."""
    if output_format == "all":
        writers = [cls(output_dir) for cls in _WRITERS.values()]

        def write_all(
            result: dict,
            audio_path: str | os.PathLike,
            options: dict | None = None,
            **kwargs: Any,
        ) -> None:
            for writer in writers:
                writer(result, audio_path, options, **kwargs)

        return write_all
    if output_format not in _WRITERS:
        raise SusurrusError(
            f"unknown output format '{output_format}'; choose one of " + ", ".join(OUTPUT_FORMATS)
        )
    return _WRITERS[output_format](output_dir)
