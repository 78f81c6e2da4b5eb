"""Log-mel spectrogram: the model's view of the audio.

Numerically the reference definition: 400-point STFT with a Hann window and hop 160 at
16 kHz, power spectrum, Slaney mel filters, log10 clamped to 8 below the maximum, then
scaled to roughly [-1, 1] by (x + 4) / 4.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache
from importlib import resources

import numpy as np
import torch
import torch.nn.functional as F

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_LENGTH = 30  # seconds of audio per model window
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480000
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames per window
N_SAMPLES_PER_TOKEN = HOP_LENGTH * 2  # the encoder's second conv has stride 2
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100
TOKENS_PER_SECOND = SAMPLE_RATE // N_SAMPLES_PER_TOKEN  # 50: one timestamp step = 20 ms


@cache
def _mel_filters_cpu(n_mels: int) -> torch.Tensor:
    if n_mels not in (80, 128):
        raise ValueError(f"n_mels must be 80 or 128, not {n_mels}")
    with (resources.files("susurrus") / "assets" / "mel_filters.npz").open("rb") as f:
        return torch.from_numpy(np.load(f)[f"mel_{n_mels}"]).float()


def mel_filters(device: torch.device | str, n_mels: int) -> torch.Tensor:
    """The (n_mels, 201) Slaney mel filter bank, shipped as package data."""
    return _mel_filters_cpu(n_mels).to(device)


def pad_or_trim(array, length: int = N_SAMPLES, *, axis: int = -1):
    """Zero-pad or cut `array` (NumPy or torch) along `axis` to exactly `length`."""
    if torch.is_tensor(array):
        if array.shape[axis] > length:
            array = array.narrow(axis, 0, length)
        elif array.shape[axis] < length:
            pad = [0] * (2 * array.ndim)
            pad[2 * (array.ndim - 1 - axis % array.ndim) + 1] = length - array.shape[axis]
            array = F.pad(array, pad)
        return array
    if array.shape[axis] > length:
        array = array.take(indices=range(length), axis=axis)
    elif array.shape[axis] < length:
        widths = [(0, 0)] * array.ndim
        widths[axis] = (0, length - array.shape[axis])
        array = np.pad(array, widths)
    return array


# Frames per STFT call: one minute. Bounds the temporary complex spectrogram, so an hour of
# audio costs its log-mel output (115 MB at 80 bins) and little more.
CHUNK_FRAMES = 60 * FRAMES_PER_SECOND


def _reflect_padded(audio: torch.Tensor, total: int, start: int, stop: int) -> torch.Tensor:
    """Samples [start, stop) of `audio` followed by zeros up to `total` samples, reflect-padded
    at both ends as a centred STFT pads, without materialising the padded signal."""
    index = torch.arange(start, stop, device=audio.device)
    index = torch.where(index < 0, -index, index)
    index = torch.where(index >= total, 2 * (total - 1) - index, index).clamp(min=0)
    inside = index < audio.shape[0]
    return torch.where(inside, audio[index.clamp(max=audio.shape[0] - 1)], 0.0)


def _log10_mel(audio: torch.Tensor, n_mels: int, padding: int, chunk_frames: int) -> torch.Tensor:
    total = audio.shape[0] + padding
    n_frames = total // HOP_LENGTH  # the reference drops the STFT's final frame
    half = N_FFT // 2
    window = torch.hann_window(N_FFT, device=audio.device)
    filters = mel_filters(audio.device, n_mels)
    out = torch.empty(n_mels, n_frames, device=audio.device)
    for first in range(0, n_frames, chunk_frames):
        last = min(first + chunk_frames, n_frames)
        # Frame f is centred on sample f * hop: it spans [f * hop - 200, f * hop + 200).
        samples = _reflect_padded(
            audio, total, first * HOP_LENGTH - half, (last - 1) * HOP_LENGTH + half
        )
        out[:, first:last] = _log10_mel_frames(samples, window, filters)
    return out


# The smallest mel power the spectrogram keeps; its log10 is the floor of the model's input.
MEL_POWER_FLOOR = 1e-10
LOG_MEL_FLOOR = float(torch.tensor(MEL_POWER_FLOOR).log10())


def _log10_mel_frames(samples: torch.Tensor, window: torch.Tensor, filters: torch.Tensor):
    """log10 mel power of every 400-sample frame of `samples` (already padded), hop 160."""
    stft = torch.stft(samples, N_FFT, HOP_LENGTH, window=window, center=False, return_complex=True)
    return (filters @ stft.abs().square()).clamp_(min=MEL_POWER_FLOOR).log10_()


def log_mel_is_blank(maximum: float) -> bool:
    """Whether a recording whose loudest log10 mel power is `maximum` shows the model
    nothing: every frame then sits on the floor, so the normalised spectrogram is one
    constant value. That is digital silence (or a stray least-significant bit too weak to
    reach the floor); any quieter-than-quiet speech still rises above it."""
    return not maximum > LOG_MEL_FLOOR


def _normalise(log_spec: torch.Tensor, maximum: float | torch.Tensor) -> torch.Tensor:
    """Floor everything more than 80 dB below `maximum` (the whole recording's loudest bin)
    there, and scale to roughly [-1, 1]; in place."""
    return torch.maximum(log_spec, torch.as_tensor(maximum) - 8.0).add_(4.0).div_(4.0)


def log_mel_spectrogram(
    audio,
    n_mels: int = 80,
    padding: int = 0,
    device: torch.device | str | None = None,
    *,
    chunk_frames: int = CHUNK_FRAMES,
) -> torch.Tensor:
    """Log-mel spectrogram of 16 kHz mono audio.

    `audio` is a path, a NumPy array or a tensor of samples, or a batch of equal-length clips;
    `padding` zero samples are appended first (transcription appends a full window so the last
    one is complete). Returns float32 (n_mels, n_frames), n_frames = samples // 160.
    """
    if isinstance(audio, (str, bytes)) or hasattr(audio, "__fspath__"):
        from .audio import load_audio

        audio = load_audio(audio)
    if not torch.is_tensor(audio):
        audio = torch.from_numpy(np.asarray(audio, dtype=np.float32))
    if device is not None:
        audio = audio.to(device)
    audio = audio.float()
    if audio.ndim > 1:
        return torch.stack(
            [log_mel_spectrogram(a, n_mels, padding, chunk_frames=chunk_frames) for a in audio]
        )
    log_spec = _log10_mel(audio, n_mels, padding, chunk_frames)
    return _normalise(log_spec, log_spec.max())


def _stream_log10_mel(
    blocks: Iterator[np.ndarray], n_mels: int, padding: int, chunk_frames: int = CHUNK_FRAMES
) -> Iterator[tuple[torch.Tensor, int]]:
    """log10 mel frames of a stream of sample blocks followed by `padding` zeros: yields
    (frames, content samples so far). The same frames `_log10_mel` computes for the whole
    signal, from a buffer that holds about one chunk of samples."""
    half = N_FFT // 2
    window = torch.hann_window(N_FFT)
    filters = mel_filters("cpu", n_mels)
    buffer = np.zeros(0, dtype=np.float32)
    start = 0  # sample index of buffer[0]
    content = 0
    next_frame = 0
    finished = False
    blocks = iter(blocks)
    while True:
        if not finished:
            block = next(blocks, None)
            if block is None:
                finished = True
            else:
                buffer = np.concatenate([buffer, block])
                content += block.size
                if start == 0 and content < half + 1 and not finished:
                    continue  # the first frame reflects samples 1..200: wait for them
        if finished:
            n_frames = (content + padding) // HOP_LENGTH
            # Zeros up to the last frame's window, and past sample `half`, which the first
            # frame's reflection reads.
            missing = max((n_frames - 1) * HOP_LENGTH + half, half + 1) - start - buffer.size
            buffer = np.concatenate([buffer, np.zeros(max(0, missing), np.float32)])
            if content + padding < half + 1:
                raise ValueError("too little audio for one mel frame")
        else:
            n_frames = (start + buffer.size - half) // HOP_LENGTH + 1  # frames fully available
        last = n_frames if finished else min(n_frames, next_frame + chunk_frames)
        while next_frame < last:
            stop = min(last, next_frame + chunk_frames)
            lo, hi = next_frame * HOP_LENGTH - half, (stop - 1) * HOP_LENGTH + half
            index = np.arange(lo, hi)
            index = np.abs(index) - start  # reflection at the start of the signal
            yield _log10_mel_frames(torch.from_numpy(buffer[index]), window, filters), content
            next_frame = stop
        if finished:
            return
        # Keep what the next frame reads, and the start of the signal for its reflection.
        keep_from = max(0, next_frame * HOP_LENGTH - half)
        if start == 0 and keep_from <= half:
            continue
        buffer = buffer[keep_from - start :]
        start = keep_from


class MelStream:
    """The log-mel spectrogram of a file, read window by window, never held whole.

    A first pass decodes the file to find what the whole spectrogram's normalisation needs
    (its maximum) along with the length and the peak sample; `frames(start, stop)` then
    decodes again as far as asked, keeping only the frames from `start` on (going back means
    decoding again from the start). The frames equal
    `log_mel_spectrogram(load_audio(file), padding=N_SAMPLES)`.
    """

    def __init__(self, file, n_mels: int = 80, stream: int | None = None) -> None:
        from .audio import iter_audio

        self.file, self.n_mels, self.stream = file, n_mels, stream
        block = CHUNK_FRAMES * HOP_LENGTH
        self._open = lambda: iter_audio(file, stream=stream, block_samples=block)
        peak, maximum, samples = 0.0, -np.inf, 0

        def tracked() -> Iterator[np.ndarray]:
            nonlocal peak
            for block in self._open():
                peak = max(peak, float(np.abs(block).max()))
                yield block

        for frames, so_far in _stream_log10_mel(tracked(), n_mels, N_SAMPLES):
            maximum = max(maximum, float(frames.max()))
            samples = so_far
        self.peak = peak
        self.samples = samples
        self.content_frames = samples // HOP_LENGTH
        self._maximum = maximum
        self._frames: Iterator[tuple[torch.Tensor, int]] | None = None
        self._buffer = torch.zeros(n_mels, 0)
        self._buffer_start = 0

    @property
    def duration(self) -> float:
        return self.samples / SAMPLE_RATE

    @property
    def silent(self) -> bool:
        """Whether the model would see nothing in the whole file (see `log_mel_is_blank`)."""
        return log_mel_is_blank(self._maximum)

    def frames(self, start: int, stop: int) -> torch.Tensor:
        """Normalised log-mel frames [start, stop) (past the content: the padding's frames)."""
        if start < self._buffer_start:
            # Going back (clips out of order, a second transcription): decode from the top.
            self._frames = None
            self._buffer = torch.zeros(self.n_mels, 0)
            self._buffer_start = 0
        if self._frames is None:
            self._frames = _stream_log10_mel(self._open(), self.n_mels, N_SAMPLES)
        end = self._buffer_start + self._buffer.shape[1]
        pieces = [self._buffer[:, max(0, start - self._buffer_start) :]]
        while end < stop:
            chunk, _ = next(self._frames, (None, 0))
            if chunk is None:
                break
            end += chunk.shape[1]
            if end <= start:
                continue  # skipped over (clips): never kept
            chunk = chunk[:, max(0, chunk.shape[1] - (end - start)) :]
            pieces.append(_normalise(chunk, self._maximum))
        self._buffer = torch.cat(pieces, dim=1)
        self._buffer_start = start
        return self._buffer[:, : stop - start]
