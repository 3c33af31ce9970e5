"""Shared fixtures: real configurations built from the real Kconfig tree and presets."""

import shutil
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent

from lib import config as cfg

# A tiny single-run CPU configuration: char tokenizer keeps the output layer small.
TINY_OVERRIDES = {
    "MATRIX": "n",
    "TOKENIZER_CHAR": "y",
    "MODEL_BLOCK_SIZE": "32",
    "TRAIN_BATCH_SIZE": "4",
    "GPT2_MAX_TIME": "0",
    "TRAIN_MAX_ITERS": "20",
    "TRAIN_EVAL_INTERVAL": "10",
    "TRAIN_EVAL_BATCHES": "2",
    "TRAIN_LOG_INTERVAL": "5",
    "TRAIN_CHECKPOINT_INTERVAL": "10",
}


@pytest.fixture(autouse=True)
def seeded_torch():
    """Every test draws the same random inputs whichever tests ran before it (and in whatever order), so a
    tolerance checked once holds on every run. Tests that need a particular draw still seed their own."""
    torch.manual_seed(0)


@pytest.fixture
def make_config(tmp_path):
    """make_config(overrides=None, preset="cpu-default", tiny=True, name="config") -> Path of a full .config.

    The data and results directories point into tmp_path unless overridden.
    """

    def build(overrides=None, preset="cpu-default", tiny=True, name="config"):
        base = tmp_path / f"{name}.base"
        cfg.apply_defconfig(cfg.preset_path(preset), base)
        merged = dict(TINY_OVERRIDES) if tiny else {}
        merged.update({"RESULTS_DIR": str(tmp_path / "results"), "DATA_DIR": str(shared_data_dir())})
        merged.update(overrides or {})
        out = tmp_path / name
        cfg.write_cell_config(base, merged, out)
        return out

    return build


def keep_checkpoint_at(monkeypatch, iters: int, copy_to: Path) -> None:
    """From now until monkeypatch.undo(), the ckpt.pt a run saves at iteration `iters` is also copied to copy_to:
    the run's directory as a crash right after that checkpoint would have left it."""
    from gpt2.train import checkpoint as ckpt

    real_save = ckpt.save_checkpoint

    def save_and_keep(path, **kw):
        real_save(path, **kw)
        if kw["progress"]["iters"] == iters:
            shutil.copy(path, copy_to)

    monkeypatch.setattr(ckpt, "save_checkpoint", save_and_keep)


def shared_data_dir() -> Path:
    """Prepared datasets are reused across tests (preparation is idempotent)."""
    return REPO_ROOT / "data"


@pytest.fixture
def repo_copy(tmp_path):
    """A copy of the repository's configuration machinery, for tests that run make and write .config."""
    dest = tmp_path / "repo"
    dest.mkdir()
    for name in ("Kconfig", "kconfig", "defconfigs", "Makefile", "lib", "scripts", "gpt2", "requirements.txt"):
        src = REPO_ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, dest / name)
    (dest / ".venv").symlink_to(REPO_ROOT / ".venv")
    return dest
