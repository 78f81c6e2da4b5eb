"""Long-form transcription: a recording of any length, 30 seconds at a time.

Each window is decoded with timestamps; the window then advances to the last complete
segment's end, so speech cut at a window's edge is decoded again in full in the next one.
Failed windows (repetitive or improbable text) are retried at higher temperatures.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
from tqdm import tqdm

from .decoding import DecodingOptions, DecodingResult, decode
from .features import (
    FRAMES_PER_SECOND,
    HOP_LENGTH,
    N_FRAMES,
    N_SAMPLES,
    SAMPLE_RATE,
    log_mel_spectrogram,
    pad_or_trim,
)
from .model import Whisper
from .tokenizer import LANGUAGES, get_tokenizer, language_code
from .writers import format_timestamp


def _decode_with_fallback(
    model: Whisper,
    mel: torch.Tensor,
    options: DecodingOptions,
    temperatures: tuple[float, ...],
    compression_ratio_threshold: float | None,
    logprob_threshold: float | None,
    no_speech_threshold: float | None,
) -> DecodingResult:
    result = None
    for t in temperatures:
        # Beam search only at T=0; several samples only when sampling.
        if t > 0:
            attempt = replace(options, temperature=t, beam_size=None, patience=None)
        else:
            attempt = replace(options, temperature=t, best_of=None)
        result = decode(model, mel, attempt)
        too_repetitive = (
            compression_ratio_threshold is not None
            and result.compression_ratio > compression_ratio_threshold
        )
        too_unlikely = logprob_threshold is not None and result.avg_logprob < logprob_threshold
        # Improbable text over silence is expected: the window will be skipped, not retried.
        silent = no_speech_threshold is not None and result.no_speech_prob > no_speech_threshold
        if not too_repetitive and (not too_unlikely or silent):
            break
    assert result is not None
    return result


def _parse_clips(clip_timestamps: str | list[float], content_frames: int) -> list[tuple[int, int]]:
    if isinstance(clip_timestamps, str):
        clip_timestamps = [float(t) for t in clip_timestamps.split(",") if t.strip()]
    points = [round(t * FRAMES_PER_SECOND) for t in clip_timestamps] or [0]
    if len(points) % 2 == 1:
        points.append(content_frames)
    return list(zip(points[::2], points[1::2]))


def transcribe(
    model: Whisper,
    audio: str | np.ndarray | torch.Tensor,
    *,
    verbose: bool | None = None,
    temperature: float | tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
    compression_ratio_threshold: float | None = 2.4,
    logprob_threshold: float | None = -1.0,
    no_speech_threshold: float | None = 0.6,
    condition_on_previous_text: bool = True,
    initial_prompt: str | None = None,
    carry_initial_prompt: bool = False,
    word_timestamps: bool = False,
    prepend_punctuations: str = "\"'“¿([{-",
    append_punctuations: str = "\"'.。,，!！?？:：”)]}、",
    clip_timestamps: str | list[float] = "0",
    hallucination_silence_threshold: float | None = None,
    progress_callback: Callable[[int, int], None] | None = None,
    **decode_options,
) -> dict:
    """Transcribe (or translate) a whole recording.

    `audio` is a path, or 16 kHz mono samples as a NumPy array or tensor. `verbose=True`
    prints each segment as it is decoded, `False` shows a progress bar, `None` neither.
    Other keyword arguments are DecodingOptions fields (language, task, beam_size, ...).
    Returns {"text", "segments", "language"} as the reference `whisper.transcribe` does.
    """
    if word_timestamps or hallucination_silence_threshold is not None:
        raise NotImplementedError("word timestamps are not available yet")
    del prepend_punctuations, append_punctuations
    fp16 = decode_options.pop("fp16", True)
    # Half precision only on an accelerator; fp16=False there asks for full precision.
    if model.device.type == "cpu" or not fp16:
        if model.dtype != torch.float32:
            model.float()

    mel = log_mel_spectrogram(audio, model.dims.n_mels, padding=N_SAMPLES)
    content_frames = mel.shape[-1] - N_FRAMES

    if decode_options.get("language") is None:
        if not model.is_multilingual:
            decode_options["language"] = "en"
        else:
            if verbose:
                print(
                    "Detecting language using up to the first 30 seconds. "
                    "Use `--language` to specify the language"
                )
            first = pad_or_trim(mel, N_FRAMES).to(model.device)
            _, probs = model.detect_language(first)
            decode_options["language"] = max(probs, key=probs.get)
            if verbose is not None:
                print(f"Detected language: {LANGUAGES[decode_options['language']].title()}")
    language = language_code(decode_options["language"])
    decode_options["language"] = language
    task = decode_options.get("task", "transcribe")
    tokenizer = get_tokenizer(
        model.is_multilingual, num_languages=model.num_languages, language=language, task=task
    )
    temperatures = (temperature,) if isinstance(temperature, (int, float)) else tuple(temperature)
    options = DecodingOptions(**{**decode_options, "fp16": fp16})

    clips = _parse_clips(clip_timestamps, content_frames)
    input_stride = N_FRAMES // model.dims.n_audio_ctx  # mel frames per audio position: 2
    time_precision = input_stride * HOP_LENGTH / SAMPLE_RATE  # 0.02 s per timestamp step

    all_tokens: list[int] = []
    all_segments: list[dict] = []
    prompt_reset_since = 0
    remaining_prompt_length = model.dims.n_text_ctx // 2 - 1
    initial_prompt_tokens: list[int] = []
    if initial_prompt is not None:
        initial_prompt_tokens = tokenizer.encode(" " + initial_prompt.strip())
        all_tokens.extend(initial_prompt_tokens)
        remaining_prompt_length -= len(initial_prompt_tokens)

    clip_index = 0
    seek = clips[0][0]
    with tqdm(total=content_frames, unit="frames", disable=verbose is not False) as bar:
        while clip_index < len(clips):
            clip_start, clip_end = clips[clip_index]
            seek = max(seek, clip_start)
            if seek >= clip_end:
                clip_index += 1
                if clip_index < len(clips):
                    seek = clips[clip_index][0]
                continue
            time_offset = float(seek * HOP_LENGTH / SAMPLE_RATE)
            segment_size = min(N_FRAMES, content_frames - seek, clip_end - seek)
            segment_duration = segment_size * HOP_LENGTH / SAMPLE_RATE
            # Frames past the content are zeros in log-mel space, as the model was trained.
            window = pad_or_trim(mel[:, seek : seek + segment_size], N_FRAMES).to(model.device)

            if carry_initial_prompt:
                ignored = max(len(initial_prompt_tokens), prompt_reset_since)
                prompt = initial_prompt_tokens + all_tokens[ignored:][-remaining_prompt_length:]
            else:
                prompt = all_tokens[prompt_reset_since:]
            result = _decode_with_fallback(
                model,
                window,
                replace(options, prompt=prompt),
                temperatures,
                compression_ratio_threshold,
                logprob_threshold,
                no_speech_threshold,
            )

            previous_seek = seek
            if (
                no_speech_threshold is not None
                and result.no_speech_prob > no_speech_threshold
                and not (logprob_threshold is not None and result.avg_logprob > logprob_threshold)
            ):
                seek += segment_size  # silence: nothing to keep in this window
            else:
                segments, seek = _split_segments(
                    result,
                    tokenizer,
                    seek,
                    segment_size,
                    segment_duration,
                    time_offset,
                    input_stride,
                    time_precision,
                )
                if verbose:
                    for s in segments:
                        start, end = format_timestamp(s["start"]), format_timestamp(s["end"])
                        print(f"[{start} --> {end}] {s['text']}", flush=True)
                for s in segments:
                    # A zero-length or empty segment keeps its place but carries nothing.
                    if s["start"] == s["end"] or not s["text"].strip():
                        s["text"], s["tokens"] = "", []
                all_segments.extend(
                    {"id": i, **s} for i, s in enumerate(segments, start=len(all_segments))
                )
                all_tokens.extend(t for s in segments for t in s["tokens"])
                if not condition_on_previous_text or result.temperature > 0.5:
                    # A high-temperature window is unreliable context for the next one.
                    prompt_reset_since = len(all_tokens)

            bar.update(min(content_frames, seek) - previous_seek)
            if progress_callback is not None:
                progress_callback(min(content_frames, seek), content_frames)

    return {
        "text": tokenizer.decode(all_tokens[len(initial_prompt_tokens) :]),
        "segments": all_segments,
        "language": language,
    }


def _split_segments(
    result: DecodingResult,
    tokenizer,
    seek: int,
    segment_size: int,
    segment_duration: float,
    time_offset: float,
    input_stride: int,
    time_precision: float,
) -> tuple[list[dict], int]:
    """Cut a window's tokens into segments at timestamp pairs; return them and the next seek."""
    tokens = result.tokens
    tb = tokenizer.timestamp_begin
    is_ts = [t >= tb for t in tokens]

    def segment(start: float, end: float, seg_tokens: list[int]) -> dict:
        return {
            "seek": seek,
            "start": start,
            "end": end,
            "text": tokenizer.decode([t for t in seg_tokens if t < tokenizer.eot]),
            "tokens": list(seg_tokens),
            "temperature": result.temperature,
            "avg_logprob": result.avg_logprob,
            "compression_ratio": result.compression_ratio,
            "no_speech_prob": result.no_speech_prob,
        }

    single_timestamp_ending = is_ts[-2:] == [False, True]
    # Positions just after each pair of consecutive timestamps: segment boundaries.
    cuts = [i + 1 for i in range(len(tokens) - 1) if is_ts[i] and is_ts[i + 1]]
    segments = []
    if cuts:
        if single_timestamp_ending:
            cuts.append(len(tokens))
        last = 0
        for cut in cuts:
            piece = tokens[last:cut]
            segments.append(
                segment(
                    time_offset + (piece[0] - tb) * time_precision,
                    time_offset + (piece[-1] - tb) * time_precision,
                    piece,
                )
            )
            last = cut
        if single_timestamp_ending:
            # The window ended with speech finished: continue after the window.
            seek += segment_size
        else:
            # Resume from the last complete segment's end; the rest is decoded again.
            seek += (tokens[last - 1] - tb) * input_stride
    else:
        duration = segment_duration
        timestamps = [t for t in tokens if t >= tb]
        if timestamps and timestamps[-1] != tb:
            duration = (timestamps[-1] - tb) * time_precision
        segments.append(segment(time_offset, time_offset + duration, tokens))
        seek += segment_size
    return segments, seek
