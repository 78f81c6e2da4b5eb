"""One engine per model that many recordings share: sessions, continuous batching, resume.

- `Engine` (engine.py) owns the model and a table of decoding rows; windows of any
  recording join and leave it step by step.
- Sessions (session.py) hold one recording's progress and offer its windows.
- `Worker` (worker.py) is one thread for all torch work of engines shared by threads.
- `decoder_step` (step.py) is the single decoding step, eager or captured as a CUDA graph.
"""

from .engine import Cancelled, Engine, JobList, Source, WindowJob, decode_jobs
from .worker import Worker

__all__ = ["Cancelled", "Engine", "JobList", "Source", "WindowJob", "Worker", "decode_jobs"]
