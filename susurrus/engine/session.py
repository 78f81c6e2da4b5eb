"""A session: one recording's progress, offered to an engine window by window.

`SequentialSession` decodes as the reference does: each window starts where the last
one's speech ended and takes its text as prompt, so one window is in flight at a time.
`PlannedSession` (batch_size) cuts the recording at pauses beforehand, so that its windows
decode side by side. Both turn a decoded window into segments with the same function
(`finish_window`, which live streams use too): silence, segments, word timestamps, the
hallucination skip and the `suspect` flag work alike in all of them. Segments come out
through `on_segment` as soon as they are final, and the state after each window saves to
JSON (resume).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..audio import is_silent, load_audio
from ..decoding import DecodingOptions, DecodingResult
from ..features import (
    FRAMES_PER_SECOND,
    HOP_LENGTH,
    N_FRAMES,
    N_SAMPLES,
    SAMPLE_RATE,
    MelStream,
    log_mel_spectrogram,
    pad_or_trim,
)
from ..model import Whisper
from ..options import TranscribeOptions
from ..timing import add_word_timestamps, get_end, is_segment_anomaly, next_words_segment
from ..tokenizer import LANGUAGES, Tokenizer, get_tokenizer
from ..vad import clip_timestamps_for, speech_regions
from ..windows import FrameReader, iter_windows, window_spans
from ..writers import format_timestamp
from .engine import WindowJob

log = logging.getLogger("susurrus")

STATE_VERSION = 1
# A window whose text ends this long before the window does is decoded again from there:
# Whisper stops early when it takes the last words for speech cut off by the window's edge.
MIN_REMAINDER_FRAMES = FRAMES_PER_SECOND
PAUSE_FRAMES = FRAMES_PER_SECOND // 10

Thresholds = tuple[float | None, float | None, float | None]


def _verdicts(result: DecodingResult, thresholds: Thresholds) -> tuple[bool, bool, bool]:
    """Which thresholds flag a window: (too repetitive, too improbable, probably no speech)."""
    compression_ratio, logprob, no_speech = thresholds
    return (
        compression_ratio is not None and result.compression_ratio > compression_ratio,
        logprob is not None and result.avg_logprob < logprob,
        no_speech is not None and result.no_speech_prob > no_speech,
    )


def needs_retry(result: DecodingResult, thresholds: Thresholds) -> bool:
    too_repetitive, too_unlikely, probably_silent = _verdicts(result, thresholds)
    # Improbable or repetitive text where the model itself says "no speech" is what it
    # makes up over silence: the window is skipped (see is_silence), not retried.
    return (too_repetitive or too_unlikely) and not probably_silent


def is_silence(result: DecodingResult, thresholds: Thresholds) -> bool:
    """Whether a window holds no speech: the reference rule (no-speech probability over its
    threshold and the text not confident), and also when that text is repetitive, which is
    how hallucinations over silence look."""
    too_repetitive, _, probably_silent = _verdicts(result, thresholds)
    logprob = thresholds[1]
    confident = logprob is not None and result.avg_logprob > logprob
    return probably_silent and (not confident or too_repetitive)


def clip_frames(clips: tuple[float, ...], content_frames: int) -> list[tuple[int, int]]:
    """(start, end) frame pairs of clip times; an odd last start runs to the end."""
    points = [round(t * FRAMES_PER_SECOND) for t in clips] or [0]
    if len(points) % 2 == 1:
        points.append(content_frames)
    return list(zip(points[::2], points[1::2]))


def intersect_clips(user: tuple[float, ...], speech: list[float]) -> tuple[float, ...]:
    """Speech regions inside the user's clips (all when the user gave none)."""
    if not user:
        return tuple(speech)
    user = list(user)
    if len(user) % 2 == 1:
        user.append(float("inf"))
    clips: list[float] = []
    for a, b in zip(user[::2], user[1::2]):
        for c, d in zip(speech[::2], speech[1::2]):
            start, end = max(a, c), min(b, d)
            if start < end:
                clips += [start, end]
    return tuple(clips) or (0.0, 0.0)


def recording_fingerprint(path: str) -> dict:
    """What identifies a file for resuming: size, modification time, hash of its first MB."""
    import hashlib
    import os

    info = os.stat(path)
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(1 << 20)).hexdigest()
    return {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "head_sha256": head}


@dataclass
class _Window:
    """A window of the recording in flight: frames [start, start + size), the attempt
    number on the temperature ladder, and (cut-plan windows) its frames and its span."""

    start: int
    size: int
    attempt: int = 0
    prompt: list[int] | None = None
    frames: torch.Tensor | None = None
    end: int = 0  # the planned window's end (remainders keep it)
    planned: tuple[int, int] | None = None  # the planned window it comes from


@dataclass
class WindowOutcome:
    """A decoded window's final segments, the frame to go on from, where its speech
    ended, whether it was dropped as a hallucination, and whether a threshold flags it."""

    segments: list[dict] = field(default_factory=list)
    seek: int = 0
    last_speech: float = 0.0
    discard: bool = False
    suspect: bool = False


class Session:
    """One recording's transcription. Prepared (read, silence, VAD, clips) in the caller's
    thread; then an engine asks it for windows (`next_job`) and hands results back
    (`job_done`). The result is `result()` once `finished`."""

    def __init__(
        self,
        model: Whisper,
        audio: Any,
        options: TranscribeOptions,
        *,
        on_segment: Callable[[dict], None] | None = None,
        verbose: bool | None = None,
        progress_callback: Callable[[int, int], None] | None = None,
        on_window: Callable[[Session], None] | None = None,
    ) -> None:
        self.model = model
        self.options = options
        self.on_segment = on_segment
        self.verbose = verbose
        self.progress_callback = progress_callback
        self.on_window = on_window  # after each finished window (saving the state)
        self.on_finish: Callable[[Session], None] | None = None  # once complete
        self.thresholds = options.thresholds()
        self.error: BaseException | None = None
        self.segments: list[dict] = []
        self.no_speech = False
        self._done = False
        self._retries: deque[WindowJob] = deque()
        self._in_flight = 0
        self.language = options.language
        self._detecting = False
        self._prepare(audio)

    # -- preparation ----------------------------------------------------------------------

    def _prepare(self, audio: Any) -> None:
        model, options = self.model, self.options
        if isinstance(audio, str) or hasattr(audio, "__fspath__"):
            audio = (
                load_audio(audio) if options.vad else MelStream(audio, model.dims.n_mels)
            )
        if not isinstance(audio, MelStream):
            audio = audio if torch.is_tensor(audio) else torch.from_numpy(np.asarray(audio))
        clips = options.clip_timestamps
        silent = audio.silent if isinstance(audio, MelStream) else is_silent(audio)
        self.content_frames = 0
        if not silent and options.vad:
            if isinstance(audio, MelStream):
                raise ValueError("vad needs the whole recording: pass a path or samples")
            regions = speech_regions(
                audio,
                threshold=options.vad_threshold,
                min_speech_ms=options.vad_min_speech_ms,
                min_silence_ms=options.vad_min_silence_ms,
                speech_pad_ms=options.vad_speech_pad_ms,
            )
            silent = not regions
            if regions:
                clips = intersect_clips(clips, clip_timestamps_for(regions))
        if silent:
            # Nothing audible: decoding would only invite hallucinated words.
            self.no_speech = True
            self._done = True
            self.language = options.language or (None if model.is_multilingual else "en")
            self.tokenizer = None
            return
        if isinstance(audio, MelStream):
            self.frames = audio.frames
            self.content_frames = audio.content_frames
        else:
            mel = log_mel_spectrogram(audio, model.dims.n_mels, padding=N_SAMPLES)
            self.content_frames = mel.shape[-1] - N_FRAMES
            self.frames = lambda start, stop: mel[:, start:stop]
        self.clips = clip_frames(clips, self.content_frames)
        if self.language is None and not model.is_multilingual:
            self.language = "en"
        self._detecting = self.language is None
        if not self._detecting:
            self._set_language(self.language)

    def _set_language(self, language: str) -> None:
        self.language = language
        model = self.model
        self.tokenizer: Tokenizer | None = get_tokenizer(
            model.is_multilingual,
            num_languages=model.num_languages,
            language=language,
            task=self.options.task,
        )
        self.initial_prompt_tokens: list[int] = []
        if self.options.initial_prompt is not None:
            self.initial_prompt_tokens = self.tokenizer.encode(
                " " + self.options.initial_prompt.strip()
            )
        self._start()

    def _start(self) -> None:
        """Set up the kind's own state once the language is known."""

    # -- the Source protocol --------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self._done or self.error is not None

    def fail(self, error: BaseException) -> None:
        self.error = error
        self._close()

    def next_job(self) -> WindowJob | None:
        if self.finished:
            return None
        if self._detecting:
            if self._in_flight:
                return None
            # The language is detected once, from the first 30 seconds.
            if self.verbose:
                print(
                    "Detecting language using up to the first 30 seconds. "
                    "Use `--language` to specify the language"
                )
            first = pad_or_trim(self.frames(0, N_FRAMES), N_FRAMES)
            self._in_flight += 1
            return WindowJob(DecodingOptions(task="lang_id"), mel=first)
        if self._retries:
            self._in_flight += 1
            return self._retries.popleft()
        window = self._next_window()
        if window is None:
            if not self._in_flight and not self._retries:
                self._complete()
            return None
        self._in_flight += 1
        self._progress_bar()  # shown from the first window on
        return self._job(window)

    def _job(self, window: _Window, features: torch.Tensor | None = None) -> WindowJob:
        temperature = self.options.temperatures[window.attempt]
        mel = None
        if features is None:
            frames = window.frames if window.frames is not None else self.frames(
                window.start, window.start + window.size
            )
            mel = self._pad(frames).to(self.model.device)
        return WindowJob(
            self.options.decoding(temperature, window.prompt),
            mel=mel,
            features=features,
            # Sampling draws the same numbers for the same window in every run (resume).
            seed=zlib.crc32(f"{window.start}:{window.attempt}".encode()),
            tag=window,
        )

    def _pad(self, frames: torch.Tensor) -> torch.Tensor:
        """A window's frames as the model's 30 s input: past the content, zeros in log-mel
        space, as the reference pads its windows."""
        return pad_or_trim(frames, N_FRAMES)

    def job_done(self, job: WindowJob) -> None:
        self._in_flight -= 1
        result = job.result
        assert result is not None
        if self._detecting:
            self._detecting = False
            language = result.language
            if self.verbose is not None:
                print(f"Detected language: {LANGUAGES[language].title()}")
            self._set_language(language)
            return
        window: _Window = job.tag
        if (
            needs_retry(result, self.thresholds)
            and window.attempt + 1 < len(self.options.temperatures)
        ):
            # Decoded again at the next temperature; the audio stays encoded.
            window.attempt += 1
            self._retries.append(self._job(window, features=result.audio_features))
            return
        self._window_done(window, result)
        if self.on_window is not None:
            self.on_window(self)
        if not self._in_flight and not self._retries and self._exhausted():
            self._complete()

    # -- what the kinds differ in ---------------------------------------------------------

    def _next_window(self) -> _Window | None:
        raise NotImplementedError

    def _window_done(self, window: _Window, result: DecodingResult) -> None:
        raise NotImplementedError

    def _exhausted(self) -> bool:
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------

    def finish_window(
        self,
        result: DecodingResult,
        start: int,
        size: int,
        *,
        last_speech: float,
        planned: bool,
    ) -> WindowOutcome:
        """This recording's decoded window as final segments (see `finish_window`)."""
        return finish_window(
            self.model,
            self.tokenizer,
            self.options,
            result,
            start,
            size,
            last_speech=last_speech,
            planned=planned,
            content_frames=self.content_frames,
            verbose=self.verbose,
        )

    def _emit(self, segments: list[dict]) -> None:
        for segment in segments:
            segment["id"] = len(self.segments)
            self.segments.append(segment)
            if self.on_segment is not None:
                self.on_segment(segment)

    def _progress_bar(self) -> tqdm:
        """The progress bar (verbose=False), made when decoding starts, so that sessions
        prepared ahead print nothing before their turn."""
        if getattr(self, "_bar", None) is None:
            self._bar = tqdm(
                total=self.content_frames, unit="frames", disable=self.verbose is not False
            )
        return self._bar

    def _progress(self, done: int, total: int, step: int) -> None:
        self._progress_bar().update(step)
        if self.progress_callback is not None:
            self.progress_callback(done, total)

    def _complete(self) -> None:
        self._done = True
        self._close()
        if self.on_finish is not None:
            self.on_finish(self)

    def _close(self) -> None:
        bar = getattr(self, "_bar", None)
        if bar is not None:
            bar.close()

    def result(self) -> dict:
        """What `transcribe` returns: text, segments, language (and `no_speech: True` when
        no speech was found)."""
        if self.error is not None:
            raise self.error
        tokenizer = self.tokenizer or get_tokenizer(
            self.model.is_multilingual, num_languages=self.model.num_languages
        )
        tokens = [t for s in self.segments for t in s["tokens"]]
        result = {"text": tokenizer.decode(tokens), "segments": self.segments,
                  "language": self.language}
        if self.no_speech or not any(s["text"].strip() for s in self.segments):
            result["no_speech"] = True  # why there are no segments: an answer, not an error
        return result

    # -- saved state ----------------------------------------------------------------------

    def state(self) -> dict:
        """The progress so far as plain JSON data (see `restore`)."""
        return {
            "version": STATE_VERSION,
            "kind": type(self).__name__,
            "language": self.language,
            "segments": self.segments,
            "complete": self._done,
            **self._kind_state(),
        }

    def restore(self, state: dict) -> None:
        """Continue from `state()` of a session of the same recording and options."""
        if state.get("version") != STATE_VERSION or state.get("kind") != type(self).__name__:
            raise ValueError("the saved state is of another kind or version")
        if self.no_speech:
            return
        if self.language is None or self._detecting:
            self._detecting = False
            self._set_language(state["language"])
        self.segments = list(state["segments"])
        self._restore_kind(state)
        if state.get("complete"):
            self._done = True

    def _kind_state(self) -> dict:
        raise NotImplementedError

    def _restore_kind(self, state: dict) -> None:
        raise NotImplementedError


class SequentialSession(Session):
    """Windows one after another, each from where the last one's speech ended, with the
    text so far as prompt: the reference's long-form transcription."""

    def _start(self) -> None:
        self.clip_index = 0
        self.seek = self.clips[0][0]
        self.all_tokens: list[int] = list(self.initial_prompt_tokens)
        self.prompt_reset_since = 0
        self.last_speech = 0.0  # where the last word ended, with word timestamps
        self.remaining_prompt_length = (
            self.model.dims.n_text_ctx // 2 - 1 - len(self.initial_prompt_tokens)
        )

    def _exhausted(self) -> bool:
        return self.clip_index >= len(self.clips)

    def _next_window(self) -> _Window | None:
        if self._in_flight or self._retries:
            return None  # each window waits for the one before
        while self.clip_index < len(self.clips):
            clip_start, clip_end = self.clips[self.clip_index]
            self.seek = max(self.seek, clip_start)
            if self.seek >= clip_end:
                self.clip_index += 1
                if self.clip_index < len(self.clips):
                    self.seek = self.clips[self.clip_index][0]
                continue
            size = min(N_FRAMES, self.content_frames - self.seek, clip_end - self.seek)
            if self.options.carry_initial_prompt:
                ignored = max(len(self.initial_prompt_tokens), self.prompt_reset_since)
                prompt = self.initial_prompt_tokens + self.all_tokens[ignored:][
                    -self.remaining_prompt_length :
                ]
            else:
                prompt = self.all_tokens[self.prompt_reset_since :]
            return _Window(self.seek, size, prompt=prompt)
        return None

    def _window_done(self, window: _Window, result: DecodingResult) -> None:
        previous_seek = window.start
        outcome = self.finish_window(
            result, window.start, window.size, last_speech=self.last_speech, planned=False
        )
        self.seek = outcome.seek
        self.last_speech = outcome.last_speech
        if not is_silence(result, self.thresholds):
            self._emit(outcome.segments)
            self.all_tokens.extend(t for s in outcome.segments for t in s["tokens"])
            if not outcome.discard and (
                not self.options.condition_on_previous_text or result.temperature > 0.5
            ):
                # A high-temperature window is unreliable context for the next one.
                self.prompt_reset_since = len(self.all_tokens)
        done = min(self.content_frames, self.seek)
        self._progress(done, self.content_frames, done - min(previous_seek, done))

    def result(self) -> dict:
        result = super().result()
        if self.tokenizer is not None:
            # The initial prompt is context, not transcript.
            result["text"] = self.tokenizer.decode(
                self.all_tokens[len(self.initial_prompt_tokens) :]
            )
        return result

    def _kind_state(self) -> dict:
        if self.tokenizer is None:
            return {}
        return {
            "clip_index": self.clip_index,
            "seek": self.seek,
            "all_tokens": self.all_tokens,
            "prompt_reset_since": self.prompt_reset_since,
            "last_speech": self.last_speech,
        }

    def _restore_kind(self, state: dict) -> None:
        self.clip_index = state["clip_index"]
        self.seek = state["seek"]
        self.all_tokens = list(state["all_tokens"])
        self.prompt_reset_since = state["prompt_reset_since"]
        self.last_speech = state["last_speech"]
        self._progress_bar().update(min(self.seek, self.content_frames))


class PlannedSession(Session):
    """Windows cut beforehand at pauses (or packed from VAD regions), decoded side by
    side. A window whose text stops well before its end is decoded again from there, with
    the text so far as prompt (a remainder)."""

    def _start(self) -> None:
        # Speech regions may share a window; clips the user chose stay apart.
        pack = self.options.vad and not self._user_clips()
        self.reader = FrameReader(self.frames, self.content_frames)
        self.spans = window_spans(self.clips, self.content_frames, pack)
        self.total = sum(end - start for start, end in self.spans)
        self.done_frames = 0
        self._planned = iter_windows(self.reader, self.spans)
        self._planned_end = 0  # end of the last window planned: later ones start after
        self._planned_over = False
        self._remainders: deque[_Window] = deque()
        self._finished_windows: set[tuple[int, int]] = set()
        self._pending: list[tuple[int, int]] = []  # (start, id) of windows not yet final
        self._ready: list[tuple[float, float, int, dict]] = []  # final, not yet emitted
        self._counter = itertools.count()

    def _user_clips(self) -> bool:
        return bool(self.options.clip_timestamps)

    def _exhausted(self) -> bool:
        return self._planned_over and not self._remainders

    def _next_window(self) -> _Window | None:
        if self._remainders:
            return self._remainders.popleft()
        while not self._planned_over:
            span = next(self._planned, None)
            if span is None:
                self._planned_over = True
                return None
            start, end = span
            self._planned_end = end
            if span in self._finished_windows:
                continue  # done before the session was saved
            prompt = self.initial_prompt_tokens or None
            frames = self.reader(start, end)
            return _Window(start, end - start, prompt=prompt, frames=frames, end=end,
                           planned=span)
        return None

    def _pad(self, frames: torch.Tensor) -> torch.Tensor:
        """A window cut at a pause is followed by more of that pause, not by the reference's
        zeros: with zeros (louder than a quiet pause in log-mel space) Whisper takes the last
        words before a short pause for speech cut off by the window's edge and leaves them
        out. (The recording's floor instead loses words on recordings with room noise.)"""
        if frames.shape[-1] >= N_FRAMES:
            return frames[:, :N_FRAMES]
        # The pause the window was cut in goes on: its last 0.1 s, per mel bin.
        tail = frames[:, -PAUSE_FRAMES:].mean(dim=-1, keepdim=True)
        rest = tail.expand(frames.shape[0], N_FRAMES - frames.shape[-1])
        return torch.cat([frames, rest], dim=-1)

    def _job(self, window: _Window, features: torch.Tensor | None = None) -> WindowJob:
        job = super()._job(window, features)
        if features is None:  # its first attempt: not final until its last one is done
            heapq.heappush(self._pending, (window.start, id(window)))
        return job

    def _window_done(self, window: _Window, result: DecodingResult) -> None:
        self._pending.remove((window.start, id(window)))
        heapq.heapify(self._pending)
        start, size = window.start, window.size
        outcome = self.finish_window(result, start, size, last_speech=0.0, planned=True)
        consumed = size
        end = start + size
        if end - outcome.seek >= MIN_REMAINDER_FRAMES and not is_silence(result, self.thresholds):
            context = list(self.initial_prompt_tokens)
            if self.options.condition_on_previous_text:
                context = [*(window.prompt or []), *result.tokens]
            rest = window.frames[:, outcome.seek - start :] if window.frames is not None else None
            self._remainders.append(
                _Window(outcome.seek, end - outcome.seek, prompt=context or None,
                        frames=None if rest is None else rest.clone(), end=window.end,
                        planned=window.planned)
            )
            consumed = outcome.seek - start
        else:
            self._finished_windows.add(window.planned)
        for segment in outcome.segments:
            heapq.heappush(
                self._ready, (segment["start"], segment["end"], next(self._counter), segment)
            )
        self._release_ready()
        self.done_frames += consumed
        self._progress(self.done_frames, self.total, consumed)

    def _release_ready(self) -> None:
        """Emit, in time order, the segments no window still to come can precede."""
        frontier = float("inf")
        if self._pending:
            frontier = self._pending[0][0]
        if self._remainders:
            frontier = min(frontier, min(w.start for w in self._remainders))
        if not self._planned_over:
            frontier = min(frontier, self._planned_end)
        limit = frontier * HOP_LENGTH / SAMPLE_RATE
        out = []
        while self._ready and self._ready[0][0] < limit:
            out.append(heapq.heappop(self._ready)[3])
        self._emit(out)

    def _complete(self) -> None:
        self._emit([heapq.heappop(self._ready)[3] for _ in range(len(self._ready))])
        super()._complete()

    def _kind_state(self) -> dict:
        if self.tokenizer is None:
            return {}
        return {
            "finished_windows": sorted(self._finished_windows),
            "remainders": [
                [w.start, w.size, w.prompt, w.end, list(w.planned)] for w in self._remainders
            ],
            "ready": [item[3] for item in sorted(self._ready)],
            "done_frames": self.done_frames,
        }

    def _restore_kind(self, state: dict) -> None:
        self._finished_windows = {tuple(w) for w in state["finished_windows"]}
        for start, size, prompt, end, planned in state["remainders"]:
            self._finished_windows.add(tuple(planned))  # its remainder stands for it
            self._remainders.append(
                _Window(start, size, prompt=prompt, end=end, planned=tuple(planned))
            )
        for segment in state["ready"]:
            heapq.heappush(
                self._ready, (segment["start"], segment["end"], next(self._counter), segment)
            )
        self.done_frames = state["done_frames"]
        self._progress_bar().update(self.done_frames)


def finish_window(
    model: Whisper,
    tokenizer: Tokenizer,
    options: TranscribeOptions,
    result: DecodingResult,
    start: int,
    size: int,
    *,
    last_speech: float,
    planned: bool,
    content_frames: int,
    verbose: bool | None = None,
) -> WindowOutcome:
    """A decoded window (frames [start, start + size)) as final segments: silence, segments
    at timestamp pairs, word timestamps, the hallucination skip and the suspect flag; and
    where to go on from. The one place that does this: sessions of recordings and live
    streams (`susurrus.live`) both call it.

    `planned`: a window cut beforehand at a pause, or a live buffer: text after its last
    timestamp pair is kept as a last segment, times stay inside the window, and the next
    window does not depend on where the last word ended. `content_frames`: the audio's
    length so far (a hallucination near its end skips to it).
    """
    thresholds = options.thresholds()
    if is_silence(result, thresholds):
        return WindowOutcome([], start + size, last_speech)  # nothing to keep in this window
    input_stride = N_FRAMES // model.dims.n_audio_ctx  # mel frames per position: 2
    time_precision = input_stride * HOP_LENGTH / SAMPLE_RATE  # 0.02 s
    offset = float(start * HOP_LENGTH / SAMPLE_RATE)
    duration = size * HOP_LENGTH / SAMPLE_RATE
    segments, seek = split_segments(
        result,
        tokenizer,
        start,
        size,
        duration,
        offset,
        input_stride,
        time_precision,
        keep_tail=planned,
    )
    outcome = WindowOutcome(segments, seek, last_speech)
    if options.word_timestamps:
        _add_words(model, tokenizer, options, result, outcome, start, size, planned,
                   content_frames)
    if outcome.discard:
        # A likely hallucination after a long silence: decode again from later on.
        outcome.segments = []
    if planned:
        window_end = (start + size) * HOP_LENGTH / SAMPLE_RATE
        for segment in outcome.segments:
            # A window shorter than 30 s is padded: no time past its end is real.
            segment["start"] = min(segment["start"], window_end)
            segment["end"] = min(segment["end"], window_end)
            for word in segment.get("words", []):
                word["start"] = min(word["start"], window_end)
                word["end"] = min(word["end"], window_end)
    outcome.suspect = any(_verdicts(result, thresholds))
    for segment in outcome.segments:
        if verbose:
            a, b = format_timestamp(segment["start"]), format_timestamp(segment["end"])
            print(f"[{a} --> {b}] {segment['text']}", flush=True)
        # A zero-length or empty segment keeps its place but carries nothing.
        if segment["start"] == segment["end"] or not segment["text"].strip():
            segment["text"], segment["tokens"], segment["words"] = "", [], []
        segment["suspect"] = outcome.suspect
    return outcome


def _add_words(
    model: Whisper,
    tokenizer: Tokenizer,
    options: TranscribeOptions,
    result: DecodingResult,
    outcome: WindowOutcome,
    start: int,
    size: int,
    planned: bool,
    content_frames: int,
) -> None:
    """Word timestamps for one window's segments, then where to continue (in place).

    `outcome.discard` means the window's segments are a likely hallucination preceded
    by silence and must be dropped; the seek then points past the silence so that the
    audio after it is decoded afresh."""
    segments = outcome.segments
    time_offset = start * HOP_LENGTH / SAMPLE_RATE
    window_end_time = (start + N_FRAMES) * HOP_LENGTH / SAMPLE_RATE
    segment_duration = size * HOP_LENGTH / SAMPLE_RATE
    content_duration = content_frames * HOP_LENGTH / SAMPLE_RATE
    is_ts = [t >= tokenizer.timestamp_begin for t in result.tokens]
    single_timestamp_ending = is_ts[-2:] == [False, True]
    # Windows cut beforehand finish out of order: their start stands in for the end of
    # the speech before them.
    last_speech = time_offset if planned else outcome.last_speech
    add_word_timestamps(
        segments=segments,
        model=model,
        tokenizer=tokenizer,
        audio_features=result.audio_features,
        num_frames=size,
        prepend_punctuations=options.prepend_punctuations,
        append_punctuations=options.append_punctuations,
        last_speech_timestamp=last_speech,
    )
    if not single_timestamp_ending and not planned:
        # Resume where the last word ended rather than at the last timestamp token.
        last_word_end = get_end(segments)
        if last_word_end is not None and last_word_end > time_offset:
            outcome.seek = round(last_word_end * FRAMES_PER_SECOND)

    threshold = options.hallucination_silence_threshold
    if threshold is not None:
        if not single_timestamp_ending and not planned:
            last_word_end = get_end(segments)
            if last_word_end is not None and last_word_end > time_offset:
                # A long silence after the last word: skip to it; else take the window.
                remaining = window_end_time - last_word_end
                if remaining > threshold:
                    outcome.seek = round(last_word_end * FRAMES_PER_SECOND)
                else:
                    outcome.seek = start + size

        # A suspicious first segment after a long leading silence: skip the silence only.
        first = next_words_segment(segments)
        if first is not None and is_segment_anomaly(first):
            gap = first["start"] - time_offset
            if gap > threshold:
                outcome.seek = start + round(gap * FRAMES_PER_SECOND)
                outcome.discard = True
                return

        # Drop a suspicious segment (and all after it) that silence or more suspicious
        # segments surround, and resume at its start.
        previous_end = last_speech
        for index, segment in enumerate(segments):
            if not segment["words"]:
                continue
            if is_segment_anomaly(segment):
                following = next_words_segment(segments[index + 1 :])
                if following is not None:
                    next_start = following["words"][0]["start"]
                else:
                    next_start = time_offset + segment_duration
                silence_before = (
                    segment["start"] - previous_end > threshold
                    or segment["start"] < threshold
                    or segment["start"] - time_offset < 2.0
                )
                silence_after = (
                    next_start - segment["end"] > threshold
                    or is_segment_anomaly(following)
                    or window_end_time - segment["end"] < 2.0
                )
                if silence_before and silence_after:
                    outcome.seek = round(
                        max(time_offset + 1, segment["start"]) * FRAMES_PER_SECOND
                    )
                    if content_duration - segment["end"] < threshold:
                        outcome.seek = content_frames
                    del segments[index:]
                    break
            previous_end = segment["end"]

    last_word_end = get_end(segments)
    if last_word_end is not None:
        outcome.last_speech = last_word_end


def split_segments(
    result: DecodingResult,
    tokenizer: Tokenizer,
    seek: int,
    segment_size: int,
    segment_duration: float,
    time_offset: float,
    input_stride: int,
    time_precision: float,
    keep_tail: bool = False,
) -> tuple[list[dict], int]:
    """Cut a window's tokens into segments at timestamp pairs; return them and the next seek.

    Text after the last complete segment is left for the next window to decode again, or
    with `keep_tail` (windows cut beforehand, which end at a pause) kept as a last segment
    that ends at its own timestamp or at the window's end.
    """
    tokens = result.tokens
    tb = tokenizer.timestamp_begin
    is_ts = [t >= tb for t in tokens]

    def segment(start: float, end: float, seg_tokens: list[int]) -> dict:
        return {
            "seek": seek,
            "start": start,
            "end": end,
            "text": tokenizer.decode([t for t in seg_tokens if t < tokenizer.eot]),
            "tokens": list(seg_tokens),
            "temperature": result.temperature,
            "avg_logprob": result.avg_logprob,
            "compression_ratio": result.compression_ratio,
            "no_speech_prob": result.no_speech_prob,
        }

    single_timestamp_ending = is_ts[-2:] == [False, True]
    # Positions just after each pair of consecutive timestamps: segment boundaries.
    cuts = [i + 1 for i in range(len(tokens) - 1) if is_ts[i] and is_ts[i + 1]]
    segments = []
    if cuts:
        if single_timestamp_ending:
            cuts.append(len(tokens))
        last = 0
        for cut in cuts:
            piece = tokens[last:cut]
            segments.append(
                segment(
                    time_offset + (piece[0] - tb) * time_precision,
                    time_offset + (piece[-1] - tb) * time_precision,
                    piece,
                )
            )
            last = cut
        tail = tokens[last:]
        if keep_tail and not single_timestamp_ending and any(t < tb for t in tail):
            end = tail[-1] if tail[-1] >= tb else None
            segments.append(
                segment(
                    time_offset + (tail[0] - tb) * time_precision,
                    time_offset
                    + (segment_duration if end is None else (end - tb) * time_precision),
                    tail,
                )
            )
            return segments, seek + segment_size
        if single_timestamp_ending:
            # The window ended with speech finished: continue after the window.
            seek += segment_size
        else:
            # Resume from the last complete segment's end; the rest is decoded again.
            seek += (tokens[last - 1] - tb) * input_stride
    else:
        duration = segment_duration
        timestamps = [t for t in tokens if t >= tb]
        if timestamps and timestamps[-1] != tb:
            duration = (timestamps[-1] - tb) * time_precision
        segments.append(segment(time_offset, time_offset + duration, tokens))
        seek += segment_size
    return segments, seek


def make_session(
    model: Whisper, audio: Any, options: TranscribeOptions, **kwargs: Any
) -> Session:
    """The session kind the options ask for: cut beforehand with batch_size, else
    sequential."""
    kind = PlannedSession if options.batch_size is not None else SequentialSession
    return kind(model, audio, options, **kwargs)
