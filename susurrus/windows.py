"""Cutting a recording into windows of at most 30 seconds for batched decoding.

Sequential transcription finds its next window from where the last one's speech ended.
Batched transcription decodes windows side by side, so it must know them all beforehand:
they are cut where the audio is quietest (a pause between words), so that no word is split
between two windows. With voice activity detection the speech regions are packed into
windows first, and only a region longer than a window is cut by loudness.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .features import FRAMES_PER_SECOND, N_FRAMES

# A cut is looked for in the last third of a window: windows stay long (few of them) and a
# pause of a few hundred milliseconds almost always falls in ten seconds of speech.
MIN_WINDOW_FRAMES = 2 * N_FRAMES // 3
SMOOTHING_FRAMES = FRAMES_PER_SECOND // 5  # 0.2 s: the length of a short pause


def loudness(mel: Tensor) -> Tensor:
    """Per-frame loudness of a (n_mels, frames) log-mel, smoothed over 0.2 s."""
    frame = mel.float().mean(dim=0)
    kernel = torch.full((1, 1, SMOOTHING_FRAMES), 1.0 / SMOOTHING_FRAMES, device=mel.device)
    padded = F.pad(frame[None, None], (SMOOTHING_FRAMES // 2, SMOOTHING_FRAMES // 2), "replicate")
    return F.conv1d(padded, kernel)[0, 0, : frame.shape[0]]


def split_span(start: int, end: int, level: Tensor) -> list[tuple[int, int]]:
    """Cut frames [start, end) into windows of at most N_FRAMES at the quietest frames."""
    windows = []
    while end - start > N_FRAMES:
        lo, hi = start + MIN_WINDOW_FRAMES, start + N_FRAMES
        cut = lo + int(torch.argmin(level[lo:hi]))
        windows.append((start, cut))
        start = cut
    if end > start:
        windows.append((start, end))
    return windows


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
