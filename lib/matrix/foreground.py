"""One matrix cell in the foreground: what a Slurm (or `submit --cluster local`) array task runs.

The cell's GPUs come from the environment (the cluster chose them). A CPU cell first takes the matrix's
per-host CPU lock, as the scheduler does for its own CPU cells (lib/matrix/scheduler.py), so CPU cells never
train two at once on one host however they were started.
"""

import math

from lib.matrix.console import Console
from lib.matrix.gpus import gpus_needed, visible_gpus
from lib.matrix.scheduler import RunOptions, stop_cells
from lib.matrix.state import CellState, MatrixLocked, cpu_lock, read_state


def run_single_cell(matrix_dir, plan, cell_id, runner="local", options: RunOptions = None) -> CellState:
    """Run one cell in the foreground (a Slurm array task does this); GPUs come from the environment.

    A cell that is done, or held by another process, is left alone and its state returned.
    """
    options = options or RunOptions()
    console = Console(options.stream, live=False, echo=options.echo)
    cell = plan.cell(cell_id)
    state = read_state(matrix_dir, cell.id)
    if not state.wants_run(options.retry_failed):
        console.message(f"[{cell.label}] already {state.status}; nothing to do")
        return state
    cpu = None
    if not gpus_needed(cell, visible_gpus()):  # one CPU cell at a time on this host (see the module's docstring)
        cpu = cpu_lock(matrix_dir)
        try:
            cpu.acquire()
        except MatrixLocked as err:
            console.message(f"[{cell.label}] waiting for the CPU: {err}")
            cpu.acquire(math.inf)
        state = read_state(matrix_dir, cell.id)  # another process may have run it meanwhile
        if not state.wants_run(options.retry_failed):
            cpu.release()
            console.message(f"[{cell.label}] already {state.status}; nothing to do")
            return state
    try:
        state = _run_in_foreground(matrix_dir, cell, runner, options, console)
    finally:
        if cpu is not None:
            cpu.release()
    return state


def _run_in_foreground(matrix_dir, cell, runner, options, console) -> CellState:
    proc = options.cell_process(matrix_dir, cell, console, runner=runner)
    try:
        proc.start()
    except MatrixLocked as err:
        console.message(f"[{cell.label}] skipped: {err}")
        return read_state(matrix_dir, cell.id)
    try:
        proc.proc.wait()
    except BaseException:
        stop_cells([proc], options.grace_s, console)
        raise
    state = proc.finish()
    console.message(f"[{cell.label}] {state.status}" + (f": {state.failure_reason}" if state.failure_reason else ""))
    return state
