"""Archives (issue 16): `susurrus batch` against a shell loop of the plain command.

The English dev recordings (16 files, 206 s) are copied REPEATS times into a folder (the
default, 18, makes about an hour of audio; `--quick` 3), then transcribed by

- `loop`: `for f in ...; do susurrus "$f" ...; done`, one process (and one model load) per
  file, on the first copy of the set only (a rate is a rate; the whole hour would take
  mostly model loads);
- `batch-w1`: `susurrus batch DIR --workers 1 --threads 1`;
- `batch-w2`: `--workers 2 --threads 1`;
- `batch-w2-b4`: `--workers 2 --threads 1 --batch_size 4` (4 files side by side on each
  worker's engine).

Throughput is audio seconds per wall second; peak RSS is each process's high-water mark
(VmHWM), sampled from /proc while it runs: the largest worker's and the coordinator's.
Agreement: files of the first copy whose text equals the loop's.

    .venv/bin/python benchmarks/archive.py [--quick] [--model tiny.en] [--repeats N]

Writes benchmarks/results/archive-<date>.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
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
sys.path.insert(0, str(HERE))  # run.py: the manifest reader


def english_files() -> list[tuple[Path, float]]:
    from run import read_manifest

    return [
        (SHARED / r["file"], float(r["duration_s"]))
        for r in read_manifest(SHARED)
        if r["language"] == "en" and r["category"] != "nonspeech"
    ]


class TreeMemory:
    """Peak RSS (VmHWM) of every process below `root`, sampled every 0.2 s."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.peaks: dict[int, tuple[int, str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _tree(self) -> list[int]:
        parents: dict[int, int] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                    parents[int(entry)] = int(fields[1])
                except (OSError, IndexError, ValueError):
                    continue
        tree, frontier = [self.root], [self.root]
        while frontier:
            frontier = [pid for pid, ppid in parents.items() if ppid in frontier]
            tree.extend(frontier)
        return tree

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            for pid in self._tree():
                try:
                    with open(f"/proc/{pid}/status") as f:
                        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
                except (OSError, StopIteration, ValueError):
                    continue
                if hwm > self.peaks.get(pid, (0, ""))[0]:
                    self.peaks[pid] = (hwm, cmdline)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        workers = [kb for pid, (kb, cmd) in self.peaks.items() if "spawn_main" in cmd]
        pythons = [kb for pid, (kb, cmd) in self.peaks.items()
                   if "susurrus" in cmd and "multiprocessing" not in cmd]
        return {
            "peak_rss_worker_mb": round(max(workers) / 1024, 1) if workers else None,
            "peak_rss_main_mb": round(max(pythons) / 1024, 1) if pythons else None,
            "workers_seen": len(workers),
        }


def measure(command: list[str]) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    memory = TreeMemory(proc.pid)
    _, stderr = proc.communicate()
    wall = time.perf_counter() - start
    result = {"seconds": round(wall, 2), "returncode": proc.returncode, **memory.stop()}
    if proc.returncode != 0:
        result["stderr"] = stderr[-2000:]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 copies (about 10 minutes)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--flags", default="--beam_size None",
                        help="transcription flags for every run (default: greedy)")
    parser.add_argument("--susurrus", default=str(ROOT / ".venv" / "bin" / "susurrus"),
                        help="the command to run (default: this checkout's venv)")
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 18)
    files = english_files()
    per_copy = sum(seconds for _, seconds in files)
    susurrus = shlex.split(args.susurrus)
    flags = ["--model", args.model, "--threads", "1", *shlex.split(args.flags)]

    work = Path(tempfile.mkdtemp(prefix="susurrus-archive-"))
    try:
        archive = work / "archive"
        for copy in range(repeats):
            folder = archive / f"copy{copy:02d}"
            folder.mkdir(parents=True)
            for path, _ in files:
                shutil.copy(path, folder / path.name)
        results: dict[str, dict] = {}

        loop_out = work / "loop"
        loop_files = sorted((archive / "copy00").iterdir())
        script = (
            f"for f in {' '.join(shlex.quote(str(p)) for p in loop_files)}; do "
            f"{shlex.join(susurrus)} \"$f\" {shlex.join(flags)} --verbose False "
            f"-o {shlex.quote(str(loop_out))} || exit 1; done"
        )
        print("loop ...", file=sys.stderr, flush=True)
        results["loop"] = {**measure(["bash", "-c", script]), "audio_seconds": per_copy,
                           "files": len(loop_files)}

        runs = {
            "batch-w1": ["--workers", "1"],
            "batch-w2": ["--workers", "2"],
            "batch-w2-b4": ["--workers", "2", "--batch_size", "4"],
        }
        for name, extra in runs.items():
            out = work / name
            print(f"{name} ...", file=sys.stderr, flush=True)
            result = measure([*susurrus, "batch", str(archive), "-o", str(out), *flags, *extra])
            index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
            result["files"] = len(index)
            result["failed"] = sum(r["status"] == "failed" for r in index)
            result["audio_seconds"] = round(sum(r["duration"] or 0 for r in index), 1)
            same = sum(
                (out / "copy00" / p.with_suffix(".txt").name).read_text()
                == (loop_out / p.with_suffix(".txt").name).read_text()
                for p in loop_files
            )
            result["same_text_as_loop"] = f"{same}/{len(loop_files)}"
            results[name] = result
        for result in results.values():
            result["throughput"] = round(result["audio_seconds"] / result["seconds"], 2)
        base = results["loop"]["throughput"]
        for result in results.values():
            result["vs_loop"] = round(result["throughput"] / base, 2)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    report = {
        "date": date.today().isoformat(),
        "machine": f"{os.cpu_count()} cores",
        "model": args.model,
        "flags": args.flags,
        "repeats": repeats,
        "archive_audio_seconds": round(per_copy * repeats, 1),
        "results": results,
    }
    (HERE / "results").mkdir(exist_ok=True)
    suffix = "-quick" if args.quick else ""
    path = HERE / "results" / f"archive-{report['date']}{suffix}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print("| run | files | audio s | wall s | audio s / wall s | vs loop | peak RSS per worker "
          "| coordinator | same text |\n|---|--:|--:|--:|--:|--:|--:|--:|--:|")
    for name, r in results.items():
        worker = r["peak_rss_worker_mb"] or r["peak_rss_main_mb"]
        main_rss = r["peak_rss_main_mb"] if r["peak_rss_worker_mb"] else "–"
        print(f"| {name} | {r['files']} | {r['audio_seconds']} | {r['seconds']} | "
              f"{r['throughput']} | {r['vs_loop']}x | {worker} MB | {main_rss} | "
              f"{r.get('same_text_as_loop', '–')} |")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
