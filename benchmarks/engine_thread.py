"""Decoding step times of one engine shared by threads, with and without its worker thread.

Every thread that has run one of torch's parallel CPU kernels keeps an OpenMP team of its
own; with more OpenMP threads in the process than cores, every small kernel of a step
waits for a sleeping thread (see susurrus/engine/worker.py). Each case runs in a fresh
process and decodes the same two recordings on one engine, two side by side:

- `one-thread`: both in one `transcribe_many` call from the main thread (the CLI's way);
- `threads`: one `Engine.transcribe` call per thread, the model loaded in the main thread
  (the way the server and live streams ran before the worker);
- `threads-worker`: the same calls on an engine with a `Worker`, which also loaded the
  model: the process keeps one team.

    .venv/bin/python benchmarks/engine_thread.py [--model base] [--repeats 2]

Prints a table and writes benchmarks/results/engine-thread-<date>.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED = ROOT.parent / "shared" / "audio"
FILES = ["en_lj_LJ001-0001-0016_concat.flac", "jfk.flac"]
CASES = ("one-thread", "threads", "threads-worker")


def measure(case: str, model_name: str) -> dict:
    """One case in this process: step times (ms) and wall time."""
    import susurrus

    paths = [str(SHARED / f) for f in FILES]
    worker = susurrus.Worker() if case == "threads-worker" else None
    load = worker.call if worker is not None else (lambda f, *a, **k: f(*a, **k))
    model = load(susurrus.load_model, model_name)
    engine = susurrus.Engine(model, max_batch=2, worker=worker)
    times: list[float] = []
    step = engine.step

    def timed() -> bool:
        start = time.perf_counter()
        worked = step()
        if worked:
            times.append(time.perf_counter() - start)
        return worked

    engine.step = timed  # type: ignore[method-assign]
    options = {"language": "en", "temperature": 0.0}
    start = time.perf_counter()
    if case == "one-thread":
        texts = {p: r["text"] for p, r in
                 susurrus.transcribe_many(model, paths, batch_size=2, engine=engine, **options)}
    else:
        texts = {}

        def run(path: str) -> None:
            texts[path] = engine.transcribe(path, **options)["text"]

        threads = [threading.Thread(target=run, args=(p,)) for p in paths]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    wall = time.perf_counter() - start
    if worker is not None:
        worker.close()
    return {
        "case": case,
        "steps": len(times),
        "step_median_ms": 1e3 * statistics.median(times),
        "step_mean_ms": 1e3 * statistics.fmean(times),
        "mean_batch": engine.row_steps / max(1, engine.steps),
        "wall_s": wall,
        "texts": [texts[p] for p in paths],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="base")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # one, in-process
    args = parser.parse_args()
    if args.case:
        print(json.dumps(measure(args.case, args.model)))
        return
    runs = []
    for _ in range(args.repeats):
        for case in CASES:
            out = subprocess.run(
                [sys.executable, __file__, "--case", case, "--model", args.model],
                capture_output=True, text=True, check=True,
            )
            run = json.loads(out.stdout.strip().splitlines()[-1])
            runs.append(run)
            print(f"{case}: step median {run['step_median_ms']:.2f} ms, mean "
                  f"{run['step_mean_ms']:.2f} ms, {run['steps']} steps, wall "
                  f"{run['wall_s']:.1f} s", file=sys.stderr, flush=True)
    summary = {}
    for case in CASES:
        mine = [r for r in runs if r["case"] == case]
        summary[case] = {
            "step_median_ms": round(statistics.median(r["step_median_ms"] for r in mine), 2),
            "wall_s": round(statistics.median(r["wall_s"] for r in mine), 2),
            "same_texts_as_one_thread": all(
                r["texts"] == runs[CASES.index("one-thread")]["texts"] for r in mine),
        }
    result = {"date": str(date.today()), "model": args.model, "files": FILES,
              "summary": summary, "runs": runs}
    out = args.out or HERE / "results" / f"engine-thread-{date.today()}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print("| case | step median | wall |\n|---|---|---|")
    for case, s in summary.items():
        print(f"| {case} | {s['step_median_ms']:.2f} ms | {s['wall_s']:.1f} s |")
    print(out)


if __name__ == "__main__":
    main()
