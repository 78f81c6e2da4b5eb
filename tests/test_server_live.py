"""The live WebSocket endpoint of `susurrus serve`, with a real client (the `websockets`
package) over loopback: binary PCM frames and OpenAI's JSON events, the key, errors, and
two streams at once."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import uuid

import jiwer
import numpy as np
import pytest
from whisper_normalizer.english import EnglishTextNormalizer

from susurrus import load_audio

from .conftest import AUDIO, manifest, requires_shared
from .serving import ServerProcess, needs_server_extra

pytestmark = requires_shared
needs_server_extra()
websockets = pytest.importorskip("websockets", reason="websockets is not installed")

KEY = "live-key-" + uuid.uuid4().hex
norm = EnglishTextNormalizer()
DELTA = "conversation.item.input_audio_transcription.delta"
COMPLETED = "conversation.item.input_audio_transcription.completed"


def truth(name: str) -> str:
    return next(row["transcript"] for row in manifest() if row["file"] == name)


def pcm(name: str) -> bytes:
    samples = load_audio(str(AUDIO / name))
    return np.round(np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("live")
    process = ServerProcess(["--model", "tiny.en", "--api-key", KEY], root / "server.log")
    yield process
    process.stop()


def url(server, query: str = "") -> str:
    return f"ws://127.0.0.1:{server.port}/v1/realtime{query}"


async def stream(server, name: str, *, as_json: bool = False, chunk: float = 0.5,
                 headers: dict | None = None, subprotocols: list | None = None) -> list[dict]:
    """Send a dev file in `chunk`-second pieces, commit, and return every event."""
    data = pcm(name)
    step = int(chunk * 16000) * 2
    headers = {"Authorization": f"Bearer {KEY}"} if headers is None else headers
    events: list[dict] = []
    async with websockets.connect(url(server), additional_headers=headers,
                                  subprotocols=subprotocols, max_size=None) as ws:

        async def read() -> None:
            async for message in ws:
                event = json.loads(message)
                events.append(event)
                if event["type"] in (COMPLETED, "error"):
                    return

        reader = asyncio.create_task(read())
        for i in range(0, len(data), step):
            piece = data[i : i + step]
            if as_json:
                await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                          "audio": base64.b64encode(piece).decode()}))
            else:
                await ws.send(piece)
            await asyncio.sleep(0.01)
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        await asyncio.wait_for(reader, 120)
    return events


def check_events(events: list[dict], name: str, min_deltas: int = 3) -> str:
    assert events[0]["type"] == "transcription_session.created"
    deltas = [e for e in events if e["type"] == DELTA]
    completed = events[-1]
    assert completed["type"] == COMPLETED, events[-3:]
    assert len(deltas) >= min_deltas
    # The deltas, joined, are the transcript: confirmed text is only ever appended to.
    joined = "".join(e["delta"] for e in deltas)
    assert joined.strip() == completed["transcript"]
    confirmed_words = [w for e in deltas for w in e["confirmed"]]
    assert [w["word"] for w in confirmed_words] == [w["word"] for w in completed["words"]]
    assert all(e["item_id"] == completed["item_id"] for e in deltas)
    assert jiwer.wer(norm(truth(name)), norm(completed["transcript"])) <= 0.15
    return completed["transcript"]


def test_binary_frames_and_json_appends_give_the_words(server):
    name = "jfk.flac"
    binary = asyncio.run(stream(server, name))
    text = check_events(binary, name)
    # Some delta showed words before they were confirmed.
    assert any(e.get("tentative") for e in binary if e["type"] == DELTA)
    as_json = asyncio.run(stream(server, name, as_json=True))
    assert check_events(as_json, name) == text


def test_key_by_browser_subprotocol_and_refusals(server):
    name = "en_ls_61-70968-0002.flac"
    events = asyncio.run(stream(server, name, headers={},
                                subprotocols=["realtime", f"openai-insecure-api-key.{KEY}"]))
    # 3 s of audio sent at once is decoded in two goes or so (words are confirmed once a
    # decode has heard past them): a delta while the audio still comes, then the rest.
    check_events(events, name, min_deltas=2)

    async def refused(query: str, headers: dict) -> tuple[dict, int]:
        async with websockets.connect(url(server, query), additional_headers=headers) as ws:
            event = json.loads(await ws.recv())
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
            return event, closed.value.rcvd.code

    event, code = asyncio.run(refused("", {}))
    assert event["error"]["code"] == "invalid_api_key" and code == 1008
    event, code = asyncio.run(refused("", {"Authorization": "Bearer wrong"}))
    assert event["error"]["code"] == "invalid_api_key" and code == 1008
    auth = {"Authorization": f"Bearer {KEY}"}
    event, code = asyncio.run(refused("?model=../../etc/passwd", auth))
    assert event["error"]["code"] == "model_not_found" and code == 1008


def test_bad_messages_get_error_events(server):
    async def run() -> list[dict]:
        async with websockets.connect(url(server),
                                      additional_headers={"Authorization": f"Bearer {KEY}"}) as ws:
            assert json.loads(await ws.recv())["type"] == "transcription_session.created"
            await ws.send("not json")
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": "@@"}))
            await ws.send(b"\x00\x01\x02")  # an odd number of bytes
            await ws.send(json.dumps({"type": "<script>"}))
            return [json.loads(await ws.recv()) for _ in range(4)]

    events = asyncio.run(run())
    codes = [e["error"]["code"] for e in events]
    assert codes == ["invalid_event", "invalid_audio", "invalid_audio", "unsupported_event"]


def test_two_streams_at_once(server):
    names = ["jfk.flac", "en_arctic_a0024.flac"]
    results: dict[str, list[dict]] = {}

    def run(name: str) -> None:
        results[name] = asyncio.run(stream(server, name))

    threads = [threading.Thread(target=run, args=(n,)) for n in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    for name in names:
        check_events(results[name], name)
