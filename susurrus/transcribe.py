"""Long-form transcription: a recording of any length, 30 seconds at a time.

Each window is decoded with timestamps; the window then advances to the last complete
segment's end, so speech cut at a window's edge is decoded again in full in the next one.
Failed windows (repetitive or improbable text) are retried at higher temperatures.
"""

from __future__ import annotations

import itertools
import os
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
from tqdm import tqdm

from .audio import is_silent, load_audio
from .decoding import DecodingOptions, DecodingResult, decode
from .features import (
    FRAMES_PER_SECOND,
    HOP_LENGTH,
    N_FRAMES,
    N_SAMPLES,
    SAMPLE_RATE,
    MelStream,
    log_mel_spectrogram,
    pad_or_trim,
)
from .model import Whisper
from .timing import add_word_timestamps, get_end, is_segment_anomaly, next_words_segment
from .tokenizer import LANGUAGES, Tokenizer, get_tokenizer, language_code
from .vad import clip_timestamps_for, speech_regions
from .windows import FrameReader, iter_windows, window_spans
from .writers import format_timestamp

# (compression ratio, average log-probability, no-speech probability) thresholds; None: unused.
Thresholds = tuple[float | None, float | None, float | None]


def _verdicts(result: DecodingResult, thresholds: Thresholds) -> tuple[bool, bool, bool]:
    """Which thresholds flag a window: (too repetitive, too improbable, probably no speech)."""
    compression_ratio, logprob, no_speech = thresholds
    return (
        compression_ratio is not None and result.compression_ratio > compression_ratio,
        logprob is not None and result.avg_logprob < logprob,
        no_speech is not None and result.no_speech_prob > no_speech,
    )


def _needs_retry(result: DecodingResult, thresholds: Thresholds) -> bool:
    too_repetitive, too_unlikely, probably_silent = _verdicts(result, thresholds)
    # Improbable or repetitive text where the model itself says "no speech" is what it
    # makes up over silence: the window is skipped (see _is_silence), not retried.
    return (too_repetitive or too_unlikely) and not probably_silent


def _is_silence(result: DecodingResult, thresholds: Thresholds) -> bool:
    """Whether a window holds no speech: the reference rule (no-speech probability over its
    threshold and the text not confident), and also when that text is repetitive, which is
    how hallucinations over silence look."""
    too_repetitive, _, probably_silent = _verdicts(result, thresholds)
    logprob = thresholds[1]
    confident = logprob is not None and result.avg_logprob > logprob
    return probably_silent and (not confident or too_repetitive)


def _is_suspect(result: DecodingResult, thresholds: Thresholds) -> bool:
    """Whether any threshold flags the window even after fallback: text a reader should
    double-check (repetitive, improbable, or probably over silence)."""
    return any(_verdicts(result, thresholds))


def _finish_segments(segments: list[dict], suspect: bool, verbose: bool | None) -> None:
    """Print a window's segments (verbose), flag them, and empty the degenerate ones."""
    for segment in segments:
        if verbose:
            start, end = format_timestamp(segment["start"]), format_timestamp(segment["end"])
            print(f"[{start} --> {end}] {segment['text']}", flush=True)
        # A zero-length or empty segment keeps its place but carries nothing.
        if segment["start"] == segment["end"] or not segment["text"].strip():
            segment["text"], segment["tokens"], segment["words"] = "", [], []
        segment["suspect"] = suspect


def _decode_with_fallback(
    model: Whisper,
    mel: torch.Tensor,
    options: DecodingOptions,
    temperatures: tuple[float, ...],
    thresholds: Thresholds,
    prompts: list[list[int] | None] | None = None,
) -> list[DecodingResult]:
    """Decode a batch of windows (batch, n_mels, 3000); each window that fails the thresholds
    is decoded again at the next temperature, alone or with the others that failed.
    `prompts`: one per window, in place of `options.prompt` (see `decode`)."""
    results: list[DecodingResult | None] = [None] * mel.shape[0]
    pending = list(range(mel.shape[0]))
    features = None  # encoded once, reused by every retry
    for t in temperatures:
        # Beam search only at T=0; several samples only when sampling.
        if t > 0:
            attempt = replace(options, temperature=t, beam_size=None, patience=None)
        else:
            attempt = replace(options, temperature=t, best_of=None)
        inputs = mel if features is None else features[pending]
        decoded = decode(
            model,
            inputs,
            attempt,
            prompts=None if prompts is None else [prompts[i] for i in pending],
        )
        if features is None:
            features = torch.stack([r.audio_features for r in decoded])
        retry = []
        for index, result in zip(pending, decoded):
            results[index] = result
            if _needs_retry(result, thresholds):
                retry.append(index)
        pending = retry
        if not pending:
            break
    return results  # type: ignore[return-value]


def _parse_clips(clip_timestamps: str | list[float], content_frames: int) -> list[tuple[int, int]]:
    if isinstance(clip_timestamps, str):
        clip_timestamps = [float(t) for t in clip_timestamps.split(",") if t.strip()]
    points = [round(t * FRAMES_PER_SECOND) for t in clip_timestamps] or [0]
    if len(points) % 2 == 1:
        points.append(content_frames)
    return list(zip(points[::2], points[1::2]))


def read_recording(
    path: str | os.PathLike,
    n_mels: int,
    *,
    stream: int | None = None,
    vad: bool = False,
) -> np.ndarray | MelStream:
    """A file as `transcribe` reads it: all its samples when `vad` needs the whole
    recording at once, else a MelStream read as the windows advance (memory then does not
    grow with the recording's length, batched or not)."""
    if vad:
        return load_audio(path, stream=stream)
    return MelStream(path, n_mels, stream=stream)


def recording_is_silent(audio: np.ndarray | torch.Tensor | MelStream) -> bool:
    """The model would see nothing (see `audio.is_silent`), for samples or a MelStream."""
    if isinstance(audio, MelStream):
        return audio.silent
    return is_silent(audio)


def _empty_result(model: Whisper, decode_options: dict) -> dict:
    language = decode_options.get("language") or (None if model.is_multilingual else "en")
    # "no_speech" tells a reader of the JSON why there are no segments.
    return {"text": "", "segments": [], "language": language, "no_speech": True}


def _intersect_clips(user: str | list[float], speech: list[float]) -> list[float]:
    """Speech regions inside the user's clips (all when the user gave none)."""
    if isinstance(user, str):
        user = [float(t) for t in user.split(",") if t.strip()]
    user = list(user)
    if user in ([], [0.0]):
        return speech
    if len(user) % 2 == 1:
        user.append(float("inf"))
    clips = []
    for a, b in zip(user[::2], user[1::2]):
        for c, d in zip(speech[::2], speech[1::2]):
            start, end = max(a, c), min(b, d)
            if start < end:
                clips += [start, end]
    return clips or [0.0, 0.0]


def transcribe(
    model: Whisper,
    audio: str | np.ndarray | torch.Tensor | MelStream,
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
    vad: bool = False,
    batch_size: int | None = None,
    progress_callback: Callable[[int, int], None] | None = None,
    **decode_options,
) -> dict:
    """Transcribe (or translate) a whole recording.

    `audio` is a path, 16 kHz mono samples as a NumPy array or tensor, or a `MelStream`.
    A path is read as it is decoded (unless `vad` needs all of it at once).
    `verbose=True` prints each segment as it is decoded, `False` shows a progress bar,
    `None` neither. Other keyword arguments are DecodingOptions fields (language, task,
    beam_size, ...).
    `vad=True` decodes only the speech regions Silero VAD finds (times stay on the
    original time line); audio with no sample above -60 dBFS returns no segments.
    `batch_size=N` cuts the recording into windows at pauses (see windows.py) and decodes
    N at a time: faster, with timestamps, per-window fallback and word timestamps kept, but
    each window is decoded without the previous one's text as prompt.
    Returns {"text", "segments", "language"} as the reference `whisper.transcribe` does.
    """
    fp16 = decode_options.pop("fp16", True)
    if not fp16 and model.dtype != torch.float32:
        model.float()  # fp16=False asks for full precision, as in the reference

    user_clips = clip_timestamps
    if isinstance(audio, (str, os.PathLike)):
        audio = read_recording(audio, model.dims.n_mels, vad=vad)
    if not isinstance(audio, MelStream):
        audio = audio if torch.is_tensor(audio) else torch.from_numpy(np.asarray(audio))
    if recording_is_silent(audio):
        # Nothing audible: decoding would only invite hallucinated words.
        return _empty_result(model, decode_options)
    if isinstance(audio, MelStream):
        if vad:
            raise ValueError("vad needs the whole recording: pass a path or samples")
        frames = audio.frames
        content_frames = audio.content_frames
    else:
        samples = audio
        if vad:
            regions = speech_regions(samples)
            if not regions:
                return _empty_result(model, decode_options)
            clip_timestamps = _intersect_clips(clip_timestamps, clip_timestamps_for(regions))
        mel = log_mel_spectrogram(audio, model.dims.n_mels, padding=N_SAMPLES)
        content_frames = mel.shape[-1] - N_FRAMES

        def frames(start: int, stop: int) -> torch.Tensor:
            return mel[:, start:stop]

    content_duration = float(content_frames * HOP_LENGTH / SAMPLE_RATE)

    if decode_options.get("language") is None:
        if not model.is_multilingual:
            decode_options["language"] = "en"
        else:
            if verbose:
                print(
                    "Detecting language using up to the first 30 seconds. "
                    "Use `--language` to specify the language"
                )
            first = pad_or_trim(frames(0, N_FRAMES), N_FRAMES).to(model.device)
            _, probs = model.detect_language(first)
            decode_options["language"] = max(probs, key=probs.get)
            if verbose is not None:
                print(f"Detected language: {LANGUAGES[decode_options['language']].title()}")
    language = language_code(decode_options["language"])
    decode_options["language"] = language
    task = decode_options.get("task", "transcribe")
    if word_timestamps and task == "translate":
        # Translated words need not follow the order or timing of the spoken ones.
        warnings.warn("word-level timestamps on translations may not be reliable", stacklevel=2)
    tokenizer = get_tokenizer(
        model.is_multilingual, num_languages=model.num_languages, language=language, task=task
    )
    temperatures = (temperature,) if isinstance(temperature, (int, float)) else tuple(temperature)
    thresholds = (compression_ratio_threshold, logprob_threshold, no_speech_threshold)
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

    if batch_size is not None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if hallucination_silence_threshold is not None:
            warnings.warn(
                "hallucination_silence_threshold is not applied with batch_size", stacklevel=2
            )
        # Speech regions may share a window; clips the user chose stay apart.
        pack = vad and _parse_clips(user_clips, content_frames) == [(0, content_frames)]
        segments = _transcribe_windows(
            model,
            FrameReader(frames, content_frames),
            window_spans(clips, content_frames, pack),
            batch_size,
            tokenizer,
            replace(options, prompt=initial_prompt_tokens or None),
            temperatures,
            thresholds=thresholds,
            word_options=dict(
                prepend_punctuations=prepend_punctuations,
                append_punctuations=append_punctuations,
            )
            if word_timestamps
            else None,
            verbose=verbose,
            progress_callback=progress_callback,
        )
        all_segments = [{"id": i, **seg} for i, seg in enumerate(segments)]
        tokens = [t for seg in segments for t in seg["tokens"]]
        return {"text": tokenizer.decode(tokens), "segments": all_segments, "language": language}

    clip_index = 0
    seek = clips[0][0]
    last_speech_timestamp = 0.0  # where the last word ended, with word timestamps
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
            window = pad_or_trim(frames(seek, seek + segment_size), N_FRAMES).to(model.device)

            if carry_initial_prompt:
                ignored = max(len(initial_prompt_tokens), prompt_reset_since)
                prompt = initial_prompt_tokens + all_tokens[ignored:][-remaining_prompt_length:]
            else:
                prompt = all_tokens[prompt_reset_since:]
            (result,) = _decode_with_fallback(
                model,
                window[None],
                replace(options, prompt=prompt),
                temperatures,
                thresholds,
            )

            previous_seek = seek
            if _is_silence(result, thresholds):
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
                discard = False
                if word_timestamps:
                    seek, last_speech_timestamp, discard = _add_words_and_skip_hallucinations(
                        model,
                        tokenizer,
                        result,
                        segments,
                        previous_seek=previous_seek,
                        segment_size=segment_size,
                        content_frames=content_frames,
                        content_duration=content_duration,
                        seek=seek,
                        last_speech_timestamp=last_speech_timestamp,
                        prepend_punctuations=prepend_punctuations,
                        append_punctuations=append_punctuations,
                        hallucination_silence_threshold=hallucination_silence_threshold,
                    )
                if discard:
                    # A likely hallucination after a long silence: decode again from later on.
                    segments = []
                _finish_segments(segments, _is_suspect(result, thresholds), verbose)
                all_segments.extend(
                    {"id": i, **s} for i, s in enumerate(segments, start=len(all_segments))
                )
                all_tokens.extend(t for s in segments for t in s["tokens"])
                if not discard and (not condition_on_previous_text or result.temperature > 0.5):
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


# A window whose text ends this long before the window does is decoded again from there:
# Whisper stops early when it takes the last words for speech cut off by the window's edge.
MIN_REMAINDER_FRAMES = FRAMES_PER_SECOND


def _transcribe_windows(
    model: Whisper,
    reader: FrameReader,
    spans: list[tuple[int, int]],
    batch_size: int,
    tokenizer: Tokenizer,
    options: DecodingOptions,
    temperatures: tuple[float, ...],
    *,
    thresholds: Thresholds,
    word_options: dict | None,
    verbose: bool | None,
    progress_callback: Callable[[int, int], None] | None,
) -> list[dict]:
    """Decode the windows planned over `spans` `batch_size` at a time, planning and reading
    them as the batches advance.

    As in sequential decoding, a window whose last segment closes well before the window's
    end is decoded again from that point: the remainder joins the next batch as a window of
    its own, with the text decoded so far as its prompt (so that it continues rather than
    repeats).
    """
    input_stride = N_FRAMES // model.dims.n_audio_ctx
    time_precision = input_stride * HOP_LENGTH / SAMPLE_RATE
    total = sum(end - start for start, end in spans)
    done = 0
    planned = iter_windows(reader, spans)
    # Remainders waiting for a batch: (start, end, prompt, frames).
    remainders: deque[tuple[int, int, list[int] | None, torch.Tensor]] = deque()
    all_segments: list[dict] = []
    with tqdm(total=total, unit="frames", disable=verbose is not False) as bar:
        while True:
            # Remainders first, then the next planned windows (which share the caller's
            # prompt). Prompts of different lengths are padded by the decoder.
            batch = [remainders.popleft() for _ in range(min(batch_size, len(remainders)))]
            for start, end in itertools.islice(planned, batch_size - len(batch)):
                batch.append((start, end, None, reader(start, end)))
            if not batch:
                break
            mels = torch.stack([pad_or_trim(frames, N_FRAMES) for *_, frames in batch])
            prompts = None
            if any(prompt is not None for _, _, prompt, _ in batch):
                prompts = [options.prompt if p is None else p for _, _, p, _ in batch]
            windows = [(start, end) for start, end, *_ in batch]
            del batch  # the frames live on in `mels` only
            results = _decode_with_fallback(
                model, mels.to(model.device), options, temperatures, thresholds, prompts
            )
            for i, ((start, end), result) in enumerate(zip(windows, results)):
                size = end - start
                consumed = size
                if not _is_silence(result, thresholds):
                    offset = float(start * HOP_LENGTH / SAMPLE_RATE)
                    duration = size * HOP_LENGTH / SAMPLE_RATE
                    segments, seek = _split_segments(
                        result,
                        tokenizer,
                        start,
                        size,
                        duration,
                        offset,
                        input_stride,
                        time_precision,
                        keep_tail=True,
                    )
                    if end - seek >= MIN_REMAINDER_FRAMES:
                        context = [*(options.prompt or []), *result.tokens]
                        rest = mels[i, :, seek - start : end - start].clone()
                        remainders.append((seek, end, context, rest))
                        consumed = seek - start
                    if word_options is not None:
                        # Windows finish out of order: the window's start stands in for the
                        # end of the speech before it.
                        add_word_timestamps(
                            segments=segments,
                            model=model,
                            tokenizer=tokenizer,
                            audio_features=result.audio_features,
                            num_frames=size,
                            last_speech_timestamp=offset,
                            **word_options,
                        )
                    window_end = end * HOP_LENGTH / SAMPLE_RATE
                    for seg in segments:
                        # A window shorter than 30 s is padded: no time past its end is real.
                        seg["start"] = min(seg["start"], window_end)
                        seg["end"] = min(seg["end"], window_end)
                    _finish_segments(segments, _is_suspect(result, thresholds), verbose)
                    all_segments.extend(segments)
                done += consumed
                bar.update(consumed)
                if progress_callback is not None:
                    progress_callback(done, total)
    all_segments.sort(key=lambda seg: (seg["start"], seg["end"]))
    return all_segments


def _add_words_and_skip_hallucinations(
    model: Whisper,
    tokenizer: Tokenizer,
    result: DecodingResult,
    segments: list[dict],
    *,
    previous_seek: int,
    segment_size: int,
    content_frames: int,
    content_duration: float,
    seek: int,
    last_speech_timestamp: float,
    prepend_punctuations: str,
    append_punctuations: str,
    hallucination_silence_threshold: float | None,
) -> tuple[int, float, bool]:
    """Word timestamps for one window's segments, then where to continue.

    Returns (next seek, last speech timestamp, discard): `discard` means the window's
    segments are a likely hallucination preceded by silence and must be dropped; the seek
    then points past the silence so that the audio after it is decoded afresh.
    """
    time_offset = previous_seek * HOP_LENGTH / SAMPLE_RATE
    window_end_time = (previous_seek + N_FRAMES) * HOP_LENGTH / SAMPLE_RATE
    segment_duration = segment_size * HOP_LENGTH / SAMPLE_RATE
    is_ts = [t >= tokenizer.timestamp_begin for t in result.tokens]
    single_timestamp_ending = is_ts[-2:] == [False, True]

    add_word_timestamps(
        segments=segments,
        model=model,
        tokenizer=tokenizer,
        audio_features=result.audio_features,
        num_frames=segment_size,
        prepend_punctuations=prepend_punctuations,
        append_punctuations=append_punctuations,
        last_speech_timestamp=last_speech_timestamp,
    )
    if not single_timestamp_ending:
        # Resume where the last word ended rather than at the last timestamp token.
        last_word_end = get_end(segments)
        if last_word_end is not None and last_word_end > time_offset:
            seek = round(last_word_end * FRAMES_PER_SECOND)

    if hallucination_silence_threshold is not None:
        threshold = hallucination_silence_threshold
        if not single_timestamp_ending:
            last_word_end = get_end(segments)
            if last_word_end is not None and last_word_end > time_offset:
                # A long silence after the last word: skip to it; else take the whole window.
                remaining = window_end_time - last_word_end
                if remaining > threshold:
                    seek = round(last_word_end * FRAMES_PER_SECOND)
                else:
                    seek = previous_seek + segment_size

        # A suspicious first segment after a long leading silence: skip the silence only.
        first = next_words_segment(segments)
        if first is not None and is_segment_anomaly(first):
            gap = first["start"] - time_offset
            if gap > threshold:
                return previous_seek + round(gap * FRAMES_PER_SECOND), last_speech_timestamp, True

        # Drop a suspicious segment (and all after it) that silence or more suspicious
        # segments surround, and resume at its start.
        previous_end = last_speech_timestamp
        for index, segment in enumerate(segments):
            if not segment["words"]:
                continue
            if is_segment_anomaly(segment):
                following = next_words_segment(segments[index + 1 :])
                if following is not None:
                    next_start = following["words"][0]["start"]
                else:
                    next_start = time_offset + segment_duration
                silence_before = (
                    segment["start"] - previous_end > threshold
                    or segment["start"] < threshold
                    or segment["start"] - time_offset < 2.0
                )
                silence_after = (
                    next_start - segment["end"] > threshold
                    or is_segment_anomaly(following)
                    or window_end_time - segment["end"] < 2.0
                )
                if silence_before and silence_after:
                    seek = round(max(time_offset + 1, segment["start"]) * FRAMES_PER_SECOND)
                    if content_duration - segment["end"] < threshold:
                        seek = content_frames
                    del segments[index:]
                    break
            previous_end = segment["end"]

    last_word_end = get_end(segments)
    if last_word_end is not None:
        last_speech_timestamp = last_word_end
    return seek, last_speech_timestamp, False


def _split_segments(
    result: DecodingResult,
    tokenizer,
    seek: int,
    segment_size: int,
    segment_duration: float,
    time_offset: float,
    input_stride: int,
    time_precision: float,
    keep_tail: bool = False,
) -> tuple[list[dict], int]:
    """Cut a window's tokens into segments at timestamp pairs; return them and the next seek.

    Text after the last complete segment is left for the next window to decode again, or
    with `keep_tail` (batched windows, which end at a pause) kept as a last segment that ends
    at its own timestamp or at the window's end.
    """
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
        tail = tokens[last:]
        if keep_tail and not single_timestamp_ending and any(t < tb for t in tail):
            end = tail[-1] if tail[-1] >= tb else None
            segments.append(
                segment(
                    time_offset + (tail[0] - tb) * time_precision,
                    time_offset
                    + (segment_duration if end is None else (end - tb) * time_precision),
                    tail,
                )
            )
            return segments, seek + segment_size
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
