"""`export_openai_checkpoint`: the written file loads back to the same model."""

from __future__ import annotations

import pytest
import torch

from susurrus import load_model, transcribe
from susurrus.export import export_openai_checkpoint, main

from .conftest import AUDIO, requires_shared


@pytest.fixture(scope="module")
def exported(tiny_en, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "tiny.en.pt"
    export_openai_checkpoint(tiny_en, path)
    return path


def test_layout_matches_openai(exported, tiny_en):
    checkpoint = torch.load(exported, map_location="cpu", weights_only=True)
    assert set(checkpoint) == {"dims", "model_state_dict", "alignment_heads"}
    assert checkpoint["dims"]["n_text_layer"] == tiny_en.dims.n_text_layer
    state = checkpoint["model_state_dict"]
    assert set(state) == set(tiny_en.state_dict())
    assert "encoder.positional_embedding" in state
    assert all(t.dtype == torch.float16 for t in state.values())
    heads = checkpoint["alignment_heads"]
    assert heads.dtype == torch.bool and not heads.is_sparse
    assert torch.equal(heads, tiny_en.alignment_heads)


def test_round_trip_parameters_equal(exported, tiny_en):
    loaded = load_model(str(exported), device="cpu")
    assert loaded.dims == tiny_en.dims
    ours, theirs = tiny_en.state_dict(), loaded.state_dict()
    assert set(ours) == set(theirs)
    # The embedded weights are float16 already, so the float16 file loses nothing.
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name
    assert torch.equal(loaded.alignment_heads, tiny_en.alignment_heads)


@requires_shared
def test_round_trip_transcript_identical(exported, tiny_en):
    loaded = load_model(str(exported), device="cpu")
    audio = str(AUDIO / "jfk.flac")
    expected = transcribe(tiny_en, audio, temperature=0.0, language="en")
    got = transcribe(loaded, audio, temperature=0.0, language="en")
    assert [s["tokens"] for s in got["segments"]] == [s["tokens"] for s in expected["segments"]]
    assert got["text"] == expected["text"]


def test_float32_and_command(tmp_path, capsys):
    path = tmp_path / "out" / "tiny.en.fp32.pt"
    assert main(["tiny.en", str(path), "--dtype", "float32"]) == 0
    assert "wrote" in capsys.readouterr().out
    state = torch.load(path, map_location="cpu", weights_only=True)["model_state_dict"]
    assert state["decoder.token_embedding.weight"].dtype == torch.float32
    assert not list(tmp_path.glob("out/*.partial"))


def test_command_reports_unknown_model(tmp_path, capsys):
    assert main(["no-such-model", str(tmp_path / "x.pt")]) == 2
    assert "susurrus: error:" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()
