"""Test matrix: plan, run, resume and report every cell of a matrix preset.

    python -m scripts.matrix run      --config .config [--defconfigs "a b"] [--new] [--force]
                                      [--stop-on-failure] [--retry-failed] [--name NAME] [--dir DIR]
    python -m scripts.matrix continue --config .config [--dir DIR] [--force] [--retry-failed]
    python -m scripts.matrix check    --config .config [--defconfigs "a b"] [--keep]
    python -m scripts.matrix report   [--config .config] [--dir DIR]
    python -m scripts.matrix status   [--config .config] [--dir DIR]
    python -m scripts.matrix submit   --config .config [--cluster slurm|local] [--partition P]
                                      [--account A] [--timeout-min M] [--array-parallelism K] [--wait]

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

Exit status: 0 every cell done, 1 some cell failed, 2 plan/config/lock error, 3 cells left
(stopped on failure or running elsewhere), 130 interrupted.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


from lib import config as cfg
from lib.config import results_dir
from lib.matrix import gpus as matrix_gpus
from lib.matrix import plan as matrix_plan
from lib.matrix import scheduler as matrix_run
from lib.matrix import state as matrix_state
from lib.config.steps import STEPS_FILE


def _defconfig_list(text):
    """--defconfigs "a b,c" -> [a, b, c]; absent or empty (make matrix without DEFCONFIGS) -> None."""
    names = (text or "").replace(",", " ").split()
    return names or None


def _results_dir(config_path) -> Path:
    return results_dir(cfg.load_settings(config_path, environ={}).general)


def _preset(args) -> str:
    if args.name:
        return args.name
    if getattr(args, "defconfigs", None):
        return "compare"
    return matrix_plan.preset_name(args.config)


def _builder(args, environ):
    def build(out_dir):
        return matrix_plan.build_plan(args.config, out_dir, name=_preset(args), steps_file=args.steps,
                                      defconfigs=_defconfig_list(args.defconfigs), environ=environ)
    return build


def _rebuild(old, matrix_dir):
    """continue: rebuild a stored plan from its own base config, budget environment and defconfigs,
    with the current Kconfig tree and step definitions, to see whether those changed."""
    environ = {key.split(" ", 1)[1]: value for key, value in old.fingerprint["base"].items()
               if key.startswith("environment ")}
    defconfigs = list(dict.fromkeys(v.defconfig for v in old.variants if v.defconfig)) or None
    return lambda out_dir: matrix_plan.build_plan(Path(matrix_dir) / "base.config", out_dir, name=old.name,
                                                  steps_file=old.steps_file, defconfigs=defconfigs, environ=environ)


def _options(args, plan) -> matrix_run.RunOptions:
    return matrix_run.RunOptions(stop_on_failure=args.stop_on_failure or plan.stop_on_failure,
                                 retry_failed=args.retry_failed, parallel_cap=args.parallel or plan.parallel_cells)


def _write_report(matrix_dir) -> None:
    from lib.report.writer import write_matrix_report

    path = write_matrix_report(matrix_dir)
    print(f"report: {path}")


def _summarize(matrix_dir, plan, outcome) -> int:
    """Print where the whole matrix stands (not only this session) and return the exit status."""
    states = matrix_state.read_states(matrix_dir, plan)
    n = matrix_state.counts(states)
    left = n["pending"] + n["running"]
    print(f"matrix {matrix_dir}: {n['done']}/{len(plan.cells)} cells done, {n['failed']} failed, {left} left"
          + (" (interrupted; `make continue` resumes)" if outcome.interrupted else ""))
    for cell in plan.cells:
        if states[cell.id].status == "failed":
            print(f"  FAILED [{cell.label}] {states[cell.id].failure_reason} "
                  f"(rerun with `scripts/matrix.py continue --retry-failed`)")
    if outcome.interrupted:
        return 130
    if n["failed"]:
        return 1
    return 3 if left else 0


def cmd_run(args, resume_only=False) -> int:
    have_config = Path(args.config).exists()
    if not have_config and not args.dir:
        raise FileNotFoundError(f"{args.config} not found; pass --config or --dir")
    results = _results_dir(args.config) if have_config else Path(args.dir).resolve().parent
    name = _preset(args) if have_config else None
    directory = args.dir
    if resume_only and not directory:
        directory = matrix_state.latest_matrix_dir(results, name) or matrix_state.latest_matrix_dir(results)
        if directory is None:
            raise FileNotFoundError(f"no matrix directory under {results} to continue; start one with `make`")
        print(f"continuing {directory}")
    matrix_dir, plan, lock = matrix_state.open_matrix(
        results, _builder(args, os.environ) if have_config else None, name=name, directory=directory,
        new=getattr(args, "new", False), force=args.force, rebuild_for=_rebuild if resume_only else None)
    try:
        outcome = matrix_run.run_matrix(matrix_dir, plan, _options(args, plan))
        if not args.no_report:
            _write_report(matrix_dir)
    finally:
        lock.release()
    return _summarize(matrix_dir, plan, outcome)


def cmd_check(args) -> int:
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="matrix-check-"))
    try:
        plan = matrix_plan.build_plan(args.config, work / "plan", name=_preset(args), steps_file=args.steps,
                                      defconfigs=_defconfig_list(args.defconfigs))
        needs_gpu = any(c.device != "cpu" for c in plan.cells)
        gpu_ids = matrix_gpus.visible_gpus() if needs_gpu else []
        parallel = matrix_gpus.parallel_cells(plan.cells, gpu_ids, plan.parallel_cells)
        print(matrix_plan.describe_plan(plan, work / "plan", parallel))
        print(f"hardware: {len(gpu_ids)} GPU(s) visible -> {parallel} cell(s) at once")
        overrides = dict(matrix_plan.CHECK_OVERRIDES)
        if not gpu_ids:
            overrides.update(matrix_plan.CHECK_CPU_OVERRIDES)
        check_plan = matrix_plan.build_plan(args.config, work / "cells", name=plan.name, steps_file=args.steps,
                                            defconfigs=_defconfig_list(args.defconfigs),
                                            extra_overrides=overrides, environ={})
        matrix_plan.save_plan(check_plan, work / "cells")
        print(f"\nrunning every cell for {check_plan.cells[0].max_iters} iterations of a tiny model in {work}:")
        outcome = matrix_run.check_cells(work / "cells", check_plan, gpu_ids)
        from lib.report.writer import write_matrix_report

        write_matrix_report(work / "cells")
        seconds = time.monotonic() - started
        if outcome.failed or outcome.pending:
            print(f"check FAILED in {seconds:.0f} s: {len(outcome.failed)} of {len(check_plan.cells)} cells failed")
            return 1
        print(f"check passed in {seconds:.0f} s: {len(check_plan.cells)} cells trained, evaluated, "
              f"checkpointed and reported")
        return 0
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _existing_dir(args) -> Path:
    if args.dir:
        return Path(args.dir)
    found = matrix_state.latest_matrix_dir(_results_dir(args.config), _preset(args))
    if found is None:
        raise FileNotFoundError(f"no matrix directory of preset {_preset(args)!r} under "
                                f"{_results_dir(args.config)}; pass --dir")
    return found


def cmd_report(args) -> int:
    _write_report(_existing_dir(args))
    return 0


def cmd_status(args) -> int:
    matrix_dir = _existing_dir(args)
    plan = matrix_plan.load_plan(matrix_dir)
    states = matrix_state.read_states(matrix_dir, plan)
    print(f"{matrix_dir}: " + ", ".join(f"{n} {s}" for s, n in matrix_state.counts(states).items()))
    for cell in plan.cells:
        st = states[cell.id]
        print(f"  [{cell.label}] {st.status:<8} attempts {st.attempts}"
              + (f"  {st.failure_reason}" if st.failure_reason else "") + (f"  ({st.note})" if st.note else ""))
    return 0


def cmd_submit(args) -> int:
    from lib.matrix import slurm

    try:
        slurm.require(args.cluster)
    except slurm.SlurmUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    results = _results_dir(args.config)
    matrix_dir, plan, lock = matrix_state.open_matrix(
        results, _builder(args, os.environ), name=_preset(args), directory=args.dir, new=args.new, force=args.force)
    lock.release()  # array tasks coordinate through cell locks, not the matrix lock
    executor = slurm.make_executor(matrix_dir, plan, cluster=args.cluster, partition=args.partition,
                                   account=args.account, timeout_min=args.timeout_min,
                                   array_parallelism=args.array_parallelism or plan.parallel_cells or None)
    jobs = slurm.submit_cells(matrix_dir, plan, executor, retry_failed=args.retry_failed)
    if not jobs:
        print(f"{matrix_dir}: no cell left to run")
        return 0
    print(f"submitted {len(jobs)} cell(s) of {matrix_dir} as job {jobs[0].job_id.split('_')[0]}; "
          f"`scripts/matrix.py status --dir {matrix_dir}` shows progress, `report --dir` writes the report")
    if not args.wait:
        return 0
    states = slurm.wait(jobs)
    _write_report(matrix_dir)
    return 1 if any(s.status != "done" for s in states) else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=".config", help="base configuration (default .config)")
    common.add_argument("--dir", help="matrix directory (default: the newest of this preset)")
    common.add_argument("--name", help="preset name for the directory (default: the .config's '# preset:' marker)")
    common.add_argument("--steps", default=str(STEPS_FILE), help="ablation step definitions (default %(default)s)")
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
    args = parser.parse_args(argv)
    args.defconfigs = getattr(args, "defconfigs", None)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "continue":
            return cmd_run(args, resume_only=True)
        commands = {"check": cmd_check, "report": cmd_report, "status": cmd_status, "submit": cmd_submit}
        return commands[args.command](args)
    except (cfg.ConfigError, matrix_plan.PlanError, matrix_state.PlanChanged, matrix_state.MatrixLocked,
            matrix_gpus.SchedulerError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
