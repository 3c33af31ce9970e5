"""Streamed-data preparation: the offline failure, the OpenWebText parquet export, parallel shards, resume.

No test reaches the hub. The offline tests point the real entry point at an endpoint that refuses
connections (or at offline mode) with an empty Hugging Face cache; the rest stream local rows through
the same code path: a synthetic stream (gpt2/data/synthetic.py) or a local copy of a hub repository.
"""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from gpt2.data import prepare as gd
from gpt2.data import shards as gs
from gpt2.data import streamed
from gpt2.data.splits import cut_stream, write_range
from gpt2.data.streamed import STREAMED_DATASETS, load_stream
from gpt2.data.synthetic import rows_of, varied_documents
from gpt2.data.tokenizer import get_tokenizer
from gpt2.settings import DataSettings

REPO_ROOT = Path(__file__).resolve().parents[1]
WEB_DOCS = REPO_ROOT / "tests" / "fixtures" / "web_docs.jsonl"
EOT = 50256
N_DOCS, CAP, SHARD_CHARS = 2000, 60_000, 3000  # about 90k tokens of stream, 100 shards used
VAL_CAP = round(CAP / 9)


def web_docs():
    return [json.loads(line)["text"] for line in WEB_DOCS.read_text().splitlines()]


def synthetic_stream(spec):
    return rows_of(varied_documents(web_docs(), N_DOCS))


def streamed_settings(data_dir, workers, dataset="fineweb-edu", cap=CAP):
    return DataSettings(dataset=dataset, tokenizer="gpt2", data_dir=str(data_dir), token_cap=cap, prep_workers=workers)


def read_bins(path):
    return {split: (Path(path) / f"{split}.bin").read_bytes() for split in gd.SPLITS}


def encode_stream(docs):
    """The stream's token ids (each document + end-of-text) and where each document ends."""
    enc = get_tokenizer("gpt2")
    stream, ends = [], []
    for doc in docs:
        stream.extend(enc.encode(doc) + [EOT])
        ends.append(len(stream))
    return stream, ends


def reference_splits(encoded, cap, val_cap):
    """Train and val ids as the split rule states them, one document at a time: train = the first cap
    tokens; val = val_cap tokens from the end of the document that train cut."""
    stream, ends = encoded
    val_begin = next(end for end in ends if end >= cap)
    return stream[:cap], stream[val_begin : val_begin + val_cap]


@pytest.fixture(scope="module")
def reference():
    train, val = reference_splits(encode_stream(varied_documents(web_docs(), N_DOCS)), CAP, VAL_CAP)
    return {"train": np.asarray(train, np.uint16).tobytes(), "val": np.asarray(val, np.uint16).tobytes()}


# ----------------------------------------------------------------------------- offline (issue 14)


@pytest.mark.parametrize("dataset, env, culprit", [
    ("fineweb-edu", {"HF_ENDPOINT": "http://127.0.0.1:9"},
     "cannot reach http://127.0.0.1:9 to stream HuggingFaceFW/fineweb-edu (ConnectError"),
    ("openwebtext", {"HF_HUB_OFFLINE": "1"},
     "cannot stream Skylion007/openwebtext@refs/convert/parquet from https://huggingface.co: offline mode is on"),
])
def test_unreachable_hub_fails_fast_in_one_line(make_config, tmp_path, dataset, env, culprit):
    flag = {"fineweb-edu": "DATASET_FINEWEB_EDU", "openwebtext": "DATASET_OPENWEBTEXT"}[dataset]
    config = make_config({flag: "y", "TOKENIZER_GPT2": "y", "DATA_TOKEN_CAP": "10000",
                          "DATA_DIR": str(tmp_path / "data")}, tiny=False)
    hf_home = tmp_path / "hf"  # an empty cache: nothing to fall back on
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    run_env.update(HF_HOME=str(hf_home), **env)
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "scripts.prepare_data", "--config", str(config)],
                            cwd=REPO_ROOT, capture_output=True, text=True, env=run_env, timeout=300)
    elapsed = time.monotonic() - started
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    out_dir = tmp_path / "data" / f"{dataset}-gpt2-cap10000"
    assert result.returncode == 2
    assert len(lines) == 1, result.stderr  # no traceback, no retry chatter
    assert lines[0].startswith(f"error: {culprit}")
    assert f"copy its {out_dir}/ to the same path here" in lines[0] and "DATASET_SHAKESPEARE" in lines[0]
    assert "Retrying" not in result.stderr and elapsed < 60  # datasets' own retries alone take 25 s
    assert sorted(p.name for p in out_dir.iterdir()) == [".prepare.lock"]  # no half-written bins, no shards


# ----------------------------------------------------------------------------- OpenWebText (issue 14)


def test_openwebtext_reads_the_hub_parquet_export_layout(tmp_path):
    """The spec names the hub's parquet export (datasets 5 refuses the script on main); a local copy of that
    repository layout, holding OpenWebText's one column, streams through the same load_stream call."""
    spec = STREAMED_DATASETS["openwebtext"]
    assert (spec.hub_path, spec.revision, spec.text_column) == ("Skylion007/openwebtext", "refs/convert/parquet", "text")
    import pyarrow as pa
    import pyarrow.parquet as pq

    mirror = tmp_path / "openwebtext"
    (mirror / "plain_text" / "partial-train").mkdir(parents=True)
    docs = web_docs()
    for shard in range(3):  # the export's file names: 0000.parquet, 0001.parquet, ...
        pq.write_table(pa.table({"text": docs[shard * 8 : shard * 8 + 8]}),
                       mirror / "plain_text" / "partial-train" / f"{shard:04d}.parquet")
    (mirror / "README.md").write_text("a file the export does not match\n")

    def local_export(spec):
        return load_stream(replace(spec, hub_path=str(mirror)))

    path = gd.prepare(streamed_settings(tmp_path / "data", 1, "openwebtext", cap=300), open_stream=local_export)
    train, val = reference_splits(encode_stream(docs), 300, 33)
    assert np.fromfile(path / "train.bin", np.uint16).tolist() == train
    assert np.fromfile(path / "val.bin", np.uint16).tolist() == val
    assert gd.load_meta(path)["source"]["revision"] == "refs/convert/parquet"


# ----------------------------------------------------------------------------- parallel shards (issue 17)


def test_parallel_preparation_writes_the_bytes_of_one_process(tmp_path, reference):
    one = gd.prepare(streamed_settings(tmp_path / "one", 1), open_stream=synthetic_stream, shard_chars=SHARD_CHARS)
    many = gd.prepare(streamed_settings(tmp_path / "many", 3), open_stream=synthetic_stream, shard_chars=SHARD_CHARS)
    assert read_bins(one) == read_bins(many) == reference
    meta_one, meta_many = gd.load_meta(one), gd.load_meta(many)
    assert meta_one.pop("preparation")["workers"] == 1 and meta_many.pop("preparation")["workers"] == 3
    assert meta_one == meta_many
    assert meta_one["documents"]["train"] + meta_one["documents"]["val"] < N_DOCS  # the stream was not exhausted
    assert not (one / gd.SHARD_DIR).exists() and not (many / gd.SHARD_DIR).exists()  # removed once the bins exist


def process_group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_killed_preparation_resumes_with_the_same_bytes(tmp_path, reference):
    data_dir = tmp_path / "data"
    shard_dir = gd.output_dir(streamed_settings(data_dir, 2)) / gd.SHARD_DIR
    # The stream is slowed (2 ms a document) so that the kill lands mid-way.
    child = f"""
import json, sys, time
from gpt2.data import prepare as gd
from gpt2.data.synthetic import rows_of, varied_documents
from gpt2.settings import DataSettings
base = [json.loads(line)["text"] for line in open({str(WEB_DOCS)!r})]
def slow_stream(spec):
    for row in rows_of(varied_documents(base, {N_DOCS})):
        time.sleep(0.002)
        yield row
data = DataSettings(dataset="fineweb-edu", tokenizer="gpt2", data_dir={str(data_dir)!r}, token_cap={CAP}, prep_workers=2)
gd.prepare(data, open_stream=slow_stream, shard_chars={SHARD_CHARS})
"""
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=REPO_ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while len(list(shard_dir.glob("[0-9]*.json"))) < 20:
            assert proc.poll() is None, f"the preparation ended before it was killed: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "no shards finished in time"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # kill -9 the preparation itself, not its workers
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while process_group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not process_group_alive(proc.pid), "tokenizer workers outlived the killed preparation"
    finally:
        if process_group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.stderr.close()
    killed_at = len(list(shard_dir.glob("[0-9]*.json")))
    assert not (shard_dir.parent / "meta.json").exists() and not (shard_dir.parent / "train.bin").exists()

    path = gd.prepare(streamed_settings(data_dir, 2), open_stream=synthetic_stream, shard_chars=SHARD_CHARS)
    assert read_bins(path) == reference
    meta = gd.load_meta(path)
    done = meta["preparation"]
    assert done["shards_reused"] >= 20 and done["shards_reused"] <= killed_at
    assert done["documents_tokenized"] < meta["documents"]["train"] + meta["documents"]["val"]


def test_connection_lost_mid_stream_keeps_the_finished_shards(tmp_path, reference, monkeypatch, capsys):
    def dying_hub(spec):  # the hub opener's wrapper around rows whose connection breaks after 900 documents
        def rows():
            yield from list(synthetic_stream(spec))[:900]
            raise ConnectionResetError(104, "Connection reset by peer")
        return streamed._network_errors_as_unavailable(rows(), "https://hub while streaming corpus", (OSError,))

    data = streamed_settings(tmp_path / "data", 1)
    with pytest.raises(streamed.StreamUnavailable) as failure:
        gd.prepare(data, open_stream=dying_hub, shard_chars=SHARD_CHARS)
    finished = len(list((gd.output_dir(data) / gd.SHARD_DIR).glob("[0-9]*.json")))
    assert str(failure.value).startswith("lost the connection to https://hub while streaming corpus, after 900 "
                                         "documents (ConnectionResetError: [Errno 104] Connection reset by peer); "
                                         f"connect to the network and rerun (the {finished} finished shards are kept)")
    assert finished > 10 and not (gd.output_dir(data) / "train.bin").exists()

    monkeypatch.setattr(gs, "PROGRESS_INTERVAL_S", 0.0)  # a line per shard (stderr is no terminal here)
    path = gd.prepare(data, open_stream=synthetic_stream, shard_chars=SHARD_CHARS)
    assert read_bins(path) == reference and gd.load_meta(path)["preparation"]["shards_reused"] == finished
    lines = capsys.readouterr().err.splitlines()
    assert any(line.startswith("fineweb-edu: ") and " tokens/s, ETA " in line for line in lines)
    assert f"reused {finished} finished shards" in lines[-1] and "tokens/s" in lines[-1]


def test_changed_stream_retokenizes_only_the_changed_shards(tmp_path):
    plan = {"test": 1}
    store = gs.ShardStore(tmp_path / "shards", plan, np.uint16)
    store.open()
    docs = list(varied_documents(web_docs(), 60))

    def build(texts, workers=1):
        with gs.TokenizerPool("gpt2", workers) as pool:
            return gs.build_shards(iter(texts), store, pool, shard_chars=1000, need_tokens=10**9,
                                   enough=lambda records: False)

    first, stats = build(docs)
    assert stats.shards_tokenized == len(first) > 3 and stats.shards_reused == 0
    changed = list(docs)
    edited_doc = len(docs) // 2
    changed[edited_doc] = changed[edited_doc].replace("Document", "document", 1)  # same length: same shard cuts
    second, stats = build(changed, workers=2)
    assert stats.shards_tokenized == 1 and stats.shards_reused == len(first) - 1
    docs_before = np.cumsum([0] + [r.documents for r in first])
    edited_shard = int(np.searchsorted(docs_before, edited_doc, side="right")) - 1
    assert [i for i, (a, b) in enumerate(zip(first, second)) if a != b] == [edited_shard]
    gs.ShardStore(tmp_path / "shards", {"test": 2}, np.uint16).open()  # another plan: the shards are not its own
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [gs.PLAN_FILE]


def test_cut_follows_the_split_rule_at_every_cap(tmp_path):
    """Every cap from 1 to past the stream's end: train, val and the document counts agree with the rule
    applied one document at a time, whichever shard the cut and the val end fall in."""
    docs = list(varied_documents(web_docs(), 8))
    store = gs.ShardStore(tmp_path / "shards", {}, np.uint16)
    store.open()
    with gs.TokenizerPool("gpt2", 1) as pool:
        records, _ = gs.build_shards(iter(docs), store, pool, shard_chars=300, need_tokens=10**9,
                                     enough=lambda records: False)
    total = sum(r.tokens for r in records)
    assert len(records) >= 4
    encoded = encode_stream(docs)
    ends = np.asarray(encoded[1])
    for cap in range(1, total + 3):
        for val_cap in (1, 40):
            cut = cut_stream(records, store, EOT, cap, val_cap, final=True)
            if cap >= total:
                assert cut.tokens["val"] == 0 and cut.tokens["train"] == total
                continue
            train, val = reference_splits(encoded, cap, val_cap)
            write_range(records, store, cut.train, tmp_path / "train.bin")
            write_range(records, store, cut.val, tmp_path / "val.bin")
            assert np.fromfile(tmp_path / "train.bin", np.uint16).tolist() == train
            assert np.fromfile(tmp_path / "val.bin", np.uint16).tolist() == val
            val_begin = cut.val[0]
            assert cut.documents["train"] == int(np.searchsorted(ends, cap)) + 1
            assert cut.documents["val"] == len({int(np.searchsorted(ends, p, side="right"))
                                                for p in range(val_begin, val_begin + len(val))})
            whole = cut_stream(records, store, EOT, cap, val_cap, final=False)
            assert whole == (cut if val_begin + val_cap <= total else None)


def worker_tokenizers():
    return sorted(gs._tokenizers)


def test_pool_processes_start_with_the_tokenizer_before_any_shard():
    while multiprocessing.active_children():  # an earlier test's pool, still exiting
        time.sleep(0.05)
    with gs.TokenizerPool("gpt2", 2) as pool:
        assert len(multiprocessing.active_children()) == 2  # started on entry, not by the first shard
        answers = [pool.executor.submit(worker_tokenizers).result(timeout=120) for _ in range(4)]
    assert answers == [["gpt2"]] * 4  # each loaded the BPE as it started, though no shard ever reached it


def test_no_shard_is_written_once_build_shards_returns(tmp_path):
    """Past the end, the shards not started are cancelled and the running ones finish before build_shards
    returns (the pool does not wait for its processes to exit), so the caller may cut and remove the store."""
    store = gs.ShardStore(tmp_path / "shards", {}, np.uint16)
    store.open()
    docs = list(varied_documents(web_docs(), 4000))  # about 600k characters: 4 shards
    with gs.TokenizerPool("gpt2", 2) as pool:
        records, stats = gs.build_shards(iter(docs), store, pool, shard_chars=150_000, need_tokens=10**9,
                                         enough=lambda records: True)
        written = sorted(path.name for path in store.directory.iterdir())
        time.sleep(1.0)  # a shard takes about 0.05 s: one still running would land meanwhile
        assert sorted(path.name for path in store.directory.iterdir()) == written
    assert len(records) == stats.shards_tokenized == 1
    assert not [name for name in written if name.endswith(".tmp")]
    assert {name[:-4] for name in written if name.endswith(".bin")} == {name[:-5] for name in written
                                                                      if name.endswith(".json") and name[0] != "p"}


def test_worker_count_setting():
    assert gs.resolve_workers(0) == gs.usable_cores() >= 1
    assert gs.resolve_workers(3) == 3
    with pytest.raises(ValueError, match="CONFIG_DATA_PREP_WORKERS=-1 must be 0"):
        gs.resolve_workers(-1)
    assert 1 << 20 == gs.default_shard_chars(10_000) < gs.default_shard_chars(10**9) <= 1 << 24


def test_synthetic_documents_are_deterministic_and_distinct():
    first = list(varied_documents(web_docs(), 100))
    assert first == list(varied_documents(web_docs(), 100))
    assert len(set(first)) == 100
