"""Every option of a transcription as one frozen value, built and checked once.

`TranscribeOptions.create(**kwargs)` takes the keyword arguments of `transcribe()` (the
reference's names); nothing downstream changes it. It pickles (for worker processes) and
has a fingerprint, so that a saved session is only resumed with the options it was made
with.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields, replace

from .decoding import DecodingOptions, check_options, suppress_token_ids
from .tokenizer import language_code
from .vad import (
    DEFAULT_MIN_SILENCE_MS,
    DEFAULT_MIN_SPEECH_MS,
    DEFAULT_SPEECH_PAD_MS,
    DEFAULT_THRESHOLD,
)

DEFAULT_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def parse_bool(text: str) -> bool:
    """A boolean option as text (the CLI's `True`/`False`, a form field's `true`): the
    usual spellings, anything else a ValueError."""
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


@dataclass(frozen=True)
class TranscribeOptions:
    # What to decode
    task: str = "transcribe"
    language: str | None = None  # None: detected from the first 30 s
    clip_timestamps: tuple[float, ...] = ()  # start, end, ... in seconds; (): everything
    vad: bool = False
    vad_threshold: float = DEFAULT_THRESHOLD
    vad_min_speech_ms: int = DEFAULT_MIN_SPEECH_MS
    vad_min_silence_ms: int = DEFAULT_MIN_SILENCE_MS
    vad_speech_pad_ms: int = DEFAULT_SPEECH_PAD_MS
    batch_size: int | None = None  # windows cut beforehand and decoded this many at once
    # Decoding of a window
    temperatures: tuple[float, ...] = DEFAULT_TEMPERATURES
    best_of: int | None = None
    beam_size: int | None = None
    patience: float | None = None
    length_penalty: float | None = None
    sample_len: int | None = None
    suppress_tokens: str | tuple[int, ...] | None = "-1"
    suppress_blank: bool = True
    without_timestamps: bool = False
    max_initial_timestamp: float | None = 1.0
    prefix: str | None = None
    fp16: bool = True
    # Fallback and silence
    compression_ratio_threshold: float | None = 2.4
    logprob_threshold: float | None = -1.0
    no_speech_threshold: float | None = 0.6
    # Context between windows
    condition_on_previous_text: bool = True
    initial_prompt: str | None = None
    carry_initial_prompt: bool = False
    # Words
    word_timestamps: bool = False
    prepend_punctuations: str = "\"'“¿([{-"
    append_punctuations: str = "\"'.。,，!！?？:：”)]}、"
    hallucination_silence_threshold: float | None = None

    @classmethod
    def create(cls, **kwargs) -> TranscribeOptions:
        """From `transcribe()`'s keyword arguments: `temperature` (one or a tuple) and the
        rest by name. Unknown names and impossible combinations raise ValueError."""
        if "temperature" in kwargs:
            t = kwargs.pop("temperature")
            kwargs["temperatures"] = (float(t),) if isinstance(t, (int, float)) else tuple(
                float(x) for x in t
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown transcription option(s): {', '.join(unknown)}")
        clips = kwargs.get("clip_timestamps")
        if clips is not None:
            parts = clips.split(",") if isinstance(clips, str) else clips
            try:
                kwargs["clip_timestamps"] = tuple(
                    float(t) for t in parts if not isinstance(t, str) or t.strip()
                )
            except (TypeError, ValueError):
                raise ValueError(
                    f"clip_timestamps must be seconds separated by commas, got {clips!r}"
                ) from None
        if kwargs.get("clip_timestamps") == (0.0,):
            kwargs["clip_timestamps"] = ()
        if isinstance(kwargs.get("suppress_tokens"), (list, tuple)):
            kwargs["suppress_tokens"] = tuple(suppress_token_ids(kwargs["suppress_tokens"]))
        if kwargs.get("language") is not None:
            kwargs["language"] = language_code(kwargs["language"])
        options = cls(**kwargs)
        options.check()
        return options

    def check(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if not self.temperatures:
            raise ValueError("at least one temperature is needed")
        for t in self.temperatures:
            # Each temperature of the ladder must make valid decoding options.
            check_options(self.decoding(t))

    def decoding(self, temperature: float, prompt: list[int] | None = None) -> DecodingOptions:
        """Options of one decoding attempt: beam search only at T=0, several samples only
        when sampling (as the reference's fallback)."""
        return DecodingOptions(
            task=self.task,
            language=self.language,
            temperature=temperature,
            sample_len=self.sample_len,
            best_of=self.best_of if temperature > 0 else None,
            beam_size=self.beam_size if temperature == 0 else None,
            patience=self.patience if temperature == 0 else None,
            length_penalty=self.length_penalty,
            prompt=prompt or None,
            prefix=self.prefix,
            suppress_tokens=self.suppress_tokens,
            suppress_blank=self.suppress_blank,
            without_timestamps=self.without_timestamps,
            max_initial_timestamp=self.max_initial_timestamp,
            fp16=self.fp16,
        )

    def with_language(self, language: str) -> TranscribeOptions:
        return replace(self, language=language)

    def thresholds(self) -> tuple[float | None, float | None, float | None]:
        return (self.compression_ratio_threshold, self.logprob_threshold, self.no_speech_threshold)

    def fingerprint(self) -> str:
        """A hash of every option: equal options, equal fingerprints, across processes."""
        text = json.dumps(asdict(self), sort_keys=True, ensure_ascii=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]
