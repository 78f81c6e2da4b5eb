"""Decoding steps of one table of 8 rows against two tables of 4 on two threads.

    python benchmarks/two_tables.py tiny.en busy    # or idle; base

Times `decoder_step` and the output projection (`auto` weights, random keys and audio,
150 steps from position 40, median of 3) for 8 rows: one table on one torch thread, one
table on two OpenMP threads, and two tables of 4 rows, each stepped by a Python thread of
one torch thread that never waits for the other. `busy` runs a busy loop beside them (the
situation of issue 17's busy share). Prints milliseconds per step of 8 rows.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import threading
import time

import torch

import susurrus
from susurrus.engine.step import Run, decoder_step

STEPS = 150


def main() -> None:
    name, busy = sys.argv[1], sys.argv[2] == "busy"
    model = susurrus.load_model(name, device="cpu", compute_type="auto")
    decoder = model.decoder
    n_state = decoder.positional_embedding.shape[1]

    def table(rows: int) -> tuple:
        audio = decoder.new_cache(rows)
        decoder.fill_cross_cache(audio, torch.randn(rows, model.dims.n_audio_ctx, n_state))
        cache = decoder.new_cache(rows, n_ctx=224)
        for t in cache.self_k + cache.self_v:
            t.normal_()
        return rows, audio, cache

    def run(tab: tuple, threads: int) -> None:
        torch.set_num_threads(threads)  # this Python thread's count only
        rows, audio, cache = tab
        tokens = torch.randint(0, 50000, (rows, 1))
        runs = (Run(0, rows, 0, rows, 1),)
        at = torch.full((rows,), 40)
        with torch.inference_mode():
            for _ in range(STEPS):
                hidden = decoder_step(decoder, tokens, at, cache.self_k, cache.self_v,
                                      audio.cross_k, audio.cross_v, runs, None, hidden_only=True)
                decoder.logits(hidden)
                at = at + 1

    with torch.inference_mode():
        eight, four, other_four = table(8), table(4), table(4)
    run(eight, 2)
    run(four, 1)
    loop = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        time.sleep(0.3)
        found: dict[str, list[float]] = {}
        for _ in range(3):
            for mode in ("one table, 1 thread", "one table, 2 threads", "two tables"):
                start = time.perf_counter()
                if mode == "two tables":
                    workers = [threading.Thread(target=run, args=(t, 1))
                               for t in (four, other_four)]
                    for w in workers:
                        w.start()
                    for w in workers:
                        w.join()
                else:
                    run(eight, 1 if "1 thread" in mode else 2)
                found.setdefault(mode, []).append((time.perf_counter() - start) / STEPS * 1e3)
    finally:
        if loop is not None:
            loop.kill()
    medians = {mode: round(statistics.median(t), 2) for mode, t in found.items()}
    print(name, "beside a busy loop" if busy else "idle", medians, "ms per step of 8 rows")


if __name__ == "__main__":
    main()
