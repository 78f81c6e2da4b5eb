"""An archive run: find the inputs, skip what an earlier run finished, hand the rest to
local worker processes or Ray actors (largest first), record every input in the index,
show one progress bar, and sum up."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from .index import Index
from .inputs import Item, discover
from .worker import WorkerConfig

DONE = ("ok", "no-speech")


@dataclass
class Summary:
    total: int = 0
    skipped: int = 0
    ok: int = 0
    no_speech: int = 0
    failed: int = 0
    audio_seconds: float = 0.0
    wall_seconds: float = 0.0
    workers: int = 0
    index: str = ""

    @property
    def exit_status(self) -> int:
        return 1 if self.failed else 0

    def line(self) -> str:
        speed = self.audio_seconds / self.wall_seconds if self.wall_seconds else 0.0
        return (
            f"{self.total} file(s): {self.ok} transcribed, {self.no_speech} without speech, "
            f"{self.failed} failed, {self.skipped} done before; "
            f"{self.audio_seconds / 3600:.2f} h of audio in {_clock(self.wall_seconds)} "
            f"({speed:.1f}x real time, {self.workers} worker(s)); index: {self.index}"
        )


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def fingerprint(config: WorkerConfig, item: Item) -> str:
    """What the outputs depend on besides the input: options (with the item's language),
    model, output format, writer options, audio stream."""
    text = json.dumps({
        "options": config.options_for(item).fingerprint(),
        "model": config.model,
        "compute_type": config.compute_type,
        "format": config.output_format,
        "writer": [list(pair) for pair in config.writer_options],
        "stream": config.audio_stream,
    }, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def finished_before(index: Index, config: WorkerConfig, item: Item) -> bool:
    """Whether an earlier run finished this very input (same size and mtime) with these
    options, and every output it wrote is still there."""
    record = index.records.get(item.path)
    return bool(
        record
        and record.get("status") in DONE
        and item.size >= 0
        and record.get("size") == item.size
        and record.get("mtime_ns") == item.mtime_ns
        and record.get("stem") == item.stem
        and record.get("fingerprint") == fingerprint(config, item)
        and record.get("outputs")
        and all(os.path.isfile(os.path.join(config.output_dir, out)) for out in record["outputs"])
    )


def default_threads(workers: int) -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, workers))


def run_batch(
    inputs: list[str],
    config: WorkerConfig,
    *,
    workers: int | None = None,
    ray: bool = False,
    ray_address: str | None = None,
    gpus_per_worker: float = 0,
    retries: int = 2,
    progress: bool = True,
    report: Callable[[str], None] | None = None,
    on_start: Callable[[dict], None] | None = None,
) -> Summary:
    """Transcribe every input into `config.output_dir`; see the module's docstring.
    `report` gets a line per failed input; `on_start` an event per file handed to a
    worker ({"worker", "pid" or "actor", "path"})."""
    from tqdm import tqdm

    os.makedirs(config.output_dir, exist_ok=True)
    items = discover(inputs, config.output_dir)
    index = Index(config.output_dir)
    summary = Summary(total=len(items), index=index.path)
    todo = []
    for item in items:
        if finished_before(index, config, item):
            summary.skipped += 1
        else:
            todo.append(item)
    # Largest first: a long file started last would run alone at the end.
    todo.sort(key=lambda item: (-item.size, item.id))

    if ray:
        from .ray_pool import RayPool

        if not config.threads:
            config = dataclasses.replace(config, threads=1)
        pool = RayPool(config, workers, retries, gpus_per_worker, ray_address)
        summary.workers = pool.workers
    else:
        from .local import LocalPool

        count = max(1, workers or 1)
        if not config.threads:
            config = dataclasses.replace(config, threads=default_threads(count))
        pool = LocalPool(config, count, retries)
        summary.workers = count

    total_bytes = sum(max(0, item.size) for item in todo) or 1
    done_bytes = 0
    start = time.monotonic()
    bar = tqdm(total=len(todo), unit="file", disable=not progress or not todo, file=sys.stderr,
               dynamic_ncols=True, smoothing=0)

    def on_record(item: Item, record: dict) -> None:
        nonlocal done_bytes
        record = {
            **record,
            "path": item.path,
            "stem": item.stem,
            "size": item.size,
            "mtime_ns": item.mtime_ns,
            "fingerprint": fingerprint(config, item),
            "attempts": item.attempts + 1,
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
        }
        record.setdefault("outputs", [])
        index.append(record)
        status = record.get("status")
        if status in DONE:
            # The outputs are written and recorded: the saved progress has served.
            with contextlib.suppress(OSError):
                os.remove(config.state_path(item))
        if status == "ok":
            summary.ok += 1
        elif status == "no-speech":
            summary.no_speech += 1
        else:
            summary.failed += 1
            if report is not None:
                error = str(record.get("error"))
                report(error if error.startswith(item.path) else f"{item.path}: {error}")
        summary.audio_seconds += record.get("duration") or 0.0
        done_bytes += max(0, item.size)
        elapsed = time.monotonic() - start
        speed = summary.audio_seconds / elapsed if elapsed else 0.0
        left = elapsed * (total_bytes - done_bytes) / done_bytes if done_bytes else 0.0
        bar.set_postfix_str(
            f"audio {_clock(summary.audio_seconds)}, {speed:.1f}x real time, "
            f"ETA {_clock(left)}", refresh=False,
        )
        bar.update(1)

    try:
        if todo:
            pool.run(todo, on_record, on_start)
    finally:
        bar.close()
        summary.wall_seconds = time.monotonic() - start
        index.compact()
    return summary
