"""Compute types: int8 weights, float types, and their errors."""

from __future__ import annotations

import jiwer
import pytest
import torch
import torch.nn.functional as F
from whisper_normalizer.english import EnglishTextNormalizer

from susurrus import kernels, load_model, native, quantize
from susurrus.errors import SusurrusError
from susurrus.export import export_openai_checkpoint
from susurrus.quantize import Int8Linear, native_bfloat16, quantize_rows, resolve_compute_type

from .conftest import AUDIO, manifest, parity, requires_shared
from .test_cli import run as run_cli

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_compute_type_names():
    def plan(name: str, device: torch.device) -> tuple:
        return tuple(resolve_compute_type(name, device)[:4])

    assert plan("default", CPU) == (torch.float32, False, None, None)
    assert plan("default", CUDA) == (torch.float16, False, None, None)
    tiles = torch.bfloat16 if quantize.bfloat16_tiles() else None
    # auto on the CPU: an int8 decoder, and bfloat16 attention and encoder with AMX;
    # elsewhere the encoder in the type measured fastest (kernels.encoder_type).
    assert plan("auto", CPU) == (torch.float32, True, tiles, tiles)
    assert resolve_compute_type("auto", CPU).measure_encoder == (tiles is None)
    assert not resolve_compute_type("int8", CPU).measure_encoder
    # auto leaves the decoder's projections of the audio float; int8 rounds every layer.
    assert resolve_compute_type("auto", CPU).float_audio_projections
    assert not resolve_compute_type("int8", CPU).float_audio_projections
    bf16 = torch.bfloat16 if native_bfloat16() else None
    assert plan("int8_bfloat16", CPU) == (torch.float32, True, bf16, None)
    assert plan("auto", CUDA) == (torch.float16, False, None, None)
    assert plan("bfloat16", CPU) == (torch.bfloat16, False, None, None)
    assert plan("int8", CPU) == (torch.float32, True, None, None)
    # The CPU's int8 kernels take float32 whatever float type was named with int8.
    assert plan("int8_float16", CPU)[:2] == (torch.float32, True)
    assert plan("int8_float16", CUDA) == (torch.float16, True, None, None)
    with pytest.raises(SusurrusError, match="unknown compute type 'int4'"):
        resolve_compute_type("int4", CPU)


def test_quantize_rows_error_is_within_half_a_step():
    weight = torch.randn(300, 64) * torch.linspace(0.01, 3, 300)[:, None]
    q, scale = quantize_rows(weight, chunk=128)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    error = (q.float() * scale[:, None] - weight).abs()
    assert (error <= scale[:, None] / 2 + 1e-6).all()


def test_int8_linear_kernel_and_fallback_agree_with_float():
    """The CPU kernel (FBGEMM, dynamic activations) and the dequantizing path other devices
    take give the float layer's output to within int8 precision."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(512, 256)
    x = torch.randn(3, 1, 512)
    expected = linear(x)
    layer = Int8Linear(linear.weight, linear.bias)
    fast = layer(x)  # FBGEMM: one new position per row, as a decoding step
    assert layer._packed is not None
    many = torch.randn(2, 100, 512)
    per_row = layer(many)  # several positions per row: per-row activation scales
    plain = layer(x.double()).float()  # not float32: the dequantizing path other devices use
    for out, exact in ((fast, expected), (plain, expected), (per_row, linear(many))):
        relative = (out - exact).norm() / exact.norm()
        assert relative < 0.02, relative
    assert (fast - plain).norm() / plain.norm() < 0.02
    layer.to(torch.float64)
    assert layer._packed is None  # packed again after a move


def test_int8_rows_of_several_positions_are_quantized_independently():
    """A prompt's positions (or left padding) of very different scales must not share one
    activation scale: each row's output is the same alone or beside a loud row."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(512, 256)
    layer = Int8Linear(linear.weight, linear.bias)
    quiet = torch.randn(1, 6, 512) * 0.01
    loud = torch.randn(1, 6, 512) * 100
    together = layer(torch.cat([quiet, loud]))
    assert torch.allclose(together[:1], layer(quiet), atol=1e-6)
    relative = (together[:1] - linear(quiet)).norm() / linear(quiet).norm()
    assert relative < 0.02, relative


@pytest.mark.skipif(not quantize.weight_only_supported(), reason="no weight-only int8 kernel")
def test_int8_step_kernels_agree_and_keep_each_row_to_itself():
    """Every kernel a decoding step's int8 products can take gives the float layer's output
    to within int8 precision, and each row's output is the same alone as beside a loud
    row (a window's numbers never depend on its neighbours')."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(512, 384)
    layer = Int8Linear(linear.weight, linear.bias)
    quiet = torch.randn(1, 1, 512) * 0.01
    rows = torch.cat([quiet, torch.randn(4, 1, 512) * 100])
    names = [n for n in quantize.STEP_KERNELS if n != "native" or native.available()]
    outputs, errors = {}, {}
    for name in names:
        layer.step_kernel = name
        out = outputs[name] = layer(rows)
        relative = (out - linear(rows)).norm(dim=-1) / linear(rows).norm(dim=-1)
        assert relative.max() < 0.02, (name, relative)
        errors[name] = relative.max().item()
        assert torch.equal(out[:1], layer(quiet)), name
    # The engine changes the thread count with the machine's load: the outputs are split
    # between threads, never a sum.
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        for name in names:
            if name != "fbgemm":
                layer.step_kernel = name
                assert torch.equal(layer(rows), outputs[name]), name
    finally:
        torch.set_num_threads(threads)
    # Different roundings of the activations: close, not equal; the native kernel rounds
    # them to 16 bits only, so mostly the weights' rounding parts it from the float layer.
    fbgemm, weight_only = outputs["fbgemm"], outputs["int8pack"]
    assert not torch.equal(fbgemm, weight_only)
    assert ((fbgemm - weight_only).norm() / fbgemm.norm()) < 0.02
    if "native" in names:
        assert errors["native"] < min(errors["fbgemm"], errors["int8pack"]), errors
        exact = rows.reshape(5, 512) @ layer.dequantized_weight().T + layer.bias
        error = (outputs["native"].reshape(5, -1) - exact).norm(dim=1) / exact.norm(dim=1)
        assert bool((error < 1e-4).all()), error
    layer.to(torch.float32)
    assert layer._scale_bf16 is None  # made again after a move


@pytest.mark.skipif(not native.available(), reason="no native kernels here")
def test_the_output_projection_follows_a_native_decoder():
    """With the native step kernel the int8 output projection takes it too: the hidden
    state unrounded, so the logits are the dequantized weight's to float32 rounding;
    otherwise FBGEMM's two-row product (the state to about 16 bits). Either way the
    leading logits of each row are then the float weights' own."""
    torch.manual_seed(0)
    weight = torch.randn(1000, 64) * 0.1
    embedding = quantize.Int8Embedding(weight)
    k = embedding.EXACT_TOP
    hidden = torch.randn(3, 64)
    exact = hidden @ embedding.projection.dequantized_weight().T
    exact_float = hidden @ weight.T
    embedding.projection.step_kernel = "native"
    unrounded = embedding.logits(hidden)
    int8 = native.int8_rows(hidden, embedding.projection.weight_int8,
                            embedding.projection.scale, None)
    top = int8.topk(k, dim=-1).indices
    rest = torch.ones_like(int8, dtype=torch.bool).scatter_(-1, top, False)
    assert torch.equal(unrounded[rest], int8[rest])
    # About 16 bits of weight against 8: errors 100 times smaller.
    recomputed = (unrounded.gather(-1, top) - exact_float.gather(-1, top)).abs().max()
    rounded = (int8.gather(-1, top) - exact_float.gather(-1, top)).abs().max()
    assert recomputed < rounded / 100, (recomputed, rounded)
    assert torch.equal(unrounded.argmax(-1), exact_float.argmax(-1))
    assert ((unrounded - exact).norm() / exact.norm()) < 1e-2
    embedding.projection.step_kernel = "fbgemm"
    two_rows = embedding.logits(hidden)
    assert not torch.equal(two_rows[rest], unrounded[rest])
    assert ((two_rows - exact).norm() / exact.norm()) < 1e-2
    assert embedding.logits(torch.randn(0, 64)).shape == (0, 1000)  # no rows at all
    # Lookups read both bytes: the weights to about 16 bits.
    looked_up = embedding(torch.tensor([3, 7]))
    error = (looked_up - weight[[3, 7]]).abs().max() / weight[[3, 7]].abs().max()
    assert 0 < error < 2.0 ** -15, error


@requires_shared
@pytest.mark.parametrize("name", quantize.STEP_KERNELS)
def test_auto_transcribes_jfk_with_either_step_kernel(name, monkeypatch):
    if name == "int8pack" and not quantize.weight_only_supported():
        pytest.skip("no weight-only int8 kernel")
    if name == "native" and not native.available():
        pytest.skip("no native kernels here")
    monkeypatch.setenv("SUSURRUS_INT8", name)
    model = load_model("tiny.en", device="cpu", compute_type="auto")
    assert model.decoder.blocks[0].mlp[0].step_kernel == name
    text = model.transcribe(str(AUDIO / "jfk.flac"), temperature=0.0, beam_size=5)["text"]
    norm = EnglishTextNormalizer()
    truth = {r["file"]: r["transcript"] for r in manifest()}["jfk.flac"]
    assert jiwer.wer(norm(truth), norm(text)) == 0.0, text


def test_stacked_layers_give_the_separate_results():
    torch.manual_seed(0)
    parts = [torch.nn.Linear(64, 64), torch.nn.Linear(64, 64, bias=False)]
    layers = [Int8Linear(p.weight, p.bias) for p in parts]
    stacked = Int8Linear.stacked(layers)
    for x in (torch.randn(2, 1, 64), torch.randn(2, 9, 64)):  # both CPU kernels
        expected = torch.cat([layer(x) for layer in layers], dim=-1)
        assert torch.equal(stacked(x), expected)


@pytest.mark.skipif(not quantize.fbgemm_built(), reason="no FBGEMM")
def test_int8_logits_keep_the_hidden_state_to_about_16_bits():
    """The int8 output projection's logits are those of the int8 weights times the hidden
    state as it is (FBGEMM alone would round it to 8 bits): every logit, each row on its
    own beside a loud one, one row or several."""
    torch.manual_seed(0)
    weight = torch.randn(2000, 384) * 0.05
    embedding = quantize.Int8Embedding(weight)
    p = embedding.projection
    dequantized = p.weight_int8.float() * p.scale[:, None]
    quiet = torch.randn(1, 384) * 0.01
    rows = torch.cat([quiet, torch.randn(4, 384) * 100])
    out = embedding.logits(rows)
    exact = rows.double() @ dequantized.double().T
    # ... but for each row's leading logits, which are the float weights' own.
    top = exact.topk(embedding.EXACT_TOP, dim=-1).indices
    exact.scatter_(-1, top, (rows.double() @ weight.double().T).gather(-1, top))
    # Relative to each row's logits: 8-bit activations leave ~1e-2, two rows ~1e-4.
    error = (out.double() - exact).norm(dim=1) / exact.norm(dim=1)
    assert error.max() < 2e-4, error
    # One row per state (pinned to FBGEMM's grid): the 8-bit rounding the two rows avoid.
    one_row = p._one_row_product(rows, reduce_range=not quantize.has_vnni())
    one_row.scatter_(-1, top, exact.gather(-1, top).float())
    assert ((one_row.double() - exact).norm(dim=1) / exact.norm(dim=1)).min() > 1e-3
    assert torch.equal(out[:1], embedding.logits(quiet))
    assert embedding.logits(rows[None]).shape == (1, 5, 2000)


def test_int8_model_is_smaller_and_not_exportable(tmp_path):
    def size(model):
        tensors = [*model.parameters(), *model.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)

    fp32 = load_model("tiny.en", device="cpu")
    int8 = load_model("tiny.en", device="cpu", compute_type="int8")
    # A quarter for the layers; the token embedding (half of tiny.en) keeps two bytes.
    assert size(int8) < 0.45 * size(fp32)
    with pytest.raises(SusurrusError, match="int8 model cannot be exported"):
        export_openai_checkpoint(int8, tmp_path / "m.pt")


@requires_shared
def test_int8_transcribes_jfk():
    model = load_model("tiny.en", device="cpu", compute_type="int8")
    text = model.transcribe(str(AUDIO / "jfk.flac"), temperature=0.0)["text"]
    norm = EnglishTextNormalizer()
    truth = {r["file"]: r["transcript"] for r in manifest()}["jfk.flac"]
    assert jiwer.wer(norm(truth), norm(text)) == 0.0, text


def jfk_mel() -> torch.Tensor:
    from susurrus.audio import load_audio
    from susurrus.features import log_mel_spectrogram, pad_or_trim

    return pad_or_trim(log_mel_spectrogram(load_audio(str(AUDIO / "jfk.flac"))), 3000)[None]


def relative_error(features: torch.Tensor, exact: torch.Tensor) -> float:
    return ((features - exact).norm(dim=-1) / exact.norm(dim=-1)).mean().item()


@requires_shared
def test_bfloat16_encoder_layers_keep_a_float32_stream_closer_than_int8(tiny_en):
    """The encoder's products in bfloat16 (on any CPU; fast where native) around a float32
    residual stream: features within 2% of float32's on real speech, closer than an int8
    encoder's."""
    mel = jfk_mel()
    mixed = load_model("tiny.en", device="cpu")
    mixed.encoder.set_layer_dtype(torch.bfloat16)
    assert mixed.encoder.blocks[0].mlp[0].weight.dtype == torch.bfloat16
    assert mixed.encoder.conv1.weight.dtype == torch.bfloat16
    assert mixed.encoder.blocks[0].mlp_ln.weight.dtype == torch.float32
    int8 = load_model("tiny.en", device="cpu", compute_type="int8")
    with torch.inference_mode():
        exact = tiny_en.embed_audio(mel)
        features = mixed.encoder(mel)
        assert features.dtype == torch.float32  # the stream, not the layers' type
        errors = {"bfloat16": relative_error(features, exact)}
        errors["int8"] = relative_error(int8.embed_audio(mel), exact)
    assert errors["bfloat16"] < 0.02 and errors["bfloat16"] < errors["int8"], errors


@requires_shared
def test_auto_runs_an_int8_decoder_and_a_bfloat16_encoder(monkeypatch):
    """auto's layout where the CPU has bfloat16 matrix units (assumed here: bfloat16
    products run on any CPU, more slowly without them)."""
    monkeypatch.setattr(quantize, "bfloat16_tiles", lambda: True)
    auto = load_model("tiny.en", device="cpu", compute_type="auto")
    encoder_layers = [
        m for m in auto.encoder.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d))
    ]
    # Two convolutions and 4 linear layers in each of 4 blocks (queries, keys and values
    # in one: fuse_qkv).
    assert len(encoder_layers) == 2 + 4 * 4
    assert all(m.weight.dtype == torch.bfloat16 for m in encoder_layers)
    assert not any(isinstance(m, Int8Linear) for m in auto.encoder.modules())
    assert isinstance(auto.decoder.blocks[0].mlp[0], Int8Linear)
    assert auto.encoder.blocks[0].attn.attention_dtype == torch.bfloat16
    # The decoder's own keys stay in its type (the audio's are measured: kernels.py).
    assert auto.decoder.blocks[0].attn.attention_dtype is None
    # An explicit float type keeps the whole model int8 (as the other int8 types do).
    typed = load_model("tiny.en", device="cpu", compute_type="auto", dtype=torch.float32)
    assert isinstance(typed.encoder.blocks[0].mlp[0], Int8Linear)
    text = auto.transcribe(str(AUDIO / "jfk.flac"), temperature=0.0)["text"]
    assert "ask not what your country can do for you" in text.lower(), text


@requires_shared
def test_int8_wer_within_half_a_point_of_float32():
    """Every English file of the speech set: corpus WER of int8 within 0.5 points of fp32,
    greedy. The float32 text is the reference implementation's (the parity set), which
    ours equals token for token (test_transcribe.py): one pass of base fewer."""
    refs = {r["file"]: r["result"]["text"] for r in parity("base", "greedy")}
    rows = [
        r for r in manifest()
        if r["language"] == "en" and r["category"] != "nonspeech" and r["file"] in refs
    ]
    assert len(rows) >= 5
    int8 = load_model("base", device="cpu", compute_type="int8")
    norm = EnglishTextNormalizer()
    truth = [norm(r["transcript"]) for r in rows]
    texts = {
        "float32": [norm(refs[r["file"]]) for r in rows],
        "int8": [
            norm(int8.transcribe(str(AUDIO / r["file"]), language="en", temperature=0.0)["text"])
            for r in rows
        ],
    }
    fp32_wer, int8_wer = (jiwer.wer(truth, texts[n]) for n in ("float32", "int8"))
    assert int8_wer <= fp32_wer + 0.005, (fp32_wer, int8_wer)
    assert int8_wer < 0.15  # and it is real speech recognised, not a degenerate output


@requires_shared
def test_cli_compute_type(tmp_path):
    jfk = str(AUDIO / "jfk.flac")
    run = run_cli(
        jfk,
        "--model",
        "tiny.en",
        "--compute_type",
        "int8_bfloat16",
        "-f",
        "txt",
        "-o",
        str(tmp_path),
    )
    assert run.returncode == 0, run.stderr
    assert "ask what you can do for your country" in (tmp_path / "jfk.txt").read_text()
    bad = run_cli(jfk, "--compute_type", "int4")
    assert bad.returncode == 2 and "invalid choice: 'int4'" in bad.stderr


@pytest.mark.skipif(not quantize.fbgemm_built(), reason="no FBGEMM")
def test_int8_many_row_kernels_agree():
    """Both kernels an int8 layer's products of many rows can take (the encoder's frames,
    a prompt) give the float layer's output to within int8 precision, each row on its own
    scale; the dequantized one is the float product of the int8 weight, activations as
    they are."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(512, 384)
    layer = Int8Linear(linear.weight, linear.bias)
    x = torch.randn(1, 100, 512) * torch.logspace(-3, 2, 100)[None, :, None]
    exact = linear(x)
    outputs = {}
    for name in quantize.ROWS_KERNELS:
        layer.rows_kernel = name
        out = outputs[name] = layer(x)
        relative = (out - exact).norm(dim=-1) / exact.norm(dim=-1)
        assert relative.max() < 0.02, (name, relative.max())
    dequantized = layer.weight_int8.float() * layer.scale[:, None]
    assert torch.allclose(outputs["dequantized"], F.linear(x, dequantized, layer.bias),
                          rtol=1e-5, atol=1e-5)
    # Rounding the activations to 8 bits is most of what sets the two apart.
    assert not torch.equal(outputs["int_mm"], outputs["dequantized"])
    # A prompt of a few rows, or of many through each float32 kernel the dequantized
    # product may be measured fastest with: the same sums whatever the thread count (the
    # engine's thread policy changes it with the load), and the float product's numbers
    # up to the order of sums.
    layer.rows_kernel = "dequantized"
    threads = torch.get_num_threads()
    try:
        for product in [None, *kernels.CANDIDATES.values()]:
            layer.float_product = product
            for rows in (3, 5, 10, 70, 100):
                results = []
                for count in (1, 2):
                    torch.set_num_threads(count)
                    results.append(layer(x[:, :rows]))
                assert torch.equal(*results), (product, rows)
                moved = (results[0] - outputs["dequantized"][:, :rows]).norm(dim=-1)
                assert (moved / exact[:, :rows].norm(dim=-1)).max() < 1e-6, (product, rows)
    finally:
        torch.set_num_threads(threads)


@requires_shared
@pytest.mark.parametrize("name", quantize.ROWS_KERNELS)
def test_int8_transcribes_jfk_with_either_many_row_kernel(name, monkeypatch):
    monkeypatch.setenv("SUSURRUS_INT8_ROWS", name)
    model = load_model("tiny.en", device="cpu", compute_type="int8")
    assert model.encoder.blocks[0].mlp[0].rows_kernel == name
    text = model.transcribe(str(AUDIO / "jfk.flac"), temperature=0.0)["text"]
    truth = {r["file"]: r["transcript"] for r in manifest()}["jfk.flac"]
    norm = EnglishTextNormalizer()
    assert jiwer.wer(norm(truth), norm(text)) == 0.0, text
