"""Cutting a recording into windows of at most 30 seconds for batched decoding.

Sequential transcription finds its next window from where the last one's speech ended.
Batched transcription decodes windows side by side, so it must know them all beforehand:
they are cut where the audio is quietest (a pause between words), so that no word is split
between two windows. With voice activity detection the speech regions are packed into
windows first, and only a region longer than a window is cut by loudness.

A long span becomes few windows of about equal length: each window costs one encoder
pass whatever it holds, and windows decoded side by side finish together when they hold
about as much speech (a short last window would otherwise run a batch of its own).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from .features import FRAMES_PER_SECOND, N_FRAMES

# Windows average at most 27 s, so that a cut may move 3 s either way to find a pause (a
# pause of a few hundred milliseconds almost always falls in six seconds of speech) while
# no window passes 30 s.
SEARCH_FRAMES = 3 * FRAMES_PER_SECOND
TARGET_WINDOW_FRAMES = N_FRAMES - SEARCH_FRAMES
SMOOTHING_FRAMES = FRAMES_PER_SECOND // 5  # 0.2 s: the length of a short pause


def loudness(mel: Tensor) -> Tensor:
    """Per-frame loudness of a (n_mels, frames) log-mel, smoothed over 0.2 s."""
    frame = mel.float().mean(dim=0)
    kernel = torch.full((1, 1, SMOOTHING_FRAMES), 1.0 / SMOOTHING_FRAMES, device=mel.device)
    padded = F.pad(frame[None, None], (SMOOTHING_FRAMES // 2, SMOOTHING_FRAMES // 2), "replicate")
    return F.conv1d(padded, kernel)[0, 0, : frame.shape[0]]


class FrameReader:
    """Log-mel frames read forward from a tensor or a MelStream, kept only from the oldest
    frame still needed: batched decoding of a long file holds about one batch of windows."""

    def __init__(self, source: Tensor | Callable[[int, int], Tensor], total: int) -> None:
        self._read = (lambda a, b: source[:, a:b]) if torch.is_tensor(source) else source
        self.total = total  # content frames: the loudness (and windows) stop there
        self._start = 0
        self._frames: Tensor | None = None

    def __call__(self, start: int, stop: int) -> Tensor:
        if self._frames is None or start < self._start:
            # The first read (from where the last release left off), or one back before the
            # kept frames (clips out of order: a MelStream then decodes from the top again).
            self._start = min(self._start, start) if self._frames is None else start
            self._frames = self._read(self._start, stop)
        elif stop > self._start + self._frames.shape[1]:
            more = self._read(self._start + self._frames.shape[1], stop)
            self._frames = torch.cat([self._frames, more], dim=1)
        return self._frames[:, start - self._start : stop - self._start]

    def release(self, before: int) -> None:
        """Frames before `before` will not be asked for again (reading goes on from there)."""
        if before <= self._start:
            return
        if self._frames is None or before >= self._start + self._frames.shape[1]:
            self._frames = None  # nothing kept is needed: the next read starts at `before`
        else:
            self._frames = self._frames[:, before - self._start :].clone()
        self._start = before

    def level(self, lo: int, hi: int) -> Tensor:
        """Loudness of frames [lo, hi], with the smoothing's context on either side: equal
        to `loudness` of all the content frames, at those frames."""
        context = SMOOTHING_FRAMES // 2
        a, b = max(0, lo - context), min(self.total, hi + 1 + context)
        return loudness(self(a, b))[lo - a : hi + 1 - a]


def split_span(start: int, end: int, reader: FrameReader) -> Iterator[tuple[int, int]]:
    """Cut frames [start, end) into windows of about equal length: one up to N_FRAMES,
    else as few as keep their average within TARGET_WINDOW_FRAMES, each cut at the quietest
    frame within SEARCH_FRAMES of its even place (so none passes N_FRAMES).

    Frames are read as far as the next cut needs. A window's frames must be read before
    the next window is asked for: the frames before it are then released."""
    context = SMOOTHING_FRAMES // 2  # the loudness of a frame reads 0.1 s before it
    reader.release(start - context)
    if end - start <= N_FRAMES:
        if end > start:
            yield start, end
        return
    count = math.ceil((end - start) / TARGET_WINDOW_FRAMES)
    previous = start
    for i in range(1, count):
        even = start + round(i * (end - start) / count)
        lo = max(previous + 1, even - SEARCH_FRAMES)
        hi = min(previous + N_FRAMES, even + SEARCH_FRAMES)
        cut = lo + int(torch.argmin(reader.level(lo, hi)))
        yield previous, cut
        reader.release(cut - context)
        previous = cut
    yield previous, end


def pack_spans(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Join consecutive spans (speech regions) while the joined span fits one window."""
    packed: list[tuple[int, int]] = []
    for start, end in spans:
        if packed and end - packed[-1][0] <= N_FRAMES:
            packed[-1] = (packed[-1][0], end)
        else:
            packed.append((start, end))
    return packed


def window_spans(
    spans: list[tuple[int, int]], total: int, pack: bool = False
) -> list[tuple[int, int]]:
    """The frame ranges windows cover: `spans` (the whole recording, clips, or speech
    regions) within the `total` content frames, empty ones dropped; `pack` lets one window
    hold several short spans and the gaps between them."""
    spans = [(max(0, s), min(e, total)) for s, e in spans]
    spans = [(s, e) for s, e in spans if e > s]
    return pack_spans(spans) if pack else spans


def iter_windows(reader: FrameReader, spans: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """Windows (start, end) in mel frames, each at most 30 s, covering `spans` (from
    `window_spans`) in order; frames are read only as far as the next cut needs."""
    for s, e in spans:
        yield from split_span(s, e, reader)


def plan_windows(
    mel: Tensor, spans: list[tuple[int, int]], pack: bool = False
) -> list[tuple[int, int]]:
    """All the windows covering `spans` of a (n_mels, content frames) log-mel."""
    total = mel.shape[-1]
    return list(iter_windows(FrameReader(mel, total), window_spans(spans, total, pack)))
