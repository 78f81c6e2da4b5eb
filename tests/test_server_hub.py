"""Hugging Face repo ids as model names (Python API, CLI, server), fetched with
huggingface_hub from a local HTTP server standing in for the hub (HF_ENDPOINT) that serves
repositories made from the embedded tiny.en weights: the transformers layout and the
CTranslate2 layout, a pinned revision, and offline mode."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from susurrus.load import embedded_model_files

from .conftest import AUDIO, requires_shared
from .serving import ROOT, ServerProcess, needs_server_extra
from .test_hf import heads_of, write_checkpoint

pytestmark = [
    requires_shared,
    pytest.mark.skipif(embedded_model_files("tiny.en") is None, reason="tiny.en not installed"),
]
pytest.importorskip("huggingface_hub")

AUDIO_FILE = AUDIO / "en_ls_1995-1837-0001.flac"
TRANSFORMERS = "acme-test/whisper-tiny.en"
CT2 = "acme-test/faster-whisper-tiny.en"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FakeHub:
    """Repositories {repo: {revision name: (commit sha, {file: bytes})}} over HTTP, with the
    routes huggingface_hub's snapshot_download uses."""

    def __init__(self, repos: dict[str, dict[str, dict[str, bytes]]]) -> None:
        self.repos: dict[str, dict[str, tuple[str, dict[str, bytes]]]] = {}
        for repo, revisions in repos.items():
            self.repos[repo] = {}
            for name, files in revisions.items():
                commit = hashlib.sha1(f"{repo}@{name}".encode()).hexdigest()
                self.repos[repo][name] = (commit, files)
                self.repos[repo][commit] = (commit, files)
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep the test output quiet
                pass

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

            def _send(self, status: int, data: bytes, headers: dict[str, str], body: bool):
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def _answer(self, body: bool) -> None:
                path = unquote(urlsplit(self.path).path)
                hub.requests.append(f"{self.command} {path}")
                parts = path.strip("/").split("/")
                error = json.dumps({"error": "Repository not found"}).encode()
                not_found = {"X-Error-Code": "RepoNotFound", "Content-Type": "application/json"}
                if parts[:2] == ["api", "models"] and len(parts) >= 6:
                    repo, kind, revision = "/".join(parts[2:4]), parts[4], parts[5]
                    entry = hub.repos.get(repo, {}).get(revision)
                    if entry is None:
                        return self._send(404, error, not_found, body)
                    commit, files = entry
                    if kind == "revision":
                        info = {
                            "id": repo,
                            "modelId": repo,
                            "sha": commit,
                            "siblings": [{"rfilename": f} for f in files],
                        }
                    else:  # tree
                        info = [
                            {"type": "file", "path": f, "size": len(d), "oid": _sha(d)[:40]}
                            for f, d in files.items()
                        ]
                    data = json.dumps(info).encode()
                    return self._send(200, data, {"Content-Type": "application/json"}, body)
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo, revision, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
                    entry = hub.repos.get(repo, {}).get(revision)
                    if entry is None or name not in entry[1]:
                        return self._send(
                            404, error, {**not_found, "X-Error-Code": "EntryNotFound"}, body
                        )
                    data = entry[1][name]
                    headers = {
                        "X-Repo-Commit": entry[0],
                        "ETag": f'"{_sha(data)}"',
                        "Content-Type": "application/octet-stream",
                    }
                    return self._send(200, data, headers, body)
                return self._send(404, error, not_found, body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def hub(tiny_en, tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    transformers = write_checkpoint(root / "transformers", tiny_en, heads_of(tiny_en))
    parts, config_dir = embedded_model_files("tiny.en")
    ct2 = {"model.bin": parts[0].read_bytes()}
    for name in ("config.json", "vocabulary.txt", "tokenizer.json"):
        if (config_dir / name).is_file():
            ct2[name] = (config_dir / name).read_bytes()
    hf_files = {p.name: p.read_bytes() for p in transformers.iterdir()}
    hf_files["README.md"] = b"not fetched: only the weights and configs are"
    fake = FakeHub(
        {
            TRANSFORMERS: {"main": hf_files, "v-ct2": ct2},
            CT2: {"main": ct2},
        }
    )
    yield fake
    fake.close()


@pytest.fixture(scope="module")
def expected_text(tiny_en) -> str:
    from susurrus import transcribe

    return transcribe(tiny_en, str(AUDIO_FILE), temperature=0.0)["text"].strip()


def hub_env(hub, home: Path, offline: bool = False) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_ENDPOINT": hub.url, "HF_HOME": str(home)}
    env.pop("HF_HUB_OFFLINE", None)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def python_transcribe(models: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """One process (torch imported once) printing each model's text on its own line."""
    code = (
        "import sys, susurrus\n"
        "for name in sys.argv[2:]:\n"
        "    m = susurrus.load_model(name, device='cpu')\n"
        "    print(susurrus.transcribe(m, sys.argv[1], temperature=0.0)['text'].strip())\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, str(AUDIO_FILE), *models],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_python_api_both_layouts_revision_and_offline(hub, expected_text, tmp_path):
    env = hub_env(hub, tmp_path / "hf")
    models = [TRANSFORMERS, CT2, TRANSFORMERS + "@v-ct2"]
    done = python_transcribe(models, env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [expected_text] * len(models)
    # Only the weights and configs were fetched, into huggingface_hub's own cache.
    assert not any("README.md" in r for r in hub.requests)
    assert any("/api/models/acme-test/whisper-tiny.en/revision/v-ct2" in r for r in hub.requests)
    cached = list((tmp_path / "hf" / "hub").glob("models--acme-test--*/snapshots/*/*"))
    assert {p.name for p in cached} >= {"model.safetensors", "model.bin", "config.json"}
    # The pinned revision is its own snapshot: the CTranslate2 files of tag v-ct2.
    snapshots = list(
        (tmp_path / "hf" / "hub").glob("models--acme-test--whisper-tiny.en/snapshots/*")
    )
    assert len(snapshots) == 2

    # Offline: what is cached loads without a request, anything else fails clearly.
    offline = hub_env(hub, tmp_path / "hf", offline=True)
    seen = len(hub.requests)
    done = python_transcribe([CT2], offline)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == expected_text
    assert len(hub.requests) == seen
    done = python_transcribe(["acme-test/never-downloaded"], offline)
    assert done.returncode != 0 and "HF_HUB_OFFLINE is set" in done.stderr


def test_cli_takes_a_repo_id(hub, expected_text, tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "susurrus",
            str(AUDIO_FILE),
            "--model",
            CT2,
            "-f",
            "json",
            "-o",
            str(tmp_path),
            "--temperature_increment_on_fallback",
            "None",
            "--beam_size",
            "None",
        ],
        capture_output=True,
        text=True,
        env=hub_env(hub, tmp_path / "hf"),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / f"{AUDIO_FILE.stem}.json").read_text())
    assert result["text"].strip() == expected_text


def test_server_takes_a_repo_id(hub, expected_text, tmp_path):
    needs_server_extra()
    httpx = pytest.importorskip("httpx")
    server = ServerProcess(
        ["--model", "tiny.en", "--model-ttl", "2"],
        tmp_path / "server.log",
        env=hub_env(hub, tmp_path / "hf"),
    )
    try:
        for model in (TRANSFORMERS, CT2 + "@main"):
            with open(AUDIO_FILE, "rb") as f:
                response = httpx.post(
                    server.url + "/v1/audio/transcriptions",
                    files={"file": f},
                    data={
                        "model": model,
                        "temperature_increment_on_fallback": "None",
                        "beam_size": "None",
                    },
                    timeout=300,
                )
            assert response.status_code == 200, response.text
            assert response.json()["text"] == expected_text
            # Listed as loaded under the id it was asked by (looked at right away: on a
            # slow machine the other model may outlive --model-ttl while this one loads).
            models = httpx.get(server.url + "/v1/models", timeout=10).json()["data"]
            assert model in {m["id"] for m in models if m["loaded"]}
        with open(AUDIO_FILE, "rb") as f:
            response = httpx.post(
                server.url + "/v1/audio/transcriptions",
                files={"file": f},
                data={"model": "acme-test/no-such-repo"},
                timeout=300,
            )
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "model_not_found"
        # Idle past --model-ttl, the models are unloaded.
        deadline = time.monotonic() + 30
        while httpx.get(server.url + "/health", timeout=10).json()["loaded_models"]:
            assert time.monotonic() < deadline, "idle models were not unloaded"
            time.sleep(0.25)
    finally:
        server.stop()
