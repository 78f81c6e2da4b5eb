import numpy as np
import pytest
import torch

from susurrus import load_audio, log_mel_spectrogram, pad_or_trim
from susurrus.features import N_FRAMES, N_SAMPLES

from .conftest import AUDIO, SHARED, requires_shared


def reference_log_mel(audio: np.ndarray, filters: np.ndarray) -> np.ndarray:
    """The log-mel definition written out in float64 NumPy, independently of torch."""
    n_fft, hop = 400, 160
    padded = np.pad(audio.astype(np.float64), n_fft // 2, mode="reflect")
    n_frames = 1 + (len(padded) - n_fft) // hop
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    frames = np.stack([padded[i * hop : i * hop + n_fft] for i in range(n_frames)])
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2
    mel = filters.astype(np.float64) @ power[:-1].T
    log_spec = np.log10(np.maximum(mel, 1e-10))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


@requires_shared
@pytest.mark.parametrize("n_mels", [80, 128])
@pytest.mark.parametrize("name", ["jfk.flac", "zh_aishell_BAC009S0724W0121.flac"])
def test_log_mel_matches_float64_definition(name, n_mels):
    audio = load_audio(AUDIO / name)
    filters = np.load(SHARED / "reference" / "mel_filters.npz")[f"mel_{n_mels}"]
    ours = log_mel_spectrogram(audio, n_mels).numpy()
    expected = reference_log_mel(audio, filters)
    assert ours.shape == (n_mels, len(audio) // 160)
    assert np.abs(ours - expected).max() < 1e-4


@requires_shared
def test_padding_appends_silence_and_paths_work():
    mel = log_mel_spectrogram(str(AUDIO / "jfk.flac"), 80, padding=N_SAMPLES)
    audio = load_audio(AUDIO / "jfk.flac")
    assert mel.shape[-1] == (len(audio) + N_SAMPLES) // 160


def test_pad_or_trim_numpy_and_torch():
    x = np.arange(10, dtype=np.float32)
    assert pad_or_trim(x, 4).tolist() == [0, 1, 2, 3]
    assert pad_or_trim(x, 12).tolist() == list(range(10)) + [0, 0]
    m = torch.ones(80, 100)
    assert pad_or_trim(m, N_FRAMES).shape == (80, N_FRAMES)
    assert pad_or_trim(m, N_FRAMES)[:, 100:].abs().sum() == 0
    assert pad_or_trim(torch.ones(2, 80, 5000), N_FRAMES).shape == (2, 80, N_FRAMES)


@requires_shared
def test_chunked_equals_whole():
    """Long audio is transformed a chunk at a time; the seams must not show."""
    audio = load_audio(AUDIO / "jfk.flac")
    whole = log_mel_spectrogram(audio, 80, padding=N_SAMPLES, chunk_frames=10**9)
    chunked = log_mel_spectrogram(audio, 80, padding=N_SAMPLES, chunk_frames=333)
    assert torch.equal(whole, chunked)
    window = torch.hann_window(400)
    stft = torch.stft(
        torch.nn.functional.pad(torch.from_numpy(audio), (0, N_SAMPLES)),
        400,
        160,
        window=window,
        return_complex=True,
    )
    assert stft.shape[-1] - 1 == whole.shape[-1]


def test_batch_of_clips():
    clips = torch.randn(3, 16000) * 0.1
    batch = log_mel_spectrogram(clips)
    assert batch.shape == (3, 80, 100)
    assert torch.allclose(batch[1], log_mel_spectrogram(clips[1]))
