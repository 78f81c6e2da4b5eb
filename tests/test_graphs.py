"""The one decoding step: eager over the active rows, or with static shapes over the whole
table (what a CUDA graph replays), against the plain cached decoder."""

from __future__ import annotations

import pytest
import torch

from susurrus import load_audio, log_mel_spectrogram, pad_or_trim
from susurrus.decoding import DecodingOptions, decode
from susurrus.engine import Engine, WindowJob, decode_jobs
from susurrus.engine.step import Run, decoder_step
from susurrus.tokenizer import get_tokenizer

from .conftest import AUDIO, requires_shared

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
LONG = "en_lj_LJ001-0001-0016_concat.flac"


def windows(count: int) -> torch.Tensor:
    mel = log_mel_spectrogram(load_audio(str(AUDIO / LONG)))
    starts = range(0, 3000 * count, 3000)
    return torch.stack([pad_or_trim(mel[:, s : s + 3000], 3000) for s in starts])


@requires_shared
@torch.inference_mode()
def test_rows_at_different_positions_step_as_the_plain_decoder(tiny_en):
    """Two rows whose prompts differ in length, in one step with a position per row: each
    gets the logits the plain decoder gives it alone, token after token."""
    model = tiny_en
    features = model.embed_audio(windows(1))
    tokenizer = get_tokenizer(False)
    sot = list(tokenizer.sot_sequence)
    prompt = [tokenizer.sot_prev, *tokenizer.encode(" My fellow Americans, listen."), *sot]
    prompts = [prompt, sot]
    decoder = model.decoder
    alone, tokens = [], []
    for prompt in prompts:
        cache = decoder.new_cache(1)
        decoder.fill_cross_cache(cache, features)
        logits = decoder.logits(decoder(torch.tensor([prompt]), cache)[:, -1])
        alone.append(cache)
        tokens.append(int(logits.argmax()))
    # The table: both rows' caches side by side, each filled to its own length.
    self_k, self_v, cross_k, cross_v = (
        [torch.cat([getattr(c, name)[i] for c in alone]) for i in range(len(decoder.blocks))]
        for name in ("self_k", "self_v", "cross_k", "cross_v")
    )
    positions = [len(p) for p in prompts]
    for _ in range(20):
        got = decoder_step(
            decoder,
            torch.tensor(tokens)[:, None],
            torch.tensor(positions),
            self_k,
            self_v,
            cross_k,
            cross_v,
            (Run(0, 2, 0, 2, 1),),
        )
        for row, cache in enumerate(alone):
            expected = decoder.logits(decoder(torch.tensor([[tokens[row]]]), cache)[:, -1])[0]
            assert torch.allclose(got[row], expected, atol=1e-3), (got[row] - expected).abs().max()
            assert int(got[row].argmax()) == int(expected.argmax())
            tokens[row] = int(expected.argmax())
        positions = [p + 1 for p in positions]
    assert len(set(positions)) == 2  # the rows really stood at different positions


@requires_shared
@pytest.mark.parametrize("beam_size", [None, 5])
def test_static_steps_decode_as_eager_steps(tiny_en, beam_size):
    """The static-shape step a GPU captures, run on the CPU over the whole table, gives the
    eager step's tokens; with room for two windows, the third joins when one leaves."""
    features = tiny_en.embed_audio(windows(3))
    options = DecodingOptions(language="en", beam_size=beam_size)

    def run(static: bool) -> list[list[int]]:
        jobs = [WindowJob(options, features=f) for f in features]
        engine = Engine(tiny_en, max_batch=2, static_steps=static)
        return [r.tokens for r in decode_jobs(engine, jobs)]

    eager, static = run(False), run(True)
    assert eager == static
    assert all(len(tokens) > 20 for tokens in eager)


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
