"""Prometheus metrics of one server (its own registry, so several apps can share a process)."""

from __future__ import annotations

import threading
import time

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: F401 (re-exported)
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self, max_batch: int) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.max_batch = max_batch
        self.requests = Counter(
            "susurrus_requests",
            "HTTP API requests by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.audio_seconds = Counter(
            "susurrus_audio_seconds", "Seconds of audio transcribed", registry=r
        )
        self.cancelled = Counter(
            "susurrus_sessions_cancelled",
            "Sessions cancelled (client gone or shutdown)",
            registry=r,
        )
        self.rejected = Counter(
            "susurrus_requests_rejected", "Requests refused with 429 (queue full)", registry=r
        )
        self.latency = Histogram(
            "susurrus_request_seconds",
            "Seconds from upload received to result",
            buckets=(0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.sessions = Gauge("susurrus_sessions", "Sessions admitted and not finished", registry=r)
        self.queue = Gauge(
            "susurrus_queue_length", "Sessions waiting beyond the engine's batch", registry=r
        )
        self.occupancy = Gauge(
            "susurrus_batch_occupancy",
            "Share of the engine's batch slots the running sessions can fill (0-1)",
            registry=r,
        )
        self.rtf = Gauge(
            "susurrus_realtime_factor",
            "Audio seconds transcribed per second the server was busy (all sessions together)",
            registry=r,
        )
        self.models = Gauge("susurrus_models_loaded", "Models in memory", registry=r)
        self.engine_windows = Gauge(
            "susurrus_engine_windows",
            "Windows decoding in the engine's table now, per model",
            ["model"],
            registry=r,
        )
        self.engine_steps = Gauge(
            "susurrus_engine_steps",
            "Decoding steps the model's engine has run",
            ["model"],
            registry=r,
        )
        self.engine_rows = Gauge(
            "susurrus_engine_row_steps",
            "Rows advanced by those steps (row_steps / steps: the mean batch)",
            ["model"],
            registry=r,
        )
        self.engine_ahead = Gauge(
            "susurrus_engine_encoded_ahead",
            "Windows the model's engine encoded on its second thread (another process "
            "took a core)",
            ["model"],
            registry=r,
        )
        self.engine_lane = Gauge(
            "susurrus_engine_lane_steps",
            "Of those steps, the ones of the engine's second lane (a table stepped by a "
            "thread of its own while another process takes a core)",
            ["model"],
            registry=r,
        )
        self._lock = threading.Lock()
        self._busy_since: float | None = None
        self._busy_total = 0.0
        self._audio_total = 0.0
        self._active = 0

    def session_started(self) -> None:
        with self._lock:
            if self._active == 0:
                self._busy_since = time.monotonic()
            self._active += 1
            self._update()

    def session_ended(self, audio_seconds: float | None) -> None:
        with self._lock:
            self._active -= 1
            if audio_seconds:
                self._audio_total += audio_seconds
                self.audio_seconds.inc(audio_seconds)
            if self._active == 0 and self._busy_since is not None:
                self._busy_total += time.monotonic() - self._busy_since
                self._busy_since = None
            self._update()

    @property
    def active(self) -> int:
        return self._active

    def _update(self) -> None:
        self.sessions.set(self._active)
        self.queue.set(max(0, self._active - self.max_batch))
        self.occupancy.set(min(self._active, self.max_batch) / self.max_batch)

    def engines(self, stats: dict[str, dict[str, int]]) -> None:
        """The engines' own counts, by model name."""
        for name, values in stats.items():
            self.engine_windows.labels(name).set(values["windows"])
            self.engine_steps.labels(name).set(values["steps"])
            self.engine_rows.labels(name).set(values["row_steps"])
            self.engine_ahead.labels(name).set(values["encoded_ahead"])
            self.engine_lane.labels(name).set(values["lane_steps"])

    def render(self) -> bytes:
        with self._lock:
            busy = self._busy_total
            if self._busy_since is not None:
                busy += time.monotonic() - self._busy_since
            self.rtf.set(self._audio_total / busy if busy > 0 else 0.0)
        return generate_latest(self.registry)
