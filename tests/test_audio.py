"""Tests for susurrus.audio: bit-exactness with ffmpeg, many containers, errors and probe."""

from __future__ import annotations

import csv
import hashlib
import json
import struct
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from susurrus import audio
from susurrus.audio import SAMPLE_RATE, format_probe, iter_audio, load_audio, probe
from susurrus.errors import SusurrusError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
AUDIO_DIR = SHARED / "audio"
MANIFEST = AUDIO_DIR / "manifest.tsv"

if not MANIFEST.is_file():
    pytest.skip(f"shared test audio not found at {AUDIO_DIR}", allow_module_level=True)


def _manifest_rows() -> list[dict[str, str]]:
    with MANIFEST.open(encoding="utf-8", newline="") as f:
        lines = [line for line in f if not line.startswith("#")]
    rows = list(csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE))
    header = rows[0]
    return [dict(zip(header, row, strict=True)) for row in rows[1:] if row]


ROWS = _manifest_rows()
SPEECH_FILE = AUDIO_DIR / "en_ls_1272-128104-0000.flac"


def _pcm_sha256(x: np.ndarray) -> str:
    # load_audio is int16/32768 exactly, so this inverts it without rounding.
    ints = x * 32768.0
    assert np.array_equal(ints, np.round(ints)), "samples are not exact multiples of 1/32768"
    return hashlib.sha256(ints.astype("<i2").tobytes()).hexdigest()


# --- the shared corpus: bit-exact with ffmpeg ------------------------------------------------


@pytest.mark.parametrize("row", ROWS, ids=[r["file"] for r in ROWS])
def test_manifest_file_matches_ffmpeg_pcm(row: dict[str, str]) -> None:
    x = load_audio(AUDIO_DIR / row["file"])
    assert x.dtype == np.float32 and x.ndim == 1
    # duration_s has millisecond resolution (16 samples at 16 kHz)
    assert abs(x.size - float(row["duration_s"]) * SAMPLE_RATE) <= 16
    # Exact for every file, including jfk.flac (44.1 kHz stereo -> 16 kHz mono resampling).
    assert _pcm_sha256(x) == row["pcm_sha256"]


def test_other_sample_rates() -> None:
    jfk = AUDIO_DIR / "jfk.flac"
    assert load_audio(jfk, sr=8000).size == 11 * 8000
    assert load_audio(jfk, sr=44100).size == 11 * 44100
    with pytest.raises(ValueError):
        load_audio(jfk, sr=0)


@pytest.mark.parametrize("block", [1000, 16000, 30 * SAMPLE_RATE, 10**7])
def test_iter_audio_concatenates_to_load_audio(block: int) -> None:
    path = AUDIO_DIR / "jfk.flac"
    blocks = list(iter_audio(path, block_samples=block))
    assert all(b.dtype == np.float32 for b in blocks)
    assert all(b.size == block for b in blocks[:-1]) and 0 < blocks[-1].size <= block
    assert np.array_equal(np.concatenate(blocks), load_audio(path))


@pytest.mark.parametrize("estimate", [None, 1, 100])
def test_load_audio_grows_when_duration_estimate_is_short(
    monkeypatch: pytest.MonkeyPatch, estimate: int | None
) -> None:
    path = AUDIO_DIR / "jfk.flac"
    expected = load_audio(path)
    monkeypatch.setattr(audio, "_expected_samples", lambda *args: estimate)
    got = load_audio(path)
    assert np.array_equal(got, expected)
    assert got.flags.owndata and got.flags.c_contiguous


# --- generated media in many containers -------------------------------------------------------


def _speech() -> np.ndarray:
    # 3 s of speech (the file's first and last half second are near-silent)
    return load_audio(SPEECH_FILE)[8000:56000]


def _encode_audio(
    out: av.container.OutputContainer, st: av.audio.AudioStream, x: np.ndarray
) -> None:
    """Feed 16 kHz mono float samples to an encoder stream, converting to what it wants."""
    cc = st.codec_context
    if not cc.is_open:
        cc.open()
    src = av.AudioFrame.from_ndarray(
        x.reshape(1, -1).astype(np.float32), format="flt", layout="mono"
    )
    src.sample_rate = SAMPLE_RATE
    rs = av.AudioResampler(
        format=cc.format, layout=cc.layout, rate=cc.sample_rate, frame_size=cc.frame_size or None
    )
    pts = 0
    for frame in rs.resample(src) + rs.resample(None):
        # muxers need timestamps; count them in samples
        frame.pts = pts
        frame.time_base = Fraction(1, cc.sample_rate)
        pts += frame.samples
        out.mux(st.encode(frame))
    out.mux(st.encode(None))


def _encode_video(
    out: av.container.OutputContainer, st: av.video.VideoStream, seconds: float, fps: int
) -> None:
    h, w = st.codec_context.height, st.codec_context.width
    for i in range(int(seconds * fps)):
        img = np.full((h, w, 3), (i * 16) % 256, dtype=np.uint8)
        frame = av.VideoFrame.from_ndarray(img, format="rgb24")
        frame.pts = i
        out.mux(st.encode(frame))
    out.mux(st.encode(None))


def _write_media(
    path: Path,
    audio_streams: list[tuple[str, int, str, np.ndarray, str | None]],
    video: tuple[str, int] | None = None,
    fmt: str | None = None,
    seconds: float = 3.0,
) -> Path:
    """audio_streams: (codec, rate, layout, 16 kHz signal, language); video: (codec, fps)."""
    with av.open(str(path), "w", format=fmt) as out:
        vst = None
        if video is not None:
            vcodec, fps = video
            vst = out.add_stream(vcodec, rate=fps)
            vst.width, vst.height, vst.pix_fmt = 64, 48, "yuv420p"
            vst.metadata["language"] = "eng"
        ast = []
        for codec, rate, layout, signal, lang in audio_streams:
            bitrates = {"libmp3lame": "64000", "libopus": "64000", "aac": "160000"}
            options = {"b": bitrates[codec]} if codec in bitrates else None
            st = out.add_stream(codec, rate=rate, layout=layout, options=options)
            if lang:
                st.metadata["language"] = lang
            ast.append((st, signal))
        for st, signal in ast:
            _encode_audio(out, st, signal)
        if vst is not None:
            _encode_video(out, vst, seconds, video[1])
    return path


# name -> (audio streams as (codec, rate, layout, language), video, muxer)
MEDIA = {
    "clip.mp4": ([("aac", 16000, "mono", "eng")], ("h264", 10), None),
    "clip.mkv": ([("libmp3lame", 44100, "stereo", "fra")], ("h264", 10), None),
    "clip.vob": ([("mp2", 48000, "stereo", None)], ("mpeg2video", 25), "vob"),
    "clip.aac": ([("aac", 16000, "mono", None)], None, "adts"),
    "clip.mp2": ([("mp2", 32000, "mono", None)], None, None),
    "clip.mp3": ([("libmp3lame", 22050, "mono", None)], None, None),
    "clip.m4a": ([("aac", 22050, "mono", None)], None, None),
    "clip.ogg": ([("libopus", 48000, "mono", None)], None, None),
    "clip.wav": ([("pcm_s16le", 44100, "stereo", None)], None, None),
}


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return _speech()


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory, speech: np.ndarray) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("media")
    files = {}
    for name, (streams, video, fmt) in MEDIA.items():
        specs = [(c, r, lay, speech, lang) for c, r, lay, lang in streams]
        files[name] = _write_media(root / name, specs, video, fmt)
    # two audio streams: 0 = speech (stereo mp3), 1 = digital silence (flac)
    files["two.mkv"] = _write_media(
        root / "two.mkv",
        [
            ("libmp3lame", 44100, "stereo", speech, "fra"),
            ("flac", 16000, "mono", np.zeros_like(speech), "deu"),
        ],
        ("h264", 10),
    )
    return files


def _best_alignment(x: np.ndarray, ref: np.ndarray, max_lag: int = 2400) -> tuple[float, int]:
    """Normalized cross-correlation of x against ref, maximized over x = ref delayed by lag."""
    n = 1 << int(np.ceil(np.log2(x.size + ref.size)))
    xc = np.fft.irfft(np.fft.rfft(x, n) * np.conj(np.fft.rfft(ref, n)), n)
    lags = np.r_[np.arange(0, max_lag + 1), np.arange(-max_lag, 0)]
    lag = int(lags[np.argmax(xc[lags])])
    a = x[max(lag, 0) :]
    b = ref[max(-lag, 0) :]
    m = min(a.size, b.size)
    a, b = a[:m].astype(np.float64), b[:m].astype(np.float64)
    return float(a @ b / np.sqrt((a @ a) * (b @ b))), lag


@pytest.mark.parametrize("name", list(MEDIA))
def test_generated_media_decodes_faithfully(
    media: dict[str, Path], speech: np.ndarray, name: str
) -> None:
    x = load_audio(media[name])
    assert x.dtype == np.float32
    # encoder delay / frame padding adds at most a frame or two
    assert abs(x.size - speech.size) <= 1600, (x.size, speech.size)
    corr, lag = _best_alignment(x, speech)
    assert abs(lag) <= 1600
    assert corr > 0.9, (corr, lag)


def test_second_audio_stream(media: dict[str, Path], speech: np.ndarray) -> None:
    path = media["two.mkv"]
    first = load_audio(path)
    assert np.array_equal(load_audio(path, stream=0), first)
    assert _best_alignment(first, speech)[0] > 0.9
    second = load_audio(path, stream=1)
    assert second.size == speech.size and not second.any()  # the silent flac stream
    blocks = list(iter_audio(path, stream=1, block_samples=4096))
    assert np.array_equal(np.concatenate(blocks), second)
    for bad in (2, -1):
        with pytest.raises(SusurrusError, match=r"two\.mkv: .*no audio stream .*2 audio streams"):
            load_audio(path, stream=bad)


@pytest.mark.parametrize("name", ["clip.mp3", "clip.m4a", "clip.mp2"])
def test_corrupt_middle_is_skipped(
    media: dict[str, Path], speech: np.ndarray, tmp_path: Path, name: str
) -> None:
    data = bytearray(media[name].read_bytes())
    mid = len(data) // 2
    data[mid : mid + 300] = np.random.default_rng(0).integers(0, 256, 300, np.uint8).tobytes()
    bad = tmp_path / name
    bad.write_bytes(data)
    with pytest.raises(av.error.InvalidDataError):  # plain PyAV decoding gives up ...
        with av.open(str(bad)) as c:
            for _ in c.decode(audio=0):
                pass
    x = load_audio(bad)  # ... we skip the damaged packets like ffmpeg does
    assert x.size > 0.9 * speech.size
    head = speech.size // 3
    assert _best_alignment(x[:head], speech[:head])[0] > 0.9


def test_format_change_mid_stream(tmp_path: Path, speech: np.ndarray) -> None:
    # ADTS frames can be concatenated: 16 kHz mono followed by 44.1 kHz stereo in one stream.
    a = _write_media(tmp_path / "a.aac", [("aac", 16000, "mono", speech, None)], fmt="adts")
    b = _write_media(tmp_path / "b.aac", [("aac", 44100, "stereo", speech, None)], fmt="adts")
    both = tmp_path / "both.aac"
    both.write_bytes(a.read_bytes() + b.read_bytes())
    xa, xb, x = load_audio(a), load_audio(b), load_audio(both)
    assert x.size == xa.size + xb.size
    assert np.array_equal(x[: xa.size], xa)
    # the second part differs only by decoder state carried over the join
    assert _best_alignment(x[xa.size :], xb, max_lag=16) == (pytest.approx(1.0, abs=1e-4), 0)


# --- errors -----------------------------------------------------------------------------------


def _expect_error(fn: Callable[[Path], object], path: Path, pattern: str) -> SusurrusError:
    with pytest.raises(SusurrusError) as info:
        fn(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert str(path) in msg
    assert pattern in msg, msg
    return info.value


@pytest.mark.parametrize("fn", [load_audio, iter_audio, probe])
def test_missing_file(tmp_path: Path, fn: Callable[[Path], object]) -> None:
    path = tmp_path / "nope.wav"
    err = _expect_error(fn, path, "No such file")
    assert str(err) == f"No such file: {path}"


@pytest.mark.parametrize("fn", [load_audio, iter_audio, probe])
def test_directory(tmp_path: Path, fn: Callable[[Path], object]) -> None:
    _expect_error(fn, tmp_path, "is a directory")


@pytest.mark.parametrize("suffix", [".txt", ".wav", ".mp3", ""])
@pytest.mark.parametrize("fn", [load_audio, iter_audio, probe])
def test_text_file(tmp_path: Path, fn: Callable[[Path], object], suffix: str) -> None:
    path = tmp_path / f"notes{suffix}"
    path.write_text("these are not the droids you are looking for\n" * 20)
    err = _expect_error(fn, path, "not an audio or video file FFmpeg can read")
    assert str(err).startswith(f"{path}: ")


def test_video_only(tmp_path: Path) -> None:
    path = _write_media(tmp_path / "silent_film.mp4", [], ("h264", 10), seconds=1.0)
    for fn in (load_audio, iter_audio):
        err = _expect_error(fn, path, "has no audio stream")
        assert str(err) == f"{path}: has no audio stream"
    info = probe(path)  # a valid file to probe all the same
    assert [s["type"] for s in info["streams"]] == ["video"]


def _wav_header_only(path: Path) -> Path:
    fmt = struct.pack("<HHIIHH", 1, 1, 16000, 32000, 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", 0)
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


def test_zero_length_audio(tmp_path: Path) -> None:
    path = _wav_header_only(tmp_path / "empty.wav")
    err = _expect_error(load_audio, path, "contains no audio samples")
    assert str(err) == f"{path}: contains no audio samples"
    with pytest.raises(SusurrusError, match="contains no audio samples"):
        list(iter_audio(path))
    assert probe(path)["streams"][0]["sample_rate"] == 16000


def test_unconvertible_channel_count(tmp_path: Path) -> None:
    path = tmp_path / "ch64.wav"
    channels = 64
    data = np.zeros((160, channels), "<i2").tobytes()
    fmt = struct.pack("<HHIIHH", 1, channels, 16000, 16000 * 2 * channels, 2 * channels, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    _expect_error(load_audio, path, "cannot convert 64 channels audio")


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "zero.mp3"
    path.write_bytes(b"")
    _expect_error(load_audio, path, "contains no audio samples")
    _expect_error(probe, path, "not an audio or video file")


# --- probe ------------------------------------------------------------------------------------


def test_probe_mp4(media: dict[str, Path]) -> None:
    info = probe(media["clip.mp4"])
    json.dumps(info)  # the CLI prints it as JSON
    assert "mp4" in info["format"]
    assert abs(info["duration"] - 3.0) < 0.1
    assert info["start_time"] == pytest.approx(0.0, abs=0.1)
    assert info["bit_rate"] > 0
    video, aud = info["streams"]
    assert (video["index"], video["type"], video["codec"]) == (0, "video", "h264")
    assert (video["width"], video["height"], video["frame_rate"]) == (64, 48, 10.0)
    assert video["language"] == "eng"
    assert (aud["index"], aud["type"], aud["codec"]) == (1, "audio", "aac")
    assert (aud["sample_rate"], aud["channels"], aud["channel_layout"]) == (16000, 1, "mono")
    assert aud["language"] == "eng" and aud["audio_index"] == 0
    assert abs(aud["duration"] - 3.0) < 0.1

    text = format_probe(info)
    lines = text.splitlines()
    assert lines[0] == f"Input #0, {info['format']}, from '{media['clip.mp4']}':"
    assert lines[1].startswith("  Duration: 00:00:03.0")
    assert "bitrate: " in lines[1] and "kb/s" in lines[1]
    assert lines[2].startswith("  Stream #0:0(eng): Video: h264")
    assert "64x48" in lines[2] and "10 fps" in lines[2]
    assert lines[3].startswith("  Stream #0:1(eng): Audio: aac")
    assert "16000 Hz, mono" in lines[3]


def test_probe_mkv_two_audio_streams(media: dict[str, Path]) -> None:
    info = probe(media["two.mkv"])
    assert info["format"] == "matroska,webm"
    assert abs(info["duration"] - 3.0) < 0.1
    types = [(s["type"], s["codec"], s["language"]) for s in info["streams"]]
    assert types == [("video", "h264", "eng"), ("audio", "mp3", "fra"), ("audio", "flac", "deu")]
    _, mp3, flac = info["streams"]
    assert (mp3["sample_rate"], mp3["channels"], mp3["channel_layout"]) == (44100, 2, "stereo")
    assert (flac["sample_rate"], flac["channels"], flac["audio_index"]) == (16000, 1, 1)
    # Matroska has no per-stream duration field; it comes from the DURATION tag.
    assert all(abs(s["duration"] - 3.0) < 0.1 for s in info["streams"])

    text = format_probe(info)
    assert "Input #0, matroska,webm, from" in text
    assert "Stream #0:1(fra): Audio: mp3, 44100 Hz, stereo" in text
    assert "Stream #0:2(deu): Audio: flac, 16000 Hz, mono" in text
    assert "Stream #0:0(eng): Video: h264" in text and "64x48" in text


def test_probe_audio_only_files(media: dict[str, Path]) -> None:
    info = probe(media["clip.wav"])
    (st,) = info["streams"]
    assert (st["codec"], st["sample_rate"], st["channels"]) == ("pcm_s16le", 44100, 2)
    assert abs(info["duration"] - 3.0) < 0.01
    jfk = probe(AUDIO_DIR / "jfk.flac")
    assert jfk["format"] == "flac" and jfk["duration"] == pytest.approx(11.0)
    assert "Audio: flac, 44100 Hz, stereo" in format_probe(jfk)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="threads counted in /proc")
def test_reading_leaves_no_decoder_threads_behind():
    """Each read's resampler (and FFmpeg's threads in it) goes when the read ends: held in
    a reference cycle, they stayed until the garbage collector ran, two threads a file."""
    import gc
    import os

    def threads() -> int:
        return len(os.listdir("/proc/self/task"))

    load_audio(str(AUDIO_DIR / "jfk.flac"))  # whatever a first read starts once
    gc.collect()
    gc.disable()
    try:
        before = threads()
        for _ in range(10):
            load_audio(str(AUDIO_DIR / "jfk.flac"))
        after = threads()
    finally:
        gc.enable()
    assert after <= before + 1
