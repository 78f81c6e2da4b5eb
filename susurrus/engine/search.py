"""What happens to a step's logits: the token rules, then each window's search.

The rules (suppressed tokens, timestamp pairing and order, the first timestamp's limit)
are the reference's, applied to every row of the table at once. Instead of scanning each
row's tokens at every step, each row carries what the rules read: how many tokens it has
sampled, whether the last two were timestamps, and its latest timestamp.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import Tensor

from .. import native
from ..decoding import suppress_token_ids
from ..features import CHUNK_LENGTH
from ..tokenizer import Tokenizer

NONE = -1  # "no timestamp yet" / "no limit"


def suppress_tokens(
    tokenizer: Tokenizer, tokens: str | Iterable[int] | None, n_vocab: int | None = None
) -> list[int]:
    """Token ids never sampled: `tokens` ("-1": the non-speech symbols) and the control
    tokens, which are never text. ValueError for an id beyond the vocabulary (the
    tokenizer's, or the model's `n_vocab` where that is smaller)."""
    chosen = suppress_token_ids(tokens)
    vocabulary = min(tokenizer.encoding.n_vocab, n_vocab or tokenizer.encoding.n_vocab)
    if outside := [t for t in chosen if t >= vocabulary]:
        raise ValueError(
            f"suppress_tokens: {outside[0]} is not a token of this model (ids 0 to "
            f"{vocabulary - 1}; -1: the non-speech symbols)"
        )
    if -1 in chosen:
        chosen = [t for t in chosen if t >= 0] + list(tokenizer.non_speech_tokens)
    chosen += [tokenizer.transcribe, tokenizer.translate, tokenizer.sot, tokenizer.sot_prev]
    chosen += [tokenizer.sot_lm, tokenizer.no_speech]
    return sorted(set(chosen))


class RowRules:
    """Per-row state of the token rules, for the rows of the table in order."""

    def __init__(self, n_vocab: int, tokenizer: Tokenizer, device: torch.device) -> None:
        self.n_vocab = n_vocab
        self.eot = tokenizer.eot
        self.tb = tokenizer.timestamp_begin
        self.no_timestamps = tokenizer.no_timestamps
        self.device = device
        self.timestamp_index = torch.arange(n_vocab - self.tb, device=device)
        # Masks of suppressed tokens (and of blank starts), one row per distinct setting.
        self._masks: dict[tuple, int] = {}
        self.suppress = torch.zeros(0, n_vocab, dtype=torch.bool, device=device)
        self.blank = torch.zeros(0, n_vocab, dtype=torch.bool, device=device)
        long = dict(dtype=torch.long, device=device)
        self.n_sampled = torch.zeros(0, **long)
        self.max_ts = torch.zeros(0, **long)
        self.last_ts = torch.zeros(0, dtype=torch.bool, device=device)
        self.penult_ts = torch.zeros(0, dtype=torch.bool, device=device)
        self.timestamps = torch.zeros(0, dtype=torch.bool, device=device)
        self.max_initial = torch.zeros(0, **long)
        self.mask_id = torch.zeros(0, **long)
        # The suppressed tokens of each mask as indices: one shared mask (the usual case)
        # is filled through them, ten times faster than through a vocabulary of flags.
        self._suppress_ids: list[Tensor] = []
        # The timestamp rules as one native call (csrc/step.c) on CPU float32 logits.
        self.native = device.type == "cpu" and native.available()

    def mask_for(self, suppress: list[int], blank: list[int]) -> int:
        key = (tuple(suppress), tuple(blank))
        if key not in self._masks:
            row = torch.zeros(1, self.n_vocab, dtype=torch.bool, device=self.device)
            ids = _ids(suppress, row)
            self._suppress_ids.append(ids)
            self.suppress = torch.cat([self.suppress, row.index_fill(1, ids, True)])
            self.blank = torch.cat([self.blank, row.index_fill(1, _ids(blank, row), True)])
            self._masks[key] = len(self._masks)
        return self._masks[key]

    def add(self, rows: int, mask_id: int, timestamps: bool, max_initial: int | None) -> None:
        """Rows of a window joining at the end of the table, nothing sampled yet."""

        def more(tensor: Tensor, value) -> Tensor:
            return torch.cat([tensor, torch.full((rows,), value, dtype=tensor.dtype,
                                                 device=self.device)])

        self.n_sampled = more(self.n_sampled, 0)
        self.max_ts = more(self.max_ts, NONE)
        self.last_ts = more(self.last_ts, False)
        self.penult_ts = more(self.penult_ts, False)
        self.timestamps = more(self.timestamps, timestamps)
        self.max_initial = more(self.max_initial, NONE if max_initial is None else max_initial)
        self.mask_id = more(self.mask_id, mask_id)

    def select(self, index: Tensor) -> None:
        """Keep the rows `index`, in that order (rows leaving, beams reordered)."""
        for name in ("n_sampled", "max_ts", "last_ts", "penult_ts", "timestamps",
                     "max_initial", "mask_id"):
            setattr(self, name, getattr(self, name).index_select(0, index))

    def advance(self, tokens: Tensor) -> None:
        """Each row sampled `tokens` (rows,)."""
        is_ts = tokens >= self.tb
        self.n_sampled = self.n_sampled + 1
        self.penult_ts = self.last_ts
        self.last_ts = is_ts
        self.max_ts = torch.where(is_ts, torch.maximum(self.max_ts, tokens), self.max_ts)

    def apply(self, logits: Tensor, between: Callable[[Tensor], None] | None = None) -> None:
        """Set to -inf the logits (rows, n_vocab) of the tokens each row may not sample.

        `between(logits)` runs after the suppressed tokens are masked and before the
        timestamp rules, which compare the best text token (a screened step refines its
        candidates there: see screen.py)."""
        tb = self.tb
        at_start = self.n_sampled == 0
        # Each fill below passes over every row's whole vocabulary: skipped when it
        # would fill nothing, and one shared mask (the usual case) is not copied per row.
        starts = bool(at_start.any())
        if self.suppress.shape[0] == 1:
            logits.index_fill_(1, self._suppress_ids[0], -np.inf)
            if starts:
                logits.masked_fill_(self.blank & at_start[:, None], -np.inf)
        else:
            suppress = self.suppress[self.mask_id]
            if starts:
                suppress = suppress | (self.blank[self.mask_id] & at_start[:, None])
            logits.masked_fill_(suppress, -np.inf)
        if between is not None:
            between(logits)
        rows = self.timestamps
        if not bool(rows.any()):
            return
        if self.native and logits.dtype == torch.float32 and logits.is_contiguous():
            native.timestamp_rules(logits, tb, self.eot, self.no_timestamps, self.n_sampled,
                                   self.last_ts, self.penult_ts, self.max_ts, rows,
                                   self.max_initial)
            return
        timestamps = logits[:, tb:]  # views: filling them fills the logits
        text = logits[:, :tb]
        logits[:, self.no_timestamps].masked_fill_(rows, -np.inf)
        sampled = self.n_sampled > 0
        last = self.last_ts & sampled
        # With one token sampled there is no penultimate: it counts as a timestamp.
        penult = torch.where(self.n_sampled > 1, self.penult_ts, True) & sampled
        # Timestamps come in pairs: after a closing pair only text, after one only a
        # timestamp (or the end).
        timestamps.masked_fill_((rows & last & penult)[:, None], -np.inf)
        text_only = rows & last & ~penult
        if bool(text_only.any()):
            logits[:, : self.eot].masked_fill_(text_only[:, None], -np.inf)
        # Timestamps never go back; a new segment must start after the last one ended.
        floor = torch.where(last & ~penult, self.max_ts, self.max_ts + 1)
        floor = torch.where(self.max_ts >= tb, floor, tb)
        below = self.timestamp_index < (floor - tb)[:, None]
        timestamps.masked_fill_(rows[:, None] & below, -np.inf)
        if starts:
            starting = rows & at_start
            text.masked_fill_(starting[:, None], -np.inf)
            limited = starting & (self.max_initial >= 0)
            beyond = self.timestamp_index > self.max_initial[:, None]
            timestamps.masked_fill_(limited[:, None] & beyond, -np.inf)
        # When the timestamps together outweigh every single text token, emit a timestamp
        # (log-probabilities compared without their common normaliser).
        mass = timestamps.float().logsumexp(dim=-1)
        best_text = text.float().amax(dim=-1)
        outweigh = rows & (mass > best_text)
        if bool(outweigh.any()):
            text.masked_fill_(outweigh[:, None], -np.inf)


def _ids(ids: list[int], like: Tensor) -> Tensor:
    return torch.tensor(ids, dtype=torch.long, device=like.device)


def max_initial_index(seconds: float | None) -> int | None:
    """The latest timestamp index a window may start with (20 ms per index)."""
    if seconds is None:
        return None
    return round(seconds / (CHUNK_LENGTH / 1500))


class BeamSearch:
    """Beam search over one window's `beam_size` rows.

    Finished candidates are collected until there are `round(beam_size * patience)`.
    Each row's sequence is known by a number: equal numbers mean equal sequences, looked
    up from (prefix number, last token), so comparing candidates never copies sequences.
    """

    def __init__(self, beam_size: int, eot: int, patience: float | None) -> None:
        self.beam_size = beam_size
        self.eot = eot
        self.max_candidates = round(beam_size * (patience or 1.0))
        self.finished: dict[tuple[int, ...], float] = {}
        self.sequence_ids = [0] * beam_size  # every beam starts the same
        self.interned: dict[tuple[int, int], int] = {}

    @property
    def done(self) -> bool:
        return len(self.finished) >= self.max_candidates

    def update(
        self,
        histories: list[list[int]],
        candidate_scores: list[list[float]],
        top_tokens: list[list[int]],
    ) -> tuple[list[int], list[int], list[float]]:
        """Next tokens, source rows and scores of the beams, from each row's top
        `beam_size + 1` tokens (one of them may end the text) and their scores (the row's
        score plus the token's log-probability, summed in the scores' float type)."""
        candidates: dict[tuple[int, int], tuple[float, int]] = {}
        # Identical sequences (all beams start the same) collapse to one, the last row's
        # winning, in first-seen order.
        for row in range(self.beam_size):
            prefix = self.sequence_ids[row]
            for score, token in zip(candidate_scores[row], top_tokens[row]):
                candidates[(prefix, token)] = (score, row)
        tokens, sources, new_scores, ids = [], [], [], []
        newly_finished: list[tuple[float, int]] = []
        for key in sorted(candidates, key=lambda k: candidates[k][0], reverse=True):
            score, row = candidates[key]
            if key[1] == self.eot:
                newly_finished.append((score, row))
                continue
            tokens.append(key[1])
            sources.append(row)
            new_scores.append(score)
            ids.append(self.interned.setdefault(key, len(self.interned) + 1))
            if len(tokens) == self.beam_size:
                break
        for score, row in newly_finished:  # already best first
            if len(self.finished) >= self.max_candidates:
                break
            self.finished[tuple(histories[row])] = score
        self.sequence_ids = ids
        return tokens, sources, new_scores

    def candidates(
        self, histories: list[list[int]], scores: list[float]
    ) -> tuple[list[list[int]], list[float]]:
        """Finished sequences and their scores; too few finished, the best unfinished beams
        count as finished."""
        done = dict(self.finished)
        if len(done) < self.beam_size:
            for row in sorted(range(len(scores)), key=lambda r: -scores[r]):
                done[tuple(histories[row])] = scores[row]
                if len(done) >= self.beam_size:
                    break
        return [list(seq) for seq in done], list(done.values())


def rank(lengths: list[int], sum_logprobs: list[float], length_penalty: float | None) -> int:
    """Index of the best candidate by length-normalised log-probability."""
    scores = []
    for logprob, length in zip(sum_logprobs, lengths):
        penalty = length if length_penalty is None else ((5 + length) / 6) ** length_penalty
        scores.append(logprob / penalty)
    return int(np.argmax(scores))
