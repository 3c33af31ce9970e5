"""Each tracker, offline, receives what the run directory records: read back from its own storage."""

import json
import time

import pytest

from gpt2.train import trainer as train
from lib.config import load_settings

# Tiny runs with an evaluation at iters 2 and 4 and a log line every iter; RA so that gates exist.
RUN = {"TRAIN_MAX_ITERS": "4", "GPT2_MAX_TIME": "0", "TRAIN_EVAL_INTERVAL": "2", "TRAIN_LOG_INTERVAL": "1",
       "ATTN_BACKEND_RA_UNIFIED": "y", "ATTN_RA_RANK": "2"}


def train_with(make_config, tmp_path, backend, extra=None):
    config = make_config({**RUN, f"TRACKING_{backend.upper()}": "y", "TRACKING_PROJECT": "tracking-test",
                          **(extra or {})})
    run_dir = tmp_path / "run"
    settings = load_settings(config, environ={})
    assert train.run(settings, config, run_dir, argv=["tests"]) == 0
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    return run_dir, settings, evals


def test_tensorboard_event_files_hold_the_run(make_config, tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                            reason="extras/tensorboard.txt is not installed")
    run_dir, settings, evals = train_with(make_config, tmp_path, "tensorboard")
    events = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    val = events.Scalars("val/loss")
    assert [e.step for e in val] == [r["iter"] for r in evals]
    assert [e.value for e in val] == pytest.approx([r["val_loss"] for r in evals], rel=1e-6)
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "perf/tokens_per_s", "gates/w_rec/layer00"} <= set(tags)
    [config] = events.Tensors("config/text_summary")
    assert settings.attention.backend in config.tensor_proto.string_val[0].decode()


def wandb_records(path):
    """The protobuf records of a .wandb file: a 7-byte file header, then a LevelDB-style log of 32 KiB blocks
    whose chunks carry a 7-byte header (crc32c, little-endian length, type: 1 full, 2 first, 3 middle, 4 last);
    a block's tail too short for a header is zero padding."""
    data, pos, pending = path.read_bytes(), 7, b""
    block = 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if left < 7 or (length == 0 and kind == 0):
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            yield pending
            pending = b""


def test_wandb_offline_run_holds_the_run(make_config, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="extras/wandb.txt is not installed")
    from wandb.proto import wandb_internal_pb2

    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    run_dir, settings, evals = train_with(make_config, tmp_path, "wandb")  # TRACKING_OFFLINE defaults to y
    assert settings.tracking.offline
    [log_file] = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    # wandb's service process may still be writing when finish() returns on a loaded machine: the log is
    # complete once it holds the run's exit record
    deadline = time.monotonic() + 60
    while True:
        records = []
        for data in wandb_records(log_file):
            records.append(wandb_internal_pb2.Record())
            records[-1].ParseFromString(data)
        kinds = [record.WhichOneof("record_type") for record in records]
        if "exit" in kinds or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    history, config = [], {}
    for record, kind in zip(records, kinds):
        if kind == "history":
            history.append({"/".join(item.nested_key) or item.key: json.loads(item.value_json)
                            for item in record.history.item})
        elif kind == "run":
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
    val = [(h["_step"], h["val/loss"]) for h in history if "val/loss" in h]
    assert val == [(r["iter"], pytest.approx(r["val_loss"], rel=1e-6)) for r in evals]
    assert any("gates/w_std/layer00" in h for h in history)
    assert config["attention"]["backend"] == settings.attention.backend


def test_trackio_local_store_holds_the_run(make_config, tmp_path, monkeypatch):
    # trackio reads TRACKIO_DIR once, when first imported: set it first, and check the store really is there
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    pytest.importorskip("trackio", reason="extras/trackio.txt is not installed")
    from trackio.sqlite_storage import SQLiteStorage

    run_dir, settings, evals = train_with(make_config, tmp_path, "trackio")
    assert SQLiteStorage.get_project_db_path("tracking-test").parent == tmp_path / "trackio"
    logs = SQLiteStorage.get_logs("tracking-test", run_dir.name)
    val = [(entry["step"], entry["val/loss"]) for entry in logs if "val/loss" in entry]
    assert val == [(r["iter"], pytest.approx(r["val_loss"], rel=1e-6)) for r in evals]
    assert any("perf/tokens_per_s" in entry for entry in logs)
    config = SQLiteStorage.get_run_config("tracking-test", run_dir.name)
    assert config["attention"]["backend"] == settings.attention.backend


def test_each_tracker_is_a_pinned_extra_installed_only_when_chosen(make_config):
    from lib.config.extras import TRACKER_EXTRAS, all_extras, needed_extras

    assert sorted(TRACKER_EXTRAS) == ["tensorboard", "trackio", "wandb"]
    assert {path for _, path in TRACKER_EXTRAS.values()} <= set(all_extras())
    for path in all_extras():
        pins = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
        assert len(pins) == 1 and "==" in pins[0], path
    assert needed_extras(load_settings(make_config(), environ={})) == []  # no tracker: nothing to install
    chosen = load_settings(make_config({"TRACKING_TENSORBOARD": "y"}, name="tb"), environ={})
    installed = __import__("importlib.util").util.find_spec("tensorboard") is not None
    assert needed_extras(chosen) == ([] if installed else [TRACKER_EXTRAS["tensorboard"][1]])
