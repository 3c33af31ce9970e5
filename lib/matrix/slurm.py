"""Run the cells of a matrix on a Slurm cluster through submitit: one array job, one cell per task.

    python -m scripts.matrix submit --config .config --partition gpu [--account A] [--wait]

`submit` plans the matrix exactly like `run` (same validation, same directory
choice and plan fingerprint check), then submits every unfinished cell as one
task of a single Slurm array job. Each task runs CellTask(matrix_dir, cell_id),
which is lib.matrix.foreground.run_single_cell: it takes the cell's lock, runs
lib.runs.train (with --resume when the cell has a checkpoint) on the GPUs Slurm
gave the task (CUDA_VISIBLE_DEVICES), and writes the cell's state.json. So the
local runner, `status`, `continue` and `report` all work on the same directory:
a cell being trained by a task holds its lock and a local runner leaves it alone.

Time limits: a task asks for the cell's budget plus 25% and 30 minutes for
start-up, compilation and evaluation (override with --timeout-min). When Slurm
pre-empts a task or it reaches its limit, submitit requeues it (CellTask is
Checkpointable) and the new attempt resumes from the cell's last checkpoint.

submitit keeps its own logs and pickles under <matrix_dir>/slurm/; each cell's
output is also in cells/<id>/console.log. `--cluster local` runs the same tasks
as local processes (submitit's LocalExecutor), which is how the tests exercise
this path; its tasks all start at once, and CPU cells then take turns on the
matrix's per-host CPU lock (lib/matrix/scheduler.py), so each task's time limit
covers the cells before it.

The pickles are a trust boundary: a task unpickles `*_submitted.pkl` and runs the
function in it, and `wait` unpickles each task's result. Whoever can write into
slurm/ can run code as the submitting user. So slurm/ is created private (0700),
and a slurm/ (or a matrix directory) that is group- or world-writable, is not a
plain directory, or belongs to another user is refused before anything is written
to or read from it.
"""

import dataclasses
import math
import os
import shutil
import stat
from pathlib import Path

import submitit

from gpt2.io import REPO_ROOT
from lib.matrix.gpus import gpus_needed, visible_gpus
from lib.matrix.plan import load_plan
from lib.matrix.foreground import run_single_cell
from lib.matrix.scheduler import RunOptions
from lib.matrix.state import CellState, read_state, write_state

SLURM_DIR = "slurm"


class SlurmUnavailable(Exception):
    """submitit found no cluster to submit to."""


class UnsafeDirectory(Exception):
    """A directory that would hold submitit's pickles is writable or owned by someone else; the message says how
    to fix it."""


def _check_private(path: Path) -> None:
    """Refuse `path` unless it is a real directory of ours that no group or other user can write into."""
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeDirectory(f"{path} is not a directory (a symlink or a file); submitit's job pickles run as "
                              f"code, so they go only into a private directory of yours: remove it")
    if info.st_uid != os.getuid():
        raise UnsafeDirectory(f"{path} belongs to uid {info.st_uid}, not you (uid {os.getuid()}): its owner could "
                              f"replace a job pickle, which runs as code; use a matrix directory of your own (--new)")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeDirectory(f"{path} is group- or world-writable (mode {stat.S_IMODE(info.st_mode):04o}): anyone "
                              f"who can write there could replace a job pickle, which runs as code; "
                              f"`chmod go-w {path}` (and check what is in it) before submitting")


def private_slurm_dir(matrix_dir) -> Path:
    """<matrix_dir>/slurm, created 0700 (whatever the umask) or checked, with its matrix directory, as private."""
    matrix_dir = Path(matrix_dir)
    _check_private(matrix_dir)
    folder = matrix_dir / SLURM_DIR
    try:
        os.mkdir(folder, 0o700)
        os.chmod(folder, 0o700)  # mkdir's mode is filtered by the umask; this is not
    except FileExistsError:
        pass
    _check_private(folder)
    return folder


class CellTask(submitit.helpers.Checkpointable):
    """What one array task runs: one cell of the matrix, to completion or failure."""

    def __init__(self, retry_failed=False):
        self.retry_failed = retry_failed

    def __call__(self, matrix_dir: str, cell_id: str) -> dict:
        env = submitit.JobEnvironment()
        plan = load_plan(matrix_dir)
        state = run_single_cell(matrix_dir, plan, cell_id, runner=f"slurm:{env.job_id}",
                                options=RunOptions(retry_failed=self.retry_failed))
        return dataclasses.asdict(state)

    # checkpoint(): submitit's default resubmits the same call on pre-emption or timeout; the cell
    # resumes from its own checkpoint, so no extra state is needed here.


def require(cluster) -> None:
    """Raise SlurmUnavailable when `cluster` cannot take jobs from this machine."""
    if cluster == "slurm" and shutil.which("sbatch") is None:
        raise SlurmUnavailable("sbatch not found: this machine is not a Slurm submit host; use "
                               "`make matrix` here (or --cluster local to try the array tasks locally)")


def _timeout_min(plan) -> int:
    budget_s = max(cell.max_time_s for cell in plan.cells)
    if not budget_s:
        return 24 * 60  # iteration-bound cells: a day, unless --timeout-min says otherwise
    return int(math.ceil(budget_s * 1.25 / 60)) + 30


def make_executor(matrix_dir, plan, cluster="slurm", partition=None, account=None, timeout_min=0,
                  array_parallelism=None, cpus_per_task=None, mem_gb=None) -> submitit.AutoExecutor:
    """An AutoExecutor sized for the plan's cells (GPUs per task = CONFIG_TRAIN_NUM_GPUS).

    cluster: "slurm", or "local" (submitit's LocalExecutor: every task starts at once on this
    machine, so it suits CPU cells and tests, not a GPU pool; `run` schedules GPUs properly).
    """
    gpus = max((cell.num_gpus for cell in plan.cells if cell.device != "cpu"), default=0)
    require(cluster)
    if not timeout_min and cluster == "local" and not any(gpus_needed(c, visible_gpus()) for c in plan.cells):
        # local CPU tasks start together and train one after another: the last waits for all the others
        timeout_min = _timeout_min(plan) * len(plan.cells)
    executor = submitit.AutoExecutor(folder=private_slurm_dir(matrix_dir) / "%j", cluster=cluster)
    # The pickled task imports lib.*: make the repository importable wherever the task starts.
    setup = [f"export PYTHONPATH={REPO_ROOT}${{PYTHONPATH:+:$PYTHONPATH}}"]
    params = {"name": f"matrix-{plan.name}", "timeout_min": timeout_min or _timeout_min(plan),
              "nodes": 1, "tasks_per_node": 1, "gpus_per_node": gpus, "cpus_per_task": cpus_per_task,
              "mem_gb": mem_gb, "slurm_setup": setup, "local_setup": setup,
              "slurm_array_parallelism": array_parallelism, "slurm_partition": partition,
              "slurm_account": account}
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor


def submit_cells(matrix_dir, plan, executor, retry_failed=False) -> list:
    """Submit every unfinished cell as one array job; returns the submitit jobs (one per cell)."""
    matrix_dir = str(Path(matrix_dir).resolve())
    cells = [cell for cell in plan.cells if read_state(matrix_dir, cell.id).wants_run(retry_failed)]
    if not cells:
        return []
    jobs = executor.map_array(CellTask(retry_failed), [matrix_dir] * len(cells), [c.id for c in cells])
    for cell, job in zip(cells, jobs):
        state = read_state(matrix_dir, cell.id)
        if state.status != "running":
            state.note = f"submitted as job {job.job_id}"
            write_state(matrix_dir, cell.id, state)
    return jobs


def wait(jobs) -> list:
    """Wait for every task and return the cells' states.

    A task that died without finishing its cell (cancelled, node failure) leaves the cell
    "running" with a free lock, or pending; `continue` or another submit resumes it.
    """
    states = []
    for job in jobs:
        try:
            states.append(CellState(**job.result()))
        except Exception as err:  # the task itself failed, not the training
            matrix_dir, cell_id = job.submission().args
            print(f"task {job.job_id} for cell {cell_id} ended without a result: {str(err)[:300]}")
            states.append(read_state(matrix_dir, cell_id))
    return states
