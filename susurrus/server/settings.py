"""Server settings: command-line flags, each with a `SUSURRUS_*` environment variable."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..errors import SusurrusError


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    # The model `whisper-1` and requests without a model get.
    model: str = "base"
    # Extra models by name, each a directory on the server: {"name": "/srv/models/x"}.
    model_dirs: dict[str, str] = field(default_factory=dict)
    compute_type: str = "default"
    device: str | None = None
    download_root: str | None = None
    api_key: str | None = None
    max_upload_mb: float = 500.0
    max_batch: int = 8
    # Requests waiting beyond the ones decoding; one more answers 429.
    max_queue: int = 64
    # Seconds a model may stay idle before it is unloaded; 0 keeps models loaded.
    model_ttl: float = 300.0
    # Whether Hugging Face repo ids may be requested (the server then downloads them).
    allow_hub: bool = True
    # Seconds SIGTERM waits for running sessions before cancelling them.
    shutdown_timeout: float = 30.0
    upload_dir: str | None = None

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def max_sessions(self) -> int:
        return self.max_batch + self.max_queue

    def check(self) -> Settings:
        if not 0 <= self.port <= 65535:
            raise SusurrusError(f"--port must be 0 to 65535, got {self.port}")
        if self.max_batch < 1:
            raise SusurrusError(f"--max-batch must be at least 1, got {self.max_batch}")
        if self.max_queue < 0:
            raise SusurrusError(f"--max-queue cannot be negative, got {self.max_queue}")
        if not self.max_upload_mb > 0:
            raise SusurrusError(f"--max-upload-mb must be positive, got {self.max_upload_mb}")
        if self.model_ttl < 0:
            raise SusurrusError(f"--model-ttl cannot be negative, got {self.model_ttl}")
        for name, directory in self.model_dirs.items():
            if not Path(directory).is_dir():
                raise SusurrusError(f"model {name!r}: {directory} is not a directory")
        if self.model not in self.model_dirs:
            # Refused here, with the reason, rather than served as a default that every
            # request then fails to load.
            from ..download import available_models
            from ..load import EMBEDDED

            # A repo id given here is configured (--no-hub limits what clients may ask for).
            if not is_repo_id(self.model) and self.model not in {*EMBEDDED, *available_models()}:
                raise SusurrusError(
                    f"unknown model {self.model!r}: a registry name "
                    f"({', '.join(available_models())}), a model directory, NAME=DIRECTORY"
                    " or a Hugging Face repo id (ORG/NAME)"
                )
        if self.api_key == "":
            self.api_key = None
        return self


def is_repo_id(name: str) -> bool:
    """A Hugging Face repo id, with an optional @revision."""
    from ..hf import looks_like_repo_id

    base, _, revision = name.partition("@")
    return looks_like_repo_id(base) and (
        not revision
        or revision.replace("-", "").replace("_", "").replace(".", "").replace("/", "").isalnum()
    )



def _env(name: str) -> str | None:
    value = os.environ.get(f"SUSURRUS_{name.upper()}")
    return value if value not in (None, "") else None


def _env_bool(name: str, default: bool) -> bool:
    value = _env(name)
    if value is None:
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


def _model_spec(text: str) -> tuple[str, str | None]:
    """`NAME=DIR` names a model directory; a directory alone is named after itself."""
    if "=" in text:
        name, directory = text.split("=", 1)
        return name.strip(), directory.strip()
    if os.sep in text and Path(text).is_dir():
        return Path(text).resolve().name, text
    return text, None


def parse_args(argv: list[str]) -> Settings:
    """Settings from `susurrus serve` flags, falling back on SUSURRUS_* variables."""
    from ..compute_types import COMPUTE_TYPES

    d = Settings()
    parser = argparse.ArgumentParser(
        prog="susurrus serve",
        description="An OpenAI-compatible transcription server (POST /v1/audio/transcriptions) "
        "with a web page at /. Every flag also reads SUSURRUS_<FLAG> (e.g. SUSURRUS_API_KEY).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--host", default=_env("host") or d.host)
    parser.add_argument("--port", type=int, default=int(_env("port") or d.port))
    parser.add_argument(
        "--model",
        action="append",
        default=None,
        help="models to serve: a registry name, a Hugging Face repo id, NAME=DIRECTORY or a "
        "model directory; the first is the default (what `whisper-1` means). Repeatable; "
        f"$SUSURRUS_MODEL takes a comma-separated list (default: {d.model})",
    )
    parser.add_argument(
        "--model_dir",
        "--model-dir",
        dest="download_root",
        default=_env("model_dir"),
        help="cache of downloaded checkpoints",
    )
    parser.add_argument("--device", default=_env("device"))
    parser.add_argument(
        "--compute_type",
        "--compute-type",
        default=_env("compute_type") or d.compute_type,
        choices=COMPUTE_TYPES,
    )
    parser.add_argument(
        "--api-key",
        "--api_key",
        # Read after parsing: a default would print the key in --help.
        default=None,
        help="require `Authorization: Bearer KEY` on the API (or $SUSURRUS_API_KEY)",
    )
    parser.add_argument(
        "--max-upload-mb",
        "--max_upload_mb",
        type=float,
        default=float(_env("max_upload_mb") or d.max_upload_mb),
    )
    parser.add_argument(
        "--max-batch",
        "--max_batch",
        type=int,
        default=int(_env("max_batch") or d.max_batch),
        help="windows the engine decodes together",
    )
    parser.add_argument(
        "--max-queue",
        "--max_queue",
        type=int,
        default=int(_env("max_queue") or d.max_queue),
        help="requests that may wait beyond --max-batch; more get 429",
    )
    parser.add_argument(
        "--model-ttl",
        "--model_ttl",
        type=float,
        default=float(_env("model_ttl") or d.model_ttl),
        help="seconds before an idle model is unloaded (0: never)",
    )
    parser.add_argument(
        "--no-hub",
        dest="allow_hub",
        action="store_false",
        default=_env_bool("allow_hub", d.allow_hub),
        help="refuse Hugging Face repo ids that are not configured",
    )
    parser.add_argument(
        "--shutdown-timeout",
        "--shutdown_timeout",
        type=float,
        default=float(_env("shutdown_timeout") or d.shutdown_timeout),
        help="seconds SIGTERM lets running requests finish",
    )
    parser.add_argument(
        "--upload-dir",
        "--upload_dir",
        default=_env("upload_dir"),
        help="where uploads are kept while decoded (default: the temp dir)",
    )
    args = parser.parse_args(argv)

    specs = args.model or (_env("model") or d.model).split(",")
    default = None
    model_dirs: dict[str, str] = {}
    for text in specs:
        name, directory = _model_spec(text.strip())
        if directory is not None:
            model_dirs[name] = directory
        default = default or name
    values = {f.name: getattr(args, f.name) for f in fields(Settings) if hasattr(args, f.name)}
    values.update(model=default, model_dirs=model_dirs, api_key=args.api_key or _env("api_key"))
    return Settings(**values).check()
