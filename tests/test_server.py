"""`susurrus serve` over real HTTP on loopback: the official `openai` client against the
server, every response format equal to the command line's output, errors and security."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .conftest import AUDIO, requires_shared
from .serving import ServerProcess, cli_outputs, needs_server_extra

pytestmark = requires_shared
needs_server_extra()
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

KEY = "test-key-" + uuid.uuid4().hex
JFK = AUDIO / "jfk.flac"
LIBRI = AUDIO / "en_ls_1995-1837-0001.flac"
SHORT = AUDIO / "en_lj_LJ001-0008.flac"
GERMAN = AUDIO / "de_picovoice_test_de.flac"
MEDIUM = AUDIO / "en_mfa_acoustic_corpus.flac"
MAX_UPLOAD_MB = 4
MAX_BATCH = 2
MAX_QUEUE = 2


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    uploads = root / "uploads"
    process = ServerProcess(
        [
            "--model",
            "tiny.en",
            "--model",
            "base",
            "--api-key",
            KEY,
            "--max-upload-mb",
            str(MAX_UPLOAD_MB),
            "--max-batch",
            str(MAX_BATCH),
            "--max-queue",
            str(MAX_QUEUE),
            "--upload-dir",
            str(uploads),
        ],
        root / "server.log",
    )
    process.uploads = uploads
    yield process
    # uvicorn re-raises SIGTERM once it has shut down cleanly: the status says SIGTERM.
    assert process.stop() in (0, -signal.SIGTERM), process.log.read_text()[-3000:]
    assert "Application shutdown complete" in process.log.read_text()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    return cli_outputs([JFK, LIBRI, SHORT], out / "default", "--model", "tiny.en")


def post(server, files=None, data=None, key=KEY, path="/v1/audio/transcriptions", **kwargs):
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return httpx.post(
        server.url + path, files=files, data=data, headers=headers, timeout=300, **kwargs
    )


def assert_error(response, status: int, code: str | None = None, param: str | None = None):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    assert "Traceback" not in response.text
    if code is not None:
        assert body["error"]["code"] == code
    if param is not None:
        assert body["error"]["param"] == param
    return body["error"]


def leftovers(server) -> list[str]:
    """Files left in the upload directory once the server is idle."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        names = sorted(p.name for p in server.uploads.iterdir()) if server.uploads.exists() else []
        health = httpx.get(server.url + "/health", timeout=10).json()
        if not names and health["sessions"] == 0:
            return []
        time.sleep(0.2)
    return names


# --- the openai client: every format equals the command line's output ---------------------


@pytest.mark.parametrize("path", [JFK, LIBRI], ids=lambda p: p.stem)
def test_openai_client_every_format_matches_the_cli(client, cli, path):
    expected = cli[path.name]
    with open(path, "rb") as f:
        result = client.audio.transcriptions.create(model="whisper-1", file=f)
    assert result.text == expected["result"]["text"].strip()
    assert result.text  # real speech gives real words

    for fmt in ("srt", "vtt"):
        with open(path, "rb") as f:
            body = client.audio.transcriptions.create(model="tiny.en", file=f, response_format=fmt)
        assert body == expected[fmt], fmt
    with open(path, "rb") as f:
        text = client.audio.transcriptions.create(model="tiny.en", file=f, response_format="text")
    assert text.strip() == expected["result"]["text"].strip()

    with open(path, "rb") as f:
        verbose = client.audio.transcriptions.create(
            model="tiny.en", file=f, response_format="verbose_json"
        )
    assert verbose.text == expected["result"]["text"].strip()
    assert verbose.language == "english"
    assert verbose.duration == pytest.approx(float(_manifest_duration(path)), abs=0.05)
    want = expected["result"]["segments"]
    assert [(s.start, s.end, s.text) for s in verbose.segments] == [
        (s["start"], s["end"], s["text"]) for s in want
    ]
    assert [s.tokens for s in verbose.segments] == [s["tokens"] for s in want]
    assert verbose.model_extra["task"] == "transcribe"


def test_openai_client_words_match_the_cli(client, tmp_path):
    expected = cli_outputs([JFK], tmp_path, "--model", "tiny.en", "--word_timestamps", "True")
    with open(JFK, "rb") as f:
        verbose = client.audio.transcriptions.create(
            model="tiny.en",
            file=f,
            response_format="verbose_json",
            timestamp_granularities=["word", "segment"],
        )
    want = [w for s in expected["jfk.flac"]["result"]["segments"] for w in s["words"]]
    assert [(w.word, w.start, w.end) for w in verbose.words] == [
        (w["word"].strip(), w["start"], w["end"]) for w in want
    ]
    assert "ask" in [w.word for w in verbose.words]
    assert len(verbose.segments) == len(expected["jfk.flac"]["result"]["segments"])


def test_openai_client_streaming(client, cli):
    with open(LIBRI, "rb") as f:
        stream = client.audio.transcriptions.create(model="tiny.en", file=f, stream=True)
        events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[-1] == "transcript.text.done"
    assert set(kinds[:-1]) == {"transcript.text.delta"}
    expected = cli[LIBRI.name]["result"]
    assert len(kinds) - 1 == len(expected["segments"])
    assert "".join(e.delta for e in events[:-1]).strip() == expected["text"].strip()
    assert events[-1].text == expected["text"].strip()
    first = events[0].model_extra["segment"]
    assert (first["start"], first["end"]) == (
        expected["segments"][0]["start"],
        expected["segments"][0]["end"],
    )


def test_extra_options_reach_the_engine(client, tmp_path):
    """susurrus's own fields (here greedy decoding and a subtitle layout) as the CLI's flags."""
    options = ["--beam_size", "None", "--word_timestamps", "True", "--max_line_width", "20"]
    expected = cli_outputs([JFK], tmp_path, "--model", "tiny.en", *options)["jfk.flac"]
    with open(JFK, "rb") as f:
        srt = client.audio.transcriptions.create(
            model="tiny.en",
            file=f,
            response_format="srt",
            extra_body={"beam_size": "None", "word_timestamps": "true", "max_line_width": "20"},
        )
    assert srt == expected["srt"]
    lines = [line for line in srt.splitlines() if line and "-->" not in line and not line.isdigit()]
    assert len(lines) > 4 and max(map(len, lines)) <= 20  # the layout's short lines


# The client marks translations.create deprecated; the route is still OpenAI's.
@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")
def test_openai_client_translation(client, tmp_path):
    expected = cli_outputs([GERMAN], tmp_path, "--model", "base", "--task", "translate")
    with open(GERMAN, "rb") as f:
        result = client.audio.translations.create(model="base", file=f)
    want = expected[GERMAN.name]["result"]["text"].strip()
    assert result.text == want
    assert re.search(r"[A-Za-z]{3}", result.text)
    with open(GERMAN, "rb") as f:
        verbose = client.audio.translations.create(
            model="base", file=f, response_format="verbose_json"
        )
    assert verbose.text == want
    assert verbose.model_extra["task"] == "translate"
    assert verbose.language == "german"
    for fmt in ("srt", "vtt"):
        with open(GERMAN, "rb") as f:
            body = client.audio.translations.create(model="base", file=f, response_format=fmt)
        assert body == expected[GERMAN.name][fmt], fmt
    with open(GERMAN, "rb") as f:
        text = client.audio.translations.create(model="base", file=f, response_format="text")
    assert text.strip() == want


def test_english_only_model_cannot_translate(server):
    with open(SHORT, "rb") as f:
        response = post(server, {"file": f}, {"model": "tiny.en"}, path="/v1/audio/translations")
    assert_error(response, 400, param="model")


def test_silence_gives_empty_text(server, tmp_path):
    silent = tmp_path / "silence.wav"
    with wave.open(str(silent), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\0\0" * 16000 * 3)
    with open(silent, "rb") as f:
        response = post(
            server, {"file": f}, {"model": "tiny.en", "response_format": "verbose_json"}
        )
    assert response.status_code == 200, response.text
    assert response.json()["text"] == ""
    assert response.json()["segments"] == []


# --- models, health, metrics --------------------------------------------------------------


def _metric(server, name: str) -> float:
    text = httpx.get(
        server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10
    ).text
    return float(re.search(rf"^{name} (\S+)$", text, re.M)[1])


def test_models_health_and_metrics(server, client):
    before = _metric(server, "susurrus_audio_seconds_total")
    with open(SHORT, "rb") as f:
        assert post(server, {"file": f}, {"model": "tiny.en"}).status_code == 200
    after = _metric(server, "susurrus_audio_seconds_total")
    assert after - before == pytest.approx(float(_manifest_duration(SHORT)), abs=0.05)
    assert _metric(server, "susurrus_realtime_factor") > 0.5
    names = {m.id: m for m in client.models.list()}
    assert {"tiny.en", "base", "large-v3"} <= set(names)
    assert names["tiny.en"].model_extra["default"] is True
    assert names["tiny.en"].model_extra["loaded"] is True
    assert names["large-v3"].model_extra["loaded"] is False
    health = httpx.get(server.url + "/health", timeout=10).json()
    assert health["status"] == "ok" and "tiny.en" in health["loaded_models"]
    metrics = httpx.get(
        server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10
    ).text
    for name in (
        'susurrus_requests_total{endpoint="transcriptions",status="200"}',
        "susurrus_queue_length",
        "susurrus_batch_occupancy",
        "susurrus_sessions",
        "susurrus_request_seconds_bucket",
        'susurrus_engine_encoded_ahead{model="tiny.en"}',
        'susurrus_engine_lane_steps{model="tiny.en"}',
    ):
        assert name in metrics
    # The engine's own counts: it ran decoding steps for the request.
    assert _metric(server, 'susurrus_engine_steps{model="tiny.en"}') > 10
    rows = _metric(server, 'susurrus_engine_row_steps{model="tiny.en"}')
    assert rows >= _metric(server, 'susurrus_engine_steps{model="tiny.en"}')
    assert httpx.get(server.url + "/metrics", timeout=10).status_code == 401


# --- errors and security ------------------------------------------------------------------


def test_api_key_required(server):
    with open(SHORT, "rb") as f:
        assert_error(post(server, {"file": f}, key=None), 401, code="invalid_api_key")
    with open(SHORT, "rb") as f:
        assert_error(post(server, {"file": f}, key="wrong"), 401, code="invalid_api_key")
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError), open(SHORT, "rb") as f:
        bad.audio.transcriptions.create(model="whisper-1", file=f)
    assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 401


@pytest.mark.parametrize(
    "model", ["../../etc/passwd", "/srv/private/model.pt", "~/model.pt", "./tiny.en", "..", "a/b/c"]
)
def test_model_names_are_never_paths(server, model):
    with open(SHORT, "rb") as f:
        response = post(server, {"file": f}, {"model": model})
    error = assert_error(response, 404, code="model_not_found", param="model")
    assert "Traceback" not in error["message"]


def test_oversized_upload_stopped_at_the_header(server):
    data = b"\0" * (MAX_UPLOAD_MB * 1024 * 1024 + 1)
    assert_error(post(server, {"file": ("big.wav", data)}), 413)


def _raw(server, head: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(head)
    return sock


def _read_status(sock: socket.socket) -> int:
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ", 2)[1])


def test_oversized_upload_stopped_while_streaming(server):
    """A chunked upload without a length: the server answers 413 before the body ends."""
    boundary = "b" + uuid.uuid4().hex
    head = (
        f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {KEY}\r\nTransfer-Encoding: chunked\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n"
    ).encode()
    sock = _raw(server, head)
    part = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode()
    sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
    block = b"\1" * 65536
    sent = 0
    # Send a little more than the limit, never the end of the body.
    while sent <= (MAX_UPLOAD_MB + 1) * 1024 * 1024:
        try:
            sock.sendall(b"%x\r\n%s\r\n" % (len(block), block))
        except (BrokenPipeError, ConnectionResetError):
            break
        sent += len(block)
    assert _read_status(sock) == 413
    sock.close()
    assert leftovers(server) == []


def test_truncated_uploads(server):
    boundary = "b" + uuid.uuid4().hex
    audio = SHORT.read_bytes()
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="cut.flac"\r\n'
        "Content-Type: audio/flac\r\n\r\n"
    ).encode() + audio
    # The body is complete but the multipart form never ends.
    response = httpx.post(
        server.url + "/v1/audio/transcriptions",
        content=body,
        headers={
            "Authorization": f"Bearer {KEY}",
            "Content-Type": f"multipart/form-data; boundary={boundary}",
        },
        timeout=60,
    )
    assert_error(response, 400)
    assert "truncated" in response.json()["error"]["message"]
    # The connection closes before the promised length arrives.
    head = (
        f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body) + 100000}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n"
    ).encode()
    sock = _raw(server, head)
    sock.sendall(body[: len(body) // 2])
    sock.close()
    assert leftovers(server) == []
    assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"


def test_not_media_and_script_filename(server):
    name = "<img src=x onerror=alert(1)>.mp3"
    response = post(server, {"file": (name, b"this is plain text, not audio " * 50)})
    error = assert_error(response, 400, code="invalid_file", param="file")
    assert "<img" not in response.text
    assert "&lt;img src=x onerror=alert(1)&gt;.mp3" in error["message"]
    assert str(server.uploads) not in response.text  # the server's own path stays private
    assert_error(post(server, {"file": ("empty.wav", b"")}), 400, param="file")
    assert_error(post(server, data={"model": "tiny.en"}), 400, param="file")
    response = httpx.post(
        server.url + "/v1/audio/transcriptions",
        content=b"{}",
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        timeout=60,
    )
    assert_error(response, 400)


@pytest.mark.parametrize(
    "field,value",
    [
        ("response_format", "docx"),
        ("temperature", "7"),
        ("temperature", "hot"),
        ("beam_size", "-3"),
        ("beam_size", "0"),
        ("suppress_tokens", "abc"),
        ("suppress_tokens", "999999"),
        ("language", "klingon"),
        ("timestamp_granularities[]", "syllable"),
        ("stream", "maybe"),
    ],
)
def test_bad_options(server, field, value):
    with open(SHORT, "rb") as f:
        response = post(server, {"file": f}, {field: value})
    assert_error(response, 400)


def test_concurrent_uploads_of_the_same_name(server, cli):
    files = [JFK, LIBRI, SHORT]

    def send(path: Path) -> str:
        with open(path, "rb") as f:
            response = post(server, {"file": ("same.flac", f)}, {"model": "tiny.en"})
        assert response.status_code == 200, response.text
        return response.json()["text"]

    with ThreadPoolExecutor(len(files)) as pool:
        texts = list(pool.map(send, files))
    assert texts == [cli[p.name]["result"]["text"].strip() for p in files]
    assert leftovers(server) == []


def test_a_file_part_without_a_file_name_is_the_upload(server, cli):
    """httpx (and browsers, for an empty name) send the file part with no filename: it is
    still the file, not a form field refused as far too long."""
    with open(JFK, "rb") as f:
        response = post(server, {"file": ("", f)}, {"model": "tiny.en"})
    assert response.status_code == 200, response.text
    assert response.json()["text"] == cli[JFK.name]["result"]["text"].strip()
    assert leftovers(server) == []


def test_full_queue_answers_429(server, cli):
    """More requests at once than batch + queue: the extra ones get 429 with Retry-After."""
    n = MAX_BATCH + MAX_QUEUE + 4
    barrier = threading.Barrier(n)

    def send(_: int) -> httpx.Response:
        with open(LIBRI, "rb") as f:
            data = f.read()
        barrier.wait()
        return post(server, {"file": ("x.flac", data)}, {"model": "tiny.en"})

    with ThreadPoolExecutor(n) as pool:
        responses = list(pool.map(send, range(n)))
    busy = [r for r in responses if r.status_code == 429]
    done = [r for r in responses if r.status_code == 200]
    assert len(busy) + len(done) == n
    assert busy and len(done) >= MAX_BATCH + MAX_QUEUE - 1
    for r in busy:
        assert_error(r, 429, code="rate_limit_exceeded")
        assert int(r.headers["Retry-After"]) >= 1
    for r in done:
        assert r.json()["text"] == cli[LIBRI.name]["result"]["text"].strip()
    assert leftovers(server) == []


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_disconnect_cancels_the_session(server, stream):
    """A client that goes away cancels its session (counted in the metrics); the session
    decoding beside it is unaffected."""

    def cancelled() -> float:
        return _metric(server, "susurrus_sessions_cancelled_total")

    before = cancelled()
    socks = []
    for leaving in (False, True):
        body = (
            b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.flac"\r\n\r\n'
            + MEDIUM.read_bytes()
            + b"\r\n"
        )
        if leaving and stream:
            body += b'--B\r\nContent-Disposition: form-data; name="stream"\r\n\r\ntrue\r\n'
        body += b"--B--\r\n"
        head = (
            f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n"
            "Content-Type: multipart/form-data; boundary=B\r\n\r\n"
        ).encode()
        sock = _raw(server, head)
        sock.sendall(body)
        socks.append(sock)
    deadline = time.monotonic() + 30
    while httpx.get(server.url + "/health", timeout=10).json()["sessions"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    socks[1].close()  # the second client leaves while its session is in the engine
    assert _read_status(socks[0]) == 200
    socks[0].close()
    deadline = time.monotonic() + 60
    while cancelled() < before + 1:
        assert time.monotonic() < deadline, "the session was not cancelled"
        time.sleep(0.2)
    assert leftovers(server) == []


def _manifest_duration(path: Path) -> str:
    for line in (AUDIO / "manifest.tsv").read_text(encoding="utf-8").splitlines():
        if line.startswith(path.name + "\t"):
            return line.split("\t")[2]
    raise KeyError(path.name)


def test_sigterm_finishes_running_sessions(tmp_path):
    process = ServerProcess(["--model", "tiny.en", "--model-ttl", "0"], tmp_path / "log")
    result: dict = {}

    def send() -> None:
        with open(LIBRI, "rb") as f:
            result["response"] = httpx.post(
                process.url + "/v1/audio/transcriptions", files={"file": f}, timeout=120
            )

    sender = threading.Thread(target=send)
    sender.start()
    deadline = time.monotonic() + 60
    while httpx.get(process.url + "/health", timeout=10).json()["sessions"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert process.stop() in (0, -signal.SIGTERM)
    sender.join(60)
    response = result["response"]
    assert response.status_code == 200
    assert "SORROW OF HIS LIFE" in response.json()["text"].upper()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", process.port), timeout=2)
    assert json.loads(response.text)["text"]


def test_settings_from_flags_and_environment(monkeypatch, tmp_path):
    from susurrus.errors import SusurrusError
    from susurrus.server.settings import parse_args

    monkeypatch.setenv("SUSURRUS_API_KEY", "from-env")
    monkeypatch.setenv("SUSURRUS_MAX_BATCH", "3")
    monkeypatch.setenv("SUSURRUS_MODEL", "tiny.en,base")
    settings = parse_args([])
    assert (settings.api_key, settings.max_batch, settings.model) == ("from-env", 3, "tiny.en")
    mine = tmp_path / "my-model"
    mine.mkdir()
    settings = parse_args(
        ["--model", f"custom={mine}", "--model", str(mine), "--api-key", "flag", "--max-queue", "0"]
    )
    assert settings.model == "custom"
    assert settings.model_dirs == {"custom": str(mine), "my-model": str(mine)}
    assert (settings.api_key, settings.max_sessions) == ("flag", 3)
    with pytest.raises(SusurrusError):
        parse_args(["--model", f"x={tmp_path / 'missing'}"])
    with pytest.raises(SusurrusError):
        parse_args(["--max-batch", "0"])
    with pytest.raises(SusurrusError, match="--port must be 0 to 65535"):
        parse_args(["--port", "99999"])
    # A default model no request could load is refused at the start, not at every request.
    assert parse_args(["--model", "openai/whisper-tiny"]).model == "openai/whisper-tiny"
    # (--no-hub limits what clients may name; the default is the operator's choice.)
    assert parse_args(["--model", "openai/whisper-tiny", "--no-hub"]).model == (
        "openai/whisper-tiny"
    )
    done = subprocess.run([sys.executable, "-m", "susurrus", "serve", "--model", "nosuchmodel"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr + done.stdout
    assert done.stdout.strip().splitlines()[-1:] == [
        "susurrus serve: error: unknown model 'nosuchmodel': a registry name (tiny.en, tiny, "
        "base.en, base, small.en, small, medium.en, medium, large-v1, large-v2, large-v3, large, "
        "large-v3-turbo, turbo), a model directory, NAME=DIRECTORY or a Hugging Face repo id "
        "(ORG/NAME)"
    ]


def test_model_names_resolve_without_touching_paths(tmp_path):
    from susurrus.server.formats import ApiError
    from susurrus.server.models import ModelManager
    from susurrus.server.settings import Settings

    mine = tmp_path / "mine"
    mine.mkdir()
    manager = ModelManager(Settings(model="tiny.en", model_dirs={"mine": str(mine)}))
    assert manager.resolve("whisper-1") == manager.resolve(None) == "tiny.en"
    assert manager.resolve("mine") == "mine"
    assert manager.resolve("large-v3") == "large-v3"
    assert manager.resolve("openai/whisper-small@main") == "openai/whisper-small@main"
    # The configured directory's path is not a name a client may send.
    for name in (str(mine), "../mine", "/etc/passwd", "openai/../x", "a/b@rev with space"):
        with pytest.raises(ApiError) as error:
            manager.resolve(name)
        assert error.value.status == 404
    closed = ModelManager(Settings(model="tiny.en", allow_hub=False))
    with pytest.raises(ApiError):
        closed.resolve("openai/whisper-small")
