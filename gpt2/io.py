"""File and process helpers every layer shares (torch-free): run-directory file names, atomic writes, file
locks, and children that die with their parent.

Every file is written under a temporary sibling name and renamed into place, so a reader (the matrix
runner, the report, a resumed run) sees either the old file or the complete new one, never a prefix.
The file gets the permissions a plain open() would give it (0666 less the umask), not mkstemp's 0600.

FileLock is an exclusive flock on a file that names its holder: a run directory, a matrix directory and a
matrix cell each have one, so two processes never train or write the same thing at once.
"""

import ctypes
import ctypes.util
import errno
import fcntl
import json
import math
import os
import signal
import socket
import sys
import tempfile
import time
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
# Start of the line a trainer logs once its warm-up steps (compilation) are done: the matrix scheduler waits for
# it before starting another cell of the same architecture, which then finds the compiler's cache warm.
WARM_MARK = "warm-up done"


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


# ---- locks --------------------------------------------------------------------

class LockHeld(Exception):
    """Another process holds the lock; the message names it (host, pid, since when) and the lock file."""


def holder_id() -> str:
    """Who this process is, as a lock file records it: host and pid (and the Slurm task, under Slurm)."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if job:
        return f"slurm:{job}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}@{socket.gethostname()} pid {os.getpid()}"
    return f"{socket.gethostname()} pid {os.getpid()}"


class FileLock:
    """An exclusive flock on `path`; the holder's identity is written into the file.

    flock belongs to the open file description, so the kernel releases it when the last descriptor closes,
    however the holder dies (kill -9 included), and a child that inherits the descriptor holds it too.
    """

    def __init__(self, path, what):
        self.path = Path(path)
        self.what = what  # "run results/x", "matrix results/y": the refusal message starts with it
        self.fd = None
        self.borrowed = False  # the descriptor belongs to a parent (adopt): release() must not close it

    def acquire(self, wait_s: float = 0.0) -> "FileLock":
        """Take the lock, waiting up to wait_s seconds for it (math.inf: as long as it takes); LockHeld if not.
        Taking it again through the same object is a no-op (so `with lock.acquire():` works)."""
        if self.fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_s
        while not _try_flock(fd, fcntl.LOCK_EX):
            if time.monotonic() >= deadline:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise LockHeld(f"{self.what} is locked by {holder} ({self.path})")
            time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{holder_id()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        self.fd = fd
        return self

    def adopt(self, fd: int) -> bool:
        """Take over descriptor `fd`, on which a parent process took this lock and passed it down (pass_fds).
        False when fd is not open on this lock file here; LockHeld when it is, but another process holds the lock."""
        try:
            mine, theirs = os.stat(self.path), os.fstat(fd)
        except OSError:
            return False
        if (mine.st_dev, mine.st_ino) != (theirs.st_dev, theirs.st_ino):
            return False
        # flock again on the description that already holds the lock succeeds; on any other it fails
        if not _try_flock(fd, fcntl.LOCK_EX):
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            raise LockHeld(f"{self.what} is locked by {holder} ({self.path})")
        self.fd, self.borrowed = fd, True
        return True

    def release(self) -> None:
        if self.fd is not None and not self.borrowed:
            os.close(self.fd)  # closing the last descriptor releases the flock
        self.fd, self.borrowed = None, False

    def is_held_elsewhere(self) -> bool:
        """True when some other open file description holds the lock right now.

        Probes with a shared lock and writes nothing, and creates no file: a probe (status, a report) leaves
        the holder's record alone. It holds the shared lock for an instant, so acquirers wait a little
        (acquire(wait_s=...)) rather than mistake a probe for a holder.
        """
        if self.fd is not None:
            return False
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            return not _try_flock(fd, fcntl.LOCK_SH)
        finally:
            os.close(fd)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _try_flock(fd, kind) -> bool:
    """flock(fd, kind) without blocking; False when another open file description holds a conflicting lock."""
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
        return True
    except OSError as err:
        if err.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        return False


# ---- child processes -----------------------------------------------------------------

def die_with_parent_hook(parent=None):
    """preexec_fn: the child gets SIGTERM when `parent` (default: this process, which starts the child) dies
    (Linux); None elsewhere. A forked child calling it itself passes its parent's pid."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    parent = os.getpid() if parent is None else parent
    pr_set_pdeathsig = 1

    def hook():
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died between fork and prctl: the signal will never come
            os.kill(os.getpid(), signal.SIGTERM)

    return hook
