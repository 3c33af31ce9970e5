"""The tokenizer of a run or an export, and the GPT-2 BPE as Hugging Face tokenizer files.

An export names its tokenizer in export.json ({"name": "gpt2"} or {"name": "char", "chars": "..."}), so it
is usable without the run's data directory. For GPT-2 BPE it also writes vocab.json + merges.txt +
tokenizer_config.json, which transformers' AutoTokenizer reads. Those are rebuilt from the same hash-checked
merge ranks our tokenizer uses (gpt2/data/tokenizer.py), in GPT-2's published format:

    vocab.json   token -> id, each token's bytes spelled with GPT-2's printable byte alphabet (bytes_to_unicode)
    merges.txt   the 50000 merges in rank order; the merge that makes token t is the split of t that BPE reaches
                 using only the merges ranked below t (BPE always ends a token's encoding with its own merge)

The char tokenizer has no Hugging Face counterpart: its export carries the character string instead.
"""

import json
from pathlib import Path

from gpt2.data.prepare import load_meta, output_dir
from gpt2.data.tokenizer import BPE_FILE_SHA256, GPT2_EOT_TOKEN, get_tokenizer, gpt2_bpe_path
from gpt2.io import REPO_ROOT

EOT_TEXT = "<|endoftext|>"


def tokenizer_record(settings) -> dict:
    """What an export writes about the run's tokenizer; the char vocabulary comes from the prepared data's
    meta.json (the only place it is kept)."""
    if settings.data.tokenizer == "gpt2":
        return {"name": "gpt2", "vocab_size": GPT2_EOT_TOKEN + 1, "eot_token": GPT2_EOT_TOKEN}  # eot: the last id
    data_path = output_dir(settings.data)
    if not data_path.is_absolute():
        data_path = REPO_ROOT / data_path  # relative paths in a configuration start at the checkout
    try:
        chars = load_meta(data_path)["chars"]
    except (FileNotFoundError, KeyError):
        raise ValueError(f"{data_path / 'meta.json'}: the char vocabulary of this run is missing; prepare its "
                         f"data again (make data with the run's config)") from None
    return {"name": "char", "vocab_size": len(chars), "eot_token": None, "chars": chars}


def tokenizer_from_record(record: dict):
    """The tokenizer an export.json record (or tokenizer_record) describes."""
    return get_tokenizer(record["name"], chars=record.get("chars"))


def bytes_to_unicode() -> dict:
    """GPT-2's byte -> printable character map: printable Latin-1 bytes map to themselves, the other 68 bytes
    to U+0100.. in byte order (so vocab.json never holds whitespace or control characters)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = (b for b in range(256) if b not in printable)
    mapping = {b: chr(b) for b in printable}
    mapping.update({b: chr(256 + n) for n, b in enumerate(extra)})
    return mapping


def _last_merge(token: bytes, rank: int, ranks: dict) -> tuple:
    """(left, right): byte-level BPE of `token` with only the merges ranked below `rank`, which stops at two parts."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        candidates = [(ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1)]
        best, i = min(candidates)
        if best >= rank:
            raise ValueError(f"BPE ranks are inconsistent at token {token!r} (rank {rank})")
        parts[i: i + 2] = [parts[i] + parts[i + 1]]
    return parts[0], parts[1]


def write_gpt2_tokenizer_files(directory: Path, model_max_length: int) -> list:
    """vocab.json, merges.txt and tokenizer_config.json for GPT-2 BPE into `directory`; returns their names."""
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(gpt2_bpe_path()), expected_hash=BPE_FILE_SHA256)
    spell = bytes_to_unicode()
    text = {token: "".join(spell[b] for b in token) for token in ranks}
    vocab = {text[token]: rank for token, rank in ranks.items()}
    vocab[EOT_TEXT] = GPT2_EOT_TOKEN
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            left, right = _last_merge(token, rank, ranks)
            merges.append(f"{text[left]} {text[right]}")
    directory = Path(directory)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": model_max_length, "bos_token": EOT_TEXT,
              "eos_token": EOT_TEXT, "unk_token": EOT_TEXT, "add_prefix_space": False, "add_bos_token": False}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return ["vocab.json", "merges.txt", "tokenizer_config.json"]
