"""Helpers for the server tests: a real `susurrus serve` process on a free loopback port,
and the command line's outputs to compare its answers with."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def needs_server_extra() -> None:
    for module in ("fastapi", "uvicorn", "python_multipart", "prometheus_client"):
        pytest.importorskip(module, reason='the server extra is not installed: "susurrus[server]"')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, args: list[str], log: Path, env: dict | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        environment.pop("SUSURRUS_API_KEY", None)
        self._log_file = open(log, "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "susurrus", "serve", "--port", str(self.port), *args],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=environment,
            cwd=str(log.parent),
        )
        self._wait_ready(60.0)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not start: {self.log.read_text()[-2000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log_file.close()
        return self.proc.returncode


def cli_outputs(files: list[Path], out: Path, *options: str) -> dict[str, dict[str, str]]:
    """{file name: {format: contents}} from `susurrus FILES -f all` with `options`."""
    out.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "susurrus",
            *map(str, files),
            "-f",
            "all",
            "-o",
            str(out),
            "--verbose",
            "False",
            *options,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    outputs = {}
    for f in files:
        stem = f.stem
        outputs[f.name] = {
            ext: (out / f"{stem}.{ext}").read_text(encoding="utf-8")
            for ext in ("txt", "srt", "vtt", "json")
        }
        outputs[f.name]["result"] = json.loads(outputs[f.name]["json"])
    return outputs
