"""Checkpoints a run must not trust: one whose unpickling would run code, one whose tensors changed on disk."""

import json
import os
import pickle
import shlex
import zipfile
from pathlib import Path

import pytest
import torch

from gpt2.train import checkpoint as ckpt
from gpt2.train import trainer as train
from lib.config import load_settings


def train_in_process(config, run_dir, resume=False, environ=None):
    settings = load_settings(config, environ=environ or {})
    return train.run(settings, config, run_dir, resume=resume, argv=["tests"])


def metrics(run_dir):
    return json.loads((Path(run_dir) / "metrics.json").read_text())


class PlantsAFile:
    """Unpickling this runs `touch <marker>` (what a hostile ckpt.pt could do with any command)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_checkpoint_that_would_run_code_is_refused_without_running_it(make_config, tmp_path):
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(PlantsAFile(live)))
    assert live.exists()  # the payload really runs when unpickled

    run_dir = tmp_path / "run"
    config = make_config({"TRAIN_MAX_ITERS": "4"})
    assert train_in_process(config, run_dir) == 0
    path, marker = run_dir / "ckpt.pt", tmp_path / "MARKER"
    torch.save({"format": ckpt.FORMAT_VERSION, "model": PlantsAFile(marker)}, path)

    with pytest.raises(ckpt.CheckpointError) as refused:
        ckpt.load_checkpoint(path)
    assert not marker.exists()
    message = str(refused.value)
    assert str(path) in message and "refused without running them" in message and "\n" not in message
    assert not marker.exists()

    assert train_in_process(config, run_dir, resume=True, environ={"GPT2_MAX_ITERS": "8"}) == 1
    m = metrics(run_dir)
    assert m["status"] == "failed" and str(path) in m["failure_reason"] and m["iters"] == 0
    assert not marker.exists()


def flip_a_byte_of_a_weight(path: Path) -> str:
    """Flip the middle byte of one model tensor's storage inside the checkpoint's zip archive (torch.load
    checks no CRC, so the file still loads); returns the tensor's name. (The test's own run wrote the file:
    it is read here without weights_only, so that the helper works whatever the checkpoint holds.)"""
    before = torch.load(path, weights_only=False)["model"]
    with zipfile.ZipFile(path) as archive:
        storages = [info for info in archive.infolist() if "/data/" in info.filename and info.file_size > 0]
    for info in sorted(storages, key=lambda info: int(info.filename.rpartition("/")[2])):
        data = bytearray(path.read_bytes())
        with open(path, "rb") as f:  # the member's bytes follow its 30-byte local header, name and extra field
            f.seek(info.header_offset + 26)
            name_len, extra_len = (int.from_bytes(f.read(2), "little") for _ in range(2))
        start = info.header_offset + 30 + name_len + extra_len
        original = bytes(data)
        data[start + info.file_size // 2] ^= 0x10
        path.write_bytes(data)
        after = torch.load(path, weights_only=False)["model"]
        changed = [name for name in before if not torch.equal(before[name], after[name])]
        if changed:
            return changed[0]
        path.write_bytes(original)  # an optimizer or RNG tensor: try the next storage
    raise AssertionError("no model tensor storage found in the checkpoint")


def test_checkpoint_with_a_flipped_weight_byte_is_refused(make_config, tmp_path):
    run_dir = tmp_path / "run"
    config = make_config({"TRAIN_MAX_ITERS": "4"})
    assert train_in_process(config, run_dir) == 0
    path = run_dir / "ckpt.pt"
    assert flip_a_byte_of_a_weight(path)

    with pytest.raises(ckpt.CheckpointError, match=r"is corrupt: content hash mismatch \(expected [0-9a-f]{64}, "
                                                   r"got [0-9a-f]{64}\)") as refused:
        ckpt.load_checkpoint(path)
    assert f"checkpoint {path}" in str(refused.value)

    assert train_in_process(config, run_dir, resume=True, environ={"GPT2_MAX_ITERS": "8"}) == 1
    m = metrics(run_dir)
    assert m["status"] == "failed" and m["iters"] == 0
    assert f"checkpoint {path} is corrupt: content hash mismatch" in m["failure_reason"]


def test_content_hash_is_of_the_values_and_refuses_what_weights_only_cannot_load():
    state = {"format": 2, "model": {"w": torch.arange(6.0).view(2, 3)}, "ranks": [{"python": (3, [1, 2], None)}]}
    column_major = torch.arange(6.0).view(2, 3).t().contiguous().t()
    assert column_major.stride() == (1, 2)
    assert ckpt.content_hash(state) == ckpt.content_hash({**state, "model": {"w": column_major}})  # same values
    changed = {**state, "model": {"w": torch.arange(6.0).view(2, 3) + 1e-7}}
    assert ckpt.content_hash(changed) != ckpt.content_hash(state)
    assert ckpt.content_hash({**state, ckpt.HASH_KEY: "x"}) == ckpt.content_hash(state)
    import numpy as np

    with pytest.raises(TypeError, match="ndarray"):
        ckpt.content_hash({**state, "progress": {"key": np.zeros(3)}})
