"""The matrix commands behind `python -m scripts.matrix` (run, continue, check, report, status, submit, cell).

Each takes the parsed arguments and returns the process exit status: 0 every cell done, 1 some cell failed,
3 cells left (stopped on failure or running elsewhere), 130 interrupted; errors a user can fix raise one
of USER_ERRORS, which the command line prints as one line with exit status 2.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lib import config as cfg
from lib.matrix import gpus as matrix_gpus
from lib.matrix import describe as matrix_describe
from lib.matrix import plan as matrix_plan
from lib.matrix import scheduler as matrix_run
from lib.matrix import state as matrix_state
from lib.runs import single
from lib.runs.resume import ResumeError

USER_ERRORS = (cfg.ConfigError, matrix_plan.PlanError, matrix_state.PlanChanged, matrix_state.MatrixLocked,
               matrix_gpus.SchedulerError, FileNotFoundError, ResumeError)


def _defconfig_list(text):
    """--defconfigs "a b,c" -> [a, b, c]; absent or empty (make matrix without DEFCONFIGS) -> None."""
    names = (text or "").replace(",", " ").split()
    return names or None


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
    environ = old.environment or {key.split(" ", 1)[1]: value for key, value in old.fingerprint["base"].items()
                                  if key.startswith("environment ")}  # a plan from before plan.environment
    defconfigs = list(dict.fromkeys(v.defconfig for v in old.variants if v.defconfig)) or None
    return lambda out_dir: matrix_plan.build_plan(Path(matrix_dir) / "base.config", out_dir, name=old.name,
                                                  steps_file=old.steps_file, defconfigs=defconfigs, environ=environ)


def _options(args, plan) -> matrix_run.RunOptions:
    return matrix_run.RunOptions(stop_on_failure=args.stop_on_failure or plan.stop_on_failure,
                                 retry_failed=args.retry_failed, parallel_cap=args.parallel or plan.parallel_cells)


def _write_report(matrix_dir) -> int:
    """The report is written by its own command (lib/report sits above lib/matrix: it reads the matrix's files)."""
    return subprocess.call([sys.executable, "-m", "scripts.report", str(matrix_dir)])


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
                  f"(rerun with `python -m scripts.matrix continue --retry-failed`)")
    if outcome.interrupted:
        return 130
    if n["failed"]:
        return 1
    return 3 if left else 0


def cmd_run(args, resume_only=False) -> int:
    have_config = Path(args.config).exists()
    if not have_config and not args.dir:
        raise FileNotFoundError(f"{args.config} not found; pass --config or --dir")
    results = cfg.configured_results_dir(args.config) if have_config else Path(args.dir).resolve().parent
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
    for note in plan.notes:  # steps a sweep axis does not apply to, cells planned once for two variants
        print(f"plan: {note}")
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
        print(matrix_describe.describe_plan(plan, work / "plan", parallel))
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
        if _write_report(work / "cells"):
            print("check FAILED: the report of the check cells could not be written")
            return 1
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
    found = matrix_state.latest_matrix_dir(cfg.configured_results_dir(args.config), _preset(args))
    if found is None:
        raise FileNotFoundError(f"no matrix directory of preset {_preset(args)!r} under "
                                f"{cfg.configured_results_dir(args.config)}; pass --dir")
    return found


def cmd_report(args) -> int:
    return 2 if _write_report(_existing_dir(args)) else 0


def cmd_status(args) -> int:
    matrix_dir = _existing_dir(args)
    plan = matrix_plan.load_plan(matrix_dir)
    states = matrix_state.read_states(matrix_dir, plan)
    print(f"{matrix_dir}: " + ", ".join(f"{n} {s}" for s, n in matrix_state.counts(states).items()))
    for cell in plan.cells:
        st = states[cell.id]
        shown = "stopped" if st.note == matrix_state.GONE_NOTE else st.status
        print(f"  [{cell.label}] {shown:<8} attempts {st.attempts}"
              + (f"  {st.failure_reason}" if st.failure_reason else "") + (f"  ({st.note})" if st.note else ""))
    return 0


def cmd_submit(args) -> int:
    from lib.matrix import slurm

    try:
        slurm.require(args.cluster)
    except slurm.SlurmUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    results = cfg.configured_results_dir(args.config)
    matrix_dir, plan, lock = matrix_state.open_matrix(
        results, _builder(args, os.environ), name=_preset(args), directory=args.dir, new=args.new, force=args.force)
    lock.release()  # array tasks coordinate through cell locks, not the matrix lock
    try:
        executor = slurm.make_executor(matrix_dir, plan, cluster=args.cluster, partition=args.partition,
                                       account=args.account, timeout_min=args.timeout_min,
                                       array_parallelism=args.array_parallelism or plan.parallel_cells or None)
    except slurm.UnsafeDirectory as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    jobs = slurm.submit_cells(matrix_dir, plan, executor, retry_failed=args.retry_failed)
    if not jobs:
        print(f"{matrix_dir}: no cell left to run")
        return 0
    print(f"submitted {len(jobs)} cell(s) of {matrix_dir} as job {jobs[0].job_id.split('_')[0]}; "
          f"`python -m scripts.matrix status --dir {matrix_dir}` shows progress, `report --dir` writes the report")
    if not args.wait:
        return 0
    states = slurm.wait(jobs)
    _write_report(matrix_dir)
    return 1 if any(s.status != "done" for s in states) else 0


def cmd_continue(args) -> int:
    return cmd_run(args, resume_only=True)


def cmd_cell(args) -> int:
    """`make cell CELL=<id>`: plan the matrix of --config exactly as `run` does (same defconfigs, same GPT2_*
    budget environment) and train that one cell as a single run in a fresh results/<name>-<id>-<timestamp>/,
    whose config snapshot is the planned cell.config. Nothing of any matrix directory is read or written."""
    results = cfg.configured_results_dir(args.config)
    with tempfile.TemporaryDirectory(prefix="matrix-cell-") as work:
        plan = _builder(args, os.environ)(Path(work))
        cell = plan.cell(args.cell_id)
        run_dir, lock = single.new_run_dir(results, f"{plan.name}-{cell.id}")
        variant = next(v for v in plan.variants if v.id == cell.variant)
        print(f"cell {cell.label} of matrix {plan.name} ({variant.description}): training it alone in {run_dir}")
        # The planned cell.config holds the budget already; the environment's overrides are not applied twice.
        return single.train_and_report(cell.config_path(work), run_dir, lock, resume=False,
                                       environ=single.without_overrides(os.environ))
