"""The hand-written step kernels (susurrus/native.py): their numbers, their independence
from neighbours and thread counts, their build, and the fallback where they cannot build."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from susurrus import kernels, native
from susurrus.quantize import Int8Linear

from .conftest import AUDIO, requires_shared

needs_native = pytest.mark.skipif(not native.available(), reason="no native kernels here")


def _with_threads(count: int, fn):
    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        return fn()
    finally:
        torch.set_num_threads(saved)


@needs_native
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 40])
@pytest.mark.parametrize("shape", [(1152, 384), (51865, 512), (13, 100)])
def test_products_match_the_float_product_row_by_row_and_thread_count(rows, shape):
    torch.manual_seed(rows)
    out_features, in_features = shape
    layer = Int8Linear(torch.randn(out_features, in_features) / in_features**0.5,
                       torch.randn(out_features))
    x = torch.randn(rows, in_features) * torch.logspace(-3, 2, rows)[:, None]
    weight = layer.dequantized_weight()

    def near(a: torch.Tensor, b: torch.Tensor) -> bool:  # float32 sums in another order
        return bool(((a - b).norm(dim=1) <= 1e-5 * b.norm(dim=1)).all())

    got = native.int8_rows(x, layer.weight_int8, layer.scale, layer.bias)
    assert near(got, x @ weight.T + layer.bias)
    floats = native.float_rows(x, weight, layer.bias)
    assert near(floats, torch.nn.functional.linear(x, weight, layer.bias))
    # The int8 kernel is the float one on the dequantized weight, up to one scaling.
    assert near(got, floats)
    for r in range(rows):  # each row alone gives its own result, bit for bit
        assert torch.equal(native.int8_rows(x[r : r + 1], layer.weight_int8, layer.scale,
                                            layer.bias), got[r : r + 1]), r
    one_thread = _with_threads(1, lambda: native.int8_rows(x, layer.weight_int8, layer.scale,
                                                           layer.bias))
    assert torch.equal(one_thread, got)


@needs_native
@pytest.mark.parametrize("queries", [1, 5])
@pytest.mark.parametrize("keys", [1500, 41, 7])
def test_attention_matches_the_two_products_and_a_mask_equals_a_cut(queries, keys):
    torch.manual_seed(keys)
    q = torch.randn(2, 8, queries, 64)
    k, v = torch.randn(2, 8, keys, 64), torch.randn(2, 8, keys, 64)
    got = native.attention(q, k, v)
    torch.testing.assert_close(got, kernels._attention_matmul(q, k, v, None),
                               rtol=1e-5, atol=1e-6)
    assert torch.equal(_with_threads(1, lambda: native.attention(q, k, v)), got)
    # A cache's slice (strided heads) reads the same as a copy of it.
    cache = torch.randn(2, 8, keys + 5, 64)
    cache[:, :, :keys] = k
    assert torch.equal(native.attention(q, cache[:, :, :keys], v), got)
    if queries == 1 and keys > 8:
        # Rows at different positions of one masked step: each equals its row with the
        # keys cut after its position (the engine's step when every row is at one).
        positions = torch.tensor([keys - 1, keys // 3])
        mask = (torch.arange(keys) <= positions[:, None])[:, None, None, :]
        masked = native.attention(q, k, v, mask)
        for r, p in enumerate(positions.tolist()):
            cut = native.attention(q[r : r + 1], k[r : r + 1, :, : p + 1], v[r : r + 1, :, : p + 1])
            assert torch.equal(masked[r : r + 1], cut), r


@needs_native
def test_the_kernels_refuse_what_they_cannot_take():
    with pytest.raises(ValueError, match="int8 weight"):
        native.int8_rows(torch.randn(1, 8), torch.randn(4, 8), torch.ones(4), None)
    with pytest.raises(ValueError, match="features"):
        native.float_rows(torch.randn(1, 9), torch.randn(4, 8), None)
    with pytest.raises(ValueError, match="float32"):
        native.attention(*(torch.randn(1, 2, 1, 64, dtype=torch.bfloat16),) * 3)
    q, k = torch.randn(2, 2, 1, 64), torch.randn(1, 2, 9, 64)  # batch to broadcast: refused
    with pytest.raises(ValueError, match="do not match"):
        native.attention(q, k, k)
    # ...and the kernel the steps call takes the two products for it instead.
    torch.testing.assert_close(kernels._attention_native(q, k, k, None),
                               kernels._attention_matmul(q, k, k, None))
    # A mask of any layout (a uint8 row expanded to every row) reads as its values.
    k = torch.randn(2, 2, 9, 64)
    row = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 0], dtype=torch.uint8)
    expanded = row.expand(2, 9).reshape(2, 1, 1, 9)
    assert torch.equal(native.attention(q, k, k, expanded),
                       native.attention(q, k, k, expanded.bool().contiguous()))


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **env})


@needs_native
def test_a_fresh_cache_builds_the_library_once(tmp_path):
    code = "from susurrus import native; print(native.available(), native.build_dir())"
    first = _python(code, SUSURRUS_CACHE_DIR=str(tmp_path))
    assert first.stdout.split()[0] == "True", first.stderr
    built = sorted((tmp_path / "native").glob("step-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    again = _python(code, SUSURRUS_CACHE_DIR=str(tmp_path))
    assert again.stdout.split()[0] == "True"
    assert built[0].stat().st_mtime_ns == stamp  # loaded, not built again
    assert [p.name for p in (tmp_path / "native").iterdir()] == [built[0].name]


@requires_shared
@pytest.mark.parametrize("compiler", ["missing", "failing"])
def test_without_a_compiler_the_pytorch_kernels_serve_with_one_warning(compiler, tmp_path):
    """No C compiler (CC names a missing one) or one that fails: one warning, the int8
    decoder on a PyTorch kernel even when the native one is forced, and jfk transcribed
    as ever."""
    code = f"""
import json, logging
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
import susurrus
from susurrus import native
model = susurrus.load_model("tiny.en", compute_type="auto")
text = model.transcribe({str(AUDIO / "jfk.flac")!r}, temperature=0.0)["text"]
print(json.dumps({{"available": native.available(),
                   "kernel": model.decoder.blocks[0].mlp[0].step_kernel, "text": text}}))
"""
    cc = str(tmp_path / "no-such-cc") if compiler == "missing" else "false"
    done = _python(code, SUSURRUS_CACHE_DIR=str(tmp_path), CC=cc,
                   SUSURRUS_INT8="native", SUSURRUS_KERNEL_CACHE=str(tmp_path / "k.json"))
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["available"] is False
    assert found["kernel"] in ("fbgemm", "int8pack")
    assert "ask not what your country can do for you" in found["text"].lower()
    warning = "no C compiler" if compiler == "missing" else "could not build"
    assert done.stderr.count(warning) == 1, done.stderr
    assert "cannot run here" in done.stderr
    assert not (tmp_path / "native").exists() or not any((tmp_path / "native").iterdir())
