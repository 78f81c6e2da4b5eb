"""`susurrus export`: write a loaded model as an OpenAI Whisper `.pt` checkpoint.

The file has the layout of the official checkpoints, {"dims": {...}, "model_state_dict":
{...}}, in float16 by default as they are, so `whisper.load_model(path)` of the reference
package reads it as is. It also holds "alignment_heads", a dense bool (n_text_layer,
n_text_head) mask: the reference keeps its masks in code (base85 + gzip, keyed by model
name) and ignores the extra key, while susurrus reads it back so a model loaded from the
file times words with the same heads. Only tensors, ints and strings go in, so
`torch.load(path, weights_only=True)` reads it without running pickle code.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from .errors import SusurrusError
from .model import Whisper
from .quantize import is_quantized

DTYPES = {"float16": torch.float16, "float32": torch.float32}


def export_openai_checkpoint(
    model: Whisper, path: str | os.PathLike, dtype: torch.dtype = torch.float16
) -> Path:
    """Save `model` to `path` as an OpenAI `.pt` checkpoint; returns the path written."""
    if is_quantized(model):
        raise SusurrusError("an int8 model cannot be exported: load it with a float compute type")
    path = Path(path)
    state = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu")
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
        # clone: a view would drag its whole underlying storage into the file.
        state[name] = tensor.clone(memory_format=torch.contiguous_format)
    checkpoint = {
        "dims": asdict(model.dims),
        "model_state_dict": state,
        "alignment_heads": model.alignment_heads.detach().to("cpu").to_dense().clone(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target then rename, so an interrupted export leaves no torn file.
    partial = path.with_name(path.name + ".partial")
    try:
        torch.save(checkpoint, partial)
        os.replace(partial, path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise SusurrusError(f"{path}: cannot write checkpoint ({exc.strerror})") from None
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="susurrus export",
        description="Write a model as an OpenAI Whisper .pt checkpoint "
        "(loadable by whisper.load_model and by susurrus).",
    )
    parser.add_argument("model", help="model name (e.g. tiny.en, base) or path to load")
    parser.add_argument("output", help="checkpoint file to write, e.g. base.pt")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="float16",
        help="weight precision in the file (the official checkpoints are float16)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """`susurrus export MODEL OUTPUT.pt [--dtype float16|float32]`; returns the exit status."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from .load import load_model

    try:
        model = load_model(args.model, device="cpu")
        path = export_openai_checkpoint(model, args.output, DTYPES[args.dtype])
    except SusurrusError as exc:
        print(f"susurrus: error: {exc}", file=sys.stderr, flush=True)
        return 2
    size_mb = path.stat().st_size / 1e6
    print(f"wrote {path} ({args.dtype}, {size_mb:.1f} MB)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
