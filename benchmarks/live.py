"""Live transcription on a simulated clock: latency, accuracy and concurrent streams (issue 15).

Each recording is fed chunk by chunk (0.25, 0.5 and 1 s) to a `LiveSession` on a clock that
audio and decoding both advance: chunk k arrives at (k + 1) * chunk seconds; a decode starts
when the previous one has finished and takes everything that has arrived by then, and the
time it takes on this machine is added to the clock (a slow decode really delays the next).

Per model and chunk size:
- confirmed latency: for each word of the offline decoding of the same file (same model,
  word timestamps), matched to a confirmed word, the clock time at which it was confirmed
  minus the word's end in the audio (median, p90); tentative latency likewise, from the
  first time the word showed (tentative or confirmed);
- WER (English, normalised) / CER (Mandarin) of the confirmed text against the manifest,
  and against the offline decoding;
- real-time streams: N streams fed in real time (wall clock, threads) on one engine of the
  model (`--compute-type`, default auto) with a worker thread that does all the torch work
  (as the server's engines); the largest N whose streams keep up (p90 of the lag, how far
  the audio decoded trails the audio heard when a decode ends, under 3 s).

    .venv/bin/python benchmarks/live.py [--quick]
        [--models tiny.en,base] [--chunks 0.25,0.5,1] [--threads 2] [--languages en,zh]
        [--trim 25] [--option beam_size=5] [--long] [--no-streams]

Writes benchmarks/results/live-<date>[-quick].json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
import threading
import time
from datetime import date
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED = ROOT.parent / "shared" / "audio"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

QUICK_EN = ["jfk.flac", "en_ls_1995-1837-0001.flac", "en_arctic_a0024.flac"]
QUICK_ZH = ["zh_aishell_BAC009S0724W0121.flac"]
LONG = "en_lj_LJ001-0001-0016_concat.flac"
KEEPS_UP_S = 3.0


def rows() -> list[dict]:
    from run import read_manifest

    return read_manifest(SHARED)


def make_units():
    from whisper_normalizer.basic import BasicTextNormalizer
    from whisper_normalizer.english import EnglishTextNormalizer

    english, basic = EnglishTextNormalizer(), BasicTextNormalizer()

    try:
        from zhconv import convert  # traditional characters count as the simplified ones
    except ImportError:
        def convert(text: str, _: str) -> str:
            return text

    def units(text: str, language: str) -> list[str]:
        if language == "zh":
            return list(re.sub(r"\s+", "", convert(basic(text), "zh-cn")))
        return english(text).split()

    return units


def error_rate(units, hypothesis: str, reference: str, language: str) -> float:
    """Edit distance over reference units (words, or characters for Mandarin)."""
    import jiwer

    ref, hyp = units(reference, language), units(hypothesis, language)
    if not ref:
        return float(bool(hyp))
    if language == "zh":
        return jiwer.cer("".join(ref), "".join(hyp))
    return jiwer.wer(" ".join(ref), " ".join(hyp))


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return float(np.percentile(np.array(values), q))


# -- one stream on the simulated clock ------------------------------------------------------


def simulate(model, samples: np.ndarray, chunk: float, language: str | None,
             pause: float | None = None, **session_options) -> dict:
    from susurrus import LiveSession

    clock = [0.0]
    began = [0.0]
    seen: list[tuple[float, list[dict]]] = []  # (clock, words shown: confirmed and tentative)
    confirmed_at: list[float] = []

    def on_event(event) -> None:
        now = clock[0] + time.perf_counter() - began[0]
        for _ in event.confirmed:
            confirmed_at.append(now)
        seen.append((now, list(event.confirmed) + list(event.tentative)))

    session = LiveSession(model, language=language, on_event=on_event, pause=pause,
                          **session_options)
    step = int(chunk * 16000)
    n_chunks = (len(samples) + step - 1) // step
    fed = 0  # chunks fed
    decode_seconds = 0.0
    while fed < n_chunks:
        arrived = min(n_chunks, int(clock[0] / chunk + 1e-9))
        if arrived <= fed:
            clock[0] = (fed + 1) * chunk  # wait for the next chunk
            continue
        began[0] = time.perf_counter()
        session.feed(samples[fed * step : arrived * step])
        spent = time.perf_counter() - began[0]
        clock[0] += spent
        decode_seconds += spent
        fed = arrived
    clock[0] = max(clock[0], len(samples) / 16000)
    began[0] = time.perf_counter()
    result = session.finish()
    spent = time.perf_counter() - began[0]
    clock[0] += spent
    decode_seconds += spent
    words = [w for s in result["segments"] for w in s["words"]]
    return {
        "text": result["text"],
        "words": words,
        "confirmed_at": confirmed_at,
        "seen": seen,
        "decodes": session.decodes,
        "decode_s": decode_seconds,
    }


def latencies(units, live: dict, offline_words: list[dict], language: str) -> tuple[list, list]:
    """Confirmed and tentative latency of each offline word matched to a confirmed word."""

    def key(word: str) -> str:
        parts = units(word, language)
        return "".join(parts)

    live_keys = [key(w["word"]) for w in live["words"]]
    ref_keys = [key(w["word"]) for w in offline_words]
    matcher = difflib.SequenceMatcher(None, ref_keys, live_keys, autojunk=False)
    confirmed, tentative = [], []
    for block in matcher.get_matching_blocks():
        for i in range(block.size):
            ref, j = offline_words[block.a + i], block.b + i
            if not ref_keys[block.a + i]:
                continue
            word = live["words"][j]
            confirmed.append(live["confirmed_at"][j] - ref["end"])
            first = next(
                (t for t, shown in live["seen"] for w in shown
                 if key(w["word"]) == live_keys[j] and abs(w["start"] - word["start"]) < 1.0),
                live["confirmed_at"][j],
            )
            tentative.append(min(first, live["confirmed_at"][j]) - ref["end"])
    return confirmed, tentative


def accuracy_runs(model_name: str, chunks: list[float], files: list[dict], compute_type: str,
                  units, pause: float | None = None, **session_options) -> list[dict]:
    import susurrus
    from susurrus import load_audio, transcribe

    model = susurrus.load_model(model_name, compute_type=compute_type)
    if not model.is_multilingual:
        files = [f for f in files if f["language"] == "en"]
    offline = {}
    for f in files:
        samples = load_audio(str(SHARED / f["file"]))
        result = transcribe(model, samples, language=f["language"], word_timestamps=True,
                            temperature=0.0)
        offline[f["file"]] = (samples, result)
    out = []
    for chunk in chunks:
        per_language: dict[str, dict] = {}
        for f in files:
            samples, off = offline[f["file"]]
            live = simulate(model, samples, chunk, f["language"], pause, **session_options)
            off_words = [w for s in off["segments"] for w in s.get("words", [])]
            conf, tent = latencies(units, live, off_words, f["language"])
            bucket = per_language.setdefault(
                f["language"], {"refs": [], "live": [], "offline": [], "conf": [], "tent": [],
                                "audio_s": 0.0, "decode_s": 0.0, "decodes": 0, "texts": []})
            bucket["refs"].append(f["transcript"])
            bucket["live"].append(live["text"])
            bucket["offline"].append(off["text"])
            bucket["conf"] += conf
            bucket["tent"] += tent
            bucket["audio_s"] += len(samples) / 16000
            bucket["decode_s"] += live["decode_s"]
            bucket["decodes"] += live["decodes"]
            bucket["texts"].append(
                {"file": f["file"], "live": live["text"], "offline": off["text"],
                 "confirmed_latency_median_s": percentile(conf, 50),
                 "confirmed_latency_max_s": max(conf) if conf else None})
            print(f"  {model_name} chunk {chunk} {f['file']}: {live['decodes']} decodes, "
                  f"{live['text'][:70]!r}", file=sys.stderr, flush=True)
        for language, b in per_language.items():
            joiner = "" if language == "zh" else " "
            ref, hyp, off_text = (joiner.join(b["refs"]), joiner.join(b["live"]),
                                  joiner.join(b["offline"]))
            out.append({
                "model": model_name,
                "chunk_s": chunk,
                "language": language,
                "files": len(b["refs"]),
                "audio_s": round(b["audio_s"], 1),
                "decodes": b["decodes"],
                "decode_s": round(b["decode_s"], 1),
                "confirmed_latency_median_s": percentile(b["conf"], 50),
                "confirmed_latency_p90_s": percentile(b["conf"], 90),
                "tentative_latency_median_s": percentile(b["tent"], 50),
                "tentative_latency_p90_s": percentile(b["tent"], 90),
                "matched_words": len(b["conf"]),
                "error_rate_live": error_rate(units, hyp, ref, language),
                "error_rate_offline": error_rate(units, off_text, ref, language),
                "error_rate_live_vs_offline": error_rate(units, hyp, off_text, language),
                "texts": b["texts"],  # per file: where live and offline differ
            })
    return out


# -- concurrent real-time streams -----------------------------------------------------------


def realtime_streams(model, samples: np.ndarray, n: int, worker, chunk: float = 0.5) -> dict:
    """n streams of `samples` fed in real time from n threads on one engine, whose
    worker thread does all the torch work (as the server's)."""
    from susurrus import Engine, LiveSession

    engine = Engine(model, max_batch=8, worker=worker)
    lags: list[float] = []
    lock = threading.Lock()
    errors: list[BaseException] = []
    start = time.monotonic() + 0.5

    def stream(index: int) -> None:
        try:
            session = LiveSession(engine, language="en")
            offset = index * 0.1  # streams do not start in lockstep
            step = int(chunk * 16000)
            fed = 0
            while fed < len(samples):
                heard = time.monotonic() - start - offset
                available = min(len(samples), int(heard * 16000) // step * step)
                if available <= fed:
                    time.sleep(max(0.0, (fed + step) / 16000 - heard))
                    continue
                session.feed(samples[fed:available])
                fed = available
                lag = time.monotonic() - start - offset - fed / 16000
                with lock:
                    lags.append(lag)
            session.finish()
        except BaseException as exc:  # reported in the result
            errors.append(exc)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    p90 = percentile(lags, 90)
    return {
        "streams": n,
        "lag_median_s": percentile(lags, 50),
        "lag_p90_s": p90,
        "mean_batch": engine.row_steps / max(1, engine.steps),
        "keeps_up": not errors and p90 is not None and p90 < KEEPS_UP_S,
        "errors": [repr(e) for e in errors],
    }


def concurrency(model_name: str, compute_type: str, levels: list[int], files: list[str]) -> dict:
    import susurrus
    from susurrus import load_audio

    # The model is loaded on the worker too: one OpenMP team in the process.
    worker = susurrus.Worker()
    model = worker.call(susurrus.load_model, model_name, compute_type=compute_type)
    samples = np.concatenate([load_audio(str(SHARED / f)) for f in files])
    runs = []
    try:
        for n in levels:
            run = realtime_streams(model, samples, n, worker)
            runs.append(run)
            print(f"  {model_name} {compute_type}: {n} stream(s): lag p90 "
                  f"{run['lag_p90_s']:.2f} s, mean batch {run['mean_batch']:.2f}",
                  file=sys.stderr, flush=True)
            if not run["keeps_up"]:
                break
    finally:
        # Ended here rather than at interpreter exit, where a thread still inside torch
        # can abort the process ("terminate called without an active exception").
        worker.close()
    kept = [r["streams"] for r in runs if r["keeps_up"]]
    return {"model": model_name, "compute_type": compute_type, "audio_s": len(samples) / 16000,
            "runs": runs, "max_realtime_streams": max(kept) if kept else 0}


def _number(text: str) -> float | int | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="3 English files and 1 Mandarin, chunks of 0.5 s, 1-2 streams")
    parser.add_argument("--models", default="tiny.en,base")
    parser.add_argument("--chunks", default="0.25,0.5,1")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compute-type", default="default",
                        help="accuracy runs (the streams count: --streams-compute-type)")
    parser.add_argument("--streams-compute-type", default="auto")
    parser.add_argument("--long", action="store_true",
                        help="add the 111 s long-form English recording to the accuracy runs")
    parser.add_argument("--pause", type=float, default=None,
                        help="LiveSession(pause=): silence that makes a decode final")
    parser.add_argument("--trim", type=float, default=None,
                        help="LiveSession(trim=): buffer seconds past which it is cut")
    parser.add_argument("--languages", default="en,zh", help="dev files of these languages")
    parser.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                        help="another LiveSession keyword (a number or a word), repeatable")
    parser.add_argument("--no-streams", action="store_true", help="skip the streams count")
    parser.add_argument("--no-accuracy", action="store_true",
                        help="only the streams count")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    units = make_units()
    manifest = [r for r in rows() if r["category"] != "nonspeech"]
    languages = args.languages.split(",")
    session_options: dict = {}
    if args.trim is not None:
        session_options["trim"] = args.trim
    for item in args.option:
        name, _, value = item.partition("=")
        session_options[name] = _number(value)
    if args.quick:
        names = QUICK_EN + QUICK_ZH
        chunks = [0.5]
        levels = [1, 2]
    else:
        names = [r["file"] for r in manifest
                 if r["language"] in languages and r["category"] == "short"]
        chunks = [float(c) for c in args.chunks.split(",")]
        levels = [1, 2, 4, 6, 8]
    if args.long:
        names.append(LONG)
    files = [r for r in manifest if r["file"] in names]
    models = args.models.split(",")
    began = time.time()
    accuracy = []
    for model_name in [] if args.no_accuracy else models:
        accuracy += accuracy_runs(model_name, chunks, files, args.compute_type, units,
                                  args.pause, **session_options)
    streams = [] if args.no_streams else [
        concurrency(m, args.streams_compute_type, levels, QUICK_EN[:2]) for m in models
    ]
    result = {
        "date": str(date.today()),
        "threads": args.threads,
        "quick": args.quick,
        "compute_type": args.compute_type,
        "pause": args.pause,
        "session_options": session_options,
        "files": [f["file"] for f in files],
        "accuracy": accuracy,
        "streams": streams,
        "keeps_up_lag_p90_s": KEEPS_UP_S,
        "wall_s": round(time.time() - began, 1),
    }
    out = Path(args.out) if args.out else (
        HERE / "results" / f"live-{date.today()}{'-quick' if args.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print("| model | chunk | lang | confirmed latency median / p90 | tentative median / p90 "
          "| WER/CER live | offline | live vs offline |")
    print("|---|---|---|---|---|---|---|---|")
    for r in accuracy:
        print(f"| {r['model']} | {r['chunk_s']} s | {r['language']} "
              f"| {fmt(r['confirmed_latency_median_s'])} / {fmt(r['confirmed_latency_p90_s'])} s "
              f"| {fmt(r['tentative_latency_median_s'])} / {fmt(r['tentative_latency_p90_s'])} s "
              f"| {100 * r['error_rate_live']:.1f}% | {100 * r['error_rate_offline']:.1f}% "
              f"| {100 * r['error_rate_live_vs_offline']:.1f}% |")
    for s in streams:
        print(f"\n{s['model']} ({s['compute_type']}): {s['max_realtime_streams']} real-time "
              "stream(s); " + ", ".join(
                  f"{r['streams']}: lag p90 {fmt(r['lag_p90_s'])} s" for r in s["runs"]))
    print(f"\n{out} ({result['wall_s']} s)")


if __name__ == "__main__":
    main()
