"""Checkpoints and run-directory files: exact resume, refusal of corrupt or mismatched checkpoints, atomic writes."""

import io
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

from conftest import keep_checkpoint_at
from gpt2.train import checkpoint as ckpt
from gpt2.train import trainer as train
from gpt2 import io as runs
from gpt2.train import run_dir as run_dirs
from lib.config import load_settings
from gpt2.io import read_jsonl


def train_in_process(config, run_dir, resume=False, environ=None):
    settings = load_settings(config, environ=environ or {})
    return train.run(settings, config, run_dir, resume=resume, argv=["tests"])


def metrics(run_dir):
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def test_interrupted_and_resumed_run_matches_uninterrupted(make_config, tmp_path, monkeypatch):
    """Kill-and-resume is exact: the run resumed from the iter-6 checkpoint ends bit-identical to the straight run."""
    config = make_config({"TRAIN_MAX_ITERS": "12", "TRAIN_CHECKPOINT_INTERVAL": "6", "TRAIN_EVAL_INTERVAL": "4",
                          "MODEL_DROPOUT": "0.1", "OPTIMIZER_ADAMW_SPAM": "y", "OPT_SPAM_RESET_INTERVAL": "5",
                          "OPT_SPAM_WARMUP": "2"})
    saved_mid = tmp_path / "mid.pt"
    keep_checkpoint_at(monkeypatch, 6, saved_mid)
    straight = tmp_path / "straight"
    assert train_in_process(config, straight) == 0
    monkeypatch.undo()

    # The "crashed" run: its directory as it was after the iter-6 checkpoint.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(straight / "config", resumed / "config")
    shutil.copy(saved_mid, resumed / "ckpt.pt")
    (resumed / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in read_jsonl(straight / "eval.jsonl")))
    assert train_in_process(config, resumed, resume=True) == 0

    a, b = metrics(straight), metrics(resumed)
    assert b["iters"] == 12 and b["sessions"] == 2 and b["tokens_seen"] == a["tokens_seen"]
    assert b["final_val_loss"] == a["final_val_loss"]
    keys = ("iter", "train_loss", "val_loss", "lr")
    assert [{k: r[k] for k in keys} for r in read_jsonl(resumed / "eval.jsonl")] == \
           [{k: r[k] for k in keys} for r in read_jsonl(straight / "eval.jsonl")]
    sa, sb = torch.load(straight / "ckpt.pt", weights_only=False), torch.load(resumed / "ckpt.pt", weights_only=False)
    for name, tensor in sa["model"].items():
        assert torch.equal(tensor, sb["model"][name]), name


def test_corrupt_checkpoint_is_refused(make_config, tmp_path):
    config = make_config({"TRAIN_MAX_ITERS": "4"})
    run_dir = tmp_path / "run"
    assert train_in_process(config, run_dir) == 0
    path = run_dir / "ckpt.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ckpt.CheckpointError, match="unreadable"):
        ckpt.load_checkpoint(path)
    assert train_in_process(config, run_dir, resume=True, environ={"GPT2_MAX_ITERS": "8"}) == 1
    m = metrics(run_dir)
    assert m["status"] == "failed" and str(path) in m["failure_reason"] and "unreadable" in m["failure_reason"]
    torch.save({"model": {}}, path)
    with pytest.raises(ckpt.CheckpointError, match="not a checkpoint of this trainer"):
        ckpt.load_checkpoint(path)


def test_mismatched_checkpoint_is_refused(make_config, tmp_path):
    run_dir = tmp_path / "run"
    assert train_in_process(make_config({"TRAIN_MAX_ITERS": "4"}), run_dir) == 0
    other = make_config({"TRAIN_MAX_ITERS": "8", "MODEL_BIAS": "n"}, name="nobias")
    assert train_in_process(other, run_dir, resume=True) == 1
    reason = metrics(run_dir)["failure_reason"]
    assert str(run_dir / "ckpt.pt") in reason and "model.bias: checkpoint True, now False" in reason


def test_signature_differences_are_readable():
    saved = {"model": {"n_layer": 2, "n_embd": 64}, "vocab_size": 65, "world_size": 1}
    now = {"model": {"n_layer": 4, "n_embd": 64}, "vocab_size": 50257, "world_size": 1}
    assert ckpt.signature_differences(saved, now) == ["model.n_layer: checkpoint 2, now 4",
                                                      "vocab_size: checkpoint 65, now 50257"]


def test_rng_state_round_trip():
    import random

    import numpy as np

    np.random.randn(), random.gauss(0, 1)  # leave a cached Gaussian in both generators' state
    state = ckpt.capture_rng_state()
    first = (torch.rand(3), np.random.rand(), random.random(), np.random.randn(), random.gauss(0, 1))
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    ckpt.restore_rng_state(torch.load(buffer, weights_only=True))  # plain values only: no pickled classes
    again = (torch.rand(3), np.random.rand(), random.random(), np.random.randn(), random.gauss(0, 1))
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]


def test_atomic_writes_leave_no_partial_files(tmp_path):
    target = tmp_path / "m.json"
    runs.atomic_write_json(target, {"loss": float("nan"), "path": tmp_path, "ok": 1.5})
    assert json.loads(target.read_text()) == {"loss": None, "path": str(tmp_path), "ok": 1.5}
    with pytest.raises(RuntimeError):
        with runs.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert json.loads(target.read_text())["ok"] == 1.5  # old content intact
    runs.atomic_write_jsonl(tmp_path / "e.jsonl", [{"iter": 1}, {"iter": 2}])
    assert read_jsonl(tmp_path / "e.jsonl") == [{"iter": 1}, {"iter": 2}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.jsonl", "m.json"]


def test_atomic_writes_honour_the_umask(tmp_path):
    """Like open(): 0666 less the umask, not mkstemp's 0600 (others in the group can read the results)."""
    previous = os.umask(0o022)
    try:
        runs.atomic_write_text(tmp_path / "a.json", "{}")
        os.umask(0o077)
        runs.atomic_write_text(tmp_path / "b.json", "{}")
        assert runs.current_umask() == 0o077
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o600


def test_prepare_run_dir_guards_existing_runs(tmp_path):
    config = tmp_path / "c"
    config.write_text("CONFIG_X=y\n")
    run_dir = run_dirs.prepare_run_dir(tmp_path / "run", config, resume=False)
    assert (run_dir / "config").read_text() == "CONFIG_X=y\n"
    (run_dir / "metrics.json").write_text("{}")
    with pytest.raises(run_dirs.RunDirError, match="--resume"):
        run_dirs.prepare_run_dir(run_dir, config, resume=False)
    config.write_text("CONFIG_X=n\n")
    run_dirs.prepare_run_dir(run_dir, config, resume=True)
    assert (run_dir / "config").read_text() == "CONFIG_X=y\n"  # a resume keeps the original snapshot
    env = run_dirs.write_env_json(run_dir, ["a"])
    env = run_dirs.write_env_json(run_dir, ["b"])
    assert env["command"][1:] == ["a"] and env["resumes"][0]["command"][1:] == ["b"]
