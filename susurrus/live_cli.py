"""`susurrus live`: captions while the audio plays, from a microphone, stdin or a file.

The audio comes from a reader (a thread for the microphone, stdin and `--realtime`
files, so that audio keeps arriving while the model decodes); the main thread feeds a
`LiveSession` whatever has arrived and draws the confirmed text with its tentative tail.
At the end (the input ends, or Ctrl-C) the confirmed words are written as the usual
outputs.
"""

from __future__ import annotations

import argparse
import io
import queue
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from .errors import SusurrusError
from .features import SAMPLE_RATE
from .live import LiveEvent, LiveSession, ends_sentence

COMPUTE_TYPES = ("default", "auto", "int8", "int8_bfloat16", "float32", "float16", "bfloat16")
FORMATS = ("txt", "vtt", "srt", "tsv", "json", "all")
# Leading bytes of containers FFmpeg reads from a pipe; anything else on stdin is raw PCM.
_MAGIC = (b"RIFF", b"fLaC", b"OggS", b"ID3", b"\x1aE\xdf\xa3", b"\xff\xfb", b"\xff\xf3",
          b"\xff\xf2", b"\xff\xf1", b"\xff\xf9", b"FORM", b"caff", b".snd")
MAX_FEED_S = 8.0  # audio fed at once when decoding falls behind (the buffer holds 30 s)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="susurrus live",
        description="Live transcription: confirmed words and a tentative tail while the "
        "audio arrives; at the end the transcript is written as txt/srt/vtt/tsv/json.",
    )
    parser.add_argument(
        "source",
        nargs="?",
        default=None,
        help="an audio or video file, '-' for stdin (raw PCM by default, or any format "
        "FFmpeg reads from a pipe: detected from its first bytes), or nothing for the "
        "microphone (needs the sounddevice package: pip install \"susurrus[live]\")",
    )
    parser.add_argument("--model", default="base", help="model name or path (default: base)")
    parser.add_argument("--model_dir", default=None, help="where downloaded models are kept")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if any)")
    parser.add_argument("--compute_type", default="default", choices=COMPUTE_TYPES)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's)")
    parser.add_argument("--language", default=None, help="spoken language (default: detected)")
    parser.add_argument("--task", default="transcribe", choices=("transcribe", "translate"))
    parser.add_argument("--initial_prompt", default=None, help="text to start the context")
    parser.add_argument("--beam_size", type=int, default=None, help="beam search width")
    parser.add_argument(
        "--realtime", action="store_true",
        help="play a file in real time (default: as fast as it decodes)",
    )
    parser.add_argument(
        "--chunk", type=float, default=0.5,
        help="seconds of audio per read (a file's pieces, the microphone's blocks)",
    )
    parser.add_argument(
        "--trim", type=float, default=25.0,
        help="cut the buffer at a confirmed sentence end once it is this long (seconds)",
    )
    parser.add_argument(
        "--input_format", default="auto", choices=("auto", "s16le", "f32le", "media"),
        help="stdin: auto (a container FFmpeg reads, else raw s16le), raw s16le or f32le "
        "PCM, or media (always FFmpeg)",
    )
    parser.add_argument("--rate", type=int, default=SAMPLE_RATE,
                        help="raw PCM on stdin: sample rate (default 16000)")
    parser.add_argument("--channels", type=int, default=1,
                        help="raw PCM on stdin: interleaved channels (default 1)")
    parser.add_argument("--input_device", default=None,
                        help="microphone: a sounddevice device number or name")
    parser.add_argument("--output_dir", "-o", default=".", help="where the outputs go")
    parser.add_argument("--output_format", "-f", default="all", choices=FORMATS)
    parser.add_argument(
        "--name", default=None,
        help="file name of the outputs without extension (default: the file's, or 'live')",
    )
    return parser


# -- sources ----------------------------------------------------------------------------------


class _Replay(io.RawIOBase):
    """A pipe with its first bytes (read to tell the format) put back in front."""

    def __init__(self, head: bytes, rest: Any) -> None:
        self._head = head
        self._rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._rest.read1(len(buffer)) if hasattr(self._rest, "read1") else (
            self._rest.read(len(buffer))
        )
        buffer[: len(data)] = data
        return len(data)


def _read_exactly(stream: Any, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = stream.read(n - len(data))
        if not more:
            break
        data += more
    return data


def stdin_blocks(stream: Any, args: argparse.Namespace) -> Iterator[tuple[np.ndarray, int]]:
    """(samples, rate) blocks from a byte stream: raw PCM or a container."""
    kind = args.input_format
    head = b""
    if kind == "auto":
        head = _read_exactly(stream, 12)
        media = head.startswith(_MAGIC) or head[4:8] == b"ftyp"
        kind = "media" if media else "s16le"
    if kind == "media":
        yield from _media_blocks(_Replay(head, stream), args.chunk)
        return
    width = 2 if kind == "s16le" else 4
    frame = width * args.channels
    size = max(frame, int(args.chunk * args.rate) * frame)
    pending = head
    while True:
        data = _read_exactly(stream, size - len(pending))
        block = pending + data
        usable = len(block) - len(block) % frame
        pending = block[usable:]
        if usable:
            dtype = "<i2" if width == 2 else "<f4"
            samples = np.frombuffer(block[:usable], dtype=dtype).reshape(-1, args.channels)
            samples = samples.astype(np.float32) / (32768.0 if width == 2 else 1.0)
            yield samples.mean(axis=1), args.rate
        if not data:
            return


def _media_blocks(stream: Any, chunk: float) -> Iterator[tuple[np.ndarray, int]]:
    import av

    from .audio import _blocks, _decode_s16, _select_audio_stream

    try:
        container = av.open(io.BufferedReader(stream), "r", metadata_errors="replace")
    except av.error.FFmpegError:
        raise SusurrusError("stdin: not audio FFmpeg can read from a pipe") from None
    st = _select_audio_stream(container, "stdin", None)
    decoded = _decode_s16(container, st, "stdin", SAMPLE_RATE)
    for block in _blocks(decoded, int(chunk * SAMPLE_RATE)):
        yield block, SAMPLE_RATE


def file_blocks(path: str, chunk: float) -> Iterator[tuple[np.ndarray, int]]:
    from .audio import iter_audio

    # Opened now, so that a missing or unreadable file is an error before the model loads.
    blocks = iter_audio(path, block_samples=max(1, int(chunk * SAMPLE_RATE)))
    return ((block, SAMPLE_RATE) for block in blocks)


def realtime(blocks: Iterator[tuple[np.ndarray, int]]) -> Iterator[tuple[np.ndarray, int]]:
    """Each block when its audio would have been heard (after its last sample)."""
    begin = time.monotonic()
    played = 0.0
    for samples, rate in blocks:
        played += len(samples) / rate
        delay = begin + played - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        yield samples, rate


class Microphone:
    """Blocks from the default (or a chosen) input device, via sounddevice."""

    def __init__(self, device: str | None, chunk: float) -> None:
        try:
            import sounddevice
        except ImportError:
            raise SusurrusError(
                'the microphone needs the sounddevice package: pip install "susurrus[live]"'
            ) from None
        except OSError as exc:  # the package is there, the PortAudio library is not
            raise SusurrusError(f"the microphone is not available: {exc}") from None
        self._queue: queue.Queue = queue.Queue()
        chosen: Any = int(device) if device is not None and device.isdigit() else device
        try:
            self._stream = sounddevice.InputStream(
                samplerate=SAMPLE_RATE, channels=1, dtype="float32", device=chosen,
                blocksize=max(1, int(chunk * SAMPLE_RATE)),
                callback=lambda data, frames, t, status: self._queue.put(data[:, 0].copy()),
            )
            self._stream.start()
        except Exception as exc:  # PortAudioError, ValueError: no such device
            raise SusurrusError(f"no microphone to record from: {exc}") from None

    def __iter__(self) -> Iterator[tuple[np.ndarray, int]]:
        while True:
            yield self._queue.get(), SAMPLE_RATE

    def close(self) -> None:
        self._stream.stop()
        self._stream.close()


class Arrivals:
    """Blocks read by a thread, so that audio keeps arriving while the model decodes;
    `take` returns what has come (at least one block; None at the end)."""

    _END = object()

    def __init__(self, blocks: Iterator[tuple[np.ndarray, int]]) -> None:
        self._queue: queue.Queue = queue.Queue()
        self.error: BaseException | None = None

        def read() -> None:
            try:
                for block in blocks:
                    self._queue.put(block)
            except BaseException as exc:  # handed to the main thread
                self.error = exc
            finally:
                self._queue.put(self._END)

        threading.Thread(target=read, daemon=True, name="susurrus-live-reader").start()

    def take(self, limit: float) -> tuple[np.ndarray, int] | None:
        item = self._queue.get()
        if item is self._END:
            if self.error is not None:
                raise self.error
            return None
        samples, rate = item
        parts = [samples]
        total = len(samples) / rate
        while total < limit:
            try:
                more = self._queue.get_nowait()
            except queue.Empty:
                break
            if more is self._END:
                self._queue.put(self._END)
                break
            if more[1] != rate:
                self._queue.put(more)  # never: one source, one rate
                break
            parts.append(more[0])
            total += len(more[0]) / rate
        return np.concatenate(parts), rate


# -- the terminal -----------------------------------------------------------------------------


class Display:
    """Confirmed text and the tentative tail. On a terminal the current line is redrawn in
    place (tentative words dimmed) and closed at a sentence end; otherwise each finished
    line of confirmed text is printed once."""

    def __init__(self, out: Any) -> None:
        self.out = out
        self.tty = out.isatty()
        self.line = ""

    def __call__(self, event: LiveEvent) -> None:
        for word in event.confirmed:
            self.line += word["word"]
            if ends_sentence(word["word"]) or len(self.line) > self._width():
                self._close_line()
        if self.tty:
            tail = "".join(w["word"] for w in event.tentative)
            shown = (self.line + tail)[-(self._width() - 1):]
            cut = max(0, len(shown) - len(tail))
            self.out.write("\r\033[K" + shown[:cut] + "\033[2m" + shown[cut:] + "\033[0m")
            self.out.flush()

    def _width(self) -> int:
        return shutil.get_terminal_size((100, 24)).columns if self.tty else 100

    def _close_line(self) -> None:
        text = self.line.strip()
        if self.tty:
            self.out.write("\r\033[K")
        if text:
            self.out.write(text + "\n")
            self.out.flush()
        self.line = ""

    def close(self) -> None:
        self._close_line()


# -- main -------------------------------------------------------------------------------------


def _error(message: str) -> None:
    sys.stderr.write(f"susurrus live: error: {message}\n")
    sys.stderr.flush()


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if not 0.01 <= args.chunk <= 10:
        _error(f"--chunk must be between 0.01 and 10 seconds, got {args.chunk}")
        return 2
    if args.rate <= 0 or args.channels <= 0:
        _error("--rate and --channels must be positive")
        return 2
    microphone = None
    try:
        if args.source is None:
            microphone = Microphone(args.input_device, args.chunk)
            arrivals: Arrivals | None = Arrivals(iter(microphone))
            blocks = None
            name = args.name or "live"
        elif args.source == "-":
            arrivals, blocks = Arrivals(stdin_blocks(sys.stdin.buffer, args)), None
            name = args.name or "live"
        else:
            blocks = file_blocks(args.source, args.chunk)
            arrivals = None
            if args.realtime:
                arrivals, blocks = Arrivals(realtime(blocks)), None
            name = args.name or args.source
        import torch

        from .load import load_model
        from .writers import get_writer

        if args.threads:
            torch.set_num_threads(args.threads)
        model = load_model(
            args.model, device=args.device, download_root=args.model_dir,
            compute_type=args.compute_type,
        )
        language = args.language
        if not model.is_multilingual and language not in (None, "en"):
            _error(f"{args.model} is an English-only model; use a multilingual one for {language}")
            return 2
        writer = get_writer(args.output_format, args.output_dir)
        display = Display(sys.stdout)
        session = LiveSession(
            model, language=language, on_event=display, trim=args.trim, task=args.task,
            initial_prompt=args.initial_prompt, beam_size=args.beam_size,
        )
    except (SusurrusError, ValueError) as exc:
        _error(str(exc))
        return 2
    interrupted = False
    try:
        while True:
            if arrivals is not None:
                item = arrivals.take(MAX_FEED_S)
            else:
                item = next(blocks, None)
            if item is None:
                break
            session.feed(*item)
    except KeyboardInterrupt:
        interrupted = True  # the end of a microphone session: keep what was said
    except SusurrusError as exc:
        _error(str(exc))
        return 1
    finally:
        if microphone is not None:
            microphone.close()
    result = session.finish()
    display.close()
    try:
        writer(result, name)
    except SusurrusError as exc:
        _error(str(exc))
        return 1
    if not result["segments"]:
        sys.stderr.write(f"susurrus live: {name}: no speech found\n")
    return 130 if interrupted and args.source is not None else 0
