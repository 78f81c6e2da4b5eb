"""Names the reference package keeps in `whisper.utils`, so `whisper.utils.X` code keeps working."""

from .decoding import compression_ratio
from .writers import (
    ResultWriter,
    SubtitlesWriter,
    WriteJSON,
    WriteSRT,
    WriteTSV,
    WriteTXT,
    WriteVTT,
    format_timestamp,
    get_writer,
)

__all__ = [
    "ResultWriter",
    "SubtitlesWriter",
    "WriteJSON",
    "WriteSRT",
    "WriteTSV",
    "WriteTXT",
    "WriteVTT",
    "compression_ratio",
    "format_timestamp",
    "get_writer",
]
