"""Media input: decode any file FFmpeg (via PyAV) can read to 16 kHz mono float32, and probe it.

The decoded samples are meant to be bit-identical to what the reference whisper gets from
``ffmpeg -i FILE -f s16le -ac 1 -ar 16000 -`` divided by 32768: libswresample converts to mono
int16 at the target rate (the same conversion the ffmpeg CLI sets up), then we scale to float.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import av
import numpy as np
import torch

from susurrus.errors import SusurrusError

# The model-side constants and functions live in features.py; the reference package keeps them
# in `whisper.audio`, so they are importable from here too.
from susurrus.features import (  # noqa: F401
    CHUNK_FRAMES,
    CHUNK_LENGTH,
    HOP_LENGTH,
    N_FFT,
    N_FRAMES,
    N_SAMPLES,
    SAMPLE_RATE,
    _log10_mel,
    log_mel_is_blank,
    log_mel_spectrogram,
    pad_or_trim,
)

__all__ = ["SAMPLE_RATE", "load_audio", "iter_audio", "probe", "format_probe"]

# int16 -> float32 scale; a power of two, so the conversion is exact.
_SCALE = np.float32(1.0 / 32768.0)

# A header may claim an absurd duration; cap what we reserve up front (the buffer still grows).
_MAX_PREALLOC_SECONDS = 8 * 3600

# Demuxers that "succeed" on plain text; such files are not media to a user.
_TEXT_DEMUXERS = {"tty"}


def _display_name(file: str | os.PathLike) -> str:
    return os.fsdecode(os.fspath(file))


def _open(file: str | os.PathLike, *, empty_message: str) -> tuple[Any, str]:
    """Open a media file for reading, translating every failure into one SusurrusError line."""
    path = os.fspath(file)
    name = _display_name(file)
    if not os.path.exists(path):
        if os.path.islink(path):
            raise SusurrusError(f"{name}: a link to nothing (its target does not exist)")
        raise SusurrusError(f"No such file: {name}")
    if os.path.isdir(path):
        raise SusurrusError(f"{name}: is a directory, not an audio or video file")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise SusurrusError(f"{name}: {empty_message}")
    if not os.access(path, os.R_OK):
        raise SusurrusError(f"{name}: permission denied")
    try:
        # 'replace' so that badly encoded tags never make a good file unreadable.
        container = av.open(name, "r", metadata_errors="replace")
    except av.error.PermissionError:
        raise SusurrusError(f"{name}: permission denied") from None
    except (av.error.InvalidDataError, av.error.EOFError, av.error.LookupError):
        raise SusurrusError(f"{name}: not an audio or video file FFmpeg can read") from None
    except av.error.FFmpegError as e:
        raise SusurrusError(
            f"{name}: not an audio or video file FFmpeg can read ({e.strerror})"
        ) from None
    except OSError as e:
        raise SusurrusError(f"{name}: cannot read: {e.strerror or e}") from None
    if container.format.name in _TEXT_DEMUXERS:
        container.close()
        raise SusurrusError(f"{name}: not an audio or video file FFmpeg can read")
    return container, name


def _is_default(st: Any) -> bool:
    return bool(st.disposition & av.stream.Disposition.default)


def rank_audio_streams(streams: list[Any]) -> list[int]:
    """Audio stream numbers (0 = the first audio stream) best first, as the ffmpeg command
    picks one when no stream is mapped: a stream marked default before the others, then the
    one with the most channels, then the earlier one. `streams` are PyAV audio streams."""

    def key(i: int) -> tuple[bool, int, int]:
        cc = streams[i].codec_context
        channels = (cc.channels or 0) if cc is not None else 0
        return (not _is_default(streams[i]), -channels, i)

    return sorted(range(len(streams)), key=key)


def _select_audio_stream(container: Any, name: str, stream: int | None) -> Any:
    audio = list(container.streams.audio)
    if not audio:
        raise SusurrusError(f"{name}: has no audio stream")
    index = rank_audio_streams(audio)[0] if stream is None else int(stream)
    if not 0 <= index < len(audio):
        n = len(audio)
        plural = "stream" if n == 1 else "streams"
        raise SusurrusError(
            f"{name}: there is no audio stream {index}; the file has {n} audio {plural} "
            f"(valid: 0..{n - 1})"
        )
    return audio[index]


def chosen_audio_stream(file: str | os.PathLike) -> int:
    """The audio stream `load_audio(file)` reads when no stream is given (see
    `rank_audio_streams`); SusurrusError when the file cannot be read or has no audio."""
    container, name = _open(file, empty_message="contains no audio samples (the file is empty)")
    with container:
        audio = list(container.streams.audio)
        if not audio:
            raise SusurrusError(f"{name}: has no audio stream")
        return rank_audio_streams(audio)[0]


def _decode_s16(container: Any, st: Any, name: str, sr: int) -> Iterator[np.ndarray]:
    """Yield the chosen stream as mono int16 blocks at `sr`, closing the container at the end.

    Bad packets are skipped and a read error ends the input, as the ffmpeg CLI does, so a
    file that is damaged in the middle still yields everything that can be decoded.
    """
    resampler = None
    in_key = None
    produced = 0
    last_error: av.error.FFmpegError | None = None

    def convert(frame: Any) -> Iterator[np.ndarray]:
        nonlocal resampler, in_key, produced
        if frame is not None:
            if frame.samples == 0:
                return
            key = (frame.format.name, frame.layout.name, frame.sample_rate)
            if key != in_key:
                # The input format can change mid-stream (e.g. 5.1 -> stereo in broadcasts);
                # the ffmpeg CLI reconfigures its filters then, so drain and rebuild.
                if resampler is not None:
                    yield from convert(None)
                resampler = av.AudioResampler(format="s16", layout="mono", rate=sr)
                in_key = key
        elif resampler is None:
            return
        try:
            outs = resampler.resample(frame)
        except (av.error.FFmpegError, ValueError) as e:
            layout, rate = in_key[1], in_key[2]
            detail = getattr(e, "strerror", None) or str(e)
            raise SusurrusError(
                f"{name}: cannot convert {layout} audio at {rate} Hz to {sr} Hz mono ({detail})"
            ) from None
        for out in outs:
            data = out.to_ndarray().reshape(-1)
            if data.size:
                produced += data.size
                yield data

    try:
        packets = container.demux(st)
        flushed = False
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                break
            except av.error.FFmpegError as e:
                last_error = e
                break
            if packet.size == 0:
                flushed = True
            try:
                frames = st.decode(packet)
            except (av.error.DecoderNotFoundError, av.error.PatchWelcomeError) as e:
                cc = st.codec_context
                codec = cc.codec.canonical_name if cc is not None else "unknown"
                raise SusurrusError(
                    f"{name}: cannot decode audio codec '{codec}' ({e.strerror})"
                ) from None
            except av.error.FFmpegError as e:
                last_error = e
                continue
            for frame in frames:
                yield from convert(frame)
        if not flushed:
            try:
                for frame in st.decode(None):
                    yield from convert(frame)
            except av.error.FFmpegError as e:
                last_error = e
        yield from convert(None)
    finally:
        container.close()
        # `convert` refers to itself (a cycle only the garbage collector breaks): the
        # resampler and its threads go now, not whenever that runs.
        resampler = None
    if produced == 0:
        if last_error is not None:
            raise SusurrusError(
                f"{name}: contains no audio samples that could be decoded ({last_error.strerror})"
            )
        raise SusurrusError(f"{name}: contains no audio samples")


def _expected_samples(container: Any, st: Any, sr: int) -> int | None:
    seconds = None
    if st.duration is not None and st.time_base is not None and st.duration > 0:
        seconds = float(st.duration * st.time_base)
    elif container.duration is not None and container.duration > 0:
        seconds = container.duration / av.time_base
    if seconds is None or not math.isfinite(seconds):
        return None
    return int(min(seconds, _MAX_PREALLOC_SECONDS) * sr) + 1


def _check_rate(sr: int) -> int:
    if isinstance(sr, bool) or int(sr) != sr or sr <= 0:
        raise ValueError(f"sample rate must be a positive integer, got {sr!r}")
    return int(sr)


def load_audio(
    file: str | os.PathLike, sr: int = SAMPLE_RATE, stream: int | None = None
) -> np.ndarray:
    """Decode an audio or video file to a mono float32 array at `sr` Hz in [-1, 1).

    `stream` counts audio streams only (0 = the first audio stream); None takes the one the
    ffmpeg command would (see `rank_audio_streams`).
    Raises SusurrusError with a one-line message for anything wrong with the file.
    """
    sr = _check_rate(sr)
    container, name = _open(file, empty_message="contains no audio samples (the file is empty)")
    try:
        st = _select_audio_stream(container, name, stream)
        expected = _expected_samples(container, st, sr)
    except BaseException:
        container.close()
        raise
    # Fill one buffer sized from the header, so a long file is never held twice in memory;
    # only if the header underestimates do we grow it (in place where realloc allows).
    buf = np.empty(expected + sr // 10 if expected else 60 * sr, dtype=np.float32)
    n = 0
    for block in _decode_s16(container, st, name, sr):
        end = n + block.size
        if end > buf.size:
            buf.resize(max(end, buf.size + buf.size // 2), refcheck=False)
        buf[n:end] = block
        n = end
    buf.resize(n, refcheck=False)
    buf *= _SCALE
    return buf


def iter_audio(
    file: str | os.PathLike,
    sr: int = SAMPLE_RATE,
    stream: int | None = None,
    block_samples: int = 30 * SAMPLE_RATE,
) -> Iterator[np.ndarray]:
    """Decode like load_audio, but yield float32 blocks of exactly `block_samples` samples
    (the last one may be shorter). Problems with opening the file are raised immediately."""
    sr = _check_rate(sr)
    if block_samples <= 0:
        raise ValueError(f"block_samples must be positive, got {block_samples!r}")
    container, name = _open(file, empty_message="contains no audio samples (the file is empty)")
    try:
        st = _select_audio_stream(container, name, stream)
    except BaseException:
        container.close()
        raise
    return _blocks(_decode_s16(container, st, name, sr), block_samples)


def _blocks(decoded: Iterator[np.ndarray], block_samples: int) -> Iterator[np.ndarray]:
    out = np.empty(block_samples, dtype=np.float32)
    fill = 0
    for data in decoded:
        pos = 0
        while pos < data.size:
            take = min(block_samples - fill, data.size - pos)
            out[fill : fill + take] = data[pos : pos + take]
            fill += take
            pos += take
            if fill == block_samples:
                out *= _SCALE
                yield out
                out = np.empty(block_samples, dtype=np.float32)
                fill = 0
    if fill:
        yield out[:fill] * _SCALE


# ---------------------------------------------------------------------------------------------
# probing


def _seconds(value: int | None, time_base: Fraction | None) -> float | None:
    if value is None or time_base is None:
        return None
    return float(value * time_base)


_HMS = re.compile(r"^(\d+):(\d{2}):(\d{2}(?:\.\d+)?)$")


def _tag_duration(metadata: dict[str, str]) -> float | None:
    # Matroska keeps per-stream durations only as a "DURATION" tag like 00:00:03.000000000.
    for key, value in metadata.items():
        if key.upper() == "DURATION":
            m = _HMS.match(value.strip())
            if m:
                return int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3])
    return None


def _rate(value: Fraction | None) -> float | None:
    if not value:
        return None
    return round(float(value), 3)


_UNSPECIFIED_LAYOUT = re.compile(r"^\d+ channels$")


def _layout_name(cc: Any) -> str | None:
    # PyAV names a layout without a channel order "N channels"; report that as unknown.
    if not cc.channels:
        return None
    name = cc.layout.name
    return None if _UNSPECIFIED_LAYOUT.match(name) else name


def _stream_info(st: Any, audio_index: int | None) -> dict[str, Any]:
    cc = st.codec_context
    codec = cc.codec if cc is not None else None
    metadata = dict(st.metadata)
    info: dict[str, Any] = {
        "index": st.index,
        "type": st.type,
        # The codec's own name ("mp3"), not the decoder's ("mp3float"), as ffmpeg prints it.
        "codec": codec.canonical_name if codec is not None else None,
        "codec_long_name": codec.long_name if codec is not None else None,
        "profile": st.profile,
        "language": metadata.get("language"),
        "title": metadata.get("title"),
        "duration": _seconds(st.duration, st.time_base) or _tag_duration(metadata),
        "bit_rate": (cc.bit_rate or None) if cc is not None else None,
    }
    if st.type == "attachment":
        # fonts and cover art in Matroska: no timing, the file name and type matter
        info.update(
            duration=None, filename=metadata.get("filename"), mimetype=metadata.get("mimetype")
        )
    elif cc is None:
        pass  # a stream FFmpeg has no codec for: nothing more to say
    elif st.type == "audio":
        info.update(
            audio_index=audio_index,
            default=_is_default(st),
            sample_rate=cc.sample_rate or None,
            channels=cc.channels or None,
            channel_layout=_layout_name(cc),
            sample_format=cc.format.name if cc.format is not None else None,
        )
    elif st.type == "video":
        info.update(
            width=cc.width or None,
            height=cc.height or None,
            frame_rate=_rate(st.average_rate) or _rate(st.guessed_rate),
            pixel_format=cc.format.name if cc.format is not None else None,
        )
    return info


def probe(file: str | os.PathLike) -> dict[str, Any]:
    """Describe a media file: container, duration, bit rate and every stream.

    The result is JSON-serialisable; durations/times are seconds (None when unknown).
    "audio_stream" is the audio stream transcription reads by default (None: no audio).
    """
    container, name = _open(file, empty_message="not an audio or video file (the file is empty)")
    with container:
        audio = list(container.streams.audio)
        audio_index = {s.index: i for i, s in enumerate(audio)}
        # The stream transcription reads unless told otherwise (`--audio_stream`).
        chosen = rank_audio_streams(audio)[0] if audio else None
        return {
            "file": name,
            "format": container.format.name,
            "format_long_name": container.format.long_name,
            "duration": _seconds(container.duration, Fraction(1, av.time_base)),
            "start_time": _seconds(container.start_time, Fraction(1, av.time_base)),
            "bit_rate": container.bit_rate or None,
            "size": os.path.getsize(os.fspath(file)),
            "tags": dict(container.metadata),
            "audio_stream": chosen,
            "streams": [_stream_info(s, audio_index.get(s.index)) for s in container.streams],
        }


def _hms(seconds: float) -> str:
    # ffmpeg rounds the duration to centiseconds.
    cs = int(round(seconds * 100))
    h, rest = divmod(cs, 360000)
    m, rest = divmod(rest, 6000)
    s, c = divmod(rest, 100)
    return f"{h:02d}:{m:02d}:{s:02d}.{c:02d}"


def _fps(fps: float) -> str:
    return f"{fps:.0f}" if abs(fps - round(fps)) < 0.005 else f"{fps:.2f}"


def format_probe(info: dict[str, Any]) -> str:
    """Render probe() output in the style of `ffmpeg -i`."""
    lines = [f"Input #0, {info['format']}, from '{info['file']}':"]
    title = (info.get("tags") or {}).get("title")
    if title:
        lines.append(f"  Title: {title}")
    duration = "N/A" if info.get("duration") is None else _hms(info["duration"])
    start = "" if info.get("start_time") is None else f", start: {info['start_time']:.6f}"
    bit_rate = "N/A" if not info.get("bit_rate") else f"{info['bit_rate'] // 1000} kb/s"
    lines.append(f"  Duration: {duration}{start}, bitrate: {bit_rate}")
    for s in info["streams"]:
        lang = f"({s['language']})" if s.get("language") else ""
        codec = s.get("codec") or s.get("mimetype") or "unknown"
        parts = [f"{codec} ({s['profile']})" if s.get("profile") else codec]
        if s["type"] == "audio":
            if s.get("sample_rate"):
                parts.append(f"{s['sample_rate']} Hz")
            if s.get("channel_layout"):
                parts.append(s["channel_layout"])
            elif s.get("channels"):
                # what FFmpeg assumes (and decodes with) when a file gives no layout
                default = {1: "mono", 2: "stereo"}.get(s["channels"])
                parts.append(default or f"{s['channels']} channels")
            if s.get("sample_format"):
                parts.append(s["sample_format"])
        elif s["type"] == "video":
            if s.get("pixel_format"):
                parts.append(s["pixel_format"])
            if s.get("width") and s.get("height"):
                parts.append(f"{s['width']}x{s['height']}")
            if s.get("frame_rate"):
                parts.append(f"{_fps(s['frame_rate'])} fps")
        if s.get("bit_rate"):
            parts.append(f"{s['bit_rate'] // 1000} kb/s")
        kind = s["type"].capitalize()
        default = " (default)" if s.get("default") else ""
        lines.append(f"  Stream #0:{s['index']}{lang}: {kind}: {', '.join(parts)}{default}")
        if s.get("title"):
            lines.append(f"    title: {s['title']}")
        if s["type"] == "audio" and s.get("audio_index") == info.get("audio_stream"):
            # ffmpeg's own output has no such line; it says which stream a transcript uses.
            lines.append(f"    transcribed by default (--audio_stream {s['audio_index']})")
    return "\n".join(lines)


# Any sample this loud (-60 dBFS) lifts the log-mel spectrogram hundreds of times above its
# floor, so louder recordings need no spectrogram to be known not silent.
_SURELY_VISIBLE = 10 ** (-60 / 20)


def is_silent(samples: Any) -> bool:
    """Whether the model would see nothing in `samples` (16 kHz mono, a NumPy array or a
    tensor): none at all, or a log-mel spectrogram that never leaves its floor (see
    `features.log_mel_is_blank`). Level alone decides nothing: speech 80 dB down, a few
    16-bit steps, still shows in the spectrogram the model normalises, and the model's own
    no-speech probability then judges it."""
    if len(samples) == 0:
        return True
    x = samples if torch.is_tensor(samples) else torch.from_numpy(np.asarray(samples))
    peak = float(x.abs().max())
    if peak == 0.0:
        return True
    if peak >= _SURELY_VISIBLE:
        return False
    # N_FFT zeros so that even a clip shorter than one frame gets a frame.
    log_mel = _log10_mel(x.float(), 80, N_FFT, CHUNK_FRAMES)
    return log_mel_is_blank(float(log_mel.max()))


def streams_with_sound(file: str | os.PathLike, exclude: int | None = None) -> list[int]:
    """The audio streams of `file` (counted as `--audio_stream` counts them) that are not
    silent (see `is_silent`), leaving out `exclude`; streams that cannot be decoded are
    left out too. Each stream is read only until its first block with sound."""
    container, _ = _open(file, empty_message="contains no audio samples (the file is empty)")
    with container:
        count = len(container.streams.audio)
    found = []
    for index in range(count):
        if index == exclude:
            continue
        try:
            if any(not is_silent(block) for block in iter_audio(file, stream=index)):
                found.append(index)
        except SusurrusError:
            continue
    return found
