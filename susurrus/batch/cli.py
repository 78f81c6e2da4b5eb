"""`susurrus batch INPUTS... -o OUT_DIR`: the main command's options, plus the workers."""

from __future__ import annotations

import argparse
import os

from ..errors import SusurrusError
from .worker import WorkerConfig


def build_parser() -> argparse.ArgumentParser:
    from ..cli import build_parser as main_parser

    parser = main_parser()
    parser.prog = "susurrus batch"
    parser.description = (
        "Transcribe an archive: files, folders (searched recursively for media) and manifests "
        "(CSV, TSV or JSONL with a path column and an optional language column). Outputs "
        "mirror the input tree under --output_dir, with index.jsonl; a rerun skips what is "
        "done and continues the rest. Every option of the main command applies."
    )
    for action in parser._actions:
        if action.dest == "audio":
            action.help = "files, folders and manifests (.csv, .tsv, .jsonl) to transcribe"
        elif action.dest == "batch_size":
            action.help = "files decoded side by side on each worker's engine"
        elif action.dest == "threads":
            action.help = "torch threads per worker; 0: the cores / --workers here, 1 per Ray actor"
        elif action.dest == "resume":
            action.help = argparse.SUPPRESS  # always on: progress is saved per window
        elif action.dest == "verbose":
            action.help = argparse.SUPPRESS  # one progress bar over the whole archive
    g = parser.add_argument_group("workers")
    g.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes (or Ray actors), each with one model (default: 1 here; with "
        "--ray, as many as the cluster's CPUs (or GPUs) allow)",
    )
    g.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run the workers as Ray actors: a local Ray cluster, or the one at ADDRESS "
        "('auto', 'ray://HOST:10001'); needs susurrus[ray]",
    )
    g.add_argument(
        "--gpus-per-worker",
        "--gpus_per_worker",
        dest="gpus_per_worker",
        type=float,
        default=0,
        help="GPUs each Ray actor reserves (fractions share a GPU)",
    )
    g.add_argument(
        "--retries",
        type=int,
        default=2,
        help="times a file whose worker died is tried again on another before it is "
        "recorded as failed",
    )
    return parser


def make_config(argv: list[str]) -> tuple[list[str], WorkerConfig, dict]:
    """The command line as (inputs, the workers' configuration, the run's own options:
    workers, ray, gpus_per_worker, retries). Usage errors exit through argparse; wrong
    values raise SusurrusError or ValueError."""
    from ..cli import parse_request
    from ..options import TranscribeOptions

    parser = build_parser()
    request = parse_request(parser, argv)
    extra = {name: request["options"].pop(name)
             for name in ("workers", "ray", "gpus_per_worker", "retries")}
    if extra["workers"] is not None and extra["workers"] < 1:
        raise SusurrusError(f"--workers must be at least 1, got {extra['workers']}")
    if extra["retries"] < 0:
        raise SusurrusError(f"--retries must be 0 or more, got {extra['retries']}")
    if extra["gpus_per_worker"] < 0:
        raise SusurrusError("--gpus-per-worker must be 0 or more")
    # Files side by side are the batch here; each file is decoded as it would be alone.
    options = TranscribeOptions.create(batch_size=None, **request["options"])
    config = WorkerConfig(
        output_dir=os.path.abspath(request["output_dir"]),
        model=request["model"],
        model_dir=request["model_dir"],
        device=request["device"],
        compute_type=request["compute_type"],
        threads=_worker_threads(request["threads"]),
        options=options,
        batch_size=request["batch_size"] or 1,
        output_format=request["output_format"],
        writer_options=tuple(sorted(request["writer_options"].items())),
        audio_stream=request["audio_stream"],
    )
    return request["audio"], config, extra


def main(argv: list[str]) -> int:
    from ..cli import _error, _stderr
    from .runner import run_batch

    try:
        inputs, config, extra = make_config(argv)
        summary = run_batch(
            inputs,
            config,
            workers=extra["workers"],
            ray=extra["ray"] is not None,
            ray_address=extra["ray"] or None,
            gpus_per_worker=extra["gpus_per_worker"],
            retries=extra["retries"],
            report=lambda line: _error(line),
        )
    except (SusurrusError, ValueError) as exc:
        _error(str(exc))
        return 2
    except KeyboardInterrupt:
        _error("interrupted; run the same command again to continue where it stopped")
        return 130
    _stderr(f"susurrus batch: {summary.line()}")
    return summary.exit_status


def _worker_threads(threads: int | str | None) -> int:
    # Each worker has its cores: a per-step thread measure (auto) has nothing to choose.
    if threads == "auto":
        raise SusurrusError("--threads auto is for one process; give batch a number per worker")
    return threads or 0
