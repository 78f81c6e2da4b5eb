"""The engine: one model, a table of decoding rows, windows from any recording.

Sources (sessions, or a plain list of windows) offer windows; the engine admits them
while it has room (`max_batch` windows at once), encodes their audio, fills in their
prompt, and from then on advances all its rows by one token per step. A window that
finishes leaves at once and its result goes back to its source, which may offer the next
window (continuous batching). Any thread may call `run`: whichever holds the engine steps
it for everyone, so two threads transcribing on one engine share its batches. An engine
given a `Worker` (worker.py) is stepped on the worker's thread alone, and `run` and
`prepare` from other threads hand their work to it and wait. Beside another process that
takes a core, half of the windows decode in a second table on a thread of its own
(lanes.py).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar

import torch
from torch import Tensor

from .. import native
from ..decoding import (
    DecodingOptions,
    DecodingResult,
    _encode_if_needed,
    _language_probs,
    check_options,
    compression_ratio,
)
from ..errors import SusurrusError
from ..kernels import packed_weights
from ..model import Whisper
from ..screen import DeferredSteps, LogitScreen, add_in_order
from ..tokenizer import Tokenizer, get_tokenizer
from .ahead import Ahead, AheadEncoder
from .lanes import Lanes
from .search import BeamSearch, RowRules, max_initial_index, rank, suppress_tokens
from .step import RowTable, Run, decoder_step
from .threads import ThreadPolicy
from .worker import Worker

if TYPE_CHECKING:
    from ..graphs import StaticStep

log = logging.getLogger("susurrus")

T = TypeVar("T")


class Cancelled(SusurrusError):
    """The caller cancelled a transcription (a client went away, Ctrl-C)."""


@dataclass(eq=False)
class WindowJob:
    """One window to decode at one temperature: its log-mel frames (n_mels, 3000) or its
    encoded audio (kept by a retry), and the decoding options of this attempt."""

    options: DecodingOptions
    mel: Tensor | None = None
    features: Tensor | None = None
    seed: int = 0  # sampling at temperature > 0 draws from a generator seeded with this
    result: DecodingResult | None = None
    tag: object = None  # the source's own bookkeeping


class Source(Protocol):
    """Something that offers windows to decode: a session, or a list of windows."""

    def next_job(self) -> WindowJob | None:
        """A window ready to decode now, or None (none now, or no more)."""

    def job_done(self, job: WindowJob) -> None:
        """`job.result` is set."""

    @property
    def finished(self) -> bool: ...

    def fail(self, error: BaseException) -> None:
        """Stop with `error` (raised to whoever runs the source); then finished."""

    # Optional, for a source of several recordings: `job_failed(job, error)`, one of its
    # windows could not be decoded (its recording fails, not the others). Without it the
    # engine calls `fail`.


class JobList:
    """A fixed list of windows (the `decode` API)."""

    def __init__(self, jobs: list[WindowJob]) -> None:
        self.jobs = jobs
        self._next = 0
        self._done = 0
        self.error: BaseException | None = None

    def next_job(self) -> WindowJob | None:
        if self._next == len(self.jobs):
            return None
        self._next += 1
        return self.jobs[self._next - 1]

    def job_done(self, job: WindowJob) -> None:
        self._done += 1

    def fail(self, error: BaseException) -> None:
        self.error = error

    @property
    def finished(self) -> bool:
        return self.error is not None or self._done == len(self.jobs)


@dataclass(eq=False)
class _Window:
    """A window in the table: its rows are [row, row + group)."""

    job: WindowJob
    source: Source
    tokenizer: Tokenizer
    group: int
    sample_begin: int  # initial tokens (prompt, start of transcript)
    sample_len: int
    no_speech_prob: float
    language: str
    language_probs: dict[str, float] | None
    features: Tensor
    search: BeamSearch | None
    generator: torch.Generator | None
    row: int = 0
    audio: int = 0
    n_sampled: int = 0
    histories: list[list[int]] = field(default_factory=list)
    ended: list[bool] = field(default_factory=list)
    first_logits: Tensor | None = None  # from the prompt's pass, for the first token
    # Beam search: the row (from `row`) each beam, in the search's order, sits in; empty:
    # beam j in row j. Beams keep their rows as the search reorders them, so that only a
    # beam continued twice is copied (see _place).
    slots: list[int] = field(default_factory=list)
    mask: int = 0  # its row of the token rules' masks
    # Screened steps (greedy, float32 on a CPU; see screen.py) whose log-probabilities are
    # added when the window is done.
    deferred: DeferredSteps = field(default_factory=DeferredSteps)
    done: bool = False
    cancelled: bool = False  # set by another thread: leaves at the next compaction

    @property
    def beam_rows(self) -> Sequence[int]:
        """The row (from `row`) of each beam, in the search's order."""
        return self.slots or range(self.group)

    @property
    def temperature(self) -> float:
        return self.job.options.temperature

    @property
    def position(self) -> int:
        """Where the next input token goes: after the prompt and the sampled tokens."""
        return self.sample_begin + self.n_sampled - 1


class _Opening(NamedTuple):
    """A window's language, tokenizer, prompt and suppressed tokens (Engine._open)."""

    language: str | None
    language_probs: dict[str, float] | None
    tokenizer: Tokenizer
    initial: list[int]
    suppressed: list[int]


class _Waiter:
    """A caller of `run` waiting for the worker: set once its source is finished or its
    `until()` holds."""

    def __init__(self, source: Source, until: Callable[[], bool] | None) -> None:
        self.source = source
        self.until = until
        self.event = threading.Event()

    def done(self) -> bool:
        try:
            return self.source.finished or (self.until is not None and self.until())
        except Exception:  # the caller finds out for itself once woken
            return True


class Engine:
    """Decodes windows of any number of recordings on one model, `max_batch` at a time."""

    AHEAD = 2  # windows taken beyond the table's room while they are encoded ahead

    def __init__(
        self,
        model: Whisper,
        *,
        max_batch: int = 8,
        static_steps: bool | None = None,
        threads: int | str | None = None,
        worker: Worker | bool | None = None,
        lanes: bool | None = None,
    ) -> None:
        """`static_steps`: run the step over the whole table with static shapes (see
        graphs.py); by default on a GPU when `model.cuda_graphs`, where it is captured as
        a CUDA graph. `threads`: CPU threads of the engine's work, exactly; by default
        (None or "auto") the faster of one and the calling thread's torch count, measured
        as the steps run (see threads.py): on a machine where another process takes a
        core, one thread is several times faster, and a second thread then encodes the
        windows that wait for room (see ahead.py). The products' results do not depend on
        the count (tests/test_threads.py), so neither do the transcripts.
        `worker`: a `Worker` whose thread does all of this engine's torch work (engines
        may share one), or True for one of its own; for an engine that several threads
        use (see worker.py). Without one, the threads that call `run` step it.
        `lanes`: whether half of the windows decode on a second thread, each lane on one
        torch thread (see lanes.py); by default (None) while the thread policy runs the
        steps on one thread of several (another process takes a core), True always on
        the CPU (with room for two windows or more), False never."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.model = model
        self.max_batch = max_batch
        self.n_ctx = model.dims.n_text_ctx
        if static_steps is None:
            static_steps = model.device.type == "cuda" and model.cuda_graphs
        self.static_steps = static_steps
        self._new_table()
        self._sources: list[Source] = []
        self._waiters: list[_Waiter] = []  # callers of `run` waiting on the worker
        if worker is True:
            worker = Worker()
            # Its thread ends with the engine (it holds no reference to an idle engine).
            weakref.finalize(self, worker.close)
        self.worker: Worker | None = worker or None
        self._lock = threading.Condition()
        self._driving = False
        # Held while a step computes: other threads' heavy work (reading a recording) waits
        # for it rather than running torch kernels beside it, which on a small machine
        # slows both many times over (their thread pools fight for the same cores).
        self._compute = threading.RLock()
        self._preparing = 0  # threads waiting for `exclusive`: the driver lets them in first
        # Around every call into a source: with two lanes, two threads take and return
        # windows, and a source (a session) is not made for that.
        self._source_lock = threading.RLock()
        self.lanes = lanes
        self._lanes = Lanes()
        weakref.finalize(self, self._lanes.close)
        self._may_take: Callable[[], bool] | None = None  # a twin's: whether it may take
        # On a GPU there is nothing to choose: the device does the work.
        on_cpu = model.device.type == "cpu"
        if threads is None or threads == "auto":
            self.threads = ThreadPolicy(active=on_cpu)
        else:
            self.threads = ThreadPolicy(fixed=int(threads), active=on_cpu)
        # Windows waiting for room, encoded on a second thread while one thread decodes
        # beside another process (see ahead.py); its thread ends with the engine.
        self._ahead_encoder: AheadEncoder | None = None
        if on_cpu and not self.static_steps:
            self._ahead_encoder = AheadEncoder(model)
            weakref.finalize(self, self._ahead_encoder.close)
            self.threads.quiet = (
                lambda encoder=self._ahead_encoder, lanes=self._lanes: encoder.idle and lanes.idle
            )
        self.steps = 0  # decoding steps run, for statistics
        self.row_steps = 0  # rows advanced, summed over steps

    def _new_table(self) -> None:
        """An empty table of rows (at the start, and after a step failed)."""
        model = self.model
        tokenizer = get_tokenizer(model.is_multilingual, num_languages=model.num_languages)
        self._static: dict[tuple[int, int, int], StaticStep] = {}
        self._table = RowTable(model.decoder, model.dims.n_audio_ctx, full=self.static_steps)
        self._rules = RowRules(model.dims.n_vocab, tokenizer, model.device)
        self._sum_logprobs = torch.zeros(0, device=model.device)
        self._last_tokens = torch.zeros(0, dtype=torch.long, device=model.device)
        self._windows: list[_Window] = []  # in table order
        self._ahead: list[Ahead] = []  # windows taken from their sources, not yet in it
        self._joining: list[Ahead] = []  # windows on their way in (encoded, opened)
        # While a screened step chooses: its screen, the hidden states of its screened rows
        # (the first rows of the table), and how far the screen's activations were from them.
        self._screened: tuple[LogitScreen, Tensor, Tensor] | None = None

    def prepare(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)`: torch work done for this engine outside its steps
        (making a session: reading, log-mel). On the worker's thread when the engine has
        one, else here between two steps (see `exclusive`); on the second lane's thread
        (a source it takes a window from makes a session), at once: that thread's torch
        work runs beside the engine's steps by design, and the engine's thread may be
        waiting for the source it holds."""
        if self._lanes.on_thread:
            return fn(*args, **kwargs)
        if self.worker is not None:
            return self.worker.call(fn, *args, **kwargs)
        with self.exclusive():
            return fn(*args, **kwargs)

    def wake(self) -> None:
        """A source of this engine has a window to offer now that it had not when last
        asked (an item arrived): its worker looks at once. Without a worker, nothing to do
        (the running thread asks the source's `wait`)."""
        if self.worker is not None:
            self.worker.wake()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold around CPU-heavy work done beside the engine (preparing a session): it
        runs between two steps instead of during one, and before the next step."""
        with self._lock:
            self._preparing += 1
        try:
            with self._compute:
                yield
        finally:
            with self._lock:
                self._preparing -= 1
                self._lock.notify_all()

    def stats(self) -> dict[str, int]:
        """What the engine holds and has done: windows in its table (and rows), sources
        running on it, decoding steps and rows advanced so far (their ratio is the mean
        batch), windows encoded on the second thread (see ahead.py)."""
        twin = self._lanes.twin
        return {
            "windows": len(self._windows) + (len(twin._windows) if twin else 0),
            "rows": self._table.n_rows + (twin._table.n_rows if twin else 0),
            "sources": len(self._sources),
            "steps": self.steps + (twin.steps if twin else 0),
            "row_steps": self.row_steps + (twin.row_steps if twin else 0),
            "encoded_ahead": self._ahead_encoder.encoded if self._ahead_encoder else 0,
            "lane_steps": twin.steps if twin else 0,  # steps of the second lane's table
        }

    # -- running --------------------------------------------------------------------------

    def transcribe(
        self,
        audio,
        *,
        on_segment: Callable[[dict], None] | None = None,
        cancel: threading.Event | None = None,
        **options,
    ) -> dict:
        """`susurrus.transcribe` on this engine: thread-safe, and concurrent calls decode
        their windows in the same batches. `on_segment` gets each segment once it is final
        (from whichever thread drives the engine); setting `cancel` stops this recording
        (Cancelled)."""
        from ..transcribe import transcribe

        return transcribe(
            self.model, audio, engine=self, on_segment=on_segment, cancel=cancel, **options
        )

    def run(
        self,
        source: Source,
        cancelled: Callable[[], bool] | None = None,
        until: Callable[[], bool] | None = None,
    ) -> None:
        """Decode `source`'s windows until it is finished, along with every other source
        of this engine. Thread-safe; `cancelled()` true stops the source (Cancelled).
        `until()` true returns early, the source staying on the engine (call `run` again
        to go on, or `forget` it). With a worker, the worker decodes and this waits."""
        if self.worker is not None and not self.worker.on_thread:
            self._wait_for_worker(source, cancelled, until)
            return
        with self._lock:
            if source not in self._sources:
                self._sources.append(source)

        def done() -> bool:
            # Under the sources' lock: the other lane's thread may be returning a window,
            # and a source is finished only once its results are out.
            with self._source_lock:
                return source.finished or (until is not None and until())

        stopped = True
        try:
            while True:
                with self._lock:
                    while self._driving and not done():
                        if cancelled is not None and cancelled():
                            raise Cancelled("cancelled")
                        # Woken when a result comes back or the driver stops; the timeout
                        # lets a waiting caller notice its cancellation.
                        self._lock.wait(timeout=0.1)
                    if done():
                        break
                    self._driving = True
                try:
                    while not done():
                        if cancelled is not None and cancelled():
                            raise Cancelled("cancelled")
                        with self._lock:
                            # Work waiting for `exclusive` goes first: a step takes the
                            # lock back at once, and a waiting thread would starve.
                            while self._preparing:
                                self._lock.wait(timeout=0.05)
                        with self._compute:
                            worked = self.step()
                        if not worked and not done():
                            # Nothing to decode now: the source prepares more (or is stuck).
                            wait = getattr(source, "wait", None)
                            if wait is None:
                                raise RuntimeError("a source offers no window but is not done")
                            with self._source_lock:
                                wait()
                finally:
                    with self._lock:
                        self._driving = False
                        self._lock.notify_all()
            error = getattr(source, "error", None)
            if error is not None:
                raise error
            stopped = source.finished
        finally:
            if stopped:
                self.forget(source)

    def _wait_for_worker(
        self,
        source: Source,
        cancelled: Callable[[], bool] | None,
        until: Callable[[], bool] | None,
    ) -> None:
        """`run` for a thread other than the worker's: hand `source` over and wait."""
        assert self.worker is not None
        waiter = _Waiter(source, until)
        with self._lock:
            if source not in self._sources:
                self._sources.append(source)
            self._waiters.append(waiter)
        stopped = True
        try:
            self.worker.attach(self)
            # The worker sets the event; the timeout lets a caller notice its cancellation.
            while not waiter.event.wait(0.1):
                if cancelled is not None and cancelled():
                    raise Cancelled("cancelled")
            error = getattr(source, "error", None)
            if error is not None:
                raise error
            stopped = source.finished
        finally:
            with self._lock:
                self._waiters.remove(waiter)
            if stopped:
                self.forget(source)

    def _has_work(self) -> bool:
        with self._lock:
            return bool(self._sources or self._windows)

    def _work(self) -> tuple[bool, bool]:
        """One step, on the worker's thread; then the callers whose source is done (or
        whose `until` holds) are woken. (whether it did work, whether sources remain)"""
        try:
            worked = self.step()
        except Exception as exc:
            # A bug or a lack of memory: the table is in no known state, so every source
            # on it fails (raised to its caller) and the engine starts again empty.
            log.exception("a decoding step failed")
            self._fail_all(exc)
            worked = True
        with self._lock:
            waiters = [w for w in self._waiters if not w.event.is_set()]
            more = bool(self._sources or self._windows)
        for waiter in waiters:
            with self._source_lock:  # (as in `run`)
                done = waiter.done()
            if done:
                waiter.event.set()
        return worked, more

    def _fail_all(self, error: BaseException) -> None:
        """Every source fails with `error` and the table empties (on the worker's thread:
        a step failed, or the worker stops); the waiting callers raise it."""
        with self._lock:
            sources = list(self._sources)
            waiters = list(self._waiters)
        with self._source_lock:
            for source in sources:
                source.fail(error)
                self._lanes.drop(source)
        self._new_table()
        for waiter in waiters:
            waiter.event.set()

    def forget(self, source: Source) -> None:
        """Take a source off the engine; its windows leave at the next step."""
        with self._lock:
            if source in self._sources:
                self._sources.remove(source)
            self._drop(source)
        self.wake()  # a worker lets go of an engine left without sources

    def _drop(self, source: Source) -> None:
        """A source that stopped (cancelled, failed): its windows leave at the next step."""
        for window in list(self._windows):
            if window.source is source:
                window.cancelled = True
        for entry in list(self._ahead):
            if entry.source is source:
                entry.cancelled = True
        self._lanes.drop(source)

    def _fail_own(self, error: BaseException) -> None:
        """A twin's step failed (on its lane's thread): the recordings with windows in
        its table fail, and it starts again empty; the other lane goes on."""
        sources = {id(w.source): w.source for w in self._windows}
        sources.update({id(e.source): e.source for e in (*self._ahead, *self._joining)})
        with self._source_lock:
            for source in sources.values():
                source.fail(error)
        self._new_table()
        with self._lock:
            self._lock.notify_all()

    def _make_twin(self, lanes: Lanes) -> Engine:
        """The second lane's engine: half the batch, one torch thread, this engine's
        sources, locks and (through `lanes.on`) its say on when to take windows."""
        twin = Engine(self.model, max_batch=self.max_batch // 2, static_steps=False,
                      threads=1, lanes=False)
        twin._sources = self._sources
        twin._lock = self._lock
        twin._source_lock = self._source_lock
        twin._may_take = lambda: lanes.on
        return twin

    def _lanes_wanted(self) -> bool:
        """Whether the second lane takes windows now (see lanes.py)."""
        if self.lanes is False or self.static_steps or self.max_batch < 2:
            return False
        if self.model.device.type != "cpu":
            return False
        if self.lanes:
            return True
        policy = self.threads
        # A comparison the schedule brings waits while the lanes decode (on two cores they
        # are as fast as one table on both idle; draining the second lane for it cost a
        # 640 s batch 40% of its time in one lane); one the machine brings (cores came
        # free) has the second lane take no more, and runs once it is empty.
        return (
            policy.adaptive
            and policy.current == 1
            and not policy.trying
            and not policy.urgent
        )

    @torch.inference_mode()
    def step(self) -> bool:
        """Admit waiting windows, then advance every row by one token. False: no work."""
        self._compact()
        lanes = self._lanes
        seen = lanes.progress  # (what the other lane returned after this may bring more)
        with self.threads.apply():
            if self._lanes_wanted():
                lanes.start(self)
            else:
                lanes.stop_taking()
            admitted = self._admit()
        if not self._windows:
            if not self.static_steps:
                # Nothing to decode now (a source waits for audio, or all are done): the
                # buffers of the last batch go back rather than stay at their peak.
                self._table.release()
            if lanes.moved(seen):
                lanes.wait(seen)  # the other lane decodes: its results may bring more
                return True
            return admitted  # language detection alone is work done too
        with self.threads.step():
            logits = self._logits()
            self._rules.apply(logits, between=self._refine if self._screened is not None else None)
            self._choose(logits)
            self._screened = None
        self._compact()
        return True

    # -- admission ------------------------------------------------------------------------

    def _admit(self) -> bool:
        """Take windows from the sources while there is room; whether any came."""
        room = self._room() - len(self._windows)
        ahead = self._encode_ahead()
        self._ahead = [entry for entry in self._ahead if not entry.cancelled]
        self._take(room + (self.AHEAD if ahead else 0) - len(self._ahead))
        if not self._ahead:
            return False
        if ahead:
            taken = self._ready_ahead(room)
        else:
            taken, self._ahead = self._ahead[:room], self._ahead[room:]
        if not taken:
            return False
        self._joining = taken  # (a failure on their way in fails their recordings too)
        self._join(taken)
        self._joining = []
        return True

    def _join(self, taken: list[Ahead]) -> None:
        """Windows taken from `_ahead` (encoded, or encoded here) open their rows in the
        table; a window that only detects the language is answered at once."""
        self._encode(taken)
        jobs = [(entry.job, entry.source) for entry in taken]
        decoding = [job for job, _ in jobs if job.options.task != "lang_id"]
        if decoding and not self.static_steps:
            # Room for all of them at once: buffers grown window by window would double
            # (past what the batch needs) and copy the windows already in.
            groups = [_group(job.options) for job in decoding] + [w.group for w in self._windows]
            self._table.reserve(
                self._table.n_rows + sum(groups[: len(decoding)]),
                self._table.n_audio + len(decoding),
                1,
                row_limit=self.max_batch * max(groups),
                audio_limit=self.max_batch,
            )
        for job, source in jobs:
            if job.options.task == "lang_id":
                # Only the language: no rows to decode.
                tokenizer = get_tokenizer(True, num_languages=self.model.num_languages)
                _, (probs,) = _language_probs(self.model, job.features[None], tokenizer)
                job.result = DecodingResult(
                    audio_features=job.features,
                    language=max(probs, key=probs.get),
                    language_probs=probs,
                )
                self._deliver(source, job)
            else:
                if source.finished:
                    continue  # refused with an earlier window of this list
                try:
                    opening = self._open(job)
                except Exception as exc:
                    self._refuse(source, job, exc)
                    continue
                self._start(job, source, opening)

    def _room(self) -> int:
        """Windows this table may hold: its share of `max_batch` beside the other lane."""
        if self._may_take is not None:  # a twin
            return self.max_batch if self._may_take() else 0
        twin = self._lanes.twin
        if twin is None:
            return self.max_batch
        return self.max_batch - (twin.max_batch if self._lanes.on else len(twin._windows))

    def _take(self, count: int) -> None:
        """Up to `count` more windows from the sources, in turn (so that one long
        recording does not starve the others)."""
        with self._lock:
            sources = list(self._sources)
        taken = 0
        while sources and taken < count:
            for source in list(sources):
                if taken >= count:
                    break
                with self._source_lock:
                    try:
                        job = source.next_job()
                    except Exception as exc:  # a recording that cannot be read: its own loss
                        source.fail(exc)
                        job = None
                if job is None:
                    sources.remove(source)
                else:
                    self._ahead.append(Ahead(job, source))
                    taken += 1

    def _encode(self, entries: list[Ahead]) -> None:
        """The audio of windows about to join, encoded here (or collected from the
        second thread, which started them when the machine was busy)."""
        for entry in entries:
            entry.collect()
        fresh = [entry.job for entry in entries if entry.job.features is None]
        if fresh and self.model.device.type == "cpu":
            # One window at a time (a batch gains the CPU nothing: see _encode_if_needed),
            # each into a tensor of its own: views of one batch tensor would keep all of
            # it alive until the batch's last window is done (a retry keeps its features).
            for job in fresh:
                job.features = _encode_if_needed(self.model, job.mel[None])[0]
                job.mel = None  # the frames are not needed again
        elif fresh:
            mels = torch.stack([job.mel for job in fresh])
            for job, features in zip(fresh, _encode_if_needed(self.model, mels)):
                job.features = features
                job.mel = None

    def _encode_ahead(self) -> bool:
        """Whether windows waiting for room are encoded on a second thread: on the CPU,
        when the thread policy runs the steps on one thread of several it may use (another
        process takes a core; see ahead.py), and is not about to time the other count (the
        second thread's work would slow its steps: back on an idle machine, a comparison
        that two threads lose for that reason would keep the steps on one)."""
        policy = self.threads
        return (
            self._ahead_encoder is not None
            and not self._lanes.on  # (the second lane's thread encodes its own)
            and policy.adaptive  # (more than one thread to choose from)
            and policy.current == 1
            and not policy.comparing
        )

    def _ready_ahead(self, room: int) -> list[Ahead]:
        """Up to `room` windows whose audio is encoded, in the order taken.

        With nothing in the table to decode meanwhile, this thread encodes the windows
        that fill the room from the front while the second takes them from the back, and
        it waits for them all, so that they decode as one batch (one window alone: here).
        With windows to decode, only those already encoded join, and the second thread
        goes on with the next: the windows decoding do not wait for the new ones."""
        wanted = self._ahead[:room]
        if not self._windows:
            while True:
                fresh = [entry for entry in wanted if entry.fresh]
                if len(fresh) > 1 and self._encoder_free():
                    self._encode_later(fresh.pop())
                if not fresh:
                    break
                self._encode(fresh[:1])
            ready = wanted
        else:
            ready = [entry for entry in wanted if entry.ready]
        for entry in ready:
            self._ahead.remove(entry)
            entry.collect()
        if self._encoder_free():
            for entry in [entry for entry in self._ahead if entry.fresh][:1]:
                self._encode_later(entry)
        return ready

    def _encoder_free(self) -> bool:
        """Whether the second thread has no window to encode."""
        return self._ahead_encoder is not None and self._ahead_encoder.idle

    def _encode_later(self, entry: Ahead) -> None:
        assert self._ahead_encoder is not None
        entry.encoding = self._ahead_encoder.submit(entry.job)

    def _open(self, job: WindowJob) -> _Opening:
        """What a window needs before it joins the table, worked out without touching it:
        what fails here (an option out of range, a token id outside the vocabulary) is
        the window's own, and fails its recording only."""
        model = self.model
        options = job.options
        check_options(options)
        language, language_probs = options.language, None
        if model.is_multilingual and language is None:
            base = get_tokenizer(True, num_languages=model.num_languages)
            features = job.features.to(model.dtype)
            _, (language_probs,) = _language_probs(model, features[None], base)
            language = max(language_probs, key=language_probs.get)
        tokenizer = get_tokenizer(
            model.is_multilingual,
            num_languages=model.num_languages,
            language=language,
            task=options.task,
        )
        return _Opening(
            language=language,
            language_probs=language_probs,
            tokenizer=tokenizer,
            initial=initial_tokens(tokenizer, options, self.n_ctx),
            suppressed=suppress_tokens(tokenizer, options.suppress_tokens, model.dims.n_vocab),
        )

    def _refuse(self, source: Source, job: WindowJob, error: Exception) -> None:
        """A window that cannot be decoded: its recording fails (in a source of several
        recordings, that one alone), and whatever else is in the table goes on."""
        log.debug("a window was refused: %s", error)
        failed = getattr(source, "job_failed", None)
        with self._source_lock:
            try:
                if failed is None:
                    source.fail(error)
                else:
                    failed(job, error)
            except Exception as exc:
                source.fail(exc)
        if source.finished:
            with self._lock:
                self._drop(source)
                self._lock.notify_all()

    def _start(self, job: WindowJob, source: Source, opening: _Opening) -> None:
        model = self.model
        options = job.options
        features = job.features.to(model.dtype)
        language, language_probs = opening.language, opening.language_probs
        tokenizer, initial = opening.tokenizer, opening.initial
        group = _group(options)
        sample_len = options.sample_len or self.n_ctx // 2
        sot_index = initial.index(tokenizer.sot)
        # The prompt's pass, as the plain decoder runs it, once: every row of the window
        # starts from the same prompt (the reference repeats it per beam), so the rows
        # that join the table are copies of this one. Its cache needs the prompt's
        # positions only, not the sampled tokens' too.
        cache = model.decoder.new_cache(1, n_ctx=len(initial))
        if self.static_steps:
            # The whole table at once: its buffers (and so the captured steps) never move.
            self._table.reserve(self.max_batch * group, self.max_batch, self.n_ctx)
        # (Otherwise _admit reserved the rows and audios of every window it starts.)
        # The audio's keys and values go straight into the window's place in the table.
        cache.cross_k, cache.cross_v = self._table.next_audio()
        model.decoder.fill_cross_cache(cache, features[None])
        tokens = torch.tensor([initial], device=model.device)
        hidden = model.decoder(tokens, cache)
        logits = model.decoder.logits(hidden[:, [sot_index, -1]])
        no_speech = logits[0, 0].softmax(dim=-1)[tokenizer.no_speech].item()
        generator = None
        if options.temperature > 0:
            generator = torch.Generator(device=model.device)
            generator.manual_seed(job.seed)
        window = _Window(
            job=job,
            source=source,
            tokenizer=tokenizer,
            group=group,
            sample_begin=len(initial),
            sample_len=sample_len,
            no_speech_prob=no_speech,
            language=language if model.is_multilingual else "en",
            language_probs=language_probs,
            features=job.features,
            search=(
                BeamSearch(options.beam_size, tokenizer.eot, options.patience)
                if options.beam_size is not None
                else None
            ),
            generator=generator,
            histories=[[] for _ in range(group)],
            ended=[False] * group,
            first_logits=logits[:, 1].expand(group, -1).contiguous(),
        )
        window.row, window.audio = self._table.append(cache, len(initial), copies=group)
        mask = self._rules.mask_for(
            opening.suppressed,
            tokenizer.encode(" ") + [tokenizer.eot] if options.suppress_blank else [],
        )
        window.mask = mask
        self._rules.add(
            group,
            mask,
            not options.without_timestamps,
            max_initial_index(options.max_initial_timestamp),
        )
        self._sum_logprobs = torch.cat(
            [self._sum_logprobs, torch.zeros(group, device=model.device)]
        )
        self._last_tokens = torch.cat([self._last_tokens, tokens[:, -1].expand(group)])
        self._windows.append(window)

    # -- one step -------------------------------------------------------------------------

    def _logits(self) -> Tensor:
        """Logits of every row: a decoder step for the rows already decoding, the prompt's
        pass for windows that just joined (they sit at the end of the table)."""
        decoding = [w for w in self._windows if w.first_logits is None]
        parts = []
        groups = {w.group for w in self._windows}
        if decoding and self.static_steps and len(groups) == 1:
            parts.append(self._static_logits(groups.pop())[: decoding[-1].row + decoding[-1].group])
        elif decoding:
            n_rows = decoding[-1].row + decoding[-1].group
            positions = [w.position for w in decoding]
            same = positions[0] if len(set(positions)) == 1 else None
            length = max(positions) + 1
            self._table.reserve(self._table.n_rows, self._table.n_audio, length)
            n_audio = decoding[-1].audio + 1
            # At one position the step cuts the keys' length itself: uncut, the views
            # stay the same from step to step.
            self_k, self_v, cross_k, cross_v = self._table.views(
                n_rows, n_audio, None if same is not None else length
            )
            position_rows = torch.tensor(
                [p for w, p in zip(decoding, positions) for _ in range(w.group)],
                device=self.model.device,
            )
            screen = self._screen()
            if screen is not None and any(w.search is not None or w.temperature > 0
                                          for w in decoding):
                screen = None  # beams and samples need every log-probability now
            # Packed weights (a second copy in memory) only for beam search (kernels.py).
            with packed_weights(any(w.search is not None for w in decoding)):
                step = decoder_step(
                    self.model.decoder,
                    self._last_tokens[:n_rows, None],
                    position_rows,
                    self_k,
                    self_v,
                    cross_k,
                    cross_v,
                    runs(decoding),
                    same,
                    hidden_only=screen is not None,
                )
            if screen is not None:
                hidden = step
                step, error = screen.approximate(hidden)
                self._screened = screen, hidden, error
            parts.append(step)
            self.steps += 1
            self.row_steps += n_rows
        for window in self._windows:
            if window.first_logits is not None:
                parts.append(window.first_logits)
                window.first_logits = None
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _screen(self) -> LogitScreen | None:
        """The decoder's logit screen, if it has one that still fits its weights."""
        decoder = self.model.decoder
        screen = getattr(decoder, "screen", None)
        if screen is None or self.static_steps or screen.split > self._rules.eot:
            return None
        return screen if screen.matches(decoder.token_embedding.weight) else None

    def _refine(self, logits: Tensor) -> None:
        """The screened rows' candidates for the best token, in float32 (after the
        suppressed tokens are masked, before the timestamp rules compare them)."""
        screen, hidden, error = self._screened
        screen.refine(logits[: hidden.shape[0]], hidden, error)

    def _static_logits(self, group: int) -> Tensor:
        """Every row's step with static shapes (captured on a GPU); windows that just
        joined step too, at their prompt's last position, and their logits are not used."""
        from ..graphs import StaticStep

        # A captured step holds the addresses of the table's buffers and of the weights:
        # reallocated or cast, they need a new one.
        weights = self.model.decoder.positional_embedding.data_ptr()
        key = (group, self._table.self_k[0].data_ptr(), weights)
        step = self._static.get(key)
        if step is None:
            self._static = {k: v for k, v in self._static.items() if k[1:] == key[1:]}
            step = self._static[key] = StaticStep(self._table, group)
        positions = torch.tensor(
            [w.position if w.first_logits is None else w.sample_begin - 1
             for w in self._windows for _ in range(w.group)],
            device=self.model.device,
        )
        n_rows = self._table.n_rows
        self.steps += 1
        self.row_steps += n_rows
        return step(self._last_tokens[:n_rows, None], positions)

    def _choose(self, logits: Tensor) -> None:
        """Each window's next tokens from its rows' logits; beams reorder their rows."""
        eot = self._rules.eot
        device = logits.device
        n_rows = logits.shape[0]
        next_tokens = torch.empty(n_rows, dtype=torch.long, device=device)
        sources = list(range(n_rows))
        greedy = [w for w in self._windows if w.search is None and w.temperature == 0]
        if greedy:
            index = _rows_of(greedy, device) if len(greedy) < len(self._windows) else None
            chosen = logits if index is None else logits.index_select(0, index)
            if self._screened is None and self._rules.native and chosen.dtype == torch.float32:
                # One pass on one thread (csrc/step.c): a third of the two reductions' time.
                picked, current = native.log_probs(chosen)
            else:
                picked = chosen.max(dim=-1).indices
                if self._screened is None:
                    # log_softmax, not max - logsumexp: a reduction of one row over the
                    # whole vocabulary splits its sum between threads, so its last digits
                    # would change with the thread count (the engine's thread policy
                    # changes it).
                    current = chosen.log_softmax(dim=-1).gather(1, picked[:, None])[:, 0]
                else:
                    current = self._defer(greedy, logits, picked)
            self._account(greedy, index, picked, current, next_tokens, eot)
        for window in self._windows:
            if window.search is None and window.temperature > 0:
                rows = slice(window.row, window.row + window.group)
                scaled = (logits[rows] / window.temperature).softmax(dim=-1)
                picked = torch.multinomial(scaled, 1, generator=window.generator)[:, 0]
                current = logits[rows].log_softmax(dim=-1).gather(1, picked[:, None])[:, 0]
                index = torch.arange(rows.start, rows.stop, device=device)
                self._account([window], index, picked, current, next_tokens, eot)
        beams = [w for w in self._windows if w.search is not None]
        if beams:
            index = _rows_of(beams, device)
            every = len(beams) == len(self._windows)  # every row, in order: no copy
            top = (logits if every else logits.index_select(0, index)).log_softmax(dim=-1)
            # Each row's best beam_size + 1 tokens (one may end the text); windows with
            # fewer beams than the widest take the first of theirs.
            top_logprobs, top_tokens = top.topk(max(w.group for w in beams) + 1, dim=-1)
            scores = (self._sum_logprobs.index_select(0, index)[:, None] + top_logprobs).tolist()
            top_tokens = top_tokens.tolist()
            new_scores, new_tokens, offset = [], [], 0
            for window in beams:
                g = window.group
                slots = window.beam_rows
                tokens, local, window_scores = window.search.update(
                    window.histories,
                    [scores[offset + p][: g + 1] for p in slots],
                    [top_tokens[offset + p][: g + 1] for p in slots],
                )
                offset += g
                window.histories = [
                    window.histories[s] + [t] for s, t in zip(local, tokens)
                ]
                window.slots = _place([slots[s] for s in local], g)
                row_scores, row_tokens = [0.0] * g, [0] * g
                for j, (p, s) in enumerate(zip(window.slots, local)):
                    sources[window.row + p] = window.row + slots[s]
                    row_scores[p], row_tokens[p] = window_scores[j], tokens[j]
                new_scores += row_scores
                new_tokens += row_tokens
            self._sum_logprobs.index_copy_(
                0, index, torch.tensor(new_scores, dtype=self._sum_logprobs.dtype, device=device)
            )
            next_tokens.index_copy_(0, index, torch.tensor(new_tokens, device=device))
        if sources != list(range(n_rows)):
            order = torch.tensor(sources, device=device)
            # Only the filled positions of the rows that already had a step move.
            self._table.reorder(sources, max(w.position for w in self._windows) + 1)
            self._rules.select(order)
        self._rules.advance(next_tokens)
        self._last_tokens = next_tokens
        for window in self._windows:
            window.n_sampled += 1
            complete = window.search.done if window.search is not None else all(window.ended)
            if (
                complete
                or window.n_sampled >= window.sample_len
                or window.sample_begin + window.n_sampled > self.n_ctx
            ):
                self._finish(window)

    def _defer(self, greedy: list[_Window], logits: Tensor, picked: Tensor) -> Tensor:
        """Log-probabilities of the greedy windows' tokens `picked` (one row each, in
        order): now for rows with every logit in float32 (a first token, from the prompt's
        pass), 0 for screened rows, whose steps are kept for the window's end."""
        screen, hidden, _ = self._screened
        screened = hidden.shape[0]
        split = screen.split
        rest = logits[:screened, split:].clone()
        masked = (logits[:screened, :split].amax(dim=1) == float("-inf")).tolist()
        current = torch.zeros(len(greedy), device=logits.device)
        tokens = picked.tolist()
        for i, window in enumerate(greedy):
            if window.row >= screened:
                row = logits[window.row]
                if self._rules.native and row.dtype == torch.float32:  # as _choose takes it
                    current[i] = native.log_probs(row[None], picked[i:i + 1])[1][0]
                else:
                    current[i] = row.log_softmax(dim=-1)[tokens[i]]
            elif not window.ended[0]:
                window.deferred.screen = screen
                window.deferred.add(
                    hidden[window.row], rest[window.row], tokens[i],
                    masked[window.row], window.n_sampled == 0,
                )
        return current

    def _account(
        self,
        windows: list[_Window],
        index: Tensor | None,
        picked: Tensor,
        current: Tensor,
        next_tokens: Tensor,
        eot: int,
    ) -> None:
        """Record the sampled tokens (greedy or sampling) of `windows`, whose rows, in
        order, are `index` (None: every row of the table)."""
        last = self._last_tokens if index is None else self._last_tokens.index_select(0, index)
        ended = last == eot
        update = current * ~ended
        picked = picked.masked_fill(ended, eot)
        if index is None:
            self._sum_logprobs += update
            next_tokens.copy_(picked)
        else:
            self._sum_logprobs.index_add_(0, index, update)
            next_tokens.index_copy_(0, index, picked)
        tokens = iter(picked.tolist())
        for window in windows:
            for j in range(window.group):
                token = next(tokens)
                if window.ended[j]:
                    continue  # ended before this step: its eot repeats, nothing to keep
                if token == eot:
                    window.ended[j] = True
                else:
                    window.histories[j].append(token)

    def _finish(self, window: _Window) -> None:
        """The window's result, back to its source; its rows leave at the end of the step."""
        window.done = True
        rows = slice(window.row, window.row + window.group)
        if window.deferred.tokens:
            steps, window.deferred = window.deferred, DeferredSteps()
            values = steps.screen.log_probs(
                steps, self._rules.suppress[window.mask], self._rules.blank[window.mask]
            )
            total = add_in_order(self._sum_logprobs[window.row].item(), values)
            self._sum_logprobs[window.row] = total
        scores = self._sum_logprobs[rows].tolist()
        if window.search is not None:
            scores = [scores[p] for p in window.beam_rows]
            candidates, scores = window.search.candidates(window.histories, scores)
        else:
            candidates = window.histories
        best = rank([len(t) for t in candidates], scores, window.job.options.length_penalty)
        tokens = candidates[best]
        text = window.tokenizer.decode(tokens).strip()
        window.job.result = DecodingResult(
            audio_features=window.features,
            language=window.language,
            language_probs=window.language_probs,
            tokens=tokens,
            text=text,
            avg_logprob=scores[best] / (len(tokens) + 1),
            no_speech_prob=window.no_speech_prob,
            temperature=window.temperature,
            compression_ratio=compression_ratio(text),
        )

    def _compact(self) -> None:
        """Windows that are done leave; windows from the end fill their places, so that
        only they are copied."""
        for window in self._windows:
            window.done = window.done or window.cancelled
        if not any(w.done for w in self._windows):
            return
        finished = [w for w in self._windows if not w.cancelled and w.job.result is not None]
        order = _fill_holes(self._windows)
        rows_from, rows_to, audios = [], [], []
        row = 0
        for audio, window in enumerate(order):
            if window.row != row:
                rows_from += range(window.row, window.row + window.group)
                rows_to += range(row, row + window.group)
            if window.audio != audio:
                audios.append((window.audio, audio))
            row += window.group
        kept_rows = [r for w in order for r in range(w.row, w.row + w.group)]
        length = max((w.position for w in order), default=0) + 1
        self._table.move(rows_from, rows_to, audios, length)
        index = torch.tensor(kept_rows, dtype=torch.long, device=self._last_tokens.device)
        self._rules.select(index)
        self._sum_logprobs = self._sum_logprobs.index_select(0, index)
        self._last_tokens = self._last_tokens.index_select(0, index)
        row = 0
        for audio, window in enumerate(order):
            window.row, window.audio = row, audio
            row += window.group
        self._windows = order
        self._table.n_rows, self._table.n_audio = row, len(order)
        for window in finished:
            self._deliver(window.source, window.job)
        if finished:
            with self._lock:
                self._lock.notify_all()  # callers whose recording just finished

    def _deliver(self, source: Source, job: WindowJob) -> None:
        with self._source_lock:
            try:
                source.job_done(job)
            except (Exception, SystemExit) as exc:
                # One recording's failure is only its own, a callback's SystemExit too (it
                # ended a worker's thread, and every caller of its engines waited forever):
                # raised again in the thread that waits for it. Ctrl-C is the driving
                # thread's, whoever's callback it lands in: it goes on up.
                source.fail(exc)


def _place(continued: list[int], group: int) -> list[int]:
    """Rows for a window's new beams, given the row each continues: the first beam to
    continue a row keeps it (no copy: most steps only reorder the beams); a second takes a
    row that no beam continues, copied from its source. (Moving every beam to its place in
    the search's order copied three rows a step where one was continued twice: base,
    beam 5.)"""
    rows = [-1] * len(continued)
    taken = [False] * group
    for j, row in enumerate(continued):
        if not taken[row]:
            taken[row] = True
            rows[j] = row
    free = (row for row in range(group) if not taken[row])
    return [row if row >= 0 else next(free) for row in rows]


def _group(options: DecodingOptions) -> int:
    """Rows a window decodes with: its beams, its samples, or one."""
    return options.beam_size or options.best_of or 1


def _fill_holes(windows: list[_Window]) -> list[_Window]:
    """The windows that stay, in table order, except that a window from the end takes the
    place of a finished one with as many rows (so that only it moves)."""
    kept = [w for w in windows if not w.done]
    order: list[_Window] = []
    placed: set[int] = set()
    position = {id(w): i for i, w in enumerate(windows)}
    for i, window in enumerate(windows):
        if id(window) in placed:
            continue
        if not window.done:
            order.append(window)
            placed.add(id(window))
            continue
        tail = next((w for w in reversed(kept) if id(w) not in placed), None)
        if tail is not None and tail.group == window.group and position[id(tail)] > i:
            order.append(tail)
            placed.add(id(tail))
    return order


def _rows_of(windows: list[_Window], device: torch.device) -> Tensor:
    return torch.tensor(
        [r for w in windows for r in range(w.row, w.row + w.group)], device=device
    )


def runs(windows: list[_Window]) -> tuple[Run, ...]:
    """Consecutive windows with rows groups of one size, for grouped cross-attention."""
    out: list[Run] = []
    for w in windows:
        last = out[-1] if out else None
        if last is not None and last.group == w.group:
            out[-1] = Run(last.row_start, w.row + w.group, last.audio_start, w.audio + 1, w.group)
        else:
            out.append(Run(w.row, w.row + w.group, w.audio, w.audio + 1, w.group))
    return tuple(out)


def initial_tokens(tokenizer: Tokenizer, options: DecodingOptions, n_ctx: int) -> list[int]:
    """Prompt, start of transcript and prefix: what a window's decoding starts from."""
    tokens = list(
        tokenizer.sot_sequence_including_notimestamps
        if options.without_timestamps
        else tokenizer.sot_sequence
    )
    sample_len = options.sample_len or n_ctx // 2
    if prefix := options.prefix:
        prefix_tokens = (
            tokenizer.encode(" " + prefix.strip()) if isinstance(prefix, str) else list(prefix)
        )
        # As the reference (whose slice keeps the whole prefix when the bound is 0).
        tokens += prefix_tokens[-(n_ctx // 2 - sample_len) :]
    if prompt := options.prompt:
        prompt_tokens = (
            tokenizer.encode(" " + prompt.strip()) if isinstance(prompt, str) else list(prompt)
        )
        tokens = [tokenizer.sot_prev, *prompt_tokens[-(n_ctx // 2 - 1) :], *tokens]
    return tokens


def decode_jobs(engine: Engine, jobs: list[WindowJob]) -> list[DecodingResult]:
    """Decode windows on `engine` (along with whatever else it decodes)."""
    engine.run(JobList(jobs))
    return [job.result for job in jobs]  # type: ignore[misc]

