"""Which models a request may name, and one shared Engine per loaded model."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..download import available_models
from ..engine import Engine, Worker
from ..errors import SusurrusError
from ..load import EMBEDDED
from .formats import ApiError
from .settings import Settings, is_repo_id

if TYPE_CHECKING:
    from ..model import Whisper

log = logging.getLogger("susurrus.server")

# What tools written for OpenAI send: the server's default model.
OPENAI_ALIASES = ("whisper-1",)


@dataclass
class Loaded:
    engine: Engine
    multilingual: bool
    last_used: float = field(default_factory=time.monotonic)
    sessions: int = 0


class ModelManager:
    """Loads models on first use, shares one Engine per model, unloads idle ones.

    One worker thread loads every model and steps every engine: the request threads only
    wait for it, so the process keeps a single OpenMP team (see engine/worker.py)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.worker = Worker()
        self._loaded: dict[str, Loaded] = {}
        self._loading: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def registry(self) -> list[str]:
        names = list(EMBEDDED) + [n for n in available_models() if n not in EMBEDDED]
        return [*self.settings.model_dirs, *names]

    def resolve(self, requested: str | None) -> str:
        """The canonical name of a requested model; ApiError 404 when it may not be served.

        A name is a registry name, a configured directory's name or a hub repo id; a path the
        client sends is never opened.
        """
        name = (requested or "").strip()
        if not name or name in OPENAI_ALIASES:
            return self.settings.model
        if name in self.settings.model_dirs or name in self.registry():
            return name
        if self.settings.allow_hub and is_repo_id(name):
            return name
        raise ApiError(
            404,
            f"The model '{name[:100]}' does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
        )

    def loaded(self) -> dict[str, Loaded]:
        with self._lock:
            return dict(self._loaded)

    def acquire(self, name: str) -> Loaded:
        """The model's engine, loading it first if needed (blocking); pair with release()."""
        with self._lock:
            entry = self._loaded.get(name)
            if entry is not None:
                entry.sessions += 1
                entry.last_used = time.monotonic()
                return entry
            loading = self._loading.setdefault(name, threading.Lock())
        with loading:  # one load per model, however many requests wait for it
            with self._lock:
                entry = self._loaded.get(name)
            if entry is None:
                entry = self._load(name)
            with self._lock:
                self._loaded[name] = entry
                entry.sessions += 1
                entry.last_used = time.monotonic()
                self._loading.pop(name, None)
            return entry

    def release(self, entry: Loaded) -> None:
        with self._lock:
            entry.sessions -= 1
            entry.last_used = time.monotonic()

    def _load(self, name: str) -> Loaded:
        model = self.worker.call(self._read_model, name)
        return Loaded(
            Engine(model, max_batch=self.settings.max_batch, worker=self.worker),
            model.is_multilingual,
        )

    def _read_model(self, name: str) -> Whisper:
        """The model, on the worker's thread (loading measures kernels with torch)."""
        from ..load import load_model

        s = self.settings
        started = time.monotonic()
        try:
            if name in s.model_dirs:
                model = load_model(s.model_dirs[name], device=s.device, compute_type=s.compute_type)
            elif name in self.registry():
                model = load_model(
                    name,
                    device=s.device,
                    download_root=s.download_root,
                    compute_type=s.compute_type,
                )
            else:
                from ..load import load_hub_model

                model = load_hub_model(
                    name, device=s.device, cache_dir=s.download_root, compute_type=s.compute_type
                )
        except SusurrusError as exc:
            log.warning("cannot load model %s: %s", name, exc)
            raise ApiError(
                404 if is_repo_id(name) else 500,
                f"The model '{name}' could not be loaded.",
                type="invalid_request_error" if is_repo_id(name) else "server_error",
                param="model",
                code="model_not_found" if is_repo_id(name) else None,
            ) from None
        model.name = name
        log.info("loaded model %s in %.1f s", name, time.monotonic() - started)
        return model

    def unload_idle(self, now: float | None = None) -> list[str]:
        """Unload models idle longer than the TTL; the names unloaded."""
        ttl = self.settings.model_ttl
        if not ttl:
            return []
        now = time.monotonic() if now is None else now
        gone = []
        with self._lock:
            for name, entry in list(self._loaded.items()):
                if entry.sessions == 0 and now - entry.last_used > ttl:
                    del self._loaded[name]
                    gone.append(name)
        for name in gone:
            log.info("unloaded model %s after %.0f s idle", name, ttl)
        return gone

    def unload_all(self) -> None:
        with self._lock:
            self._loaded.clear()

    def close(self) -> None:
        """Unload every model and stop the worker thread (requests have ended)."""
        self.unload_all()
        self.worker.close()
