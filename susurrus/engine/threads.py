"""How many threads a decoding step uses, chosen by measuring steps as they run.

A decoding step is a few hundred small products; with several OpenMP threads each of them
ends at a barrier where every thread must arrive. On an idle machine that is the fastest
way to use the cores, but when another process takes one of them, the thread that shares
its core arrives a scheduler time slice late at every barrier, and the step takes many
times longer (auto, base: 30% of its idle speed with one of two cores busy). Threads that
each have a core of their own never wait that long: the count that leaves the other
processes their cores (one on two cores beside one busy process, seven on eight). Which
is faster changes while a program runs (a laptop, a shared server), so the policy keeps
measuring: it runs most steps with the count that was fastest, and every so often a few
with another (the count that fits beside the processes running at that moment, else all
threads, or half of them where all are in use), switching when that is clearly faster.
A comparison costs most where it loses (two threads on a busy machine: steps 2-5 times
slower), so one clearly lost after its first few steps ends there, comparisons that keep
confirming the choice come less and less often, and while on fewer threads than it may
use a cheap look at the machine brings the next comparison forward when cores come free.

OpenMP thread counts belong to the calling thread, so the count set here applies to the
engine's own steps only, and is restored after each.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from ..kernels import load_samples, threads_left

logger = logging.getLogger(__name__)


class ThreadPolicy:
    """Thread counts for decoding steps: `fixed` always, else the fastest measured of
    `max_threads` (default: torch's count in the thread that runs the first step) and the
    counts that leave other processes their cores. `cpus`: the cores this process may
    run on (default: its affinity)."""

    PROBE_STEPS = 12  # steps timed with the other count (after one that wakes its threads)
    RECENT_STEPS = 24  # steps of the current count its side of a comparison is timed on
    FIRST_PROBE = 12  # steps before the first comparison (a busy machine shows at once)
    PROBE_EVERY = 200  # steps between comparisons later on
    MAX_EVERY = 1600  # ... doubled after each comparison that kept the count, up to this
    MARGIN = 0.85  # the other count must take at most this share of the time to switch
    QUICK_STEPS = 2  # a comparison whose first steps all take ...
    GIVE_UP = 1.25  # ... this many times the current count's mean ends there
    LOOK_EVERY = 50  # steps between looks at the machine while on fewer threads than all
    SLOWDOWN = 1.5  # steps this much slower than at the last decision: compare again now
    START_SAMPLES = 3  # looks at the machine before the first window

    def __init__(
        self,
        fixed: int | None = None,
        max_threads: int | None = None,
        active: bool = True,
        cpus: int | None = None,
    ) -> None:
        self.active = active
        self.fixed = fixed
        self.max_threads = max_threads
        self.cpus = cpus
        self.current: int | None = fixed
        self._recent: list[float] = []  # seconds per step with `current`, newest last
        self._probe: list[float] = []
        self._trying: int | None = None
        self._until_probe = self.FIRST_PROBE
        self._every = self.PROBE_EVERY
        self._baseline: float | None = None  # mean step time at the last decision
        self._room: int | None = None  # threads the last look at the machine had room for
        # A comparison is due because the machine changed (cores came free, steps slowed),
        # not by the schedule: the engine's second lane (lanes.py) makes way for it.
        self.urgent = False
        self.switches = 0
        # Whether the engine's second thread (ahead.py) is idle: its work slows the steps
        # of either count, so a comparison starts only once it holds, and only steps run
        # while it holds are timed.
        self.quiet: Callable[[], bool] | None = None

    def _start(self) -> None:
        if self.max_threads is None:
            self.max_threads = torch.get_num_threads()
        if self.current is None:
            # Other processes running now: start on the threads that leave them their
            # cores (the first window is encoded before any step could tell), and
            # measure from there as always. The most room of a few samples 1 ms apart:
            # a single one finds a short-lived process (a shell command, a kernel thread)
            # 2-4% of the time on an idle 2-core VM, and a wrong guess costs the first
            # window half its speed.
            room = 0
            if self.adaptive:
                for others in load_samples(self.START_SAMPLES, 0.001):
                    if others is not None:
                        room = max(room, self._fit(others))
                        if room == self.max_threads:
                            break
            self.current = self._room = room or self.max_threads  # (nothing known: all)

    @property
    def comparing(self) -> bool:
        """Whether a comparison runs or is due (the engine then starts no other work)."""
        return self.trying or (self.adaptive and self._until_probe <= 0)

    @property
    def trying(self) -> bool:
        """Whether a comparison runs: the steps now are timed on the other count."""
        return self._trying is not None

    @property
    def adaptive(self) -> bool:
        return self.fixed is None and (self.max_threads or torch.get_num_threads()) > 1

    @contextmanager
    def apply(self) -> Iterator[None]:
        """Run other work of the engine (encoding windows) under the count its steps use,
        untimed: when fewer threads are faster for steps, other processes take cores,
        and the encoder's products would wait on a late thread as well."""
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
            if len(self._probe) > self.PROBE_STEPS or self._clearly_lost():
                self._decide()
            return
        # Steps beside our own second thread are left out: slowed by it, they would pass
        # for another process taking a core (SLOWDOWN) and bias a comparison.
        quiet = self.quiet is None or self.quiet()
        if quiet:
            self._recent.append(took)
            del self._recent[: -self.RECENT_STEPS]
        self._until_probe -= 1
        fewer = self.current < self.max_threads
        if fewer and self._until_probe % self.LOOK_EVERY == 0 and self._freed():
            self._until_probe = 0
            self.urgent = True
        full = len(self._recent) >= self.PROBE_STEPS  # enough to compare (not yet all)
        if full and quiet and self._baseline is not None:
            # Another process just took a core: do not wait for the next comparison.
            if statistics.fmean(self._recent) > self._baseline * self.SLOWDOWN:
                self._until_probe = 0
                self.urgent = True
        if self._until_probe <= 0 and full:
            if not quiet:
                # The current count's side of the comparison is timed from when the
                # second thread is done: steps from before may be of another machine.
                self._recent = []
                return
            self._trying = self._other_count()
            self._probe = []

    def _timed(self) -> list[float]:
        # The comparison's first step is left out: it pays for waking threads that slept
        # (70 ms against 2 seen on a busy machine), whatever the count is worth after.
        return self._probe[1:]

    def _clearly_lost(self) -> bool:
        # Every step so far, not one: a single step may be slow for reasons of its own.
        timed = self._timed()
        return len(timed) >= self.QUICK_STEPS and min(timed) > (
            statistics.fmean(self._recent) * self.GIVE_UP
        )

    def _fit(self, others: int | None) -> int:
        """Threads that have a core of their own beside `others` threads of other
        processes."""
        assert self.max_threads is not None
        return threads_left(others, self.max_threads, self.cpus)

    def _look(self) -> int:
        """Threads the machine has room for now (procs_running: a tenth of a millisecond)."""
        return self._fit(next(load_samples(1, 0.0)))

    def _other_count(self) -> int:
        """The count a comparison tries: the one the machine has room for now where that
        is not the current one; else all threads from fewer, or half from all (slow
        steps that no process explains: a hypervisor's other guests)."""
        assert self.max_threads is not None and self.current is not None
        room = self._look()
        if room != self.current:
            return room
        if self.current < self.max_threads:
            return self.max_threads
        return max(1, self.max_threads // 2)

    def _freed(self) -> bool:
        """Whether the machine has room for more threads than the current count, and for
        more than at the last look. A change, not a state: where steps are slow for what
        no process count shows (a hypervisor's other guests), looks that always find the
        machine idle must not bring on comparison after comparison."""
        assert self.current is not None and self._room is not None  # (set by _start)
        room = self._look()
        freed = room > self.current and room > self._room
        self._room = room
        return freed

    def _decide(self) -> None:
        # Means, not medians: what counts is the time all steps take. Two threads with a
        # busy core beside them run most steps fast and every third or so a scheduler
        # time slice late (tiny.en: 1.1-1.6 ms, then 5-10; one thread 1.6-2.1 ms each,
        # and now and then late too): means of a dozen steps or more, not of a few.
        mine = statistics.fmean(self._recent)
        other = statistics.fmean(self._timed())
        switched = other < mine * self.MARGIN
        if switched:
            logger.debug(
                "decoding steps: %d threads (%.2f ms) instead of %d (%.2f ms)",
                self._trying,
                other * 1e3,
                self.current,
                mine * 1e3,
            )
            self.current = self._trying
            self.switches += 1
            self._recent = self._timed()
            mine = other
        self._baseline = mine
        self._trying = None
        self._probe = []
        self.urgent = False
        self._every = self.PROBE_EVERY if switched else min(2 * self._every, self.MAX_EVERY)
        self._until_probe = self._every


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
