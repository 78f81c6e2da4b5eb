"""Peak memory (RSS) of one transcription, each configuration in a fresh process.

    python benchmarks/memory.py [--models base] [--compute-types auto default]
        [--batch-sizes 8 none] [--settings greedy beam5] [--input benchmarks/data/en-long.wav:en]
        [--runs N] [--source NAME=DIR ...] [--out benchmarks/results/batch-memory-DATE.json]

Each configuration runs `susurrus.transcribe` with the options benchmarks/worker.py gives
every system (temperature fallback, best_of 5, conditioned on the previous text), after an
8 s warm-up, as run.py does. The peak is the process's ru_maxrss (the most resident memory
it ever held, model included); `rss_after_load_mb` is the same figure right after loading,
so their difference is what transcribing adds. The kernel measurement (kernels.py) of a
model's first load costs memory of its own once per machine: run once beforehand (or set
SUSURRUS_KERNEL_CACHE to a cache that exists) so that it is not counted.

Memory does not depend on how busy the CPU is, but `wall_s` does: compare speeds only from
runs on an otherwise idle machine.

`--source NAME=DIR` (repeatable) measures the susurrus package found in DIR (a checkout or
`git archive` of another revision, put first on PYTHONPATH), to compare revisions in one
run; the configurations of all sources take turns, so that a slower spell of the machine
does not fall on one of them only.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BEAMS = {"greedy": None, "beam5": 5}


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _current_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(args: argparse.Namespace) -> dict:
    """One configuration, in this process."""
    sys.path.insert(0, str(HERE))
    import torch
    from worker import WARMUP_SECONDS, _whisper_options, read_wav

    import susurrus

    torch.set_num_threads(args.threads)
    path, language = args.input.rsplit(":", 1)
    audio = read_wav(path)
    start = time.perf_counter()
    model = susurrus.load_model(args.model, device="cpu", compute_type=args.compute_type)
    load_s = time.perf_counter() - start
    after_load = _peak_mb()
    options = _whisper_options(args.setting)
    if args.batch_size is not None:
        options["batch_size"] = args.batch_size
    susurrus.transcribe(model, audio[: int(WARMUP_SECONDS * 16000)], language=language, **options)
    after_warmup = _peak_mb()
    before = _current_mb()
    start = time.perf_counter()
    result = susurrus.transcribe(model, audio, language=language, **options)
    wall = time.perf_counter() - start
    tokens = [t for s in result["segments"] for t in s["tokens"]]
    return {
        "model": args.model,
        "compute_type": args.compute_type,
        "batch_size": args.batch_size,
        "setting": args.setting,
        "threads": args.threads,
        "input": Path(path).name,
        "audio_s": len(audio) / 16000,
        "load_s": round(load_s, 2),
        "wall_s": round(wall, 2),
        "rss_after_load_mb": round(after_load, 1),
        "rss_after_warmup_mb": round(after_warmup, 1),
        "rss_before_mb": round(before, 1),  # resident (not peak) as the timed run starts
        "peak_rss_mb": round(_peak_mb(), 1),
        "rss_end_mb": round(_current_mb(), 1),
        "segments": len(result["segments"]),
        "tokens": len(tokens),
        # Equal digests: the same transcript, token for token (and the same segmentation).
        "tokens_sha1": hashlib.sha1(
            json.dumps([s["tokens"] for s in result["segments"]]).encode()
        ).hexdigest()[:12],
    }


def _run_one(
    args: argparse.Namespace, model: str, compute_type: str, batch: str, setting: str,
    directory: str,
) -> dict:
    """One configuration in a fresh process (with `directory`'s susurrus, if given)."""
    command = [
        sys.executable, __file__, "--one", "--model", model, "--compute-type", compute_type,
        "--batch-size", batch, "--setting", setting, "--threads", str(args.threads),
        "--input", args.input,
    ]
    env = dict(os.environ)
    if directory:
        env["PYTHONPATH"] = os.pathsep.join(
            [str(Path(directory).resolve()), *filter(None, [env.get("PYTHONPATH")])]
        )
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--one", action="store_true", help="measure one configuration here")
    parser.add_argument("--models", nargs="+", default=["base"])
    parser.add_argument("--compute-types", nargs="+", default=["auto", "default"])
    parser.add_argument("--batch-sizes", nargs="+", default=["8", "none"])
    parser.add_argument("--settings", nargs="+", choices=sorted(BEAMS), default=["greedy", "beam5"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=1, help="fresh processes per configuration")
    parser.add_argument(
        "--input", default=str(HERE / "data" / "en-long.wav") + ":en", help="WAV:LANG (16 kHz)"
    )
    parser.add_argument("--source", action="append", default=[], help="NAME=DIR (see above)")
    parser.add_argument("--label", default="", help="a name for this set of runs")
    parser.add_argument("--out", help="write the runs as JSON here")
    # For --one:
    parser.add_argument("--model", default="base")
    parser.add_argument("--compute-type", default="auto")
    parser.add_argument("--batch-size", type=lambda s: None if s == "none" else int(s))
    parser.add_argument("--setting", choices=sorted(BEAMS), default="greedy")
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args)), flush=True)
        return

    sources = [tuple(spec.split("=", 1)) for spec in args.source] or [("", "")]
    runs = []
    for model in args.models:
        for compute_type in args.compute_types:
            for batch in args.batch_sizes:
                for setting in args.settings:
                    for _ in range(args.runs):
                        for name, directory in sources:
                            run = _run_one(args, model, compute_type, batch, setting, directory)
                            run["source"] = name
                            runs.append(run)
                            print(
                                f"{name} {model} {compute_type:8} b={batch:4} {setting:6} peak "
                                f"{run['peak_rss_mb']:7.1f} MB (load "
                                f"{run['rss_after_load_mb']:6.1f}, before "
                                f"{run['rss_before_mb']:6.1f})  {run['wall_s']:6.1f} s  "
                                f"{run['tokens']} tokens {run['tokens_sha1']}",
                                flush=True,
                            )
    if args.out:
        report = {
            "label": args.label,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "input": args.input,
            "sources": dict(sources),
            "env": {k: os.environ[k] for k in sorted(os.environ) if k.startswith("MALLOC_")},
            "runs": runs,
        }
        path = Path(args.out)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        tmp.replace(path)


if __name__ == "__main__":
    main(sys.argv[1:])
