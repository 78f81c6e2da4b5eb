import json
from pathlib import Path

import pytest

from susurrus import LANGUAGES, SusurrusError, get_tokenizer
from susurrus.engine.search import suppress_tokens
from susurrus.load import embedded_model_files
from susurrus.tokenizer import language_code


def embedded_dir(name: str) -> Path:
    files = embedded_model_files(name)
    if files is None:
        pytest.skip(f"embedded model {name} is not installed")
    return files[1]


def test_multilingual_special_tokens():
    tok = get_tokenizer(True, num_languages=99, language="zh", task="transcribe")
    assert (tok.eot, tok.sot) == (50257, 50258)
    assert tok.sot_sequence == (50258, 50260, 50359)
    assert (tok.translate, tok.transcribe, tok.sot_lm, tok.sot_prev) == (50358, 50359, 50360, 50361)
    assert (tok.no_speech, tok.no_timestamps, tok.timestamp_begin) == (50362, 50363, 50364)
    assert len(tok.all_language_tokens) == 99
    assert tok.encoding.n_vocab == 51865


def test_large_v3_has_one_more_language():
    tok = get_tokenizer(True, num_languages=100, language="yue")
    assert tok.language_token == 50358
    assert tok.timestamp_begin == 50365


def test_english_only_special_tokens():
    tok = get_tokenizer(False, num_languages=99, language="fr", task="translate")
    assert tok.language is None and tok.sot_sequence == (50257,)
    assert (tok.eot, tok.no_timestamps, tok.timestamp_begin) == (50256, 50362, 50363)
    assert tok.encoding.n_vocab == 51864


@pytest.mark.parametrize("name,multilingual", [("base", True), ("tiny.en", False)])
def test_specials_match_shipped_vocabulary(name, multilingual):
    """Our special-token table agrees line for line with the model package's vocabulary."""
    vocab = (embedded_dir(name) / "vocabulary.txt").read_text(encoding="utf-8").split("\n")
    tok = get_tokenizer(multilingual, num_languages=99)
    for token_id in range(tok.eot, tok.encoding.n_vocab):
        ours = tok.encoding.decode_single_token_bytes(token_id).decode()
        # Older exports name two tokens differently: <|nocaptions|> and Hebrew as <|iw|>.
        expected = vocab[token_id].replace("<|nocaptions|>", "<|nospeech|>")
        expected = expected.replace("<|iw|>", "<|he|>")
        assert ours == expected, token_id


@pytest.mark.parametrize("name,multilingual", [("base", True), ("tiny.en", False)])
def test_suppressed_tokens_match_model_config(name, multilingual):
    config = json.loads((embedded_dir(name) / "config.json").read_text())
    tok = get_tokenizer(multilingual, num_languages=99)
    assert suppress_tokens(tok, "-1") == sorted(config["suppress_ids"])
    assert tok.encode(" ") + [tok.eot] == sorted(config["suppress_ids_begin"])
    if multilingual:
        assert list(tok.all_language_tokens) == config["lang_ids"]


def test_encode_decode_and_timestamps():
    tok = get_tokenizer(True, language="en")
    text = " And so my fellow Americans, 你好世界!"
    assert tok.decode(tok.encode(text)) == text
    tokens = [tok.timestamp_begin, *tok.encode(" Hello"), tok.timestamp_begin + 54]
    assert tok.decode(tokens) == " Hello"
    assert tok.decode_with_timestamps(tokens) == "<|0.00|> Hello<|1.08|>"


def test_language_names_and_codes():
    assert len(LANGUAGES) == 100
    assert language_code("Chinese") == "zh"
    assert language_code("mandarin") == "zh"
    assert language_code("EN") == "en"
    with pytest.raises(SusurrusError, match="unknown language 'Klingon'"):
        language_code("Klingon")


def test_word_splitting():
    tok = get_tokenizer(True, language="en")
    words, tokens = tok.split_to_word_tokens(tok.encode(" Hello, world's end.") + [tok.eot])
    assert words == [" Hello", ",", " world's", " end", ".", "<|endoftext|>"]
    assert sum(len(t) for t in tokens) == len(tok.encode(" Hello, world's end.")) + 1
    zh = get_tokenizer(True, language="zh")
    # Without spaces, every token that completes characters is a word of its own.
    words, _ = zh.split_to_word_tokens(zh.encode("你好世界"))
    assert words == ["你好", "世界"]
    partial = zh.encode("♪")  # one character in several byte-level tokens
    words, tokens = zh.split_to_word_tokens(partial)
    assert words == ["♪"] and tokens == [partial]
