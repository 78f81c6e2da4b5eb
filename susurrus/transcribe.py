"""Long-form transcription: a recording of any length, 30 seconds at a time.

`transcribe` is the reference's function, as a thin layer over a session (one
recording's progress, engine/session.py) decoded by an engine (engine/engine.py);
`transcribe_many` keeps several recordings decoding side by side on one engine.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import queue
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch

from .audio import is_silent, load_audio
from .engine import Cancelled, Engine
from .engine.session import Session, make_session, recording_fingerprint
from .errors import SusurrusError
from .features import MelStream
from .model import Whisper
from .options import TranscribeOptions

log = logging.getLogger("susurrus")


def read_recording(
    path: str | os.PathLike,
    n_mels: int,
    *,
    stream: int | None = None,
    vad: bool = False,
) -> np.ndarray | MelStream:
    """A file as `transcribe` reads it: all its samples when `vad` needs the whole
    recording at once, else a MelStream read as the windows advance (memory then does not
    grow with the recording's length, batched or not)."""
    if vad:
        return load_audio(path, stream=stream)
    return MelStream(path, n_mels, stream=stream)


def recording_is_silent(audio: np.ndarray | torch.Tensor | MelStream) -> bool:
    """The model would see nothing (see `audio.is_silent`), for samples or a MelStream."""
    if isinstance(audio, MelStream):
        return audio.silent
    return is_silent(audio)


def _full_precision(model: Whisper, options: TranscribeOptions) -> Whisper:
    """fp16=False asks for float32, as in the reference; a copy, so that the caller's model
    stays as it is."""
    if options.fp16 or model.dtype == torch.float32:
        return model
    return copy.deepcopy(model).float()


def transcribe(
    model: Whisper,
    audio: str | os.PathLike | np.ndarray | torch.Tensor | MelStream,
    *,
    verbose: bool | None = None,
    progress_callback: Callable[[int, int], None] | None = None,
    on_segment: Callable[[dict], None] | None = None,
    engine: Engine | None = None,
    resume: str | os.PathLike | None = None,
    cancel: threading.Event | None = None,
    options: TranscribeOptions | None = None,
    **kwargs: Any,
) -> dict:
    """Transcribe (or translate) a whole recording.

    `audio` is a path, 16 kHz mono samples as a NumPy array or tensor, or a `MelStream`.
    A path is read as it is decoded (unless `vad` needs all of it at once).
    `verbose=True` prints each segment as it is decoded, `False` shows a progress bar,
    `None` neither. Keyword arguments are the reference's options (temperature,
    compression_ratio_threshold, ..., and DecodingOptions fields such as language, task,
    beam_size), or give them all at once as `options`.
    `vad=True` decodes only the speech regions Silero VAD finds (times stay on the
    original time line); audio with no sample above -60 dBFS returns no segments and
    `"no_speech": True`.
    `batch_size=N` cuts the recording into windows at pauses beforehand and decodes N at
    a time (see windows.py); a window whose text stops early is decoded again from there
    with that text as prompt.
    `on_segment(segment)` gets each segment as soon as it is final. `engine` shares an
    engine (and its batches) with other callers; setting `cancel` stops the transcription
    (engine.Cancelled). `resume=PATH` saves the progress there
    after each window and continues from it when it holds this recording's progress.
    Returns {"text", "segments", "language"} as the reference `whisper.transcribe` does.
    """
    options = options or TranscribeOptions.create(**kwargs)
    if options.word_timestamps and options.task == "translate":
        # Translated words need not follow the order or timing of the spoken ones.
        warnings.warn("word-level timestamps on translations may not be reliable", stacklevel=2)
    model = _full_precision(model, options)
    if engine is None:
        engine = Engine(model, max_batch=options.batch_size or 1)
    elif engine.model is not model:
        raise ValueError("the engine decodes with another model")
    keeper = None
    if resume is not None:
        if not isinstance(audio, (str, os.PathLike)):
            raise ValueError("resume needs the recording as a path")
        keeper = StateFile(resume, audio, model, options)
    # Reading the recording is torch work: the engine's worker does it, when it has one.
    session = engine.prepare(
        make_session,
        model,
        audio,
        options,
        on_segment=on_segment,
        verbose=verbose,
        progress_callback=progress_callback,
        on_window=None if keeper is None else keeper.save,
    )
    if keeper is not None:
        keeper.restore(session)
        session.on_finish = keeper.save
    engine.run(session, cancelled=None if cancel is None else cancel.is_set)
    return session.result()


class StateFile:
    """A session's progress saved as JSON after each window (atomically), with what it
    belongs to: the recording (size, mtime, hash of its first MB), the model, the options.
    A file that belongs to anything else is refused, never mixed in."""

    def __init__(self, path: str | os.PathLike, audio: str | os.PathLike, model: Whisper,
                 options: TranscribeOptions) -> None:
        self.path = os.fspath(path)
        self.identity = {
            "recording": recording_fingerprint(os.fspath(audio)),
            "model": model.name or f"{model.dims}",
            "options": options.fingerprint(),
        }

    def load(self) -> dict | None:
        """The saved state, None when there is none; SusurrusError when it is another's."""
        try:
            with open(self.path, encoding="utf-8") as f:
                saved = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise SusurrusError(f"{self.path}: unreadable saved state ({exc})") from exc
        for key, what in (("recording", "another recording (or a changed file)"),
                          ("model", "another model"), ("options", "other options")):
            if saved.get(key) != self.identity[key]:
                raise SusurrusError(
                    f"{self.path}: the saved state belongs to {what}; remove it to start over"
                )
        return saved

    def restore(self, session: Session) -> bool:
        """Continue `session` from the saved state; True when it was complete already."""
        saved = self.load()
        if saved is None:
            return False
        session.restore(saved["session"])
        return bool(saved["session"].get("complete"))

    def save(self, session: Session) -> None:
        from .writers import _atomic_write

        data = {**self.identity, "session": session.state()}
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        _atomic_write(self.path, lambda f: json.dump(data, f, ensure_ascii=False))


class _Group:
    """Several recordings as one source of windows: up to `width` sessions decode side by
    side, the next made (read, checked) as soon as a slot is free.

    A thread of its own only takes the items from the iterable, which may block (the
    batch runner's items arrive on a pipe as results go back); the sessions are made in
    the thread that steps the engine. A thread that has run torch's parallel kernels
    keeps an OpenMP team of its own while it lives, and once a process holds more OpenMP
    threads than cores every small kernel of a decoding step waits for a sleeping worker:
    base's steps took 9 ms instead of 5.5 ms on 2 cores while sessions were made here.
    """

    def __init__(
        self,
        make: Callable[[Any], Session],
        items: Iterable[Any],
        width: int,
        on_result: Callable[[Any, Any], None],
        on_item: Callable[[], None] = lambda: None,
    ) -> None:
        self.width = width
        self.on_result = on_result
        self._make = make
        self._pending: queue.Queue = queue.Queue(maxsize=max(1, width))
        self._active: list[tuple[Any, Session]] = []
        self._owner: dict[int, tuple[Any, Session]] = {}
        self._turn = 0
        self._producing = True
        self.error: BaseException | None = None
        self.items_error: Exception | None = None  # raised by `items`: the caller's to see
        self._stopped = threading.Event()

        def take_items() -> None:
            try:
                for item in items:
                    if not self._offer(item):
                        return
                    on_item()  # an engine's worker never waits on the queue: it is told
            except Exception as exc:  # the items already taken still finish
                self.items_error = exc
            finally:
                self._offer(_END)
                on_item()

        self._thread = threading.Thread(target=take_items, name="susurrus-items", daemon=True)
        self._thread.start()

    def _offer(self, item: Any) -> bool:
        """Queue `item` for the sessions to come; False once the group stopped (a caller
        that broke off: the thread must not wait on a queue nobody reads)."""
        while not self._stopped.is_set():
            try:
                self._pending.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def _take(self, block: bool) -> bool:
        """Make the session of the next item, if one is there (or, with `block`, once it
        is); False when none was."""
        try:
            item = self._pending.get(block=block, timeout=WAIT_S if block else None)
        except queue.Empty:
            return False
        if item is _END:
            self._producing = False
            return True
        try:
            session = self._make(item)
        except Exception as exc:  # unreadable input: reported, the rest go on
            self.on_result(item, exc)
            return True
        if session.finished:
            self._settle(item, session)
        else:
            self._active.append((item, session))
        return True

    def _settle(self, item: Any, session: Session) -> None:
        try:
            result: Any = session.result()
        except Exception as exc:
            result = exc
        self.on_result(item, result)

    def next_job(self):
        while self._producing and len(self._active) < self.width and self._take(False):
            pass
        for _ in range(len(self._active)):
            self._turn = (self._turn + 1) % len(self._active)
            item, session = self._active[self._turn]
            try:
                job = session.next_job()
            except Exception as exc:
                session.fail(exc)
                job = None
            if session.finished:
                self._retire(item, session)
                return self.next_job()
            if job is not None:
                self._owner[id(job)] = (item, session)
                return job
        return None

    def job_done(self, job) -> None:
        item, session = self._owner.pop(id(job))
        try:
            session.job_done(job)
        except Exception as exc:
            session.fail(exc)
        self._retire(item, session)

    def job_failed(self, job, error: BaseException) -> None:
        """One window could not be decoded: its recording fails, the others go on."""
        item, session = self._owner.pop(id(job))
        session.fail(error)
        self._retire(item, session)

    def _retire(self, item: Any, session: Session) -> None:
        """A finished recording leaves the active ones, its result reported (once)."""
        if session.finished and (item, session) in self._active:
            # Reported before it leaves: a group with no recording left is finished, and
            # another thread (an engine's second lane) may be looking.
            self._settle(item, session)
            self._active.remove((item, session))

    def wait(self) -> None:
        """Nothing to decode: wait a moment for the next item and make its session. Not
        longer: the thread waiting here drives the engine, and another thread's recording
        that joins it meanwhile must not wait for the items to come (a slow generator)."""
        self._take(True)

    def fail(self, error: BaseException) -> None:
        self.error = error
        self._stopped.set()  # the items' thread ends (after the item it may be reading)

    @property
    def finished(self) -> bool:
        return self.error is not None or (
            not self._producing and not self._active and self._pending.empty()
        )


_END = object()  # after a group's last item
WAIT_S = 0.1  # longest wait for an item in the thread that drives an engine


def _size(audio: Any) -> int:
    """Bytes of a file (samples: their count), 0 when unknown: an order by length."""
    if isinstance(audio, (str, os.PathLike)):
        try:
            return os.path.getsize(audio)
        except OSError:
            return 0
    return len(audio) if hasattr(audio, "__len__") else 0


def transcribe_many(
    model: Whisper,
    audios: Iterable[Any],
    *,
    batch_size: int = 8,
    engine: Engine | None = None,
    verbose: bool | None = None,
    options: TranscribeOptions | None = None,
    read: Callable[[Any], Any] | None = None,
    state_path: Callable[[Any], str | os.PathLike] | None = None,
    options_of: Callable[[Any], TranscribeOptions] | None = None,
    threads: int | str | None = None,
    **kwargs: Any,
) -> Iterator[tuple[Any, dict | Exception]]:
    """Transcribe many recordings, up to `batch_size` side by side on one engine, each as
    `transcribe` would alone (its own previous-text prompt, fallback, words...).

    Yields `(audio, result)` as each recording finishes, in the order they finish (with
    `batch_size` > 1 the largest files start first);
    `result` is the exception instead for an input that could not be transcribed (the
    others go on). Keyword arguments are `transcribe`'s options (or `options`). `read`
    turns an item of `audios` into what a session reads (default: the item itself, a path
    or samples); `state_path(item)` names a file to save and resume its progress in;
    `options_of(item)` gives an item options of its own (a language per file), which
    must keep `fp16` as `options` has it. `threads`: the engine's CPU threads
    (default: the caller's; "auto": measured as the steps run, see Engine).
    """
    options = options or TranscribeOptions.create(**kwargs)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    model = _full_precision(model, options)
    engine = engine or Engine(model, max_batch=batch_size, threads=threads)
    results: queue.Queue = queue.Queue()

    def make(audio: Any) -> Session:
        own = options if options_of is None else options_of(audio)
        keeper = None
        if state_path is not None:
            keeper = StateFile(state_path(audio), audio, model, own)
        session = engine.prepare(
            make_session,
            model,
            audio if read is None else read(audio),
            own,
            verbose=verbose,
            on_window=None if keeper is None else keeper.save,
        )
        if keeper is not None:
            keeper.restore(session)
            session.on_finish = keeper.save
        return session

    if batch_size > 1 and isinstance(audios, (list, tuple)):
        # Largest first: a long recording decodes its windows one after another, so started
        # last it would run alone at the end while every other slot stands empty.
        audios = sorted(audios, key=_size, reverse=True)
    group = _Group(
        make, audios, batch_size, lambda item, result: results.put((item, result)), engine.wake
    )
    # Decoding runs in the caller's thread (or the engine's worker, if it has one),
    # between the results it yields: no second thread runs torch (see _Group).
    try:
        while not (group.finished and results.empty()):
            engine.run(group, until=lambda: not results.empty())
            while not results.empty():
                yield results.get()
        if group.items_error is not None:
            # Reading `audios` failed: what came before it is done; the caller hears why
            # the rest is missing.
            raise group.items_error
    finally:
        # Stopped early (Ctrl-C, an exception, a break): nothing of it stays on the engine.
        group.fail(Cancelled("stopped"))
        engine.forget(group)


