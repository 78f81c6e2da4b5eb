"""Loading weights: embedded CTranslate2 packages, checkpoints, and every failure mode."""

from __future__ import annotations

import shutil

import pytest
import torch

from susurrus import SusurrusError, load_model
from susurrus.load import EMBEDDED, embedded_model_files, load_ct2_dir


def embedded(name: str):
    files = embedded_model_files(name)
    if files is None:
        pytest.skip(f"embedded model {name} is not installed")
    return files


def heads(model) -> list[list[int]]:
    return model.alignment_heads.nonzero().tolist()


def test_tiny_en_dimensions_and_heads(tiny_en):
    d = tiny_en.dims
    assert (d.n_mels, d.n_audio_state, d.n_audio_head, d.n_audio_layer) == (80, 384, 6, 4)
    assert (d.n_vocab, d.n_text_ctx, d.n_text_layer) == (51864, 448, 4)
    assert not tiny_en.is_multilingual and tiny_en.num_languages == 99
    assert heads(tiny_en) == [[1, 0], [2, 0], [2, 5], [3, 0], [3, 1], [3, 2], [3, 3], [3, 4]]
    assert tiny_en.dtype == torch.float32 and tiny_en.device.type == "cpu"


def test_base_is_reassembled_and_verified(base):
    d = base.dims
    assert (d.n_audio_state, d.n_audio_layer, d.n_text_layer, d.n_vocab) == (512, 6, 6, 51865)
    assert base.is_multilingual and base.num_languages == 99
    assert heads(base) == [[3, 1], [4, 2], [4, 3], [4, 7], [5, 1], [5, 2], [5, 4], [5, 6]]
    # The tied output projection is the token embedding itself.
    logits = base.logits(torch.tensor([[50258]]), base.embed_audio(torch.zeros(1, 80, 3000)))
    assert logits.shape == (1, 1, 51865)


def test_corrupt_part_fails_checksum(tmp_path):
    parts, config_dir = embedded("base")
    copies = []
    for i, part in enumerate(parts):
        copy = tmp_path / f"part{i}"
        shutil.copyfile(part, copy)
        copies.append(copy)
    with open(copies[1], "r+b") as f:  # flip one byte in the middle of part 2
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(SusurrusError, match="corrupt.*reinstall"):
        load_ct2_dir(config_dir, copies, EMBEDDED["base"].sha256)


def test_truncated_model_bin_is_a_clear_error(tmp_path):
    parts, config_dir = embedded("tiny.en")
    (tmp_path / "model.bin").write_bytes(parts[0].read_bytes()[:5_000_000])
    shutil.copyfile(config_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(SusurrusError, match="truncated or corrupt"):
        load_model(str(tmp_path), device="cpu")


def test_not_a_model_file(tmp_path):
    bogus = tmp_path / "model.pt"
    bogus.write_text("hello")
    with pytest.raises(SusurrusError, match="not a readable Whisper checkpoint"):
        load_model(str(bogus), device="cpu")
    with pytest.raises(SusurrusError, match="no model.bin"):
        load_model(str(tmp_path), device="cpu")


def test_pickled_code_is_refused(tmp_path):
    """Checkpoints are read with weights_only=True: a pickle that runs code never loads."""
    path = tmp_path / "evil.pt"
    torch.save({"dims": {}, "model_state_dict": {}, "payload": shutil.rmtree}, path)
    with pytest.raises(SusurrusError, match="not a readable Whisper checkpoint"):
        load_model(str(path), device="cpu")


def test_openai_checkpoint_round_trip(tmp_path, tiny_en):
    from dataclasses import asdict

    path = tmp_path / "tiny.en.pt"
    state = {k: v.half() for k, v in tiny_en.state_dict().items()}
    torch.save({"dims": asdict(tiny_en.dims), "model_state_dict": state}, path)
    loaded = load_model(str(path), device="cpu")
    for name, value in tiny_en.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    # Without an alignment-head list the last half of the decoder layers is used.
    assert heads(loaded) == [[layer, h] for layer in (2, 3) for h in range(6)]


def test_unknown_model_name():
    with pytest.raises(SusurrusError, match="unknown model 'tiny.fr'.*tiny.en, tiny, base.en"):
        load_model("tiny.fr")
    with pytest.raises(SusurrusError, match="model file not found"):
        load_model("/nonexistent/model.pt")


def test_official_name_offline_names_the_fix(monkeypatch, tmp_path):
    """A name without an embedded package goes to the download, which fails fast offline."""
    monkeypatch.setenv("SUSURRUS_OFFLINE", "1")
    with pytest.raises(SusurrusError, match=r"susurrus\[models\]"):
        load_model("small.en", download_root=tmp_path)
    assert list(tmp_path.iterdir()) == []
