"""How many threads a decoding step uses, chosen by measuring steps as they run.

A decoding step is a few hundred small products; with several OpenMP threads each of them
ends at a barrier where every thread must arrive. On an idle machine that is the fastest
way to use the cores, but when another process takes one of them, the thread that shares
its core arrives a scheduler time slice late at every barrier, and the step takes many
times longer (auto, base: 30% of its idle speed with one of two cores busy). One thread
never waits for another. Which is faster changes while a program runs (a laptop, a
shared server), so the policy keeps measuring: it runs most steps with the count that was
fastest, and every so often a few with the other, switching when that is clearly faster.

OpenMP thread counts belong to the calling thread, so the count set here applies to the
engine's own steps only, and is restored after each.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..kernels import load_samples, machine_busy

logger = logging.getLogger(__name__)


class ThreadPolicy:
    """Thread counts for decoding steps: `fixed` always, else the faster of 1 and
    `max_threads` (default: torch's count in the thread that runs the first step)."""

    PROBE_STEPS = 6  # steps timed with the other count
    FIRST_PROBE = 8  # steps before the first comparison (a busy machine shows at once)
    PROBE_EVERY = 200  # steps between comparisons later on
    MARGIN = 0.85  # the other count must take at most this share of the time to switch
    SLOWDOWN = 1.5  # steps this much slower than at the last decision: compare again now
    START_SAMPLES = 3  # looks at the machine before the first window

    def __init__(
        self, fixed: int | None = None, max_threads: int | None = None, active: bool = True
    ) -> None:
        self.active = active
        self.fixed = fixed
        self.max_threads = max_threads
        self.current: int | None = fixed
        self._recent: list[float] = []  # seconds per step with `current`, newest last
        self._probe: list[float] = []
        self._trying: int | None = None
        self._until_probe = self.FIRST_PROBE
        self._baseline: float | None = None  # median step time at the last decision
        self.switches = 0

    def _start(self) -> None:
        if self.max_threads is None:
            self.max_threads = torch.get_num_threads()
        if self.current is None:
            self.current = self.max_threads
            # Another process running now: start on one thread (the first window is
            # encoded before any step could tell), and measure from there as always.
            # Every one of a few samples 1 ms apart: a single one finds a short-lived
            # process (a shell command, a kernel thread) 2-4% of the time on an idle
            # 2-core VM, and a wrong guess costs the first window half its speed.
            samples = load_samples(self.START_SAMPLES, 0.001)
            if self.adaptive and machine_busy(samples, threads=self.max_threads, every=True):
                self.current = 1

    @property
    def adaptive(self) -> bool:
        return self.fixed is None and (self.max_threads or torch.get_num_threads()) > 1

    @contextmanager
    def apply(self) -> Iterator[None]:
        """Run other work of the engine (encoding windows) under the count its steps use,
        untimed: when one thread is faster for steps, the machine is busy, and the
        encoder's products wait on a late thread as well."""
        if self.active:
            self._start()
        with _threads(self.current if self.active else None):
            yield

    @contextmanager
    def step(self) -> Iterator[None]:
        """Run one decoding step under the chosen count, timing it."""
        if not self.active:
            yield
            return
        self._start()
        with _threads(self._trying or self.current):
            start = time.perf_counter()
            yield
            took = time.perf_counter() - start
        self._record(took)

    def _record(self, took: float) -> None:
        if not self.adaptive:
            return
        if self._trying is not None:
            self._probe.append(took)
            if len(self._probe) >= self.PROBE_STEPS:
                self._decide()
            return
        self._recent.append(took)
        del self._recent[: -self.PROBE_STEPS]
        self._until_probe -= 1
        full = len(self._recent) >= self.PROBE_STEPS
        if full and self._baseline is not None:
            # Another process just took a core: do not wait for the next comparison.
            if statistics.median(self._recent) > self._baseline * self.SLOWDOWN:
                self._until_probe = 0
        if self._until_probe <= 0 and full:
            self._trying = 1 if self.current != 1 else self.max_threads
            self._probe = []

    def _decide(self) -> None:
        # Medians: one step of either run may be slow for reasons of its own (a window
        # admitted, a page fault).
        mine = statistics.median(self._recent)
        other = statistics.median(self._probe)
        if other < mine * self.MARGIN:
            logger.debug(
                "decoding steps: %d threads (%.2f ms) instead of %d (%.2f ms)",
                self._trying,
                other * 1e3,
                self.current,
                mine * 1e3,
            )
            self.current = self._trying
            self.switches += 1
            self._recent = list(self._probe)
            mine = other
        self._baseline = mine
        self._trying = None
        self._probe = []
        self._until_probe = self.PROBE_EVERY


@contextmanager
def _threads(count: int | None) -> Iterator[None]:
    """This thread's torch thread count set to `count` (None: left as it is) for the
    block, and restored after, whatever happens."""
    before = torch.get_num_threads()
    if count is None or count == before:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
