"""How much of its idle speed any program can keep when another process takes a core.

    python benchmarks/busy_ceiling.py [--runs 3] [--seconds 2] [--out FILE.json]

run.py's busy target compares a system's speed with one core taken by a busy loop to its own
idle speed. What the machine gives back bounds that share for every program, whatever it
does: this measures the bound with work that needs no coordination at all (the same matrix
product, an encoder block's size, repeated), in three ways, idle and beside one busy loop
(`python -c "while True: pass"`, as run.py's `--busy 1` starts it):

- `one thread`: the work on one thread;
- `two threads`: the work halved between two Python threads of one OpenMP thread each,
  never waiting for each other (the most any split of one recording's work could get);
- `OpenMP 2`: each product split by OpenMP over two threads (a barrier per product, as
  the model's layers run).

A program that runs twice as fast on two idle cores as on one keeps at most
`two threads busy / two threads idle` of its idle speed under the busy loop; one whose
pieces must wait for each other (every decoding step, every encoder layer) keeps about
`one thread busy / best idle` when it falls back to one thread.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROWS, IN, OUT = 1500, 384, 1536  # tiny.en's encoder MLP input product


def _work(count: int, x: torch.Tensor, w: torch.Tensor, threads: int) -> None:
    torch.set_num_threads(threads)  # OpenMP counts belong to the calling thread
    for _ in range(count):
        torch.nn.functional.linear(x, w)


def timed(mode: str, count: int) -> float:
    """Seconds to run `count` products the way `mode` says."""
    x, w = torch.randn(ROWS, IN), torch.randn(OUT, IN)
    _work(2, x, w, 1)  # first-call set-up out of the timing
    start = time.perf_counter()
    if mode == "one thread":
        _work(count, x, w, 1)
    elif mode == "two threads":
        halves = [threading.Thread(target=_work, args=(count // 2, x, w, 1)) for _ in range(2)]
        for t in halves:
            t.start()
        for t in halves:
            t.join()
    else:
        _work(count, x, w, 2)
    return time.perf_counter() - start


def busy_loop() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="one thread's time, idle")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    # The number of products one thread runs in about --seconds on this machine.
    probe = timed("one thread", 20)
    count = max(20, int(args.seconds / (probe / 20)) // 2 * 2)
    modes = ["one thread", "two threads", "OpenMP 2"]
    times: dict[str, list[float]] = {f"{m}, {s}": [] for s in ("idle", "busy") for m in modes}
    for run in range(args.runs):
        # Idle and busy take turns, so a slow spell of a shared machine hits both.
        for state in ("idle", "busy"):
            loop = busy_loop() if state == "busy" else None
            try:
                if loop:
                    time.sleep(0.5)  # let it settle on a core
                for mode in modes:
                    times[f"{mode}, {state}"].append(timed(mode, count))
            finally:
                if loop:
                    loop.kill()
                    loop.wait()
        print(
            f"run {run + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()),
            flush=True,
        )
    med = {k: statistics.median(v) for k, v in times.items()}
    best_idle = min(med[f"{m}, idle"] for m in modes)
    shares = {k: best_idle / v for k, v in med.items() if k.endswith("busy")}
    two_idle = med["two threads, idle"]
    summary = {
        "cores used, two threads busy": med["one thread, idle"] / med["two threads, busy"],
        "ceiling, work that never waits": two_idle / med["two threads, busy"],
        "one thread busy / best idle": best_idle / med["one thread, busy"],
        "OpenMP 2 busy / best idle": best_idle / med["OpenMP 2, busy"],
    }
    for k, v in med.items():
        print(f"{k:>22}: {v:.3f} s")
    for k, v in summary.items():
        print(f"{k}: {v:.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                {
                    "date": datetime.datetime.now().isoformat(timespec="seconds"),
                    "cpu": platform.processor() or platform.machine(),
                    "cpus": len(os.sched_getaffinity(0))
                    if hasattr(os, "sched_getaffinity")
                    else None,
                    "torch": torch.__version__,
                    "shape": [ROWS, IN, OUT],
                    "products": count,
                    "seconds": times,
                    "medians": med,
                    "busy_share_of_best_idle": shares,
                    "summary": summary,
                },
                indent=1,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
