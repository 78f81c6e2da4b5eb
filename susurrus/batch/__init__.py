"""Archives: `susurrus batch`, many files on local worker processes or Ray actors,
resumable, with an index of every input."""

from .inputs import Item, discover
from .runner import Summary, run_batch
from .worker import WorkerConfig

__all__ = ["Item", "Summary", "WorkerConfig", "discover", "run_batch"]
