"""Word-level timestamps from the decoder's cross-attention, and hallucination heuristics.

A few cross-attention heads of the decoder (the model's alignment heads) look at the audio
frames where the token they predict is spoken. A forced pass over a window's text gives their
attention, which is normalised, smoothed and aligned to the frames by dynamic time warping;
words then take the times at which their first token and the next word's first token begin.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .features import HOP_LENGTH, SAMPLE_RATE, TOKENS_PER_SECOND
from .model import Whisper
from .tokenizer import Tokenizer

# Sentence-final marks: a word after one (or one itself) may not be unusually long.
SENTENCE_END_MARKS = ".。!！?？"


def median_filter(x: Tensor, width: int) -> Tensor:
    """Median over a sliding window of odd `width` along the last axis, reflect-padded."""
    if width <= 0 or width % 2 == 0:
        raise ValueError(f"the median filter width must be odd and positive, not {width}")
    pad = width // 2
    if x.shape[-1] <= pad:
        return x  # too short to reflect-pad
    shape = x.shape
    flat = x.reshape(-1, 1, shape[-1])
    padded = F.pad(flat, (pad, pad), mode="reflect")
    # sort() beats median() here, and picks the same (middle) element for an odd width.
    windows = padded.unfold(-1, width, 1)
    return windows.sort(dim=-1).values[..., pad].reshape(shape)


def dtw(x: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost monotonic path through the cost matrix `x` (rows: tokens, columns: time).

    Returns (row indices, column indices) of the path from (0, 0) to the last cell. Each step
    moves down, right or diagonally; ties are broken as the reference does (a diagonal or
    vertical step only when strictly cheapest, else horizontal). The recursion runs over
    anti-diagonals, whose cells are independent of each other, so each is one vector step.
    Accumulated costs are kept in float32 like the reference, for the same tie decisions.
    """
    if isinstance(x, Tensor):
        x = x.double().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    n, m = x.shape
    # Skewed layout: row d holds the anti-diagonal i + j = d of the (n+1, m+1) cost matrix,
    # indexed by i, so the three predecessors of a diagonal are contiguous slices.
    rows, cols = np.meshgrid(np.arange(1, n + 1), np.arange(1, m + 1), indexing="ij")
    skewed_x = np.zeros((n + m + 1, n + 1))
    skewed_x[rows + cols, rows] = x
    cost = np.full((n + m + 1, n + 1), np.inf, dtype=np.float32)
    cost[0, 0] = 0
    trace = np.zeros((n + m + 1, n + 1), dtype=np.int8)
    for d in range(2, n + m + 1):
        lo, hi = max(1, d - m), min(n, d - 1)  # rows i on this diagonal with j = d - i >= 1
        diagonal = cost[d - 2, lo - 1 : hi]  # (i-1, j-1)
        up = cost[d - 1, lo - 1 : hi]  # (i-1, j)
        left = cost[d - 1, lo : hi + 1]  # (i, j-1)
        take_diagonal = (diagonal < up) & (diagonal < left)
        take_up = ~take_diagonal & (up < diagonal) & (up < left)
        best = np.where(take_diagonal, diagonal, np.where(take_up, up, left))
        cost[d, lo : hi + 1] = skewed_x[d, lo : hi + 1] + best
        trace[d, lo : hi + 1] = np.where(take_diagonal, 0, np.where(take_up, 1, 2))
    return _backtrace(trace, n, m)


def _backtrace(trace: np.ndarray, n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Walk the skewed trace back from (n, m); one Python step per path cell (n + m at most)."""
    steps = trace.tolist()
    i, j = n, m
    path = []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        # On the matrix's border only one move is left.
        step = 2 if i == 0 else 1 if j == 0 else steps[i + j][i]
        if step == 0:
            i, j = i - 1, j - 1
        elif step == 1:
            i -= 1
        else:
            j -= 1
    result = np.array(path[::-1], dtype=np.int64).reshape(-1, 2)
    return result[:, 0], result[:, 1]


@dataclass
class WordTiming:
    word: str
    tokens: list[int]
    start: float
    end: float
    probability: float


def find_alignment(
    model: Whisper,
    tokenizer: Tokenizer,
    text_tokens: list[int],
    audio_features: Tensor,
    num_frames: int,
    *,
    medfilt_width: int = 7,
    qk_scale: float = 1.0,
) -> list[WordTiming]:
    """Words of `text_tokens` with their times (seconds from the window start) and mean
    token probability, from one forced decoder pass over the window's encoded audio.

    `audio_features` is the window's (n_audio_ctx, n_state) encoder output; `num_frames` the
    number of mel frames of real audio in the window (the rest is padding, never attended).
    """
    if not text_tokens:
        return []
    tokens = [*tokenizer.sot_sequence, tokenizer.no_timestamps, *text_tokens, tokenizer.eot]
    prefix = len(tokenizer.sot_sequence)
    with torch.inference_mode():
        logits, qk = model.alignment_logits(
            torch.tensor([tokens], device=audio_features.device), audio_features[None]
        )
        # Position p predicts token p + 1: from the no-timestamps token on, the text tokens.
        text_logits = logits[0, prefix : prefix + len(text_tokens), : tokenizer.eot]
        probs = text_logits.softmax(dim=-1)
        index = torch.arange(len(text_tokens), device=probs.device)
        text_token_probs = probs[index, torch.tensor(text_tokens, device=probs.device)].tolist()

        # (heads, tokens, frames), only the frames holding audio.
        weights = qk[0, :, :, : num_frames // 2].float()
        weights = (weights * qk_scale).softmax(dim=-1)
        std, mean = torch.std_mean(weights, dim=-2, keepdim=True, correction=0)
        weights = median_filter((weights - mean) / std, medfilt_width)
        matrix = weights.mean(dim=0)[prefix:-1]  # rows: text tokens, then end of text
    text_indices, time_indices = dtw(-matrix)

    words, word_tokens = tokenizer.split_to_word_tokens(text_tokens + [tokenizer.eot])
    if len(word_tokens) <= 1:
        return []  # only the end-of-text token
    boundaries = np.pad(np.cumsum([len(t) for t in word_tokens[:-1]]), (1, 0))
    # The time at which the path first reaches each token.
    jumps = np.pad(np.diff(text_indices), (1, 0), constant_values=1).astype(bool)
    jump_times = time_indices[jumps] / TOKENS_PER_SECOND
    starts = jump_times[boundaries[:-1]]
    ends = jump_times[boundaries[1:]]
    probabilities = [
        float(np.mean(text_token_probs[i:j])) for i, j in zip(boundaries[:-1], boundaries[1:])
    ]
    # zip stops before the end-of-text "word", which has no boundary after it.
    return [
        WordTiming(word, list(toks), start, end, probability)
        for word, toks, start, end, probability in zip(
            words, word_tokens, starts, ends, probabilities
        )
    ]


def merge_punctuations(alignment: list[WordTiming], prepended: str, appended: str) -> None:
    """Attach opening punctuation to the next word and closing punctuation to the previous
    one, in place; a merged-away entry keeps its place with an empty word and no tokens.

    Membership is substring membership in the given strings, as in the reference.
    """
    i, j = len(alignment) - 2, len(alignment) - 1
    while i >= 0:
        previous, following = alignment[i], alignment[j]
        if previous.word.startswith(" ") and previous.word.strip() in prepended:
            following.word = previous.word + following.word
            following.tokens = previous.tokens + following.tokens
            previous.word, previous.tokens = "", []
        else:
            j = i
        i -= 1

    i, j = 0, 1
    while j < len(alignment):
        previous, following = alignment[i], alignment[j]
        if not previous.word.endswith(" ") and following.word in appended:
            previous.word = previous.word + following.word
            previous.tokens = previous.tokens + following.tokens
            following.word, following.tokens = "", []
        else:
            i = j
        j += 1


def add_word_timestamps(
    *,
    segments: list[dict],
    model: Whisper,
    tokenizer: Tokenizer,
    audio_features: Tensor,
    num_frames: int,
    prepend_punctuations: str = "\"'“¿([{-",
    append_punctuations: str = "\"'.。,，!！?？:：”)]}、",
    last_speech_timestamp: float,
    **kwargs,
) -> None:
    """Give each segment of one window its `words` and refine the segment's start and end.

    All segments of the window are aligned in one decoder pass. Times are absolute (the
    window starts at the first segment's `seek`). `last_speech_timestamp` is where speech
    last ended before this window, to spot over-long words after a pause.
    """
    if not segments:
        return
    text_tokens_per_segment = [[t for t in s["tokens"] if t < tokenizer.eot] for s in segments]
    text_tokens = list(itertools.chain.from_iterable(text_tokens_per_segment))
    alignment = find_alignment(model, tokenizer, text_tokens, audio_features, num_frames, **kwargs)

    durations = np.array([t.end - t.start for t in alignment])
    durations = durations[durations.nonzero()]
    median_duration = min(0.7, float(np.median(durations))) if len(durations) else 0.0
    max_duration = median_duration * 2

    # DTW stretches words over pauses; at sentence boundaries, cut them to a plausible length.
    if len(durations):
        for i in range(1, len(alignment)):
            if alignment[i].end - alignment[i].start > max_duration:
                if alignment[i].word in SENTENCE_END_MARKS:
                    alignment[i].end = alignment[i].start + max_duration
                elif alignment[i - 1].word in SENTENCE_END_MARKS:
                    alignment[i].start = alignment[i].end - max_duration

    merge_punctuations(alignment, prepend_punctuations, append_punctuations)

    time_offset = segments[0]["seek"] * HOP_LENGTH / SAMPLE_RATE
    word_index = 0
    for segment, seg_text_tokens in zip(segments, text_tokens_per_segment):
        saved_tokens = 0
        words = []
        # Hand out alignment entries until this segment's tokens are used up.
        while word_index < len(alignment) and saved_tokens < len(seg_text_tokens):
            timing = alignment[word_index]
            if timing.word:
                words.append(
                    {
                        "word": timing.word,
                        "start": _round2(time_offset + timing.start),
                        "end": _round2(time_offset + timing.end),
                        "probability": timing.probability,
                    }
                )
            saved_tokens += len(timing.tokens)
            word_index += 1

        if words:
            _refine_segment(segment, words, last_speech_timestamp, median_duration, max_duration)
            last_speech_timestamp = segment["end"]
        segment["words"] = words


def _round2(t: float) -> float:
    # numpy's rounding (scale, round half to even, unscale), as the reference's float64 times.
    return float(np.round(np.float64(t), 2))


def _refine_segment(
    segment: dict,
    words: list[dict],
    last_speech_timestamp: float,
    median_duration: float,
    max_duration: float,
) -> None:
    """Reconcile a segment's timestamps with its words' times, in place."""
    first = words[0]
    # The first word after a pause tends to absorb the pause: shorten it (and the second).
    if first["end"] - last_speech_timestamp > median_duration * 4 and (
        first["end"] - first["start"] > max_duration
        or (len(words) > 1 and words[1]["end"] - first["start"] > max_duration * 2)
    ):
        if len(words) > 1 and words[1]["end"] - words[1]["start"] > max_duration:
            boundary = max(words[1]["end"] / 2, words[1]["end"] - max_duration)
            first["end"] = words[1]["start"] = boundary
        first["start"] = max(0, first["end"] - max_duration)

    # Trust the segment's own start when the first word is implausibly long, else the word's.
    if segment["start"] < first["end"] and segment["start"] - 0.5 > first["start"]:
        first["start"] = max(0, min(first["end"] - median_duration, segment["start"]))
    else:
        segment["start"] = first["start"]

    last = words[-1]
    if segment["end"] > last["start"] and segment["end"] + 0.5 < last["end"]:
        last["end"] = max(last["start"] + median_duration, segment["end"])
    else:
        segment["end"] = last["end"]


# Hallucination heuristics (with word timestamps): text decoded over silence or noise tends
# to have improbable words and words of implausible length.

PUNCTUATION = "\"'“¿([{-\"'.。,，!！?？:：”)]}、"


def word_anomaly_score(word: dict) -> float:
    """How implausible a word is: improbable, very short or very long."""
    probability = word.get("probability", 0.0)
    duration = word["end"] - word["start"]
    score = 0.0
    if probability < 0.15:
        score += 1.0
    if duration < 0.133:
        score += (0.133 - duration) * 15
    if duration > 2.0:
        score += duration - 2.0
    return score


def is_segment_anomaly(segment: dict | None) -> bool:
    """Whether a segment looks hallucinated, judged by its first eight non-punctuation words."""
    if segment is None or not segment["words"]:
        return False
    words = [w for w in segment["words"] if w["word"] not in PUNCTUATION][:8]
    score = sum(word_anomaly_score(w) for w in words)
    return score >= 3 or score + 0.01 >= len(words)


def next_words_segment(segments: list[dict]) -> dict | None:
    """The first segment that has words."""
    return next((s for s in segments if s["words"]), None)


def get_end(segments: list[dict]) -> float | None:
    """End of the last word, or of the last segment when none has words."""
    return next(
        (w["end"] for s in reversed(segments) for w in reversed(s["words"])),
        segments[-1]["end"] if segments else None,
    )
