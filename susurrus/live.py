"""Live transcription: audio that keeps arriving, words that come out while it does.

A `LiveSession` holds the audio not yet settled (at most 30 s, one model window) and,
whenever new audio has come, decodes that buffer again on a shared `Engine`: it is a
source of windows like any recording's session, so many live streams on one engine decode
in the same batches. The policy (LocalAgreement-2, as in Whisper-Streaming):

- Each decode becomes words with times through the sessions' own `finish_window` (so the
  silence check, word timestamps and hallucination skip are those of recordings). A word
  is *confirmed* once two successive decodes agree on it (the longest common prefix of
  their words after the confirmed ones, which are found again in each decode by their
  text), and the decode heard audio after it: a little for a word both decodes are sure
  of; for one they are not, a second, and the word after it agreed on and sure (or a
  pause after it; at most 8 s); and no speech the decode skipped after it. With
  `pause`, also at once when the decode saw the speaker pause (the VAD heard that much
  silence after the last speech). Confirmed words are never retracted. The rest of the
  latest decode is the *tentative* tail. At `finish` the rest is confirmed: the last
  decode's words when it heard all the audio, else those of one more decode, unless every
  word heard is confirmed already (decoding again would only invite the model to repeat
  its prompt), and only what agrees when a threshold flags that decode.
- The confirmed text that has left the buffer is the decoding prompt, so the text reads
  on across cuts.
- The buffer is cut at the end of a confirmed sentence once it is longer than `trim`
  seconds (25 by default, so that a live decode hears nearly the context an offline
  window does; at any confirmed word past `2 * trim` or 27 s, and it never exceeds 30 s),
  so a decode costs about the same from the first minute to the hundredth; after a pause
  of two seconds it starts again at the pause.
- Silence and noise give no words: the buffer is decoded only when Silero VAD hears speech
  in it, words outside the speech it hears are dropped, and a decode that the model
  itself calls no speech (or that repeats itself) counts as no words.
- The language is detected once, on the first decode with two seconds of speech, unless
  given.
"""

from __future__ import annotations

import logging
import threading
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .engine import Engine, WindowJob
from .engine.session import finish_window
from .features import (
    HOP_LENGTH,
    N_FRAMES,
    N_SAMPLES,
    SAMPLE_RATE,
    log_mel_spectrogram,
    pad_or_trim,
)
from .model import Whisper
from .options import TranscribeOptions
from .tokenizer import Tokenizer, get_tokenizer
from .vad import speech_regions

log = logging.getLogger("susurrus")

SENTENCE_END = (".", "?", "!", "。", "？", "！")
# Full stops that end no sentence.
ABBREVIATIONS = {"mr.", "mrs.", "ms.", "dr.", "st.", "prof.", "mt.", "jr.", "sr.", "vs.", "etc."}


def ends_sentence(word: str) -> bool:
    text = word.strip()
    return text.endswith(SENTENCE_END) and text.lower() not in ABBREVIATIONS
# The VAD's settings for live gating: short pauses only, so that a sentence's end shows.
VAD_MIN_SPEECH_MS = 120
VAD_MIN_SILENCE_MS = 300
VAD_PAD_S = 0.3  # words this far outside heard speech still count (onsets, tails)
PROMPT_TOKENS = 200  # the confirmed text before the buffer given as prompt, in tokens
DETECT_SPEECH_S = 2.0  # speech heard before the language is detected
# A word is confirmed only once the decode heard this much audio after it: the last word
# before the buffer's end is often a guess at a word cut off (and gets a full stop).
HEARD_AFTER_S = 0.25
# A word the model is unsure of (probability below SURE_P in either decode) waits for
# agreement until this much audio after it was heard: more context often changes it
# ("made justly" -> "may justly").
SURE_P = 0.8
UNSURE_WAIT_S = 1.0
# ... and, until this much audio after it was heard, also for the word after it to agree
# and be sure (or for a pause): a homophone or a misheard word is read from what follows
# ("there" becomes "their" once "arrangement" is clear; "speakers but" becomes "speech
# errors, but"). Measured in benchmarks/live.py: WER 1 point closer to offline decoding,
# latency p90 up 1.2 s, median unchanged.
CONTEXT_WAIT_S = 8.0
# Speech the VAD heard between a decode's word and the next (or the end), more than this:
# the decode skipped some (it rounded the words off, "nothing going on." for "nothing going
# else going on"), so that word waits.
UNDECODED_S = 0.3
UNDECODED_WAIT_S = 2.0  # ... unless it ended this long before the decoded audio did
# The buffer keeps the confirmed speech before a pause shorter than this (context for the
# words after it; the confirmed words are matched again by their text).
SETTLE_TRIM_S = 2.0
# The buffer is cut at any confirmed word once it is this long (before the one-window
# limit drops audio whose words are not confirmed yet).
ANY_WORD_CUT_S = 27.0
# `hallucination_silence_threshold` of live streams (a transcription option), unless given.
HALLUCINATION_SILENCE_S = 2.0


@dataclass
class LiveEvent:
    """What changed after a decode: the words confirmed by it (append them to the ones
    before: confirmed words never change), the whole tentative tail now, the audio seconds
    fed so far, and whether the stream is over (everything is confirmed then)."""

    confirmed: list[dict]
    tentative: list[dict]
    audio_time: float
    final: bool = False

    def as_dict(self) -> dict:
        return {
            "confirmed": self.confirmed,
            "tentative": self.tentative,
            "audio_time": self.audio_time,
            "final": self.final,
        }


def _key(word: str) -> str:
    """A word as compared between decodes: case, punctuation and spacing aside."""
    text = unicodedata.normalize("NFKC", word).lower()
    return "".join(c for c in text if c.isalnum())


def words_text(words: list[dict]) -> str:
    return "".join(w["word"] for w in words).strip()


class Resampler:
    """Any rate to 16 kHz, chunk after chunk, with the position carried across chunks
    (linear interpolation after a box filter against aliasing when downsampling)."""

    def __init__(self, rate: int) -> None:
        if rate <= 0:
            raise ValueError(f"sample rate must be positive, got {rate}")
        self.rate = rate
        self._position = 0.0  # next output sample's place in the input seen so far
        self._tail = np.zeros(0, dtype=np.float32)  # input kept for the next chunk
        self._offset = 0  # input samples before _tail

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        if self.rate == SAMPLE_RATE:
            return samples
        data = np.concatenate([self._tail, samples])
        width = int(round(self.rate / SAMPLE_RATE))
        smoothed = data
        if width > 1:
            smoothed = np.convolve(data, np.ones(width, dtype=np.float32) / width, mode="same")
        step = self.rate / SAMPLE_RATE
        last = self._offset + len(data) - 2  # interpolation needs a sample on each side
        n = int(np.floor((last - self._position) / step)) + 1 if last >= self._position else 0
        where = self._position + step * np.arange(n)
        out = np.interp(where - self._offset, np.arange(len(data)), smoothed).astype(np.float32)
        self._position += step * n
        keep = max(0, int(np.floor(self._position)) - self._offset - width)
        self._tail = data[keep:]
        self._offset += keep
        return out


def as_float_samples(samples: Any) -> np.ndarray:
    """Mono float32 samples from a NumPy array or tensor (int16 scaled to [-1, 1];
    several channels averaged, channels last)."""
    if torch.is_tensor(samples):
        samples = samples.detach().cpu().numpy()
    array = np.asarray(samples)
    if array.dtype == np.int16:
        array = array.astype(np.float32) / 32768.0
    array = array.astype(np.float32, copy=False)
    if array.ndim == 2:
        array = array.mean(axis=1)
    if array.ndim != 1:
        raise ValueError(f"expected mono samples (or samples x channels), got {array.shape}")
    return array


class LiveSession:
    """One live stream: `feed` audio as it comes, read `confirmed` and `tentative` words
    (dicts with word, start, end, probability; times in seconds from the stream's start),
    `finish` at the end. A source on an `Engine`: streams on one engine share its batches.

    `feed` decodes before it returns (in the calling thread, which may step the engine for
    other streams too); `on_event(LiveEvent)` is called after each decode that changed
    something. Thread-safe between one feeding thread and the engine's other users.
    """

    def __init__(
        self,
        model: Whisper | Engine,
        *,
        language: str | None = None,
        on_event: Callable[[LiveEvent], None] | None = None,
        trim: float = 25.0,
        min_step: float = 0.0,
        vad: bool = True,
        vad_threshold: float = 0.5,
        pause: float | None = None,
        **options: Any,
    ) -> None:
        """`model`: a model (a private engine is made) or a shared engine. `trim`: buffer
        length in seconds past which it is cut at a confirmed sentence end. `min_step`:
        seconds of new audio before a new decode (0: whenever any came). Other keyword
        arguments are transcription options (beam_size, initial_prompt, thresholds, ...).
        `pause`: seconds of silence (by the VAD) after the last speech that make a decode
        final, confirming all its words at once (None: only agreement confirms; measured
        in benchmarks/live.py: lower latency, but fragments confirmed before their
        sentence is complete)."""
        self.engine = model if isinstance(model, Engine) else Engine(model, max_batch=8)
        self.model = self.engine.model
        options.setdefault("temperature", 0.0)
        # Words come from the sessions' window function, hallucination skip included.
        options["word_timestamps"] = True
        options.setdefault("hallucination_silence_threshold", HALLUCINATION_SILENCE_S)
        self.options = TranscribeOptions.create(language=language, **options)
        if not 1.0 <= trim <= 25.0:
            raise ValueError(f"trim must be between 1 and 25 seconds, got {trim}")
        self.trim = trim
        self.min_step = int(min_step * SAMPLE_RATE)
        self.vad = vad
        self.vad_threshold = vad_threshold
        self.pause = pause
        self.on_event = on_event
        self.language = self.options.language or (None if self.model.is_multilingual else "en")
        self.tokenizer: Tokenizer | None = None
        if self.language is not None:
            self._set_language(self.language)
        self.confirmed: list[dict] = []
        self.tentative: list[dict] = []
        self.decodes = 0  # how many times the buffer was decoded
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._resampler: Resampler | None = None
        self._buffer = np.zeros(0, dtype=np.float32)
        self._start = 0  # absolute sample where the buffer starts
        self._total = 0  # samples fed
        self._considered = 0  # samples looked at by the last decision to decode or not
        self._vad_until = 0  # samples the VAD has looked at
        self._speech: list[tuple[float, float]] = []  # heard speech in the buffer, absolute s
        self._previous: list[dict] = []  # the last decode's words after the confirmed ones
        self._last_decoded = -1  # samples fed when the last decode's audio was taken
        self._last_suspect = False  # whether a threshold flagged the last decode
        self._in_flight = False
        self._finishing = False
        self._final_sent = False
        self._done = False

    # -- feeding --------------------------------------------------------------------------

    @property
    def audio_time(self) -> float:
        """Seconds of audio fed so far."""
        return self._total / SAMPLE_RATE

    def feed(self, samples: Any, sample_rate: int = SAMPLE_RATE, *, wait: bool = True) -> None:
        """Add audio (mono, or samples x channels; float or int16; any rate) and, with
        `wait`, decode the buffer again before returning."""
        if self._finishing:
            raise RuntimeError("feed after finish")
        data = as_float_samples(samples)
        if sample_rate != SAMPLE_RATE:
            if self._resampler is None or self._resampler.rate != sample_rate:
                self._resampler = Resampler(sample_rate)
            data = self._resampler(data)
        if len(data):
            with self._lock:
                self._buffer = np.concatenate([self._buffer, data])
                self._total += len(data)
        if wait:
            self.engine.run(self, until=self._idle)
            self._raise()

    def finish(self) -> dict:
        """Decode what is left, confirm it all, and return the transcript: `text`,
        `segments` (from the confirmed words, with `words`), `language`."""
        self._finishing = True
        if not self._done:
            self.engine.run(self)
        self._raise()
        return self.result()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def _idle(self) -> bool:
        with self._lock:
            return self.finished or (not self._in_flight and not self._pending())

    def _pending(self) -> bool:
        """Whether audio has come that no decision was taken on yet."""
        new = self._total - self._considered
        return new > 0 and (new >= self.min_step or self._finishing)

    # -- the Source protocol --------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self._done or self.error is not None

    def fail(self, error: BaseException) -> None:
        self.error = error

    def wait(self) -> None:
        time.sleep(0.005)  # nothing to decode this instant: the feeder brings more

    def next_job(self) -> WindowJob | None:
        with self._lock:
            if self.finished or self._in_flight:
                return None
            if self._finishing and not self._pending() and not self._final_sent:
                job, event = self._final_job()
            else:
                return self._next_job()
        if event is not None and self.on_event is not None:
            self.on_event(event)
        return job

    def _next_job(self) -> WindowJob | None:
        """A decode of the buffer when new audio with speech has come (lock held)."""
        if not self._pending():
            return None
        self._considered = self._total
        self._hear()
        if not self._has_speech():
            self._drop_silence()
            return None
        if self._settled():
            return None
        if self.language is None and self._speech_seconds() < DETECT_SPEECH_S:
            return None  # too little to tell the language from yet
        return self._job(final=False)

    def _final_job(self) -> tuple[WindowJob | None, LiveEvent | None]:
        """The last decode at `finish`, or none (and the final event, if any, at once)."""
        self._final_sent = True
        self._hear()
        # Decoding a buffer whose speech is all confirmed again invites the model to repeat
        # its prompt (the confirmed text) over the silence after it.
        if not self._has_speech() or len(self._buffer) < HOP_LENGTH or self._all_confirmed():
            self._complete()
            return None, None
        if self._last_decoded == self._total and not self._last_suspect:
            # The last decode heard all the audio and no threshold flagged it: decoding the
            # same audio again would give its words a decode's time later.
            new = self._commit(self.tentative, len(self.tentative))
            self._complete()
            return None, LiveEvent(new, [], self.audio_time, True)
        return self._job(final=True), None

    def _job(self, final: bool) -> WindowJob:
        audio = torch.from_numpy(self._buffer[-N_SAMPLES:].copy())
        mel = log_mel_spectrogram(audio, self.model.dims.n_mels, padding=N_SAMPLES)
        size = min(len(audio) // HOP_LENGTH, N_FRAMES)
        options = self.options.decoding(0.0, self._prompt())
        self._in_flight = True
        self.decodes += 1
        start = self._start + len(self._buffer) - len(audio)
        # Whether the speaker has paused: the decode then saw the whole utterance.
        paused = (
            self.pause is not None
            and bool(self._speech)
            and self._total / SAMPLE_RATE - self._speech[-1][1] >= self.pause
        )
        # As a recording's window is decoded: frames past the audio are zeros in log-mel
        # space (not the log-mel of silence), so that a buffer decodes as offline does.
        mel = pad_or_trim(mel[:, :size], N_FRAMES)
        return WindowJob(options, mel=mel.to(self.model.device),
                         tag=(start, size, final, paused, self._total))

    def job_done(self, job: WindowJob) -> None:
        result = job.result
        assert result is not None
        start, size, final, paused, total = job.tag
        with self._lock:
            self._in_flight = False
            if self.language is None:
                self._set_language(result.language)  # once, for the whole stream
            before = [_key(w["word"]) for w in self.tentative]
            words, suspect = self._words(result, start, size)
            self._last_decoded, self._last_suspect = total, suspect
            # Without agreement, only a decode no threshold flags confirms its words.
            heard = (start + size * HOP_LENGTH) / SAMPLE_RATE
            new = self._agree(words, (final or paused) and not suspect, start / SAMPLE_RATE,
                              heard)
            changed = before != [_key(w["word"]) for w in self.tentative]
            if not final:
                self._cut()
            event = LiveEvent(new, list(self.tentative), self.audio_time, final)
            if final:
                self._complete()
        if self.on_event is not None and (new or final or changed):
            self.on_event(event)

    # -- the policy -----------------------------------------------------------------------

    def _set_language(self, language: str) -> None:
        self.language = language
        self.options = self.options.with_language(language)
        self.tokenizer = get_tokenizer(
            self.model.is_multilingual,
            num_languages=self.model.num_languages,
            language=language,
            task=self.options.task,
        )

    def _prompt(self) -> list[int] | None:
        """Initial prompt and the confirmed text that has left the buffer."""
        if self.tokenizer is None:
            return None
        before = self._start / SAMPLE_RATE
        # The last words before the buffer (enough for PROMPT_TOKENS; a stream may run for hours).
        earlier = []
        for word in reversed(self.confirmed):
            if word["end"] <= before:
                earlier.append(word)
                if len(earlier) >= PROMPT_TOKENS:
                    break
        text = words_text(earlier[::-1])
        tokens: list[int] = []
        if self.options.initial_prompt:
            tokens = self.tokenizer.encode(" " + self.options.initial_prompt.strip())
        if text:
            tokens += self.tokenizer.encode(" " + text)
        return tokens[-PROMPT_TOKENS:] or None

    def _hear(self) -> None:
        """Speech regions of the buffer (absolute seconds), by Silero VAD over the audio
        that came since the last look (and a second before it again, for context)."""
        if not self.vad:
            self._speech = [(self._start / SAMPLE_RATE, self._total / SAMPLE_RATE)]
            return
        begin = max(self._start, self._vad_until - SAMPLE_RATE)
        if self._total - begin < 512:
            return
        regions = speech_regions(
            self._buffer[begin - self._start :],
            threshold=self.vad_threshold,
            min_speech_ms=VAD_MIN_SPEECH_MS,
            min_silence_ms=VAD_MIN_SILENCE_MS,
            speech_pad_ms=0,
        )
        self._vad_until = self._total
        offset = begin / SAMPLE_RATE
        kept = [(a, min(b, offset)) for a, b in self._speech if a < offset]
        merged: list[tuple[float, float]] = []
        for a, b in kept + [(a + offset, b + offset) for a, b in regions]:
            if merged and a <= merged[-1][1] + VAD_MIN_SILENCE_MS / 1000:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        self._speech = merged

    def _has_speech(self) -> bool:
        return bool(self._speech)

    def _speech_seconds(self) -> float:
        return sum(b - a for a, b in self._speech)

    def _speech_between(self, start: float, end: float) -> float:
        """Seconds of speech heard between two times."""
        return sum(max(0.0, min(b, end) - max(a, start)) for a, b in self._speech)

    def _drop_silence(self) -> None:
        """No speech in the buffer: keep only its last second (a word may be starting)."""
        if not self.tentative:
            self._trim_to(self._total - SAMPLE_RATE)

    def _all_confirmed(self) -> bool:
        """Whether every word heard is confirmed: no tentative words and no speech heard
        after the last confirmed word."""
        if not self.confirmed or self.tentative:
            return False
        last_end = self.confirmed[-1]["end"]
        return not any(b > last_end + VAD_PAD_S + 0.2 for _, b in self._speech)

    def _settled(self) -> bool:
        """No speech heard after the last confirmed word: nothing new to decode. After a
        long pause the buffer drops what came before it (its last second kept); after a
        short one it keeps it, as context for the words that follow."""
        if not self._all_confirmed():
            return False
        if self._total / SAMPLE_RATE - self.confirmed[-1]["end"] > SETTLE_TRIM_S:
            self._trim_to(self._total - SAMPLE_RATE)
        return True

    def _words(self, result: Any, start: int, size: int) -> tuple[list[dict], bool]:
        """A decode's words with absolute times, and whether a threshold flags it. The
        sessions' `finish_window` makes them (silence, segments, word timestamps, the
        hallucination skip), as it does for recordings; a decode that repeats itself
        gives none (offline it would be decoded again hotter; here the next decode comes
        soon), nor do words where the VAD heard no speech."""
        ratio = self.options.compression_ratio_threshold
        if ratio is not None and result.compression_ratio > ratio:
            return [], True  # a loop, not speech
        frame = start // HOP_LENGTH
        outcome = finish_window(
            self.model, self.tokenizer, self.options, result, frame, size,
            last_speech=frame * HOP_LENGTH / SAMPLE_RATE, planned=True,
            content_frames=self._total // HOP_LENGTH,
        )
        words = [w for s in outcome.segments for w in s["words"] if self._heard(w)]
        return words, outcome.suspect

    def _heard(self, word: dict) -> bool:
        return any(
            word["start"] < b + VAD_PAD_S and word["end"] > a - VAD_PAD_S
            for a, b in self._speech
        )

    def _agree(self, words: list[dict], final: bool, begin: float, heard: float) -> list[dict]:
        """Confirm what this decode (of the audio from `begin` to `heard`, in seconds)
        and the last agree on; return the words confirmed."""
        fresh = words[self._after_confirmed(words, begin):]
        if final:
            agreed = len(fresh)
        else:
            agreed = 0
            # A word waits while speech after it has not been decoded (the decode skipped
            # some), and so do the words after it.
            limit = len(fresh)
            for i, word in enumerate(fresh):
                following = fresh[i + 1]["start"] if i + 1 < len(fresh) else heard
                if (
                    word["end"] > heard - UNDECODED_WAIT_S
                    and self._speech_between(word["end"], following) > UNDECODED_S
                ):
                    limit = i
                    break
            for i, (a, b) in enumerate(zip(fresh[:limit], self._previous)):
                if _key(a["word"]) != _key(b["word"]) or not _key(a["word"]):
                    break
                if a["end"] > heard - HEARD_AFTER_S:
                    break  # not heard to its end yet
                if not self._sure(a, b) and (
                    a["end"] > heard - UNSURE_WAIT_S
                    or (
                        a["end"] > heard - CONTEXT_WAIT_S
                        and not self._sure_after(fresh, i, heard)
                    )
                ):
                    break
                agreed += 1
        return self._commit(fresh, agreed)

    @staticmethod
    def _sure(a: dict, b: dict) -> bool:
        """Whether two decodes' readings of a word are both sure of it."""
        return min(a["probability"], b["probability"]) >= SURE_P

    def _sure_after(self, fresh: list[dict], i: int, heard: float) -> bool:
        """Whether an unsure word's context is settled: the word after it agrees between
        this decode and the last and both are sure of it, or nothing but a pause follows
        it."""
        if i + 1 >= len(fresh):
            return self._speech_between(fresh[i]["end"], heard) < UNDECODED_S
        if i + 1 >= len(self._previous):
            return False
        a, b = fresh[i + 1], self._previous[i + 1]
        return _key(a["word"]) == _key(b["word"]) and self._sure(a, b)

    def _commit(self, fresh: list[dict], agreed: int) -> list[dict]:
        """Confirm the first `agreed` of a decode's new words; the rest are tentative."""
        last_end = self.confirmed[-1]["end"] if self.confirmed else 0.0
        new = fresh[:agreed]
        for word in new:
            # Times never run backwards across words (a re-decode may shift them a little).
            word["start"] = max(word["start"], last_end)
            word["end"] = max(word["end"], word["start"])
            last_end = word["end"]
        self.confirmed += new
        self.tentative = fresh[agreed:]
        self._previous = self.tentative
        return new

    def _after_confirmed(self, words: list[dict], begin: float) -> int:
        """Where a decode's words go on past the confirmed ones. The last confirmed word,
        when inside the decoded audio, is found again by its text near its start (times
        move between decodes: a word confirmed at a buffer's end may have been stretched to
        it, and the words after it then start before its end); failing that, by time,
        skipping a repeat of the last confirmed words."""
        if not self.confirmed or not words:
            return 0
        last = self.confirmed[-1]
        if last["end"] > begin + 0.05:  # the last confirmed word is inside the decoded audio
            # The same word in this decode: of those that read alike and start near it,
            # the one whose words before it agree longest with the confirmed ones, then the
            # nearest (a word said again a moment later is another: "words, words, words").
            ours = [_key(w["word"]) for w in self.confirmed[-8:]][::-1]
            theirs = [_key(w["word"]) for w in words]
            candidates = []
            for i, word in enumerate(words):
                distance = abs(word["start"] - last["start"])
                if theirs[i] != ours[0] or distance > 1.0:
                    continue
                context = 0
                while context < min(len(ours), i + 1) and theirs[i - context] == ours[context]:
                    context += 1
                candidates.append((-context, distance, i + 1))
            if candidates:
                return min(candidates)[2]
        last_end = self.confirmed[-1]["end"]
        index = next((i for i, w in enumerate(words) if w["start"] >= last_end - 0.1), len(words))
        return index + self._repeat(words[index:], last_end)

    def _repeat(self, fresh: list[dict], last_end: float) -> int:
        """How many of the first words repeat the last confirmed ones (a decode that starts
        with them again, their times moved: the longest such overlap, up to five words)."""
        if not fresh or fresh[0]["start"] - last_end > 1.0:
            return 0
        tail = [_key(w["word"]) for w in self.confirmed[-5:]]
        head = [_key(w["word"]) for w in fresh[:5]]
        for n in range(min(len(tail), len(head)), 0, -1):
            if tail[-n:] == head[:n]:
                return n
        return 0

    def _cut(self) -> None:
        """Cut the buffer at a confirmed sentence end past `trim` seconds, at any confirmed
        word past twice that (or past `ANY_WORD_CUT_S`), and never let it exceed one
        window."""
        length = len(self._buffer) / SAMPLE_RATE
        begin = self._start / SAMPLE_RATE
        inside = [w for w in self.confirmed if w["end"] > begin]
        cut = None
        if length > self.trim:
            ends = [w["end"] for w in inside if ends_sentence(w["word"])]
            if ends:
                cut = ends[-1]
        if cut is None and length > min(2 * self.trim, ANY_WORD_CUT_S) and inside:
            cut = inside[-1]["end"]
        if cut is not None:
            self._trim_to(int(cut * SAMPLE_RATE))
        # One window at most; 1 s to spare for the audio that comes before the next decode.
        self._trim_to(self._total - N_SAMPLES + SAMPLE_RATE)

    def _trim_to(self, sample: int) -> None:
        sample = sample - sample % HOP_LENGTH  # word times live on the frame grid
        if sample <= self._start:
            return
        self._buffer = self._buffer[sample - self._start :]
        self._start = sample
        begin = sample / SAMPLE_RATE
        self._speech = [(max(a, begin), b) for a, b in self._speech if b > begin]

    def _complete(self) -> None:
        self._done = True
        self.tentative = []
        self._previous = []

    # -- the transcript -------------------------------------------------------------------

    def result(self) -> dict:
        """The confirmed words as a transcript: `text`, `segments` (sentences, or pieces at
        pauses), `language` (and `no_speech: True` when none was confirmed)."""
        segments = words_to_segments(self.confirmed)
        result: dict = {
            "text": "".join(s["text"] for s in segments),
            "segments": segments,
            "language": self.language,
        }
        if not segments:
            result["no_speech"] = True
        return result


def words_to_segments(
    words: list[dict], max_gap: float = 1.0, max_length: float = 10.0
) -> list[dict]:
    """Confirmed words as segments for the writers: cut after a sentence's end, at a pause
    longer than `max_gap`, or before a segment grows past `max_length` seconds."""
    groups: list[list[dict]] = []
    for word in words:
        last = groups[-1] if groups else None
        if (
            last is None
            or ends_sentence(last[-1]["word"])
            or word["start"] - last[-1]["end"] > max_gap
            or word["end"] - last[0]["start"] > max_length
        ):
            groups.append([word])
        else:
            last.append(word)
    segments = []
    for i, group in enumerate(groups):
        text = "".join(w["word"] for w in group)
        segments.append({
            "id": i,
            "seek": 0,
            "start": group[0]["start"],
            "end": group[-1]["end"],
            "text": text,
            "tokens": [],
            "temperature": 0.0,
            "avg_logprob": 0.0,
            "compression_ratio": 0.0,
            "no_speech_prob": 0.0,
            "words": [dict(w) for w in group],
        })
    return segments
