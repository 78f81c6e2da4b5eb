"""Hugging Face (transformers) Whisper checkpoints, loaded as they are: no conversion step.

A transformers model directory holds `config.json` (a WhisperConfig), the weights as
`model.safetensors`, as shards listed in `model.safetensors.index.json`, or as
`pytorch_model.bin`, and optionally `generation_config.json` with the alignment heads.
A hub repository id ("owner/name") is downloaded with `huggingface_hub` when it is installed.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from .errors import SusurrusError
from .model import ModelDimensions, Whisper, sinusoids

# In order of preference: safetensors is read lazily and runs no pickle code at all.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

# Per-block names: transformers -> ours (the inverse of transformers' OpenAI converter).
_BLOCK = {
    "self_attn.q_proj": "attn.query",
    "self_attn.k_proj": "attn.key",
    "self_attn.v_proj": "attn.value",
    "self_attn.out_proj": "attn.out",
    "self_attn_layer_norm": "attn_ln",
    "encoder_attn.q_proj": "cross_attn.query",
    "encoder_attn.k_proj": "cross_attn.key",
    "encoder_attn.v_proj": "cross_attn.value",
    "encoder_attn.out_proj": "cross_attn.out",
    "encoder_attn_layer_norm": "cross_attn_ln",
    "fc1": "mlp.0",
    "fc2": "mlp.2",
    "final_layer_norm": "mlp_ln",
}
_BLOCK_INVERSE = {ours: theirs for theirs, ours in _BLOCK.items()}

# Whole-model names: ours -> transformers (prefix "model." dropped).
_TOP = {
    "encoder.conv1": "encoder.conv1",
    "encoder.conv2": "encoder.conv2",
    "encoder.ln_post": "encoder.layer_norm",
    "decoder.token_embedding": "decoder.embed_tokens",
    "decoder.ln": "decoder.layer_norm",
    # Our positional embeddings are bare tensors; theirs are nn.Embedding weights.
    "encoder.positional_embedding": "encoder.embed_positions.weight",
    "decoder.positional_embedding": "decoder.embed_positions.weight",
}

_CONFIG_DIMS = {
    "n_mels": "num_mel_bins",
    "n_audio_ctx": "max_source_positions",
    "n_audio_state": "d_model",
    "n_audio_head": "encoder_attention_heads",
    "n_audio_layer": "encoder_layers",
    "n_vocab": "vocab_size",
    "n_text_ctx": "max_target_positions",
    "n_text_state": "d_model",
    "n_text_head": "decoder_attention_heads",
    "n_text_layer": "decoder_layers",
}

# Hub repository names: letters, digits, "-", "_", "." (https://huggingface.co/docs/hub).
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")


def hf_name(name: str) -> str:
    """The transformers name (without "model.") of one of our parameter names."""
    match = re.fullmatch(r"(encoder|decoder)\.blocks\.(\d+)\.(.+)\.(weight|bias)", name)
    if match:
        stack, index, part, kind = match.groups()
        return f"{stack}.layers.{index}.{_BLOCK_INVERSE[part]}.{kind}"
    if name in _TOP:
        return _TOP[name]
    module, kind = name.rsplit(".", 1)
    return f"{_TOP[module]}.{kind}"


def is_hf_dir(directory: Path) -> bool:
    """Whether `directory` looks like a transformers checkpoint (it may still be incomplete)."""
    return any((directory / name).is_file() for name in WEIGHT_FILES) or (
        (directory / "config.json").is_file() and "d_model" in _read_json_quiet(directory)
    )


def _read_json_quiet(directory: Path) -> dict:
    try:
        return json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SusurrusError(f"{path}: cannot read ({exc.strerror})") from None
    except ValueError as exc:
        raise SusurrusError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise SusurrusError(f"{path}: expected a JSON object")
    return data


def dims_from_config(config: dict, source: str) -> ModelDimensions:
    """Model dimensions from a transformers WhisperConfig dictionary."""
    if config.get("model_type", "whisper") != "whisper":
        raise SusurrusError(f"{source}: a {config['model_type']!r} model, not a Whisper model")
    # The module we build can only be a standard Whisper: reject variants it would misrun.
    if config.get("activation_function", "gelu") != "gelu" or config.get("scale_embedding"):
        raise SusurrusError(
            f"{source}: unsupported Whisper variant (activation "
            f"{config.get('activation_function')!r}, scale_embedding "
            f"{config.get('scale_embedding')!r})"
        )
    values = {}
    for field, key in _CONFIG_DIMS.items():
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise SusurrusError(f"{source}: {key!r} is missing or not a positive integer")
        values[field] = value
    return ModelDimensions(**values)


def _weight_files(directory: Path) -> list[Path]:
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        weight_map = _read_json(path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise SusurrusError(f"{path}: no weight_map of tensor names to shard files")
        shards = [directory / shard for shard in dict.fromkeys(weight_map.values())]
        for shard in shards:
            if not shard.is_file():
                raise SusurrusError(f"{directory}: shard {shard.name} listed in {name} is missing")
        return shards
    raise SusurrusError(
        f"{directory}: no model weights found (expected {' or '.join(WEIGHT_FILES[::2])})"
    )


def _read_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of one weights file, one tensor in memory at a time for safetensors."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
            return
        try:
            # mmap avoids a second full copy of a large checkpoint in memory.
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except ImportError:
        raise SusurrusError(
            f"{path}: reading safetensors needs the safetensors package: pip install safetensors"
        ) from None
    except pickle.UnpicklingError:
        # torch's own message is a paragraph about weights_only; this is what it means here.
        raise SusurrusError(
            f"{path}: unreadable weights file (corrupt, or it holds objects other than tensors)"
        ) from None
    except Exception as exc:  # each reader raises its own types for a bad file
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise SusurrusError(f"{path}: unreadable weights file ({reason})") from None
    if not isinstance(state, dict):
        raise SusurrusError(f"{path}: not a state dict of named tensors")
    yield from state.items()


def _read_state(directory: Path, dims: ModelDimensions) -> dict[str, torch.Tensor]:
    """Our state dict from the directory's weights, every tensor checked against `dims`."""
    with torch.device("meta"):
        expected = Whisper(dims).state_dict()
    ours_by_hf = {hf_name(name): name for name in expected}
    state: dict[str, torch.Tensor] = {}
    tied: tuple[str, torch.Tensor] | None = None
    for path in _weight_files(directory):
        for name, tensor in _read_tensors(path):
            # WhisperForConditionalGeneration prefixes "model."; WhisperModel does not.
            short = name.removeprefix("model.")
            if short == "proj_out.weight":
                tied = (name, tensor)
                continue
            ours = ours_by_hf.get(short)
            if ours is None or not isinstance(tensor, torch.Tensor):
                raise SusurrusError(f"{directory}: unexpected tensor {name!r} in {path.name}")
            if tensor.shape != expected[ours].shape:
                raise SusurrusError(
                    f"{directory}: tensor {name!r} has shape {tuple(tensor.shape)}, but "
                    f"config.json implies {tuple(expected[ours].shape)}"
                )
            if not tensor.is_floating_point():
                raise SusurrusError(f"{directory}: tensor {name!r} is {tensor.dtype}, not float")
            state[ours] = tensor.float()
    # Missing in some exports: it is the fixed sinusoidal table in every Whisper.
    if "encoder.positional_embedding" not in state:
        state["encoder.positional_embedding"] = sinusoids(dims.n_audio_ctx, dims.n_audio_state)
    missing = [name for name in expected if name not in state]
    if missing:
        raise SusurrusError(
            f"{directory}: tensor 'model.{hf_name(missing[0])}' is missing"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    # Our output projection is the token embedding itself, so a separate one must equal it.
    if tied is not None:
        embedding = state["decoder.token_embedding.weight"]
        if tied[1].shape != embedding.shape or not torch.equal(tied[1].float(), embedding):
            raise SusurrusError(
                f"{directory}: {tied[0]!r} differs from the token embedding; untied output "
                "projections are not supported"
            )
    return state


def _alignment_heads(directory: Path, dims: ModelDimensions) -> list[list[int]] | None:
    path = directory / "generation_config.json"
    if not path.is_file():
        return None
    heads = _read_json(path).get("alignment_heads")
    if not heads:
        return None
    try:
        pairs = [[int(layer), int(head)] for layer, head in heads]
    except (TypeError, ValueError):
        raise SusurrusError(f"{path}: alignment_heads must be a list of [layer, head]") from None
    # Distilled checkpoints often ship their teacher's list, naming layers they no longer have.
    if not all(0 <= la < dims.n_text_layer and 0 <= h < dims.n_text_head for la, h in pairs):
        return None
    return pairs


def load_hf_dir(directory: str | os.PathLike) -> Whisper:
    """A transformers Whisper checkpoint directory, on the CPU in float32."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise SusurrusError(f"{directory}: no config.json (a transformers WhisperConfig) found")
    dims = dims_from_config(_read_json(directory / "config.json"), str(directory / "config.json"))
    state = _read_state(directory, dims)
    with torch.device("meta"):
        model = Whisper(dims)
    model.load_state_dict(state, strict=True, assign=True)
    heads = _alignment_heads(directory, dims)
    model.set_alignment_heads(heads if heads is not None else model.default_alignment_heads())
    return model


def looks_like_repo_id(name: str) -> bool:
    """Whether `name` has the form of a hub repository id, "owner/name"."""
    return (
        bool(_REPO_ID.fullmatch(name))
        and ".." not in name
        and not name.endswith((".pt", ".bin", ".safetensors"))
    )


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


# Safetensors first; older fine-tunes have only pickled weights, fetched only then.
_SAFETENSORS = ["model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]
_PICKLES = ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"]


# The CTranslate2 layout (Systran/faster-whisper-*): model.bin beside config.json.
_CT2 = ["model.bin"]


def download_repo(repo_id: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local snapshot directory of a hub repository, downloaded when not cached.

    `repo_id` is "owner/name", or "owner/name@revision" for a branch, tag or commit. Either
    layout is fetched: transformers (config.json + safetensors, else pickled weights) or
    CTranslate2 (config.json + model.bin). The endpoint is huggingface_hub's (HF_ENDPOINT),
    and with HF_HUB_OFFLINE=1 only its cache is used.
    """
    repo_id, _, revision = repo_id.partition("@")
    advice = "or pass the path of a local model directory instead"
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise SusurrusError(
            f"{repo_id!r} is not a local path, and huggingface_hub is not installed to fetch "
            f"it from the Hugging Face hub: pip install huggingface_hub, {advice}"
        ) from None
    # Read at call time: huggingface_hub itself reads HF_HUB_OFFLINE only once, at import.
    offline = _env_flag("HF_HUB_OFFLINE")

    def fetch(patterns: list[str]) -> Path:
        return Path(
            snapshot_download(
                repo_id,
                cache_dir=None if cache_dir is None else str(cache_dir),
                revision=revision or None,
                allow_patterns=["config.json", "generation_config.json", *patterns],
                local_files_only=offline,
                etag_timeout=10,
            )
        )

    try:
        path = fetch(_SAFETENSORS + _CT2)
        if not any((path / name).is_file() for name in (*WEIGHT_FILES, *_CT2)):
            path = fetch(_PICKLES)
    except Exception as exc:  # network, authentication and not-found errors alike
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        where = (
            "HF_HUB_OFFLINE is set and it is not in the local cache"
            if offline
            else f"the Hugging Face hub could not be reached or refused it ({reason})"
        )
        raise SusurrusError(f"{repo_id!r} is not a local path, and {where}; {advice}") from None
    return path
