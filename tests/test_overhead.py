"""What a run costs besides its training (issue 17 item 3): the best weights kept in host memory and written with
the checkpoints instead of at every improving evaluation, and the time split in metrics.json and the logs.

Every way a run can stop after a best evaluation must leave that evaluation's weights in ckpt-best.pt: the end,
a checkpoint interval, a stop signal, a failure. Tiny CPU runs of the real trainer.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2.io import BEST_CHECKPOINT_NAME, CHECKPOINT_NAME, read_jsonl
from gpt2.train import checkpoint as ckpt
from gpt2.train import loop
from gpt2.train import trainer as train
from gpt2.train.metrics import SessionClock, process_age_s
from gpt2.train.trained import load_trained
from lib.config import load_settings
from lib.matrix.cell import time_split

REPO = Path(__file__).resolve().parent.parent
# an evaluation every 2 steps, most of them improving: the old trainer wrote ckpt-best.pt at each of them
EVERY_OTHER_STEP = {"TRAIN_MAX_ITERS": "8", "TRAIN_EVAL_INTERVAL": "2", "TRAIN_LOG_INTERVAL": "2",
                    "TRAIN_CHECKPOINT_INTERVAL": "4"}


def train_in_process(config, run_dir, resume=False, environ=None):
    settings = load_settings(config, environ=environ or {})
    return train.run(settings, config, run_dir, resume=resume, argv=["tests"])


def metrics(run_dir):
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def count_writes(monkeypatch, name=BEST_CHECKPOINT_NAME) -> list:
    """The progress of every write of the checkpoint `name`, in order."""
    writes, real_write = [], ckpt._write

    def counting(path, state):
        if Path(path).name == name:
            writes.append(dict(state["progress"]))
        real_write(path, state)

    monkeypatch.setattr(ckpt, "_write", counting)
    return writes


def assert_best_on_disk(run_dir, best_val_iter):
    """ckpt-best.pt loads (content hash checked) and is the evaluation `best_val_iter` of eval.jsonl."""
    state = ckpt.load_checkpoint(run_dir / BEST_CHECKPOINT_NAME)
    assert state["progress"]["iters"] == state["progress"]["best_val_iter"] == best_val_iter
    record = next(r for r in read_jsonl(run_dir / "eval.jsonl") if r["iter"] == best_val_iter)
    assert state["progress"]["best_val_loss"] == record["val_loss"]
    return state


# ---- the host copy -------------------------------------------------------------------------------------------

class Tied(torch.nn.Module):
    """An embedding and an output layer sharing one weight, as GPT's wte and lm_head do."""

    def __init__(self):
        super().__init__()
        self.wte = torch.nn.Embedding(50, 8)
        self.lm_head = torch.nn.Linear(8, 50, bias=False)
        self.lm_head.weight = self.wte.weight
        self.norm = torch.nn.LayerNorm(8)


def test_a_capture_is_a_snapshot_written_once_and_tied_weights_stay_one_tensor(tmp_path):
    model, best = Tied(), ckpt.BestWeights()
    assert not best.write(tmp_path / "none.pt", {}) and not (tmp_path / "none.pt").exists()  # nothing captured
    best.capture(model, {"iters": 4, "best_val_iter": 4})
    kept = {k: v.clone() for k, v in model.state_dict().items()}
    buffers = dict(best._buffers)
    with torch.no_grad():  # training goes on after the evaluation
        for p in model.parameters():
            p.add_(1.0)
    assert best.pending and best.iters == 4
    assert best.write(tmp_path / "best.pt", {"sig": 1}) and not best.pending
    state = ckpt.load_checkpoint(tmp_path / "best.pt")  # content hash checked
    assert all(torch.equal(state["model"][k], v) for k, v in kept.items())  # the weights at the capture
    assert state["model"]["wte.weight"].data_ptr() == state["model"]["lm_head.weight"].data_ptr()  # stored once
    assert state["optimizer"] is None and state["ranks"] == [] and state["progress"]["iters"] == 4
    assert not best.write(tmp_path / "best.pt", {})  # written: nothing pending until the next capture
    # the same file as save_best_checkpoint writes from the model itself
    ckpt.save_best_checkpoint(tmp_path / "direct.pt", model=model, signature={"sig": 1},
                              progress={"iters": 4, "best_val_iter": 4})
    assert abs((tmp_path / "best.pt").stat().st_size - (tmp_path / "direct.pt").stat().st_size) < 512
    best.capture(model, {"iters": 6})
    assert all(best._buffers[k] is buffers[k] for k in buffers)  # buffers reused: no allocation per capture


def test_a_refused_best_write_is_not_tried_again(tmp_path):
    best = ckpt.BestWeights()
    best.capture(Tied(), {"iters": 2})
    (tmp_path / "dir").mkdir()
    with pytest.raises(IsADirectoryError):
        best.write(tmp_path / "dir", {})
    assert not best.pending


# ---- the run: when ckpt-best.pt is written ------------------------------------------------------------------

def test_the_best_is_written_with_the_checkpoints_not_at_every_improvement(make_config, tmp_path, monkeypatch):
    config, run_dir = make_config(EVERY_OTHER_STEP), tmp_path / "run"
    writes = count_writes(monkeypatch)
    assert train_in_process(config, run_dir) == 0
    records = read_jsonl(run_dir / "eval.jsonl")
    improving = [r for i, r in enumerate(records) if all(r["val_loss"] < q["val_loss"] for q in records[:i])]
    assert len(improving) >= 3  # the old trainer: one write each
    assert 1 <= len(writes) <= 2  # at most one per checkpoint (iters 4 and 8), each of its latest best
    assert writes[0]["iters"] in (2, 4) and all(w["iters"] == w["best_val_iter"] for w in writes)
    m = metrics(run_dir)
    assert writes[-1]["iters"] == m["best_val_iter"]
    assert_best_on_disk(run_dir, m["best_val_iter"])
    trained = load_trained(run_dir, "best")
    assert trained.iters == m["best_val_iter"]


def test_a_failure_after_a_best_evaluation_still_writes_it(make_config, tmp_path):
    """No checkpoint before the NaN at iter 7: the best weights (iter 4 or 6) come from host memory."""
    config = make_config({**EVERY_OTHER_STEP, "TRAIN_CHECKPOINT_INTERVAL": "0", "DEBUG_INJECT_NAN_AT_ITER": "7"})
    run_dir = tmp_path / "run"
    assert train_in_process(config, run_dir) == 1
    m = metrics(run_dir)
    assert m["status"] == "failed" and "non-finite training loss" in m["failure_reason"]
    assert not (run_dir / CHECKPOINT_NAME).exists()  # a poisoned model is never checkpointed
    assert_best_on_disk(run_dir, m["best_val_iter"])
    assert "wrote ckpt-best.pt: the weights of the best evaluation" in (run_dir / "train.log").read_text()


def test_a_stop_signal_after_a_best_evaluation_writes_it(make_config, tmp_path, monkeypatch):
    """SIGTERM right after the evaluation at iter 4 (no checkpoint interval): the run checkpoints and ends
    interrupted, and ckpt-best.pt holds the best evaluation's weights."""
    config = make_config({**EVERY_OTHER_STEP, "TRAIN_MAX_ITERS": "1000", "TRAIN_CHECKPOINT_INTERVAL": "0"})
    run_dir, real_eval = tmp_path / "run", loop.run_eval

    def eval_then_signal(run, lr):
        real_eval(run, lr)
        if run.p.iters == 4:
            os.kill(os.getpid(), signal.SIGTERM)  # the trainer's handler records it; the loop stops at its next sync

    monkeypatch.setattr(loop, "run_eval", eval_then_signal)
    assert train_in_process(config, run_dir) == 128 + signal.SIGTERM
    m = metrics(run_dir)
    assert m["status"] == "interrupted" and m["iters"] < 10
    assert_best_on_disk(run_dir, m["best_val_iter"])
    assert ckpt.load_checkpoint(run_dir / CHECKPOINT_NAME)["progress"]["best_val_iter"] == m["best_val_iter"]


def test_resume_after_the_change_keeps_the_best_file_and_the_progress_in_step(make_config, tmp_path):
    config, run_dir = make_config(EVERY_OTHER_STEP), tmp_path / "run"
    assert train_in_process(config, run_dir, environ={"GPT2_MAX_ITERS": "4"}) == 0
    first = metrics(run_dir)["best_val_iter"]
    assert ckpt.checkpoint_progress(run_dir / BEST_CHECKPOINT_NAME)["best_val_iter"] == first
    assert train_in_process(config, run_dir, resume=True) == 0
    log = (run_dir / "train.log").read_text()
    assert "removed" not in log  # the best on disk was the one the checkpoint named
    assert_best_on_disk(run_dir, metrics(run_dir)["best_val_iter"])


def test_a_checkpoint_due_at_the_last_iteration_is_written_once(make_config, tmp_path, monkeypatch):
    """max_iters a multiple of the checkpoint interval: the interval's checkpoint is the end's, not a second copy."""
    config, run_dir = make_config(EVERY_OTHER_STEP), tmp_path / "run"
    writes = count_writes(monkeypatch, CHECKPOINT_NAME)
    assert train_in_process(config, run_dir) == 0
    assert [w["iters"] for w in writes] == [4, 8]
    # without an evaluation at the last iteration the end's evaluation comes first: written there, after it
    config = make_config({**EVERY_OTHER_STEP, "TRAIN_EVAL_INTERVAL": "3"}, name="eval3")
    writes.clear()
    assert train_in_process(config, tmp_path / "run3") == 0
    assert [w["iters"] for w in writes] == [4, 8, 8] and writes[-1]["last_eval_iter"] == 8


# ---- the time split -----------------------------------------------------------------------------------------

def test_metrics_and_the_closing_line_split_the_wall_time(make_config, tmp_path):
    config, run_dir = make_config(EVERY_OTHER_STEP), tmp_path / "run"
    assert train_in_process(config, run_dir) == 0
    m = metrics(run_dir)
    overhead = m["overhead"]
    assert set(overhead) == {"startup_s", "setup_s", "setup_parts_s", "other_s", "teardown_s", "process_s"}
    phases = overhead.pop("setup_parts_s")
    assert all(overhead[k] >= 0 for k in overhead)
    # the setup's phases, in the order they ran, add up to nearly all of it (the rest: routing, bookkeeping)
    assert list(phases) == ["imports", "process", "data", "model", "resume", "records"]
    assert all(v >= 0 for v in phases.values())
    assert 0.9 * overhead["setup_s"] - 0.01 <= sum(phases.values()) <= overhead["setup_s"] + 0.01
    loop_s = m["train_time_s"] + m["compile_time_s"] + m["eval_time_s"] + m["checkpoint_time_s"]
    parts = overhead["startup_s"] + overhead["setup_s"] + loop_s + overhead["other_s"] + overhead["teardown_s"]
    assert parts == pytest.approx(overhead["process_s"], abs=0.05)  # nothing unaccounted up to the record
    stopped = next(line for line in (run_dir / "train.log").read_text().splitlines() if "stopped by" in line)
    assert "s logs/records;" in stopped and "s start-up and" in stopped and "s setup before the loop" in stopped


def test_session_clock_before_the_loop_and_process_age():
    clock = SessionClock()
    record = clock.record(type("P", (), {"train_time_s": 0.0, "compile_time_s": 0.0, "eval_time_s": 0.0,
                                         "checkpoint_time_s": 0.0})())
    assert record["other_s"] is None and record["teardown_s"] is None and record["setup_s"] >= 0  # failed in setup
    age = process_age_s()
    assert age is not None and 0 < age <= process_age_s()


def test_the_cell_runner_reports_the_exit_the_trainer_cannot_record():
    m = {"train_time_s": 15.2, "compile_time_s": 2.3, "eval_time_s": 2.0, "checkpoint_time_s": 3.1,
         "overhead": {"startup_s": 5.0, "setup_s": 2.9, "other_s": 0.4, "teardown_s": 0.01, "process_s": 30.91}}
    line = time_split(32.5, m)
    assert line.startswith("time: 32.5 s wall = 5.0 start-up + 2.9 setup + loop (15.2 training, 2.3 "
                           "warm-up/compile, 2.0 eval, 3.1 checkpoints, 0.4 other) + 0.0 closing + 1.6 exit")
    assert line.endswith("2.14x its training time")
    assert time_split(3.0, {"status": "done"}) is None and time_split(3.0, None) is None  # an older trainer


def test_exit_without_collections_still_runs_exit_handlers_and_flushes():
    code = ("import atexit, sys; atexit.register(lambda: print('handler ran'));"
            "from gpt2.train.metrics import skip_collections_at_exit as s; s(); s(); sys.stdout.write('unflushed')")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout == "unflushedhandler ran\n", out.stderr
