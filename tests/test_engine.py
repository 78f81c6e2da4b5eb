"""One engine, many recordings: sessions side by side, threads, options, resume."""

from __future__ import annotations

import gc
import json
import pickle
import signal
import subprocess
import sys
import threading
import time
import weakref

import jiwer
import pytest
from whisper_normalizer.english import EnglishTextNormalizer

import susurrus
from susurrus.engine import Cancelled, Engine
from susurrus.options import TranscribeOptions

from .conftest import AUDIO, eventually, manifest, parity, requires_shared

pytestmark = requires_shared

LONG = "en_lj_LJ001-0001-0016_concat.flac"  # 111 s of continuous reading: 4-5 windows
SHORT = [r["file"] for r in manifest() if r["category"] == "short" and r["language"] == "en"]


def tokens_of(result: dict) -> list[int]:
    return [t for s in result["segments"] for t in s["tokens"]]


def test_options_are_one_frozen_checked_value():
    options = TranscribeOptions.create(temperature=0.0, beam_size=5, language="English")
    assert options.temperatures == (0.0,) and options.language == "en"
    with pytest.raises(AttributeError):
        options.beam_size = 1  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(options)) == options
    assert options.fingerprint() == TranscribeOptions.create(
        temperature=[0], beam_size=5, language="en"
    ).fingerprint()
    assert options.fingerprint() != TranscribeOptions.create(beam_size=4).fingerprint()
    with pytest.raises(ValueError, match="unknown transcription option"):
        TranscribeOptions.create(beam_sise=5)
    with pytest.raises(ValueError, match="patience requires beam_size"):
        TranscribeOptions.create(patience=2.0)
    with pytest.raises(ValueError, match="length_penalty"):
        TranscribeOptions.create(length_penalty=3.0)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        TranscribeOptions.create(batch_size=0)


# The long one first, so that the short one arrives while it decodes.
TWO = [str(AUDIO / LONG), str(AUDIO / "jfk.flac")]


@pytest.fixture(scope="module")
def two_alone(tiny_en) -> list[dict]:
    return [tiny_en.transcribe(f, temperature=0.0) for f in TWO]


@pytest.mark.parametrize("worker", [False, True], ids=["callers-step", "worker"])
def test_two_threads_on_one_engine_get_what_each_gets_alone(tiny_en, two_alone, worker):
    # (One table: beside another process, two lanes would each take one recording.)
    engine = Engine(tiny_en, max_batch=4, worker=worker, lanes=False)
    together: list[dict | None] = [None, None]
    deliverers: set[int] = set()
    callers: set[int] = set()

    def work(i: int) -> None:
        callers.add(threading.get_ident())
        together[i] = engine.transcribe(
            TWO[i], temperature=0.0, on_segment=lambda s: deliverers.add(threading.get_ident())
        )

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert [r["text"] for r in together] == [r["text"] for r in two_alone]
    assert [tokens_of(r) for r in together] == [tokens_of(r) for r in two_alone]
    # The two recordings really shared steps: fewer steps than rows advanced.
    assert engine.row_steps > engine.steps
    if worker:
        # Every result came back on the worker's thread: it alone decoded.
        assert deliverers == {engine.worker.ident} and not deliverers & callers
        assert engine.stats()["sources"] == 0


def test_a_worker_prepares_the_sessions_of_items_that_trickle_in(tiny_en, tmp_path):
    """transcribe_many on an engine with a worker: the items come slowly from a generator
    (as the batch runner's pipe), each is read on a thread that steps the engine (the
    worker's; or, where a busy machine has the thread policy run one torch thread, the
    engine's second lane, which makes the sessions it takes windows from), never on the
    caller's or the items' thread, and a bad one is reported without losing the others."""
    bad = tmp_path / "notes.wav"
    bad.write_text("not audio at all")
    files = [str(AUDIO / "jfk.flac"), str(bad), str(AUDIO / SHORT[0])]
    engine = Engine(tiny_en, max_batch=2, worker=True)
    readers: set[tuple[int, str]] = set()

    def read(item: str) -> str:
        readers.add((threading.get_ident(), threading.current_thread().name))
        return item

    def slowly():
        for f in files:
            time.sleep(0.3)
            yield f

    got = dict(susurrus.transcribe_many(
        tiny_en, slowly(), batch_size=2, engine=engine, read=read, temperature=0.0
    ))
    assert (engine.worker.ident, engine.worker.name) in readers
    assert {name for _, name in readers} <= {engine.worker.name, "susurrus-lane"}, readers
    assert threading.get_ident() not in {ident for ident, _ in readers}
    assert isinstance(got[str(bad)], susurrus.SusurrusError)
    assert "ask what you can do for your country" in got[files[0]]["text"]
    assert got[files[2]]["text"].strip()


def test_files_side_by_side_match_the_reference_token_for_token(tiny_en):
    """All English parity files in one call, 4 side by side, each with its own prompt and
    words: the reference's tokens (greedy, float32), as one file at a time gives them."""
    refs = parity("tiny.en", "greedy")
    files = [str(AUDIO / r["file"]) for r in refs]
    # One table, so that its step counts are all the steps (a busy machine's second lane
    # would step half the windows in a table of its own).
    engine = Engine(tiny_en, max_batch=4, lanes=False)
    got = dict(
        susurrus.transcribe_many(
            tiny_en,
            files,
            batch_size=4,
            engine=engine,
            language="en",
            temperature=0.0,
            word_timestamps=True,
        )
    )
    assert sorted(got) == sorted(files)
    same = [r["file"] for r, f in zip(refs, files) if tokens_of(got[f]) == tokens_of(r["result"])]
    assert len(same) >= 0.9 * len(files), sorted({r["file"] for r in refs} - set(same))
    truth = {r["file"]: r["transcript"] for r in manifest()}
    norm = EnglishTextNormalizer()
    expected = [norm(truth[r["file"]]) for r in refs]
    wer_many = jiwer.wer(expected, [norm(got[f]["text"]) for f in files])
    wer_reference = jiwer.wer(expected, [norm(r["result"]["text"]) for r in refs])
    assert wer_many <= wer_reference + 1e-9
    assert all(s["words"] for f in files for s in got[f]["segments"] if s["text"])
    # Windows of several files shared steps: fewer steps than rows advanced, by a fifth.
    assert engine.steps < 0.8 * engine.row_steps


def test_one_bad_input_does_not_lose_the_others(tiny_en, tmp_path):
    bad = tmp_path / "notes.wav"
    bad.write_text("not audio at all")
    files = [str(AUDIO / "jfk.flac"), str(bad), str(AUDIO / SHORT[0])]
    got = dict(susurrus.transcribe_many(tiny_en, files, batch_size=2, temperature=0.0))
    assert isinstance(got[str(bad)], susurrus.SusurrusError)
    assert "ask what you can do for your country" in got[files[0]]["text"]
    assert got[files[2]]["text"].strip()


def test_a_window_that_cannot_be_decoded_fails_its_recording_alone(tiny_en, two_alone):
    """A token id outside the vocabulary shows when the window joins the table: that
    recording fails with a clear error, and the one decoding beside it (a server's other
    client) goes on to its own text. Each step used to fail every recording in the table."""
    engine = Engine(tiny_en, max_batch=4, worker=True)
    decoding = threading.Event()
    long: list[dict] = []
    thread = threading.Thread(target=lambda: long.append(engine.transcribe(
        TWO[0], temperature=0.0, on_segment=lambda s: decoding.set()
    )))
    thread.start()
    assert decoding.wait(120)  # its first window is done, the others to come
    with pytest.raises(ValueError, match="999999 is not a token of this model"):
        engine.transcribe(TWO[1], temperature=0.0, suppress_tokens="-1,999999")
    thread.join(300)
    assert tokens_of(long[0]) == tokens_of(two_alone[0])
    # Of several recordings on one source, only the bad one's result is the error.
    files = [TWO[1], str(AUDIO / "en_lj_LJ001-0008.flac")]
    got = dict(susurrus.transcribe_many(
        tiny_en, files, batch_size=2, temperature=0.0,
        options_of=lambda f: TranscribeOptions.create(
            temperature=0.0, suppress_tokens="999999" if f == files[1] else "-1"
        ),
    ))
    assert isinstance(got[files[1]], ValueError)
    assert tokens_of(got[files[0]]) == tokens_of(two_alone[1])


@pytest.mark.parametrize("option,value,message", [
    ("beam_size", 0, "beam_size must be a whole number of at least 1"),
    ("best_of", -1, "best_of must be a whole number"),
    ("temperature", -1.0, "temperature must be 0 or more"),
    ("suppress_tokens", "abc", "suppress_tokens must be token ids"),
    ("suppress_tokens", "-2", "token ids are 0 or more"),
])
def test_options_out_of_range_are_refused_when_made(option, value, message):
    with pytest.raises(ValueError, match=message):
        TranscribeOptions.create(**{option: value})


def test_items_that_fail_to_come_are_the_callers_and_a_break_ends_the_reading(tiny_en):
    """transcribe_many over a generator that raises after its first item gives that item's
    result, then raises (the error was printed by the reading thread and lost); breaking
    off after the first result ends the reading thread and lets the engine go (it waited
    forever on a full queue, holding both)."""
    jfk = str(AUDIO / "jfk.flac")

    def items():
        yield jfk
        raise OSError("listing the input folder failed")

    got = []
    with pytest.raises(OSError, match="listing the input folder failed"):
        for item, result in susurrus.transcribe_many(tiny_en, items(), batch_size=2):
            got.append((item, result["text"]))
    assert len(got) == 1 and "ask what you can do for your country" in got[0][1]

    engines = []
    for _ in range(3):
        engine = Engine(tiny_en, max_batch=2)
        engines.append(weakref.ref(engine))
        for _ in susurrus.transcribe_many(tiny_en, [jfk] * 8, batch_size=2, engine=engine):
            break
        del engine
    assert eventually(lambda: not [t for t in threading.enumerate()
                                   if t.name == "susurrus-items"])

    # (A second lane's thread lets go of its twin's cancelled windows at its next step.)
    def collected() -> bool:
        gc.collect()
        return [e() for e in engines] == [None, None, None]

    assert eventually(collected)


def test_a_callback_that_exits_fails_its_call_and_the_worker_goes_on(tiny_en, two_alone):
    """sys.exit() in an `on_segment` callback run on an engine's worker: that call raises
    SystemExit in its own thread, and the worker lives on for the next call (it ended, and
    every later call on the engine waited forever)."""
    engine = Engine(tiny_en, max_batch=2, worker=True)

    def leave(segment: dict) -> None:
        raise SystemExit("exit from on_segment")

    with pytest.raises(SystemExit, match="exit from on_segment"):
        engine.transcribe(TWO[1], temperature=0.0, on_segment=leave)
    assert engine.worker._thread.is_alive()
    again = engine.transcribe(TWO[1], temperature=0.0)
    assert tokens_of(again) == tokens_of(two_alone[1])


def test_items_that_come_slowly_do_not_hold_up_another_threads_recording(tiny_en, two_alone):
    """One engine without a worker: a thread's transcribe_many waits for its next item (a
    generator fed as work arrives) while it drives the engine; another thread's recording
    joins meanwhile and is decoded then, not after that item (which here comes only once
    the other recording is done: it used to wait for ever)."""
    engine = Engine(tiny_en, max_batch=2)
    other_done = threading.Event()

    def items():
        yield str(AUDIO / "en_lj_LJ001-0008.flac")
        other_done.wait(120)
        yield str(AUDIO / "en_lj_LJ001-0002.flac")

    many: list = []
    first = threading.Thread(target=lambda: many.extend(susurrus.transcribe_many(
        tiny_en, items(), batch_size=2, engine=engine, temperature=0.0)))
    first.start()
    while not many and first.is_alive():
        time.sleep(0.05)  # its first result: it now waits for the generator
    other: list[dict] = []
    second = threading.Thread(target=lambda: other.append(
        engine.transcribe(TWO[1], temperature=0.0)))
    second.start()
    second.join(60)
    done_first = bool(other)
    other_done.set()
    first.join(120)
    assert done_first and tokens_of(other[0]) == tokens_of(two_alone[1])
    assert len(many) == 2 and all(isinstance(r, dict) for _, r in many)


def test_segments_stream_out_in_order_as_they_become_final(tiny_en):
    for batch_size in (None, 4):
        streamed: list[dict] = []
        result = tiny_en.transcribe(
            str(AUDIO / LONG), temperature=0.0, batch_size=batch_size, on_segment=streamed.append
        )
        assert streamed == result["segments"] and len(streamed) > 5
        starts = [s["start"] for s in streamed]
        assert starts == sorted(starts)


@pytest.mark.parametrize("worker", [False, True], ids=["callers-step", "worker"])
def test_two_lanes_decode_files_side_by_side_as_one_table_does(tiny_en, worker):
    """Half the windows in a second table stepped by a thread of its own (lanes.py, as
    beside a busy process): every file's tokens as one table gives them, a cancelled
    recording leaves neither lane, and the lane's thread ends with the engine."""
    files = [str(AUDIO / f) for f in (LONG, "jfk.flac", *SHORT[:3])]
    options = dict(batch_size=4, language="en", temperature=0.0)
    one = dict(susurrus.transcribe_many(tiny_en, files, engine=Engine(tiny_en, max_batch=4),
                                        **options))
    engine = Engine(tiny_en, max_batch=4, worker=worker, lanes=True)
    two = dict(susurrus.transcribe_many(tiny_en, files, engine=engine, **options))
    assert [tokens_of(two[f]) for f in files] == [tokens_of(one[f]) for f in files]
    stats = engine.stats()
    assert stats["lane_steps"] >= 10 and stats["steps"] - stats["lane_steps"] >= 10
    assert stats["windows"] == stats["sources"] == 0
    cancel = threading.Event()
    with pytest.raises(Cancelled):
        engine.transcribe(str(AUDIO / LONG), cancel=cancel, on_segment=lambda s: cancel.set(),
                          **options)
    assert "ask what you can do for your country" in engine.transcribe(
        str(AUDIO / "jfk.flac"), **options)["text"]
    # The cancelled recording's windows leave at each lane's next step (the second
    # lane's thread takes it on its own).
    assert eventually(lambda e=engine: e.stats()["windows"] == 0, timeout=5)
    thread, ref = engine._lanes._thread, weakref.ref(engine)
    del engine
    assert _ends_once_dropped(ref, thread)


@pytest.mark.parametrize("worker", [False, True], ids=["callers-step", "worker"])
def test_a_failed_step_of_the_second_lane_fails_its_recording_and_the_engine_goes_on(
    tiny_en, monkeypatch, worker
):
    """The second lane's table fails while its windows are on their way in (encoding
    runs out of memory, say): their recording fails with that error instead of waiting
    for ever, and the engine then decodes the next recording in both lanes."""
    real_encode = Engine._encode
    failed: list[int] = []

    def encode(self, entries):
        if self._may_take is not None and not failed:  # the twin's, once
            failed.append(len(entries))
            raise RuntimeError("out of memory (injected)")
        return real_encode(self, entries)

    monkeypatch.setattr(Engine, "_encode", encode)
    engine = Engine(tiny_en, max_batch=4, worker=worker, lanes=True)
    outcome: dict = {}

    def first() -> None:
        try:
            engine.transcribe(str(AUDIO / LONG), batch_size=4, temperature=0.0)
        except RuntimeError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=first, daemon=True)
    thread.start()
    thread.join(120)
    assert failed and "out of memory (injected)" in str(outcome.get("error")), outcome
    steps = engine.stats()["lane_steps"]
    text = engine.transcribe(str(AUDIO / LONG), batch_size=4, temperature=0.0)["text"]
    assert "printing" in text.lower() and engine.stats()["lane_steps"] > steps + 10


EXIT_WHILE_DECODING = """
import sys, threading, time, susurrus
from susurrus.engine import Engine
model = susurrus.load_model("tiny.en", device="cpu")
engine = Engine(model, max_batch=4, worker=susurrus.Worker(), lanes=True)  # never closed

def run():
    try:
        engine.transcribe(sys.argv[1], batch_size=4, temperature=0.0)
    except RuntimeError as exc:  # the worker closes as the program ends
        print(exc, flush=True)

threading.Thread(target=run, daemon=True).start()
deadline = time.monotonic() + 120
while engine.stats()["lane_steps"] < 5 and time.monotonic() < deadline:
    time.sleep(0.01)
print("lane steps", engine.stats()["lane_steps"], flush=True)
"""


def test_a_program_that_ends_while_both_lanes_decode_exits_cleanly():
    """The program ends while a worker it never closed and the second lane are in their
    steps: both threads stop at their step's end, no abort ("terminate called without
    an active exception", as a CI run of a batched transcription once did when its
    second lane's last step outlived the program)."""
    for _ in range(2):
        run = subprocess.run(
            [sys.executable, "-c", EXIT_WHILE_DECODING, str(AUDIO / LONG)],
            capture_output=True, text=True, timeout=300,
        )
        assert run.returncode == 0 and "terminate" not in run.stderr, run.stderr[-2000:]
        assert "lane steps" in run.stdout


def test_a_batch_takes_the_room_it_needs_and_gives_it_back(tiny_en):
    """The 111 s recording, cut into its windows, 3 side by side: the row table holds room
    for 3 windows of 2 beams (doubling from one window's room, it held 4 and 8 rows), a
    step with nothing to decode gives the buffers back, and the engine then decodes the
    same tokens again in new ones."""
    options = dict(temperature=0.0, batch_size=3, beam_size=2, language="en")
    # One table: on a busy machine a second lane would take one window's room from it.
    engine = Engine(tiny_en, max_batch=3, lanes=False)
    first = engine.transcribe(str(AUDIO / LONG), **options)
    table = engine._table
    assert (table.audio_capacity, table.row_capacity) == (3, 6)
    assert [b.shape[0] for b in (table.cross_k[0], table.self_k[0])] == [3, 6]
    assert engine.step() is False
    assert (table.row_capacity, table.audio_capacity, table.self_k, table.cross_k) == (
        0, 0, [], []
    )
    again = engine.transcribe(str(AUDIO / LONG), **options)
    assert tokens_of(again) == tokens_of(first) and len(first["segments"]) > 5


def test_closing_a_worker_fails_its_waiting_callers_instead_of_hanging(tiny_en):
    worker = susurrus.Worker()
    engine = Engine(tiny_en, max_batch=2, worker=worker)
    # Closed from its own thread (a segment callback) halfway through a recording.
    with pytest.raises(RuntimeError, match="worker is closed"):
        engine.transcribe(str(AUDIO / LONG), temperature=0.0, on_segment=lambda s: worker.close())
    with pytest.raises(RuntimeError, match="worker is closed"):
        engine.transcribe(str(AUDIO / "jfk.flac"))
    assert engine.stats()["sources"] == 0


def test_an_engine_with_a_worker_of_its_own_ends_its_thread_once_dropped(tiny_en):
    engine = Engine(tiny_en, max_batch=1, worker=True)
    text = engine.transcribe(str(AUDIO / "jfk.flac"), temperature=0.0)["text"]
    assert "ask not what your country can do for you" in text
    thread, ref = engine.worker._thread, weakref.ref(engine)
    del engine
    assert _ends_once_dropped(ref, thread)


def _ends_once_dropped(ref: weakref.ref, thread: threading.Thread) -> bool:
    """Whether the engine behind `ref` is collected and `thread` ends within 5 s."""

    def ended() -> bool:
        gc.collect()
        return ref() is None and not thread.is_alive()

    return eventually(ended, timeout=5)


@pytest.mark.parametrize("worker", [False, True], ids=["callers-step", "worker"])
def test_cancel_stops_one_session_and_not_the_other(tiny_en, worker):
    engine = Engine(tiny_en, max_batch=4, worker=worker)
    cancel = threading.Event()
    outcome: dict = {}

    def cancelled_one() -> None:
        try:
            engine.transcribe(
                str(AUDIO / LONG), temperature=0.0, cancel=cancel,
                on_segment=lambda s: cancel.set(),
            )
        except Cancelled as exc:
            outcome["cancelled"] = exc

    thread = threading.Thread(target=cancelled_one)
    thread.start()
    other = engine.transcribe(str(AUDIO / "jfk.flac"), temperature=0.0)
    thread.join(timeout=300)
    assert isinstance(outcome.get("cancelled"), Cancelled)
    assert "ask what you can do for your country" in other["text"]
    # Nothing of the cancelled recording stays in the tables (a window the worker took
    # before the cancel was seen leaves at its next step).
    assert eventually(lambda: engine.stats()["windows"] == 0)


def test_batched_windows_take_every_sequential_option(tiny_en):
    """hallucination_silence_threshold and condition_on_previous_text apply with
    batch_size (no warning, no option dropped)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = tiny_en.transcribe(
            str(AUDIO / LONG),
            temperature=0.0,
            batch_size=4,
            word_timestamps=True,
            hallucination_silence_threshold=2.0,
            condition_on_previous_text=False,
            initial_prompt="Printing.",
        )
    assert "printing" in result["text"].lower() and len(result["segments"]) > 5


def test_cut_plan_session_resumes_to_the_same_segments(tiny_en, tmp_path):
    audio = str(AUDIO / LONG)
    whole = tiny_en.transcribe(audio, temperature=0.0, batch_size=2, word_timestamps=True)
    state = tmp_path / "long.resume.json"
    engine = Engine(tiny_en, max_batch=2)
    cancel = threading.Event()
    with pytest.raises(Cancelled):
        engine.transcribe(
            audio,
            temperature=0.0,
            batch_size=2,
            word_timestamps=True,
            resume=state,
            cancel=cancel,
            on_segment=lambda segment: cancel.set(),
        )
    saved = json.loads(state.read_text())["session"]
    assert not saved["complete"] and saved["done_frames"] > 0  # part of it, saved
    resumed = tiny_en.transcribe(
        audio, temperature=0.0, batch_size=2, word_timestamps=True, resume=state
    )
    assert tokens_of(resumed) == tokens_of(whole)
    # Text, times and words as uninterrupted; windows side by side with other neighbours
    # sum their log-probabilities in another order (the last bits of avg_logprob).
    keys = ("id", "seek", "start", "end", "text", "tokens", "words", "suspect")
    assert [[s[k] for k in keys] for s in resumed["segments"]] == [
        [s[k] for k in keys] for s in whole["segments"]
    ]
    for a, b in zip(resumed["segments"], whole["segments"]):
        assert a["avg_logprob"] == pytest.approx(b["avg_logprob"], abs=1e-5)
    assert json.loads(state.read_text())["session"]["complete"]


def run_cli(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "susurrus", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


CLI = ["--model", "tiny.en", "--beam_size", "None", "--verbose", "False", "-f", "all"]


def outputs(directory) -> dict[str, str]:
    return {
        p.name: p.read_text()
        for p in sorted(directory.iterdir())
        if not p.name.endswith(".resume.json") and not p.name.startswith(".")
    }


def test_several_files_with_batch_size_get_what_each_gets_alone(tmp_path):
    """`susurrus A B C --batch_size 3`: the windows of all three share steps, and each
    file's outputs are those of `susurrus FILE` (the long one one window after another,
    with its previous text as prompt)."""
    other = next(f for f in SHORT if f != "jfk.flac")
    files = [str(AUDIO / LONG), str(AUDIO / "jfk.flac"), str(AUDIO / other)]
    together = tmp_path / "together"
    proc = run_cli(*files, *CLI, "--batch_size", "3", "-o", str(together))
    assert proc.wait(timeout=600) == 0, proc.stderr.read()
    alone: dict[str, str] = {}
    for i, path in enumerate(files):
        out = tmp_path / f"alone{i}"
        proc = run_cli(path, *CLI, "-o", str(out))
        assert proc.wait(timeout=600) == 0, proc.stderr.read()
        alone.update(outputs(out))
    got = outputs(together)
    assert len(alone) == 5 * len(files) and set(got) == set(alone)
    for name, text in alone.items():
        if not name.endswith(".json"):
            assert got[name] == text, name  # txt, srt, vtt, tsv: identical
            continue
        # The same tokens; the float32 sums of a step over several rows may round
        # differently in the last digits of a log-probability.
        mine, theirs = json.loads(got[name]), json.loads(text)
        assert mine["text"] == theirs["text"]
        for a, b in zip(mine["segments"], theirs["segments"], strict=True):
            assert a["tokens"] == b["tokens"]
            assert (a["start"], a["end"]) == (b["start"], b["end"])
            assert a["avg_logprob"] == pytest.approx(b["avg_logprob"], abs=1e-4)
    text = alone[LONG.rsplit(".", 1)[0] + ".txt"].lower()
    assert "differs from most if not" in text and "calligraphy to perfection" in text


def test_kill_9_then_resume_gives_the_uninterrupted_outputs(tmp_path):
    audio = str(AUDIO / LONG)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    proc = run_cli(audio, *CLI, "-o", str(whole))
    assert proc.wait(timeout=600) == 0, proc.stderr.read()
    state = resumed / (LONG.rsplit(".", 1)[0] + ".resume.json")
    proc = run_cli(audio, *CLI, "-o", str(resumed), "--resume")
    deadline = time.monotonic() + 300
    # Killed once at least one window is saved (and before the end).
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            saved = json.loads(state.read_text())
        except (OSError, ValueError):
            saved = None
        if saved and saved["session"]["segments"]:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    saved = json.loads(state.read_text())
    assert not saved["session"]["complete"]
    assert not (resumed / "en_lj_LJ001-0001-0016_concat.json").exists()
    proc = run_cli(audio, *CLI, "-o", str(resumed), "--resume")
    assert proc.wait(timeout=600) == 0, proc.stderr.read()
    assert outputs(resumed) == outputs(whole)
    # Finished: a rerun skips the file.
    proc = run_cli(audio, *CLI, "-o", str(resumed), "--resume")
    assert proc.wait(timeout=600) == 0
    assert "already transcribed" in proc.stderr.read()
    # A state made with other options is refused with one line.
    proc = run_cli(audio, *CLI, "-o", str(resumed), "--resume", "--temperature", "0.2")
    assert proc.wait(timeout=600) != 0
    err = proc.stderr.read().strip()
    assert "belongs to other options" in err and len(err.splitlines()) == 1
    assert "Traceback" not in err


def test_ctrl_c_saves_and_says_how_to_resume(tmp_path):
    proc = run_cli(str(AUDIO / LONG), *CLI, "-o", str(tmp_path), "--resume")
    state = tmp_path / (LONG.rsplit(".", 1)[0] + ".resume.json")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not state.exists() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    status = proc.wait(timeout=120)
    err = proc.stderr.read()
    assert status == 130, err
    assert "run the same command again to continue" in err and "Traceback" not in err
    assert json.loads(state.read_text())["session"]["segments"]


def test_beams_keep_their_rows_and_only_a_twice_continued_beam_is_copied():
    """The rows for a window's new beams, from the row each continues: a reordering moves
    nothing; a row continued twice is copied once, into the row nobody continued."""
    from susurrus.engine.engine import _place

    assert _place([0, 1, 2, 3, 4], 5) == [0, 1, 2, 3, 4]
    assert _place([3, 0, 4, 1, 2], 5) == [3, 0, 4, 1, 2]  # reordered: no copy
    # Beams 0 and 2 continue row 1; rows 3 and 4 are continued by nobody.
    assert _place([1, 0, 1, 2, 1], 5) == [1, 0, 3, 2, 4]
    assert _place([2, 2, 2], 3) == [2, 0, 1]
