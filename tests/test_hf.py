"""Hugging Face (transformers) checkpoints, loaded without conversion.

The checkpoints are written here from the embedded `base` weights in the transformers layout.
The renaming below is written out independently of susurrus.hf, from transformers' own
OpenAI-to-transformers converter, so a wrong name on either side fails the round trip.
"""

from __future__ import annotations

import json
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from susurrus import (
    DecodingOptions,
    ModelDimensions,
    SusurrusError,
    Whisper,
    decode,
    load_audio,
    load_model,
    log_mel_spectrogram,
    pad_or_trim,
)
from susurrus.hf import looks_like_repo_id

from .conftest import AUDIO, requires_shared

# OpenAI name fragments -> transformers name fragments.
RENAMES = (
    ("encoder.positional_embedding", "encoder.embed_positions.weight"),
    ("decoder.positional_embedding", "decoder.embed_positions.weight"),
    ("decoder.token_embedding", "decoder.embed_tokens"),
    ("encoder.ln_post", "encoder.layer_norm"),
    ("decoder.ln.", "decoder.layer_norm."),
    (".blocks.", ".layers."),
    (".attn.query", ".self_attn.q_proj"),
    (".attn.key", ".self_attn.k_proj"),
    (".attn.value", ".self_attn.v_proj"),
    (".attn.out", ".self_attn.out_proj"),
    (".attn_ln", ".self_attn_layer_norm"),
    (".cross_attn.query", ".encoder_attn.q_proj"),
    (".cross_attn.key", ".encoder_attn.k_proj"),
    (".cross_attn.value", ".encoder_attn.v_proj"),
    (".cross_attn.out", ".encoder_attn.out_proj"),
    (".cross_attn_ln", ".encoder_attn_layer_norm"),
    (".mlp.0", ".fc1"),
    (".mlp.2", ".fc2"),
    (".mlp_ln", ".final_layer_norm"),
)


def to_hf(name: str) -> str:
    for ours, theirs in RENAMES:
        name = name.replace(ours, theirs)
    return "model." + name


def hf_config(dims: ModelDimensions) -> dict:
    """The fields of a transformers WhisperConfig that describe the network."""
    return {
        "architectures": ["WhisperForConditionalGeneration"],
        "model_type": "whisper",
        "activation_function": "gelu",
        "d_model": dims.n_audio_state,
        "encoder_layers": dims.n_audio_layer,
        "encoder_attention_heads": dims.n_audio_head,
        "encoder_ffn_dim": 4 * dims.n_audio_state,
        "decoder_layers": dims.n_text_layer,
        "decoder_attention_heads": dims.n_text_head,
        "decoder_ffn_dim": 4 * dims.n_text_state,
        "num_mel_bins": dims.n_mels,
        "max_source_positions": dims.n_audio_ctx,
        "max_target_positions": dims.n_text_ctx,
        "vocab_size": dims.n_vocab,
        "scale_embedding": False,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }


def hf_tensors(model: Whisper, text_layers: int | None = None) -> dict[str, torch.Tensor]:
    """The model's weights under transformers names; only the first `text_layers` layers."""
    tensors = {}
    for name, tensor in model.state_dict().items():
        if text_layers is not None and name.startswith("decoder.blocks."):
            if int(name.split(".")[2]) >= text_layers:
                continue
        # clone: fused CTranslate2 weights leave q/k/v as views of one buffer.
        tensors[to_hf(name)] = tensor.detach().clone().contiguous()
    return tensors


def write_checkpoint(
    directory: Path,
    model: Whisper,
    heads: list[list[int]] | None = None,
    text_layers: int | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    dims = model.dims
    if text_layers is not None:
        dims = ModelDimensions(**{**dims.__dict__, "n_text_layer": text_layers})
    (directory / "config.json").write_text(json.dumps(hf_config(dims)))
    generation = {"decoder_start_token_id": 50258}
    if heads is not None:
        generation["alignment_heads"] = heads
    (directory / "generation_config.json").write_text(json.dumps(generation))
    save_file(tensors or hf_tensors(model, text_layers), str(directory / "model.safetensors"))
    return directory


def heads_of(model: Whisper) -> list[list[int]]:
    return model.alignment_heads.nonzero().tolist()


@pytest.fixture(scope="module")
def base_hf_dir(base, tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("hf") / "whisper-base", base, heads_of(base))


@pytest.fixture(scope="module")
def base_hf(base_hf_dir) -> Whisper:
    return load_model(str(base_hf_dir), device="cpu")


@pytest.fixture(scope="module")
def tiny() -> Whisper:
    """A small random Whisper for the error cases: fast to write and read."""
    torch.manual_seed(0)
    dims = ModelDimensions(80, 8, 16, 2, 2, 64, 12, 16, 2, 3)
    model = Whisper(dims)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_()
    return model


def assert_same_weights(a: Whisper, b: Whisper) -> None:
    assert a.dims == b.dims
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name


def test_parameters_equal_the_ctranslate2_model(base, base_hf, base_hf_dir):
    assert_same_weights(base_hf, base)
    assert base_hf.name == str(base_hf_dir) and base_hf.dtype == torch.float32


@requires_shared
def test_transcript_equals_the_ctranslate2_model(base, base_hf):
    path = str(AUDIO / "jfk.flac")
    ours, original = (m.transcribe(path, temperature=0.0) for m in (base_hf, base))
    assert [s["tokens"] for s in ours["segments"]] == [s["tokens"] for s in original["segments"]]
    assert [s["text"] for s in ours["segments"]] == [s["text"] for s in original["segments"]]
    assert ours["text"] == original["text"] and "country" in ours["text"]


def test_alignment_heads_come_from_generation_config(base, base_hf):
    assert heads_of(base_hf) == heads_of(base)
    assert not torch.equal(base_hf.alignment_heads, base_hf.default_alignment_heads())


def test_alignment_heads_default_without_a_list(tiny, tmp_path):
    model = load_model(str(write_checkpoint(tmp_path, tiny)), device="cpu")
    assert torch.equal(model.alignment_heads, model.default_alignment_heads())
    assert_same_weights(model, tiny)


def test_distilled_checkpoint_with_two_decoder_layers(base, tmp_path):
    # Like distil-whisper, it keeps its teacher's alignment heads, naming missing layers.
    teacher_heads = heads_of(base)
    assert max(layer for layer, _ in teacher_heads) >= 2
    directory = write_checkpoint(tmp_path, base, teacher_heads, text_layers=2)
    model = load_model(str(directory), device="cpu")
    assert model.dims.n_text_layer == 2 and model.dims.n_audio_layer == 6
    assert torch.equal(model.alignment_heads, model.default_alignment_heads())
    for i in range(2):
        block, teacher = model.decoder.blocks[i], base.decoder.blocks[i]
        assert torch.equal(block.cross_attn.key.weight, teacher.cross_attn.key.weight)
    audio = load_audio(str(AUDIO / "jfk.flac")) if AUDIO.is_dir() else torch.zeros(16000)
    mel = log_mel_spectrogram(pad_or_trim(torch.as_tensor(audio)))
    result = decode(model, mel, DecodingOptions(language="en", sample_len=16, fp16=False))
    assert 0 < len(result.tokens) <= 16


def test_sharded_safetensors(tiny, tmp_path):
    tensors = hf_tensors(tiny)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2]}
    shards["model-00002-of-00002.safetensors"] = names[1::2]
    for file, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, str(tmp_path / file))
    weight_map = {n: file for file, shard_names in shards.items() for n in shard_names}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(hf_config(tiny.dims)))
    assert_same_weights(load_model(str(tmp_path), device="cpu"), tiny)

    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(SusurrusError, match="shard model-00002-of-00002.safetensors"):
        load_model(str(tmp_path), device="cpu")


def test_pytorch_model_bin_with_tied_output_projection(tiny, tmp_path):
    tensors = hf_tensors(tiny)
    tensors["proj_out.weight"] = tensors["model.decoder.embed_tokens.weight"]
    # Half precision, as many hub checkpoints are stored: read back as float32.
    torch.save({k: v.half() for k, v in tensors.items()}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(hf_config(tiny.dims)))
    model = load_model(str(tmp_path), device="cpu")
    assert model.dtype == torch.float32
    expected = tiny.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected[name].half().float()), name

    tensors["proj_out.weight"] = tensors["proj_out.weight"] + 1
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    with pytest.raises(SusurrusError, match="proj_out.weight' differs from the token embedding"):
        load_model(str(tmp_path), device="cpu")


def load_error(directory: Path) -> str:
    with pytest.raises(SusurrusError) as info:
        load_model(str(directory), device="cpu")
    message = str(info.value)
    assert "\n" not in message and str(directory) in message
    return message


def test_missing_weights_file(tiny, tmp_path):
    write_checkpoint(tmp_path, tiny).joinpath("model.safetensors").unlink()
    assert "no model weights found (expected model.safetensors" in load_error(tmp_path)


def test_missing_config(tiny, tmp_path):
    write_checkpoint(tmp_path, tiny).joinpath("config.json").unlink()
    assert "no config.json" in load_error(tmp_path)


def test_incomplete_config(tiny, tmp_path):
    write_checkpoint(tmp_path, tiny)
    config = hf_config(tiny.dims)
    del config["decoder_attention_heads"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert "'decoder_attention_heads' is missing" in load_error(tmp_path)


def test_tensor_with_the_wrong_shape(tiny, tmp_path):
    tensors = hf_tensors(tiny)
    name = "model.decoder.layers.1.fc1.weight"
    tensors[name] = tensors[name][:-1].clone()
    write_checkpoint(tmp_path, tiny, tensors=tensors)
    message = load_error(tmp_path)
    assert f"{name}' has shape (63, 16), but config.json implies (64, 16)" in message


def test_config_that_disagrees_with_the_tensors(tiny, tmp_path):
    write_checkpoint(tmp_path, tiny)
    (tmp_path / "config.json").write_text(json.dumps({**hf_config(tiny.dims), "d_model": 32}))
    assert "has shape" in load_error(tmp_path)


def test_missing_and_unexpected_tensors(tiny, tmp_path):
    tensors = hf_tensors(tiny)
    del tensors["model.decoder.layers.2.encoder_attn.v_proj.bias"]
    write_checkpoint(tmp_path, tiny, tensors=tensors)
    assert "'model.decoder.layers.2.encoder_attn.v_proj.bias' is missing" in load_error(tmp_path)

    tensors = hf_tensors(tiny)
    tensors["model.decoder.layers.3.fc1.weight"] = torch.zeros(64, 16)
    write_checkpoint(tmp_path, tiny, tensors=tensors)
    assert "unexpected tensor 'model.decoder.layers.3.fc1.weight'" in load_error(tmp_path)


def test_repo_id_names():
    for name in ("distil-whisper/distil-small.en", "openai/whisper-large-v3", "a/b_c.d-e"):
        assert looks_like_repo_id(name), name
    for name in ("base", "a/b/c", "/abs/dir", "./dir/x", "../x/y", "dir/model.pt", "a/b.bin"):
        assert not looks_like_repo_id(name), name


def test_repo_id_offline_fails_fast_and_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(SusurrusError) as info:
        load_model("distil-whisper/distil-small.en", device="cpu")
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert "\n" not in message and "'distil-whisper/distil-small.en' is not a local path" in message
    assert "pass the path of a local model directory" in message
    assert "huggingface_hub is not installed" in message or "HF_HUB_OFFLINE is set" in message


def fake_hub(monkeypatch, snapshot_download) -> list[dict]:
    """Stand in for huggingface_hub, which is not installed (and the hub is unreachable)."""
    calls: list[dict] = []

    def recorded(repo_id: str, **kwargs):
        calls.append({"repo_id": repo_id, **kwargs})
        return snapshot_download(repo_id, **kwargs)

    module = types.ModuleType("huggingface_hub")
    module.snapshot_download = recorded
    monkeypatch.setitem(sys.modules, "huggingface_hub", module)
    return calls


def test_repo_id_offline_with_huggingface_hub(monkeypatch):
    def not_cached(repo_id, **kwargs):
        raise FileNotFoundError("Cannot find an appropriate cached snapshot folder")

    calls = fake_hub(monkeypatch, not_cached)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SusurrusError, match="HF_HUB_OFFLINE is set and it is not in the local"):
        load_model("distil-whisper/distil-small.en", device="cpu")
    assert calls[0]["local_files_only"] is True


def test_repo_id_unreachable_hub(monkeypatch):
    def unreachable(repo_id, **kwargs):
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    fake_hub(monkeypatch, unreachable)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(SusurrusError, match="hub could not be reached .*Failed to resolve"):
        load_model("distil-whisper/distil-small.en", device="cpu")


def test_repo_id_loads_the_snapshot(tiny, tmp_path, monkeypatch):
    snapshot = tmp_path / "snapshot"
    tensors = hf_tensors(tiny)
    snapshot.mkdir()
    (snapshot / "config.json").write_text(json.dumps(hf_config(tiny.dims)))
    torch.save(tensors, snapshot / "pytorch_model.bin")

    def download(repo_id, allow_patterns, **kwargs):
        # Only the pickled weights need the second, pytorch_model.bin, request.
        return str(snapshot if "pytorch_model.bin" in allow_patterns else tmp_path / "empty")

    calls = fake_hub(monkeypatch, download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    model = load_model("someone/whisper-tiny-finetune", device="cpu", download_root=tmp_path)
    assert_same_weights(model, tiny)
    assert model.name == "someone/whisper-tiny-finetune"
    assert [c["local_files_only"] for c in calls] == [False, False]
    assert calls[0]["cache_dir"] == str(tmp_path)
    assert "model.safetensors" in calls[0]["allow_patterns"]


def test_unreadable_weights_files(tiny, tmp_path):
    write_checkpoint(tmp_path, tiny).joinpath("model.safetensors").write_bytes(b"garbage")
    assert "model.safetensors: unreadable weights file" in load_error(tmp_path)
    tmp_path.joinpath("model.safetensors").unlink()
    tmp_path.joinpath("pytorch_model.bin").write_bytes(b"garbage")
    assert "pytorch_model.bin: unreadable weights file (corrupt" in load_error(tmp_path)
