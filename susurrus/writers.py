"""Transcript writers (txt, vtt, srt, tsv, json) whose files match the reference whisper tool's
byte for byte; every file is written atomically so an interrupted run leaves no partial output."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from .errors import SusurrusError

# Options that shape word-level subtitles, accepted in the options dict or as keyword arguments.
WORD_OPTIONS = ("max_line_width", "max_line_count", "highlight_words", "max_words_per_line")

# A word starting more than this many seconds after the previous one opens a new cue (only when
# both max_line_width and max_line_count are set, as in the reference).
_LONG_PAUSE_S = 3.0
_UNLIMITED = 1000
_LEADING_SPACE_RE = re.compile(r"^(\s*)(.*)$")


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


class ResultWriter:
    """Writes one transcript file named after the audio file into output_dir."""

    extension: str

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.output_dir = os.fspath(output_dir)

    def output_path(self, audio_path: str | os.PathLike) -> str:
        stem = os.path.splitext(os.path.basename(os.fspath(audio_path)))[0]
        return os.path.join(self.output_dir, f"{stem}.{self.extension}")

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
    ) -> Iterator[tuple[str, str, str]]:
        """Yield (start, end, text) for each cue."""
        options = options or {}
        # Falsy keyword values fall back to the options dict, matching the reference.
        max_line_width = max_line_width or options.get("max_line_width")
        max_line_count = max_line_count or options.get("max_line_count")
        highlight_words = highlight_words or bool(options.get("highlight_words", False))
        max_words_per_line = max_words_per_line or options.get("max_words_per_line")
        # Segment boundaries are kept unless both line width and line count are given.
        preserve_segments = max_line_count is None or max_line_width is None
        max_line_width = max_line_width or _UNLIMITED
        max_words_per_line = max_words_per_line or _UNLIMITED

        segments = result["segments"]
        if not segments or "words" not in segments[0]:
            for segment in segments:
                yield (
                    self.format_timestamp(segment["start"]),
                    self.format_timestamp(segment["end"]),
                    segment["text"].strip().replace("-->", "->"),
                )
            return

        cues = _word_cues(
            segments, max_line_width, max_line_count, max_words_per_line, preserve_segments
        )
        for cue in cues:
            cue_start = self.format_timestamp(cue[0]["start"])
            cue_end = self.format_timestamp(cue[-1]["end"])
            words = [timing["word"] for timing in cue]
            text = "".join(words)
            if not highlight_words:
                yield cue_start, cue_end, text
                continue
            # One cue per word with that word underlined, plus plain cues filling any gaps.
            previous_end = cue_start
            for i, timing in enumerate(cue):
                start = self.format_timestamp(timing["start"])
                end = self.format_timestamp(timing["end"])
                if previous_end != start:
                    yield previous_end, start, text
                marked = "".join(_underline(w) if j == i else w for j, w in enumerate(words))
                yield start, end, marked
                previous_end = end


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
