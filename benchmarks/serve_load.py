"""Load test of `susurrus serve` on loopback: many clients upload the dev files at once.

    python benchmarks/serve_load.py [--clients 32] [--rounds 3] [--model tiny.en]
    python benchmarks/serve_load.py --random-large-v3 --device cuda   # on a GPU machine

Starts a server process on 127.0.0.1 (a free port), then
1. sends each client's request one at a time (the sequential baseline),
2. runs `--rounds` rounds in which all `--clients` clients upload at once,
and reports: requests lost or mixed up (each response must equal that file's text from the
`susurrus` command with the same options, or from the sequential run with random weights),
p50/p95 latency, aggregate real-time factor, throughput against the sequential baseline,
and the server's peak RSS. Everything is bounded: `--deadline` seconds in all, a timeout on
every request, and the server is stopped at the end whatever happens.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
AUDIO = ROOT.parent / "shared" / "audio"


def dev_files(max_seconds: float, english_only: bool) -> list[tuple[Path, float]]:
    """The dev files up to `max_seconds` long (English ones only for an English-only model),
    shortest first, with their durations."""
    with open(AUDIO / "manifest.tsv", encoding="utf-8") as f:
        rows = list(
            csv.DictReader(
                (line for line in f if not line.startswith("#")),
                delimiter="\t",
                quoting=csv.QUOTE_NONE,
            )
        )
    files = [
        (AUDIO / r["file"], float(r["duration_s"]))
        for r in rows
        if r["language"] == "en" or not english_only
    ]
    return sorted((f for f in files if f[1] <= max_seconds), key=lambda f: f[1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def write_random_large_v3(directory: Path) -> None:
    """A transformers-layout checkpoint of the large-v3 shape with seeded random weights."""
    import torch
    from safetensors.torch import save_file

    from susurrus.hf import hf_name
    from susurrus.model import ModelDimensions, Whisper

    dims = ModelDimensions(128, 1500, 1280, 20, 32, 51866, 448, 1280, 20, 32)
    torch.manual_seed(0)
    model = Whisper(dims)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    tensors = {
        "model." + hf_name(n): t.detach().half().contiguous() for n, t in model.state_dict().items()
    }
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"))
    config = {
        "model_type": "whisper",
        "activation_function": "gelu",
        "d_model": 1280,
        "encoder_layers": 32,
        "encoder_attention_heads": 20,
        "decoder_layers": 32,
        "decoder_attention_heads": 20,
        "num_mel_bins": 128,
        "max_source_positions": 1500,
        "max_target_positions": 448,
        "vocab_size": 51866,
    }
    (directory / "config.json").write_text(json.dumps(config))


def cli_texts(files: list[Path], model: str, options: list[str], out: Path) -> dict[str, str]:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "susurrus",
            *map(str, files),
            "--model",
            model,
            "-f",
            "json",
            "-o",
            str(out),
            "--verbose",
            "False",
            *options,
        ],
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=1800,
        capture_output=True,
    )
    return {f.name: json.loads((out / f"{f.stem}.json").read_text())["text"].strip() for f in files}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--compute-type", default="default")
    parser.add_argument("--device", default=None)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument(
        "--max-seconds", type=float, default=30.0, help="use the dev files up to this long"
    )
    parser.add_argument("--beam-size", default="5", help="'None' for greedy")
    parser.add_argument(
        "--random-large-v3",
        action="store_true",
        help="serve seeded random weights of the large-v3 shape (for a GPU)",
    )
    parser.add_argument("--deadline", type=float, default=1800.0, help="seconds in all")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    started = time.monotonic()

    def left() -> float:
        remaining = args.deadline - (time.monotonic() - started)
        if remaining <= 0:
            raise TimeoutError(f"over the {args.deadline:.0f} s deadline")
        return remaining

    files = dev_files(args.max_seconds, args.model.endswith(".en"))
    jobs = [files[i % len(files)] for i in range(args.clients)]
    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    model = args.model
    options = ["--beam_size", args.beam_size]
    serve_models = ["--model", model]
    if args.random_large_v3:
        write_random_large_v3(work / "random-large-v3")
        model = "random-large-v3"
        serve_models = ["--model", f"random-large-v3={work / 'random-large-v3'}"]
        options += ["--language", "en", "--temperature_increment_on_fallback", "None"]
        expected = None  # random weights: compared with the sequential run instead
    else:
        print(f"reference texts: susurrus CLI on {len(files)} files", flush=True)
        expected = cli_texts([f for f, _ in files], model, options, work / "cli")

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable,
        "-m",
        "susurrus",
        "serve",
        "--port",
        str(port),
        *serve_models,
        "--compute_type",
        args.compute_type,
        "--max-batch",
        str(args.max_batch),
        "--max-queue",
        str(max(0, args.clients - args.max_batch)),
        "--model-ttl",
        "0",
    ]
    if args.device:
        command += ["--device", args.device]
    log = open(work / "server.log", "wb")  # noqa: SIM115 (closed below)
    server = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    fields = {"model": model, "beam_size": args.beam_size}
    if args.random_large_v3:
        fields.update(language="en", temperature_increment_on_fallback="None")
    try:
        while True:
            try:
                httpx.get(url + "/health", timeout=2)
                break
            except httpx.TransportError:
                if server.poll() is not None or left() < 0:
                    raise RuntimeError("the server did not start") from None
                time.sleep(0.2)

        def request(job: tuple[Path, float]) -> tuple[str, float, str]:
            path, _ = job
            t0 = time.monotonic()
            with open(path, "rb") as f:
                r = httpx.post(
                    url + "/v1/audio/transcriptions",
                    files={"file": f},
                    data=fields,
                    timeout=min(600.0, left()),
                )
            text = r.json()["text"] if r.status_code == 200 else f"HTTP {r.status_code}"
            return path.name, time.monotonic() - t0, text

        request(jobs[0])  # loads the model; not timed
        print(f"sequential: {len(jobs)} requests one at a time", flush=True)
        t0 = time.monotonic()
        sequential = [request(j) for j in jobs]
        sequential_s = time.monotonic() - t0
        if expected is None:
            expected = {name: text for name, _, text in sequential}

        audio_per_round = sum(d for _, d in jobs)
        rounds = []
        latencies: list[float] = []
        lost = mixed = 0
        for k in range(args.rounds):
            barrier = threading.Barrier(len(jobs))

            def at_once(job: tuple[Path, float], barrier=barrier) -> tuple[str, float, str]:
                barrier.wait(timeout=60)
                return request(job)

            t0 = time.monotonic()
            with ThreadPoolExecutor(len(jobs)) as pool:
                results = list(pool.map(at_once, jobs))
            wall = time.monotonic() - t0
            rounds.append(wall)
            for name, seconds, text in results:
                latencies.append(seconds)
                if text.startswith("HTTP "):
                    lost += 1
                elif text != expected[name]:
                    mixed += 1
            print(f"round {k + 1}: {wall:.1f} s", flush=True)
        seq_mismatch = sum(text != expected[name] for name, _, text in sequential)
        rss = peak_rss_mb(server.pid)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        shutil.rmtree(work, ignore_errors=True)

    latencies.sort()
    round_s = statistics.median(rounds)
    report = {
        "model": model,
        "compute_type": args.compute_type,
        "clients": len(jobs),
        "rounds": args.rounds,
        "files": len(files),
        "audio_s_per_round": round(audio_per_round, 1),
        "requests": len(latencies),
        "lost": lost,
        "mixed_up": mixed,
        "sequential_mismatches_vs_cli": seq_mismatch,
        "sequential_total_s": round(sequential_s, 2),
        "sequential_rtf": round(audio_per_round / sequential_s, 1),
        "concurrent_round_s": [round(r, 2) for r in rounds],
        "aggregate_rtf": round(audio_per_round / round_s, 1),
        "throughput_vs_sequential": round(sequential_s / round_s, 2),
        "latency_p50_s": round(statistics.median(latencies), 2),
        "latency_p95_s": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 2),
        "p95_within_sequential_total": latencies[int(0.95 * len(latencies))] <= sequential_s,
        "server_peak_rss_mb": round(rss),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if lost == 0 and mixed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
