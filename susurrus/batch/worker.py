"""One archive worker: a model loaded once and one engine, transcribing the items it is
handed and writing their outputs. The same class runs in a local worker process and in a
Ray actor."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from ..errors import SusurrusError
from ..options import TranscribeOptions
from .inputs import Item

log = logging.getLogger("susurrus")

FORMATS = ("txt", "vtt", "srt", "tsv", "json")


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker needs, picklable: sent once to each process or actor."""

    output_dir: str
    model: str = "base"
    model_dir: str | None = None
    device: str | None = None
    compute_type: str = "default"
    threads: int = 0
    options: TranscribeOptions = field(default_factory=TranscribeOptions)
    batch_size: int = 1  # files decoded side by side on the worker's engine
    output_format: str = "all"
    writer_options: tuple[tuple[str, object], ...] = ()
    audio_stream: int | None = None

    def formats(self) -> tuple[str, ...]:
        return FORMATS if self.output_format == "all" else (self.output_format,)

    def options_for(self, item: Item) -> TranscribeOptions:
        return self.options if item.language is None else self.options.with_language(item.language)

    def outputs(self, item: Item) -> list[str]:
        """The item's output files, relative to the output directory."""
        return [f"{item.stem}.{ext}" for ext in self.formats()]

    def state_path(self, item: Item) -> str:
        return os.path.join(self.output_dir, f"{item.stem}.resume.json")


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, (SusurrusError, OSError)):
        return text
    return f"{type(error).__name__}: {text}"


class Worker:
    """Loads the model once (threads set for this process) and transcribes items with
    `transcribe_many` on one engine, `config.batch_size` files side by side."""

    def __init__(self, config: WorkerConfig, name: str) -> None:
        import torch

        from ..engine import Engine
        from ..load import load_model
        from ..transcribe import _full_precision

        self.config = config
        self.name = f"{name}@{socket.gethostname()}:{os.getpid()}"
        if config.threads:
            # This process (or actor) is the worker's own: its thread count is ours to set.
            torch.set_num_threads(config.threads)
        if config.options.vad:
            from ..vad import ensure_available

            ensure_available()
        self.model = load_model(
            config.model,
            device=config.device,
            download_root=config.model_dir,
            compute_type=config.compute_type,
        )
        self.english_only = not self.model.is_multilingual
        self.model = _full_precision(self.model, config.options)
        self.engine = Engine(self.model, max_batch=config.batch_size)

    def _options(self, item: Item) -> TranscribeOptions:
        options = self.config.options_for(item)
        if self.english_only and options.language not in (None, "en"):
            options = options.with_language("en")
        return options

    def _state_path(self, item: Item) -> str:
        """Where the item's progress is saved; a saved state of another version of the file
        or of other options is removed (the index decided to transcribe it again)."""
        from ..transcribe import StateFile

        path = self.config.state_path(item)
        try:
            StateFile(path, item, self.model, self._options(item)).load()
        except SusurrusError as exc:
            log.info("starting over: %s", exc)
            with contextlib.suppress(OSError):
                os.remove(path)
        except OSError:
            pass  # the recording itself cannot be read: its session says so
        return path

    def process(self, items: Iterable[Item]) -> Iterator[dict]:
        """A record per item, as each finishes: status ok / no-speech / failed, with its
        error, duration, language, outputs, real-time factor and this worker's name."""
        from ..features import MelStream
        from ..transcribe import read_recording, transcribe_many
        from ..writers import get_writer

        config = self.config
        started: dict[int, float] = {}
        durations: dict[int, float] = {}

        def read(item: Item):
            started.setdefault(item.id, time.monotonic())
            audio = read_recording(
                item.path, self.model.dims.n_mels, stream=config.audio_stream,
                vad=config.options.vad,
            )
            durations[item.id] = (
                audio.duration if isinstance(audio, MelStream) else len(audio) / 16000
            )
            return audio

        results = transcribe_many(
            self.model,
            items,
            batch_size=config.batch_size,
            engine=self.engine,
            options=config.options,
            options_of=self._options,
            read=read,
            state_path=self._state_path,
        )
        writer_options = dict(config.writer_options)
        for item, result in results:
            record = {
                "id": item.id,
                "path": item.path,
                "duration": durations.get(item.id),
                "language": None,
                "status": "failed",
                "error": None,
                "outputs": [],
                "rtf": None,
                "worker": self.name,
            }
            try:
                if isinstance(result, BaseException):
                    raise result
                record["language"] = result.get("language")
                if not result["segments"] or not result["text"].strip():
                    result["no_speech"] = True  # an answer, not a failure (as the CLI)
                directory = os.path.join(config.output_dir, os.path.dirname(item.stem))
                writer = get_writer(config.output_format, directory)
                # The writers name files after the stem of the path they are given.
                writer(result, os.path.basename(item.stem) + ".media", writer_options)
                record["outputs"] = config.outputs(item)
                record["status"] = "no-speech" if result.get("no_speech") else "ok"
            except Exception as exc:
                record["error"] = one_line(exc)
            seconds = time.monotonic() - started.get(item.id, time.monotonic())
            if record["duration"]:
                record["rtf"] = round(seconds / record["duration"], 4)
            started.pop(item.id, None)
            durations.pop(item.id, None)
            yield record
