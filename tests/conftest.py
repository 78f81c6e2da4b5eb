"""Shared fixtures: the shared speech set beside the checkout, and the embedded models."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
AUDIO = SHARED / "audio"
PARITY = SHARED / "reference" / "parity"

# A suite started in the background of a script (`pytest ... &`) has SIGINT ignored, and
# so would every CLI it starts (an ignored signal is inherited, and Python then installs no
# KeyboardInterrupt handler): the Ctrl-C tests would see their interrupt vanish. Ctrl-C
# as at a terminal, for this process and its children.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# The kernel choices (kernels.py) measured by the tests' own processes stay out of the
# user's cache: measured under the tests' load, they would be kept for real runs.
os.environ.setdefault(
    "SUSURRUS_KERNEL_CACHE", os.path.join(tempfile.mkdtemp(prefix="susurrus-tests-"), "k.json")
)

requires_shared = pytest.mark.skipif(not AUDIO.is_dir(), reason="../shared/audio is not present")


def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Whether `condition()` holds within `timeout` seconds, asked every 50 ms (for what a
    thread of the engine or the page does at its own pace)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@contextlib.contextmanager
def busy_loops(threads: int) -> Iterator[None]:
    """Enough busy-loop processes to take a core from `threads` threads of this process
    while the block runs (the test is skipped where /proc does not tell the load, or where
    that would take more than a few loops), stopped after."""
    from susurrus import kernels

    if kernels.others_running() is None:
        pytest.skip("this system's /proc does not tell how many threads run")
    count = len(os.sched_getaffinity(0)) - threads + 1
    if count > 4:
        pytest.skip("more cores than a few busy loops can take")
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        time.sleep(0.3)  # running before the block looks
        yield
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


def manifest() -> list[dict]:
    with open(AUDIO / "manifest.tsv", encoding="utf-8") as f:
        lines = [line for line in f if not line.startswith("#")]
    return list(csv.DictReader(lines, delimiter="\t", quoting=csv.QUOTE_NONE))


def parity(model: str, setting: str) -> list[dict]:
    with open(PARITY / f"{model}.{setting}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def tiny_en():
    from susurrus import load_model

    return load_model("tiny.en", device="cpu")


@pytest.fixture(scope="session")
def base():
    from susurrus import load_model

    return load_model("base", device="cpu")
