"""Odd and malformed media made from the shared speech set with PyAV, for the tests and
`benchmarks/odd_media.py`.

`build_corpus(root)` writes well over 200 files: good encodings at 8 to 192 kHz and 1 to 8
channels, float samples with NaN and Inf, several audio streams, quiet speech and no speech,
and files that are truncated, bit-flipped, empty, mislabelled, oddly named or not media at
all. Each comes with what a user may expect of it (see `Case`).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from susurrus.audio import load_audio

SR = 16000

# What the CLI must make of a case: "error" (one error line, non-zero exit, no outputs),
# "audio" (outputs written: a transcript, or no speech and one warning line), "either"
# (damaged files: whichever of the two, but cleanly).
ERROR, AUDIO, EITHER = "error", "audio", "either"


@dataclass(frozen=True)
class Case:
    path: Path
    kind: str  # the family it belongs to, e.g. "truncated", "rate"
    expect: str  # ERROR, AUDIO or EITHER

    @property
    def tag(self) -> str:
        """The unique prefix of the file name, found in every line the CLI prints about it."""
        return os.fsdecode(self.path.name).split("_", 1)[0] + "_"


def excerpt(source: Path, seconds: float, start: float = 0.0) -> np.ndarray:
    """`seconds` of a recording as 16 kHz mono float32."""
    x = load_audio(source)
    a = int(start * SR)
    return x[a : a + int(seconds * SR)]


def _quantise(signal: np.ndarray) -> np.ndarray:
    return np.clip(np.round(signal * 32768), -32768, 32767).astype(np.int16)


def _mux_audio(out, st, signal: np.ndarray) -> None:
    """Encode 16 kHz mono float samples into `st`, converted to its rate, layout and format."""
    cc = st.codec_context
    if not cc.is_open:
        cc.open()
    if signal.size == 0:  # a stream with no packets at all
        out.mux(st.encode(None))
        return
    src = av.AudioFrame.from_ndarray(
        signal.reshape(1, -1).astype(np.float32), format="flt", layout="mono"
    )
    src.sample_rate = SR
    resampler = av.AudioResampler(
        format=cc.format, layout=cc.layout, rate=cc.sample_rate, frame_size=cc.frame_size or None
    )
    pts = 0
    for frame in resampler.resample(src) + resampler.resample(None):
        # Muxers need timestamps: count them in samples.
        frame.pts, frame.time_base = pts, Fraction(1, cc.sample_rate)
        pts += frame.samples
        out.mux(st.encode(frame))
    out.mux(st.encode(None))


def _mux_video(out, st, seconds: float, fps: int) -> None:
    for i in range(max(1, int(seconds * fps))):
        image = np.full((48, 64, 3), (i * 16) % 256, dtype=np.uint8)
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts = i
        out.mux(st.encode(frame))
    out.mux(st.encode(None))


@dataclass(frozen=True)
class Track:
    """One audio stream to write: a 16 kHz mono signal and how to store it."""

    signal: np.ndarray
    codec: str = "flac"
    rate: int = SR
    layout: str = "mono"
    default: bool = False


_BITRATES = {"libmp3lame": "64000", "libopus": "48000", "aac": "96000", "ac3": "96000"}


def write_media(
    path: Path, tracks: list[Track], *, fmt: str | None = None, video: str | None = None
) -> Path:
    """A file with these audio streams (and a small video stream of codec `video`)."""
    with av.open(str(path), "w", format=fmt) as out:
        vst = None
        if video is not None:
            vst = out.add_stream(video, rate=10)
            vst.width, vst.height, vst.pix_fmt = 64, 48, "yuv420p"
        streams = []
        for t in tracks:
            options = {"b": _BITRATES[t.codec]} if t.codec in _BITRATES else None
            st = out.add_stream(t.codec, rate=t.rate, layout=t.layout, options=options)
            if t.default:
                st.disposition = av.stream.Disposition.default
            streams.append((st, t.signal))
        seconds = max((len(t.signal) / SR for t in tracks), default=1.0)
        for st, signal in streams:
            _mux_audio(out, st, signal)
        if vst is not None:
            _mux_video(out, vst, seconds, 10)
    return path


def write_pcm16(path: Path, signal: np.ndarray, codec: str = "flac") -> Path:
    """16 kHz mono 16-bit samples, quantised here (as `ffmpeg -af volume=...` would)."""
    samples = _quantise(signal)
    with av.open(str(path), "w") as out:
        st = out.add_stream(codec, rate=SR, layout="mono")
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = SR, 0, Fraction(1, SR)
        out.mux(st.encode(frame))
        out.mux(st.encode(None))
    return path


def _wav_bytes(
    data: bytes,
    *,
    channels: int = 1,
    rate: int = SR,
    bits: int = 16,
    tag: int = 1,
    data_size: int | None = None,
    riff_size: int | None = None,
) -> bytes:
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * block, block, bits)
    size = len(data) if data_size is None else data_size
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", size) + data
    riff = len(body) if riff_size is None else riff_size
    return b"RIFF" + struct.pack("<I", riff) + body


def float_wav(path: Path, signal: np.ndarray) -> Path:
    """32-bit float WAV (tag 3), written by hand so NaN and Inf survive as they are."""
    path.write_bytes(_wav_bytes(signal.astype("<f4").tobytes(), bits=32, tag=3))
    return path


def _tones(seconds: float) -> np.ndarray:
    """A few notes with harmonics and decaying envelopes: music, not speech."""
    t = np.arange(int(seconds * SR)) / SR
    out = np.zeros_like(t)
    for i, f in enumerate([220.0, 277.18, 329.63, 440.0, 349.23, 261.63]):
        on = (t >= i * 0.5) & (t < i * 0.5 + 1.0)
        envelope = np.exp(-3 * (t - i * 0.5)) * on
        for h in (1, 2, 3):
            out += envelope * np.sin(2 * np.pi * f * h * t) / h
    return (0.3 * out / np.abs(out).max()).astype(np.float32)


LAYOUTS = ["mono", "stereo", "2.1", "quad", "5.0", "5.1", "6.1", "7.1"]
RATES = [8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000]
RATES += [176400, 192000]
# Good encodings: (extension, codec, rate, layout, muxer, video codec)
ENCODINGS = [
    ("wav", "pcm_s16le", 16000, "mono", None, None),
    ("flac", "flac", 44100, "stereo", None, None),
    ("mp3", "libmp3lame", 22050, "mono", None, None),
    ("ogg", "libopus", 48000, "mono", None, None),
    ("m4a", "aac", 16000, "mono", None, None),
    ("mka", "flac", 48000, "stereo", None, None),
    ("webm", "libopus", 48000, "stereo", None, None),
    ("ac3", "ac3", 48000, "stereo", None, None),
    ("mp2", "mp2", 32000, "mono", None, None),
    ("aiff", "pcm_s16be", 22050, "mono", None, None),
    ("mp4", "aac", 44100, "stereo", None, "h264"),
    ("mkv", "libmp3lame", 44100, "stereo", None, "mpeg4"),
]
# Files cut or damaged: (extension, codec, rate, layout, video codec)
DAMAGED = [
    ("wav", "pcm_s16le", 16000, "mono", None),
    ("mp3", "libmp3lame", 44100, "stereo", None),
    ("m4a", "aac", 16000, "mono", None),
    ("ogg", "libopus", 48000, "mono", None),
    ("flac", "flac", 16000, "mono", None),
    ("mp4", "aac", 16000, "mono", "h264"),
]
TRUNCATE_AT = [0.001, 0.01, 0.03, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99]
TRUNCATE_BYTES = [1, 4, 12, 44, 100]


def build_corpus(root: Path, sources: list[Path], seconds: float = 3.0) -> list[Case]:
    """Write the corpus under `root` from excerpts of `sources` (real speech files)."""
    root.mkdir(parents=True, exist_ok=True)
    speech = [excerpt(s, seconds) for s in sources]
    cases: list[Case] = []

    def new(name: str) -> Path:
        return root / f"c{len(cases):03d}_{name}"

    def add(path: Path, kind: str, expect: str) -> None:
        cases.append(Case(path, kind, expect))

    def voice(i: int) -> np.ndarray:
        return speech[i % len(speech)]

    for i, (ext, codec, rate, layout, fmt, video) in enumerate(ENCODINGS):
        path = new(f"{codec}.{ext}")
        write_media(path, [Track(voice(i), codec, rate, layout)], fmt=fmt, video=video)
        add(path, "encoding", AUDIO)
    for i, rate in enumerate(RATES):
        path = new(f"{rate}hz.wav")
        add(write_media(path, [Track(voice(i), "pcm_s16le", rate)]), "rate", AUDIO)
    for i, layout in enumerate(LAYOUTS):
        path = new(f"{i + 1}ch.wav")
        add(write_media(path, [Track(voice(i), "pcm_s16le", 48000, layout)]), "channels", AUDIO)
    for i, layout in enumerate(["5.1", "7.1"]):
        path = new(f"{layout}.flac")
        add(write_media(path, [Track(voice(i), "flac", 48000, layout)]), "channels", AUDIO)

    # Float samples with values no 16-bit file can hold.
    clean = voice(0).copy()
    nan_some = clean.copy()
    nan_some[::97] = np.nan
    inf_burst = clean.copy()
    inf_burst[SR : SR + 400] = np.inf
    ninf = clean.copy()
    ninf[::500] = -np.inf
    loud = clean * 40.0  # far beyond full scale
    for name, signal in [
        ("float", clean),
        ("nan_some", nan_some),
        ("inf_burst", inf_burst),
        ("minus_inf", ninf),
        ("all_nan", np.full_like(clean, np.nan)),
        ("over_full_scale", loud),
    ]:
        add(float_wav(new(f"{name}.wav"), signal), "float", AUDIO)

    # Damaged copies of a few good files.
    originals = []
    for i, (ext, codec, rate, layout, video) in enumerate(DAMAGED):
        path = root / f"original.{ext}"
        write_media(path, [Track(voice(i), codec, rate, layout)], video=video)
        originals.append((ext, path.read_bytes()))
        path.unlink()
    for ext, data in originals:
        for fraction in TRUNCATE_AT:
            path = new(f"cut{int(fraction * 1000):03d}.{ext}")
            path.write_bytes(data[: max(1, int(len(data) * fraction))])
            add(path, "truncated", EITHER)
        for size in TRUNCATE_BYTES:
            path = new(f"cut{size}bytes.{ext}")
            path.write_bytes(data[:size])
            add(path, "truncated", EITHER)
    rng = np.random.default_rng(18)
    for ext, data in originals:
        for flips, where in [(1, "any"), (8, "any"), (64, "any"), (512, "any"), (4, "head")]:
            for _ in range(2 if where == "any" else 1):
                damaged = bytearray(data)
                span = min(len(data), 256) if where == "head" else len(data)
                for position in rng.integers(0, span, flips):
                    damaged[position] ^= 1 << int(rng.integers(0, 8))
                path = new(f"flip{flips}{where}.{ext}")
                path.write_bytes(bytes(damaged))
                add(path, "bitflip", EITHER)

    # Good files with the wrong extension or none.
    for i, (codec, rate, fmt, ext) in enumerate(
        [
            ("libmp3lame", 44100, "mp3", "wav"),
            ("flac", SR, "flac", "mp3"),
            ("libopus", 48000, "ogg", "m4a"),
            ("pcm_s16le", SR, "wav", "mp4"),
            ("aac", SR, "ipod", "ogg"),
            ("flac", SR, "matroska", "txt"),
            ("pcm_s16le", SR, "wav", ""),
        ]
    ):
        path = new(f"really_{fmt}" + (f".{ext}" if ext else ""))
        add(write_media(path, [Track(voice(i), codec, rate)], fmt=fmt), "extension", AUDIO)

    # Unreadable: empty, no samples, no audio, not media.
    for ext in ["wav", "mp3", "flac", "mp4", ""]:
        path = new("empty" + (f".{ext}" if ext else ""))
        path.write_bytes(b"")
        add(path, "empty", ERROR)
    path = new("header_only.wav")
    path.write_bytes(_wav_bytes(b""))
    add(path, "zero-length", ERROR)
    path = new("no_audio_packets.mkv")
    tracks = [Track(np.zeros(0, np.float32), "pcm_s16le")]
    add(write_media(path, tracks, video="mpeg4"), "zero-length", ERROR)
    path = new("no_audio_packets.mp4")  # a film whose audio track holds nothing
    tracks = [Track(np.zeros(0, np.float32), "aac")]
    add(write_media(path, tracks, video="h264"), "zero-length", ERROR)
    for codec, ext in [("h264", "mp4"), ("mpeg4", "mkv")]:
        path = new(f"video_only.{ext}")
        add(write_media(path, [], video=codec), "video-only", ERROR)
    for name, data in [
        ("notes.txt", b"these are not the droids you are looking for\n" * 20),
        ("notes.mp3", b"plain text with an audio extension\n" * 30),
        ("page.html", b"<!doctype html><html><body><p>hello</p></body></html>\n" * 10),
        ("random_1k.wav", rng.integers(0, 256, 1024, np.uint8).tobytes()),
        ("random_100k.mp3", rng.integers(0, 256, 100_000, np.uint8).tobytes()),
        ("subtitles.srt", b"1\n00:00:00,000 --> 00:00:02,000\nHello\n\n" * 5),
    ]:
        path = new(name)
        path.write_bytes(data)
        add(path, "not-media", ERROR)
    path = new("archive.zip")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("speech.raw", _quantise(voice(0)).tobytes())
    add(path, "not-media", ERROR)
    path = new("image.png")
    with av.open(str(path), "w", format="image2") as out:
        st = out.add_stream("png", rate=1)
        st.width, st.height, st.pix_fmt = 64, 48, "rgb24"
        image = av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")
        out.mux(st.encode(image))
        out.mux(st.encode(None))
    add(path, "not-media", ERROR)

    # Several audio streams, the default one silent or not the first.
    silence = np.zeros_like(voice(0))
    for name, tracks in [
        ("default_silent", [Track(silence, default=True), Track(voice(0), layout="stereo")]),
        ("second_default", [Track(silence), Track(voice(1), default=True)]),
        ("more_channels", [Track(silence), Track(voice(2), layout="stereo")]),
        ("three", [Track(voice(3)), Track(silence), Track(voice(0), layout="stereo")]),
    ]:
        add(write_media(new(f"{name}.mka"), tracks), "streams", AUDIO)
    path = new("film_two_tracks.mp4")
    tracks = [Track(silence, "aac", default=True), Track(voice(1), "aac")]
    add(write_media(path, tracks, video="h264"), "streams", AUDIO)

    # Sizes the header claims but the file does not have.
    samples = _quantise(voice(0)).tobytes()
    for name, data in [
        ("huge_data_size.wav", _wav_bytes(samples, data_size=0xFFFFFFFF)),
        ("huge_riff_size.wav", _wav_bytes(samples, riff_size=0xFFFFFFFF)),
        ("huge_both.wav", _wav_bytes(samples, data_size=0xFFFFFFF0, riff_size=0xFFFFFFF8)),
        ("zero_sizes.wav", _wav_bytes(samples, data_size=0, riff_size=0)),
    ]:
        path = new(name)
        path.write_bytes(data)
        add(path, "sizes", EITHER if name.startswith("zero") else AUDIO)

    # No speech, and speech far below full scale.
    t = np.arange(len(voice(0))) / SR
    no_speech = [
        ("digital_silence", np.zeros_like(t)),
        ("music", _tones(len(t) / SR)),
        ("hum", 0.1 * np.sin(2 * np.pi * 50 * t)),
        ("dc_offset", np.full_like(t, 0.01)),
        ("lsb_dither", rng.integers(-1, 2, len(t)) / 32768),
    ]
    for name, signal in no_speech:
        add(write_pcm16(new(f"{name}.flac"), signal), "no-speech", AUDIO)
    for db in (-50, -70, -80):
        path = new(f"quiet{-db}dB.flac")
        add(write_pcm16(path, voice(0) * 10 ** (db / 20)), "quiet", AUDIO)

    # Names a user may well have, and links.
    good = _quantise(voice(1))
    for name in [
        "with spaces and 'quotes'.wav",
        "ünïcödé 日本語 话.wav",
        "percent %d %s.wav",
        "-leading-dash.wav",
        "semi;colon&amp$(x).wav",
        "long_" + "x" * 180 + ".wav",
    ]:
        path = new(name)
        path.write_bytes(_wav_bytes(good.tobytes()))
        add(path, "name", AUDIO)
    raw = os.fsencode(root) + b"/" + os.fsencode(new("").name) + b"latin1_caf\xe9.wav"
    with open(raw, "wb") as f:
        f.write(_wav_bytes(good.tobytes()))
    add(Path(os.fsdecode(raw)), "name", AUDIO)
    target = cases[0].path
    for name, to, expect in [
        ("link_to_good.wav", target, AUDIO),
        ("dangling.wav", root / "nowhere.wav", ERROR),
        ("loop.wav", None, ERROR),
    ]:
        path = new(name)
        os.symlink(path if to is None else to, path)
        add(path, "link", expect)
    path = new("directory.wav")
    path.mkdir()
    add(path, "link", ERROR)
    add(new("missing.wav"), "link", ERROR)
    return cases


def sample(cases: list[Case], per_kind: int) -> list[Case]:
    """Up to `per_kind` cases of each family, spread over it, in corpus order."""
    by_kind: dict[str, list[Case]] = {}
    for case in cases:
        by_kind.setdefault(case.kind, []).append(case)
    chosen = set()
    for group in by_kind.values():
        # The middles of `per_kind` equal parts of the family.
        n = min(per_kind, len(group))
        chosen.update(group[int((i + 0.5) * len(group) / n)].path for i in range(n))
    return [c for c in cases if c.path in chosen]


# What the CLI made of a file: "transcribed", "no-speech", "error", or "bad" (anything else:
# a missing output, a second line, an error with outputs written).
@dataclass
class Outcome:
    case: Case
    status: str
    lines: list[str]
    why: str = ""

    @property
    def as_expected(self) -> bool:
        if self.status == "bad":
            return False
        if self.case.expect == ERROR:
            return self.status == "error"
        if self.case.expect == AUDIO:
            return self.status in ("transcribed", "no-speech")
        return True


CLI_OPTIONS = [
    "--model",
    "tiny.en",
    "--beam_size",
    "None",
    "--temperature_increment_on_fallback",
    "None",
    "-f",
    "json",
]


def run_cli(
    cases: list[Case], out_dir: Path, *, timeout: float, options: list[str] = CLI_OPTIONS
) -> tuple[subprocess.CompletedProcess, list[Outcome], list[str]]:
    """Run the CLI once over every case; return the process, each file's outcome, and the
    stderr lines that belong to no file."""
    command = [sys.executable, "-m", "susurrus", *map(str, (c.path for c in cases))]
    command += [*options, "-o", str(out_dir)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    lines = proc.stderr.splitlines()
    outcomes = [_outcome(c, [line for line in lines if c.tag in line], out_dir) for c in cases]
    claimed = {line for o in outcomes for line in o.lines}
    stray = [line for line in lines if line not in claimed]
    return proc, outcomes, stray


def _outcome(case: Case, lines: list[str], out_dir: Path) -> Outcome:
    stem = os.path.splitext(os.path.basename(os.fsdecode(case.path)))[0]
    output = out_dir / f"{stem}.json"
    errors = [line for line in lines if line.startswith("susurrus: error: ")]
    warnings = [line for line in lines if line.startswith("susurrus: warning: ")]
    if len(lines) > 1:
        return Outcome(case, "bad", lines, "more than one line")
    if errors:
        if output.exists():
            return Outcome(case, "bad", lines, "an error, but outputs were written")
        return Outcome(case, "error", lines)
    if not output.exists():
        return Outcome(case, "bad", lines, "no error and no output")
    result = json.loads(output.read_text())
    if result.get("no_speech"):
        if result["segments"] or not warnings or "no speech found" not in warnings[0]:
            return Outcome(case, "bad", lines, "no_speech without its warning, or with segments")
        return Outcome(case, "no-speech", lines)
    if warnings or not result["segments"] or not result["text"].strip():
        return Outcome(case, "bad", lines, "an empty transcript not marked no_speech")
    return Outcome(case, "transcribed", lines)
