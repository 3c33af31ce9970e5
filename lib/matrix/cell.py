"""One attempt of one matrix cell: lock it, launch train.py, stream its output, classify how it ended.

The attempt runs `python -m lib.runs.train --config cells/<id>/cell.config
--run-dir cells/<id> [--resume]` (train.py re-launches itself under torchrun when
the cell uses more than one GPU). Its output goes to cells/<id>/console.log and to
the console with a "[V1/s2] " prefix.

A cell with a checkpoint (that did not fail) resumes with --resume; train.py
charges the time already spent to its budget. A fresh start first moves a previous
attempt's outputs to attempt-<n>/, so a retried cell begins clean but nothing is lost.

Failures (non-zero exit, NaN, out of memory, killed) mark the cell failed with the
most specific reason found: the trainer's own (metrics.json), then OOM / NaN /
the last exception in the console log, then the exit code or signal.
"""

import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from lib import config as kcfg
from lib.matrix.plan import CELL_CONFIG
from lib.matrix.process import start_cell_process
from lib.matrix.state import CONSOLE_LOG, LOCK_FILE, LOCK_GRACE_S, STATE_FILE, CellState, cell_lock, read_state, \
    write_state
from gpt2.io import CHECKPOINT_NAME, METRICS_NAME, REPO_ROOT, WARM_MARK, read_json
from gpt2.train.run_dir import RUN_LOCK_ENV, RUN_LOCK_NAME
from lib.runs import train as train_entry

# Files of the run directory that belong to the matrix (or to no attempt in particular), not to a training
# attempt: they stay in place when an attempt's outputs move to attempt-<n>/.
MATRIX_FILES = {CELL_CONFIG, STATE_FILE, CONSOLE_LOG, LOCK_FILE, RUN_LOCK_NAME}

_OOM = re.compile(r"out of memory|OutOfMemoryError|Cannot allocate memory|std::bad_alloc", re.I)
_NAN = re.compile(r"\b(nan|non-finite|inf)\b.*\bloss\b|\bloss\b.*\b(nan|non-finite|inf)\b", re.I)
_EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt)):?\s*(.*)$")


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


def time_split(elapsed_s: float, metrics) -> str | None:
    """Where the cell process's wall time went, from its metrics.json and the runner's own clock; None when the
    trainer recorded no split. The trainer cannot record its own exit (it follows the last record), so that
    part is the runner's: elapsed - the trainer's process_s. The loop's parts are the run's totals, so for a
    resumed cell they cover earlier sessions too."""
    overhead = metrics.get("overhead") if isinstance(metrics, dict) else None
    if not isinstance(overhead, dict) or not isinstance(overhead.get("process_s"), (int, float)):
        return None

    def secs(value):
        return f"{value:.1f}" if isinstance(value, (int, float)) else "?"

    loop = [("training", metrics.get("train_time_s")), ("warm-up/compile", metrics.get("compile_time_s")),
            ("eval", metrics.get("eval_time_s")), ("checkpoints", metrics.get("checkpoint_time_s")),
            ("other", overhead.get("other_s"))]
    train_s = metrics.get("train_time_s")
    timed = isinstance(train_s, (int, float)) and train_s > 0
    ratio = f"; {elapsed_s / train_s:.2f}x its training time" if timed else ""
    return (f"time: {elapsed_s:.1f} s wall = {secs(overhead.get('startup_s'))} start-up + "
            f"{secs(overhead.get('setup_s'))} setup + loop ({', '.join(f'{secs(v)} {name}' for name, v in loop)}) + "
            f"{secs(overhead.get('teardown_s'))} closing + {elapsed_s - overhead['process_s']:.1f} exit after the "
            f"last record{ratio}")


def _finished_ok(exit_code, metrics) -> bool:
    if exit_code != 0 or not metrics or metrics.get("status") != "done":
        return False
    loss = metrics.get("final_val_loss")
    return isinstance(loss, (int, float)) and loss == loss and abs(loss) != float("inf")


def _archive_attempt(run_dir: Path, attempt: int) -> None:
    """Move a previous attempt's trainer outputs out of the way so a fresh start begins clean."""
    leftovers = [p for p in run_dir.iterdir() if p.name not in MATRIX_FILES and not p.name.startswith("attempt-")]
    if not leftovers:
        return
    dest = run_dir / f"attempt-{attempt}"
    dest.mkdir(exist_ok=True)
    for path in leftovers:
        shutil.move(str(path), dest / path.name)


class CellProcess:
    """One attempt of one cell: acquire its lock, launch train.py, stream its output, record the outcome.

    gpus: GPU ids to pin the cell to, or None to inherit CUDA_VISIBLE_DEVICES (a Slurm task).
    runner: who runs it, for state.json ("local" or "slurm:<job>").
    train_command: replaces [python, -m, lib.runs.train] (tests use a stand-in trainer).
    fork: start it with ForkedTrainer instead of exec (the cells of a matrix run).
    """

    def __init__(self, matrix_dir, cell, console, *, gpus=None, runner="local", train_command=None,
                 extra_env=None, fork=False):
        self.matrix_dir = Path(matrix_dir)
        self.cell = cell
        self.console = console
        self.gpus = gpus
        self.runner = runner
        self.train_command = train_command or train_entry.command()
        self.extra_env = extra_env or {}
        self.fork = fork
        self.run_dir = cell.run_dir(matrix_dir)
        self.lock = cell_lock(matrix_dir, cell.id)
        self.proc = None
        self.started = None
        self._reader = None
        self._log = None
        self.interrupted = False
        self.warmed = False  # the trainer logged WARM_MARK: its compiled graphs are in the compiler's cache

    def command(self, resume: bool) -> list:
        cmd = [*self.train_command, "--config", str(self.cell.config_path(self.matrix_dir)),
               "--run-dir", str(self.run_dir)]
        return cmd + (["--resume"] if resume else [])

    def environment(self) -> dict:
        # The plan holds the budget; the cell's trainer takes its own run lock (a lock handed to this runner
        # is for some other run directory).
        env = {k: v for k, v in os.environ.items() if k not in kcfg.ENV_OVERRIDES and k != RUN_LOCK_ENV}
        env["PYTHONUNBUFFERED"] = "1"
        if self.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpus)
        env.update(self.extra_env)
        return env

    def start(self, wait_for_lock_s=LOCK_GRACE_S) -> None:
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
                  f"==== {' '.join(cmd)}{' (forked from the matrix runner)' if self.fork else ''}\n")
        self._log.write(header.encode())
        self._log.flush()
        self.console.cell_line(self.cell.label, f"start ({'resume' if resume else 'fresh'}, attempt "
                                                f"{state.attempts}, GPUs [{state.gpus or 'none'}])")
        self.started = time.monotonic()
        self.proc = start_cell_process(cmd, self.environment(), REPO_ROOT, self.lock.fd, fork=self.fork)
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
                self.warmed = self.warmed or WARM_MARK.encode() in line
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
        elapsed_s = self.elapsed_s()
        self._reader.join(timeout=10)
        state = read_state(self.matrix_dir, self.cell.id)
        state.exit_code = exit_code
        state.finished_at = time.time()
        state.elapsed_s = round(state.elapsed_s + elapsed_s, 3)
        metrics = None
        metrics_path = self.run_dir / METRICS_NAME
        if metrics_path.exists() and metrics_path.stat().st_mtime >= state.started_at - 1:
            try:
                metrics = read_json(metrics_path)
            except (OSError, ValueError):
                metrics = None
        split = time_split(elapsed_s, metrics)
        if split:  # in console.log and on the console: what the cell cost besides its training
            self._log.write(f"==== {split}\n".encode())
            self.console.cell_line(self.cell.label, split)
        self._log.close()
        # A trainer stopped by a signal (ours, or e.g. a scheduler's SIGTERM) checkpoints and
        # reports "interrupted": that cell can resume, so it is not a failure.
        stopped_by_signal = bool(metrics) and metrics.get("status") == "interrupted"
        if exit_code == train_entry.RUN_BUSY_EXIT:  # another process trains the run directory: not a failure
            tail = (self.run_dir / CONSOLE_LOG).read_bytes()[-2000:].decode(errors="replace").strip()
            state.status = "pending"
            state.note = tail.splitlines()[-1] if tail else "its run directory is being trained by another process"
        elif self.interrupted or stopped_by_signal:
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
