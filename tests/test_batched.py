"""Batched long-form transcription: windows planned at pauses, decoded several at a time."""

from __future__ import annotations

import jiwer
import pytest
import torch
from whisper_normalizer.english import EnglishTextNormalizer

from susurrus import load_audio, log_mel_spectrogram, pad_or_trim
from susurrus.decoding import DecodingOptions, decode
from susurrus.features import N_FRAMES
from susurrus.tokenizer import get_tokenizer
from susurrus.windows import FrameReader, loudness, pack_spans, plan_windows

from .conftest import AUDIO, manifest, parity, requires_shared
from .test_cli import run as run_cli

LONG = "en_lj_LJ001-0001-0016_concat.flac"  # 111 s of continuous reading


def test_windows_cut_at_the_quietest_point():
    mel = torch.full((80, 7000), 0.5)
    mel[:, 2300:2330] = -1.0  # pauses within 3 s of the even cuts (2333, 4667)
    mel[:, 4900:4940] = -1.0
    windows = plan_windows(mel, [(0, 7000)])
    assert len(windows) == 3  # 70 s: three windows of 27 s at most on average
    assert windows[0] == (0, pytest.approx(2315, abs=15))
    assert 4900 <= windows[1][1] <= 4940
    assert all(0 < end - start <= N_FRAMES for start, end in windows)
    # Contiguous and covering everything.
    assert windows[0][0] == 0 and windows[-1][1] == 7000
    assert all(a[1] == b[0] for a, b in zip(windows, windows[1:]))


def test_long_spans_become_the_fewest_windows_of_about_equal_length():
    torch.manual_seed(0)
    mel = torch.randn(80, 30_000)
    # One window up to 30 s; beyond, windows of 27 s at most on average (room for a cut to
    # move 3 s), as few as that allows.
    for end, count in ((3000, 1), (3001, 2), (5400, 2), (5401, 3), (8101, 4), (29_999, 12)):
        windows = plan_windows(mel, [(0, end)])
        assert len(windows) == count
        assert windows[0][0] == 0 and windows[-1][1] == end
        assert all(a[1] == b[0] for a, b in zip(windows, windows[1:]))
        even = end / len(windows)
        for start, stop in windows:
            assert 0 < stop - start <= N_FRAMES
            assert abs((stop - start) - even) <= 601  # each cut within 3 s of its even place


def test_frame_reader_loudness_equals_the_whole_recordings():
    torch.manual_seed(0)
    mel = torch.randn(80, 5000)
    whole = loudness(mel)
    reader = FrameReader(mel, 5000)
    for lo, hi in ((0, 300), (2, 40), (1000, 1500), (4700, 4999), (4990, 4999)):
        assert torch.allclose(reader.level(lo, hi), whole[lo : hi + 1], atol=1e-6)
    reader.release(4000)
    assert torch.equal(reader(4000, 4010), mel[:, 4000:4010])
    assert reader._frames.shape[1] == 1000  # only frames 4000 to 4999 are kept
    assert torch.equal(reader(3000, 3010), mel[:, 3000:3010])  # going back reads again


def test_no_frames_no_windows():
    assert plan_windows(torch.zeros(80, 0), [(0, 0)]) == []


def test_spans_are_packed_only_while_they_fit_a_window():
    assert pack_spans([(0, 500), (700, 1500), (2000, 2900), (3100, 3500)]) == [
        (0, 2900),
        (3100, 3500),
    ]
    assert pack_spans([(0, 4000), (4100, 4200)]) == [(0, 4000), (4100, 4200)]


@requires_shared
@pytest.mark.parametrize("beam_size", [None, 5])
def test_windows_with_different_prompts_decode_together_as_alone(tiny_en, beam_size):
    """Prompts of different lengths are left-padded in one batch: each window gives the
    tokens it gives decoded alone with its prompt (float32, greedy and beam search)."""
    mel = log_mel_spectrogram(load_audio(str(AUDIO / LONG)))
    mels = torch.stack([pad_or_trim(mel[:, s : s + N_FRAMES], N_FRAMES) for s in (0, 3000, 6000)])
    tokenizer = get_tokenizer(False)
    prompts = [
        None,
        tokenizer.encode(" Printing, in the only sense with which we are at present concerned."),
        " Hello.",
    ]
    options = DecodingOptions(language="en", beam_size=beam_size)
    together = decode(tiny_en, mels, options, prompts=prompts)
    for i, result in enumerate(together):
        alone = decode(tiny_en, mels[i], options, prompts=[prompts[i]])
        assert result.tokens == alone.tokens
        assert len(result.tokens) > 10  # real text, not an empty window
        assert result.avg_logprob == pytest.approx(alone.avg_logprob, abs=1e-4)
        assert result.no_speech_prob == pytest.approx(alone.no_speech_prob, abs=1e-4)
    with pytest.raises(ValueError, match="2 prompts given for 3 windows"):
        decode(tiny_en, mels, options, prompts=prompts[:2])


@pytest.fixture(scope="module")
def long_results(base):
    audio = str(AUDIO / LONG)
    # Sequential decoding: the reference's, which ours gives token for token
    # (test_transcribe.py checks that on this file).
    sequential = next(r for r in parity("base", "greedy") if r["file"] == LONG)["result"]
    batched = base.transcribe(
        audio, language="en", temperature=0.0, batch_size=4, word_timestamps=True
    )
    return sequential, batched


@requires_shared
def test_batched_wer_within_half_a_point_of_sequential(long_results):
    truth = {r["file"]: r["transcript"] for r in manifest()}[LONG]
    norm = EnglishTextNormalizer()
    sequential, batched = long_results
    seq_wer = jiwer.wer(norm(truth), norm(sequential["text"]))
    batch_wer = jiwer.wer(norm(truth), norm(batched["text"]))
    assert batch_wer <= seq_wer + 0.005, (seq_wer, batch_wer)


@requires_shared
def test_batched_segments_and_words_are_ordered_and_inside_the_audio(long_results):
    _, batched = long_results
    segments = batched["segments"]
    assert [s["id"] for s in segments] == list(range(len(segments)))
    starts = [s["start"] for s in segments]
    assert starts == sorted(starts) and segments[-1]["end"] <= 111.0 + 0.02
    words = [w for s in segments for w in s["words"]]
    assert len(words) > 200
    for s in segments:
        for w in s["words"]:
            assert s["start"] - 0.01 <= w["start"] <= w["end"] <= s["end"] + 0.01
    assert all(a["start"] <= b["start"] for a, b in zip(words, words[1:]))


@requires_shared
def test_batched_with_vad_and_bad_batch_size(tiny_en, tmp_path):
    result = tiny_en.transcribe(str(AUDIO / "jfk.flac"), batch_size=2, vad=True)
    assert "ask what you can do for your country" in result["text"]
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        tiny_en.transcribe(str(AUDIO / "jfk.flac"), batch_size=0)
    run = run_cli(
        str(AUDIO / "jfk.flac"), "--model", "tiny.en", "--batch_size", "0", "-o", str(tmp_path)
    )
    assert run.returncode == 2 and "--batch_size must be at least 1" in run.stderr
