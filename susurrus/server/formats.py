"""Request fields to transcribe() options, and results to OpenAI's response formats."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import SusurrusError
from ..options import parse_bool
from ..tokenizer import LANGUAGES, language_code
from ..writers import WriteSRT, WriteVTT


class ApiError(Exception):
    """An error answered as OpenAI's JSON error object with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
MEDIA_TYPES = {
    "json": "application/json",
    "verbose_json": "application/json",
    "text": "text/plain; charset=utf-8",
    "srt": "application/x-subrip; charset=utf-8",
    "vtt": "text/vtt; charset=utf-8",
}



def _optional(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(value: str) -> Any:
        return None if value.strip().lower() in ("none", "null", "") else kind(value)

    return parse


def _finite(value: str) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"expected a finite number, got {value!r}")
    return number


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError(f"expected a positive integer, got {value!r}")
    return number


def _positive(value: str) -> float:
    number = _finite(value)
    if number <= 0:
        raise ValueError(f"expected a positive number, got {value!r}")
    return number


# susurrus's own options, beyond OpenAI's: transcribe() keyword arguments.
DECODE_FIELDS: dict[str, Callable[[str], Any]] = {
    "beam_size": _optional(_positive_int),
    "best_of": _optional(_positive_int),
    "patience": _optional(_positive),
    "length_penalty": _optional(_finite),
    "temperature_increment_on_fallback": _optional(_finite),
    "compression_ratio_threshold": _optional(_finite),
    "logprob_threshold": _optional(_finite),
    "no_speech_threshold": _optional(_finite),
    "condition_on_previous_text": parse_bool,
    "carry_initial_prompt": parse_bool,
    "word_timestamps": parse_bool,
    "vad": parse_bool,
    "hallucination_silence_threshold": _optional(_positive),
    "suppress_tokens": str,
}
# Subtitle layout for srt and vtt, as the CLI's flags of the same names.
LAYOUT_FIELDS: dict[str, Callable[[str], Any]] = {
    "max_line_width": _optional(_positive_int),
    "max_line_count": _optional(_positive_int),
    "max_words_per_line": _optional(_positive_int),
    "highlight_words": parse_bool,
    "max_cps": _optional(_positive),
    "min_cue_duration": _optional(_positive),
    "max_cue_duration": _optional(_positive),
}
# The CLI's defaults, so a request gives what `susurrus FILE` gives.
DEFAULTS: dict[str, Any] = {
    "beam_size": 5,
    "best_of": 5,
    "temperature_increment_on_fallback": 0.2,
    "suppress_tokens": "-1",
}


@dataclass
class Request:
    """One parsed transcription request."""

    model: str | None
    response_format: str
    stream: bool
    options: dict[str, Any]
    layout: dict[str, Any] = field(default_factory=dict)
    words: bool = False
    segments: bool = True


def parse_fields(fields: dict[str, list[str]], task: str, multilingual: bool) -> Request:
    """The request's options from its form fields; ApiError 400 on a bad value."""

    def one(name: str) -> str | None:
        values = fields.get(name)
        return values[-1] if values else None

    def convert(name: str, kind: Callable[[str], Any]) -> Any:
        try:
            return kind(one(name))
        except (TypeError, ValueError) as exc:
            raise ApiError(400, f"invalid value for '{name}': {exc}", param=name) from None

    response_format = (one("response_format") or "json").strip()
    if response_format not in RESPONSE_FORMATS:
        raise ApiError(
            400,
            f"'{response_format[:40]}' is not one of {', '.join(RESPONSE_FORMATS)} - "
            "'response_format'",
            param="response_format",
        )
    options: dict[str, Any] = dict(DEFAULTS, task=task)
    for name, kind in DECODE_FIELDS.items():
        if one(name) is not None:
            options[name] = convert(name, kind)
    layout = {name: convert(name, kind) for name, kind in LAYOUT_FIELDS.items() if one(name)}

    language = one("language")
    if language and language.strip():
        try:
            options["language"] = language_code(language)
        except SusurrusError:
            raise ApiError(
                400, f"unsupported language {language[:40]!r}", param="language"
            ) from None
    if not multilingual:
        if task == "translate":
            raise ApiError(400, "this model is English-only and cannot translate", param="model")
        options["language"] = "en"
    prompt = one("prompt")
    if prompt:
        options["initial_prompt"] = prompt
    temperature = convert("temperature", _finite) if one("temperature") is not None else 0.0
    if not 0.0 <= temperature <= 1.0:
        raise ApiError(400, "temperature must be between 0 and 1", param="temperature")
    increment = options.pop("temperature_increment_on_fallback")
    if increment is not None and increment > 0:
        # The CLI's exact values (0.6000000000000001 and all), so the outputs match it.
        options["temperature"] = tuple(np.arange(temperature, 1.0 + 1e-6, increment).tolist())
    else:
        options["temperature"] = temperature

    granularities = set(fields.get("timestamp_granularities[]", [])) | set(
        fields.get("timestamp_granularities", [])
    )
    if granularities - {"word", "segment"}:
        raise ApiError(
            400,
            "timestamp_granularities may only hold 'word' and 'segment'",
            param="timestamp_granularities",
        )
    words = "word" in granularities
    if words and response_format != "verbose_json":
        raise ApiError(
            400,
            "timestamp_granularities requires response_format verbose_json",
            param="timestamp_granularities",
        )
    if any(layout.get(n) for n in ("max_cps", "min_cue_duration", "max_cue_duration")):
        options["word_timestamps"] = True
    if words:
        options["word_timestamps"] = True
    word_layout = ("max_line_width", "max_line_count", "max_words_per_line", "highlight_words")
    if not options.get("word_timestamps") and any(layout.get(n) for n in word_layout):
        raise ApiError(400, "subtitle line options require word_timestamps=true", param="layout")
    stream = convert("stream", parse_bool) if one("stream") is not None else False
    return Request(
        model=(one("model") or "").strip() or None,
        response_format=response_format,
        stream=stream,
        options=options,
        layout=layout,
        words=words,
        segments=not granularities or "segment" in granularities,
    )


def _segment(segment: dict) -> dict:
    return {
        "id": segment["id"],
        "seek": segment["seek"],
        "start": segment["start"],
        "end": segment["end"],
        "text": segment["text"],
        "tokens": list(segment["tokens"]),
        "temperature": segment["temperature"],
        "avg_logprob": segment["avg_logprob"],
        "compression_ratio": segment["compression_ratio"],
        "no_speech_prob": segment["no_speech_prob"],
    }


def language_name(code: str | None) -> str:
    """OpenAI names languages in full, lower case ("english")."""
    return LANGUAGES.get(code or "", code or "")


def render(result: dict, request: Request, task: str, duration: float) -> tuple[Any, str]:
    """(body, media type): a dict for the JSON formats, else text."""
    text = result["text"].strip()
    fmt = request.response_format
    if fmt == "json":
        return {"text": text, "usage": {"type": "duration", "seconds": math.ceil(duration)}}, (
            MEDIA_TYPES[fmt]
        )
    if fmt == "verbose_json":
        body: dict[str, Any] = {
            "task": task,
            "language": language_name(result.get("language")),
            "duration": round(duration, 3),
            "text": text,
        }
        if request.segments:
            body["segments"] = [_segment(s) for s in result["segments"]]
        if request.words:
            body["words"] = [
                {"word": w["word"].strip(), "start": w["start"], "end": w["end"]}
                for s in result["segments"]
                for w in s.get("words") or ()
            ]
        body["usage"] = {"type": "duration", "seconds": math.ceil(duration)}
        return body, MEDIA_TYPES[fmt]
    if fmt == "text":
        return text + "\n" if text else "", MEDIA_TYPES[fmt]
    writer = WriteSRT(".") if fmt == "srt" else WriteVTT(".")
    out = io.StringIO()
    writer.write_result(result, out, request.layout)
    return out.getvalue(), MEDIA_TYPES[fmt]


def stream_segment(segment: dict, duration: float) -> dict:
    """A `transcript.text.delta` event; `segment` (times, text) is susurrus's addition."""
    return {
        "type": "transcript.text.delta",
        "delta": segment["text"],
        "logprobs": None,
        "segment": {
            "id": segment["id"],
            "start": segment["start"],
            "end": segment["end"],
            "text": segment["text"],
        },
        "duration": round(duration, 3),
    }


def stream_done(result: dict, task: str, duration: float) -> dict:
    return {
        "type": "transcript.text.done",
        "text": result["text"].strip(),
        "logprobs": None,
        # susurrus's additions, for clients that want the whole result at the end.
        "task": task,
        "language": language_name(result.get("language")),
        "duration": round(duration, 3),
        "segments": [_segment(s) for s in result["segments"]],
    }
