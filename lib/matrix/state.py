"""Matrix state on disk: one state file per cell, locks, and matrix directories.

    results/<preset>-<YYYYmmdd-HHMMSS>/
      plan.json               the plan (lib.matrix.plan)
      base.config             the base config the plan was built from
      .lock                   held (flock) by the runner that owns the directory
      cells/<cell>/           the cell's run directory (trainer output, see docs/architecture.md)
        cell.config           the cell's configuration, written while planning
        state.json            pending | running | done | failed, attempts, exit code, reason
        console.log           everything the cell printed, every attempt
        .lock                 held by whichever process runs the cell right now
        .run.lock             held by the training process itself (gpt2.train.run_dir.RunLock)
      .cpu-<host>.lock        held while a CPU cell trains on <host> (one at a time)
      report.md ...           lib.report.writer
    results/.matrix-dirs.lock held while a runner chooses or creates its matrix directory

Every state write is atomic (temp file + rename), so a runner killed at any
moment leaves either the old or the new state. A cell left "running" by a dead
runner has a free cell lock; readers show it as pending ("process gone without
a final record", observed_state) and the next runner resumes it.

The locks are all fcntl.flock (gpt2.io.FileLock; released by the kernel when the
holder dies, however it dies):
  * the results directory's lock makes "find the newest matrix directory, else
    create one" atomic, so two runners started together share one directory;
  * the matrix lock keeps two local runners off one directory;
  * a cell lock is held by the process that trains the cell (the runner passes
    its descriptor to the child), so a cell is never trained twice at once, even
    when local runners and Slurm array tasks share the directory;
  * the run lock (a separate file) keeps anything else, e.g. `make resume
    RUN=cells/<id>`, off a cell's run directory while it trains.
"""

import dataclasses
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from lib.matrix.describe import describe_changes
from lib.matrix.plan import CELLS_DIR, PLAN_FILE, load_plan, save_plan
from gpt2.io import FileLock, LockHeld, atomic_write_json
from gpt2.train.run_dir import run_is_live

STATE_FILE = "state.json"
LOCK_FILE = ".lock"
CONSOLE_LOG = "console.log"
STATUSES = ("pending", "running", "done", "failed")


@dataclasses.dataclass
class CellState:
    status: str = "pending"
    attempts: int = 0
    exit_code: int | None = None
    failure_reason: str = ""
    started_at: float | None = None  # of the latest attempt (unix time)
    finished_at: float | None = None
    elapsed_s: float = 0.0  # wall time over all attempts
    runner: str = ""  # who ran the latest attempt: "local" or "slurm:<job>_<task>"
    host: str = ""  # where the latest attempt ran
    runner_pid: int = 0  # the process that launched it (a dead pid here means an orphaned cell)
    pgid: int = 0  # the cell's process group (train.py, torchrun and its workers), to clean up orphans
    gpus: str = ""  # CUDA_VISIBLE_DEVICES of the latest attempt
    note: str = ""  # e.g. "interrupted; resumes from checkpoint"

    def wants_run(self, retry_failed=False) -> bool:
        """Whether a runner should (re)start this cell: not done, and not failed unless retrying."""
        return self.status != "done" and (self.status != "failed" or retry_failed)


def state_path(matrix_dir, cell_id) -> Path:
    return Path(matrix_dir) / CELLS_DIR / cell_id / STATE_FILE


def read_state(matrix_dir, cell_id) -> CellState:
    try:
        data = json.loads(state_path(matrix_dir, cell_id).read_text())
    except FileNotFoundError:
        return CellState()
    known = {f.name for f in dataclasses.fields(CellState)}
    return CellState(**{k: v for k, v in data.items() if k in known})


def write_state(matrix_dir, cell_id, state: CellState) -> None:
    if state.status not in STATUSES:
        raise ValueError(f"unknown cell status {state.status!r}")
    atomic_write_json(state_path(matrix_dir, cell_id), dataclasses.asdict(state))


GONE_NOTE = "process gone without a final record; `make continue` resumes it"


def observed_state(matrix_dir, cell_id) -> CellState:
    """The cell's state as a reader should take it: a cell recorded "running" whose lock nobody holds (and whose
    run directory nobody trains) lost its process without a final record (kill -9, a crash, a reboot); it is
    pending, with a note saying so. state.json is left as it is: the next runner rewrites it."""
    state = read_state(matrix_dir, cell_id)
    if state.status == "running" and not cell_lock(matrix_dir, cell_id).is_held_elsewhere() \
            and not run_is_live(Path(matrix_dir) / CELLS_DIR / cell_id):
        state = dataclasses.replace(state, status="pending", note=GONE_NOTE)
    return state


def read_states(matrix_dir, plan) -> dict:
    """Every cell's observed_state: what `status`, the summary line and reports show."""
    return {cell.id: observed_state(matrix_dir, cell.id) for cell in plan.cells}


def counts(states: dict) -> dict:
    result = {status: 0 for status in STATUSES}
    for state in states.values():
        result[state.status] += 1
    return result


# ---- locks -------------------------------------------------------------------

# FileLock lives in gpt2.io (a run directory's lock uses it too); a matrix lock refusal is a LockHeld.
MatrixLocked = LockHeld
CHOOSE_LOCK_FILE = ".matrix-dirs.lock"  # in the results directory: choosing or creating a matrix directory
CHOOSE_WAIT_S = 600.0  # another runner plans for seconds (minutes for a huge matrix) while holding it
LOCK_GRACE_S = 1.0  # how long a runner waits for a lock that a status probe holds for an instant


def matrix_lock(matrix_dir) -> FileLock:
    return FileLock(Path(matrix_dir) / LOCK_FILE, f"matrix {matrix_dir}")


def cell_lock(matrix_dir, cell_id) -> FileLock:
    return FileLock(Path(matrix_dir) / CELLS_DIR / cell_id / LOCK_FILE, f"cell {cell_id}")


def cpu_lock(matrix_dir) -> FileLock:
    """Held while a CPU cell trains on this host: CPU cells share the cores, so two at once would each measure
    half a machine (tokens/s, and how far a time budget gets). Per host: cells on other nodes do not compete."""
    return FileLock(Path(matrix_dir) / f".cpu-{socket.gethostname()}.lock", f"the CPU of {socket.gethostname()}")


# ---- matrix directories --------------------------------------------------------

def new_matrix_dir(results_dir, name) -> Path:
    """results/<name>-<timestamp>, unique even when two are made within one second."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(results_dir) / f"{name}-{stamp}"
    n = 1
    while path.exists():
        n += 1
        path = Path(results_dir) / f"{name}-{stamp}-{n}"
    return path


def latest_matrix_dir(results_dir, name=None):
    """The newest directory under results_dir holding a plan.json (of preset `name` when given)."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        return None
    found = []
    for plan_file in results_dir.glob(f"*/{PLAN_FILE}"):
        if plan_file.parent.name.startswith("."):  # a plan still being staged (or left by a crash)
            continue
        try:
            data = json.loads(plan_file.read_text())
        except (OSError, ValueError):
            continue
        if name is not None and data.get("name") != name:
            continue
        found.append((data.get("created", ""), plan_file.parent.name, plan_file.parent))
    return max(found)[2] if found else None


# ---- choosing the directory a runner works in ------------------------------------

class PlanChanged(Exception):
    """The plan built now differs from the one stored in the matrix directory."""


def _stage_plan(results_dir, build) -> tuple:
    """Build a plan into a hidden staging directory (removed again if planning fails)."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".plan-", dir=results_dir))
    try:
        plan = build(staging)
        save_plan(plan, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging, plan


def _adopt_plan(matrix_dir, staging, old, new) -> None:
    """--force: take the new plan into an existing directory; finished cells keep their results."""
    done = {cid for cid, st in ((c.id, read_state(matrix_dir, c.id)) for c in old.cells) if st.status == "done"}
    for cell in new.cells:
        if cell.id in done:
            continue
        target = cell.config_path(matrix_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cell.config_path(staging), target)
    shutil.copyfile(Path(staging) / "base.config", Path(matrix_dir) / "base.config")
    save_plan(new, matrix_dir)


def open_matrix(results_dir, build, *, name, directory=None, new=False, force=False, rebuild_for=None) -> tuple:
    """Pick the matrix directory to work in, lock it, and return (matrix_dir, plan, lock).

    build(out_dir) -> Plan builds the plan from the current inputs (this validates every
    cell before anything runs). The directory is --dir, else the newest one of preset
    `name` (unless new), else a fresh results/<name>-<timestamp>. An existing directory
    is only reused when its stored plan has the same fingerprint; otherwise PlanChanged
    says what changed, unless force, which adopts the new plan (done cells stay done).
    rebuild_for(old_plan, matrix_dir) -> build function (continue): compare against a plan
    rebuilt from the directory's own stored inputs instead of `build`.
    """
    # Two runners started together must not both find no directory and each create one: choosing (or creating)
    # the directory happens under a lock in the results directory; the second then finds the first's directory
    # and its matrix lock.
    choosing = FileLock(Path(results_dir) / CHOOSE_LOCK_FILE, f"choosing a matrix directory in {results_dir}")
    choosing.acquire(CHOOSE_WAIT_S)
    try:
        return _open_matrix(results_dir, build, name, directory, new, force, rebuild_for)
    finally:
        choosing.release()


def _open_matrix(results_dir, build, name, directory, new, force, rebuild_for) -> tuple:
    matrix_dir = Path(directory) if directory else (None if new else latest_matrix_dir(results_dir, name))
    if matrix_dir is not None:
        lock = matrix_lock(matrix_dir).acquire(LOCK_GRACE_S)
        try:
            old = load_plan(matrix_dir)
            staging, plan = _stage_plan(results_dir, rebuild_for(old, matrix_dir) if rebuild_for else build)
            try:
                if plan.hash != old.hash:
                    changes = describe_changes(old, plan)
                    if not force:
                        raise PlanChanged(
                            f"the plan of {matrix_dir} was built from different inputs:\n  - "
                            + "\n  - ".join(changes or ["(fingerprint differs)"])
                            + "\nUse --force to continue it with the current inputs (done cells are kept), "
                              "or --new to start a fresh matrix directory.")
                    _adopt_plan(matrix_dir, staging, old, plan)
                else:
                    plan = old
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        except BaseException:
            lock.release()
            raise
        return matrix_dir, plan, lock
    staging, plan = _stage_plan(results_dir, build)
    lock = matrix_lock(staging).acquire()  # the flock stays with the file across the rename
    matrix_dir = new_matrix_dir(results_dir, plan.name)
    os.rename(staging, matrix_dir)
    lock.path = Path(matrix_dir) / LOCK_FILE
    return matrix_dir, plan, lock
