"""susurrus: Whisper speech recognition in PyTorch, a drop-in for the `whisper` package.

The names below are imported on first use (PEP 562), not with the package: the command
line reaches its own code without loading torch first (a usage error answers at once, and
Ctrl-C during start-up is the command's to handle), and `import susurrus` stays cheap.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Each public name and the submodule it comes from.
_EXPORTS = {
    "Cancelled": "engine",
    "DecodingOptions": "decoding",
    "DecodingResult": "decoding",
    "Engine": "engine",
    "LANGUAGES": "tokenizer",
    "LiveEvent": "live",
    "LiveSession": "live",
    "ModelDimensions": "model",
    "SusurrusError": "errors",
    "TO_LANGUAGE_CODE": "tokenizer",
    "TranscribeOptions": "options",
    "Whisper": "model",
    "Worker": "engine",
    "available_models": "download",
    "decode": "decoding",
    "detect_language": "decoding",
    "get_tokenizer": "tokenizer",
    "get_writer": "writers",
    "load_audio": "audio",
    "load_model": "load",
    "log_mel_spectrogram": "features",
    "pad_or_trim": "features",
    "transcribe": "transcribe",
    "transcribe_many": "transcribe",
}

__all__ = [
    "Cancelled",
    "DecodingOptions",
    "DecodingResult",
    "Engine",
    "LANGUAGES",
    "LiveEvent",
    "LiveSession",
    "ModelDimensions",
    "SusurrusError",
    "TO_LANGUAGE_CODE",
    "TranscribeOptions",
    "Whisper",
    "Worker",
    "available_models",
    "decode",
    "detect_language",
    "get_tokenizer",
    "get_writer",
    "load_audio",
    "load_model",
    "log_mel_spectrogram",
    "pad_or_trim",
    "transcribe",
    "transcribe_many",
]


def __getattr__(name: str) -> Any:
    """A public name, or a submodule (the reference exposes whisper.audio, .utils, ...)."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("__"):
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


class _Package(types.ModuleType):
    """`susurrus.transcribe` is the function, as in the reference, though a submodule has
    that name too: importing the submodule sets the package's attribute to it, which an
    eager `from .transcribe import transcribe` used to overwrite at once."""

    @property
    def transcribe(self) -> Any:
        if "_transcribe" in self.__dict__:  # set by the caller (a test's patch)
            return self.__dict__["_transcribe"]
        return importlib.import_module(".transcribe", __name__).transcribe

    @transcribe.setter
    def transcribe(self, value: Any) -> None:
        if isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.transcribe":
            return  # the import system naming the submodule: the function keeps the name
        self.__dict__["_transcribe"] = value

    @transcribe.deleter
    def transcribe(self) -> None:
        self.__dict__.pop("_transcribe", None)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:
    from . import audio, decoding, features, model, tokenizer, utils  # noqa: F401
    from .audio import load_audio
    from .decoding import DecodingOptions, DecodingResult, decode, detect_language
    from .download import available_models
    from .engine import Cancelled, Engine, Worker
    from .errors import SusurrusError
    from .features import log_mel_spectrogram, pad_or_trim
    from .live import LiveEvent, LiveSession
    from .load import load_model
    from .model import ModelDimensions, Whisper
    from .options import TranscribeOptions
    from .tokenizer import LANGUAGES, TO_LANGUAGE_CODE, get_tokenizer
    from .transcribe import transcribe, transcribe_many
    from .writers import get_writer
