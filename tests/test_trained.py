"""load_trained: a run's own settings and verified weights give back the model that trained."""

import pytest
import torch

from gpt2.io import BEST_CHECKPOINT_NAME, CHECKPOINT_NAME
from gpt2.train import trainer as train
from gpt2.train.checkpoint import CheckpointError
from gpt2.train.trained import checkpoint_path, load_trained
from lib.config import load_settings


def test_the_loaded_model_is_the_one_that_trained(make_config, tmp_path):
    config = make_config({"TRAIN_MAX_ITERS": "3", "GPT2_MAX_TIME": "0"})
    run_dir = tmp_path / "run"
    assert train.run(load_settings(config, environ={}), config, run_dir, argv=["tests"]) == 0
    trained = load_trained(run_dir, which="last")
    assert trained.checkpoint == run_dir / CHECKPOINT_NAME and trained.iters == 3
    saved = torch.load(run_dir / CHECKPOINT_NAME, weights_only=True)["model"]
    for name, tensor in trained.model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    assert not trained.model.training
    # "best" falls back to the last checkpoint only when the run kept no best one
    expected = run_dir / (BEST_CHECKPOINT_NAME if (run_dir / BEST_CHECKPOINT_NAME).exists() else CHECKPOINT_NAME)
    assert checkpoint_path(run_dir, "best") == expected


def test_a_missing_run_or_checkpoint_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="no such run directory"):
        load_trained(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="settings"):
        load_trained(tmp_path / "empty")
    with pytest.raises(ValueError, match="expected one of best, last"):
        checkpoint_path(tmp_path, "newest")
