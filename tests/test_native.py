"""The hand-written step kernels (susurrus/native.py): their numbers, their independence
from neighbours and thread counts, their build, and the fallback where they cannot build."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from susurrus import kernels, load_model, native
from susurrus.engine import native_step
from susurrus.engine.step import Run, decoder_step
from susurrus.model import MultiHeadAttention
from susurrus.quantize import Int8Embedding, Int8Linear

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
    # Rows rounded to 16 bits first (a scale per 128 inputs): 3e-5 of each row at most,
    # and again each row alone and each thread count give the same numbers.
    rounded = native.int8_rows_q16(x, layer.weight_int8, layer.scale, layer.bias)
    if in_features % 128:  # widths the rounding does not take: the unrounded kernel
        assert torch.equal(rounded, got)
    else:
        error = (rounded - got).norm(dim=1) / got.norm(dim=1)
        assert bool((error < 1e-4).all()) and not torch.equal(rounded, got), error
    for r in range(rows):
        assert torch.equal(native.int8_rows_q16(x[r : r + 1], layer.weight_int8, layer.scale,
                                                layer.bias), rounded[r : r + 1]), r
    assert torch.equal(_with_threads(1, lambda: native.int8_rows_q16(
        x, layer.weight_int8, layer.scale, layer.bias)), rounded)
    # The AVX512-VNNI version (where the CPU has it) and the AVX2 one: the same integer
    # sums, float32 sums of 16 lanes against 8, so within a few 1e-7; each row alone and
    # each thread count its own same numbers.
    vnni = native.q16_vnni()
    try:
        native.q16_vnni(not vnni)
        other = native.int8_rows_q16(x, layer.weight_int8, layer.scale, layer.bias)
        assert torch.equal(_with_threads(1, lambda: native.int8_rows_q16(
            x, layer.weight_int8, layer.scale, layer.bias)), other)
        for r in range(rows):
            assert torch.equal(native.int8_rows_q16(
                x[r : r + 1], layer.weight_int8, layer.scale, layer.bias), other[r : r + 1]), r
    finally:
        native.q16_vnni(vnni)
    assert bool(((other - rounded).norm(dim=1) <= 1e-6 * rounded.norm(dim=1)).all())


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
@pytest.mark.parametrize("queries", [1, 5])
def test_attention_reads_float16_keys_as_the_float32_numbers_they_hold(queries):
    """Keys and values stored in float16 (the audio's under `auto`) give, bit for bit, the
    attention of the same numbers in float32: widened exactly as they are read, the
    arithmetic float32. The same through a step's attention module, whatever its kernel."""
    torch.manual_seed(queries)
    q = torch.randn(2, 8, queries, 64)
    k, v = (torch.randn(2, 8, 1500, 64).half() for _ in range(2))
    wide_k, wide_v = k.float(), v.float()
    got = native.attention(q, k, v)
    assert got.dtype == torch.float32
    assert torch.equal(got, native.attention(q, wide_k, wide_v))
    cache = torch.randn(2, 8, 1600, 64).half()  # a slice of a cache: strided heads
    cache[:, :, :1500] = k
    assert torch.equal(native.attention(q, cache[:, :, :1500], v), got)
    if queries == 1:
        mask = (torch.arange(1500) <= torch.tensor([1499, 40])[:, None])[:, None, None, :]
        assert torch.equal(native.attention(q, k, v, mask),
                           native.attention(q, wide_k, wide_v, mask))
    # A module whose keys are stored narrow: the native kernel reads them itself, the
    # two products widen them first; both compute what float32 keys give.
    attn = MultiHeadAttention(512, 8)
    attn.attention_dtype = torch.float16
    for name in ("native", "matmul"):
        attn.step_kernel = kernels.ATTENTION[name]
        out = attn.sdpa(q, k, v)
        assert out.dtype == torch.float32
        expected = kernels.ATTENTION[name](q, wide_k, wide_v, None)
        assert torch.equal(out, expected), name
    torch.testing.assert_close(got, kernels._attention_matmul(q, wide_k, wide_v, None),
                               rtol=1e-5, atol=1e-6)


@needs_native
@pytest.mark.parametrize("n", [51865, 1003, 20])
def test_exact_top_recomputes_the_largest_logits_of_each_row(n):
    """The native exact-top kernel finds each row's k largest logits as torch.topk does
    and recomputes them from both int8 bytes as the PyTorch path does; a row's numbers
    are the same alone and beside others, with one thread or two."""
    torch.manual_seed(n)
    embedding = Int8Embedding(torch.randn(n, 64) * 0.1)
    p, k = embedding.projection, min(Int8Embedding.EXACT_TOP, n)
    hidden = torch.randn(5, 64)
    logits = hidden @ p.dequantized_weight().T
    logits[2, 7] = logits[2, 9] = logits[2].max() + 1  # a tie
    top = logits.topk(k, dim=-1).indices
    out = logits.clone()
    found = native.exact_top(hidden, out, p.weight_int8, p.scale, embedding.error_int8,
                             embedding.error_scale, k)
    assert torch.equal(found.sort(-1).values, top.sort(-1).values)
    assert found[2, 0] == 7 and found[2, 1] == 9  # the lower index first on a tie
    expected = (embedding.rows(top) * hidden.unsqueeze(1)).sum(-1)
    torch.testing.assert_close(out.gather(-1, top), expected, rtol=1e-5, atol=1e-5)
    rest = torch.ones_like(out, dtype=torch.bool).scatter_(-1, top, False)
    assert torch.equal(out[rest], logits[rest])
    for threads in (1, 2):
        alone = logits[3:4].clone()
        _with_threads(threads, lambda alone=alone: native.exact_top(
            hidden[3:4], alone, p.weight_int8, p.scale, embedding.error_int8,
            embedding.error_scale, k))
        assert torch.equal(alone[0], out[3])


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


# -- the whole decoder step in one native call (engine/native_step.py) --------------------


def _native_model(name: str, compute_type: str, monkeypatch, tmp_path):
    """A model whose every step product and attention is forced onto the native kernels."""
    monkeypatch.setenv("SUSURRUS_KERNEL_CACHE", str(tmp_path / "kernels.json"))
    monkeypatch.setenv(kernels.ENV_FORCE_ATTENTION, "native")
    monkeypatch.setenv(kernels.ENV_FORCE, "native")
    monkeypatch.setenv(kernels.ENV_FORCE_INT8, "native")
    return load_model(name, device="cpu", compute_type=compute_type)


# (rows, positions, runs, audios): one row; a beam at one position; rows of three windows
# at three positions; a beam beside two single rows (continuous batching).
STEP_CASES = [
    (1, [5], (Run(0, 1, 0, 1, 1),), 1),
    (5, [7] * 5, (Run(0, 5, 0, 1, 5),), 1),
    (3, [3, 9, 20], (Run(0, 3, 0, 3, 1),), 3),
    (7, [4] * 5 + [9, 30], (Run(0, 5, 0, 1, 5), Run(5, 7, 1, 3, 1)), 3),
]


def _steps(model, rows, positions, runs, audios, fused: bool, steps: int = 3):
    """Hidden states of `steps` steps from seeded caches and audio, and the caches after."""
    decoder = model.decoder
    n_state = decoder.positional_embedding.shape[1]
    saved = native_step.ENABLED
    native_step.ENABLED = fused
    try:
        torch.manual_seed(1)
        with torch.inference_mode():
            audio = decoder.new_cache(audios)
            decoder.fill_cross_cache(audio, torch.randn(audios, model.dims.n_audio_ctx, n_state))
            cache = decoder.new_cache(rows, n_ctx=64)
            for t in cache.self_k + cache.self_v:
                t.normal_()
            tokens = torch.randint(0, 50000, (rows, 1))
            at = torch.tensor(positions)
            same = positions[0] if len(set(positions)) == 1 else None
            assert (native_step.plan(decoder, rows) is not None) == fused
            hidden = []
            for _ in range(steps):
                hidden.append(decoder_step(decoder, tokens, at, cache.self_k, cache.self_v,
                                           audio.cross_k, audio.cross_v, runs, same,
                                           hidden_only=True))
                at = at + 1
                same = None if same is None else same + 1
            return torch.stack(hidden), cache.self_k + cache.self_v
    finally:
        native_step.ENABLED = saved


@needs_native
@pytest.mark.parametrize("compute_type", ["float32", "auto"])
def test_the_native_step_computes_what_the_loop_does(compute_type, monkeypatch, tmp_path):
    """Hidden states and written keys of whole steps (one row, beams, windows at other
    positions, both side by side) as the PyTorch loop over the same kernels gives them,
    up to the layer norms' and GELU's last bits."""
    model = _native_model("tiny.en", compute_type, monkeypatch, tmp_path)
    # `auto` keeps the keys in float16, which the step reads as they are and rounds its
    # own to as it writes them.
    narrow = torch.float16 if compute_type == "auto" else None
    block = model.decoder.blocks[0]
    assert block.attn.attention_dtype == block.cross_attn.attention_dtype == narrow
    for rows, positions, runs, audios in STEP_CASES:
        fused, fused_cache = _steps(model, rows, positions, runs, audios, fused=True)
        loop, loop_cache = _steps(model, rows, positions, runs, audios, fused=False)
        error = (fused - loop).norm(dim=-1) / loop.norm(dim=-1)
        # (A key a last bit apart before its float16 rounding can round a float16 step,
        # 5e-4 of it, apart; and an int8 product's input a last bit apart (the layer
        # norms') can round to another 16-bit step, 4e-6 of the product. A step gone
        # wrong is off by far more.)
        assert error.max() < (5e-4 if narrow else 1e-5), (rows, positions, error.max().item())
        for a, b in zip(fused_cache, loop_cache):
            assert a.dtype == (narrow or torch.float32)
            assert torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-3)


@needs_native
def test_the_native_step_gives_a_row_the_same_numbers_beside_any_others(monkeypatch, tmp_path):
    """A window's numbers depend neither on the rows decoded beside it nor on the thread
    count: bit for bit (continuous batching on a server, a machine under load)."""
    model = _native_model("tiny.en", "auto", monkeypatch, tmp_path)
    decoder = model.decoder
    n_state = decoder.positional_embedding.shape[1]
    torch.manual_seed(2)
    with torch.inference_mode():
        audio = decoder.new_cache(3)
        decoder.fill_cross_cache(audio, torch.randn(3, model.dims.n_audio_ctx, n_state))
        self_k = [torch.randn(7, *t.shape[1:]) for t in decoder.new_cache(7, n_ctx=64).self_k]
        self_v = [torch.randn_like(t) for t in self_k]
        tokens = torch.randint(0, 50000, (7, 1))
        positions = torch.tensor([4] * 5 + [9, 30])

        def step(rows: int, audios: int, runs: tuple) -> torch.Tensor:
            assert native_step.plan(decoder, rows) is not None
            return decoder_step(decoder, tokens[:rows], positions[:rows],
                                [k[:rows].clone() for k in self_k],
                                [v[:rows].clone() for v in self_v],
                                [k[:audios] for k in audio.cross_k],
                                [v[:audios] for v in audio.cross_v], runs, None,
                                hidden_only=True)

        runs = (Run(0, 5, 0, 1, 5), Run(5, 7, 1, 3, 1))
        together = step(7, 3, runs)
        assert torch.equal(_with_threads(1, lambda: step(7, 3, runs)), together)
        # Window 0's beam alone: the same numbers as beside the two other windows.
        assert torch.equal(step(5, 1, (Run(0, 5, 0, 1, 5),)), together[:5])


@needs_native
def test_the_native_step_serves_only_where_every_part_is_native(monkeypatch, tmp_path):
    """The loop keeps steps with any part measured or forced elsewhere: another attention,
    more rows than the float kernel takes, the switch off."""
    model = _native_model("tiny.en", "float32", monkeypatch, tmp_path)
    decoder = model.decoder
    assert native_step.plan(decoder, 1) is not None
    assert native_step.plan(decoder, kernels.SPLIT_ROWS + 1) is None
    monkeypatch.setattr(native_step, "ENABLED", False)
    assert native_step.plan(decoder, 1) is None
    monkeypatch.setattr(native_step, "ENABLED", True)
    block = decoder.blocks[-1]
    saved = block.cross_attn.step_kernel
    block.cross_attn.step_kernel = kernels.ATTENTION["matmul"]
    assert native_step.plan(decoder, 1) is None
    block.cross_attn.step_kernel = saved
    assert native_step.plan(decoder, 1) is not None


@requires_shared
@needs_native
def test_float32_parity_through_the_native_step(monkeypatch, tmp_path):
    """Token for token with the reference on the forced-path files, every step through
    the native step."""
    from .test_kernels import FORCED_FILES
    from .test_transcribe import check_parity, run_parity

    model = _native_model("tiny.en", "float32", monkeypatch, tmp_path)
    calls = []
    call = native_step.NativeStep.__call__

    def counted(self, *args):
        hidden = call(self, *args)
        calls.append(hidden is not None)
        return hidden

    monkeypatch.setattr(native_step.NativeStep, "__call__", counted)
    check_parity(*run_parity(model, "tiny.en", "greedy", FORCED_FILES), most_differing=0.25)
    assert len(calls) > 100 and all(calls)


@needs_native
def test_the_native_timestamp_rules_mask_what_the_pytorch_ones_do():
    """The token rules' timestamp part as one native call leaves exactly the logits the
    PyTorch operations leave, row by row, in every state a row can be in: nothing sampled
    (with and without a limit on the first timestamp), after text, after one timestamp,
    after a pair, with and without timestamps, and rows whose timestamps outweigh the text
    (which then loses every text token)."""
    from susurrus.engine.search import NONE, RowRules
    from susurrus.tokenizer import get_tokenizer

    tokenizer = get_tokenizer(False)
    n_vocab = 51864
    tb = tokenizer.timestamp_begin
    generator = torch.Generator().manual_seed(0)
    states = [(sampled, last, penult, latest, stamps, initial)
              for sampled in (0, 1, 2, 7) for last in (False, True) for penult in (False, True)
              for latest in (NONE, tb, tb + 40, n_vocab - 1) for stamps in (True, False)
              for initial in (NONE, 50)]
    rules = {flag: RowRules(n_vocab, tokenizer, torch.device("cpu")) for flag in (True, False)}
    logits = torch.randn(len(states), n_vocab, generator=generator) * 3
    # Half the rows with timestamps that outweigh every text token together.
    logits[::2, tb:] += 4
    logits[:, 100:120] = float("-inf")  # already masked, as suppressed tokens are
    out = {}
    for flag, r in rules.items():
        r.native = flag
        r.add(len(states), r.mask_for([220], [220]), True, None)
        columns = list(zip(*states))
        r.n_sampled = torch.tensor(columns[0])
        r.last_ts, r.penult_ts = torch.tensor(columns[1]), torch.tensor(columns[2])
        r.max_ts, r.timestamps = torch.tensor(columns[3]), torch.tensor(columns[4])
        r.max_initial = torch.tensor(columns[5])
        out[flag] = logits.clone()
        r.apply(out[flag])
    assert torch.equal(out[True], out[False])
    text_gone = (out[True][:, :tb] == float("-inf")).all(dim=1)
    stamps = torch.tensor([s[4] for s in states])
    assert text_gone[stamps].any() and not text_gone[stamps].all()  # both outcomes met
    assert not (out[True][~stamps, tb:] == float("-inf")).any()  # no timestamp rules there


@needs_native
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_the_native_log_probabilities_of_the_first_largest_or_given_tokens(rows):
    generator = torch.Generator().manual_seed(rows)
    logits = torch.randn(rows, 51865, generator=generator) * 4
    logits[:, 1000:1100] = float("-inf")
    logits[0, 7] = logits[0, 51000] = logits[0].max() + 1  # a tie: the first one counts
    best, logprob = native.log_probs(logits)
    assert best[0] == 7
    assert torch.equal(best, logits.max(dim=-1).indices)
    # Within a float32 rounding of the float64 value (PyTorch's float32 log_softmax is
    # within a few 1e-6 of it).
    exact = logits.double().log_softmax(dim=-1).gather(1, best[:, None])[:, 0]
    torch.testing.assert_close(logprob.double(), exact, rtol=1e-7, atol=1e-6)
    # Every row alone: the same numbers (one thread, a row at a time, whatever the count).
    for r in range(rows):
        alone = native.log_probs(logits[r:r + 1])
        assert alone[0] == best[r] and alone[1] == logprob[r]
    # Given tokens: theirs.
    tokens = torch.arange(rows) * 5
    given, logprob = native.log_probs(logits, tokens)
    assert torch.equal(given, tokens)
    exact = logits.double().log_softmax(dim=-1).gather(1, tokens[:, None])[:, 0]
    torch.testing.assert_close(logprob.double(), exact, rtol=1e-7, atol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        native.log_probs(logits, tokens + 51865)
    with pytest.raises(ValueError, match="do not fit"):
        state = torch.zeros(rows, dtype=torch.int64), torch.zeros(rows, dtype=torch.bool)
        native.timestamp_rules(logits, 60000, 50256, 50362, state[0], state[1], state[1],
                               state[0], state[1], state[0])


@requires_shared
@needs_native
def test_two_threads_transcribing_with_one_model_each_get_what_they_get_alone(
    monkeypatch, tmp_path
):
    """`model.transcribe` called from two threads at once (a web app's handlers, a thread
    pool) without a shared engine: each call has its own engine and caches, and the native
    step, whose plan the decoder's, must not hand one thread's caches to the other's step
    (it did: other words, or the process killed by a corrupted heap)."""
    import threading

    import susurrus

    model = _native_model("tiny.en", "auto", monkeypatch, tmp_path)
    # Two long readings, so that the steps of both overlap for most of their run: the
    # 111 s one, and the same from its 40th second (other windows, prompts and positions).
    reading = susurrus.load_audio(str(AUDIO / "en_lj_LJ001-0001-0016_concat.flac"))
    files = [reading, reading[40 * 16000 :]]
    alone = [model.transcribe(f, language="en")["text"] for f in files]
    threads_stepped: set[int] = set()
    call = native_step.NativeStep.__call__

    def counted(self, *args):
        hidden = call(self, *args)
        if hidden is not None:
            threads_stepped.add(threading.get_ident())
        return hidden

    monkeypatch.setattr(native_step.NativeStep, "__call__", counted)
    together: list[str | None] = [None, None]

    def work(i: int) -> None:
        together[i] = model.transcribe(files[i], language="en")["text"]

    workers = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=300)
    assert together == alone
    assert threads_stepped == {t.ident for t in workers}
