"""The static decoding step (what a CUDA graph replays) against the ordinary decoder."""

from __future__ import annotations

import pytest
import torch

from susurrus import load_audio, log_mel_spectrogram, pad_or_trim
from susurrus.decoding import DecodingOptions, decode
from susurrus.graphs import StaticStep
from susurrus.tokenizer import get_tokenizer

from .conftest import AUDIO, requires_shared

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@requires_shared
@torch.inference_mode()
def test_static_step_matches_the_decoder(tiny_en):
    """Same function a GPU captures, run eagerly on the CPU: greedy steps give the same
    logits as the decoder with its growing cache, for 30 tokens of real speech."""
    model = tiny_en
    mel = pad_or_trim(log_mel_spectrogram(load_audio(str(AUDIO / "jfk.flac"))), 3000)
    features = model.embed_audio(mel[None])
    prompt = torch.tensor([list(get_tokenizer(False).sot_sequence)])

    eager = model.decoder.new_cache(1)
    model.decoder.fill_cross_cache(eager, features)
    step = StaticStep(model.decoder, batch=1, n_audio=1, n_audio_ctx=1500)
    model.decoder.fill_cross_cache(step.cache, features)
    assert step.cache.cross_k[0].data_ptr() != features.data_ptr()  # written in place
    first = model.decoder.logits(model.decoder(prompt, eager)[:, -1])
    model.decoder(prompt, step.cache)
    token = first.argmax(-1, keepdim=True)
    for _ in range(30):
        expected = model.decoder.logits(model.decoder(token, eager)[:, -1])
        got = step(token)
        assert torch.allclose(got, expected, atol=1e-3), (got - expected).abs().max()
        assert got.argmax() == expected.argmax()
        token = expected.argmax(-1, keepdim=True)
    assert step.cache.length == eager.length


@requires_shared
@torch.inference_mode()
def test_static_step_matches_the_decoder_with_left_padded_rows(tiny_en):
    """Two rows whose prompts differ in length: the static step (positions and mask from
    the padding buffer) follows the decoder's padded cache."""
    model = tiny_en
    mel = pad_or_trim(log_mel_spectrogram(load_audio(str(AUDIO / "jfk.flac"))), 3000)
    features = model.embed_audio(mel[None]).repeat(2, 1, 1)
    tokenizer = get_tokenizer(False)
    sot = list(tokenizer.sot_sequence)
    long = [tokenizer.sot_prev, *tokenizer.encode(" My fellow Americans, listen."), *sot]
    short = [tokenizer.sot_prev, *tokenizer.encode(" Hi."), *sot]
    pad = len(long) - len(short)
    prompt = torch.tensor([long, [tokenizer.eot] * pad + short])
    pads = torch.tensor([0, pad])

    eager = model.decoder.new_cache(2)
    eager.pad = pads
    model.decoder.fill_cross_cache(eager, features)
    step = StaticStep(model.decoder, batch=2, n_audio=2, n_audio_ctx=1500)
    step.pad.copy_(pads)
    step.cache.pad = pads
    model.decoder.fill_cross_cache(step.cache, features)
    first = model.decoder.logits(model.decoder(prompt, eager)[:, -1])
    model.decoder(prompt, step.cache)
    token = first.argmax(-1, keepdim=True)
    for _ in range(20):
        expected = model.decoder.logits(model.decoder(token, eager)[:, -1])
        got = step(token)
        assert torch.allclose(got, expected, atol=1e-3), (got - expected).abs().max()
        token = expected.argmax(-1, keepdim=True)
    # The padded row decodes as the same prompt alone would.
    alone = model.decoder.new_cache(1)
    model.decoder.fill_cross_cache(alone, features[:1])
    single = model.decoder.logits(model.decoder(torch.tensor([short]), alone)[:, -1])
    assert torch.allclose(first[1], single[0], atol=1e-3)


@cuda
@requires_shared
def test_cuda_graph_decoding_equals_eager():
    from susurrus import load_model

    model = load_model("tiny.en", device="cuda", compute_type="float32")
    mel = pad_or_trim(log_mel_spectrogram(load_audio(str(AUDIO / "jfk.flac"))), 3000).cuda()
    mels = torch.stack([mel, mel.flip(-1)])
    options = DecodingOptions(language="en", temperature=0.0)
    for beam in (None, 5):
        model.cuda_graphs = True
        graphed = decode(model, mels, options, beam_size=beam)
        model.cuda_graphs = False
        eager = decode(model, mels, options, beam_size=beam)
        assert [r.tokens for r in graphed] == [r.tokens for r in eager]
