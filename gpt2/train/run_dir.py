"""The run directory of one training run: creating it, its lock, its settings (settings.json) and environment
(env.json).

A run directory describes itself (docs/architecture.md lists its files): the .config snapshot, settings.json
(the typed settings it trained with), env.json
(git commit and dirty diff, torch/CUDA/GPU, host, command line), the log, evaluations, metrics, checkpoint.

Only one process trains a run directory at a time: it holds `<run_dir>/.run.lock` (RunLock). A process that
takes the lock for a child it starts (`make resume`, the torchrun launcher) passes the descriptor down and
names it in RUN_DIR_LOCK, and the child adopts it instead of locking itself out. A matrix cell's own lock
(`cells/<id>/.lock`, held by the matrix runner) is a different file, so the two never deadlock.
"""

import dataclasses
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from gpt2.io import CHECKPOINT_NAME, CONFIG_NAME, ENV_NAME, METRICS_NAME, REPO_ROOT, FileLock, atomic_write_bytes, \
    atomic_write_json, read_json
from gpt2.settings import Settings, component_classes

SETTINGS_NAME = "settings.json"  # the resolved typed settings, dataclasses.asdict(Settings)
RUN_LOCK_NAME = ".run.lock"  # flock of the process training the run (RunLock)
# "<fd>:<lock path>": the parent holds this run's lock on descriptor <fd>, passed down to this process
RUN_LOCK_ENV = "RUN_DIR_LOCK"


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (e.g. it already holds a run)."""


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


class RunLock:
    """`<run_dir>/.run.lock`: held by whichever process trains the run; LockHeld (naming host and pid) otherwise.

        lock = RunLock(run_dir).acquire()     # adopts the descriptor a parent passed down, else locks
        child_env = {**os.environ, **lock.handoff()}; subprocess.Popen(..., pass_fds=(lock.fd,), env=child_env)
    """

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.file = FileLock(self.run_dir / RUN_LOCK_NAME, f"run {run_dir}")

    @property
    def fd(self):
        return self.file.fd

    def handed_down(self) -> bool:
        """Whether the environment says a parent holds this run's lock (whether or not its descriptor is here)."""
        _, _, path = os.environ.get(RUN_LOCK_ENV, "").partition(":")
        return bool(path) and os.path.abspath(path) == os.path.abspath(self.file.path)

    def acquire(self, wait_s: float = 1.0) -> "RunLock":
        """Adopt the parent's descriptor when one was passed down, else take the lock (waiting up to wait_s, so
        that a status probe holding it for an instant is not taken for a runner)."""
        fd_text, _, _ = os.environ.get(RUN_LOCK_ENV, "").partition(":")
        if not (self.handed_down() and fd_text.isdigit() and self.file.adopt(int(fd_text))):
            self.file.acquire(wait_s)
        return self

    def handoff(self) -> dict:
        """The environment entry that lets a child (started with pass_fds=(self.fd,)) adopt this lock."""
        return {RUN_LOCK_ENV: f"{self.fd}:{os.path.abspath(self.file.path)}"}

    def release(self) -> None:
        self.file.release()

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def run_is_live(run_dir) -> bool:
    """Whether some process holds the run's lock now, i.e. is training it (this process included)."""
    return FileLock(Path(run_dir) / RUN_LOCK_NAME, f"run {run_dir}").is_held_elsewhere()


def mark_abandoned(run_dir, reason: str) -> None:
    """Record in metrics.json that the run ended without a final record (its process died: kill -9, a crash,
    a reboot), so no reader takes it for one still running. The caller holds the run's lock."""
    path = Path(run_dir) / METRICS_NAME
    try:
        record = read_json(path)
    except (OSError, ValueError):
        record = {}
    record = record if isinstance(record, dict) else {}
    record.update(status="failed", failure_reason=reason)
    atomic_write_json(path, record)


def write_settings_json(run_dir, settings) -> None:
    """settings.json: the typed settings this session trains with (a resumed run records its own session's,
    e.g. a larger GPT2_MAX_ITERS; the config snapshot keeps the first session's)."""
    atomic_write_json(Path(run_dir) / SETTINGS_NAME, dataclasses.asdict(settings))


def read_settings_json(path) -> Settings:
    """settings.json back into Settings. Raises ValueError naming the file when it cannot be read, is not JSON,
    or does not fit these Settings (a field this code does not know, or a value of the wrong shape)."""
    try:
        record = read_json(path)
        components = {}
        for name, cls in component_classes():
            values = dict(record.get(name, {}))
            for f in dataclasses.fields(cls):
                if isinstance(values.get(f.name), list):
                    values[f.name] = tuple(values[f.name])  # JSON has no tuples
            components[name] = cls(**values)
        unknown = set(record) - set(components)
        if unknown:
            raise TypeError(f"unknown components {', '.join(sorted(unknown))}")
        return Settings(**components)
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: cannot be read as settings ({type(exc).__name__}: {exc})") from None


def _git(*args, cwd=REPO_ROOT, env=None):
    try:
        proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


UNTRACKED_TREE_LIMIT_BYTES = 64 << 20  # larger untracked files (data someone left in the tree): no tree id


def working_tree_id(repo_root=REPO_ROOT, untracked=()):
    """The git tree id of the files as they are (tracked ones, changes included, and untracked ones git does not
    ignore): what `git add -A && git write-tree` would record, built in a throw-away index, so no index, ref or
    file of the checkout changes (git stores the blobs, as `git hash-object -w` would). It equals the tree of
    any commit with exactly these files, so a run made from uncommitted changes, or from a copy whose git
    metadata is older than its files, still names its code (lib/report/code.py finds that commit). None when
    git cannot tell, or when the untracked files (paths relative to repo_root) hold more than
    UNTRACKED_TREE_LIMIT_BYTES: git would copy them into its object store at every run's start."""
    size = 0
    for name in untracked:
        try:
            size += (Path(repo_root) / name).stat().st_size
        except OSError:
            pass
    if size > UNTRACKED_TREE_LIMIT_BYTES:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "GIT_INDEX_FILE": str(Path(tmp) / "index")}
        if _git("add", "-A", cwd=repo_root, env=env) is None:
            return None
        tree = _git("write-tree", cwd=repo_root, env=env)
    return tree.strip() if tree else None


def git_info(repo_root=REPO_ROOT) -> dict:
    """Commit, the uncommitted changes as a diff (tracked files) plus untracked file names, and the tree id of
    the files as they are."""
    commit = _git("rev-parse", "HEAD", cwd=repo_root)
    # Against HEAD when there is one (staged + unstaged); a repository with no commit yet diffs the index.
    diff = _git("diff", "HEAD", cwd=repo_root) if commit else _git("diff", cwd=repo_root)
    untracked = _git("ls-files", "--others", "--exclude-standard", cwd=repo_root)
    dirty = bool(diff) or bool(untracked)
    untracked = untracked.splitlines() if untracked else []
    tree = working_tree_id(repo_root, untracked) if dirty else _git("rev-parse", "HEAD^{tree}", cwd=repo_root)
    return {
        "commit": commit.strip() if commit else None,
        "branch": (_git("rev-parse", "--abbrev-ref", "HEAD", cwd=repo_root) or "").strip() or None,
        "dirty": dirty,
        "tree": tree.strip() if tree else None,
        "diff": diff,
        "untracked": untracked,
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
