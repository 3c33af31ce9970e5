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
    state = {
        "format": FORMAT_VERSION,
        "signature": signature,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "ranks": ranks,
        "progress": progress,
    }
    state[HASH_KEY] = content_hash(state)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


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


def restore_checkpoint(state: dict, *, model, optimizer, scaler, rank: int, path="checkpoint") -> dict:
    """Load model/optimizer/scaler/RNG state; returns this rank's data-position state (or None)."""
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
