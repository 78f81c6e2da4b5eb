"""One engine per model that many recordings share (see issue 13).

Placeholder with the final interface: `Engine.transcribe` is thread-safe and takes the
keyword options of `susurrus.transcribe`. Windows of concurrent calls will decode in shared
batches once the continuous-batching engine lands; until then calls run one after another.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import SusurrusError
from ..model import Whisper


class Cancelled(SusurrusError):
    """The caller cancelled a transcription (a client went away)."""


class Engine:
    def __init__(self, model: Whisper, *, max_batch: int = 8) -> None:
        self.model = model
        self.max_batch = max_batch
        self._lock = threading.Lock()

    def transcribe(
        self,
        audio: str | os.PathLike | np.ndarray,
        *,
        on_segment: Callable[[dict], None] | None = None,
        cancel: threading.Event | None = None,
        **options: Any,
    ) -> dict:
        """Transcribe one recording; `on_segment` gets each segment once it is final (from
        any thread); setting `cancel` stops the recording's decoding and raises Cancelled."""
        from ..transcribe import transcribe

        with self._lock:
            if cancel is not None and cancel.is_set():
                raise Cancelled("cancelled")
            result = transcribe(self.model, audio, **options)
        for segment in result["segments"]:
            if on_segment is not None:
                on_segment(segment)
        return result
