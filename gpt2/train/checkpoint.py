"""Checkpoints: everything needed to continue a run exactly, written atomically, read without running code.

    ckpt.pt = {
      "format":      FORMAT_VERSION,
      "signature":   what must match to resume (model/attention/MLP/data settings, vocab, world size,
                     parameter shapes),
      "model":       state_dict of the bare model (not the compiled/DDP wrapper),
      "optimizer":   optimizer state_dict,   "scaler": GradScaler state_dict (fp16) or None,
      "ranks":       per rank: {"rng": torch/cuda/numpy/python states, "data": BatchSource.state_dict()},
      "progress":    budget consumed and counters (train_time_s, iters, tokens_seen, ...),
      "content_sha256": sha256 of everything above (content_hash), checked before anything is used,
    }

ckpt-best.pt (save_best_checkpoint) has the same keys, but holds the model only: "optimizer" is None and
"ranks" empty (it is for sampling, evaluation and export, never for resuming; restore_checkpoint refuses it),
and "progress" is the run's progress at the evaluation that made it the best. The loop keeps those weights
in host memory (BestWeights) and writes the file when it checkpoints anyway, not at every improvement.

Only tensors and plain Python values (dict, list, tuple, str, int, float, bool, None) are stored, so the
file is read with torch.load(weights_only=True): unpickling a checkpoint can never run code from it (the
RNG states of numpy and `random` are kept as plain lists and numbers, see capture_rng_state). The content
hash catches what the zip container does not: torch.load checks no CRC, so a flipped bit in a tensor would
otherwise load as a silently different model.
"""

import hashlib
import pickle
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from gpt2.io import atomic_path
from gpt2.train.disk import writing

FORMAT_VERSION = 2  # 2: plain RNG states, content hash, weights-only loading
HASH_KEY = "content_sha256"
REQUIRED_KEYS = ("format", "signature", "model", "optimizer", "ranks", "progress", HASH_KEY)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, not ours, or for a different configuration."""


def signature(settings, vocab_size: int, world_size: int, model: torch.nn.Module) -> dict:
    """The facts a checkpoint must share with the run that resumes it.

    Budget, learning rate, intervals and other schedule settings may change between the original run and
    the resume; anything that changes the model's parameters, the token stream or the per-rank state may not.
    """
    model_settings = {k: v for k, v in asdict(settings.model).items() if k not in ("init_from", "hf_checkpoint_dir")}
    data = {k: v for k, v in asdict(settings.data).items() if k != "data_dir"}
    return {
        "model": model_settings,
        "attention": asdict(settings.attention),
        "mlp": asdict(settings.mlp),
        "kv_pruning": asdict(settings.kv_pruning),
        "data": data,
        "optimizer": settings.optimizer.name,
        "batch_size": settings.train.batch_size,
        "vocab_size": vocab_size,
        "world_size": world_size,
        "param_shapes": {name: list(t.shape) for name, t in model.state_dict().items()},
    }


def signature_differences(saved: dict, current: dict) -> list:
    """Human-readable 'what: checkpoint X, now Y' lines for every differing field."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            for sub in sorted(set(a) | set(b)):
                if a.get(sub) != b.get(sub):
                    out.append(f"{key}.{sub}: checkpoint {a.get(sub, '(absent)')}, now {b.get(sub, '(absent)')}")
        else:
            out.append(f"{key}: checkpoint {a}, now {b}")
    return out


def seed_everything(seed: int) -> None:
    """Seed every generator whose state capture_rng_state() saves."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def capture_rng_state() -> dict:
    """Every generator's state as tensors and plain values (loadable with weights_only=True).

    numpy's legacy MT19937 state is (name, key uint32[624], pos, has_gauss, cached_gaussian) and Python's
    (version, 625 ints, gauss_next): the arrays become lists of ints, the rest is already plain.
    """
    name, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": {"name": name, "key": key.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached_gaussian)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["name"], np.array(numpy_state["key"], dtype=np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["internal"]), python_state["gauss_next"]))


def content_hash(state: dict) -> str:
    """sha256 over every entry but the hash itself, in a canonical order (dict keys sorted by repr).

    A tensor contributes its dtype, shape and the bytes of its values (on the CPU, contiguous), so the
    hash depends on the numbers, not on device or storage layout. Anything that is neither a tensor nor
    a plain value raises TypeError: such a checkpoint could not be read back with weights_only=True.
    """
    digest = hashlib.sha256()
    _feed(digest, {k: v for k, v in state.items() if k != HASH_KEY})
    return digest.hexdigest()


def _feed(digest, value) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        digest.update(f"tensor {t.dtype} {tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        digest.update(f"dict {len(value)}\n".encode())
        for key in sorted(value, key=repr):
            digest.update(f"key {key!r}\n".encode())
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__} {len(value)}\n".encode())
        for item in value:
            _feed(digest, item)
    elif value is None or isinstance(value, (str, int, float, bool)):
        digest.update(f"{type(value).__name__} {value!r}\n".encode())
    else:
        raise TypeError(f"checkpoint entry of type {type(value).__name__} is neither a tensor nor a plain value")


def save_checkpoint(path, *, model, optimizer, scaler, signature: dict, ranks: list, progress: dict) -> None:
    """Write the checkpoint under a temporary name and rename it over `path` (a crash leaves the old one)."""
    _write(path, {
        "format": FORMAT_VERSION,
        "signature": signature,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "ranks": ranks,
        "progress": progress,
    })


def save_best_checkpoint(path, *, model, signature: dict, progress: dict) -> None:
    """The model alone (no optimizer, RNG or data position: a fraction of ckpt.pt's size), atomically."""
    _write(path, {"format": FORMAT_VERSION, "signature": signature, "model": model.state_dict(), "optimizer": None,
                  "scaler": None, "ranks": [], "progress": progress})


class BestWeights:
    """The weights of the best evaluation so far, held in host memory until the run checkpoints anyway.

    Writing ckpt-best.pt at every evaluation that improved on the best cost one model-sized, fsynced write
    each (a run that overfits improves at most of its evaluations: 8.7 s of a 42 s H200 cell). capture()
    only copies the weights into host buffers; write() turns the latest capture into ckpt-best.pt, which
    the loop does before every ckpt.pt (interval, end, interruption) and when the run fails, so the file
    is on disk whenever the run stops, and a kill -9 loses only what the last checkpoint would lose too.

    The buffers are allocated once and reused (a fresh allocation pays a page fault per page, as slow
    as the copy itself). On CUDA they are pinned and filled without blocking: the copies are queued on
    the stream ahead of the next step's weight updates, and write() waits for them (an event) before
    reading. A state-dict entry that is the same tensor as another (tied embedding and output weights)
    shares its buffer, so the file stores it once, as torch.save of the model's own state dict does.
    """

    def __init__(self):
        self._buffers = {}  # state-dict key -> host tensor
        self._progress = None  # the run's progress at the captured evaluation
        self._copied = None  # CUDA event recorded after the copies (None: they were synchronous)
        self.pending = False  # captured but not yet written

    def capture(self, model, progress: dict) -> None:
        source = model.state_dict()
        if list(source) != list(self._buffers) or any(
                b.shape != t.shape or b.dtype != t.dtype for b, t in zip(self._buffers.values(), source.values())):
            self._buffers = _host_buffers(source)
        filled = set()
        for name, t in source.items():
            buffer = self._buffers[name]
            if id(buffer) not in filled:  # a shared buffer once (the tied weight is the largest tensor)
                buffer.copy_(t.detach(), non_blocking=True)
                filled.add(id(buffer))
        on_cuda = any(t.is_cuda for t in source.values())
        self._copied = torch.cuda.Event() if on_cuda else None
        if self._copied is not None:
            self._copied.record()
        self._progress = dict(progress)
        self.pending = True

    def write(self, path, signature: dict) -> bool:
        """ckpt-best.pt from the latest capture (atomically); False when nothing was pending."""
        if not self.pending:
            return False
        if self._copied is not None:
            self._copied.synchronize()
        self.pending = False  # also when the disk refuses it: the run fails with that, and does not try twice
        _write(path, {"format": FORMAT_VERSION, "signature": signature, "model": dict(self._buffers),
                      "optimizer": None, "scaler": None, "ranks": [], "progress": self._progress})
        return True

    @property
    def iters(self) -> int | None:
        """The iteration of the captured evaluation (None before the first capture)."""
        return self._progress["iters"] if self._progress else None


def _host_buffers(state: dict) -> dict:
    """Host tensors shaped like `state`'s (pinned for CUDA sources); entries that are one tensor share one."""
    buffers, seen = {}, {}
    for name, t in state.items():
        key = (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device)
        if key not in seen:
            seen[key] = _host_tensor(t)
        buffers[name] = seen[key]
    return buffers


def _host_tensor(t: torch.Tensor) -> torch.Tensor:
    if t.is_cuda:
        try:
            return torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        except RuntimeError:  # no page-locked memory to be had (a memlock limit): a pageable copy blocks
            pass
    return torch.empty(t.shape, dtype=t.dtype)


def _write(path, state: dict) -> None:
    """Hash `state` and write it atomically. torch.save gets a Python file, not the path: a path is written by
    C++, whose failure loses the errno (a full disk would read "unexpected pos"); through a file the OSError
    survives and `writing` names it (gpt2/train/disk.py)."""
    state[HASH_KEY] = content_hash(state)
    with writing(path), atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)


def load_checkpoint(path, expected_signature: dict | None = None) -> dict:
    """Read a checkpoint onto the CPU and check it; raises CheckpointError naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint to resume from")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only met a class or function: refused before it ran
        found = [line.strip() for line in str(exc).splitlines() if "GLOBAL" in line]
        raise CheckpointError(f"{path} is not a checkpoint this trainer can load: it holds objects other than "
                              f"tensors and plain values (format 1 checkpoints held numpy arrays), refused without "
                              f"running them ({found[0] if found else type(exc).__name__})") from None
    except Exception as exc:  # torch raises several types for truncated or garbled archives
        raise CheckpointError(f"{path} is unreadable (corrupt or truncated?): {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        missing = [k for k in REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
        raise CheckpointError(f"{path} is not a checkpoint of this trainer (missing {', '.join(missing)})")
    if state["format"] != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {state['format']}, this trainer reads {FORMAT_VERSION}")
    actual = content_hash(state)
    if actual != state[HASH_KEY]:
        raise CheckpointError(f"checkpoint {path} is corrupt: content hash mismatch "
                              f"(expected {state[HASH_KEY]}, got {actual})")
    if expected_signature is not None:
        differences = signature_differences(state["signature"], expected_signature)
        if differences:
            shown = "; ".join(differences[:10]) + (f"; ... ({len(differences)} in all)" if len(differences) > 10 else "")
            raise CheckpointError(f"{path} was written for a different configuration and cannot be resumed: {shown}")
    return state


def checkpoint_progress(path) -> dict:
    """The "progress" entry of a checkpoint, read cheaply (memory-mapped, content hash unchecked: for a decision
    about the file, not for using its weights); {} when it cannot be read."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return dict(state["progress"])
    except Exception:  # unreadable, or not a checkpoint at all: nothing to go by
        return {}


def restore_checkpoint(state: dict, *, model, optimizer, scaler, rank: int, path="checkpoint") -> dict:
    """Load model/optimizer/scaler/RNG state; returns this rank's data-position state (or None)."""
    if state["optimizer"] is None:
        raise CheckpointError(f"{path} holds the model only (a best-validation checkpoint) and cannot be resumed; "
                              f"resume from the run's ckpt.pt")
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path} does not fit the model/optimizer: {exc}") from exc
    if scaler is not None and scaler.is_enabled() and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    ranks = state["ranks"]
    if rank >= len(ranks):
        raise CheckpointError(f"{path} holds state for {len(ranks)} rank(s); rank {rank} has none")
    restore_rng_state(ranks[rank]["rng"])
    return ranks[rank].get("data")
