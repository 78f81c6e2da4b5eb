"""One engine per model that many recordings share: sessions, continuous batching, resume.

- `Engine` (engine.py) owns the model and a table of decoding rows; windows of any
  recording join and leave it step by step.
- Sessions (session.py) hold one recording's progress and offer its windows.
- `decoder_step` (step.py) is the single decoding step, eager or captured as a CUDA graph.
"""

from .engine import Cancelled, Engine, JobList, Source, WindowJob, decode_jobs

__all__ = ["Cancelled", "Engine", "JobList", "Source", "WindowJob", "decode_jobs"]
