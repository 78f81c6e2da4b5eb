"""Reader for CTranslate2 Whisper model directories (`model.bin` + `config.json`).

The embedded PyPI models come in this format. `model.bin` (format version 6) is a header,
then named tensors, then aliases; we map its variables onto our module's parameter names.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import torch

from .errors import SusurrusError
from .model import ModelDimensions

_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


class _Reader:
    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise EOFError
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def uint(self, fmt: str) -> int:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return bytes(self.take(self.uint("<H"))).rstrip(b"\0").decode("utf-8")


def read_model_bin(data: bytes | memoryview, source: str = "model.bin") -> dict[str, np.ndarray]:
    """Parse a CTranslate2 `model.bin` into {variable name: array}; aliases resolved.

    Arrays are views into `data` (no copy). Truncated or malformed data raises SusurrusError.
    """
    reader = _Reader(memoryview(data))
    try:
        version = reader.uint("<I")
        if version < 6:
            raise SusurrusError(f"{source}: CTranslate2 model format {version} is not supported")
        spec = reader.string()
        reader.uint("<I")  # spec revision
        if spec != "WhisperSpec":
            raise SusurrusError(f"{source}: a {spec or 'unknown'} model, not a Whisper model")
        variables: dict[str, np.ndarray] = {}
        for _ in range(reader.uint("<I")):
            name = reader.string()
            rank = reader.uint("<B")
            shape = struct.unpack(f"<{rank}I", reader.take(4 * rank))
            dtype = _DTYPES.get(reader.uint("<B"))
            n_bytes = reader.uint("<I")
            if dtype is None:
                raise SusurrusError(f"{source}: variable {name} has an unknown data type")
            raw = reader.take(n_bytes)
            variables[name] = np.frombuffer(raw, dtype=dtype).reshape(shape)
        for _ in range(reader.uint("<I")):
            alias, target = reader.string(), reader.string()
            variables[alias] = variables[target]
    except (EOFError, ValueError, UnicodeDecodeError, struct.error) as exc:
        raise SusurrusError(
            f"{source}: truncated or corrupt model file ({exc or 'ends early'})"
        ) from None
    return variables


def _layer_count(variables: dict[str, np.ndarray], stack: str) -> int:
    layers = {int(m.group(1)) for k in variables if (m := re.match(rf"{stack}/layer_(\d+)/", k))}
    return len(layers)


def to_state_dict(
    variables: dict[str, np.ndarray], native: bool = False
) -> tuple[ModelDimensions, dict[str, torch.Tensor]]:
    """Map CTranslate2 Whisper variables onto this package's Whisper parameter names.

    Tensors are float32 copies, or with `native` the stored type (float16), sharing the
    buffer's memory where it is writable: quantizing to int8 then never holds a float32 copy.
    """
    if any(k.endswith("weight_scale") for k in variables):
        raise SusurrusError(
            "int8-quantized CTranslate2 models are not supported; use a float model"
        )

    def t(name: str) -> torch.Tensor:
        array = variables[name]
        if native and array.flags.writeable:
            return torch.from_numpy(array)
        return torch.from_numpy(np.array(array, dtype=array.dtype if native else np.float32))

    def scalar(name: str) -> int:
        return int(np.asarray(variables[name]).reshape(-1)[0])

    state: dict[str, torch.Tensor] = {}

    def linear(dst: str, src: str, chunks: int = 1, parts: tuple[str, ...] = ("",)) -> None:
        weights = t(f"{src}/weight").chunk(chunks)
        biases = t(f"{src}/bias").chunk(chunks) if f"{src}/bias" in variables else None
        for i, part in enumerate(parts):
            state[f"{dst}{part}.weight"] = weights[i]
            # Keys have no bias in Whisper: CTranslate2 stores zeros there, which we drop.
            if biases is not None and part != "key":
                state[f"{dst}{part}.bias"] = biases[i]

    def layer_norm(dst: str, src: str) -> None:
        state[f"{dst}.weight"] = t(f"{src}/gamma")
        state[f"{dst}.bias"] = t(f"{src}/beta")

    def attention_block(dst: str, src: str, cross: bool) -> None:
        layer_norm(f"{dst}.attn_ln", f"{src}/self_attention/layer_norm")
        linear(f"{dst}.attn.", f"{src}/self_attention/linear_0", 3, ("query", "key", "value"))
        linear(f"{dst}.attn.out", f"{src}/self_attention/linear_1")
        if cross:
            layer_norm(f"{dst}.cross_attn_ln", f"{src}/attention/layer_norm")
            linear(f"{dst}.cross_attn.query", f"{src}/attention/linear_0")
            linear(f"{dst}.cross_attn.", f"{src}/attention/linear_1", 2, ("key", "value"))
            linear(f"{dst}.cross_attn.out", f"{src}/attention/linear_2")
        layer_norm(f"{dst}.mlp_ln", f"{src}/ffn/layer_norm")
        linear(f"{dst}.mlp.0", f"{src}/ffn/linear_0")
        linear(f"{dst}.mlp.2", f"{src}/ffn/linear_1")

    try:
        n_audio_layer = _layer_count(variables, "encoder")
        n_text_layer = _layer_count(variables, "decoder")
        for conv in ("conv1", "conv2"):
            state[f"encoder.{conv}.weight"] = t(f"encoder/{conv}/weight")
            state[f"encoder.{conv}.bias"] = t(f"encoder/{conv}/bias")
        state["encoder.positional_embedding"] = t("encoder/position_encodings/encodings")
        for i in range(n_audio_layer):
            attention_block(f"encoder.blocks.{i}", f"encoder/layer_{i}", cross=False)
        layer_norm("encoder.ln_post", "encoder/layer_norm")
        state["decoder.token_embedding.weight"] = t("decoder/embeddings/weight")
        state["decoder.positional_embedding"] = t("decoder/position_encodings/encodings")
        for i in range(n_text_layer):
            attention_block(f"decoder.blocks.{i}", f"decoder/layer_{i}", cross=True)
        layer_norm("decoder.ln", "decoder/layer_norm")
        dims = ModelDimensions(
            n_mels=state["encoder.conv1.weight"].shape[1],
            n_audio_ctx=state["encoder.positional_embedding"].shape[0],
            n_audio_state=state["encoder.positional_embedding"].shape[1],
            n_audio_head=scalar("encoder/num_heads"),
            n_audio_layer=n_audio_layer,
            n_vocab=state["decoder.token_embedding.weight"].shape[0],
            n_text_ctx=state["decoder.positional_embedding"].shape[0],
            n_text_state=state["decoder.positional_embedding"].shape[1],
            n_text_head=scalar("decoder/num_heads"),
            n_text_layer=n_text_layer,
        )
    except KeyError as exc:
        raise SusurrusError(f"not a complete Whisper model: variable {exc} is missing") from None
    return dims, state


def read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SusurrusError(f"{path}: unreadable config ({exc})") from None
