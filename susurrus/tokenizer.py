"""Whisper's byte-level BPE (through tiktoken) and its special tokens.

Token ids past the BPE ranks are, in order: end of text, start of transcript, one token per
language, translate, transcribe, start of LM, start of previous text, no speech, no
timestamps, then 1501 timestamp tokens <|0.00|> ... <|30.00|> in 20 ms steps.
"""

from __future__ import annotations

import base64
import string
from dataclasses import dataclass, field
from functools import cache, cached_property
from importlib import resources

import tiktoken

from .errors import SusurrusError

# Order matters: a language's token id is its position here after <|startoftranscript|>.
LANGUAGES = {
    "en": "english", "zh": "chinese", "de": "german", "es": "spanish", "ru": "russian",
    "ko": "korean", "fr": "french", "ja": "japanese", "pt": "portuguese", "tr": "turkish",
    "pl": "polish", "ca": "catalan", "nl": "dutch", "ar": "arabic", "sv": "swedish",
    "it": "italian", "id": "indonesian", "hi": "hindi", "fi": "finnish", "vi": "vietnamese",
    "he": "hebrew", "uk": "ukrainian", "el": "greek", "ms": "malay", "cs": "czech",
    "ro": "romanian", "da": "danish", "hu": "hungarian", "ta": "tamil", "no": "norwegian",
    "th": "thai", "ur": "urdu", "hr": "croatian", "bg": "bulgarian", "lt": "lithuanian",
    "la": "latin", "mi": "maori", "ml": "malayalam", "cy": "welsh", "sk": "slovak",
    "te": "telugu", "fa": "persian", "lv": "latvian", "bn": "bengali", "sr": "serbian",
    "az": "azerbaijani", "sl": "slovenian", "kn": "kannada", "et": "estonian",
    "mk": "macedonian", "br": "breton", "eu": "basque", "is": "icelandic", "hy": "armenian",
    "ne": "nepali", "mn": "mongolian", "bs": "bosnian", "kk": "kazakh", "sq": "albanian",
    "sw": "swahili", "gl": "galician", "mr": "marathi", "pa": "punjabi", "si": "sinhala",
    "km": "khmer", "sn": "shona", "yo": "yoruba", "so": "somali", "af": "afrikaans",
    "oc": "occitan", "ka": "georgian", "be": "belarusian", "tg": "tajik", "sd": "sindhi",
    "gu": "gujarati", "am": "amharic", "yi": "yiddish", "lo": "lao", "uz": "uzbek",
    "fo": "faroese", "ht": "haitian creole", "ps": "pashto", "tk": "turkmen", "nn": "nynorsk",
    "mt": "maltese", "sa": "sanskrit", "lb": "luxembourgish", "my": "myanmar", "bo": "tibetan",
    "tl": "tagalog", "mg": "malagasy", "as": "assamese", "tt": "tatar", "haw": "hawaiian",
    "ln": "lingala", "ha": "hausa", "ba": "bashkir", "jw": "javanese", "su": "sundanese",
    "yue": "cantonese",
}  # fmt: skip

# English names (and common aliases) to codes, so `--language Chinese` works.
TO_LANGUAGE_CODE = {
    **{name: code for code, name in LANGUAGES.items()},
    "burmese": "my", "valencian": "ca", "flemish": "nl", "haitian": "ht",
    "letzeburgesch": "lb", "pushto": "ps", "panjabi": "pa", "moldavian": "ro",
    "moldovan": "ro", "sinhalese": "si", "castilian": "es", "mandarin": "zh",
}  # fmt: skip

N_TIMESTAMPS = 1501  # 0.00 .. 30.00 s in 0.02 s steps


def language_code(language: str) -> str:
    """Normalise a language code or English name ("Chinese", "zh") to its code."""
    key = language.strip().lower()
    if key in LANGUAGES:
        return key
    if key in TO_LANGUAGE_CODE:
        return TO_LANGUAGE_CODE[key]
    raise SusurrusError(
        f"unknown language {language!r}: use a code such as 'en' or 'zh', or an English name "
        "such as 'Chinese' (see `susurrus --help`)"
    )


def _load_ranks(name: str) -> dict[bytes, int]:
    path = resources.files("susurrus") / "assets" / f"{name}.tiktoken"
    ranks = {}
    for line in path.read_text(encoding="ascii").splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@cache
def get_encoding(name: str = "gpt2", num_languages: int = 99) -> tiktoken.Encoding:
    ranks = _load_ranks(name)
    specials = [
        "<|endoftext|>",
        "<|startoftranscript|>",
        *[f"<|{code}|>" for code in list(LANGUAGES)[:num_languages]],
        "<|translate|>",
        "<|transcribe|>",
        "<|startoflm|>",
        "<|startofprev|>",
        "<|nospeech|>",
        "<|notimestamps|>",
        *[f"<|{i * 0.02:.2f}|>" for i in range(N_TIMESTAMPS)],
    ]
    first = len(ranks)
    return tiktoken.Encoding(
        name=f"{name}-{num_languages}",
        explicit_n_vocab=first + len(specials),
        pat_str=r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
        mergeable_ranks=ranks,
        special_tokens={token: first + i for i, token in enumerate(specials)},
    )


@dataclass(frozen=True)
class Tokenizer:
    """Text <-> token ids, and the ids of the special tokens a decode needs."""

    encoding: tiktoken.Encoding
    num_languages: int
    language: str | None = None
    task: str | None = None
    sot_sequence: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        sequence = [self.sot]
        if self.language is not None:
            sequence.append(self.sot + 1 + list(LANGUAGES).index(self.language))
        if self.task is not None:
            sequence.append(self.transcribe if self.task == "transcribe" else self.translate)
        object.__setattr__(self, "sot_sequence", tuple(sequence))

    def encode(self, text: str, **kwargs) -> list[int]:
        return self.encoding.encode(text, **kwargs)

    def decode(self, tokens: list[int], **kwargs) -> str:
        """Text of the tokens, with timestamp tokens left out."""
        return self.encoding.decode([t for t in tokens if t < self.timestamp_begin], **kwargs)

    def decode_with_timestamps(self, tokens: list[int], **kwargs) -> str:
        """Text with timestamp tokens written in place as <|1.08|>."""
        return self.encoding.decode(tokens, **kwargs)

    def _special(self, text: str) -> int:
        return self.encoding._special_tokens[text]

    @cached_property
    def eot(self) -> int:
        return self.encoding.eot_token

    @cached_property
    def sot(self) -> int:
        return self._special("<|startoftranscript|>")

    @cached_property
    def transcribe(self) -> int:
        return self._special("<|transcribe|>")

    @cached_property
    def translate(self) -> int:
        return self._special("<|translate|>")

    @cached_property
    def sot_lm(self) -> int:
        return self._special("<|startoflm|>")

    @cached_property
    def sot_prev(self) -> int:
        return self._special("<|startofprev|>")

    @cached_property
    def no_speech(self) -> int:
        return self._special("<|nospeech|>")

    @cached_property
    def no_timestamps(self) -> int:
        return self._special("<|notimestamps|>")

    @cached_property
    def timestamp_begin(self) -> int:
        return self._special("<|0.00|>")

    @cached_property
    def language_token(self) -> int:
        if self.language is None:
            raise ValueError("this tokenizer has no language set")
        return self.to_language_token(self.language)

    def to_language_token(self, language: str) -> int:
        return self._special(f"<|{language}|>")

    @cached_property
    def all_language_tokens(self) -> tuple[int, ...]:
        return tuple(self.sot + 1 + i for i in range(self.num_languages))

    @cached_property
    def all_language_codes(self) -> tuple[str, ...]:
        return tuple(list(LANGUAGES)[: self.num_languages])

    @cached_property
    def sot_sequence_including_notimestamps(self) -> tuple[int, ...]:
        return (*self.sot_sequence, self.no_timestamps)

    @cached_property
    def non_speech_tokens(self) -> tuple[int, ...]:
        """Tokens of symbols that are not speech (music notes, brackets, ...), suppressed by
        the "-1" suppress_tokens setting so the model does not caption sounds."""
        symbols = list('"#()*+/:;<=>@[\\]^_`{|}~「」『』')
        symbols += "<< >> <<< >>> -- --- -( -[ (' (\" (( )) ((( ))) [[ ]] {{ }} ♪♪ ♪♪♪".split()
        # Single music symbols are multi-byte in UTF-8: their first byte alone already marks
        # them, so that token is suppressed even when the symbol splits into several tokens.
        music = set("♩♪♫♬♭♮♯")
        result = {self.encoding.encode(" -")[0], self.encoding.encode(" '")[0]}
        for symbol in symbols + sorted(music):
            for tokens in (self.encoding.encode(symbol), self.encoding.encode(" " + symbol)):
                if len(tokens) == 1 or symbol in music:
                    result.add(tokens[0])
        return tuple(sorted(result))

    def split_to_word_tokens(self, tokens: list[int]) -> tuple[list[str], list[list[int]]]:
        """Group tokens into words: by unicode characters for languages written without
        spaces, by leading spaces and punctuation otherwise."""
        if self.language in {"zh", "ja", "th", "lo", "my", "yue"}:
            return self.split_tokens_on_unicode(tokens)
        return self.split_tokens_on_spaces(tokens)

    def split_tokens_on_unicode(self, tokens: list[int]) -> tuple[list[str], list[list[int]]]:
        full = self.decode_with_timestamps(tokens)
        words: list[str] = []
        word_tokens: list[list[int]] = []
        current: list[int] = []
        offset = 0
        for token in tokens:
            current.append(token)
            text = self.decode_with_timestamps(current)
            # A token that ends mid-character decodes to U+FFFD; wait for the rest of it,
            # unless the full text really contains a replacement character there.
            if "\ufffd" not in text or full[offset + text.index("\ufffd")] == "\ufffd":
                words.append(text)
                word_tokens.append(current)
                current = []
                offset += len(text)
        return words, word_tokens

    def split_tokens_on_spaces(self, tokens: list[int]) -> tuple[list[str], list[list[int]]]:
        subwords, subword_tokens = self.split_tokens_on_unicode(tokens)
        words: list[str] = []
        word_tokens: list[list[int]] = []
        for subword, pieces in zip(subwords, subword_tokens):
            special = pieces[0] >= self.eot
            starts_word = subword.startswith(" ")
            # A substring test, as the reference: whitespace-only pieces count as punctuation.
            is_punct = subword.strip() in string.punctuation
            if special or starts_word or is_punct or not words:
                words.append(subword)
                word_tokens.append(list(pieces))
            else:
                words[-1] += subword
                word_tokens[-1].extend(pieces)
        return words, word_tokens


@cache
def get_tokenizer(
    multilingual: bool,
    *,
    num_languages: int = 99,
    language: str | None = None,
    task: str | None = None,
) -> Tokenizer:
    """The tokenizer of a multilingual or English-only model.

    English-only models have no language or task tokens in their start sequence.
    """
    if language is not None:
        language = language_code(language)
    if multilingual:
        encoding_name = "multilingual"
        language = language or "en"
        task = task or "transcribe"
    else:
        encoding_name = "gpt2"
        language = None
        task = None
    encoding = get_encoding(encoding_name, num_languages)
    return Tokenizer(encoding, num_languages=num_languages, language=language, task=task)
