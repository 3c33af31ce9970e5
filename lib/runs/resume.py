"""`make resume`: which run to continue, with what configuration and budget, and why; EXTEND for finished runs.

Which run: RUN=<dir>, else the newest unfinished single run of the .config's preset (matrix directories are
`make continue`'s). Each run passed over is named with the reason, then the one chosen:

    skipping results/b: its process died before its first checkpoint (cannot resume: no checkpoint); marked failed
    skipping results/a: finished (done at iter 200 after 15.0 s of training); `make resume RUN=results/a
        EXTEND=600s` (or 1000it) trains it further
    resuming results/c: the newest unfinished run of preset cpu-tiny-run (interrupted at iter 120, 7.5 s of training)

With what: the run's own configuration snapshot (<run>/config: the effective configuration it started with,
budget included), never the current .config, and with no GPT2_* override on top: one that differs from the
run's own value is refused. The trainer charges what the checkpoint says was spent, so the run finishes the
budget it was given on the learning-rate schedule it started. A run that is being trained now, a finished run
(without EXTEND), and a RUN= that does not exist or is not a single run are refused with one line. A run whose
process died before its first checkpoint cannot resume; it is marked failed (it would otherwise say "running"
for ever).

EXTEND on a finished run trains it further: <N>s, <N>m, <N>h: N more seconds of training time (GPT2_MAX_TIME
becomes the time trained + N, TRAIN_MAX_ITERS 0); <N>it: N more iterations (TRAIN_MAX_ITERS becomes the
iterations trained + N, GPT2_MAX_TIME 0). The learning rate goes on at the rate the run ended with (TRAIN_LR_MIN
after a cosine or linear decay, TRAIN_LR after a constant schedule), constant, without warm-up:
the schedule follows the budget fraction, and recomputing it over the new total would put the run back in the
middle of its decay, the LR jumping from its minimum back up. The snapshot is rewritten with those values and a
comment line saying what was extended from what.
"""

import dataclasses
import math
import os
import re
import tempfile
import time
from datetime import datetime
from pathlib import Path

from lib import config as cfg
from gpt2.io import CHECKPOINT_NAME, CONFIG_NAME, ENV_NAME, METRICS_NAME, LockHeld, atomic_write_text, read_json
from gpt2.train.run_dir import RunLock, mark_abandoned

PLAN_FILE = "plan.json"  # a matrix directory (lib/matrix/plan.py names it too; lib.runs sits below lib.matrix)
CELL_CONFIG = "cell.config"  # a matrix cell's run directory
EXTEND_UNITS = {"s": ("time", 1), "m": ("time", 60), "h": ("time", 3600), "it": ("iters", 1), "iters": ("iters", 1)}


class ResumeError(Exception):
    """The run cannot be resumed as asked; the one-line message says why and what to do instead."""


@dataclasses.dataclass
class Choice:
    run_dir: Path
    config: Path  # the run's own snapshot
    lock: RunLock  # held; train_and_report passes it down and releases it


@dataclasses.dataclass
class RunView:
    """What a run directory says about itself (read while holding its lock, so nothing changes meanwhile)."""
    run_dir: Path
    status: str  # metrics.json's status; "running" when there is none yet (killed during setup)
    metrics: dict
    checkpoint: bool

    @classmethod
    def read(cls, run_dir) -> "RunView":
        run_dir = Path(run_dir)
        try:
            metrics = read_json(run_dir / METRICS_NAME)
        except (OSError, ValueError):
            metrics = {}
        metrics = metrics if isinstance(metrics, dict) else {}
        return cls(run_dir, metrics.get("status") or "running", metrics, (run_dir / CHECKPOINT_NAME).exists())

    def progress(self) -> str:
        m = self.metrics
        return f"at iter {m.get('iters', 0)} after {float(m.get('train_time_s') or 0):.1f} s of training"

    def why_not(self, extend: bool, named: bool):
        """Why this run cannot resume (None: it can); named: the user named it (RUN=), so a failed run with a
        checkpoint is retried from it. A run whose process died before its first checkpoint is marked failed on
        the way (the caller holds the run's lock, so that process is gone)."""
        status, reason = self.status, self.metrics.get("failure_reason") or "no reason recorded"
        if status == "done" and not extend:
            return (f"finished (done {self.progress()}); `make resume RUN={self.run_dir} EXTEND=600s` "
                    f"(or EXTEND=1000it) trains it further")
        if extend and status != "done":
            return (f"EXTEND is for a finished run, and this one is {status} {self.progress()}: "
                    f"`make resume RUN={self.run_dir}` finishes its own budget first")
        if status == "failed" and not (named and self.checkpoint):
            return (f"failed ({reason}); " + (f"`make resume RUN={self.run_dir}` retries it from its last checkpoint"
                                              if self.checkpoint else "no checkpoint to resume from"))
        if self.checkpoint:
            return None
        if status == "done":
            return f"finished, but its checkpoint {CHECKPOINT_NAME} is gone: nothing to go on from"
        cause = ("was interrupted" if status == "interrupted"
                 else "its process died (killed, crashed, or the machine went down)")
        mark_abandoned(self.run_dir, f"{cause.removeprefix('its process ')} before its first checkpoint; "
                                     f"nothing to resume")
        return f"{cause} before its first checkpoint (cannot resume: no checkpoint); marked failed"


def parse_extend(text) -> tuple:
    """EXTEND's text -> ("time", seconds) or ("iters", iterations)."""
    match = re.fullmatch(r"\s*([0-9]+)\s*([a-z]+)\s*", str(text))
    if not match or match.group(2) not in EXTEND_UNITS or int(match.group(1)) == 0:
        raise ResumeError(f"EXTEND={text!r}: give a positive amount with its unit: 600s, 10m, 2h (more training "
                          f"time) or 1000it (more iterations)")
    kind, scale = EXTEND_UNITS[match.group(2)]
    return kind, int(match.group(1)) * scale


def run_preset(run_dir) -> str:
    try:
        return cfg.preset_of(Path(run_dir) / CONFIG_NAME)
    except (OSError, cfg.ConfigError):
        return ""


def _created(run_dir) -> tuple:
    """When the run started: env.json's "created" (to the second), then when its config snapshot was written."""
    try:
        started = datetime.fromisoformat(read_json(Path(run_dir) / ENV_NAME)["created"]).timestamp()
    except (OSError, ValueError, KeyError, TypeError):
        started = 0.0
    return started, (Path(run_dir) / CONFIG_NAME).stat().st_mtime_ns


def single_runs(results: Path) -> list:
    """Single-run directories under `results` (a config snapshot, not a matrix), newest first."""
    if not results.is_dir():
        return []
    runs = [p for p in results.iterdir() if p.is_dir() and not p.name.startswith(".")
            and (p / CONFIG_NAME).is_file() and not (p / PLAN_FILE).exists()]
    return sorted(runs, key=_created, reverse=True)


def _not_a_single_run(run_dir: Path):
    if not run_dir.is_dir():
        return f"RUN={run_dir}: no such run directory"
    if (run_dir / PLAN_FILE).exists():
        return f"{run_dir} is a matrix directory: `make continue` (or scripts.matrix continue --dir) resumes it"
    if (run_dir / CELL_CONFIG).exists():
        return f"{run_dir} is a matrix cell: `make continue` resumes it, so its state.json stays true"
    if not (run_dir / CONFIG_NAME).is_file():
        return f"{run_dir} is not a run directory (it has no {CONFIG_NAME} snapshot)"
    return None


def check_environment(snapshot: Path, environ) -> None:
    """A GPT2_* override that differs from the run's own value is refused: a resumed run keeps its budget."""
    own = {a.symbol: a.value for a in cfg.parse_assignments(snapshot)}
    for variable, symbol in cfg.ENV_OVERRIDES.items():
        value = (environ.get(variable) or "").strip()
        if value and (not value.isdigit() or str(int(value)) != own.get(symbol)):
            raise ResumeError(f"{variable}={value} is set, but a resumed run keeps its own configuration "
                              f"(CONFIG_{symbol}={own.get(symbol, '(unset)')} in {snapshot}); unset it, or give a "
                              f"finished run more with EXTEND=")


def choose_and_prepare(config, run_dir, extend, say, environ=None) -> Choice:
    """The run to resume, locked, with its snapshot ready (extended when asked). Raises ResumeError."""
    environ = os.environ if environ is None else environ
    if run_dir is None:
        if extend:
            raise ResumeError("EXTEND needs the run it extends: `make resume RUN=<dir> EXTEND=600s`")
        lock = _newest_unfinished(config, say)
    else:
        lock = _named_run(Path(run_dir), bool(extend))
    try:
        view = RunView.read(lock.run_dir)
        check_environment(lock.run_dir / CONFIG_NAME, environ)
        if extend:
            say(f"extending {lock.run_dir}: " + extend_snapshot(view, extend))
        elif run_dir is not None:
            say(f"resuming {lock.run_dir} ({view.status} {view.progress()}) with its own configuration and the "
                f"budget it has left")
    except BaseException:
        lock.release()
        raise
    return Choice(lock.run_dir, lock.run_dir / CONFIG_NAME, lock)


def _named_run(run_dir: Path, extend: bool) -> RunLock:
    """RUN=<dir>: locked, after checking it is a single run that can resume (or, with EXTEND, a finished one)."""
    problem = _not_a_single_run(run_dir)
    if problem:
        raise ResumeError(problem)
    try:
        lock = RunLock(run_dir).acquire()
    except LockHeld as exc:
        raise ResumeError(f"{exc}: it is being trained now") from None
    reason = RunView.read(run_dir).why_not(extend, named=True)
    if reason:
        lock.release()
        raise ResumeError(f"cannot resume {run_dir}: {reason}")
    return lock


def _newest_unfinished(config, say) -> RunLock:
    """Walk the preset's single runs newest first; return the lock of the first that can resume."""
    preset = cfg.preset_of(config)
    results = cfg.results_dir(cfg.load_settings(config, environ={}).general)
    which = f"preset {preset}" if preset else "runs without a preset"
    for run_dir in single_runs(results):
        if run_preset(run_dir) != preset:
            continue
        try:
            lock = RunLock(run_dir).acquire()
        except LockHeld as exc:
            say(f"skipping {run_dir}: being trained now ({exc})")
            continue
        view = RunView.read(run_dir)
        reason = view.why_not(extend=False, named=False)
        if reason is None:
            say(f"resuming {run_dir}: the newest unfinished run of {which} ({view.status} {view.progress()}), with "
                f"its own configuration and the budget it has left")
            return lock
        lock.release()
        say(f"skipping {run_dir}: {reason}")
    raise ResumeError(f"no unfinished run of {which} under {results} to resume; `make train` starts one "
                      f"(RUN=<dir> names one, EXTEND= trains a finished one further)")


def extend_snapshot(view: RunView, extend_text) -> str:
    """Rewrite the finished run's snapshot with the extended budget and the final learning rate held constant;
    returns what changed, in words. The caller holds the run's lock."""
    kind, amount = parse_extend(extend_text)
    snapshot = view.run_dir / CONFIG_NAME
    own = {a.symbol: a.value for a in cfg.parse_assignments(snapshot)}
    trained_s, iters = float(view.metrics.get("train_time_s") or 0.0), int(view.metrics.get("iters") or 0)
    if kind == "time":
        budget = {"GPT2_MAX_TIME": str(math.ceil(trained_s + amount)), "TRAIN_MAX_ITERS": "0"}
        more = f"{amount} s more training (GPT2_MAX_TIME={budget['GPT2_MAX_TIME']}, no iteration cap)"
    else:
        budget = {"TRAIN_MAX_ITERS": str(iters + amount), "GPT2_MAX_TIME": "0"}
        more = f"{amount} more iterations (TRAIN_MAX_ITERS={budget['TRAIN_MAX_ITERS']}, no time cap)"
    constant = own.get("TRAIN_SCHEDULE_CONSTANT") == "y"
    final_lr = own.get("TRAIN_LR") if constant else own.get("TRAIN_LR_MIN")
    schedule = {"TRAIN_SCHEDULE_CONSTANT": "y", "TRAIN_LR": final_lr, "TRAIN_WARMUP_FRACTION": "0"}
    before = ", ".join(f"{s}={own.get(s, '(unset)')}" for s in ("GPT2_MAX_TIME", "TRAIN_MAX_ITERS", "TRAIN_LR"))
    note = (f"# Extended {time.strftime('%Y-%m-%d %H:%M:%S')} {view.progress()}: {more}; learning rate held at "
            f"{final_lr}, the rate it ended with (was {before}{'' if constant else ', decaying'})\n")
    with tempfile.TemporaryDirectory(prefix=".extend-", dir=view.run_dir) as scratch:
        body = Path(scratch) / CONFIG_NAME
        try:
            cfg.write_cell_config(snapshot, {**budget, **schedule}, body)
        except cfg.ConfigError as exc:
            raise ResumeError(f"cannot extend {view.run_dir}: {exc}") from None
        atomic_write_text(snapshot, _leading_comments(snapshot.read_text()) + note + body.read_text())
    return f"{view.progress()}, {more}; learning rate held at {final_lr} (the rate it ended with)"


def _leading_comments(text) -> str:
    """The comment lines a snapshot opens with (preset marker, effective-configuration and extension notes),
    which kconfiglib does not write back: the same lines lib.config keeps when it writes a snapshot."""
    lines = []
    for line in text.splitlines(keepends=True):
        if not line.startswith("# ") or line.startswith("# CONFIG_"):
            break
        lines.append(line)
    return "".join(lines)
