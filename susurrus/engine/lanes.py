"""A second lane: half of the engine's windows decoded by a thread of their own.

When another process takes one of two cores, the engine's steps run on one thread
(threads.py): split between two, every product would wait at a barrier for the thread
that shares its core with the other process. Two threads that never wait for each other
are different: the scheduler shares the cores between running threads, so beside one
busy loop they run on 4/3 of two cores where one runs on one. The engine then keeps two
tables: its own, stepped by the thread that drives it, and a twin's (an engine of half
the batch on one torch thread), stepped here; windows from the same sources join
whichever has room. A step of 8 rows on one thread takes about twice one of 4 rows (the
rows' arithmetic sets its time, not the weights' reads), so nothing is lost by the split
(measured, benchmarks/two_tables.py; a batched transcription of en-long beside a busy
loop in two such lanes: tiny.en 3.8 s against 4.4, base 10.3 against 11.5; idle about
equal to one table on two OpenMP threads).

A window's tokens do not depend on its lane beyond what they already depend on (which
other windows share its steps: the products' kernels are chosen per row count).
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

import torch

from .worker import close_at_exit

if TYPE_CHECKING:
    from .engine import Engine, Source

log = logging.getLogger("susurrus")


class Lanes:
    """The second lane of an engine: its twin engine (made on first use) and the thread
    that steps it while `on` (the engine's thread policy runs its own steps on one
    thread of several), or while it still has windows."""

    WAIT_S = 0.05  # longest wait for either lane's progress before looking again

    def __init__(self) -> None:
        self.twin: Engine | None = None
        self.on = False
        self._stop = False
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition()
        self._stepping = False  # the twin is in a step: it may hold a window not in its table
        self.progress = 0  # the twin's steps so far (the engine's thread waits for them)

    @property
    def idle(self) -> bool:
        """Whether the twin holds no window: none in its table, none being taken,
        encoded or returned (in a step)."""
        twin = self.twin
        return twin is None or not (self._stepping or twin._windows)

    @property
    def on_thread(self) -> bool:
        """Whether the calling thread is this lane's."""
        return self._thread is not None and self._thread is threading.current_thread()

    def start(self, owner: Engine) -> None:
        """Let the twin take windows, making it and its thread on first use."""
        with self._cond:
            if self.twin is None:
                self.twin = owner._make_twin(self)
            if self._thread is None:
                thread = threading.Thread(target=self._run, name="susurrus-lane", daemon=True)
                thread.start()
                self._thread = thread
                close_at_exit(self)  # (stopped and waited for when the program ends)
            self.on = True
            self._cond.notify_all()

    def stop_taking(self) -> None:
        """The twin takes no more windows; those it has go on to their end."""
        self.on = False

    def moved(self, seen: int) -> bool:
        """Whether the twin holds a window or has stepped since `seen` steps: read under
        the lane's lock, as the lane writes both (read apart, a step that ends between
        them reads as no step at all, and the engine's thread as having nothing to do)."""
        with self._cond:
            return not self.idle or self.progress != seen

    def wait(self, seen: int) -> None:
        """Wait (briefly) for the twin's step after `seen` steps: the engine's own table
        is empty."""
        with self._cond:
            self._cond.wait_for(lambda: self.progress != seen or self.idle, self.WAIT_S)

    def drop(self, source: Source) -> None:
        if self.twin is not None:
            self.twin._drop(source)

    def close(self, wait_s: float = 0.0) -> None:
        """End the thread once its current step is done (the engine is gone, or the
        program ends); a twin's windows are dropped with it. Waits up to `wait_s` for the
        thread (the engine's finalizer does not wait: it may run on any thread)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
            thread = self._thread
        if wait_s > 0 and thread is not None and thread is not threading.current_thread():
            thread.join(wait_s)

    def _run(self) -> None:
        torch.set_num_threads(1)  # this thread's own count: its products never wait
        twin = self.twin
        assert twin is not None
        while True:
            with self._cond:
                # (an engine left without sources leaves this thread asleep)
                self._cond.wait_for(
                    lambda: self._stop or not self.idle or (self.on and bool(twin._sources))
                )
                if self._stop:
                    return
                self._stepping = True
            worked = True
            try:
                worked = twin.step()
            except BaseException as exc:  # (a callback's SystemExit must not end the lane)
                # A bug or a lack of memory: its table is in no known state, so the
                # recordings with windows in it fail and it starts again empty.
                log.exception("a decoding step of the second lane failed")
                try:
                    twin._fail_own(exc)
                except BaseException:
                    log.exception("the second lane failed to fail its recordings")
                    twin._new_table()
            finally:
                with self._cond:
                    # Both at once (see `moved`): the engine's thread, finding the twin
                    # idle and no step done since it looked for windows itself, knows
                    # that none came meanwhile.
                    self._stepping = False
                    self.progress += 1
                    self._cond.notify_all()
            if not worked:
                with self._cond:
                    # Nothing to take now: the sources prepare more, or all are done.
                    self._cond.wait(self.WAIT_S)
