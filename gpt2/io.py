"""File helpers every layer shares (torch-free): run-directory file names and atomic writes.

Every file is written under a temporary sibling name and renamed into place, so a reader (the matrix
runner, the report, a resumed run) sees either the old file or the complete new one, never a prefix.
The file gets the permissions a plain open() would give it (0666 less the umask), not mkstemp's 0600.
"""

import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

# The checkout this code runs from: relative paths in a configuration (results, data, caches) start here.
REPO_ROOT = Path(__file__).resolve().parent.parent

# The files of a run directory (docs/architecture.md describes each).
CONFIG_NAME = "config"
ENV_NAME = "env.json"
LOG_NAME = "train.log"
EVAL_NAME = "eval.jsonl"
METRICS_NAME = "metrics.json"
CHECKPOINT_NAME = "ckpt.pt"
# the weights at the lowest validation loss so far (what sample/eval/export read when it exists)
BEST_CHECKPOINT_NAME = "ckpt-best.pt"


# ---- atomic writes ------------------------------------------------------------

@contextmanager
def atomic_path(path):
    """Yield a temporary sibling of `path`; on success it is fsynced and renamed over `path`.

    On an exception the temporary file is removed and `path` is left as it was.
        with atomic_path(run_dir / "ckpt.pt") as tmp:
            torch.save(state, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        tmp.chmod(0o666 & ~current_umask())
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def current_umask() -> int:
    """The process umask, read without changing it (os.umask can only set it, which races with threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc (not Linux): set and restore
    os.umask(mask)
    return mask


def atomic_write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(obj):
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _finite_or_none(obj):
    """JSON has no NaN/Infinity: write them as null so every reader can parse the file."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def to_json(obj, indent=2) -> str:
    return json.dumps(_finite_or_none(obj), indent=indent, default=_json_default, allow_nan=False)


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, to_json(obj) + "\n")


def atomic_write_jsonl(path, records) -> None:
    """Rewrite a whole JSONL file (one compact object per line) atomically."""
    atomic_write_text(path, "".join(to_json(r, indent=None) + "\n" for r in records))


def read_json(path):
    return json.loads(Path(path).read_text())


def read_jsonl(path) -> list:
    """Records of a JSONL file; [] when it does not exist."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
