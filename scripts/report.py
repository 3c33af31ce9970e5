"""Write report.md (+ PNG plots, report.json/csv) for a run directory or a matrix directory.

    python -m scripts.report RUN_DIR        one training run: curves, numbers, gates
    python -m scripts.report MATRIX_DIR     a matrix (has plan.json): the comparison report
    python -m scripts.report                the newest run or matrix under the results directory of .config

The report is built only from the files in the directory, so it can be rewritten at any time.
"""

import argparse
import sys

from lib.config import configured_results_dir
from lib.report.writer import newest_reportable, write_report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", nargs="?", help="a run or matrix directory (default: the newest)")
    parser.add_argument("--config", default=".config", help="finds the results directory when none is given")
    args = parser.parse_args(argv)
    try:
        directory = args.directory or newest_reportable(configured_results_dir(args.config, default_if_unreadable=True))
        path = write_report(directory)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
