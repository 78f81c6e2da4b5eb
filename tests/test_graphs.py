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


def jfk_features(model):
    mel = pad_or_trim(log_mel_spectrogram(load_audio(str(AUDIO / "jfk.flac"))), 3000)
    return model.embed_audio(mel[None])


def prefill_both(model, features, prompt, pads=None):
    """An eager cache and a StaticStep over the same audio, both fed `prompt` (rows
    left-padded by `pads`); returns them and the logits after the prompt."""
    batch = prompt.shape[0]
    eager = model.decoder.new_cache(batch)
    step = StaticStep(model.decoder, batch=batch, n_audio=features.shape[0], n_audio_ctx=1500)
    if pads is not None:
        eager.pad = step.cache.pad = pads
        step.pad.copy_(pads)
    model.decoder.fill_cross_cache(eager, features)
    model.decoder.fill_cross_cache(step.cache, features)
    first = model.decoder.logits(model.decoder(prompt, eager)[:, -1])
    model.decoder(prompt, step.cache)
    return eager, step, first


def follow_greedy(model, eager, step, first, n_tokens):
    """The static step gives the decoder's logits (and choices) token after token."""
    token = first.argmax(-1, keepdim=True)
    for _ in range(n_tokens):
        expected = model.decoder.logits(model.decoder(token, eager)[:, -1])
        got = step(token)
        assert torch.allclose(got, expected, atol=1e-3), (got - expected).abs().max()
        assert torch.equal(got.argmax(-1), expected.argmax(-1))
        token = expected.argmax(-1, keepdim=True)


@requires_shared
@torch.inference_mode()
def test_static_step_matches_the_decoder(tiny_en):
    """Same function a GPU captures, run eagerly on the CPU: greedy steps give the same
    logits as the decoder with its growing cache, for 30 tokens of real speech."""
    features = jfk_features(tiny_en)
    prompt = torch.tensor([list(get_tokenizer(False).sot_sequence)])
    eager, step, first = prefill_both(tiny_en, features, prompt)
    assert step.cache.cross_k[0].data_ptr() != features.data_ptr()  # written in place
    follow_greedy(tiny_en, eager, step, first, 30)
    assert step.cache.length == eager.length


@requires_shared
@torch.inference_mode()
def test_static_step_matches_the_decoder_with_left_padded_rows(tiny_en):
    """Two rows whose prompts differ in length: the static step (positions and mask from
    the padding buffer) follows the decoder's padded cache."""
    model = tiny_en
    features = jfk_features(model).repeat(2, 1, 1)
    tokenizer = get_tokenizer(False)
    sot = list(tokenizer.sot_sequence)
    long = [tokenizer.sot_prev, *tokenizer.encode(" My fellow Americans, listen."), *sot]
    short = [tokenizer.sot_prev, *tokenizer.encode(" Hi."), *sot]
    pad = len(long) - len(short)
    prompt = torch.tensor([long, [tokenizer.eot] * pad + short])
    eager, step, first = prefill_both(model, features, prompt, pads=torch.tensor([0, pad]))
    follow_greedy(model, eager, step, first, 20)
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
