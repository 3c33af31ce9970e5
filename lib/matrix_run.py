"""Matrix scheduler: runs the cells of a plan as separate training processes.

Each cell runs as `python scripts/train.py --config cells/<id>/cell.config
--run-dir cells/<id> [--resume]` (train.py re-launches itself under torchrun
when the cell uses more than one GPU). Its output goes to cells/<id>/console.log
and to the console with a "[V1/s2] " prefix; a progress line shows cells done,
running, failed and left with an ETA.

GPU pool: with N visible GPUs (CUDA_VISIBLE_DEVICES, else torch's count) and
cells of g GPUs (CONFIG_TRAIN_NUM_GPUS), floor(N/g) cells run at once, capped by
CONFIG_MATRIX_PARALLEL when it is above 0; each cell is pinned to its GPUs with
CUDA_VISIBLE_DEVICES. On a machine without GPUs cells run one after another.
GPUs are only ever selected, never reset or reconfigured.

Resume: done cells are skipped; a cell with a checkpoint is restarted with
--resume (train.py charges the time already spent to its budget); a failed cell
is retried only when asked (retry_failed), from scratch, with its previous
outputs kept under attempt-<n>/.

Failures (non-zero exit, NaN, out of memory, killed) mark the cell failed with
a reason and the matrix goes on, unless stop_on_failure: then no new cell
starts and the running ones finish.

Interrupts: Ctrl-C / SIGTERM stops the running cells (SIGTERM to each cell's
process group, SIGKILL after a grace period) and leaves them pending, so the
next `continue` resumes them. If the runner itself is killed outright, the
kernel sends each cell SIGTERM (PR_SET_PDEATHSIG); its cell lock is released
when it exits, and the next runner stops whatever is left in a dead runner's
cell process group (torchrun workers) before resuming the cell.

`check` runs its tiny cells through the same scheduler, but on CPU it forks them
from a process that has already imported torch (ForkedTrainer): the cells run
the same gpt2.train.main as scripts/train.py without paying torch's start-up
each time.
"""

import ctypes
import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from lib import config as kcfg
from lib.matrix_state import CellState, MatrixLocked, cell_lock, counts, read_state, read_states, write_state
from lib.runs import CHECKPOINT_NAME, METRICS_NAME, read_json

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = REPO_ROOT / "scripts" / "train.py"
CONSOLE_LOG = "console.log"
# Files of the run directory that belong to the matrix, not to a training attempt.
MATRIX_FILES = {"cell.config", "state.json", CONSOLE_LOG, ".lock"}

_OOM = re.compile(r"out of memory|OutOfMemoryError|Cannot allocate memory|std::bad_alloc", re.I)
_NAN = re.compile(r"\b(nan|non-finite|inf)\b.*\bloss\b|\bloss\b.*\b(nan|non-finite|inf)\b", re.I)
_EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt)):?\s*(.*)$")


class SchedulerError(Exception):
    """The matrix cannot run on this machine as planned (e.g. not enough GPUs)."""


@dataclasses.dataclass
class RunOptions:
    stop_on_failure: bool = False
    retry_failed: bool = False
    parallel_cap: int = 0  # MATRIX_PARALLEL; 0 = no cap
    cpu_parallel: int = 1  # cells at once when no GPU is used (check raises it)
    gpu_ids: list | None = None  # None: detect
    train_command: list | None = None  # None: [python, scripts/train.py]
    extra_env: dict = dataclasses.field(default_factory=dict)
    grace_s: float = 30.0  # SIGTERM -> SIGKILL delay when stopping cells
    orphan_wait_s: float = 30.0  # how long to wait for a dead runner's cell to exit
    poll_s: float = 0.2
    stream: object = None  # console stream (default sys.stdout)
    live: bool | None = None  # redraw the progress line in place (default: stream is a TTY)
    echo: bool = True  # echo cell output to the console
    preload_trainer: bool = False  # fork cells from this process with torch already imported (check on CPU)


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


# ---- GPUs ----------------------------------------------------------------------

def visible_gpus(environ=None) -> list:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES when set, else every GPU torch sees."""
    environ = os.environ if environ is None else environ
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no torch or no driver: no GPUs
        return []


def gpus_needed(cell, gpu_ids) -> int:
    """GPUs a cell occupies: 0 for CPU cells (device cpu, or auto without GPUs)."""
    if cell.device == "cpu" or (cell.device == "auto" and not gpu_ids):
        return 0
    return cell.num_gpus


def check_feasible(cells, gpu_ids) -> None:
    """Refuse up front a cell that can never get its GPUs here (instead of failing it hours later)."""
    for cell in cells:
        if cell.device == "cpu":
            continue
        short = len(gpu_ids) < cell.num_gpus
        # device auto without any GPU falls back to one CPU process, which only works for 1-GPU cells
        if short and (cell.device == "cuda" or gpu_ids or cell.num_gpus > 1):
            raise SchedulerError(f"cell {cell.label} needs {cell.num_gpus} GPU(s) (CONFIG_TRAIN_NUM_GPUS, device "
                                 f"{cell.device}) but {len(gpu_ids)} are visible; lower CONFIG_TRAIN_NUM_GPUS "
                                 f"or run on a machine with more GPUs")


def parallel_cells(cells, gpu_ids, cap=0, cpu_parallel=1) -> int:
    """How many cells run at once: floor(N / g) on GPUs (capped by `cap`), cpu_parallel on CPU."""
    needs = [gpus_needed(c, gpu_ids) for c in cells] or [0]
    widest = max(needs)
    n = len(gpu_ids) // widest if widest else cpu_parallel
    if cap > 0:
        n = min(n, cap)
    return max(n, 1)


# ---- console -------------------------------------------------------------------

class Console:
    """Prefixed cell output plus one progress line (redrawn in place on a terminal)."""

    def __init__(self, stream=None, live=None, echo=True):
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty() if live is None else live
        self.echo = echo
        self.status_text = ""
        self._last_status_print = 0.0
        self._lock = threading.Lock()

    def _clear(self):
        if self.live and self.status_text:
            self.stream.write("\r\033[K")

    def _redraw(self):
        if self.live and self.status_text:
            self.stream.write(self.status_text[: shutil.get_terminal_size().columns - 1])
        self.stream.flush()

    def cell_line(self, label, text):
        if not self.echo:
            return
        with self._lock:
            self._clear()
            self.stream.write(f"[{label}] {text}\n")
            self._redraw()

    def message(self, text):
        with self._lock:
            self._clear()
            self.stream.write(text + "\n")
            self._redraw()

    def status(self, text, force=False):
        """Live: redraw. Otherwise print when forced (a cell started or ended) or once a minute."""
        with self._lock:
            changed = text != self.status_text
            self._clear()
            self.status_text = text
            if self.live:
                self._redraw()
            elif changed and (force or time.monotonic() - self._last_status_print > 60):
                self.stream.write(text + "\n")
                self.stream.flush()
                self._last_status_print = time.monotonic()

    def close(self):
        with self._lock:
            if self.live and self.status_text:
                self.stream.write("\n")
                self.stream.flush()
            self.status_text = ""


def _hms(seconds) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# ---- one cell --------------------------------------------------------------------

def _die_with_parent_hook():
    """preexec_fn: the child gets SIGTERM when the runner dies (Linux), so no cell trains orphaned."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None
    pr_set_pdeathsig = 1
    return lambda: libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def _archive_attempt(run_dir: Path, attempt: int) -> None:
    """Move a previous attempt's trainer outputs out of the way so a fresh start begins clean."""
    leftovers = [p for p in run_dir.iterdir() if p.name not in MATRIX_FILES and not p.name.startswith("attempt-")]
    if not leftovers:
        return
    dest = run_dir / f"attempt-{attempt}"
    dest.mkdir(exist_ok=True)
    for path in leftovers:
        shutil.move(str(path), dest / path.name)


def failure_reason(exit_code, metrics, log_text) -> str:
    """Why a cell failed, most specific first: the trainer's own reason, then OOM/NaN, then the exception."""
    code = f"exit code {exit_code}"
    if exit_code is not None and exit_code < 0:
        try:
            name = signal.Signals(-exit_code).name
        except ValueError:
            name = f"signal {-exit_code}"
        code = f"killed by {name}" + (" (out of host memory?)" if exit_code == -signal.SIGKILL else "")
    if metrics and metrics.get("status") == "failed" and metrics.get("failure_reason"):
        return f"{metrics['failure_reason']} ({code})"
    lines = log_text.splitlines()
    if any(_OOM.search(line) for line in lines[-200:]):
        return f"out of memory ({code})"
    if any(_NAN.search(line) for line in lines[-200:]):
        return f"NaN/inf loss ({code})"
    for line in reversed(lines[-200:]):
        match = _EXCEPTION.match(line.strip())
        if match:
            return f"{match.group(1)}: {match.group(2)[:200]} ({code})".replace(": (", " (")
    if exit_code == 0:
        if not metrics:
            return "train.py exited 0 without writing metrics.json"
        if metrics.get("status") != "done":
            return f"train.py exited 0 but metrics.json says status {metrics.get('status')!r}"
        return "final validation loss is not finite"
    return code


def _finished_ok(exit_code, metrics) -> bool:
    if exit_code != 0 or not metrics or metrics.get("status") != "done":
        return False
    loss = metrics.get("final_val_loss")
    return isinstance(loss, (int, float)) and loss == loss and abs(loss) != float("inf")


def _runner_alive(state: CellState) -> bool:
    if state.host != socket.gethostname() or not state.runner_pid:
        return True  # cannot tell from here: assume it is
    try:
        os.kill(state.runner_pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _group_alive(pgid) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reap_orphans(cell, pgid, wait_s, console) -> None:
    """Stop what is left of a cell whose runner died (e.g. torchrun workers that outlived train.py)."""
    if not _group_alive(pgid):
        return
    console.message(f"[{cell.label}] its runner died; stopping its leftover processes (group {pgid})")
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + wait_s
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _group_alive(pgid):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class ForkedTrainer:
    """A Popen look-alike for `check` on CPU: a forked child of this process that calls gpt2.train.main.

    Each training process pays about 4 s importing torch and torch._dynamo (which
    torch.optim imports on first use) before its first step; for 2-iteration check
    cells that is nearly all of the time. preload() imports them once here, and every
    cell still gets its own process (own output, exit code, process group), forked
    instead of exec'd. Never used with CUDA: a CUDA context does not survive fork.
    """

    @staticmethod
    def preload() -> None:
        import gpt2.train  # noqa: F401  (torch, the model and the data code)
        import torch._dynamo  # noqa: F401

    def __init__(self, argv, env, cwd):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            self._child(argv, env, cwd, read_end, write_end)  # never returns
        os.close(write_end)
        self.pid, self.returncode = pid, None
        self.stdout = open(read_end, "rb")

    @staticmethod
    def _child(argv, env, cwd, read_end, write_end):
        code = 1
        try:
            os.setsid()
            os.close(read_end)
            os.dup2(write_end, 1)
            os.dup2(write_end, 2)
            os.close(write_end)
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            hook = _die_with_parent_hook()
            if hook:
                hook()
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.chdir(cwd)
            os.environ.clear()
            os.environ.update(env)
            sys.stdout = open(1, "w", buffering=1, closefd=False)  # fresh objects: no lock inherited from a thread
            sys.stderr = open(2, "w", buffering=1, closefd=False)
            sys.argv = list(argv[1:])
            import torch

            torch.set_num_threads(int(env.get("OMP_NUM_THREADS") or torch.get_num_threads()))
            from gpt2.train import main

            code = main(argv[2:], script=argv[1])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code if isinstance(code, int) else 1)

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self):
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


class CellProcess:
    """One attempt of one cell: acquire its lock, launch train.py, stream its output, record the outcome."""

    def __init__(self, matrix_dir, cell, gpus, console, options: RunOptions, runner="local"):
        self.matrix_dir = Path(matrix_dir)
        self.cell = cell
        self.gpus = gpus  # list of GPU ids, or None to inherit CUDA_VISIBLE_DEVICES (Slurm)
        self.console = console
        self.options = options
        self.runner = runner
        self.run_dir = cell.run_dir(matrix_dir)
        self.lock = cell_lock(matrix_dir, cell.id)
        self.proc = None
        self.started = None
        self._reader = None
        self._log = None
        self.interrupted = False

    def command(self, resume: bool) -> list:
        base = self.options.train_command or [sys.executable, str(TRAIN_SCRIPT)]
        cmd = [*base, "--config", str(self.cell.config_path(self.matrix_dir)), "--run-dir", str(self.run_dir)]
        return cmd + (["--resume"] if resume else [])

    def environment(self) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in kcfg.ENV_OVERRIDES}  # the plan holds the budget
        env["PYTHONUNBUFFERED"] = "1"
        if self.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpus)
        env.update(self.options.extra_env)
        return env

    def start(self, wait_for_lock_s=0.0) -> None:
        """Raises MatrixLocked if another process is training this cell."""
        self.lock.acquire(wait_for_lock_s)
        state = read_state(self.matrix_dir, self.cell.id)
        resume = (self.run_dir / CHECKPOINT_NAME).exists() and state.status != "failed"
        if not resume:
            _archive_attempt(self.run_dir, state.attempts)
        state.attempts += 1
        state.status, state.exit_code, state.failure_reason = "running", None, ""
        state.started_at, state.finished_at = time.time(), None
        state.runner, state.host, state.runner_pid = self.runner, socket.gethostname(), os.getpid()
        state.gpus = ",".join(self.gpus) if self.gpus is not None else os.environ.get("CUDA_VISIBLE_DEVICES", "")
        state.note = "resumed from checkpoint" if resume else ""
        write_state(self.matrix_dir, self.cell.id, state)

        cmd = self.command(resume)
        self._log = open(self.run_dir / CONSOLE_LOG, "ab")
        header = (f"==== attempt {state.attempts} ({'resume' if resume else 'fresh start'}) "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')} on {state.host}, GPUs [{state.gpus}]\n"
                  f"==== {' '.join(cmd)}{' (forked from the check runner)' if self.options.preload_trainer else ''}\n")
        self._log.write(header.encode())
        self._log.flush()
        self.console.cell_line(self.cell.label, f"start ({'resume' if resume else 'fresh'}, attempt "
                                                f"{state.attempts}, GPUs [{state.gpus or 'none'}])")
        self.started = time.monotonic()
        if self.options.preload_trainer:
            self.proc = ForkedTrainer(cmd, self.environment(), REPO_ROOT)
        else:
            self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=self.environment(), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, pass_fds=(self.lock.fd,),
                                         start_new_session=True, preexec_fn=_die_with_parent_hook())
        state.pgid = self.proc.pid  # a new session: the group id is the child's pid
        write_state(self.matrix_dir, self.cell.id, state)
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        """Copy the child's output to console.log and to the console, line by line (\\r counts as a break)."""
        pending = b""
        for chunk in iter(lambda: self.proc.stdout.read1(65536), b""):
            self._log.write(chunk)
            self._log.flush()
            pending += chunk
            *lines, pending = re.split(rb"\r\n|\r|\n", pending)
            for line in lines:
                if line.strip():
                    self.console.cell_line(self.cell.label, line.decode(errors="replace"))
        if pending.strip():
            self.console.cell_line(self.cell.label, pending.decode(errors="replace"))

    def poll(self):
        return self.proc.poll()

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started if self.started else 0.0

    def signal(self, sig) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def finish(self) -> CellState:
        """After the process ended: classify, write the state, release the lock."""
        exit_code = self.proc.wait()
        self._reader.join(timeout=10)
        self._log.close()
        state = read_state(self.matrix_dir, self.cell.id)
        state.exit_code = exit_code
        state.finished_at = time.time()
        state.elapsed_s = round(state.elapsed_s + self.elapsed_s(), 3)
        metrics = None
        metrics_path = self.run_dir / METRICS_NAME
        if metrics_path.exists() and metrics_path.stat().st_mtime >= state.started_at - 1:
            try:
                metrics = read_json(metrics_path)
            except (OSError, ValueError):
                metrics = None
        if self.interrupted:
            state.status = "pending"
            state.note = ("interrupted; resumes from its checkpoint" if (self.run_dir / CHECKPOINT_NAME).exists()
                          else "interrupted before its first checkpoint; restarts")
        elif _finished_ok(exit_code, metrics):
            state.status, state.failure_reason, state.note = "done", "", ""
        else:
            tail = (self.run_dir / CONSOLE_LOG).read_bytes()[-200_000:].decode(errors="replace")
            state.status, state.failure_reason = "failed", failure_reason(exit_code, metrics, tail)
        write_state(self.matrix_dir, self.cell.id, state)
        self.lock.release()
        return state


# ---- the matrix --------------------------------------------------------------------

def cells_to_run(matrix_dir, plan, options: RunOptions, console) -> tuple:
    """(cells to run in plan order, cells left alone because another process is running them)."""
    todo, elsewhere = [], []
    for cell in plan.cells:
        state = read_state(matrix_dir, cell.id)
        if state.status == "done" or (state.status == "failed" and not options.retry_failed):
            continue
        if state.status == "running":
            if not _runner_alive(state) and state.pgid:
                _reap_orphans(cell, state.pgid, options.orphan_wait_s, console)
            lock = cell_lock(matrix_dir, cell.id)
            if lock.is_held_elsewhere():
                wait_s = 0.0 if _runner_alive(state) else options.orphan_wait_s
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


class _Progress:
    def __init__(self, plan, parallel):
        self.plan = plan
        self.parallel = parallel
        self.t0 = time.monotonic()
        self.durations = []  # wall seconds of cells finished in this session

    def text(self, matrix_dir, running: dict) -> str:
        c = counts(read_states(matrix_dir, self.plan))
        left = c["pending"] + c["running"] - len(running)
        per_cell = (sum(self.durations) / len(self.durations) if self.durations
                    else max(cell.max_time_s for cell in self.plan.cells) or None)
        eta = "?"
        if per_cell:
            work = sum(max(per_cell - p.elapsed_s(), 0) for p, _ in running.values()) + left * per_cell
            eta = _hms(work / self.parallel)
        return (f"[{self.plan.name}] {c['done']} done, {len(running)} running, {c['failed']} failed, "
                f"{left} left | elapsed {_hms(time.monotonic() - self.t0)} | ETA {eta}")


def run_matrix(matrix_dir, plan, options: RunOptions = None) -> Outcome:
    """Run every unfinished cell of `plan`; the caller holds the matrix lock."""
    options = options or RunOptions()
    console = Console(options.stream, options.live, options.echo)
    gpu_ids = visible_gpus() if options.gpu_ids is None else list(options.gpu_ids)
    todo, elsewhere = cells_to_run(matrix_dir, plan, options, console)
    check_feasible(todo, gpu_ids)
    parallel = parallel_cells(todo, gpu_ids, options.parallel_cap, options.cpu_parallel)
    free_gpus = list(gpu_ids)
    running = {}  # cell id -> (CellProcess, gpu ids)
    outcome = Outcome(done=[], failed=[], pending=[c.label for c in elsewhere])
    progress = _Progress(plan, parallel)
    stop = {"signal": None}

    def on_signal(signum, _frame):
        if stop["signal"] is not None:  # second Ctrl-C: no more grace
            for proc, _ in running.values():
                proc.signal(signal.SIGKILL)
        stop["signal"] = signum

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} \
        if threading.current_thread() is threading.main_thread() else {}
    console.message(f"matrix {plan.name}: {len(todo)} of {len(plan.cells)} cells to run, {parallel} at once"
                    f" ({'GPUs ' + ','.join(gpu_ids) if gpu_ids else 'no GPU'}); {matrix_dir}")
    queue = list(todo)
    last_status = 0.0
    try:
        while queue or running:
            if stop["signal"] is not None:
                break
            while queue and len(running) < parallel and not outcome.stopped_on_failure:
                cell = queue[0]
                need = gpus_needed(cell, gpu_ids)
                if need > len(free_gpus):
                    break
                gpus, free_gpus = free_gpus[:need], free_gpus[need:]
                queue.pop(0)
                proc = CellProcess(matrix_dir, cell, gpus if gpu_ids else None, console, options)
                try:
                    proc.start()
                except MatrixLocked as err:  # another process took it in the meantime
                    console.message(f"[{cell.label}] skipped: {err}")
                    outcome.pending.append(cell.label)
                    free_gpus += gpus
                    continue
                running[cell.id] = (proc, gpus)
                console.status(progress.text(matrix_dir, running), force=True)
            for cell_id in [cid for cid, (p, _) in running.items() if p.poll() is not None]:
                proc, gpus = running.pop(cell_id)
                free_gpus += gpus
                state = proc.finish()
                progress.durations.append(proc.elapsed_s())
                if state.status == "done":
                    outcome.done.append(proc.cell.label)
                    console.message(f"[{proc.cell.label}] done in {_hms(proc.elapsed_s())}")
                else:
                    outcome.failed.append((proc.cell.label, state.failure_reason))
                    console.message(f"[{proc.cell.label}] FAILED: {state.failure_reason} "
                                    f"(log: {proc.run_dir / CONSOLE_LOG})")
                    if options.stop_on_failure and not outcome.stopped_on_failure:
                        outcome.stopped_on_failure = True
                        console.message("stopping: no new cells start (stop on failure); running cells finish")
                console.status(progress.text(matrix_dir, running), force=True)
            if outcome.stopped_on_failure and not running:
                break
            if time.monotonic() - last_status > 1.0:
                console.status(progress.text(matrix_dir, running))
                last_status = time.monotonic()
            time.sleep(options.poll_s)
    finally:
        if running:
            _stop_cells([p for p, _ in running.values()], options.grace_s, console)
            outcome.interrupted = True
            outcome.pending += [p.cell.label for p, _ in running.values()]
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        console.close()
    outcome.pending += [c.label for c in queue]
    outcome.interrupted = outcome.interrupted or stop["signal"] is not None
    return outcome


def _stop_cells(procs, grace_s, console) -> None:
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


def run_single_cell(matrix_dir, plan, cell_id, runner="local", options: RunOptions = None) -> CellState:
    """Run one cell in the foreground (a Slurm array task does this); GPUs come from the environment.

    A cell that is done, or held by another process, is left alone and its state returned.
    """
    options = options or RunOptions()
    console = Console(options.stream, live=False, echo=options.echo)
    cell = plan.cell(cell_id)
    state = read_state(matrix_dir, cell.id)
    if state.status == "done" or (state.status == "failed" and not options.retry_failed):
        console.message(f"[{cell.label}] already {state.status}; nothing to do")
        return state
    proc = CellProcess(matrix_dir, cell, None, console, options, runner=runner)
    try:
        proc.start()
    except MatrixLocked as err:
        console.message(f"[{cell.label}] skipped: {err}")
        return read_state(matrix_dir, cell.id)
    try:
        proc.proc.wait()
    except BaseException:
        _stop_cells([proc], options.grace_s, console)
        raise
    state = proc.finish()
    console.message(f"[{cell.label}] {state.status}" + (f": {state.failure_reason}" if state.failure_reason else ""))
    return state


def check_cells(matrix_dir, plan, gpu_ids, stream=None) -> Outcome:
    """`check`: run every (tiny) cell with little overhead and show only results and failing logs.

    Without GPUs, as many cells run at once as there are cores (at most 2), one thread each:
    a tiny model gains nothing from more threads, and start-up dominates.
    """
    cores = os.cpu_count() or 1
    cpu_parallel = 1 if gpu_ids else max(1, min(2, cores))
    options = RunOptions(gpu_ids=gpu_ids, cpu_parallel=cpu_parallel, echo=False, grace_s=5, stream=stream,
                         live=False, extra_env={"OMP_NUM_THREADS": str(max(1, cores // cpu_parallel))},
                         preload_trainer=not gpu_ids)
    if options.preload_trainer:
        ForkedTrainer.preload()
    outcome = run_matrix(matrix_dir, plan, options)
    console = stream or sys.stdout
    for label, _reason in outcome.failed:
        cell = next(c for c in plan.cells if c.label == label)
        log = (cell.run_dir(matrix_dir) / CONSOLE_LOG).read_text(errors="replace").splitlines()
        console.write(f"---- last lines of [{label}] {cell.run_dir(matrix_dir) / CONSOLE_LOG}\n")
        console.write("\n".join(log[-15:]) + "\n")
    return outcome
