"""Windows' audio encoded on a second thread while the engine decodes on a busy machine.

When other processes leave the engine's steps one thread (threads.py: one of two cores
taken), split between two, every product of a step would wait at a barrier for the
thread that shares its core with another process. Work that nobody waits for is
different: the scheduler shares the cores between running threads, not processes, so two
of ours that never wait for each other run on 4/3 of two cores beside one busy loop, where
one runs on one. Encoding is such work when several windows are there to encode: those
that fill an empty table (this thread takes them from the back while the engine's thread
takes them from the front, and the batch starts once all are in) and those beyond the
table's room (encoded while the table decodes; each joins once a row leaves). A recording
that offers one window at a time gets it encoded on the engine's thread, as before. Beside
a busy loop two tiny.en windows encoded at once take 269-279 ms, one alone 162-174 ms
(stop 42). On an idle machine the engine's own threads encode (a product split over both
cores is as fast, and its steps never compete with a third thread), and nothing runs here.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..decoding import _encode_if_needed
from ..model import Whisper

if TYPE_CHECKING:
    from .engine import Source, WindowJob


@dataclass(eq=False)
class Ahead:
    """A window taken from its source before the table has room for it."""

    job: WindowJob
    source: Source
    encoding: Future | None = None  # its audio being encoded on the second thread
    cancelled: bool = False  # set by another thread: the source stopped

    @property
    def fresh(self) -> bool:
        """Its audio is not encoded, nor being encoded."""
        return self.job.features is None and self.encoding is None

    @property
    def ready(self) -> bool:
        """Its audio is encoded (or failed to be: `collect` raises then)."""
        return self.job.features is not None or (
            self.encoding is not None and self.encoding.done()
        )

    def collect(self) -> None:
        """Move the second thread's result into the job (waiting for it if needed)."""
        if self.encoding is not None:
            encoding, self.encoding = self.encoding, None
            self.job.features = encoding.result()
            self.job.mel = None


class AheadEncoder:
    """One thread, started on first use, that encodes windows on one torch thread."""

    def __init__(self, model: Whisper) -> None:
        self.model = model
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self.encoded = 0  # windows encoded here, for statistics
        self._pending = 0  # windows handed over and not yet encoded

    def submit(self, job: WindowJob) -> Future:
        """Start encoding `job`'s frames; the future's result is its features."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=1,
                    thread_name_prefix="susurrus-encode",
                    # One torch thread: its products never wait for another, and it never
                    # starts an OpenMP team (see worker.py). The count is this thread's
                    # own: the engine's is left as it is.
                    initializer=torch.set_num_threads,
                    initargs=(1,),
                )
            pool = self._pool
            self._pending += 1
        return pool.submit(self._encode, job.mel)

    @property
    def idle(self) -> bool:
        """Whether the thread has no window to encode."""
        return self._pending == 0

    def _encode(self, mel: Tensor) -> Tensor:
        try:
            with torch.inference_mode():
                features = _encode_if_needed(self.model, mel[None])[0]
            self.encoded += 1  # only this thread writes it
            return features
        finally:
            with self._lock:
                self._pending -= 1

    def close(self) -> None:
        """Let the thread end once its current window (if any) is encoded."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
