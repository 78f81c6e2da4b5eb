"""Many recordings on one engine: throughput, agreement and memory (issue 13).

Each measurement runs in a fresh process (peak RSS is per process), the susurrus of this
checkout against the same measurement of a baseline revision where it has one:

- `per-file`: one `transcribe` call per file of the dev set (16 English + 6 Mandarin);
- `many-1`: all files in one `transcribe_many` call, one at a time (no batching);
- `many-8`: all files in one call, 8 side by side, each with its own prompt;
- `many-8-cut`: the same, each file as `--batch_size 8` decodes it alone (a long file cut
  at pauses into windows decoded side by side): what `susurrus FILES... --batch_size 8` does;
- `queued-64`: 64 recordings (the dev set repeated) queued at 8 side by side: memory is
  bounded by the slots, not the queue (`one`: a single recording, for scale);
- `arrivals`: a recording started every 0.5 s from its own thread on a shared engine,
  against the same recordings in `many-8`;
- `long-seq`, `long-b8`: the 213 s English long-form input (benchmarks/run.py's
  `en-long`), sequential and cut into windows decoded 8 at a time.

    .venv/bin/python benchmarks/engine.py [--model base] [--compute-type auto]
        [--baseline REV] [--settings greedy,beam5]

Writes benchmarks/results/engine-<date>.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED = ROOT.parent / "shared" / "audio"
SETTINGS = {"greedy": {}, "beam5": {"beam_size": 5}}
sys.path.insert(0, str(HERE))  # run.py: the manifest and the long input's making


def dev_files() -> list[tuple[str, str, str]]:
    """(path, language, transcript) of the English and Mandarin dev recordings."""
    from run import read_manifest

    return [
        (str(SHARED / r["file"]), r["language"], r["transcript"])
        for r in read_manifest(SHARED)
        if r["language"] in ("en", "zh") and r["category"] != "nonspeech"
    ]


# -- the worker: one measurement in this process -----------------------------------------


def worker(spec: dict) -> dict:
    import torch

    import susurrus

    torch.set_num_threads(spec["threads"])
    model = susurrus.load_model(spec["model"], compute_type=spec["compute_type"])
    options = {"temperature": (0.0, 0.2, 0.4, 0.6, 0.8, 1.0), **SETTINGS[spec["setting"]]}
    files = [tuple(f) for f in spec["files"]]
    kind = spec["kind"]
    # Warm-up: first-use costs (packing int8 weights, allocator) out of the timing.
    model.transcribe(str(SHARED / "jfk.flac"), language="en", **options)
    texts: dict[str, str] = {}
    tokens = 0
    start = time.perf_counter()
    if kind == "per-file" or kind == "one" or kind.startswith("long"):
        for path, language, _ in files:
            batch = {"batch_size": 8} if kind == "long-b8" else {}
            result = model.transcribe(path, language=language, **options, **batch)
            texts[path] = result["text"]
            tokens += sum(len(s["tokens"]) for s in result["segments"])
    elif kind in ("many-1", "many-8", "many-8-cut", "queued-64"):
        width = 1 if kind == "many-1" else 8
        cut = kind == "many-8-cut"
        # One language for all: the English-only set, or per-file languages via groups.
        by_language: dict[str, list[str]] = {}
        for path, language, _ in files:
            by_language.setdefault(language, []).append(path)
        engine = susurrus.Engine(model, max_batch=width)
        # One call per language, both on the shared engine, driven from this thread in
        # turn (each call's generator steps the engine for both).
        from susurrus.options import TranscribeOptions

        # many-8-cut: as `susurrus FILES... --batch_size 8`, each file as it would be alone
        # with --batch_size 8 (a long one cut into windows decoded side by side).
        calls = [
            susurrus.transcribe_many(
                model,
                paths,
                batch_size=width,
                engine=engine,
                options=TranscribeOptions.create(
                    language=language, batch_size=8 if cut else None, **options
                ),
            )
            for language, paths in by_language.items()
        ]
        while calls:
            for call in list(calls):
                entry = next(call, None)
                if entry is None:
                    calls.remove(call)
                else:
                    texts[entry[0]] = entry[1]["text"]
        tokens = engine.row_steps
    elif kind == "arrivals":
        engine = susurrus.Engine(model, max_batch=8)
        threads = []
        for i, (path, language, _) in enumerate(files):
            def run(path=path, language=language):
                texts[path] = engine.transcribe(path, language=language, **options)["text"]

            t = threading.Thread(target=run)
            threads.append(t)
            t.start()
            time.sleep(0.5 if i < len(files) - 1 else 0)
        for t in threads:
            t.join()
        tokens = engine.row_steps
    elapsed = time.perf_counter() - start
    return {
        "seconds": elapsed,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "texts": texts,
        "tokens": tokens,
    }


# -- the driver ---------------------------------------------------------------------------


def run_worker(tree: Path, spec: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(spec["threads"])}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        timeout=3600,
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def error_rate(texts: dict[str, str], files) -> float:
    import re

    import jiwer
    from whisper_normalizer.basic import BasicTextNormalizer
    from whisper_normalizer.english import EnglishTextNormalizer

    en, basic = EnglishTextNormalizer(), BasicTextNormalizer()
    refs, hyps = [], []
    for path, language, truth in files:
        if language == "zh":  # characters
            refs.append(" ".join(re.sub(r"\s", "", basic(truth))))
            hyps.append(" ".join(re.sub(r"\s", "", basic(texts[path]))))
        else:
            refs.append(en(truth))
            hyps.append(en(texts[path]))
    return 100 * jiwer.wer(refs, hyps)


def long_input(data: Path) -> tuple[str, str, str]:
    """The 213 s English long-form input of benchmarks/run.py (`en-long`): every English
    short or long dev file in manifest order, joined with 0.5 s of silence."""
    import numpy as np
    from run import GAP_S, SR, read_manifest, write_wav

    import susurrus

    rows = [
        r
        for r in read_manifest(SHARED)
        if r["language"] == "en" and r["category"] in ("short", "long")
    ]
    pieces = []
    for i, row in enumerate(rows):
        if i:
            pieces.append(np.zeros(int(GAP_S * SR), dtype=np.float32))
        pieces.append(susurrus.load_audio(str(SHARED / row["file"])))
    data.mkdir(parents=True, exist_ok=True)
    wav = data / "en-long.wav"
    write_wav(wav, np.concatenate(pieces))
    return str(wav), "en", " ".join(r["transcript"].strip() for r in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="base")
    parser.add_argument("--compute-type", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--settings", default="greedy")
    parser.add_argument("--baseline", default=None, help="git revision to compare with")
    parser.add_argument(
        "--kinds",
        default="per-file,many-1,many-8,many-8-cut,arrivals,one,queued-64,long-seq,long-b8",
    )
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    files = dev_files()
    long = long_input(HERE / "data")
    trees = {"now": ROOT}
    scratch = None
    if args.baseline:
        scratch = tempfile.mkdtemp(prefix="susurrus-baseline-")
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", scratch, args.baseline],
            check=True,
            capture_output=True,
        )
        trees["baseline"] = Path(scratch)
    rows = []
    try:
        for setting in args.settings.split(","):
            for kind in args.kinds.split(","):
                chosen = files
                if kind == "one":
                    chosen = files[:1]
                elif kind == "queued-64":
                    chosen = [files[i % len(files)] for i in range(64)]
                elif kind.startswith("long"):
                    chosen = [long]
                for name, tree in trees.items():
                    new_api = kind in ("many-1", "many-8", "many-8-cut", "queued-64", "arrivals")
                    if name == "baseline" and new_api:
                        continue  # the baseline has no engine
                    spec = {
                        "kind": kind,
                        "files": chosen,
                        "model": args.model,
                        "compute_type": args.compute_type,
                        "threads": args.threads,
                        "setting": setting,
                    }
                    out = run_worker(tree, spec)
                    audio = sum(_duration(f[0]) for f in chosen)
                    row = {
                        "tree": name,
                        "setting": setting,
                        "kind": kind,
                        "seconds": out["seconds"],
                        "rtf": audio / out["seconds"],
                        "peak_rss_mb": out["peak_rss_mb"],
                        "error_rate": error_rate(out["texts"], list(dict.fromkeys(chosen))),
                        "texts": out["texts"],
                    }
                    rows.append(row)
                    print(
                        f"{name:8s} {setting:6s} {kind:10s} {row['seconds']:7.1f} s "
                        f"{row['rtf']:6.1f}x  {row['peak_rss_mb']:6.0f} MB  "
                        f"WER/CER {row['error_rate']:.2f}",
                        flush=True,
                    )
    finally:
        if scratch:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", scratch])
    report(rows, args)
    return 0


_durations: dict[str, float] = {}


def _duration(path: str) -> float:
    if path not in _durations:
        import av

        with av.open(path) as container:
            stream = container.streams.audio[0]
            _durations[path] = float(stream.duration * stream.time_base)
    return _durations[path]


def report(rows: list[dict], args) -> None:
    """Ratios within this run, and agreement of texts with one-at-a-time decoding."""
    out = HERE / "results" / f"engine-{date.today().isoformat()}.json"
    out.parent.mkdir(exist_ok=True)
    print(
        "\n| setting | run | tree | seconds | x real time | peak RSS MB | WER/CER % "
        "| same text as per-file |"
    )
    print("|---|---|---|--:|--:|--:|--:|--:|")
    for row in rows:
        reference = next(
            (r for r in rows if r["kind"] == "per-file" and r["tree"] == "now"
             and r["setting"] == row["setting"]),
            None,
        )
        same = "–"
        if reference and row["kind"] in ("per-file", "many-1", "many-8", "many-8-cut", "arrivals"):
            agree = sum(row["texts"][p] == reference["texts"][p] for p in reference["texts"])
            same = f"{agree}/{len(reference['texts'])}"
        print(
            f"| {row['setting']} | {row['kind']} | {row['tree']} | {row['seconds']:.1f} | "
            f"{row['rtf']:.1f} | {row['peak_rss_mb']:.0f} | {row['error_rate']:.2f} | {same} |"
        )
    json.dump({"args": vars(args), "rows": rows}, open(out, "w"), indent=1, ensure_ascii=False)
    print(f"\n{out}")


if __name__ == "__main__":
    sys.exit(main())
