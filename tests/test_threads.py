"""The decoding steps' thread policy (engine/threads.py): its choices from step times,
and that it never leaves the caller's thread count changed."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from susurrus import kernels
from susurrus.engine import Engine
from susurrus.engine.threads import ThreadPolicy

from .conftest import AUDIO, busy_loops, requires_shared


@pytest.fixture
def idle_start(monkeypatch):
    """Recorded step times only: the policy starts as on an idle machine."""
    monkeypatch.setattr(kernels, "others_running", lambda: 0)


def _feed(policy: ThreadPolicy, seconds_for: dict[int, float], steps: int) -> list[int]:
    """Run `steps` steps whose duration depends on the thread count in use (as recorded
    on a 2-core machine); the counts used, step by step."""
    used = []
    for _ in range(steps):
        policy._start()
        count = policy._trying or policy.current
        used.append(count)
        policy._record(seconds_for[count])
    return used


def test_a_busy_machine_moves_steps_to_one_thread_and_back(monkeypatch):
    # Step times of base, auto, measured on a 2-core AMD EPYC: idle 2 threads 9 ms and
    # 1 thread 13 ms; with a busy loop on one core, 2 threads 60 ms and 1 thread 14 ms.
    others = {"running": 0}  # what procs_running shows of other processes
    monkeypatch.setattr(kernels, "others_running", lambda: others["running"])
    policy = ThreadPolicy(max_threads=2)
    idle = {2: 0.009, 1: 0.013}
    busy = {2: 0.060, 1: 0.014}
    used = _feed(policy, idle, 40)
    # Tried one thread, clearly slower: stopped after the steps that told (and the first,
    # which is not timed).
    assert policy.current == 2
    assert used.count(1) == 1 + ThreadPolicy.QUICK_STEPS
    others["running"] = 1
    used = _feed(policy, busy, 2 * ThreadPolicy.PROBE_EVERY)
    assert policy.current == 1
    # Switched at the first comparison: most steps of the busy period ran on one thread.
    assert used.count(1) > 1.5 * ThreadPolicy.PROBE_EVERY
    # A long busy period: comparisons with two threads (each lost after its first few
    # steps) come at 200, 400, 800, 1600, 1600... steps.
    used = _feed(policy, busy, 5000)
    assert policy.current == 1
    assert 1 + ThreadPolicy.QUICK_STEPS <= used.count(2) <= 5 * (1 + ThreadPolicy.QUICK_STEPS)
    assert not policy.urgent  # (the schedule's comparisons: the engine's lanes go on)
    # The other process ends: the next look at the machine brings the comparison forward
    # (urgent: the engine's second lane makes way for it).
    others["running"] = 0
    urgent = []
    for _ in range(ThreadPolicy.LOOK_EVERY + ThreadPolicy.PROBE_STEPS):
        _feed(policy, idle, 1)
        urgent.append(policy.urgent)
    assert any(urgent) and not urgent[-1]
    assert policy.current == 2  # back to both cores
    assert policy.switches == 2


def test_on_many_cores_a_busy_core_costs_one_thread_not_all_but_one(monkeypatch):
    # Eight cores, all eight threads in use. Step times modeled on the 2-core
    # measurements above, not recorded on such a machine (none was at hand): with a core
    # taken, every barrier waits for the thread that shares it (all eight: 8 ms); threads
    # that each have a core run as on an idle machine of that many cores; one thread is
    # one core's speed. Going to one thread would give up six free cores.
    others = {"running": 0}
    monkeypatch.setattr(kernels, "others_running", lambda: others["running"])
    policy = ThreadPolicy(max_threads=8, cpus=8)
    idle = {8: 0.0010, 6: 0.0013, 4: 0.0016, 1: 0.0060}
    one_busy = {8: 0.0080, 7: 0.0012, 1: 0.0062}
    two_busy = {8: 0.0090, 7: 0.0085, 6: 0.0013, 1: 0.0062}
    used = _feed(policy, idle, 40)
    # Slow steps no process explains would try half the threads: here clearly slower.
    assert policy.current == 8 and 4 in used
    others["running"] = 1
    used = _feed(policy, one_busy, 2 * ThreadPolicy.PROBE_EVERY)
    assert policy.current == 7 and 1 not in used
    assert used.count(7) > 1.5 * ThreadPolicy.PROBE_EVERY  # switched at once (slowdown)
    others["running"] = 2
    used = _feed(policy, two_busy, ThreadPolicy.PROBE_EVERY)
    assert policy.current == 6 and 1 not in used
    for _ in range(2 * ThreadPolicy.MAX_EVERY):  # until no comparison is near
        if policy._until_probe > 2 * ThreadPolicy.LOOK_EVERY:
            break
        _feed(policy, two_busy, 1)
    # Both end: the next look at the machine brings all eight back.
    others["running"] = 0
    used = _feed(policy, idle, ThreadPolicy.LOOK_EVERY + ThreadPolicy.PROBE_STEPS + 1)
    assert policy.current == 8 and used[-1] == 8
    assert policy.switches == 3


def test_a_policy_started_beside_busy_processes_leaves_them_their_cores(monkeypatch):
    monkeypatch.setattr(kernels, "others_running", lambda: 3)
    policy = ThreadPolicy(max_threads=8, cpus=8)
    with policy.apply():
        assert torch.get_num_threads() == 5  # the first window's encoding too
    # Where torch's threads leave cores free (16 CPUs, 8 threads), the first others take
    # those: all eight threads still have a core each.
    roomy = ThreadPolicy(max_threads=8, cpus=16)
    roomy._start()
    assert roomy.current == 8
    # The most room of its few looks: a shell command now and then shows in one.
    looks = iter([1, 0, 1])
    monkeypatch.setattr(kernels, "others_running", lambda: next(looks))
    glimpse = ThreadPolicy(max_threads=2, cpus=2)
    glimpse._start()
    assert glimpse.current == 2


def test_slow_steps_no_process_explains_are_not_compared_again_and_again(idle_start):
    # Two threads slower while the machine shows no other process (a hypervisor's other
    # guests): the looks never find a change, and comparisons back off as they keep
    # losing, so the policy stays on one thread at little cost.
    policy = ThreadPolicy(max_threads=2)
    used = _feed(policy, {2: 0.030, 1: 0.012}, 5000)
    assert policy.current == 1 and policy.switches == 1
    assert used.count(2) <= ThreadPolicy.FIRST_PROBE + 6 * (1 + ThreadPolicy.QUICK_STEPS)


def test_the_count_that_takes_less_time_in_all_wins_not_the_one_fast_most_often(idle_start):
    # tiny.en, auto, a busy loop on the other core (2-core AMD EPYC): two threads run most
    # steps in 1.1-1.6 ms and every third one a scheduler time slice late (5-10 ms); one
    # thread takes 2.1 ms every step. Medians would pick two threads; the time spent is
    # smaller on one.
    policy = ThreadPolicy(max_threads=2)
    pattern = {2: [0.0013, 0.0012, 0.0080], 1: [0.0021]}
    used = []
    for i in range(1000):
        policy._start()
        count = policy._trying or policy.current
        used.append(count)
        times = pattern[count]
        policy._record(times[i % len(times)])
    assert policy.current == 1 and policy.switches == 1
    assert used[-500:].count(2) <= 2 * (1 + ThreadPolicy.PROBE_STEPS)


def test_a_small_difference_does_not_switch(idle_start):
    policy = ThreadPolicy(max_threads=2)
    _feed(policy, {2: 0.010, 1: 0.0095}, 3 * ThreadPolicy.PROBE_EVERY)
    assert policy.current == 2 and policy.switches == 0


def test_a_comparison_waits_while_the_second_thread_encodes(monkeypatch):
    # On one thread beside a busy process the engine's second thread encodes windows
    # (engine/ahead.py); its work would slow the steps of two threads as well, so that
    # back on an idle machine two threads would lose comparison after comparison. Step
    # times of tiny.en, batch 8, 2-core AMD EPYC.
    others = {"running": 1}
    monkeypatch.setattr(kernels, "others_running", lambda: others["running"])
    encoding = {"now": True}
    policy = ThreadPolicy(max_threads=2)
    policy.quiet = lambda: not encoding["now"]
    busy, idle = {2: 0.060, 1: 0.011}, {2: 0.006, 1: 0.010}
    assert set(_feed(policy, busy, 100)) == {1}  # started on one; comparisons held
    assert policy.comparing  # due: the engine hands the second thread nothing more
    others["running"] = 0
    assert set(_feed(policy, idle, 300)) == {1}
    encoding["now"] = False  # its last window done
    used = _feed(policy, idle, 40)
    assert policy.current == 2 and used[-1] == 2 and not policy.comparing


def test_steps_slowed_by_the_second_thread_do_not_pass_for_another_process(monkeypatch):
    # Three running threads on two cores (ours two, the busy loop one) give each 2/3 of a
    # core: the engine's steps take half as long again while its second thread encodes,
    # which must not bring on a comparison as if another process had taken a core.
    monkeypatch.setattr(kernels, "others_running", lambda: 1)
    encoding = {"now": False}
    policy = ThreadPolicy(max_threads=2)
    policy.quiet = lambda: not encoding["now"]
    _feed(policy, {2: 0.060, 1: 0.011}, 100)  # one thread, kept after a comparison
    assert policy.current == 1 and not policy.comparing
    encoding["now"] = True
    used = _feed(policy, {2: 0.060, 1: 0.011 * 1.6}, 100)
    assert set(used) == {1} and not policy.comparing


def test_fixed_threads_are_never_measured(idle_start):
    policy = ThreadPolicy(fixed=1, max_threads=2)
    used = _feed(policy, {2: 0.001, 1: 1.0}, 50)
    assert set(used) == {1} and policy.switches == 0


def test_a_policy_started_beside_a_busy_process_starts_on_one_thread(monkeypatch):
    with busy_loops(2):
        policy = ThreadPolicy(max_threads=2)
        with policy.apply():
            assert torch.get_num_threads() == 1  # the first window's encoding too
        assert policy.current == 1
    # Where no other process runs (stated, not hoped for: the test machine may be busy).
    monkeypatch.setattr(kernels, "others_running", lambda: 0)
    idle = ThreadPolicy(max_threads=2)
    idle._start()
    assert idle.current == 2


@requires_shared
def test_steps_leave_the_callers_thread_count_alone(tiny_en):
    from susurrus import load_audio

    audio = load_audio(str(AUDIO / "jfk.flac"))
    counts = {}

    def run(name: str, engine_threads: int | str, own: int) -> None:
        torch.set_num_threads(own)  # OpenMP counts are per thread
        engine = Engine(tiny_en, max_batch=1, threads=engine_threads)
        result = engine.transcribe(audio, language="en")
        counts[name] = (torch.get_num_threads(), result["text"], engine.threads.current)

    for name, engine_threads, own in (("fixed", 1, 2), ("measured", "auto", 2)):
        t = threading.Thread(target=run, args=(name, engine_threads, own))
        t.start()
        t.join()
    fixed, measured = counts["fixed"], counts["measured"]
    assert fixed[0] == 2 and measured[0] == 2
    assert fixed[2] == 1 and measured[2] in (1, 2)
    assert "ask not what your country can do for you" in fixed[1]
    assert fixed[1] == measured[1]


@requires_shared
def test_the_thread_count_does_not_change_the_result(tiny_en):
    # The default policy moves steps between thread counts as the machine's load
    # changes, so a transcript must not depend on the count: every product splits its
    # outputs, never a sum, between threads (SDPA for one query does not, so steps never
    # take it: kernels.STEP_ATTENTION). Greedy and beam search, word timestamps (the
    # alignment's attention and its dynamic programming) included.
    from susurrus import load_audio

    audio = load_audio(str(AUDIO / "jfk.flac"))
    for beam_size in (None, 5):
        results = []
        for count in (1, 2, 3):  # (3: an uneven split, as on a core short of all)
            engine = Engine(tiny_en, max_batch=1, threads=count)
            results.append(
                engine.transcribe(
                    audio, language="en", beam_size=beam_size, word_timestamps=True
                )
            )
        assert "ask not what your country can do for you" in results[0]["text"]
        assert results[0]["segments"] == results[1]["segments"] == results[2]["segments"]


LONG = "en_lj_LJ001-0001-0016_concat.flac"  # 111 s of continuous reading: 4-5 windows


def _same_tokens(got: dict, want: dict) -> None:
    # The same tokens and times; a step's float32 sums over other rows of the batch may
    # round differently in a log-probability's last digits.
    assert got["text"] == want["text"]
    for a, b in zip(got["segments"], want["segments"], strict=True):
        assert (a["tokens"], a["start"], a["end"]) == (b["tokens"], b["start"], b["end"])
        assert a["avg_logprob"] == pytest.approx(b["avg_logprob"], abs=1e-4)


@requires_shared
def test_beside_a_busy_process_a_second_thread_encodes_the_windows_that_wait(tiny_en):
    # One thread decodes beside the other process; the windows a batch has no room for
    # yet, and those that fill it alongside the engine's own thread, are encoded on a
    # second one (engine/ahead.py). Which thread encodes a window changes nothing it says.
    if torch.get_num_threads() < 2:
        pytest.skip("one torch thread: the policy has nothing to choose")
    options = {"language": "en", "temperature": 0.0, "batch_size": 3}
    path = str(AUDIO / LONG)
    fixed = Engine(tiny_en, max_batch=3, threads=1)
    alone = fixed.transcribe(path, **options)
    # A count given by the caller is exactly the engine's threads: no second one.
    assert alone["segments"] and fixed.stats()["encoded_ahead"] == 0
    with busy_loops(2):
        engine = Engine(tiny_en, max_batch=3, lanes=False)  # (two lanes: the next test)
        busy = engine.transcribe(path, **options)
        # A recording decoded one window after another offers no window before the one
        # it needs now, which this thread encodes itself.
        sequential = Engine(tiny_en, max_batch=1)
        one_by_one = sequential.transcribe(path, language="en", temperature=0.0)
    # Started on one thread (the loop was running): the windows that filled the table
    # went to both. (Where the policy ends up is its own business: beside a busy loop two
    # threads' steps are bimodal, and a dozen of them may now and then win.)
    assert engine.stats()["encoded_ahead"] >= 1
    _same_tokens(busy, alone)
    assert "calligraphy to perfection" in busy["text"].lower()
    assert sequential.stats()["encoded_ahead"] == 0
    assert "calligraphy to perfection" in one_by_one["text"].lower()


@requires_shared
def test_beside_a_busy_process_a_batch_decodes_in_two_lanes(tiny_en):
    # One thread decodes beside the other process, and a second one steps a table of
    # its own (engine/lanes.py): half the batch each, never waiting for each other.
    # Which lane decodes a window changes none of its tokens.
    if torch.get_num_threads() < 2:
        pytest.skip("one torch thread: the policy has nothing to choose")
    options = {"language": "en", "temperature": 0.0, "batch_size": 4}
    path = str(AUDIO / LONG)
    alone = Engine(tiny_en, max_batch=4, threads=1).transcribe(path, **options)
    with busy_loops(2):
        engine = Engine(tiny_en, max_batch=4)
        busy = engine.transcribe(path, **options)
    stats = engine.stats()
    assert stats["lane_steps"] >= 1 and stats["steps"] > stats["lane_steps"]
    _same_tokens(busy, alone)
    # Idle, no second lane: one table on both threads is as fast (lanes.py).
    idle = Engine(tiny_en, max_batch=4, lanes=None)
    idle.threads.current = idle.threads.max_threads = 2
    assert not idle._lanes_wanted()
    idle.threads.current = 1
    assert idle._lanes_wanted()
    idle.threads._until_probe = 0  # a comparison due by the schedule: it waits
    assert idle._lanes_wanted()
    idle.threads.urgent = True  # one the machine brings: the second lane takes no more
    assert not idle._lanes_wanted()
    assert not Engine(tiny_en, max_batch=1, lanes=True)._lanes_wanted()


@requires_shared
def test_a_cancelled_recording_leaves_no_window_waiting_to_join(tiny_en, monkeypatch):
    # Beside a busy process a recording's windows are taken before the table has room
    # (and encoded meanwhile): once it is cancelled, none of them may start decoding.
    if torch.get_num_threads() < 2:
        pytest.skip("one torch thread: the policy has nothing to choose")
    from susurrus.engine import Cancelled

    engine = Engine(tiny_en, max_batch=2, lanes=False)
    started_for_gone = []
    start = Engine._start

    def watched_start(self, job, source, opening):
        started_for_gone.append(source not in self._sources)
        start(self, job, source, opening)

    monkeypatch.setattr(Engine, "_start", watched_start)
    cancel = threading.Event()
    outcome: dict = {}

    def cancelled_one() -> None:
        try:
            engine.transcribe(
                str(AUDIO / LONG), temperature=0.0, batch_size=2, cancel=cancel,
                on_segment=lambda s: cancel.set(),
            )
        except Cancelled as exc:
            outcome["cancelled"] = exc

    with busy_loops(2):
        thread = threading.Thread(target=cancelled_one)
        thread.start()
        time.sleep(0.2)  # its windows are taken first
        other = engine.transcribe(str(AUDIO / "jfk.flac"), temperature=0.0)
        thread.join(timeout=300)
    assert isinstance(outcome.get("cancelled"), Cancelled)
    assert "ask what you can do for your country" in other["text"]
    assert engine.stats()["encoded_ahead"] >= 1
    assert len(started_for_gone) >= 3 and not any(started_for_gone)
    assert not engine._windows
