"""Batches for training and evaluation, read from a prepared data directory (gpt2/data/prepare.py).

Token files are memory-mapped; torch is imported only where tensors are made, so preparing data needs none.
"""

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gpt2.data.prepare import SPLITS, load_meta

if TYPE_CHECKING:
    import torch


def _open_tokens(data_path: Path, split: str) -> np.memmap:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    meta = load_meta(data_path)
    return np.memmap(Path(data_path) / f"{split}.bin", dtype=meta["dtype"], mode="r")


def _refuse_broken_tokens(tokens: np.ndarray, path: Path, vocab_size: int, chunk_tokens: int = 1 << 24) -> None:
    """Refuse a split no model can learn from: a token id >= vocab_size (it would index past the embedding),
    or one token id throughout (min == max: zeros from a failed write). One chunked pass over the memmap."""
    if len(tokens) == 0:
        return
    low, high = int(tokens[0]), int(tokens[0])
    for begin in range(0, len(tokens), chunk_tokens):
        chunk = tokens[begin : begin + chunk_tokens]
        low, high = min(low, int(chunk.min())), max(high, int(chunk.max()))
    if high >= vocab_size:
        raise ValueError(f"{path}: token id {high} >= vocab size {vocab_size} in meta.json; rebuild with `make data`")
    if low == high and len(tokens) > 1:
        raise ValueError(f"{path} holds one token id ({low}) over all {len(tokens)} tokens; the data is broken; "
                         f"rebuild with `make data`")


def _windows_to_batch(tokens: np.ndarray, starts, block_size: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """x = tokens[s : s+T], y = tokens[s+1 : s+T+1] for each start s, as int64 (B, T)."""
    import torch  # here, not at the top: preparing data (run by every `make`) needs no torch

    windows = np.stack([tokens[s : s + block_size + 1] for s in starts]).astype(np.int64)
    return torch.from_numpy(windows[:, :-1].copy()), torch.from_numpy(windows[:, 1:].copy())


class BatchSource:
    """Random training batches from one split, deterministic in seed, resumable exactly.

    The split is cut into W = N // T - 1 non-overlapping windows of T+1 tokens. Each
    epoch e draws, from a generator seeded by (seed, e) alone, a shift in [0, T) that
    moves every window start (so block boundaries differ between epochs) and a
    permutation of the windows. Rank r of R takes every R-th window of that
    permutation (r, r+R, ...), so ranks sharing a seed never read the same window
    within an epoch. All ranks pass the same seed.
    """

    def __init__(self, data_path, split: str, block_size: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self._tokens = _open_tokens(data_path, split)
        _refuse_broken_tokens(self._tokens, Path(data_path) / f"{split}.bin", load_meta(data_path)["vocab_size"])
        self.split, self.block_size, self.batch_size = split, block_size, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self._num_windows = len(self._tokens) // block_size - 1
        self._windows_per_rank = self._num_windows // world_size
        if self._windows_per_rank < 1:
            raise ValueError(f"{split}.bin in {data_path} has {len(self._tokens)} tokens: too few for one window of "
                             f"{block_size + 1} tokens per rank over {world_size} rank(s); lower block_size")
        self._epoch, self._cursor = 0, 0  # cursor: windows this rank has taken in the epoch
        self._plan_epoch, self._plan = None, None

    def _epoch_plan(self) -> tuple[int, np.ndarray]:
        """(shift, this rank's window indices) for the current epoch, cached."""
        if self._plan_epoch != self._epoch:
            rng = np.random.default_rng([self.seed, self._epoch])
            shift = int(rng.integers(self.block_size))
            order = rng.permutation(self._num_windows)[: self._windows_per_rank * self.world_size]
            self._plan_epoch, self._plan = self._epoch, (shift, order[self.rank :: self.world_size].copy())
        return self._plan

    def next(self) -> tuple["torch.Tensor", "torch.Tensor"]:
        starts = []
        for _ in range(self.batch_size):
            if self._cursor == self._windows_per_rank:
                self._epoch, self._cursor = self._epoch + 1, 0
            shift, windows = self._epoch_plan()
            starts.append(shift + int(windows[self._cursor]) * self.block_size)
            self._cursor += 1
        return _windows_to_batch(self._tokens, starts, self.block_size)

    def _identity(self) -> dict:
        return {"split": self.split, "block_size": self.block_size, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "num_tokens": len(self._tokens)}

    def state_dict(self) -> dict:
        return {**self._identity(), "epoch": self._epoch, "cursor": self._cursor}

    def load_state_dict(self, state: dict) -> None:
        mismatched = {k: (state.get(k), v) for k, v in self._identity().items() if state.get(k) != v}
        if mismatched:
            details = ", ".join(f"{k}: saved {saved} vs now {now}" for k, (saved, now) in mismatched.items())
            raise ValueError(f"cannot resume this BatchSource from a state saved for different data or layout ({details})")
        self._epoch, self._cursor = int(state["epoch"]), int(state["cursor"])


def fixed_eval_batches(data_path, block_size: int, batch_size: int, n_batches: int,
                       split: str = "val") -> list[tuple["torch.Tensor", "torch.Tensor"]]:
    """n_batches batches whose windows start at evenly spaced offsets across the split.

    No randomness: every run on the same data sees exactly these batches, and they
    cover the whole split, not one region of it.
    """
    tokens = _open_tokens(data_path, split)
    last_start = len(tokens) - block_size - 1
    if last_start < 0:
        raise ValueError(f"{split}.bin in {data_path} has {len(tokens)} tokens, fewer than block_size + 1 = "
                         f"{block_size + 1}")
    starts = np.linspace(0, last_start, n_batches * batch_size).round().astype(np.int64)
    return [_windows_to_batch(tokens, starts[i * batch_size : (i + 1) * batch_size], block_size)
            for i in range(n_batches)]


def unigram_entropy(data_path, split: str = "val", chunk_tokens: int = 1 << 24) -> float:
    """Entropy in nats of the split's token frequencies: H = -sum_v p_v ln p_v, p_v = count_v / N.

    This is the loss of a model that predicts every token from the split's own unigram
    distribution, ignoring context; a trained model should end well below it.
    """
    tokens = _open_tokens(data_path, split)
    vocab_size = load_meta(data_path)["vocab_size"]
    counts = np.zeros(vocab_size, dtype=np.int64)
    for begin in range(0, len(tokens), chunk_tokens):
        counts += np.bincount(tokens[begin : begin + chunk_tokens], minlength=vocab_size)
    probs = counts[counts > 0] / counts.sum()
    return float(-(probs * np.log(probs)).sum())
