"""Model registry and downloader, exercised against a real HTTP server on loopback."""

from __future__ import annotations

import hashlib
import random
import re
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from susurrus import download
from susurrus.download import (
    _ALIGNMENT_HEADS,
    _MODELS,
    alignment_heads_for,
    available_models,
    default_cache_dir,
    download_model,
)
from susurrus.errors import SusurrusError

PAYLOAD = random.Random(1234).randbytes(300_000)
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Server:
    def __init__(self) -> None:
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                server.requests.append(self.path)
                if self.path.startswith("/good/"):
                    self._headers(len(PAYLOAD))
                    self.wfile.write(PAYLOAD)
                elif self.path.startswith("/short/"):
                    # Promise every byte, deliver a third, then hang up.
                    self._headers(len(PAYLOAD))
                    self.wfile.write(PAYLOAD[:100_000])
                    self.wfile.flush()
                    self.close_connection = True
                else:
                    self.send_error(404, "Not Found")

            def _headers(self, length: int) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(length))
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # A proxy in the environment must not intercept loopback test traffic.
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("SUSURRUS_OFFLINE", raising=False)


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server()
    yield srv
    srv.close()


def _listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


# ---------------------------------------------------------------- downloading


def test_download_verifies_and_caches(server: _Server, tmp_path: Path) -> None:
    url = f"{server.base}/good/{SHA}/tiny.en.pt"
    path = download_model("tiny.en", tmp_path, url=url, progress=False)
    assert path == tmp_path / "tiny.en.pt"
    assert path.read_bytes() == PAYLOAD
    assert len(server.requests) == 1

    again = download_model("tiny.en", tmp_path, url=url, progress=True)
    assert again == path
    assert len(server.requests) == 1  # served from the cache
    assert _listing(tmp_path) == ["tiny.en.pt"]


def test_checksum_taken_from_url_or_override(server: _Server, tmp_path: Path) -> None:
    url = f"{server.base}/good/plain/model.pt"
    path = download_model("custom", tmp_path, url=url, expected_sha256=SHA.upper(), progress=False)
    assert path.read_bytes() == PAYLOAD


def test_bad_checksum_leaves_nothing(server: _Server, tmp_path: Path) -> None:
    wrong = "0" * 64
    url = f"{server.base}/good/{wrong}/base.pt"
    with pytest.raises(SusurrusError) as err:
        download_model("base", tmp_path, url=url, progress=False)
    assert str(err.value).startswith(f"checksum mismatch for base: expected {wrong}, got {SHA}")
    assert _listing(tmp_path) == []


def test_corrupt_cached_file_is_replaced(server: _Server, tmp_path: Path) -> None:
    (tmp_path / "base.pt").write_bytes(b"truncated junk")
    url = f"{server.base}/good/{SHA}/base.pt"
    with pytest.warns(UserWarning, match="checksum does not match"):
        path = download_model("base", tmp_path, url=url, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert len(server.requests) == 1
    assert _listing(tmp_path) == ["base.pt"]


def test_interrupted_transfer_leaves_nothing(server: _Server, tmp_path: Path) -> None:
    url = f"{server.base}/short/{SHA}/small.pt"
    with pytest.raises(SusurrusError, match=r"interrupted after 100000 of 300000 bytes"):
        download_model("small", tmp_path, url=url, progress=False)
    assert _listing(tmp_path) == []


def test_interrupted_transfer_keeps_old_cached_file(server: _Server, tmp_path: Path) -> None:
    (tmp_path / "small.pt").write_bytes(b"old")
    url = f"{server.base}/short/{SHA}/small.pt"
    with pytest.warns(UserWarning), pytest.raises(SusurrusError, match="interrupted"):
        download_model("small", tmp_path, url=url, progress=False)
    assert _listing(tmp_path) == ["small.pt"]
    assert (tmp_path / "small.pt").read_bytes() == b"old"


def test_http_error(server: _Server, tmp_path: Path) -> None:
    with pytest.raises(SusurrusError, match="failed with HTTP 404"):
        download_model("tiny", tmp_path, url=f"{server.base}/nope/{SHA}/tiny.pt", progress=False)
    assert _listing(tmp_path) == []


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_host_gives_clear_message(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/m/{SHA}/base.pt"
    with pytest.raises(SusurrusError) as err:
        download_model("base", tmp_path / "cache", url=url, progress=False)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("could not reach 127.0.0.1 to download the 'base' model")
    assert 'pip install "susurrus[models]"' in message
    assert str(tmp_path / "cache" / "base.pt") in message
    assert "--model" in message
    assert _listing(tmp_path / "cache") == []


def test_offline_fails_without_network(server: _Server, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SUSURRUS_OFFLINE", "1")
    url = f"{server.base}/good/{SHA}/tiny.pt"
    with pytest.raises(SusurrusError) as err:
        download_model("tiny", tmp_path, url=url, progress=False)
    message = str(err.value)
    assert message.startswith("SUSURRUS_OFFLINE is set, so the 'tiny' model was not downloaded")
    assert 'pip install "susurrus[models]"' in message and "--model" in message
    assert server.requests == []
    assert _listing(tmp_path) == []


def test_offline_still_uses_verified_cache(server: _Server, tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "tiny.pt").write_bytes(PAYLOAD)
    monkeypatch.setenv("SUSURRUS_OFFLINE", "1")
    path = download_model("tiny", tmp_path, url=f"{server.base}/good/{SHA}/tiny.pt")
    assert path == tmp_path / "tiny.pt"
    assert server.requests == []


def test_unknown_model_name(tmp_path: Path) -> None:
    with pytest.raises(SusurrusError, match="unknown model 'huge'; available models: tiny.en, "):
        download_model("huge", tmp_path)


def test_registry_names_resolve_to_official_urls(monkeypatch, tmp_path: Path) -> None:
    seen: list[tuple[str, str | None]] = []

    def fake_fetch(url, target, label, expected, progress) -> None:
        seen.append((url, expected))
        target.write_bytes(b"")

    monkeypatch.setattr(download, "_fetch", fake_fetch)
    path = download_model("large", tmp_path, progress=False)
    assert path.name == "large-v3.pt"
    assert seen == [(_MODELS["large-v3"], _MODELS["large-v3"].split("/")[-2])]


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SUSURRUS_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("SUSURRUS_CACHE_DIR")
    assert default_cache_dir() == tmp_path / "xdg" / "susurrus"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "susurrus"


def test_download_into_default_cache(server: _Server, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SUSURRUS_CACHE_DIR", str(tmp_path / "c"))
    path = download_model("tiny", url=f"{server.base}/good/{SHA}/tiny.pt", progress=False)
    assert path == tmp_path / "c" / "tiny.pt"


# ---------------------------------------------------------------- registry data

OFFICIAL = [
    "tiny.en", "tiny", "base.en", "base", "small.en", "small", "medium.en", "medium",
    "large-v1", "large-v2", "large-v3", "large", "large-v3-turbo", "turbo",
]  # fmt: skip

# (n_text_layer, n_text_head) of each official checkpoint's decoder.
DIMS = {
    "tiny": (4, 6), "base": (6, 8), "small": (12, 12), "medium": (24, 16),
    "large-v1": (32, 20), "large-v2": (32, 20), "large-v3": (32, 20), "large": (32, 20),
    "large-v3-turbo": (4, 20), "turbo": (4, 20),
}  # fmt: skip


def test_registry_names_and_urls() -> None:
    assert available_models() == OFFICIAL
    assert list(_ALIGNMENT_HEADS) == OFFICIAL
    for name, url in _MODELS.items():
        assert url.startswith("https://openaipublic.azureedge.net/main/whisper/models/")
        assert re.fullmatch(r"[0-9a-f]{64}", url.split("/")[-2]), name
    assert _MODELS["large"] == _MODELS["large-v3"]
    assert _MODELS["turbo"] == _MODELS["large-v3-turbo"]
    assert _MODELS["large-v3"].endswith("/large-v3.pt")
    assert len({url.split("/")[-2] for url in _MODELS.values()}) == 12


def _true_positions(mask: torch.Tensor) -> list[list[int]]:
    return mask.nonzero().tolist()


def test_alignment_heads_known_models() -> None:
    base = alignment_heads_for("base", 6, 8)
    assert base.dtype == torch.bool and base.shape == (6, 8)
    assert _true_positions(base) == [[3, 1], [4, 2], [4, 3], [4, 7], [5, 1], [5, 2], [5, 4], [5, 6]]
    tiny_en = alignment_heads_for("tiny.en", 4, 6)
    assert _true_positions(tiny_en) == [
        [1, 0], [2, 0], [2, 5], [3, 0], [3, 1], [3, 2], [3, 3], [3, 4],
    ]  # fmt: skip


@pytest.mark.parametrize("name", OFFICIAL)
def test_alignment_heads_fit_model_dims(name: str) -> None:
    layers, heads = DIMS[name.removesuffix(".en")]
    mask = alignment_heads_for(name, layers, heads)
    assert mask.shape == (layers, heads)
    assert 0 < int(mask.sum()) < layers * heads


def test_alignment_heads_wrong_dims_or_name() -> None:
    with pytest.raises(SusurrusError, match="the model has 4 text layers x 20 heads"):
        alignment_heads_for("base", 4, 20)
    with pytest.raises(SusurrusError, match="no alignment heads known for model 'mine'"):
        alignment_heads_for("mine", 4, 6)
