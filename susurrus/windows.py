"""Cutting a recording into windows of at most 30 seconds for batched decoding.

Sequential transcription finds its next window from where the last one's speech ended.
Batched transcription decodes windows side by side, so it must know them all beforehand:
they are cut where the audio is quietest (a pause between words), so that no word is split
between two windows. With voice activity detection the speech regions are packed into
windows first, and only a region longer than a window is cut by loudness.

A long span becomes the fewest windows of about equal length: each window costs one
encoder pass whatever it holds, and windows decoded side by side finish together when they
hold about as much speech (a short last window would otherwise run a batch of its own).
"""

from __future__ import annotations

import math

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


def split_span(start: int, end: int, level: Tensor) -> list[tuple[int, int]]:
    """Cut frames [start, end) into the fewest windows of about equal length, each at most
    N_FRAMES, at the quietest frame within SEARCH_FRAMES of each even cut."""
    if end - start <= N_FRAMES:
        return [(start, end)] if end > start else []
    count = math.ceil((end - start) / TARGET_WINDOW_FRAMES)
    cuts = [start]
    for i in range(1, count):
        even = start + round(i * (end - start) / count)
        lo = max(cuts[-1] + 1, even - SEARCH_FRAMES)
        hi = min(cuts[-1] + N_FRAMES, even + SEARCH_FRAMES)
        cuts.append(lo + int(torch.argmin(level[lo : hi + 1])))
    cuts.append(end)
    return list(zip(cuts, cuts[1:]))


def pack_spans(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Join consecutive spans (speech regions) while the joined span fits one window."""
    packed: list[tuple[int, int]] = []
    for start, end in spans:
        if packed and end - packed[-1][0] <= N_FRAMES:
            packed[-1] = (packed[-1][0], end)
        else:
            packed.append((start, end))
    return packed


def plan_windows(
    mel: Tensor, spans: list[tuple[int, int]], pack: bool = False
) -> list[tuple[int, int]]:
    """Windows (start, end) in mel frames covering `spans`, each at most 30 s.

    `spans` are the frame ranges to transcribe (the whole recording, clips, or speech
    regions); `pack` lets one window hold several short spans and the gaps between them.
    """
    if mel.shape[-1] == 0:
        return []
    level = loudness(mel)
    spans = [(max(0, s), min(e, mel.shape[-1])) for s, e in spans]
    spans = [(s, e) for s, e in spans if e > s]
    if pack:
        spans = pack_spans(spans)
    return [window for s, e in spans for window in split_span(s, e, level)]
