"""Write report.md (+ PNG plots, report.json/csv) for a run directory or a matrix directory.

    python -m scripts.report RUN_DIR        one training run: curves, numbers, gates
    python -m scripts.report MATRIX_DIR     a matrix (has plan.json): the comparison report
    python -m scripts.report                the newest run or matrix under the results directory of .config

The report is built only from the files in the directory, so it can be rewritten at any time.
"""

import argparse
import sys
from pathlib import Path


from lib.report.writer import newest_reportable, write_report


def _results_dir(config_path) -> Path:
    """The configured results directory; without a readable config, the default one."""
    from lib import config as cfg
    from lib.config import REPO_ROOT as root, results_dir

    try:
        return results_dir(cfg.load_settings(config_path, environ={}).general)
    except cfg.ConfigError:
        return root / "results"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", nargs="?", help="a run or matrix directory (default: the newest)")
    parser.add_argument("--config", default=".config", help="finds the results directory when none is given")
    args = parser.parse_args(argv)
    try:
        directory = args.directory or newest_reportable(_results_dir(args.config))
        path = write_report(directory)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
