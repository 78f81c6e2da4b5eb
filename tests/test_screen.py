"""The int8 screen of greedy float32 steps (screen.py): its bound holds on real speech, it
never changes a token, and the log-probabilities it defers are the float32 ones."""

from __future__ import annotations

import pytest
import torch

from susurrus import kernels, load_model, native
from susurrus.screen import (
    DeferredSteps,
    LogitScreen,
    add_in_order,
    supported,
    supported_kernels,
)
from susurrus.tokenizer import get_tokenizer

from .conftest import AUDIO, manifest, requires_shared

pytestmark = pytest.mark.skipif(not supported(), reason="no int8-weight kernel in this torch")


def _hidden_of_real_text(model, text: str) -> torch.Tensor:
    """The decoder's final hidden states over a real sentence after jfk's audio, as its
    greedy steps see them (one position per row)."""
    from susurrus import load_audio, log_mel_spectrogram, pad_or_trim

    tokenizer = get_tokenizer(model.is_multilingual)
    mel = log_mel_spectrogram(pad_or_trim(load_audio(str(AUDIO / "jfk.flac"))))
    tokens = torch.tensor([list(tokenizer.sot_sequence) + tokenizer.encode(" " + text)])
    with torch.inference_mode():
        features = model.encoder(mel[None])
        cache = model.decoder.new_cache(1, n_ctx=tokens.shape[1])
        model.decoder.fill_cross_cache(cache, features)
        return model.decoder.ln(model.decoder(tokens, cache))[0]


def _jfk_text() -> str:
    return next(row["transcript"] for row in manifest() if row["file"] == "jfk.flac")


KERNELS = [k for k in ("native", "fbgemm", "int8pack") if k in supported_kernels()]


def _screened_jfk(model, kernel: str) -> tuple[LogitScreen, torch.Tensor, ...]:
    """A screen through `kernel`, jfk's hidden states, their float32 logits, and the
    screen's logits and activation errors."""
    hidden = _hidden_of_real_text(model, _jfk_text())
    weight = model.decoder.token_embedding.weight.detach()
    screen = LogitScreen(weight, kernel=kernel)
    with torch.inference_mode():
        logits, error = screen.approximate(hidden)
        return screen, hidden, hidden @ weight.T, logits, error


@requires_shared
@pytest.mark.parametrize("kernel", KERNELS)
def test_the_bound_holds_and_the_best_token_is_exact_on_real_speech(tiny_en, kernel):
    screen, hidden, exact, logits, error = _screened_jfk(tiny_en, kernel)
    with torch.inference_mode():
        size = torch.linalg.vector_norm(hidden, dim=1, keepdim=True)
        bound = screen._bound(size, error, logits[:, : screen.split], torch.arange(screen.split))
        gap = (exact[:, : screen.split] - logits[:, : screen.split]).abs()
        assert bool((gap <= bound).all())
        assert bool((gap > 0).any())  # the screen is not the float32 product itself
        # Past the screen, every logit is the float32 one.
        torch.testing.assert_close(logits[:, screen.split :], exact[:, screen.split :],
                                   rtol=1e-5, atol=1e-4)
        screen.refine(logits, hidden, error)
    assert logits.argmax(dim=1).tolist() == exact.argmax(dim=1).tolist()
    best = exact.argmax(dim=1, keepdim=True)
    torch.testing.assert_close(logits.gather(1, best), exact.gather(1, best),
                               rtol=1e-5, atol=1e-4)
    # One row at a time too, as a single window's greedy steps go.
    with torch.inference_mode():
        for row, expected in zip(hidden, best[:, 0].tolist()):
            alone, alone_error = screen.approximate(row[None])
            screen.refine(alone, row[None], alone_error)
            assert int(alone.argmax()) == expected


@requires_shared
@pytest.mark.parametrize("kernel", KERNELS)
def test_masked_tokens_stay_masked_and_the_best_unmasked_one_is_found(tiny_en, kernel):
    screen, hidden, exact, logits, error = _screened_jfk(tiny_en, kernel)
    with torch.inference_mode():
        # Mask each row's best three ordinary tokens: the best of the rest must come out.
        top = exact[:, : screen.split].topk(3, dim=1).indices
        logits.scatter_(1, top, float("-inf"))
        exact.scatter_(1, top, float("-inf"))
        # And one row with every ordinary token masked.
        logits[0, : screen.split] = float("-inf")
        exact[0, : screen.split] = float("-inf")
        screen.refine(logits, hidden, error)
    assert bool(torch.isinf(logits.gather(1, top)).all())
    assert bool(torch.isinf(logits[0, : screen.split]).all())
    assert logits.argmax(dim=1).tolist() == exact.argmax(dim=1).tolist()


@requires_shared
def test_deferred_log_probabilities_are_the_float32_ones(tiny_en):
    hidden = _hidden_of_real_text(tiny_en, _jfk_text())
    weight = tiny_en.decoder.token_embedding.weight.detach()
    screen = LogitScreen(weight)
    n_vocab = weight.shape[0]
    suppress = torch.zeros(n_vocab, dtype=torch.bool)
    suppress[[1, 2, 7, 11, 50257]] = True
    blank = torch.zeros(n_vocab, dtype=torch.bool)
    blank[220] = True
    steps = DeferredSteps()
    expected = []
    with torch.inference_mode():
        full = hidden @ weight.T
        for i, row in enumerate(full):
            row = row.masked_fill(suppress, float("-inf"))
            if i == 0:
                row = row.masked_fill(blank, float("-inf"))
            if i == 3:  # the timestamp rules masked every text token at this step
                row[: screen.split] = float("-inf")
            token = int(row.argmax())
            expected.append(float(row.double().log_softmax(dim=0)[token]))
            steps.add(hidden[i], row[screen.split :].clone(), token, i == 3, i == 0)
        got = screen.log_probs(steps, suppress, blank)
    # The float64 values of the float32 logits: within 1e-6 through the native kernel,
    # within a few 1e-5 through PyTorch's float32 log_softmax (where it cannot build).
    assert got.tolist() == pytest.approx(expected, abs=1e-6 if native.available() else 1e-4)
    assert add_in_order(0.0, got) == pytest.approx(sum(expected), abs=1e-4)


@requires_shared
@pytest.mark.parametrize("model_name", ["tiny.en", "base"])
def test_a_screened_transcript_is_the_float32_one(model_name, monkeypatch):
    """Token for token and log-probability for log-probability (to the order of float
    sums), with the screen forced on and off, on a minute of real speech."""
    path = str(AUDIO / "en_lj_LJ001-0001-0016_concat.flac")
    results = {}
    for choice in kernels.SCREEN:
        monkeypatch.setenv(kernels.ENV_FORCE_SCREEN, choice)
        model = load_model(model_name, device="cpu")
        assert (model.decoder.screen is not None) == (choice == "screen")
        # Its first minute: two windows, the second with the first's text as a prompt.
        results[choice] = model.transcribe(
            path, language="en", temperature=0.0, clip_timestamps="0,60"
        )
    screened, full = results["screen"], results["full"]
    assert [s["tokens"] for s in screened["segments"]] == [s["tokens"] for s in full["segments"]]
    assert "printing" in screened["text"].lower()
    for a, b in zip(screened["segments"], full["segments"]):
        assert a["avg_logprob"] == pytest.approx(b["avg_logprob"], abs=1e-5)
