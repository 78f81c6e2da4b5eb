"""Half precision and devices: the code a GPU runs, exercised on the CPU as well."""

from __future__ import annotations

import pytest
import torch

from susurrus import load_model

from .conftest import AUDIO, requires_shared

pytestmark = requires_shared

JFK = "ask what you can do for your country"


@pytest.mark.parametrize(
    "device,dtype",
    [
        ("cpu", torch.bfloat16),
        pytest.param(
            "cuda",
            torch.float16,
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
        ),
    ],
)
def test_half_precision_transcribes(device, dtype):
    model = load_model("tiny.en", device=device, dtype=dtype)
    assert model.dtype == dtype and model.device.type == device
    result = model.transcribe(str(AUDIO / "jfk.flac"), temperature=0.0)
    assert JFK in result["text"].lower()
    assert model.dtype == dtype  # fp16=True (the default) keeps the half-precision weights
    # fp16=False asks for full precision, as in the reference, from a float32 copy: the
    # caller's model is never changed.
    result = model.transcribe(str(AUDIO / "jfk.flac"), temperature=0.0, fp16=False)
    assert model.dtype == dtype and JFK in result["text"].lower()
