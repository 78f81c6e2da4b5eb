"""Decoding one 30-second window (or a batch of them) into tokens.

`decode` runs greedy search, sampling (`best_of` candidates at temperature > 0) or beam
search against a key/value cache that is allocated once per call. The timestamp rules and
token suppression are tensor operations over the whole batch, done once per step.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .features import CHUNK_LENGTH
from .graphs import StaticStep
from .model import KVCache, Whisper
from .tokenizer import LANGUAGES, Tokenizer, get_tokenizer, language_code


def compression_ratio(text: str) -> float:
    """How well the text compresses: repetitive (looping) output scores high."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


@dataclass(frozen=True)
class DecodingOptions:
    task: str = "transcribe"  # or "translate" (to English)
    language: str | None = None  # None: detect from the audio
    temperature: float = 0.0
    sample_len: int | None = None  # most tokens to sample; default half the text context
    best_of: int | None = None  # independent samples to pick from at temperature > 0
    beam_size: int | None = None  # beams at temperature 0; None is greedy
    patience: float | None = None  # beam search: finished candidates = beam_size * patience
    length_penalty: float | None = None  # None: rank by log-probability / length
    prompt: str | list[int] | None = None  # previous text, as context
    prefix: str | list[int] | None = None  # forced start of this window's text
    suppress_tokens: str | Iterable[int] | None = "-1"  # "-1": non-speech symbols
    suppress_blank: bool = True  # no blank or end of text as the first token
    without_timestamps: bool = False
    max_initial_timestamp: float | None = 1.0
    fp16: bool = True


@dataclass(frozen=True)
class DecodingResult:
    audio_features: Tensor
    language: str
    language_probs: dict[str, float] | None = None
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    avg_logprob: float = np.nan
    no_speech_prob: float = np.nan
    temperature: float = np.nan
    compression_ratio: float = np.nan


MAX_STATIC_STEPS = 4  # CUDA graphs (with their caches) kept per model


def _encode_if_needed(model: Whisper, mel: Tensor) -> Tensor:
    """Accept either a log-mel batch or audio features already encoded."""
    dims = model.dims
    mel = mel.to(model.device)
    if mel.shape[-2:] == (dims.n_audio_ctx, dims.n_audio_state):
        return mel.to(model.dtype)
    mel = mel.to(model.dtype)
    if mel.device.type == "cpu" and mel.ndim == 3:
        # The CPU gains nothing from a batch here (the products are already large): one
        # window at a time keeps the activations of one window in memory, not of the batch.
        return torch.cat([model.embed_audio(m[None]) for m in mel])
    return model.embed_audio(mel)


@torch.inference_mode()
def detect_language(
    model: Whisper, mel: Tensor, tokenizer: Tokenizer | None = None
) -> tuple[Tensor, dict[str, float] | list[dict[str, float]]]:
    """Most likely language token and the probability of every language.

    `mel` is (n_mels, 3000) or a batch (batch, n_mels, 3000), or encoded audio features.
    Returns (token, {code: probability}) for one window, lists of them for a batch.
    """
    if tokenizer is None:
        tokenizer = get_tokenizer(model.is_multilingual, num_languages=model.num_languages)
    if tokenizer.language is None or tokenizer.language_token not in tokenizer.sot_sequence:
        raise ValueError(
            "this model is English-only: it has no language tokens, so it cannot detect the "
            "language"
        )
    single = mel.ndim == 2
    features = _encode_if_needed(model, mel.unsqueeze(0) if single else mel)
    tokens, probs = _language_probs(model, features, tokenizer)
    if single:
        return tokens[0], probs[0]
    return tokens, probs


def _language_probs(
    model: Whisper, features: Tensor, tokenizer: Tokenizer
) -> tuple[Tensor, list[dict[str, float]]]:
    sot = torch.full((features.shape[0], 1), tokenizer.sot, device=features.device)
    logits = model.logits(sot, features)[:, 0]
    language_tokens = torch.tensor(tokenizer.all_language_tokens, device=logits.device)
    only_languages = torch.full_like(logits, -np.inf)
    only_languages[:, language_tokens] = logits[:, language_tokens]
    best = only_languages.argmax(dim=-1)
    probs = only_languages.softmax(dim=-1)[:, language_tokens].cpu()
    codes = tokenizer.all_language_codes
    return best, [dict(zip(codes, row.tolist())) for row in probs]


class LogitFilter:
    """Sets to -inf the logits of tokens not allowed next, for a whole batch at once."""

    def __init__(
        self, tokenizer: Tokenizer, options: DecodingOptions, sample_begin: int, n_vocab: int
    ):
        self.sample_begin = sample_begin
        self.eot = tokenizer.eot
        self.timestamp_begin = tokenizer.timestamp_begin
        self.no_timestamps = tokenizer.no_timestamps
        self.suppress = torch.zeros(n_vocab, dtype=torch.bool)
        if options.suppress_tokens:
            self.suppress[list(_suppress_tokens(tokenizer, options.suppress_tokens))] = True
        self.blank = torch.zeros(n_vocab, dtype=torch.bool)
        if options.suppress_blank:
            self.blank[tokenizer.encode(" ") + [tokenizer.eot]] = True
        self.timestamps = not options.without_timestamps
        self.timestamp_index = torch.arange(n_vocab - self.timestamp_begin)
        self.max_initial_timestamp_index = None
        if options.max_initial_timestamp is not None:
            precision = CHUNK_LENGTH / 1500  # seconds per audio position (20 ms)
            self.max_initial_timestamp_index = round(options.max_initial_timestamp / precision)

    def to(self, device: torch.device) -> LogitFilter:
        self.suppress = self.suppress.to(device)
        self.blank = self.blank.to(device)
        self.timestamp_index = self.timestamp_index.to(device)
        return self

    def apply(self, logits: Tensor, tokens: Tensor) -> None:
        at_start = tokens.shape[1] == self.sample_begin
        if at_start:
            logits.masked_fill_(self.blank, -np.inf)
        logits.masked_fill_(self.suppress, -np.inf)
        if self.timestamps:
            self._timestamp_rules(logits, tokens[:, self.sample_begin :], at_start)

    def _timestamp_rules(self, logits: Tensor, sampled: Tensor, at_start: bool) -> None:
        # Every rule is a fill with a per-row mask: no boolean indexing, so no step waits on
        # a device-to-host copy, and only the timestamp columns are touched where possible.
        tb = self.timestamp_begin
        timestamps = logits[:, tb:]  # a view: filling it fills the logits
        text = logits[:, :tb]
        logits[:, self.no_timestamps] = -np.inf
        if sampled.shape[1] > 0:
            is_ts = sampled >= tb
            last = is_ts[:, -1]
            penultimate = is_ts[:, -2] if sampled.shape[1] > 1 else torch.ones_like(last)
            # Timestamps come in pairs: after a closing pair only text, after one only a
            # timestamp (or the end).
            timestamps.masked_fill_((last & penultimate)[:, None], -np.inf)
            logits[:, : self.eot].masked_fill_((last & ~penultimate)[:, None], -np.inf)
            # Timestamps never go back; a new segment must start after the last one ended.
            last_ts = torch.where(is_ts, sampled, -1).amax(dim=1)
            floor = torch.where(last & ~penultimate, last_ts, last_ts + 1)
            floor = torch.where(last_ts >= tb, floor, tb)
            timestamps.masked_fill_(self.timestamp_index < (floor - tb)[:, None], -np.inf)
        if at_start:
            text.fill_(-np.inf)
            if self.max_initial_timestamp_index is not None:
                timestamps[:, self.max_initial_timestamp_index + 1 :] = -np.inf
        # When the timestamps together outweigh every single text token, emit a timestamp.
        # (The same comparison as between log-probabilities: both sides lose the same
        # normaliser, so it is left out.)
        timestamp_mass = timestamps.float().logsumexp(dim=-1)
        best_text = text.float().amax(dim=-1)
        text.masked_fill_((timestamp_mass > best_text)[:, None], -np.inf)


def _suppress_tokens(tokenizer: Tokenizer, suppress_tokens: str | Iterable[int]) -> list[int]:
    if isinstance(suppress_tokens, str):
        suppress_tokens = [int(t) for t in suppress_tokens.split(",") if t.strip()]
    tokens = list(suppress_tokens)
    if -1 in tokens:
        tokens = [t for t in tokens if t >= 0] + list(tokenizer.non_speech_tokens)
    # Control tokens are never text.
    tokens += [tokenizer.transcribe, tokenizer.translate, tokenizer.sot, tokenizer.sot_prev]
    tokens += [tokenizer.sot_lm, tokenizer.no_speech]
    return sorted(set(tokens))


class GreedyDecoder:
    """Argmax at temperature 0, else one sample from the softened distribution per row."""

    def __init__(self, temperature: float, eot: int) -> None:
        self.temperature = temperature
        self.eot = eot

    def update(
        self, tokens: Tensor, logits: Tensor, sum_logprobs: Tensor, cache: KVCache
    ) -> tuple[Tensor, bool]:
        if self.temperature == 0:
            next_tokens = logits.max(dim=-1).indices  # the first maximum, as argmax; faster
        else:
            next_tokens = torch.distributions.Categorical(logits=logits / self.temperature).sample()
        logits = logits.float()
        current = logits.gather(1, next_tokens[:, None])[:, 0] - logits.logsumexp(dim=-1)
        finished = tokens[:, -1] == self.eot
        sum_logprobs += current * ~finished
        next_tokens[finished] = self.eot
        tokens = torch.cat([tokens, next_tokens[:, None]], dim=-1)
        return tokens, bool((tokens[:, -1] == self.eot).all())

    def finished_audios(self, tokens: Tensor, n_group: int) -> list[bool]:
        """Per audio of the batch: whether all its rows have ended."""
        return (tokens[:, -1] == self.eot).view(-1, n_group).all(dim=1).tolist()

    def keep(self, audios: list[int]) -> None:
        pass  # no state per audio

    def finalize(self, tokens: Tensor, sum_logprobs: Tensor, n_group: int):
        tokens = F.pad(tokens, (0, 1), value=self.eot)  # every row ends with eot
        n_audio = tokens.shape[0] // n_group
        rows = tokens.reshape(n_audio, n_group, -1).cpu()
        scores = sum_logprobs.reshape(n_audio, n_group).cpu()
        return [list(group) for group in rows], [group.tolist() for group in scores]


class BeamSearchDecoder:
    """Beam search over `beam_size` rows per audio, all in one batch.

    Rows are reordered in the cache in place. Finished candidates are collected until each
    audio has `round(beam_size * patience)` of them.
    """

    def __init__(self, beam_size: int, eot: int, patience: float | None = None) -> None:
        self.beam_size = beam_size
        self.eot = eot
        self.max_candidates = round(beam_size * (patience or 1.0))
        self.finished: list[dict[tuple[int, ...], float]] | None = None
        # Each row's sequence as a number: equal numbers mean equal sequences. A sequence's
        # number is looked up from (its prefix's number, its last token), so comparing two
        # candidates costs O(1) rather than a copy of the whole sequence per step.
        self.sequence_ids: list[int] = []
        self.interned: dict[tuple[int, int], int] = {}
        self.audios: list[int] = []  # the audio (index into `finished`) of each batch group

    def finished_audios(self, tokens: Tensor, n_group: int) -> list[bool]:
        """Per audio of the batch: whether it has all the candidates it waits for."""
        assert self.finished is not None
        return [len(self.finished[audio]) >= self.max_candidates for audio in self.audios]

    def keep(self, audios: list[int]) -> None:
        """Keep the batch groups `audios` (finished ones leave the batch)."""
        beam = self.beam_size
        self.sequence_ids = [self.sequence_ids[a * beam + j] for a in audios for j in range(beam)]
        self.audios = [self.audios[a] for a in audios]

    def update(
        self, tokens: Tensor, logits: Tensor, sum_logprobs: Tensor, cache: KVCache
    ) -> tuple[Tensor, bool]:
        n_audio = tokens.shape[0] // self.beam_size
        if self.finished is None:
            self.finished = [{} for _ in range(n_audio)]
            self.sequence_ids = [0] * tokens.shape[0]  # every beam starts the same
            self.audios = list(range(n_audio))
        logprobs = F.log_softmax(logits.float(), dim=-1)
        # Only the top beam_size + 1 of each row can survive: one of them may be eot.
        top_logprobs, top_tokens = logprobs.topk(self.beam_size + 1, dim=-1)
        candidate_scores = (sum_logprobs[:, None] + top_logprobs).tolist()
        top_tokens = top_tokens.tolist()
        next_tokens, sources, next_scores, next_ids = [], [], [], []
        for slot, audio in enumerate(self.audios):
            # (prefix id, token) -> (score, row): identical sequences (all beams start the
            # same) collapse to one, the last row's winning, in first-seen order.
            candidates: dict[tuple[int, int], tuple[float, int]] = {}
            for row in range(slot * self.beam_size, (slot + 1) * self.beam_size):
                prefix = self.sequence_ids[row]
                for score, token in zip(candidate_scores[row], top_tokens[row]):
                    candidates[(prefix, token)] = (score, row)
            kept = 0
            newly_finished: list[tuple[float, int]] = []
            for key in sorted(candidates, key=lambda k: candidates[k][0], reverse=True):
                score, row = candidates[key]
                if key[1] == self.eot:
                    newly_finished.append((score, row))
                    continue
                next_tokens.append(key[1])
                sources.append(row)
                next_scores.append(score)
                next_ids.append(self.interned.setdefault(key, len(self.interned) + 1))
                kept += 1
                if kept == self.beam_size:
                    break
            done = self.finished[audio]
            for score, row in newly_finished:  # already best first
                if len(done) >= self.max_candidates:
                    break
                done[(*tokens[row].tolist(), self.eot)] = score
        self.sequence_ids = next_ids
        sum_logprobs.copy_(torch.tensor(next_scores, dtype=sum_logprobs.dtype))
        index = torch.tensor(sources, device=tokens.device)
        step = torch.tensor(next_tokens, device=tokens.device)
        tokens = torch.cat([tokens.index_select(0, index), step[:, None]], dim=1)
        cache.reorder(sources)
        completed = all(len(done) >= self.max_candidates for done in self.finished)
        return tokens, completed

    def finalize(self, tokens: Tensor, sum_logprobs: Tensor, n_group: int):
        n_audio = tokens.shape[0] // n_group
        rows = tokens.reshape(n_audio, n_group, -1).cpu()
        scores = sum_logprobs.reshape(n_audio, n_group).cpu()
        assert self.finished is not None
        for audio, done in enumerate(self.finished):
            # Too few finished: the best unfinished beams count, closed with eot.
            if len(done) < self.beam_size:
                for j in scores[audio].argsort(descending=True).tolist():
                    done[(*rows[audio, j].tolist(), self.eot)] = scores[audio, j].item()
                    if len(done) >= self.beam_size:
                        break
        candidates = [[torch.tensor(seq) for seq in done] for done in self.finished]
        return candidates, [list(done.values()) for done in self.finished]


def _rank(lengths: list[int], sum_logprobs: list[float], length_penalty: float | None) -> int:
    """Index of the best candidate by length-normalised log-probability."""
    scores = []
    for logprob, length in zip(sum_logprobs, lengths):
        penalty = length if length_penalty is None else ((5 + length) / 6) ** length_penalty
        scores.append(logprob / penalty)
    return int(np.argmax(scores))


class DecodingTask:
    def __init__(self, model: Whisper, options: DecodingOptions) -> None:
        _check_options(options)
        if options.language is not None:
            options = replace(options, language=language_code(options.language))
        self.model = model
        self.options = options
        self.tokenizer = get_tokenizer(
            model.is_multilingual,
            num_languages=model.num_languages,
            language=options.language,
            task=options.task,
        )
        self.n_group = options.beam_size or options.best_of or 1
        self.n_ctx = model.dims.n_text_ctx
        self.sample_len = options.sample_len or self.n_ctx // 2
        sot_sequence = self.tokenizer.sot_sequence
        if options.without_timestamps:
            sot_sequence = self.tokenizer.sot_sequence_including_notimestamps
        self.sot_sequence = sot_sequence
        self.initial_tokens = self._initial_tokens(options.prompt)
        self.sample_begin = len(self.initial_tokens)
        self.sot_index = self.initial_tokens.index(self.tokenizer.sot)
        self.logit_filter = LogitFilter(
            self.tokenizer, options, self.sample_begin, model.dims.n_vocab
        ).to(model.device)

    def _initial_tokens(self, prompt: str | list[int] | None) -> tuple[int, ...]:
        tokens = list(self.sot_sequence)
        if prefix := self.options.prefix:
            prefix_tokens = (
                self.tokenizer.encode(" " + prefix.strip())
                if isinstance(prefix, str)
                else list(prefix)
            )
            # As the reference: keep the prefix within the first half of the context.
            max_prefix_len = self.n_ctx // 2 - self.sample_len
            tokens += prefix_tokens[-max_prefix_len:]
        if prompt:
            prompt_tokens = (
                self.tokenizer.encode(" " + prompt.strip())
                if isinstance(prompt, str)
                else list(prompt)
            )
            tokens = [self.tokenizer.sot_prev, *prompt_tokens[-(self.n_ctx // 2 - 1) :], *tokens]
        return tuple(tokens)

    def _new_decoder(self):
        if self.options.beam_size is not None:
            return BeamSearchDecoder(
                self.options.beam_size, self.tokenizer.eot, self.options.patience
            )
        return GreedyDecoder(self.options.temperature, self.tokenizer.eot)

    def _main_loop(self, features: Tensor, tokens: Tensor, pad: Tensor | None):
        """Decode until every row ends; returns the search (to finalize), tokens, scores and
        no-speech probabilities. `pad`: each row's left padding (None: no row is padded)."""
        batch = tokens.shape[0]
        decoder = self._new_decoder()
        step = self._static_step(batch, features.shape[0])
        if step is not None:
            cache = step.cache
            cache.length = 0
            if pad is None:
                step.pad.zero_()
            else:
                step.pad.copy_(pad)
        else:
            cache = self.model.decoder.new_cache(
                batch, n_ctx=min(self.n_ctx, tokens.shape[1] + self.sample_len)
            )
        cache.pad = pad
        # Cross-attention keys/values once per audio, shared by its beams or samples.
        self.model.decoder.fill_cross_cache(cache, features)
        sum_logprobs = torch.zeros(batch, device=tokens.device)
        no_speech_probs = [np.nan] * batch
        # Windows that finish leave the batch, so that the rest do not carry them along.
        # Not with a CUDA graph (its shapes are fixed), nor when beam search stops before
        # it has beam_size candidates (the reference then takes the beams as they are when
        # every window has finished).
        compact = step is None and (
            not isinstance(decoder, BeamSearchDecoder)
            or decoder.max_candidates >= decoder.beam_size
        )
        rows = list(range(batch))  # the original row of each row of the batch
        left: dict[int, tuple[Tensor, Tensor]] = {}  # row -> (tokens, score) of finished rows
        step_input = tokens
        for i in range(self.sample_len):
            if i == 0:
                hidden = self.model.decoder(step_input, cache)
                # No-speech probability: what the model predicts right after <|startoftranscript|>.
                logits = self.model.decoder.logits(hidden[:, [self.sot_index, -1]])
                no_speech_probs = logits[:, 0].softmax(dim=-1)[:, self.tokenizer.no_speech].tolist()
                logits = logits[:, 1]
            elif step is not None:
                logits = step(step_input)
            else:
                logits = self.model.decoder.logits(self.model.decoder(step_input, cache)[:, -1])
            self.logit_filter.apply(logits, tokens)
            tokens, completed = decoder.update(tokens, logits, sum_logprobs, cache)
            if completed or tokens.shape[-1] > self.n_ctx:
                break
            if compact and tokens.shape[0] > self.n_group:
                finished = decoder.finished_audios(tokens, self.n_group)
                if any(finished):
                    audios = [a for a, done in enumerate(finished) if not done]
                    kept = [a * self.n_group + j for a in audios for j in range(self.n_group)]
                    for r in set(range(len(rows))) - set(kept):
                        left[rows[r]] = (tokens[r], sum_logprobs[r])
                    index = torch.tensor(kept, device=tokens.device)
                    tokens, sum_logprobs = tokens[index], sum_logprobs[index]
                    rows = [rows[r] for r in kept]
                    cache.keep(kept, audios)
                    decoder.keep(audios)
            step_input = tokens[:, -1:]
        if left:
            # Back to the whole batch, finished rows padded with eot to the longest.
            for r, row in enumerate(rows):
                left[row] = (tokens[r], sum_logprobs[r])
            width = max(t.shape[0] for t, _ in left.values())
            eot = self.tokenizer.eot
            tokens = torch.stack(
                [
                    F.pad(left[r][0], (0, width - left[r][0].shape[0]), value=eot)
                    for r in range(batch)
                ]
            )
            sum_logprobs = torch.stack([left[r][1] for r in range(batch)])
        return decoder, tokens, sum_logprobs, no_speech_probs

    def _static_step(self, batch: int, n_audio: int) -> StaticStep | None:
        """The model's CUDA-graph step for this batch shape, made once and kept on the model
        (a few shapes: batched windows alternate with single remainders and retries)."""
        model = self.model
        if model.device.type != "cuda" or not model.cuda_graphs:
            return None
        steps = model.__dict__.setdefault("_static_steps", {})
        key = (batch, n_audio)
        if key not in steps:
            if len(steps) >= MAX_STATIC_STEPS:
                del steps[next(iter(steps))]  # the oldest: its cache memory goes with it
            steps[key] = StaticStep(model.decoder, batch, n_audio, model.dims.n_audio_ctx)
        return steps[key]

    def _prompted_rows(
        self, n_audio: int, prompts: list[str | list[int] | None] | None, device: torch.device
    ) -> tuple[Tensor, Tensor | None]:
        """Initial tokens (n_audio, width) and the left padding per row (None: none padded).

        Rows with prompts of different lengths are padded on the left, so that every row
        ends with the same start-of-transcript sequence and samples from the same column.
        """
        if prompts is None:
            rows = [self.initial_tokens] * n_audio
        else:
            if len(prompts) != n_audio:
                raise ValueError(f"{len(prompts)} prompts given for {n_audio} windows")
            rows = [self._initial_tokens(prompt) for prompt in prompts]
        width = max(len(row) for row in rows)
        pad = [width - len(row) for row in rows]
        # After the start of transcript every row holds the same tokens: its index counts
        # from the end.
        self.sot_index = width - (
            len(self.initial_tokens) - self.initial_tokens.index(self.tokenizer.sot)
        )
        self.sample_begin = self.logit_filter.sample_begin = width
        tokens = torch.tensor(
            [[self.tokenizer.eot] * n + list(row) for n, row in zip(pad, rows)], device=device
        )
        return tokens, (torch.tensor(pad, device=device) if any(pad) else None)

    @torch.inference_mode()
    def run(
        self, mel: Tensor, prompts: list[str | list[int] | None] | None = None
    ) -> list[DecodingResult]:
        tokenizer = self.tokenizer
        features = _encode_if_needed(self.model, mel)
        n_audio = features.shape[0]
        tokens, pad = self._prompted_rows(n_audio, prompts, features.device)

        languages = [self.options.language] * n_audio
        language_probs = None
        if self.options.language is None or self.options.task == "lang_id":
            best, language_probs = _language_probs(self.model, features, tokenizer)
            languages = [max(p, key=p.get) for p in language_probs]
            if self.options.language is None:
                tokens[:, self.sot_index + 1] = best
        if self.options.task == "lang_id":
            return [
                DecodingResult(audio_features=f, language=lang, language_probs=p)
                for f, lang, p in zip(features, languages, language_probs)
            ]
        if not self.model.is_multilingual:
            languages = ["en"] * n_audio

        tokens = tokens.repeat_interleave(self.n_group, dim=0)
        if pad is not None:
            pad = pad.repeat_interleave(self.n_group)
        search, tokens, sum_logprobs, no_speech_probs = self._main_loop(features, tokens, pad)
        no_speech_probs = no_speech_probs[:: self.n_group]
        candidates, scores = search.finalize(tokens, sum_logprobs, self.n_group)

        results = []
        for i in range(n_audio):
            texts = []
            for t in candidates[i]:
                t = t.tolist()[self.sample_begin :]
                texts.append(t[: t.index(tokenizer.eot)] if tokenizer.eot in t else t)
            best = _rank([len(t) for t in texts], scores[i], self.options.length_penalty)
            chosen = texts[best]
            text = tokenizer.decode(chosen).strip()
            results.append(
                DecodingResult(
                    audio_features=features[i],
                    language=languages[i],
                    language_probs=language_probs[i] if language_probs else None,
                    tokens=chosen,
                    text=text,
                    avg_logprob=scores[i][best] / (len(chosen) + 1),
                    no_speech_prob=no_speech_probs[i],
                    temperature=self.options.temperature,
                    compression_ratio=compression_ratio(text),
                )
            )
        return results


def _check_options(options: DecodingOptions) -> None:
    if options.beam_size is not None and options.best_of is not None:
        raise ValueError("beam_size and best_of can't be given together")
    if options.temperature == 0 and options.best_of is not None:
        raise ValueError("best_of with greedy sampling (T=0) is not compatible")
    if options.patience is not None and options.beam_size is None:
        raise ValueError("patience requires beam_size to be given")
    if options.length_penalty is not None and not 0 <= options.length_penalty <= 1:
        raise ValueError("length_penalty (alpha) should be a value between 0 and 1")
    if options.task not in ("transcribe", "translate", "lang_id"):
        raise ValueError(f"unknown task {options.task!r}: use 'transcribe' or 'translate'")
    if options.language is not None and options.language not in LANGUAGES:
        language_code(options.language)  # raises a clear error for unknown languages


def decode(
    model: Whisper,
    mel: Tensor,
    options: DecodingOptions | None = None,
    *,
    prompts: list[str | list[int] | None] | None = None,
    **kwargs,
) -> DecodingResult | list[DecodingResult]:
    """Decode one window (n_mels, 3000) or a batch (batch, n_mels, 3000) of log-mel frames.

    Options come as a DecodingOptions and/or keyword arguments that override its fields.
    `prompts` gives each window of a batch its own prompt (text or tokens), in place of
    `options.prompt`: windows that continue different earlier text decode together.
    """
    options = replace(options or DecodingOptions(), **kwargs)
    single = mel.ndim == 2
    results = DecodingTask(model, options).run(mel.unsqueeze(0) if single else mel, prompts)
    return results[0] if single else results
