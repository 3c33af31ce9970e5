"""The best-validation checkpoint (ckpt-best.pt) and metrics.json's account of the validation minimum (issue 14).

A run is driven past its minimum for real: a first session trains normally, a resumed one goes on at a
learning rate of 0.5, which the optimizer cannot follow (the learning rate may change on resume).
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import keep_checkpoint_at
from gpt2.io import BEST_CHECKPOINT_NAME, CHECKPOINT_NAME, read_jsonl
from gpt2.train import checkpoint as ckpt
from gpt2.train import trainer as train
from gpt2.train.budget import Progress
from gpt2.train.summary import past_val_minimum
from gpt2.train.trained import checkpoint_path, load_trained
from lib.config import load_settings

SESSION = {"TRAIN_MAX_ITERS": "8", "TRAIN_EVAL_INTERVAL": "4", "TRAIN_CHECKPOINT_INTERVAL": "0"}
TOO_FAST = {"TRAIN_LR": "0.5", "TRAIN_LR_MIN": "0.5", "TRAIN_SCHEDULE_CONSTANT": "y"}


def train_in_process(config, run_dir, resume=False, environ=None):
    settings = load_settings(config, environ=environ or {})
    return train.run(settings, config, run_dir, resume=resume, argv=["tests"])


def metrics(run_dir):
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def val_loss_of(model, config) -> float:
    """The trainer's validation loss of `model`: the mean over the same fixed batches."""
    from gpt2.data.batches import fixed_eval_batches
    from gpt2.data.prepare import prepare

    settings = load_settings(config, environ={})
    batches = fixed_eval_batches(prepare(settings.data), settings.model.block_size, settings.train.batch_size,
                                 settings.train.eval_batches)
    with torch.no_grad():
        return sum(float(model(x, y)[1]) for x, y in batches) / len(batches)


def test_a_run_past_its_minimum_keeps_the_best_weights_and_says_how_far_past(make_config, tmp_path):
    config, run_dir = make_config(SESSION), tmp_path / "run"
    assert train_in_process(config, run_dir) == 0
    first = metrics(run_dir)
    records = read_jsonl(run_dir / "eval.jsonl")
    best = min(records, key=lambda r: r["val_loss"])
    assert (first["best_val_iter"], first["best_val_tokens"]) == (best["iter"], best["tokens"])
    assert first["past_val_minimum"] is None and best is records[-1]  # still improving

    diverging = make_config({**SESSION, **TOO_FAST}, name="diverging")
    assert train_in_process(diverging, run_dir, resume=True, environ={"GPT2_MAX_ITERS": "16"}) == 0
    m = metrics(run_dir)
    records = read_jsonl(run_dir / "eval.jsonl")
    assert [r["iter"] for r in records] == [4, 8, 12, 16]
    best = min(records, key=lambda r: r["val_loss"])
    assert best["iter"] == 8 and m["final_val_loss"] > m["best_val_loss"] + 1.0  # really diverged
    assert (m["best_val_loss"], m["best_val_iter"], m["best_val_tokens"]) == (best["val_loss"], 8, best["tokens"])
    assert m["past_val_minimum"] == {"by": pytest.approx(m["final_val_loss"] - m["best_val_loss"]),
                                     "tokens_after": m["tokens_seen"] - best["tokens"], "iters_after": 16 - 8}
    closing = (run_dir / "train.log").read_text().splitlines()[-1]
    assert f"PAST its validation minimum: best {m['best_val_loss']:.4f} at iter 8" in closing
    assert "ckpt-best.pt holds those weights" in closing

    # ckpt-best.pt: verified like any checkpoint, the weights of iter 8, whose validation loss is the best one
    best_state = ckpt.load_checkpoint(run_dir / BEST_CHECKPOINT_NAME)
    assert best_state["progress"]["iters"] == 8 and best_state["progress"]["best_val_iter"] == 8
    trained = load_trained(run_dir, "best")
    assert trained.checkpoint == run_dir / BEST_CHECKPOINT_NAME and trained.iters == 8
    assert val_loss_of(trained.model, config) == pytest.approx(m["best_val_loss"], rel=1e-5)
    assert val_loss_of(load_trained(run_dir, "last").model, config) == pytest.approx(m["final_val_loss"], rel=1e-5)
    # the model alone: a fraction of ckpt.pt (AdamW keeps two moments per weight), and never resumed from
    assert (run_dir / BEST_CHECKPOINT_NAME).stat().st_size < (run_dir / CHECKPOINT_NAME).stat().st_size / 2
    with pytest.raises(ckpt.CheckpointError, match="holds the model only .* resume from the run's ckpt.pt"):
        ckpt.restore_checkpoint(best_state, model=trained.model, optimizer=None, scaler=None, rank=0)


def test_a_best_checkpoint_newer_than_the_resumed_one_is_replaced_by_the_resumed_best(make_config, tmp_path,
                                                                                     monkeypatch):
    """A run that died after ckpt.pt (iter 4) but after a better evaluation (iter 8) rewrote ckpt-best.pt: resumed
    (at a learning rate that never improves again), ckpt-best.pt must be iter 4's weights, the best the resumed
    run knows, not the abandoned iter 8's."""
    config = make_config({**SESSION, "TRAIN_EVAL_INTERVAL": "2", "TRAIN_CHECKPOINT_INTERVAL": "4"})
    saved_mid = tmp_path / "mid.pt"
    keep_checkpoint_at(monkeypatch, 4, saved_mid)
    straight = tmp_path / "straight"
    assert train_in_process(config, straight) == 0
    monkeypatch.undo()
    assert metrics(straight)["best_val_iter"] == 8  # the iter-4 best was overwritten before the "crash"

    crashed = tmp_path / "crashed"
    crashed.mkdir()
    for name in ("config", "eval.jsonl", BEST_CHECKPOINT_NAME):
        shutil.copy(straight / name, crashed / name)
    shutil.copy(saved_mid, crashed / CHECKPOINT_NAME)
    diverging = make_config({**SESSION, **TOO_FAST, "TRAIN_EVAL_INTERVAL": "2"}, name="diverging")
    assert train_in_process(diverging, crashed, resume=True) == 0

    m = metrics(crashed)
    assert m["best_val_iter"] == 4 and m["past_val_minimum"]["iters_after"] == 4
    assert "removed" in (crashed / "train.log").read_text()
    best = ckpt.load_checkpoint(crashed / BEST_CHECKPOINT_NAME)
    mid = ckpt.load_checkpoint(saved_mid)
    assert best["progress"]["best_val_iter"] == 4
    assert all(torch.equal(tensor, mid["model"][name]) for name, tensor in best["model"].items())


def test_the_best_checkpoint_can_be_turned_off(make_config, tmp_path):
    config = make_config({"TRAIN_MAX_ITERS": "4", "TRAIN_EVAL_INTERVAL": "2", "TRAIN_KEEP_BEST_CHECKPOINT": "n"})
    run_dir = tmp_path / "run"
    assert train_in_process(config, run_dir) == 0
    assert not (run_dir / BEST_CHECKPOINT_NAME).exists()
    assert metrics(run_dir)["best_val_iter"] in (2, 4)  # still tracked
    assert checkpoint_path(run_dir, "best") == run_dir / CHECKPOINT_NAME  # sample/eval/export fall back


def test_past_val_minimum_is_measured_from_the_best_evaluation():
    p = Progress(iters=300, tokens_seen=300 * 512, best_val_loss=2.5, best_val_iter=200, best_val_tokens=200 * 512,
                 last_val_loss=2.75, last_eval_iter=300)
    assert past_val_minimum(p) == {"by": 0.25, "tokens_after": 100 * 512, "iters_after": 100}
    assert past_val_minimum(Progress(iters=300, best_val_loss=2.5, best_val_iter=300, best_val_tokens=1,
                                     last_val_loss=2.5, last_eval_iter=300)) is None  # the last one is the best
    assert past_val_minimum(Progress()) is None  # no evaluation yet
    assert past_val_minimum(Progress(best_val_loss=2.5, last_val_loss=2.6)) is None  # a checkpoint from before
