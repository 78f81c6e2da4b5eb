"""Word-level timestamps and the hallucination guard, on real speech against the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from susurrus.timing import (
    WordTiming,
    dtw,
    is_segment_anomaly,
    median_filter,
    merge_punctuations,
    word_anomaly_score,
)

from .conftest import AUDIO, parity, requires_shared


def naive_dtw(x: np.ndarray) -> tuple[list[int], list[int]]:
    """Cell-by-cell dynamic time warping with the reference's step rule, to check against."""
    n, m = x.shape
    cost = np.full((n + 1, m + 1), np.inf, dtype=np.float32)
    cost[0, 0] = 0
    step = np.zeros((n + 1, m + 1), dtype=int)
    for j in range(1, m + 1):
        for i in range(1, n + 1):
            c0, c1, c2 = cost[i - 1, j - 1], cost[i - 1, j], cost[i, j - 1]
            if c0 < c1 and c0 < c2:
                c, t = c0, 0
            elif c1 < c0 and c1 < c2:
                c, t = c1, 1
            else:
                c, t = c2, 2
            cost[i, j] = x[i - 1, j - 1] + c
            step[i, j] = t
    step[0, :], step[:, 0] = 2, 1
    i, j, path = n, m, []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        t = step[i, j]
        i, j = (i - 1, j - 1) if t == 0 else (i - 1, j) if t == 1 else (i, j - 1)
    rows, cols = zip(*reversed(path))
    return list(rows), list(cols)


def test_dtw_hand_made_path() -> None:
    # The zero cells form the only free path: token 1 spans frames 1-2.
    x = np.array([[0, 5, 5, 5], [5, 0, 0, 5], [5, 5, 5, 0]], dtype=float)
    rows, cols = dtw(x)
    assert rows.tolist() == [0, 1, 1, 2]
    assert cols.tolist() == [0, 1, 2, 3]
    # More tokens than frames: two tokens share frame 1.
    x = np.array([[0, 9], [9, 0], [9, 0]], dtype=float)
    rows, cols = dtw(torch.tensor(x))
    assert rows.tolist() == [0, 1, 2]
    assert cols.tolist() == [0, 1, 1]
    # A three-way tie goes horizontal first, as the reference breaks ties.
    rows, cols = dtw(np.zeros((2, 2)))
    assert rows.tolist() == [0, 1, 1]
    assert cols.tolist() == [0, 0, 1]


def test_dtw_matches_cell_by_cell() -> None:
    rng = np.random.default_rng(0)
    for n, m in [(1, 1), (1, 7), (7, 1), (5, 9), (12, 40), (30, 31)]:
        for x in (rng.standard_normal((n, m)), rng.integers(0, 3, (n, m)).astype(float)):
            rows, cols = dtw(x)
            assert (rows.tolist(), cols.tolist()) == naive_dtw(x)


def test_median_filter_matches_naive() -> None:
    x = torch.randn(3, 4, 50)
    pad = 3
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (pad, pad)), mode="reflect")
    expected = np.stack([np.median(padded[..., k : k + 7], axis=-1) for k in range(50)], -1)
    np.testing.assert_allclose(median_filter(x, 7).numpy(), expected)
    short = torch.randn(2, 3)
    assert torch.equal(median_filter(short, 7), short)  # too short to pad: unchanged


def test_merge_punctuations() -> None:
    words = [' "', "Hello", ",", " world", ".", '"', " (", "x", ")"]
    alignment = [WordTiming(w, [i], 0.0, 1.0, 1.0) for i, w in enumerate(words)]
    merge_punctuations(alignment, "\"'“¿([{-", "\"'.。,，!！?？:：”)]}、")
    assert [a.word for a in alignment if a.word] == [' "Hello,', ' world."', " (x)"]
    assert [a.tokens for a in alignment if a.word] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def test_anomaly_score() -> None:
    plausible = {"word": " fine", "start": 1.0, "end": 1.4, "probability": 0.9}
    assert word_anomaly_score(plausible) == 0.0
    improbable_and_short = {"word": " uh", "start": 1.0, "end": 1.0, "probability": 0.1}
    assert word_anomaly_score(improbable_and_short) == pytest.approx(1 + 0.133 * 15)
    assert word_anomaly_score({"word": " so", "start": 0.0, "end": 3.5}) == pytest.approx(2.5)
    assert not is_segment_anomaly({"words": [plausible] * 3})
    assert is_segment_anomaly({"words": [improbable_and_short, {**plausible, "word": "."}]})
    assert not is_segment_anomaly(None)


# Word timestamps against the reference's words (greedy, word_timestamps=True).

BASE_FILES = [
    "jfk.flac",
    "en_ls_1995-1837-0001.flac",
    "en_ls_1272-128104-0000.flac",
    "en_ls_61-70968-0002.flac",
    "en_lj_LJ002-0020.flac",
    "en_mfa_acoustic_corpus.flac",
    "en_cv_22058264.flac",
    "en_cv_22058267.flac",
    "en_arctic_a0024.flac",
    "en_lj_LJ001-0002.flac",
    "en_lj_LJ001-0005.flac",
    "en_lj_LJ001-0008.flac",
    "en_lj_LJ001-0011.flac",
    "en_lj_LJ001-0013.flac",
    "en_lj_LJ001-0015.flac",
    "en_lj_LJ001-0001-0016_concat.flac",  # 111 s: several windows, seeks moved by words
    "zh_aishell_BAC009S0724W0121.flac",  # words are characters
    "zh_funasr_asr_example.flac",
    "ja_picovoice_test_ja.flac",
    "de_picovoice_test_de.flac",
]
TINY_EN_FILES = ["jfk.flac", "en_ls_1995-1837-0001.flac"]


def transcribe_words(model, file: str, language: str, **options) -> dict:
    return model.transcribe(
        str(AUDIO / file),
        temperature=0.0,
        condition_on_previous_text=True,
        language=language,
        word_timestamps=True,
        **options,
    )


def check_words(ours: dict, ref: dict) -> tuple[float, float]:
    """Assert parity with the reference result; return (median, max) word-time difference."""
    tokens = [t for s in ours["segments"] for t in s["tokens"]]
    assert tokens == [t for s in ref["segments"] for t in s["tokens"]], "decoding differs"
    ours_words = [w for s in ours["segments"] for w in s["words"]]
    ref_words = [w for s in ref["segments"] for w in s["words"]]
    assert [w["word"] for w in ours_words] == [w["word"] for w in ref_words]
    # Each segment's words too, not only their concatenation.
    assert [len(s["words"]) for s in ours["segments"]] == [len(s["words"]) for s in ref["segments"]]
    diffs = np.abs(
        [[a[k] - b[k] for k in ("start", "end")] for a, b in zip(ours_words, ref_words)]
    ).ravel()
    assert np.median(diffs) <= 0.10
    probs = [(a["probability"], b["probability"]) for a, b in zip(ours_words, ref_words)]
    assert [p for p, _ in probs] == pytest.approx([q for _, q in probs], abs=1e-3)
    for a, b in zip(ours["segments"], ref["segments"]):
        assert a["seek"] == b["seek"]
        assert a["start"] == pytest.approx(b["start"], abs=0.1)
        assert a["end"] == pytest.approx(b["end"], abs=0.1)
    return float(np.median(diffs)), float(diffs.max())


@requires_shared
@pytest.mark.parametrize("file", BASE_FILES)
def test_base_words_match_reference(base, file: str) -> None:
    ref = next(r for r in parity("base", "words") if r["file"] == file)
    median, largest = check_words(transcribe_words(base, file, ref["language"]), ref["result"])
    print(f"{file}: word times differ by median {median:.3f} s, max {largest:.3f} s")


@requires_shared
@pytest.mark.parametrize("file", TINY_EN_FILES)
def test_tiny_en_words_match_reference(tiny_en, file: str) -> None:
    # English-only: a one-token start sequence, so the alignment rows start elsewhere.
    ref = next(r for r in parity("tiny.en", "words") if r["file"] == file)
    check_words(transcribe_words(tiny_en, file, "en"), ref["result"])


# The hallucination guard (hallucination_silence_threshold, with word timestamps).


@requires_shared
def test_guard_silences_nonspeech(base) -> None:
    # Without the guard the reference (and we) hallucinate a Swedish sentence here.
    ref = next(r for r in parity("base", "words") if r["file"] == "sv_nst_u0016001_nonspeech.flac")
    assert ref["result"]["text"].strip()
    result = transcribe_words(
        base, "sv_nst_u0016001_nonspeech.flac", "sv", hallucination_silence_threshold=2
    )
    assert result["text"] == ""
    assert all(not s["text"] and not s["words"] for s in result["segments"])


def test_guard_silences_noise(base) -> None:
    # 30 s of digital silence with a -60 dBFS noise floor. Undetermined language: detection
    # picks one, and the decode hallucinates text there (with high no-speech probability but
    # confident tokens, so the no-speech check alone keeps it); the guard drops it.
    rng = np.random.default_rng(0)
    audio = (rng.standard_normal(30 * 16000) * 1e-3).astype(np.float32)
    options = {"temperature": 0.0, "word_timestamps": True}
    result = base.transcribe(audio, hallucination_silence_threshold=2, **options)
    assert result["text"] == ""
    assert all(not s["words"] for s in result["segments"])


@requires_shared
def test_guard_keeps_speech(base) -> None:
    ref = next(r for r in parity("base", "words") if r["file"] == "jfk.flac")
    result = transcribe_words(base, "jfk.flac", "en", hallucination_silence_threshold=2)
    assert result["text"] == ref["result"]["text"]
    check_words(result, ref["result"])


@requires_shared
def test_word_times_beside_another_thread_using_the_model(tiny_en) -> None:
    """Word times found while another thread runs decoder passes on the same model (the
    reference API's `model.logits`) are the ones found alone: the alignment pass's queries
    used to be caught by forward hooks on the shared modules, which every thread's pass
    fired (other times, or `stack expects each tensor to be equal size`)."""
    import threading
    import time

    from susurrus import load_audio, log_mel_spectrogram, pad_or_trim

    def words(result: dict) -> list[tuple]:
        return [(w["word"], w["start"], w["end"], round(w["probability"], 4))
                for s in result["segments"] for w in s["words"]]

    alone = words(tiny_en.transcribe(str(AUDIO / "jfk.flac"), word_timestamps=True))
    mel = log_mel_spectrogram(pad_or_trim(load_audio(str(AUDIO / "en_lj_LJ001-0008.flac"))),
                              tiny_en.dims.n_mels)
    with torch.inference_mode():
        features = tiny_en.embed_audio(mel[None])
    tokens = torch.tensor([[50257, 50362, *range(300, 340)]])
    stop = threading.Event()

    def passes() -> None:
        with torch.inference_mode():
            while not stop.is_set():
                tiny_en.logits(tokens, features)

    other = threading.Thread(target=passes)
    other.start()
    try:
        runs = []
        started = time.monotonic()
        while len(runs) < 4 or (time.monotonic() - started < 8 and len(runs) < 12):
            runs.append(words(tiny_en.transcribe(str(AUDIO / "jfk.flac"), word_timestamps=True)))
    finally:
        stop.set()
        other.join(60)
    assert all(run == alone for run in runs)
