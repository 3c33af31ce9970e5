"""`make`, `make train`, `make resume`: one training run of a .config in its own run directory, then its report.

A matrix configuration (CONFIG_MATRIX=y) hands over to the matrix runner unless a single run is asked for.
A single run gets results/<preset>-<timestamp>/ and, when it ends, a report.md next to its metrics.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

from lib import config as cfg
from lib.runs import train as train_entry


def newest_run_dir(results: Path) -> Path:
    """The most recent single-run directory (one holding a checkpoint, not a matrix)."""
    runs = [p.parent for p in results.glob("*/ckpt.pt")]
    if not runs:
        raise cfg.ConfigError(f"no run with a checkpoint under {results}; start one with `make train`")
    return max(runs, key=lambda p: p.stat().st_mtime)


def train_and_report(config: str, run_dir: Path, resume: bool) -> int:
    command = [*train_entry.command(), "--config", config, "--run-dir", str(run_dir)]
    code = subprocess.call(command + (["--resume"] if resume else []))
    report = subprocess.call([sys.executable, "-m", "scripts.report", str(run_dir)])
    if code == 0 and report == 0:
        print(f"\nrun finished: open {run_dir / 'report.md'}")
    return code or report


def run(config: str, single: bool, resume) -> int:
    """resume: None (a new run), "" (the newest run) or a run directory. Returns the exit status."""
    settings = cfg.load_settings(config)
    if resume is not None:
        run_dir = Path(resume) if resume else newest_run_dir(cfg.results_dir(settings.general))
        return train_and_report(config, run_dir, resume=True)
    if settings.matrix.enabled and not single:
        os.execv(sys.executable, [sys.executable, "-m", "scripts.matrix", "run", "--config", config])
    name = cfg.preset_of(config) or "run"
    run_dir = cfg.results_dir(settings.general) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return train_and_report(config, run_dir, resume=False)
