"""Matrix scheduler: runs the unfinished cells of a plan as separate training processes.

The pieces: lib.matrix.gpus decides how many cells fit at once and which GPUs each
gets; lib.matrix.cell runs one attempt of one cell (lib.matrix.process starts and
stops its processes); lib.matrix.console prints cell output and the progress line.
This module is the loop that ties them together, plus `check`; one cell in the foreground (a Slurm
array task) is lib.matrix.foreground.

Resume: done cells are skipped; a cell with a checkpoint is restarted with
--resume; a failed cell is retried only when asked (retry_failed), from scratch.

Failures mark the cell failed with a reason and the matrix goes on, unless
stop_on_failure: then no new cell starts and the running ones finish.

CPU cells (device cpu, or auto without a GPU) never train two at once: they would share the cores, and
each would record half a machine's tokens/s and get half as far in its time budget. The scheduler starts
one at a time and holds the matrix's per-host CPU lock while it trains, which a Slurm/local array task
(lib.matrix.foreground) waits for, so `submit --cluster local` runs them one after another too. Only `check`, whose
2-iteration cells record nothing, runs two at once (cpu_parallel).

Interrupts: Ctrl-C / SIGTERM stops the running cells (SIGTERM to each cell's
process group, SIGKILL after a grace period) and leaves them pending, so the
next `continue` resumes them. If the runner itself is killed outright, the
kernel sends each cell SIGTERM (PR_SET_PDEATHSIG); its cell lock is released
when it exits, and the next runner stops whatever is left in a dead runner's
cell process group (torchrun workers) before resuming the cell.

The runner imports torch and the trainer once and forks each cell from itself (ForkedTrainer): the cells run
the same lib.runs.train.main as an exec'd cell process without paying torch's start-up each time. GPU cells
are forked too while the runner has not started CUDA (it never does itself: GPUs are counted through NVML).
`check` runs its tiny cells through the same scheduler.

Compilation: cells of one variant compile the same graphs (the seed changes none). While one of them is
compiling, no other cell of that variant starts (another variant's takes the free GPU instead); once it logged
its warm-up (gpt2.io.WARM_MARK) the next finds the graphs in the compiler's on-disk cache and compiles in
seconds, instead of compiling them again beside it, cold and competing for the CPU.
"""

import dataclasses
import os
import signal
import sys
import threading
import time

from lib.matrix.cell import CellProcess
from lib.matrix.console import Console, Progress, hms
from lib.matrix.gpus import check_feasible, gpus_needed, parallel_cells, visible_gpus
from lib.matrix.process import ForkedTrainer, group_alive, process_alive, stop_group
from lib.matrix.state import CONSOLE_LOG, MatrixLocked, cell_lock, cpu_lock, read_state


@dataclasses.dataclass
class RunOptions:
    stop_on_failure: bool = False
    retry_failed: bool = False
    parallel_cap: int = 0  # MATRIX_PARALLEL; 0 = no cap
    cpu_parallel: int = 1  # CPU cells at once: 1 (they would share the cores), except check's tiny cells
    gpu_ids: list | None = None  # None: detect
    train_command: list | None = None  # None: [python, -m, lib.runs.train]
    extra_env: dict = dataclasses.field(default_factory=dict)
    grace_s: float = 30.0  # SIGTERM -> SIGKILL delay when stopping cells
    orphan_wait_s: float = 30.0  # how long to wait for a dead runner's cell to exit
    poll_s: float = 0.2
    stream: object = None  # console stream (default sys.stdout)
    live: bool | None = None  # redraw the progress line in place (default: stream is a TTY)
    echo: bool = True  # echo cell output to the console
    # Fork cells from this process with torch already imported; None: with the real trainer (run_matrix).
    preload_trainer: bool | None = None

    def cell_process(self, matrix_dir, cell, console, gpus=None, runner="local") -> CellProcess:
        return CellProcess(matrix_dir, cell, console, gpus=gpus, runner=runner, train_command=self.train_command,
                           extra_env=self.extra_env, fork=bool(self.preload_trainer))


@dataclasses.dataclass
class Outcome:
    done: list
    failed: list  # [(label, reason)]
    pending: list  # cells not finished (interrupted, stopped, or running elsewhere)
    interrupted: bool = False
    stopped_on_failure: bool = False

    @property
    def complete(self) -> bool:
        return not self.pending and not self.interrupted


# ---- the matrix --------------------------------------------------------------------

def cells_to_run(matrix_dir, plan, options: RunOptions, console) -> tuple:
    """(cells to run in plan order, cells left alone because another process is running them)."""
    todo, elsewhere = [], []
    for cell in plan.cells:
        state = read_state(matrix_dir, cell.id)
        if not state.wants_run(options.retry_failed):
            continue
        if state.status == "running":
            runner_alive = process_alive(state.host, state.runner_pid)
            if not runner_alive and state.pgid and group_alive(state.pgid):
                # what is left of a cell whose runner died (e.g. torchrun workers that outlived train.py)
                console.message(f"[{cell.label}] its runner died; stopping its leftover processes "
                                f"(group {state.pgid})")
                stop_group(state.pgid, options.orphan_wait_s)
            lock = cell_lock(matrix_dir, cell.id)
            if lock.is_held_elsewhere():
                wait_s = 0.0 if runner_alive else options.orphan_wait_s
                console.message(f"[{cell.label}] still held by {state.runner} on {state.host}; "
                                f"{'waiting up to %.0f s for it to exit' % wait_s if wait_s else 'skipping'}")
                try:
                    lock.acquire(wait_s)
                    lock.release()
                except MatrixLocked:
                    elsewhere.append(cell)
                    continue
        todo.append(cell)
    return todo, elsewhere


class _Scheduler:
    """The GPU pool and the cells running on it: start what fits, collect what ended."""

    def __init__(self, matrix_dir, plan, todo, gpu_ids, parallel, options, console, outcome):
        self.matrix_dir, self.options, self.console, self.outcome = matrix_dir, options, console, outcome
        self.gpu_ids, self.parallel = gpu_ids, parallel
        self.queue = list(todo)
        self.free_gpus = list(gpu_ids)
        self.running = {}  # cell id -> CellProcess
        self.cpu_locks = {}  # cell id -> the per-host CPU lock its training holds (cpu_parallel 1)
        self.compiled = set()  # variants a cell of which finished its warm-up here: their graphs are cached
        self.progress = Progress(plan, parallel)

    def show_progress(self, force=False) -> None:
        self.console.status(self.progress.text(self.matrix_dir, list(self.running.values())), force=force)

    def compiling(self, cell) -> bool:
        """Whether a running cell of `cell`'s variant is compiling graphs that no cell of it has cached yet: `cell`
        would compile them again beside it, cold and competing for the CPU; after that warm-up it finds them."""
        if not cell.compiles or cell.variant in self.compiled:
            return False
        same = [p for p in self.running.values() if p.cell.variant == cell.variant]
        return bool(same) and not any(p.warmed for p in same)

    def next_ready(self):
        """(cell, GPUs it needs) of the cell to start now, or None. GPU cells start in plan order, except that one
        whose variant another cell is compiling waits for that compilation and the next starts in its place; CPU
        cells start in plan order. A CPU cell waiting for the CPU does not hold up the GPU cells behind it, nor
        the other way round."""
        heads = {}
        for cell in self.queue:  # the first GPU cell (not waiting for a compilation) and the first CPU cell
            gpu = gpus_needed(cell, self.gpu_ids) > 0
            if not (gpu and self.compiling(cell)):
                heads.setdefault(gpu, cell)
        for cell in sorted(heads.values(), key=self.queue.index):
            need = gpus_needed(cell, self.gpu_ids)
            if (need and need <= len(self.free_gpus)) or (not need and self.cpu_free(cell)):
                return cell, need
        return None

    def start_ready(self) -> None:
        """Start queued cells while a slot is free and a cell's GPUs (or the CPU) are."""
        while self.queue and len(self.running) < self.parallel and not self.outcome.stopped_on_failure:
            ready = self.next_ready()
            if ready is None:
                return
            cell, need = ready
            gpus, self.free_gpus = self.free_gpus[:need], self.free_gpus[need:]
            self.queue.remove(cell)
            proc = self.options.cell_process(self.matrix_dir, cell, self.console,
                                             gpus=gpus if self.gpu_ids else None)
            try:
                proc.start()
            except MatrixLocked as err:  # another process took it in the meantime
                self.console.message(f"[{cell.label}] skipped: {err}")
                self.outcome.pending.append(cell.label)
                self.free_gpus += gpus
                self.release_cpu(cell.id)
                continue
            self.running[cell.id] = proc
            self.show_progress(force=True)

    def cpu_free(self, cell) -> bool:
        """Whether a CPU cell may start now: fewer than cpu_parallel CPU cells running, and (for one at a time)
        the per-host CPU lock taken for it, so a Slurm/local task of this matrix waits meanwhile."""
        on_cpu = [c for c, p in self.running.items() if not gpus_needed(p.cell, self.gpu_ids)]
        if len(on_cpu) >= self.options.cpu_parallel:
            return False
        if self.options.cpu_parallel == 1:
            try:
                self.cpu_locks[cell.id] = cpu_lock(self.matrix_dir).acquire()
            except MatrixLocked:
                return False
        return True

    def release_cpu(self, cell_id) -> None:
        lock = self.cpu_locks.pop(cell_id, None)
        if lock is not None:
            lock.release()

    def collect_finished(self) -> None:
        """Record every cell whose process ended and give its GPUs (or the CPU) back."""
        for cell_id in [cid for cid, p in self.running.items() if p.poll() is not None]:
            proc = self.running.pop(cell_id)
            if proc.warmed:
                self.compiled.add(proc.cell.variant)
            self.free_gpus += proc.gpus or []
            state = proc.finish()
            self.release_cpu(cell_id)
            self.progress.durations.append(proc.elapsed_s())
            label = proc.cell.label
            if state.status == "done":
                self.outcome.done.append(label)
                self.console.message(f"[{label}] done in {hms(proc.elapsed_s())}")
            else:
                self.outcome.failed.append((label, state.failure_reason))
                self.console.message(f"[{label}] FAILED: {state.failure_reason} (log: {proc.run_dir / CONSOLE_LOG})")
                if self.options.stop_on_failure and not self.outcome.stopped_on_failure:
                    self.outcome.stopped_on_failure = True
                    self.console.message("stopping: no new cells start (stop on failure); running cells finish")
            self.show_progress(force=True)


def run_matrix(matrix_dir, plan, options: RunOptions = None) -> Outcome:
    """Run every unfinished cell of `plan`; the caller holds the matrix lock."""
    options = options or RunOptions()
    console = Console(options.stream, options.live, options.echo)
    gpu_ids = visible_gpus() if options.gpu_ids is None else list(options.gpu_ids)
    todo, elsewhere = cells_to_run(matrix_dir, plan, options, console)
    check_feasible(todo, gpu_ids)
    if options.preload_trainer is None:  # the real trainer (not a test's stand-in command)
        options = dataclasses.replace(options, preload_trainer=options.train_command is None)
    if options.preload_trainer:
        ForkedTrainer.preload(compiles=any(c.compiles for c in todo))
        if any(gpus_needed(c, gpu_ids) for c in todo) and not ForkedTrainer.cuda_fork_safe():
            console.message("GPU cells start as new processes: this process has started CUDA, so a forked "
                            "child could not use it")
            options = dataclasses.replace(options, preload_trainer=False)
    parallel = parallel_cells(todo, gpu_ids, options.parallel_cap, options.cpu_parallel)
    outcome = Outcome(done=[], failed=[], pending=[c.label for c in elsewhere])
    pool = _Scheduler(matrix_dir, plan, todo, gpu_ids, parallel, options, console, outcome)
    stop = {"signal": None}

    def on_signal(signum, _frame):
        if stop["signal"] is not None:  # second Ctrl-C: no more grace
            for proc in pool.running.values():
                proc.signal(signal.SIGKILL)
        stop["signal"] = signum

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} \
        if threading.current_thread() is threading.main_thread() else {}
    console.message(f"matrix {plan.name}: {len(todo)} of {len(plan.cells)} cells to run, {parallel} at once"
                    f" ({'GPUs ' + ','.join(gpu_ids) if gpu_ids else 'no GPU'}); {matrix_dir}")
    last_status = 0.0
    try:
        while (pool.queue or pool.running) and stop["signal"] is None:
            pool.start_ready()
            pool.collect_finished()
            if outcome.stopped_on_failure and not pool.running:
                break
            if time.monotonic() - last_status > 1.0:
                pool.show_progress()
                last_status = time.monotonic()
            time.sleep(options.poll_s)
    finally:
        if pool.running:
            stop_cells(list(pool.running.values()), options.grace_s, console)
            outcome.interrupted = True
            outcome.pending += [p.cell.label for p in pool.running.values()]
        for cell_id in list(pool.cpu_locks):
            pool.release_cpu(cell_id)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        console.close()
    outcome.pending += [c.label for c in pool.queue]
    outcome.interrupted = outcome.interrupted or stop["signal"] is not None
    return outcome


def stop_cells(procs, grace_s, console) -> None:
    """SIGTERM every running cell, SIGKILL what is left after grace_s; they stay pending for a resume."""
    console.message(f"stopping {len(procs)} running cell(s); they resume on `continue`")
    for proc in procs:
        proc.interrupted = True
        proc.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.2)
    for proc in procs:
        if proc.poll() is None:
            proc.signal(signal.SIGKILL)
        proc.finish()


def check_cells(matrix_dir, plan, gpu_ids, stream=None) -> Outcome:
    """`check`: run every (tiny) cell with little overhead and show only results and failing logs.

    Without GPUs, as many cells run at once as there are cores (at most 2), one thread each:
    a tiny model gains nothing from more threads, and start-up dominates.
    """
    cores = os.cpu_count() or 1
    cpu_parallel = 1 if gpu_ids else max(1, min(2, cores))
    options = RunOptions(gpu_ids=gpu_ids, cpu_parallel=cpu_parallel, echo=False, grace_s=5, stream=stream,
                         live=False, extra_env={"OMP_NUM_THREADS": str(max(1, cores // cpu_parallel))})
    outcome = run_matrix(matrix_dir, plan, options)
    console = stream or sys.stdout
    for label, _reason in outcome.failed:
        cell = next(c for c in plan.cells if c.label == label)
        log = (cell.run_dir(matrix_dir) / CONSOLE_LOG).read_text(errors="replace").splitlines()
        console.write(f"---- last lines of [{label}] {cell.run_dir(matrix_dir) / CONSOLE_LOG}\n")
        console.write("\n".join(log[-15:]) + "\n")
    return outcome
