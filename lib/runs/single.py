"""`make`, `make train`, `make resume`: one training run in its own locked run directory, then its report.

A matrix configuration (CONFIG_MATRIX=y) hands over to the matrix runner unless a single run is asked for.
A new run gets results/<preset>-<timestamp>/, created exclusively (two runs started in the same second get
-2, -3, ...) and locked before anything is written; `make resume` picks its run in lib/runs/resume.py. Either
way this process holds the run's lock and passes it down to the trainer (lib/runs/child.py), then writes
report.md next to the metrics.
"""

import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

from lib import config as cfg
from lib.runs import resume as resume_run
from lib.runs import train as train_entry
from lib.runs.child import run_child
from gpt2.train.run_dir import RunLock


def new_run_dir(results: Path, name: str) -> tuple:
    """(results/<name>-<timestamp>[-n], its lock, held): mkdir fails on an existing name, so two runs started
    together never share a directory."""
    results.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in itertools.count(1):
        run_dir = results / (f"{name}-{stamp}" if n == 1 else f"{name}-{stamp}-{n}")
        try:
            run_dir.mkdir()
        except FileExistsError:
            continue
        return run_dir, RunLock(run_dir).acquire()


def without_overrides(environ) -> dict:
    """The environment minus the GPT2_* budget overrides: for a configuration that already holds its budget
    (a run's own snapshot, a planned cell), where applying them again would change what it records."""
    return {k: v for k, v in environ.items() if k not in cfg.ENV_OVERRIDES}


def train_and_report(config, run_dir, lock, resume: bool, environ=None) -> int:
    """Train run_dir with `config` in a child process that adopts `lock` (held by the caller, released here),
    then write the run's report. Returns the exit status (the trainer's, else the report's)."""
    command = [*train_entry.command(), "--config", str(config), "--run-dir", str(run_dir)]
    env = {**(os.environ if environ is None else environ), **lock.handoff()}
    try:
        code = run_child(command + (["--resume"] if resume else []), env, keep_fds=(lock.fd,))
    finally:
        lock.release()  # before the report: a `make resume` right after the run need not wait for it
    if code == train_entry.RUN_BUSY_EXIT:
        return code  # nothing was trained or written; the trainer said who holds the run
    report = subprocess.call([sys.executable, "-m", "scripts.report", str(run_dir)])
    if code == 0 and report == 0:
        print(f"\nrun finished: open {run_dir / 'report.md'}")
    elif code in (130, 143):
        print(f"\ninterrupted: `make resume RUN={run_dir}` goes on from its checkpoint")
    return code or report


def run(config: str, single: bool, resume, extend=None) -> int:
    """resume: None (a new run), "" (the newest unfinished run) or a run directory; extend: EXTEND's text,
    for a finished run named by resume. Returns the exit status; ConfigError / ResumeError for the user."""
    if resume is not None:
        choice = resume_run.choose_and_prepare(config, resume or None, extend, say=lambda line: print(line, flush=True))
        return train_and_report(choice.config, choice.run_dir, choice.lock, resume=True,
                                environ=without_overrides(os.environ))
    if extend:
        raise resume_run.ResumeError("EXTEND= applies only to `make resume RUN=<finished run>`")
    settings = cfg.load_settings(config)
    if settings.matrix.enabled and not single:
        os.execv(sys.executable, [sys.executable, "-m", "scripts.matrix", "run", "--config", config])
    run_dir, lock = new_run_dir(cfg.results_dir(settings.general), cfg.preset_of(config) or "run")
    return train_and_report(config, run_dir, lock, resume=False)
