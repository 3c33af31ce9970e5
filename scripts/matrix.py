"""Test matrix: plan, run, resume and report every cell of a matrix preset.

    python -m scripts.matrix run      --config .config [--defconfigs "a b"] [--new] [--force]
                                      [--stop-on-failure] [--retry-failed] [--name NAME] [--dir DIR]
    python -m scripts.matrix continue --config .config [--dir DIR] [--force] [--retry-failed]
    python -m scripts.matrix check    --config .config [--defconfigs "a b"] [--keep]
    python -m scripts.matrix report   [--config .config] [--dir DIR]
    python -m scripts.matrix status   [--config .config] [--dir DIR]
    python -m scripts.matrix submit   --config .config [--cluster slurm|local] [--partition P]
                                      [--account A] [--timeout-min M] [--array-parallelism K] [--wait]
    python -m scripts.matrix cell     CELL_ID --config .config [--defconfigs "a b"]

run       plan the matrix (every cell config is validated first), then run the unfinished cells of
          the newest matrix directory of this preset, or of a new results/<preset>-<timestamp>/;
          writes report.md at the end. Re-running the same command resumes.
continue  resume the newest (or --dir) matrix directory with the inputs it was planned from.
check     dry run: print the plan and time estimate, then run every cell for 2 iterations of a
          tiny model in a temporary directory.
report    (re)write report.md/json/csv and plots from the cells' files.
status    one line per cell: state, attempts, failure reason.
submit    run the cells as one Slurm array job through submitit (one cell per task), sharing the
          same matrix directory and state files; `--cluster local` runs the tasks on this machine.
          submitit's pickles go into <matrix>/slurm/, which must be private (0700; refused otherwise).
cell      plan the matrix as `run` would (same defconfigs and GPT2_* budget environment) and train
          the one cell CELL_ID (e.g. V1-s2) alone in a fresh run directory: `make cell CELL=V1-s2`.

Exit status: 0 every cell done, 1 some cell failed, 2 plan/config/lock error, 3 cells left
(stopped on failure or running elsewhere), 130 interrupted.
"""

import argparse
import sys

from lib.config.steps import STEPS_FILE
from lib.matrix import commands


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    planning = argparse.ArgumentParser(add_help=False)
    planning.add_argument("--config", default=".config", help="base configuration (default .config)")
    planning.add_argument("--name", help="preset name for the directory (default: the .config's '# preset:' marker)")
    planning.add_argument("--steps", default=str(STEPS_FILE), help="ablation step definitions (default %(default)s)")
    common = argparse.ArgumentParser(add_help=False, parents=[planning])
    common.add_argument("--dir", help="matrix directory (default: the newest of this preset)")
    runlike = argparse.ArgumentParser(add_help=False)
    runlike.add_argument("--force", action="store_true", help="continue even though the plan's inputs changed")
    runlike.add_argument("--stop-on-failure", action="store_true", help="start no new cell after a failure")
    runlike.add_argument("--retry-failed", action="store_true", help="run failed cells again (from scratch)")
    runlike.add_argument("--parallel", type=int, default=0, help="at most this many cells at once")
    runlike.add_argument("--no-report", action="store_true", help="do not write report.md at the end")
    newdir = argparse.ArgumentParser(add_help=False)
    newdir.add_argument("--defconfigs", help='defconfigs to compare as whole cells, e.g. "a b c"')
    newdir.add_argument("--new", action="store_true", help="start a fresh matrix directory")
    sub.add_parser("run", parents=[common, runlike, newdir], help="plan and run (or resume) the matrix")
    sub.add_parser("continue", parents=[common, runlike], help="resume the newest matrix directory")
    check = sub.add_parser("check", parents=[common], help="print the plan and dry-run every cell")
    check.add_argument("--defconfigs", help='defconfigs to compare as whole cells, e.g. "a b c"')
    check.add_argument("--keep", action="store_true", help="keep the temporary check directory")
    sub.add_parser("report", parents=[common], help="write report.md from the cells' files")
    sub.add_parser("status", parents=[common], help="show each cell's state")
    submit = sub.add_parser("submit", parents=[common, newdir], help="run the cells as a Slurm array job")
    submit.add_argument("--cluster", default="slurm", choices=("slurm", "local"),
                        help="slurm (default), or local: submitit's local executor, for trying the tasks here")
    submit.add_argument("--partition")
    submit.add_argument("--account")
    submit.add_argument("--timeout-min", type=int, default=0, help="per task (default: budget + 30 min)")
    submit.add_argument("--array-parallelism", type=int, default=0)
    submit.add_argument("--retry-failed", action="store_true")
    submit.add_argument("--force", action="store_true")
    submit.add_argument("--wait", action="store_true", help="wait for the tasks, then write the report")
    cell = sub.add_parser("cell", parents=[planning], help="train one planned cell alone, in a fresh directory")
    cell.add_argument("cell_id", help="the cell's id, as in cells/<id>/ (e.g. V1-s2)")
    cell.add_argument("--defconfigs", help='defconfigs to compare as whole cells, as the matrix was run with')
    args = parser.parse_args(argv)
    args.defconfigs = getattr(args, "defconfigs", None)
    try:
        return getattr(commands, f"cmd_{args.command}")(args)
    except commands.USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
