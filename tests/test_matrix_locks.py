"""The matrix against races, dead processes, changed code, unsafe pickles and shared cores (issues 14 and 15).

Real processes throughout: two runners are two `python -m scripts.matrix` processes, a lock holder is a
process that holds a flock, a code change is an edit to a copied source tree, and cells are tiny CPU runs
(or, for scheduling alone, the stand-in trainer of test_matrix.py).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2.train.run_dir import RunLock
from lib.config import parse_assignments
from lib.matrix import foreground as matrix_foreground
from lib.matrix import scheduler as matrix_run
from lib.matrix import slurm
from lib.matrix.plan import build_plan, load_plan, save_plan
from lib.matrix.state import CellState, PlanChanged, cell_lock, observed_state, open_matrix, read_state, write_state
from tests.test_matrix import ENV, FAKE_TRAINER, FAST, MATRIX, REPO_ROOT, cli

STEPS = """
V0:
  description: baseline
  set: {ATTN_BACKEND_SDPA: y, MLP_STANDARD: y}
CPU:
  description: the baseline on the CPU
  extends: V0
  set: {DEVICE_CPU: y}
"""


@pytest.fixture
def matrix_config(make_config):
    def build(steps="V0", seeds="1", **extra):
        return make_config({**FAST, "MATRIX_STEPS": steps, "MATRIX_SEEDS": seeds, **extra})
    return build


def matrix_dirs(results: Path) -> list:
    return sorted(p for p in results.iterdir() if (p / "plan.json").exists()) if results.is_dir() else []


def test_two_runners_started_together_run_one_matrix_once(matrix_config, tmp_path):
    config = matrix_config()
    command = [*MATRIX, "run", "--config", str(config), "--no-report"]
    runners = [subprocess.Popen(command, cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for _ in range(2)]
    outputs = [(*r.communicate(timeout=300), r.returncode) for r in runners]
    outputs = [(code, out, err) for out, err, code in outputs]
    results = tmp_path / "results"
    [matrix_dir] = matrix_dirs(results)  # one directory, not -085803 and -085803-2
    assert not [p for p in results.iterdir() if p.name.startswith(".plan-")]  # no staging left behind
    assert read_state(matrix_dir, "V0-s1").status == "done" and read_state(matrix_dir, "V0-s1").attempts == 1
    ran = [o for o in outputs if "1 of 1 cells to run" in o[1]]
    assert len(ran) == 1 and ran[0][0] == 0, outputs
    other = next(o for o in outputs if o is not ran[0])
    # the second either found the first still at work, or found nothing left to do
    assert (other[0] == 2 and f"matrix {matrix_dir} is locked by" in other[2]) or "0 of 1 cells to run" in other[1]


def test_a_cell_whose_run_directory_is_held_is_left_pending(matrix_config, tmp_path):
    matrix_dir = tmp_path / "m"
    plan = build_plan(matrix_config(), matrix_dir)
    save_plan(plan, matrix_dir)
    with RunLock(plan.cell("V0-s1").run_dir(matrix_dir)):  # e.g. a `make resume RUN=cells/V0-s1` in progress
        state = matrix_foreground.run_single_cell(matrix_dir, plan, "V0-s1", options=matrix_run.RunOptions(echo=False))
    assert state.status == "pending" and state.exit_code == 75, state
    assert f"is locked by {socket.gethostname()} pid {os.getpid()}" in state.note
    assert not (matrix_dir / "cells" / "V0-s1" / "metrics.json").exists()  # the second trainer wrote nothing


def test_a_running_cell_whose_process_is_gone_shows_as_stopped(matrix_config, tmp_path):
    config = matrix_config()
    matrix_dir = tmp_path / "m"
    save_plan(build_plan(config, matrix_dir), matrix_dir)
    write_state(matrix_dir, "V0-s1", CellState(status="running", attempts=1, runner="local",
                                                host=socket.gethostname(), runner_pid=2 ** 22 + 1))
    status = cli("status", "--config", config, "--dir", matrix_dir, timeout=60)
    assert "[V0/s1] stopped" in status.stdout and "process gone without a final record" in status.stdout
    assert "1 pending, 0 running" in status.stdout
    assert read_state(matrix_dir, "V0-s1").status == "running"  # a reader leaves state.json alone

    lock_path = cell_lock(matrix_dir, "V0-s1").path
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from gpt2.io import FileLock; "
                               "FileLock(sys.argv[1], 'cell').acquire(); print('held', flush=True); time.sleep(120)",
                               str(lock_path)], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert observed_state(matrix_dir, "V0-s1").status == "running"
        status = cli("status", "--config", config, "--dir", matrix_dir, timeout=60)
        assert "[V0/s1] running" in status.stdout
    finally:
        holder.kill()
        holder.wait()


def test_a_code_change_after_planning_is_refused_and_help_text_is_not(repo_copy, matrix_config, tmp_path):
    steps = tmp_path / "steps.yaml"
    steps.write_text(STEPS)
    config = matrix_config()
    results = tmp_path / "results"

    def build(out):
        return build_plan(config, out, steps_file=steps, kconfig_path=repo_copy / "Kconfig", code_root=repo_copy)

    matrix_dir, plan, lock = open_matrix(results, build, name="matrix")
    lock.release()
    assert "gpt2/model/mlp.py" in plan.fingerprint["code"] and "TRAIN_LR" in plan.fingerprint["kconfig"]

    # Prose: help text and a step's description change nothing a cell does.
    train_kconfig = repo_copy / "kconfig" / "train.Kconfig"
    original = train_kconfig.read_text()
    assert "Half-cosine from peak to minimum." in original
    train_kconfig.write_text(original.replace("Half-cosine from peak to minimum.", "A half cosine, peak to floor."))
    steps.write_text(STEPS.replace("description: baseline", "description: the baseline, reworded"))
    again, _, lock = open_matrix(results, build, name="matrix")
    lock.release()
    assert again == matrix_dir

    # Behaviour: an edited model file, through the command line of the copied tree.
    mlp = repo_copy / "gpt2" / "model" / "mlp.py"
    mlp.write_text(mlp.read_text() + "\n# a changed model\n")
    proc = subprocess.run([*MATRIX, "continue", "--config", str(config), "--dir", str(matrix_dir)], cwd=repo_copy,
                          capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "source file gpt2/model/mlp.py: changed" in proc.stderr and "--force" in proc.stderr
    assert read_state(matrix_dir, "V0-s1").attempts == 0  # nothing ran

    # A Kconfig default is behaviour too; the message names the symbol and both values.
    train_kconfig.write_text(original.replace('default "6e-4"', 'default "7e-4"'))
    with pytest.raises(PlanChanged) as changed:
        open_matrix(results, build, name="matrix")
    assert "Kconfig symbol TRAIN_LR: was 'default \"6e-4\" if y'; now 'default \"7e-4\" if y'" in str(changed.value)
    forced, plan, lock = open_matrix(results, build, name="matrix", force=True)
    lock.release()
    assert forced == matrix_dir and load_plan(matrix_dir).hash == plan.hash


def test_submitit_pickles_go_only_into_a_private_directory(matrix_config, tmp_path):
    config = matrix_config(DEVICE_CPU="y")
    matrix_dir, _, lock = open_matrix(tmp_path / "results", lambda out: build_plan(config, out), name="matrix")
    lock.release()
    folder = matrix_dir / "slurm"
    folder.mkdir()
    folder.chmod(0o777)  # e.g. made by a umask-0 shell, or by someone else
    proc = subprocess.run([*MATRIX, "submit", "--config", str(config), "--dir", str(matrix_dir), "--cluster",
                           "local"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stdout + proc.stderr
    assert f"{folder} is group- or world-writable (mode 0777)" in proc.stderr
    assert list(folder.iterdir()) == []  # no pickle written, none read

    folder.rmdir()
    umask = os.umask(0)
    try:
        assert slurm.private_slurm_dir(matrix_dir) == folder and folder.stat().st_mode & 0o777 == 0o700
    finally:
        os.umask(umask)
    if os.getuid() == 0:  # only root can give a directory away
        os.chown(folder, 65534, 65534)
        with pytest.raises(slurm.UnsafeDirectory, match="belongs to uid 65534"):
            slurm.private_slurm_dir(matrix_dir)
    folder.rmdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    folder.symlink_to(elsewhere)
    with pytest.raises(slurm.UnsafeDirectory, match="is not a directory"):
        slurm.private_slurm_dir(matrix_dir)


def test_cpu_cells_never_train_at_once_even_beside_gpu_cells(matrix_config, tmp_path):
    fake = tmp_path / "fake_train.py"
    fake.write_text(FAKE_TRAINER)
    steps = tmp_path / "steps.yaml"
    steps.write_text(STEPS)
    config = matrix_config("V0,CPU", "1,2,3", DEVICE_CUDA="y")
    matrix_dir = tmp_path / "m"
    plan = build_plan(config, matrix_dir, steps_file=steps)
    save_plan(plan, matrix_dir)
    options = matrix_run.RunOptions(gpu_ids=["0", "1", "2", "3"], train_command=[sys.executable, str(fake)],
                                    echo=False, poll_s=0.05)
    outcome = matrix_run.run_matrix(matrix_dir, plan, options)
    assert len(outcome.done) == 6 and not outcome.failed
    spans = {c.id: json.loads((c.run_dir(matrix_dir) / "gpus.json").read_text()) for c in plan.cells}
    on_cpu = sorted((spans[c.id]["start"], spans[c.id]["end"]) for c in plan.cells if c.step == "CPU")
    assert len(on_cpu) == 3 and all(end <= start for (_, end), (start, _) in zip(on_cpu, on_cpu[1:])), on_cpu
    on_gpu = [spans[c.id] for c in plan.cells if c.step == "V0"]  # GPU cells still share time
    assert any(a["start"] < b["end"] and b["start"] < a["end"] for a in on_gpu for b in on_gpu if a is not b)


def test_cell_command_trains_exactly_the_planned_cell(matrix_config, tmp_path):
    config = matrix_config("V0,V1")
    config.write_text("# preset: cpu-default\n" + config.read_text())
    planned = build_plan(config, tmp_path / "planned", environ={"GPT2_MAX_ITERS": "3"})
    save_plan(planned, tmp_path / "planned")
    recorded = json.loads((tmp_path / "planned" / "plan.json").read_text())
    assert recorded["preset"] == "cpu-default" and recorded["environment"] == {"GPT2_MAX_ITERS": "3"}

    proc = subprocess.run([*MATRIX, "cell", "V1-s1", "--config", str(config)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300, env={**ENV, "GPT2_MAX_ITERS": "3"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    results = tmp_path / "results"
    [run_dir] = [p for p in results.iterdir() if p.name.startswith("cpu-default-V1-s1-")]
    cell_config = planned.cell("V1-s1").config_path(tmp_path / "planned")
    assert (run_dir / "config").read_bytes() == cell_config.read_bytes()
    own = {a.symbol: a.value for a in parse_assignments(run_dir / "config")}
    assert own["ATTN_BACKEND_RA_UNIFIED"] == "y" and own["TRAIN_MAX_ITERS"] == "3" and own["MATRIX"] == "n"
    assert json.loads((run_dir / "metrics.json").read_text())["iters"] == 3
    assert matrix_dirs(results) == []  # a cell alone: no matrix directory made or touched

    unknown = subprocess.run([*MATRIX, "cell", "V9-s1", "--config", str(config)], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=120, env=ENV)
    assert unknown.returncode == 2 and "no cell 'V9-s1'" in unknown.stderr and "V1-s1" in unknown.stderr
