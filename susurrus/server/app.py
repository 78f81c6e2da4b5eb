"""The HTTP application: OpenAI's audio API on the shared engines, metrics and the web page."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import html
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from importlib import resources
from typing import Any

import anyio
from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .. import __version__
from ..engine import Cancelled
from ..errors import SusurrusError
from ..tokenizer import LANGUAGES
from .formats import ApiError, parse_fields, render, stream_done, stream_segment
from .metrics import CONTENT_TYPE, Metrics
from .models import ModelManager
from .realtime import realtime_socket
from .settings import Settings
from .upload import ClientGone, Upload, read_upload

log = logging.getLogger("susurrus.server")

STATIC = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "capture.js": "text/javascript; charset=utf-8",
}
# The page loads only its own files; the chosen audio plays from a blob: URL.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "media-src 'self' blob:; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)


class SecurityHeaders:
    """Adds headers that keep browsers from sniffing types or framing the page."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {name.lower() for name, _ in headers}
                for name, value in (
                    (b"x-content-type-options", b"nosniff"),
                    (b"content-security-policy", CSP.encode()),
                    (b"referrer-policy", b"no-referrer"),
                ):
                    if name not in names:
                        headers.append((name, value))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class Server:
    """What the routes share: settings, models, metrics, the worker threads, the sessions."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.models = ModelManager(settings)
        self.metrics = Metrics(settings.max_batch)
        # One thread per admitted session, so every session sits in the engine at once and
        # the engine can batch their windows together.
        self.pool = ThreadPoolExecutor(settings.max_sessions, thread_name_prefix="susurrus-session")
        self.cancels: set[threading.Event] = set()
        self.upload_dir = ""
        self._own_upload_dir = False
        self._lock = threading.Lock()
        self._admitted = 0
        self._mean_seconds = 5.0

    def open(self) -> None:
        if self.settings.upload_dir:
            os.makedirs(self.settings.upload_dir, exist_ok=True)
            self.upload_dir = self.settings.upload_dir
        else:
            self.upload_dir = tempfile.mkdtemp(prefix="susurrus-uploads-")
            self._own_upload_dir = True

    def close(self) -> None:
        for cancel in list(self.cancels):
            cancel.set()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.models.close()
        if self._own_upload_dir:
            shutil.rmtree(self.upload_dir, ignore_errors=True)

    def admit(self) -> None:
        """Count a new session in, or answer 429 when the queue is full."""
        with self._lock:
            if self._admitted >= self.settings.max_sessions:
                waiting = self._admitted - self.settings.max_batch + 1
                retry = self._mean_seconds * waiting / self.settings.max_batch
                self.metrics.rejected.inc()
                raise ApiError(
                    429,
                    "The server is busy: too many requests are queued. Retry later.",
                    type="requests",
                    code="rate_limit_exceeded",
                    headers={"Retry-After": str(max(1, min(120, math.ceil(retry))))},
                )
            self._admitted += 1

    def leave(self, seconds: float | None) -> None:
        with self._lock:
            self._admitted -= 1
            if seconds is not None:
                self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * seconds

    @property
    def admitted(self) -> int:
        return self._admitted


def _check_key(server: Server, request: Request) -> None:
    key = server.settings.api_key
    if key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiError(
            401,
            "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.",
            code="invalid_api_key",
        )
    if not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")


def _error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _safe_name(filename: str) -> str:
    """The client's file name as it may appear in a message: short, and HTML-escaped."""
    name = os.path.basename(filename.replace("\\", "/"))[:120] or "upload"
    return html.escape(name, quote=True)


def _hide_path(message: str, path: str | None, filename: str) -> str:
    # Our temporary path means nothing to the client (and is not theirs to know).
    if path:
        message = message.replace(path, _safe_name(filename))
        message = message.replace(os.path.basename(path), _safe_name(filename))
    return message


def _media_error(exc: SusurrusError, path: str | None, filename: str) -> ApiError:
    return ApiError(400, _hide_path(str(exc), path, filename), param="file", code="invalid_file")


def _probe(path: str, upload: Upload) -> float | None:
    """The file's duration; ApiError 400 when it holds no audio."""
    from ..audio import probe

    if upload.size == 0:
        raise ApiError(400, "the uploaded file is empty", param="file", code="invalid_file")
    try:
        info = probe(path)
    except SusurrusError as exc:
        raise _media_error(exc, path, upload.filename) from None
    if not any(s.get("type") == "audio" for s in info["streams"]):
        raise ApiError(
            400,
            f"{_safe_name(upload.filename)}: the file has no audio stream",
            param="file",
            code="invalid_file",
        )
    return info.get("duration")


def _sse(event: dict) -> bytes:
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n".encode()


def create_app(settings: Settings) -> FastAPI:
    """The application for `settings` (uvicorn serves it; tests run it on loopback)."""
    server = Server(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.open()
        sweeper = asyncio.create_task(_sweep(server))
        log.info("serving; default model %s, uploads in %s", settings.model, server.upload_dir)
        try:
            yield
        finally:
            sweeper.cancel()
            await anyio.to_thread.run_sync(server.close)
            log.info("stopped")

    app = FastAPI(
        title="susurrus",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.server = server

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return _error_response(ApiError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(ApiError(400, "invalid request"))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return _error_response(
            ApiError(
                500, "The server had an error while processing your request.", type="server_error"
            )
        )

    # Plain ASGI rather than @app.middleware: Starlette's BaseHTTPMiddleware wraps `receive`,
    # which hides a client's disconnect from the route (and so would never cancel a session).
    app.add_middleware(SecurityHeaders)

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return _static("index.html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in STATIC:  # a fixed list: no path from the request reaches the disk
            raise ApiError(404, "not found", code="not_found")
        return _static(name)

    @app.get("/health")
    async def health() -> dict:
        loaded = server.models.loaded()
        return {
            "status": "ok",
            "version": __version__,
            "default_model": settings.model,
            "auth_required": settings.api_key is not None,
            "sessions": server.admitted,
            "queued": max(0, server.admitted - settings.max_batch),
            "max_batch": settings.max_batch,
            "max_queue": settings.max_queue,
            "max_upload_mb": settings.max_upload_mb,
            "loaded_models": sorted(loaded),
            # For the page's language menu.
            "languages": {code: name.title() for code, name in LANGUAGES.items()},
        }

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        _check_key(server, request)
        loaded = server.models.loaded()
        server.metrics.models.set(len(loaded))
        server.metrics.engines({name: entry.engine.stats() for name, entry in loaded.items()})
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict:
        _check_key(server, request)
        loaded = server.models.loaded()
        names = list(dict.fromkeys([settings.model, *server.models.registry(), *loaded]))
        return {"object": "list", "data": [_model_card(n, n in loaded, settings) for n in names]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str, request: Request) -> dict:
        _check_key(server, request)
        name = server.models.resolve(model)
        return _model_card(name, name in server.models.loaded(), settings)

    @app.websocket("/v1/realtime")
    async def realtime(websocket: WebSocket) -> None:
        await realtime_socket(server, websocket)

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request) -> Response:
        return await _audio(server, request, "transcribe")

    @app.post("/v1/audio/translations")
    async def translations(request: Request) -> Response:
        return await _audio(server, request, "translate")

    return app


def _model_card(name: str, loaded: bool, settings: Settings) -> dict:
    return {
        "id": name,
        "object": "model",
        "created": 0,
        "owned_by": "susurrus",
        "loaded": loaded,
        "default": name == settings.model,
    }


def _static(name: str) -> Response:
    data = (resources.files("susurrus.server") / "static" / name).read_bytes()
    return Response(data, media_type=STATIC[name], headers={"Cache-Control": "no-cache"})


async def _sweep(server: Server) -> None:
    """Unload models idle beyond the TTL."""
    ttl = server.settings.model_ttl
    if not ttl:
        return
    while True:
        await asyncio.sleep(min(30.0, max(0.5, ttl / 4)))
        server.models.unload_idle()


async def _audio(server: Server, request: Request, task: str) -> Response:
    endpoint = "transcriptions" if task == "transcribe" else "translations"
    status = 500
    upload = Upload()
    # Whoever owns the upload and the session slot releases them: this function, or the
    # worker thread's completion once a transcription has started.
    cleanup: list[Callable[[], None]] = [upload.remove]
    try:
        _check_key(server, request)
        try:
            await read_upload(
                dict(request.headers),
                request.stream(),
                server.upload_dir,
                server.settings.max_upload_bytes,
                upload,
            )
        except ClientDisconnect:
            raise ClientGone() from None
        if upload.path is None:
            raise ApiError(400, "no audio: send the recording in the 'file' field", param="file")
        name = server.models.resolve((upload.fields.get("model") or [""])[-1])
        parse_fields(upload.fields, task, multilingual=True)  # 400s before any heavy work
        duration = await anyio.to_thread.run_sync(_probe, upload.path, upload)
        server.admit()
        started = time.monotonic()
        server.metrics.session_started()
        audio_seconds: list[float | None] = [None]

        def end_session() -> None:
            server.leave(time.monotonic() - started)
            server.metrics.session_ended(audio_seconds[0])

        cleanup.append(end_session)
        entry = await anyio.to_thread.run_sync(server.models.acquire, name)
        cleanup.append(functools.partial(server.models.release, entry))
        parsed = parse_fields(upload.fields, task, multilingual=entry.multilingual)
        cancel = threading.Event()
        server.cancels.add(cancel)
        cleanup.append(functools.partial(server.cancels.discard, cancel))
        loop = asyncio.get_running_loop()
        segments: asyncio.Queue[dict] = asyncio.Queue()

        def on_segment(segment: dict) -> None:
            if parsed.stream:
                loop.call_soon_threadsafe(segments.put_nowait, segment)

        path = upload.path

        def work() -> dict:
            result = entry.engine.transcribe(
                path, on_segment=on_segment, cancel=cancel, **parsed.options
            )
            # Counted here, before the done callback records the session's end.
            audio_seconds[0] = duration or _last_end(result)
            return result

        future = server.pool.submit(work)
        # From here the worker owns the cleanup: the file stays until it has stopped reading.
        owned, cleanup = cleanup, []
        future.add_done_callback(lambda _: _run_all(owned))

        if parsed.stream:
            status = 200
            return StreamingResponse(
                _stream(
                    server,
                    request,
                    future,
                    segments,
                    cancel,
                    task,
                    duration,
                    (path, upload.filename),
                ),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        # `path`, not upload.path: the done callback may already have cleared that.
        result = await _wait(server, request, future, cancel, (path, upload.filename))
        seconds = duration or _last_end(result)
        server.metrics.latency.observe(time.monotonic() - started)
        body, media_type = render(result, parsed, task, seconds)
        status = 200
        if isinstance(body, dict):
            return JSONResponse(body)
        return PlainTextResponse(body, media_type=media_type)
    except ApiError as exc:
        status = exc.status
        return _error_response(exc)
    except ClientGone:
        status = 499  # nobody is listening; nginx's code for it, for the metrics
        return Response(status_code=400)
    finally:
        _run_all(cleanup)
        server.metrics.requests.labels(endpoint, str(status)).inc()


def _run_all(actions: list[Callable[[], None]]) -> None:
    for action in actions:
        try:
            action()
        except Exception:
            log.exception("cleanup failed")


def _last_end(result: dict) -> float:
    return float(result["segments"][-1]["end"]) if result["segments"] else 0.0


async def _wait(
    server: Server,
    request: Request,
    future: Future,
    cancel: threading.Event,
    names: tuple[str | None, str],
) -> dict:
    """The worker's result; a client that disconnects cancels its session."""
    wrapped = asyncio.wrap_future(future)
    try:
        while True:
            done, _ = await asyncio.wait({wrapped}, timeout=0.25)
            if done:
                break
            if not cancel.is_set() and await request.is_disconnected():
                log.info("client went away: cancelling its session")
                cancel.set()
                server.metrics.cancelled.inc()
        return wrapped.result()
    except asyncio.CancelledError:
        cancel.set()  # shutdown ran out of time: stop decoding for this session
        raise
    except Exception as exc:
        raise _translate(exc, names) from None


def _translate(exc: BaseException, names: tuple[str | None, str]) -> Exception:
    if isinstance(exc, Cancelled):
        return ClientGone()
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, SusurrusError):
        return _media_error(exc, *names)
    if isinstance(exc, (ValueError, NotImplementedError)):
        return ApiError(400, _hide_path(str(exc), *names))
    log.error("transcription failed", exc_info=exc)
    return ApiError(
        500, "The server had an error while processing your request.", type="server_error"
    )


async def _stream(
    server: Server,
    request: Request,
    future: Future,
    segments: asyncio.Queue[dict],
    cancel: threading.Event,
    task: str,
    duration: float | None,
    names: tuple[str | None, str],
) -> AsyncIterator[bytes]:
    """Server-sent events: a delta per final segment, then the done event."""
    wrapped = asyncio.wrap_future(future)
    started = time.monotonic()

    def stop() -> None:
        if not cancel.is_set():
            cancel.set()
            server.metrics.cancelled.inc()

    try:
        while True:
            getter = asyncio.ensure_future(segments.get())
            done, _ = await asyncio.wait(
                {getter, wrapped}, timeout=0.25, return_when=asyncio.FIRST_COMPLETED
            )
            if getter in done:
                yield _sse(stream_segment(getter.result(), duration or 0.0))
                continue
            getter.cancel()
            if not done:
                # Starlette notices a departed client only when it next writes, and the
                # next segment may be far off: ask the server directly.
                if await request.is_disconnected():
                    log.info("client went away: cancelling its stream")
                    stop()
                    return
                continue
            while not segments.empty():
                yield _sse(stream_segment(segments.get_nowait(), duration or 0.0))
            break
        try:
            result = wrapped.result()
        except BaseException as exc:
            error = _translate(exc, names)
            if isinstance(error, ApiError):
                yield _sse({"type": "error", **error.body()})
            return
        seconds = duration or _last_end(result)
        server.metrics.latency.observe(time.monotonic() - started)
        yield _sse(stream_done(result, task, seconds))
    finally:
        if not future.done():
            stop()  # the client went away while a write was pending, or the server stops
