"""susurrus: Whisper speech recognition in PyTorch, a drop-in for the `whisper` package."""

# Submodules the reference exposes as attributes (whisper.utils.get_writer, ...).
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

__version__ = "0.1.0"

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
