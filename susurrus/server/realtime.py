"""Live transcription over a WebSocket, with OpenAI's realtime transcription events.

The client sends audio as binary frames (PCM16 little-endian, mono, 16 kHz unless the
`sample_rate` query parameter says otherwise) or as OpenAI's JSON
`{"type": "input_audio_buffer.append", "audio": BASE64_PCM16}`; `input_audio_buffer.commit`
ends the current item (its transcript is completed, the next audio starts a new one), and
closing the socket ends the stream. `transcription_session.update` sets the language,
model or prompt before the first audio.

The server sends `transcription_session.created`, then for each item
`conversation.item.input_audio_transcription.delta` events (`delta`: newly confirmed
text, never retracted; `confirmed` words with times; `tentative` text and words, which the
next event replaces) and one `conversation.item.input_audio_transcription.completed`
(`transcript`, `words`), or `error` events. Every stream is a session on the model's shared
engine: the re-decodes of all live streams share its batches.

The API key goes in the Authorization header, or (browsers cannot set headers on a
WebSocket) as OpenAI's subprotocol `openai-insecure-api-key.KEY`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import itertools
import json
import logging
import time
from typing import Any

import anyio
import numpy as np
from starlette.websockets import WebSocket, WebSocketDisconnect

from ..live import LiveEvent, LiveSession, words_text
from ..tokenizer import language_code
from .formats import ApiError

log = logging.getLogger("susurrus.server")

KEY_PROTOCOL = "openai-insecure-api-key."
MAX_FEED_S = 8.0  # audio fed at once when decoding falls behind
MAX_MESSAGE_BYTES = 4 << 20  # one message: a few minutes of audio at most
_items = itertools.count(1)


def _offered_key(websocket: WebSocket) -> str | None:
    given = websocket.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    for protocol in websocket.scope.get("subprotocols", []):
        if protocol.startswith(KEY_PROTOCOL):
            return protocol[len(KEY_PROTOCOL) :]
    return None


def _subprotocol(websocket: WebSocket) -> str | None:
    """The subprotocol to answer with: a browser that offers some needs one back."""
    offered = [p for p in websocket.scope.get("subprotocols", []) if not p.startswith(KEY_PROTOCOL)]
    if "realtime" in offered:
        return "realtime"
    return offered[0] if offered else None


def _error(message: str, code: str | None = None, type: str = "invalid_request_error") -> dict:
    return {"type": "error", "error": {"type": type, "code": code, "message": message}}


def _pcm16(data: bytes) -> np.ndarray:
    if len(data) % 2:
        raise ValueError("PCM16 audio must have an even number of bytes")
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


class _Stream:
    """One connection's state: options, the item in progress, what waits to be fed."""

    def __init__(self, websocket: WebSocket, server: Any, model: str, params: dict) -> None:
        self.websocket = websocket
        self.server = server
        self.model = model
        self.language: str | None = params.get("language") or None
        self.prompt: str | None = params.get("prompt") or None
        self.rate = params.get("sample_rate", 16000)
        self.loop = asyncio.get_running_loop()
        self.outbox: asyncio.Queue[dict | None] = asyncio.Queue()
        self.inbox: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.entry: Any = None
        self.session: LiveSession | None = None
        self.item_id = ""
        self.audio_seconds = 0.0
        self._held: tuple[str, Any] | None = None  # taken from the inbox, not yet handled

    def send(self, event: dict) -> None:
        self.outbox.put_nowait(event)

    def on_event(self, event: LiveEvent) -> None:
        """From whichever thread decoded: hand the event to the event loop."""
        message = {
            "type": "conversation.item.input_audio_transcription.delta",
            "item_id": self.item_id,
            "content_index": 0,
            "delta": "".join(w["word"] for w in event.confirmed),
            "confirmed": event.confirmed,
            "tentative": "".join(w["word"] for w in event.tentative),
            "tentative_words": event.tentative,
            "audio_time": round(event.audio_time, 3),
        }
        self.loop.call_soon_threadsafe(self.outbox.put_nowait, message)

    def new_session(self) -> LiveSession:
        self.item_id = f"item_{next(_items)}"
        options: dict[str, Any] = {}
        if self.prompt:
            options["initial_prompt"] = self.prompt
        language = self.language
        if not self.entry.multilingual:
            language = "en"
        return LiveSession(self.entry.engine, language=language, on_event=self.on_event,
                           **options)

    async def receive(self) -> None:
        """Client messages into the inbox; ("end", None) when the client is done."""
        try:
            while True:
                message = await self.websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break  # nobody to send a transcript to: the item is dropped
                data, text = message.get("bytes"), message.get("text")
                if data is not None:
                    if len(data) > MAX_MESSAGE_BYTES:
                        self.send(_error("message too large", "message_too_large"))
                        continue
                    try:
                        self.inbox.put_nowait(("audio", _pcm16(data)))
                    except ValueError as exc:
                        self.send(_error(str(exc), "invalid_audio"))
                elif text is not None:
                    self._command(text)
        finally:
            self.inbox.put_nowait(("gone", None))

    def _command(self, text: str) -> None:
        if len(text) > MAX_MESSAGE_BYTES * 2:
            self.send(_error("message too large", "message_too_large"))
            return
        try:
            event = json.loads(text)
            kind = event["type"]
        except (ValueError, KeyError, TypeError):
            self.send(_error("expected a JSON object with a 'type'", "invalid_event"))
            return
        if kind == "input_audio_buffer.append":
            try:
                samples = _pcm16(base64.b64decode(event.get("audio", ""), validate=True))
            except (ValueError, binascii.Error):
                self.send(_error("'audio' must be base64 PCM16", "invalid_audio"))
                return
            self.inbox.put_nowait(("audio", samples))
        elif kind == "input_audio_buffer.commit":
            self.inbox.put_nowait(("commit", None))
        elif kind in ("transcription_session.update", "session.update"):
            self.inbox.put_nowait(("update", event.get("session") or {}))
        else:
            self.send(_error(f"unsupported event type {str(kind)[:60]!r}", "unsupported_event"))

    def _update(self, session: dict) -> None:
        if self.session is not None and self.session.audio_time > 0:
            self.send(_error("the session can only be changed before the audio",
                             "session_already_started"))
            return
        transcription = session.get("input_audio_transcription") or {}
        try:
            if transcription.get("language"):
                self.language = language_code(str(transcription["language"]))
        except ValueError as exc:
            self.send(_error(str(exc), "invalid_language"))
            return
        if transcription.get("prompt"):
            self.prompt = str(transcription["prompt"])[:2000]
        self.session = None  # made again with the new options at the first audio

    async def work(self) -> None:
        """Feed what has arrived, item after item, until the client has gone."""
        while True:
            if self._held is not None:
                (kind, value), self._held = self._held, None
            else:
                kind, value = await self.inbox.get()
            if kind == "gone":
                if self.session is not None:
                    self.session.engine.forget(self.session)
                    self.session = None
                return
            if kind == "update":
                self._update(value)
                continue
            if kind == "audio":
                parts, seconds = [value], len(value) / self.rate
                # Whatever else has come meanwhile goes in the same decode.
                while seconds < MAX_FEED_S and not self.inbox.empty():
                    more = self.inbox.get_nowait()
                    if more[0] != "audio":
                        self._held = more
                        break
                    parts.append(more[1])
                    seconds += len(more[1]) / self.rate
                if self.session is None:
                    self.session = self.new_session()
                samples = np.concatenate(parts)
                self.audio_seconds += len(samples) / self.rate
                await anyio.to_thread.run_sync(self.session.feed, samples, self.rate)
                continue
            # commit: complete the item
            if self.session is not None:
                session, self.session = self.session, None
                result = await anyio.to_thread.run_sync(session.finish)
                words = [w for s in result["segments"] for w in s["words"]]
                self.send({
                    "type": "conversation.item.input_audio_transcription.completed",
                    "item_id": self.item_id,
                    "content_index": 0,
                    "transcript": words_text(words),
                    "words": words,
                    "language": result["language"],
                })

    async def deliver(self) -> None:
        while True:
            event = await self.outbox.get()
            if event is None:
                return
            await self.websocket.send_json(event)


async def realtime_socket(server: Any, websocket: WebSocket) -> None:
    """The `/v1/realtime` WebSocket: one live stream per connection."""
    await websocket.accept(subprotocol=_subprotocol(websocket))
    key = server.settings.api_key
    if key is not None:
        given = _offered_key(websocket)
        if given is None or not hmac.compare_digest(given.encode(), key.encode()):
            await websocket.send_json(_error("Incorrect or missing API key.", "invalid_api_key"))
            await websocket.close(code=1008)
            return
    params = websocket.query_params
    try:
        model = server.models.resolve(params.get("model"))
        rate = int(params.get("sample_rate", "16000"))
        if not 8000 <= rate <= 192000:
            raise ValueError(f"sample_rate must be between 8000 and 192000, got {rate}")
        language = params.get("language") or None
        if language is not None:
            language = language_code(language)
        server.admit()
    except ApiError as exc:
        await websocket.send_json(_error(exc.message, exc.code))
        await websocket.close(code=1013 if exc.status == 429 else 1008)
        return
    except ValueError as exc:
        await websocket.send_json(_error(str(exc), "invalid_request"))
        await websocket.close(code=1008)
        return
    stream = _Stream(websocket, server, model, {"language": language, "sample_rate": rate,
                                                "prompt": params.get("prompt")})
    started = time.monotonic()
    server.metrics.session_started()
    tasks: list[asyncio.Task] = []
    try:
        stream.entry = await anyio.to_thread.run_sync(server.models.acquire, model)
        stream.send({
            "type": "transcription_session.created",
            "session": {
                "model": model,
                "input_audio_format": "pcm16",
                "sample_rate": rate,
                "language": language,
            },
        })
        sender = asyncio.create_task(stream.deliver())
        receiver = asyncio.create_task(stream.receive())
        tasks = [sender, receiver]
        try:
            await stream.work()
        finally:
            stream.outbox.put_nowait(None)  # the sender sends what is left, then stops
        with contextlib.suppress(Exception):  # the client may have gone meanwhile
            await asyncio.wait_for(sender, 30)
            await websocket.close()
    except WebSocketDisconnect:
        log.info("live stream: the client went away")
    except Exception:  # a model that does not load, a failed decode: said, not shown
        log.exception("live stream failed")
        with contextlib.suppress(Exception):  # no detail: it may name paths on the server
            await websocket.send_json(
                _error("The server had an error.", "server_error", "server_error")
            )
            await websocket.close(code=1011)
    finally:
        for task in tasks:
            task.cancel()
        if stream.session is not None:
            stream.session.engine.forget(stream.session)
        if stream.entry is not None:
            server.models.release(stream.entry)
        server.leave(time.monotonic() - started)
        server.metrics.session_ended(stream.audio_seconds)
