"""A finished (or interrupted) run's model, for what comes after training: sample, evaluate, export.

    trained = load_trained("results/cpu-tiny-run-…", which="best")
    trained.model(idx)  # the GPT in eval mode, on the device asked for

The weights come from the run's best-validation checkpoint (ckpt-best.pt) when it has one and "best" is
asked for, else from its last checkpoint (ckpt.pt); either is read without running code and checked against
its content hash (gpt2.train.checkpoint). The settings come from the run's settings.json, the typed record
of what it trained with, so nothing is re-derived through today's Kconfig tree.
"""

import dataclasses
from pathlib import Path

import torch

from gpt2.io import BEST_CHECKPOINT_NAME, CHECKPOINT_NAME
from gpt2.model.gpt import GPT
from gpt2.settings import Settings
from gpt2.train.checkpoint import CheckpointError, load_checkpoint
from gpt2.train.run_dir import SETTINGS_NAME, read_settings_json

WHICH = ("best", "last")


@dataclasses.dataclass
class TrainedModel:
    model: GPT  # in eval mode
    settings: Settings
    vocab_size: int  # the model's (padded) vocabulary; the tokenizer's real one is settings.data's
    checkpoint: Path  # the file the weights came from
    iters: int  # optimizer steps the weights had taken


def checkpoint_path(run_dir, which: str = "best") -> Path:
    """The checkpoint `which` names: "best" falls back to the last one when the run kept no best."""
    if which not in WHICH:
        raise ValueError(f"checkpoint choice {which!r}: expected one of {', '.join(WHICH)}")
    run_dir = Path(run_dir)
    best = run_dir / BEST_CHECKPOINT_NAME
    return best if which == "best" and best.is_file() else run_dir / CHECKPOINT_NAME


def load_trained(run_dir, which: str = "best", device="cpu") -> TrainedModel:
    """The model of `run_dir`; raises CheckpointError naming the file when the run has none or it is unusable."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run directory")
    try:
        settings = read_settings_json(run_dir / SETTINGS_NAME)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    path = checkpoint_path(run_dir, which)
    state = load_checkpoint(path)
    vocab_size = int(state["signature"]["vocab_size"])
    # Built as a fresh GPT whatever the run's init was: the checkpoint's weights replace every parameter.
    model = GPT(settings.model, settings.attention, settings.mlp, settings.kv_pruning, vocab_size,
                seed=settings.general.seed)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit the model its settings.json describes: {exc}") from None
    model.to(torch.device(device)).eval()
    return TrainedModel(model, settings, vocab_size, path, int(state["progress"].get("iters", 0)))
