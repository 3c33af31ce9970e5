"""A full disk ends a run "failed" with the reason, on every write the run makes (issue 15 item 5).

The disk is simulated at the one seam every run-directory write goes through, Python's open(): from a
chosen write on, the file object refuses with ENOSPC as a full disk does (the real file stays as far as it
got, the temporary file of an atomic write is removed by it). Everything else is the real trainer on a
tiny CPU run: real checkpoints, real metrics.json, real logging.
"""

import builtins
import errno
import io
import json
import os
import re
from pathlib import Path

import pytest

from gpt2.io import BEST_CHECKPOINT_NAME, CHECKPOINT_NAME
from gpt2.train import checkpoint as ckpt
from gpt2.train import trainer as train
from gpt2.train.disk import RunWriteError, failure_reason, writing
from lib.config import load_settings

TEMPORARY = re.compile(r"\.(.+)\.\w{8}\.tmp")  # gpt2.io.atomic_path's sibling of <name>
SETTINGS = {"TRAIN_MAX_ITERS": "8", "TRAIN_EVAL_INTERVAL": "4", "TRAIN_CHECKPOINT_INTERVAL": "4",
            "TRAIN_LOG_INTERVAL": "2"}


class FullDisk:
    """Refuses writes of the run-directory file `name` from its `session`-th opening for writing on (or from the
    first write containing `trigger`); with everywhere=True, once tripped, every file's writes are refused."""

    def __init__(self, run_dir: Path, name: str, session: int = 1, trigger: str | None = None,
                 everywhere: bool = False):
        self.run_dir, self.name, self.session, self.trigger = Path(run_dir), name, session, trigger
        self.everywhere = everywhere
        self.sessions = 0
        self.tripped = False

    def install(self, monkeypatch):
        real_open = builtins.open

        def opener(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax"):
                return self.wrap(Path(file), f)
            return f

        monkeypatch.setattr(builtins, "open", opener)
        monkeypatch.setattr(io, "open", opener)  # pathlib opens through io.open
        return self

    def wrap(self, path: Path, f):
        if path.parent.resolve() != self.run_dir.resolve():
            return f
        match = TEMPORARY.fullmatch(path.name)
        name = match.group(1) if match else path.name
        if self.tripped and (self.everywhere or name == self.name):
            return RefusingFile(f, self, armed=True)
        if name != self.name:
            return f
        self.sessions += 1
        return RefusingFile(f, self, armed=self.sessions >= self.session and self.trigger is None)


class RefusingFile:
    """A file whose writes fail with ENOSPC once armed (or once a write holds the disk's trigger)."""

    def __init__(self, f, disk: FullDisk, armed: bool):
        self.f, self.disk, self.armed = f, disk, armed

    def write(self, data):
        trigger = self.disk.trigger
        if trigger is not None and not isinstance(data, str):
            trigger = trigger.encode()
        if self.armed or (trigger is not None and trigger in data):
            self.armed = self.disk.tripped = True
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def train_in_process(config, run_dir, resume=False, environ=None):
    settings = load_settings(config, environ=environ or {})
    return train.run(settings, config, run_dir, resume=resume, argv=["tests"])


def assert_loads_at(path: Path, iters: int):
    state = ckpt.load_checkpoint(path)  # content hash checked
    assert state["progress"]["iters"] == iters


# name, which opening of it fails (or the log line that fails), whether a first session ran before
CASES = {
    "config snapshot": ("config", 1, None, False),
    "env.json": ("env.json", 1, None, True),
    "settings.json": ("settings.json", 1, None, True),
    "train.log": ("train.log", 1, "iter 6 |", False),
    "eval.jsonl": ("eval.jsonl", 2, None, False),  # the evaluation at iter 8, after the iter-4 checkpoint
    "checkpoint": (CHECKPOINT_NAME, 2, None, False),
    "best checkpoint": (BEST_CHECKPOINT_NAME, 2, None, False),
}


@pytest.mark.parametrize("case", CASES)
def test_a_full_disk_fails_the_run_with_the_reason(case, make_config, tmp_path, monkeypatch, capsys):
    name, session, trigger, resumed = CASES[case]
    config, run_dir = make_config(SETTINGS), tmp_path / "run"
    environ = {}
    if resumed:  # the file is written when a session starts: a first session leaves a checkpoint to keep
        assert train_in_process(config, run_dir, environ={"GPT2_MAX_ITERS": "4"}) == 0
    disk = FullDisk(run_dir, name, session, trigger).install(monkeypatch)

    code = train_in_process(config, run_dir, resume=resumed, environ=environ)
    monkeypatch.undo()
    out, err = capsys.readouterr()
    assert disk.tripped, f"the run never wrote {name} a {session}. time"
    reason = f"no space left on device writing {run_dir / name}"
    assert code == 1
    assert reason in out + err
    assert "Traceback" not in out + err and "Logging error" not in out + err
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["status"] == "failed" and m["failure_reason"] == reason
    if name != "config":
        assert_loads_at(run_dir / CHECKPOINT_NAME, 4)  # the previous checkpoint, intact
    if name == BEST_CHECKPOINT_NAME:
        assert ckpt.load_checkpoint(run_dir / BEST_CHECKPOINT_NAME)["progress"]["best_val_iter"] == 4
    assert not [p.name for p in run_dir.iterdir() if TEMPORARY.fullmatch(p.name)]  # no half-written file left


@pytest.mark.parametrize("everywhere", [False, True], ids=["metrics.json", "whole disk"])
def test_when_metrics_json_cannot_record_it_the_exit_code_and_console_do(everywhere, make_config, tmp_path,
                                                                         monkeypatch, capsys):
    """metrics.json's own write refused (the evaluation at iter 8, then the failure record too), or the whole
    disk full from the iter-8 checkpoint on: exit 1, one line saying why, no second traceback."""
    config, run_dir = make_config(SETTINGS), tmp_path / "run"
    name, session = ("metrics.json", 3) if not everywhere else (CHECKPOINT_NAME, 2)
    disk = FullDisk(run_dir, name, session, everywhere=everywhere).install(monkeypatch)

    code = train_in_process(config, run_dir)
    monkeypatch.undo()
    out, err = capsys.readouterr()
    assert disk.tripped and code == 1
    first = f"no space left on device writing {run_dir / name}"
    assert f"run failed: {first}" in out
    unrecorded = f"no space left on device writing {run_dir / 'metrics.json'}"
    said = [line for line in err.splitlines() if line.startswith("RunWriteError: ")]
    if everywhere:  # the cause first, then why metrics.json does not say it
        assert said == [f"RunWriteError: {unrecorded} (recording that the run failed: {first})"], err
    else:
        assert said == [f"RunWriteError: {unrecorded} (recording that the run failed)"], err
    assert "Traceback" not in out + err and "Logging error" not in out + err
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "running"  # the last one it could write
    assert_loads_at(run_dir / CHECKPOINT_NAME, 4)
    assert not [p.name for p in run_dir.iterdir() if TEMPORARY.fullmatch(p.name)]


def test_a_refusal_inside_torch_save_keeps_its_errno(tmp_path):
    """torch.save of a file object wraps the file's OSError in a RuntimeError of its own; the cause is still found.
    /dev/full is a real device that refuses every write with ENOSPC."""
    import torch

    with pytest.raises(RunWriteError) as refused:
        with writing(tmp_path / "x.pt"), open("/dev/full", "wb") as f:
            torch.save({"w": torch.zeros(1000)}, f)
    assert str(refused.value) == f"no space left on device writing {tmp_path / 'x.pt'}"
    with pytest.raises(FileNotFoundError):  # not a refusal by the disk: left as it was
        with writing(tmp_path / "y"):
            open(tmp_path / "absent" / "y", "rb")
    quota = OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    assert failure_reason(quota, "/r/ckpt.pt") == "disk quota exceeded writing /r/ckpt.pt"
    assert failure_reason(OSError(errno.EROFS, "x"), "/r/a") == "read-only file system writing /r/a"
