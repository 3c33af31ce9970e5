"""Run directories: layout, atomic writes, and the environment record (env.json).

A run directory describes itself (see docs/architecture.md):

    config        the .config snapshot the run used
    env.json      git commit + dirty diff, torch/CUDA/GPU, host, command line
    train.log     console log
    eval.jsonl    one JSON object per evaluation
    metrics.json  final summary (status "running" while the run is going)
    ckpt.pt       checkpoint

Every file here is written under a temporary sibling name and renamed into place,
so a reader (the matrix runner, the report, a resumed run) sees either the old
file or the complete new one, never a prefix. The file gets the permissions a plain
open() would give it (0666 less the umask), not mkstemp's private 0600.
"""

import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

CONFIG_NAME = "config"
ENV_NAME = "env.json"
LOG_NAME = "train.log"
EVAL_NAME = "eval.jsonl"
METRICS_NAME = "metrics.json"
CHECKPOINT_NAME = "ckpt.pt"


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (e.g. it already holds a run)."""


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


# ---- run directory ------------------------------------------------------------

def results_dir(general) -> Path:
    """GeneralSettings.results_dir as an absolute path (relative paths are from the repository root)."""
    path = Path(general.results_dir)
    return path if path.is_absolute() else REPO_ROOT / path


def prepare_run_dir(run_dir, config_path, resume: bool) -> Path:
    """Create `run_dir` and snapshot the .config into it.

    A directory that already holds a run (metrics.json or ckpt.pt) is only reused with
    resume=True; a resumed run keeps the original snapshot (the checkpoint check decides
    whether the new configuration is compatible).
    """
    run_dir = Path(run_dir)
    existing = [name for name in (METRICS_NAME, CHECKPOINT_NAME) if (run_dir / name).exists()]
    if existing and not resume:
        raise RunDirError(f"{run_dir} already holds a run ({', '.join(existing)}); pass --resume to continue it "
                          f"or choose a new run directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    snapshot = run_dir / CONFIG_NAME
    if not (resume and snapshot.exists()):
        atomic_write_bytes(snapshot, Path(config_path).read_bytes())
    return run_dir


def _git(*args, cwd=REPO_ROOT):
    try:
        proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def git_info(repo_root=REPO_ROOT) -> dict:
    """Commit, and the uncommitted changes as a diff (tracked files) plus untracked file names."""
    commit = _git("rev-parse", "HEAD", cwd=repo_root)
    # Against HEAD when there is one (staged + unstaged); a repository with no commit yet diffs the index.
    diff = _git("diff", "HEAD", cwd=repo_root) if commit else _git("diff", cwd=repo_root)
    untracked = _git("ls-files", "--others", "--exclude-standard", cwd=repo_root)
    return {
        "commit": commit.strip() if commit else None,
        "branch": (_git("rev-parse", "--abbrev-ref", "HEAD", cwd=repo_root) or "").strip() or None,
        "dirty": bool(diff) or bool(untracked),
        "diff": diff,
        "untracked": untracked.splitlines() if untracked else [],
    }


def torch_info() -> dict:
    import torch

    info = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
        "gpus": [],
        "cpu_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            info["gpus"].append({"index": i, "name": props.name, "memory_bytes": props.total_memory,
                                 "capability": f"{props.major}.{props.minor}"})
        info["driver"] = _nvidia_driver()
    return info


def _nvidia_driver():
    try:
        proc = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
        return proc.stdout.strip().splitlines()[0] if proc.returncode == 0 and proc.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return None


def environment_info(argv=None) -> dict:
    """Everything a reader needs to know about where and how the run was made."""
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": [sys.executable, *(sys.argv if argv is None else argv)],
        "cwd": os.getcwd(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "environment": {k: v for k, v in sorted(os.environ.items())
                        if k.startswith(("GPT2_", "CUDA_VISIBLE", "NCCL_", "TORCH_", "OMP_NUM"))},
        "git": git_info(),
        **torch_info(),
    }


def write_env_json(run_dir, argv=None, extra=None) -> dict:
    """Write env.json; a resumed run adds its own record under "resumes" instead of replacing the first."""
    path = Path(run_dir) / ENV_NAME
    info = environment_info(argv)
    if extra:
        info.update(extra)
    if path.exists():
        try:
            first = read_json(path)
        except (OSError, json.JSONDecodeError):
            first = None
        if isinstance(first, dict):
            first.setdefault("resumes", []).append(info)
            info = first
    atomic_write_json(path, info)
    return info


def copy_into(src, run_dir, name=None) -> Path:
    dest = Path(run_dir) / (name or Path(src).name)
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)
    return dest
