"""One thread that does all of a process's torch work for engines shared by threads.

Every thread that has run one of torch's parallel CPU kernels keeps an OpenMP team of its
own for as long as it lives, idle or not. Once a process holds more OpenMP threads than
there are cores, libgomp stops spinning between parallel regions, and every small kernel
of a decoding step then waits for a sleeping worker to wake: on 2 cores, a second thread
that had run one product made base's steps 1.9x slower (OMP_WAIT_POLICY does not help).
So where several threads use one engine (the server's requests, live streams fed from
threads of their own), they hand their torch work to a `Worker` and wait: it loads the
models, prepares the sessions (reading, log-mel) and steps the engines, and the process
keeps one team. A program that decodes in one thread needs none. (The threads an engine
starts beside a busy process, ahead.py's and lanes.py's, run one torch thread each: no team.)
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger(__name__)

T = TypeVar("T")

# With sources on an engine but nothing to decode, the worker looks again this often even
# when nobody wakes it: a source whose owner does not call `Engine.wake` still goes on.
IDLE_LOOK_S = 0.5



class _Closing(Protocol):
    def close(self, wait_s: float, /) -> None: ...


# Owners of a running daemon thread that does torch work (workers, engines' second
# lanes): each is closed, its thread waited for, when the program ends (`_close_at_exit`).
_running: weakref.WeakSet[_Closing] = weakref.WeakSet()
EXIT_WAIT_S = 10.0  # longest wait at exit for one thread's step to end


def close_at_exit(owner: _Closing) -> None:
    """Have `owner.close(EXIT_WAIT_S)` called when the program ends (while it lives)."""
    _running.add(owner)


class Worker:
    """A thread (started on first use) that runs calls handed to it and steps the engines
    that have sources, in turn: calls first, then one step of each engine."""

    def __init__(self, name: str = "susurrus-engine") -> None:
        self.name = name
        self._cond = threading.Condition()
        self._calls: deque[tuple[Future, Callable[[], Any]]] = deque()
        self._engines: list[Engine] = []  # engines with work, stepped in turn
        self._thread: threading.Thread | None = None
        self._woken = False
        self._closed = False

    @property
    def ident(self) -> int | None:
        """The thread's identifier (None before its first use)."""
        return None if self._thread is None else self._thread.ident

    @property
    def on_thread(self) -> bool:
        """Whether the calling thread is the worker's own."""
        thread = self._thread
        return thread is not None and thread.ident == threading.get_ident()

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` run on the worker's thread before its next step; its
        result, or its exception raised here. From the worker's own thread: run at once."""
        if self.on_thread:
            return fn(*args, **kwargs)
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine worker is closed")
            self._calls.append((future, lambda: fn(*args, **kwargs)))
            self._start()
            self._woken = True
            self._cond.notify_all()
        return future.result()

    def attach(self, engine: Engine) -> None:
        """`engine` has a new source (or new work for one): step it until it has none."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine worker is closed")
            if engine not in self._engines:
                self._engines.append(engine)
            self._start()
            self._woken = True
            self._cond.notify_all()

    def wake(self) -> None:
        """A source has something to decode now (audio fed, an item arrived)."""
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop the thread once its current step is done; calls still waiting fail."""
        with self._cond:
            self._closed = True
            self._woken = True
            calls = list(self._calls)
            self._calls.clear()
            self._cond.notify_all()
            thread = self._thread
        for future, _ in calls:
            future.set_exception(RuntimeError("the engine worker is closed"))
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _start(self) -> None:
        # Called with the lock held.
        if self._thread is None:
            # A daemon: a program that never closes its worker still exits (it idles in a
            # wait between steps).
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()
            close_at_exit(self)

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    engines = list(self._engines)
                    self._engines.clear()
                    break
                self._woken = False
                calls = list(self._calls)
                self._calls.clear()
            # In methods of their own, so that no local keeps an engine or a call's
            # arguments (a recording) alive while the thread waits.
            ran = self._run(calls)
            del calls
            if self._step_engines() or ran:
                continue
            with self._cond:
                if not self._woken and not self._closed:
                    self._cond.wait(IDLE_LOOK_S if self._engines else None)
        # Closed with sources still on an engine: their callers must not wait forever.
        for engine in engines:
            engine._fail_all(RuntimeError("the engine worker is closed"))

    @staticmethod
    def _run(calls: list[tuple[Future, Callable[[], Any]]]) -> bool:
        for future, fn in calls:
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # the caller's to handle, raised in its thread
                future.set_exception(exc)
        return bool(calls)

    def _step_engines(self) -> bool:
        """One step of each engine with work; whether any did some."""
        with self._cond:
            engines = list(self._engines)
        worked = False
        for engine in engines:
            try:
                busy, more = engine._work()
            except BaseException as exc:  # never expected (a step's failure is handled there)
                # The thread goes on for the other engines; this one's callers hear of it.
                log.exception("the engine worker failed to step an engine")
                try:
                    engine._fail_all(exc)
                except BaseException:
                    log.exception("the engine worker failed to fail an engine's callers")
                busy, more = False, True
            worked = worked or busy
            if not more:
                with self._cond:
                    # Only an engine with sources is held: an unused one can be freed.
                    if not engine._has_work() and engine in self._engines:
                        self._engines.remove(engine)
        return worked


@atexit.register
def _close_at_exit() -> None:
    """Stop every such thread at its step's end before the interpreter ends: left
    running, a daemon thread inside a torch operator is unwound through C++ frames that
    cannot be, and the process aborts ("terminate called without an active exception")
    after its work is done, as a CI run of a batched transcription beside a busy process
    did. A worker's callers still waiting hear that it is closed."""
    for owner in list(_running):
        owner.close(EXIT_WAIT_S)
