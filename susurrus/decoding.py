"""Decoding one 30-second window (or a batch of them) into tokens.

`decode` runs greedy search, sampling (`best_of` candidates at temperature > 0) or beam
search against a key/value cache that is allocated once per call. The timestamp rules and
token suppression are tensor operations over the whole batch, done once per step.
"""

from __future__ import annotations

import math
import numbers
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor

from .model import Whisper
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


def check_options(options: DecodingOptions) -> None:
    """Raise ValueError for options that cannot go together, or are out of range (so
    that a request's bad value fails it alone, before any of it is decoded)."""
    # (best_of and sample_len 0 mean their defaults, as in the reference.)
    for name, least in (("beam_size", 1), ("best_of", 0), ("sample_len", 0)):
        value = getattr(options, name)
        if value is not None and (isinstance(value, bool)
                                  or not isinstance(value, numbers.Integral) or value < least):
            raise ValueError(f"{name} must be a whole number of at least {least}, got {value!r}")
    temperature = options.temperature
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not (
        0 <= temperature < math.inf
    ):
        raise ValueError(f"temperature must be 0 or more, got {options.temperature!r}")
    patience = options.patience
    if patience is not None and not (isinstance(patience, numbers.Real) and patience >= 0):
        raise ValueError(f"patience must be 0 (its default) or more, got {patience!r}")
    if patience and options.beam_size is not None and round(options.beam_size * patience) < 1:
        # The reference's check: the beam would keep no finished candidate.
        raise ValueError(f"beam_size {options.beam_size} with patience {patience} keeps no "
                         "finished candidate")
    suppress_token_ids(options.suppress_tokens)  # raises for what is not a list of ids
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


def suppress_token_ids(tokens: str | Iterable[int] | None) -> list[int]:
    """`suppress_tokens` as a list of ids ("-1,220" as the command line gives it, or ids);
    -1 stands for the non-speech symbols."""
    if not tokens:
        return []
    if isinstance(tokens, str):
        parts = [t.strip() for t in tokens.split(",") if t.strip()]
    else:
        parts = list(tokens)
    ids = []
    for part in parts:
        try:
            if isinstance(part, (bool, float)):
                raise ValueError
            ids.append(int(part))
        except (TypeError, ValueError):
            raise ValueError(
                f"suppress_tokens must be token ids separated by commas, got {tokens!r}"
            ) from None
    if any(t < -1 for t in ids):
        raise ValueError(f"suppress_tokens: token ids are 0 or more (-1: non-speech symbols), "
                         f"got {tokens!r}")
    return ids


def decode(
    model: Whisper,
    mel: Tensor,
    options: DecodingOptions | None = None,
    *,
    prompts: list[str | list[int] | None] | None = None,
    **kwargs,
) -> DecodingResult | list[DecodingResult]:
    """Decode one window (n_mels, 3000) or a batch (batch, n_mels, 3000) of log-mel frames
    (or of audio features already encoded).

    Options come as a DecodingOptions and/or keyword arguments that override its fields.
    `prompts` gives each window of a batch its own prompt (text or tokens), in place of
    `options.prompt`: windows that continue different earlier text decode together.
    The windows decode side by side on an engine of their own (see susurrus.engine); each
    gives what it gives decoded alone.
    """
    from .engine import Engine, WindowJob, decode_jobs

    options = replace(options or DecodingOptions(), **kwargs)
    check_options(options)
    if options.language is not None:
        options = replace(options, language=language_code(options.language))
    single = mel.ndim == 2
    mels = mel.unsqueeze(0) if single else mel
    if prompts is not None and len(prompts) != mels.shape[0]:
        raise ValueError(f"{len(prompts)} prompts given for {mels.shape[0]} windows")
    with torch.inference_mode():
        features = _encode_if_needed(model, mels)
        if options.task == "lang_id":
            tokenizer = get_tokenizer(
                model.is_multilingual, num_languages=model.num_languages
            )
            _, probs = _language_probs(model, features, tokenizer)
            results = [
                DecodingResult(audio_features=f, language=max(p, key=p.get), language_probs=p)
                for f, p in zip(features, probs)
            ]
        else:
            jobs = [
                WindowJob(
                    options if prompts is None else replace(options, prompt=prompts[i]),
                    features=features[i],
                )
                for i in range(features.shape[0])
            ]
            results = decode_jobs(Engine(model, max_batch=len(jobs)), jobs)
    return results[0] if single else results
