"""`make`: train once, or run the test matrix when the configuration is a matrix.

    python -m scripts.run --config .config            train (or matrix when CONFIG_MATRIX=y)
    python -m scripts.run --config .config --single   one training run even for a matrix preset
    python -m scripts.run --config .config --resume [RUN_DIR]
                                                      resume the newest (or given) single run

A single run gets its own directory results/<preset>-<timestamp>/ and, when it
ends, a report.md next to its metrics.
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path


from lib import config as cfg
from lib.config import results_dir


def newest_run_dir(results: Path) -> Path:
    """The most recent single-run directory (one holding a checkpoint, not a matrix)."""
    runs = [p.parent for p in results.glob("*/ckpt.pt")]
    if not runs:
        raise cfg.ConfigError(f"no run with a checkpoint under {results}; start one with `make train`")
    return max(runs, key=lambda p: p.stat().st_mtime)


def train_and_report(config: str, run_dir: Path, resume: bool) -> int:
    command = [sys.executable, "-m", "scripts.train", "--config", config, "--run-dir", str(run_dir)]
    code = subprocess.call(command + (["--resume"] if resume else []))
    report = subprocess.call([sys.executable, "-m", "scripts.report", str(run_dir)])
    if code == 0 and report == 0:
        print(f"\nrun finished: open {run_dir / 'report.md'}")
    return code or report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=".config")
    parser.add_argument("--single", action="store_true", help="one run even when the config is a matrix")
    parser.add_argument("--resume", nargs="?", const="", default=None, metavar="RUN_DIR")
    args = parser.parse_args(argv)
    try:
        settings = cfg.load_settings(args.config)
        if args.resume is not None:
            run_dir = Path(args.resume) if args.resume else newest_run_dir(results_dir(settings.general))
            return train_and_report(args.config, run_dir, resume=True)
        if settings.matrix.enabled and not args.single:
            matrix = [sys.executable, "-m", "scripts.matrix", "run", "--config", args.config]
            os.execv(sys.executable, matrix)
        name = cfg.preset_of(args.config) or "run"
        run_dir = results_dir(settings.general) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        return train_and_report(args.config, run_dir, resume=False)
    except cfg.ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
