"""The test matrix: planning, the scheduler, resume after SIGKILL, failures, locks, check, submitit.

Cells are real training runs of the tiny CPU model (char tokenizer, block 32, a few
iterations) through scripts/train.py, except the GPU-pool test, which uses a stand-in
trainer to pretend there are GPUs. Each real cell costs ~4 s, nearly all of it torch's
import; the tests keep the cell count small.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lib.matrix import cell as matrix_cell
from lib.matrix import describe as matrix_describe
from lib.matrix import foreground as matrix_foreground
from lib.matrix import gpus as matrix_gpus
from lib.matrix import plan as matrix_plan
from lib.matrix import process as matrix_process
from lib.matrix import scheduler as matrix_run
from lib.matrix import state as matrix_state
from lib.matrix.plan import PlanError, build_plan, save_plan
from lib.matrix.state import MatrixLocked, matrix_lock, read_state

REPO_ROOT = Path(__file__).resolve().parent.parent
MATRIX = [sys.executable, "-m", "scripts.matrix"]

# A few optimizer steps with an evaluation and a checkpoint half-way, so a killed cell has
# something to resume from.
FAST = {"TRAIN_MAX_ITERS": "6", "TRAIN_EVAL_INTERVAL": "3", "TRAIN_EVAL_BATCHES": "1", "TRAIN_LOG_INTERVAL": "1",
        "TRAIN_CHECKPOINT_INTERVAL": "3", "MATRIX": "y"}

STEPS_YAML = """
V0:
  description: baseline
  set: {ATTN_BACKEND_SDPA: y, MLP_STANDARD: y}
V1:
  description: unified RA, R=4
  extends: V0
  set: {ATTN_BACKEND_RA_UNIFIED: y, ATTN_RA_RANK: 4}
NAN:
  description: baseline with a NaN injected at step 2
  extends: V0
  set: {DEBUG_INJECT_NAN_AT_ITER: 2}
BAD:
  description: names a symbol that does not exist
  extends: V0
  set: {NO_SUCH_SYMBOL: y}
RANK:
  description: a rank above the head dimension
  extends: V1
  set: {ATTN_RA_RANK: 40}
"""


@pytest.fixture
def steps_file(tmp_path):
    path = tmp_path / "steps.yaml"
    path.write_text(STEPS_YAML)
    return path


@pytest.fixture
def matrix_config(make_config):
    def build(steps, seeds="1", **extra):
        return make_config({**FAST, "MATRIX_STEPS": steps, "MATRIX_SEEDS": seeds, **extra})
    return build


# One thread per tiny cell: as fast, and no OpenMP spin-waiting when the machine is busy.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def cli(*args, timeout=300):
    return subprocess.run([*MATRIX, *map(str, args)], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def only_matrix_dir(results: Path) -> Path:
    dirs = [p for p in results.iterdir() if (p / "plan.json").exists()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def states(matrix_dir):
    plan = matrix_plan.load_plan(matrix_dir)
    return {c.id: read_state(matrix_dir, c.id) for c in plan.cells}


# ---- planning ------------------------------------------------------------------------------------

def test_plan_crosses_steps_and_seeds_and_validates_every_cell(matrix_config, tmp_path):
    config = matrix_config("V0,V1,F1", "1,2")
    plan = build_plan(config, tmp_path / "m", environ={"GPT2_MAX_TIME": "7200", "GPT2_SEED": "99"})
    assert [c.label for c in plan.cells] == ["V0/s1", "V1/s1", "F1/s1", "V0/s2", "V1/s2", "F1/s2"]
    assert plan.baseline.id == "V0" and [v.id for v in plan.variants] == ["V0", "V1", "F1"]
    values = matrix_plan.config_values(plan.cells[4].config_path(tmp_path / "m"))
    assert values["SEED"] == "2" and values["MATRIX"] == "n" and values["ATTN_BACKEND_RA_UNIFIED"] == "y"
    assert values["GPT2_MAX_TIME"] == "7200"  # the budget from the environment is baked into every cell
    assert all(c.max_time_s == 7200 and c.num_gpus == 1 for c in plan.cells)
    # The same inputs give the same fingerprint; a changed step or budget is named.
    again = build_plan(config, tmp_path / "m2", environ={"GPT2_MAX_TIME": "7200"})
    assert again.hash == plan.hash
    shorter = build_plan(config, tmp_path / "m3", environ={"GPT2_MAX_TIME": "60"})
    assert any("GPT2_MAX_TIME: 7200 -> 60" in c for c in matrix_describe.describe_changes(plan, shorter))
    text = matrix_describe.describe_plan(plan, tmp_path / "m", parallel=1)
    assert "[V1/s1]" in text and "ATTN_BACKEND_RA_UNIFIED=y" in text and "SEED: 1 -> 2" in text
    assert "7200 s budget x 6 cells / 1 at once = 12.0 h" in text


@pytest.mark.parametrize("step, symbol", [("BAD", "NO_SUCH_SYMBOL"), ("RANK", "ATTN_RA_RANK")])
def test_a_bad_override_fails_the_plan_naming_step_and_symbol(matrix_config, steps_file, tmp_path, step, symbol):
    config = matrix_config(f"V0,{step}", "1,2")
    with pytest.raises(PlanError) as err:
        build_plan(config, tmp_path / "m", steps_file=steps_file)
    assert f"step {step}" in str(err.value) and symbol in str(err.value)
    # Through the command line: refused before anything runs, and no matrix directory is left behind.
    proc = cli("run", "--config", config, "--steps", steps_file)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"step {step}" in proc.stderr and symbol in proc.stderr
    results = tmp_path / "results"
    assert not results.exists() or [p.name for p in results.iterdir()] == [".matrix-dirs.lock"]


def test_unknown_step_id_and_non_matrix_config_are_refused(matrix_config, make_config, tmp_path):
    with pytest.raises(PlanError, match="V99"):
        build_plan(matrix_config("V0,V99"), tmp_path / "a")
    with pytest.raises(PlanError, match="not a matrix preset"):
        build_plan(make_config(), tmp_path / "b")


def test_changed_inputs_refuse_to_resume_unless_forced(matrix_config, steps_file, tmp_path):
    config = matrix_config("V0,V1")
    results = tmp_path / "results"

    def build(out):
        return build_plan(config, out, steps_file=steps_file)

    first, _, lock = matrix_state.open_matrix(results, build, name="matrix")
    lock.release()
    steps_file.write_text(STEPS_YAML.replace("ATTN_RA_RANK: 4}", "ATTN_RA_RANK: 8}"))
    with pytest.raises(matrix_state.PlanChanged, match="ablation step V1: ATTN_RA_RANK: 4 -> 8"):
        matrix_state.open_matrix(results, build, name="matrix")
    forced, plan, lock = matrix_state.open_matrix(results, build, name="matrix", force=True)
    lock.release()
    assert forced == first
    assert matrix_plan.config_values(plan.cell("V1-s1").config_path(forced))["ATTN_RA_RANK"] == "8"


# ---- locks ------------------------------------------------------------------------------------------

def test_a_second_runner_on_one_directory_refuses(matrix_config, tmp_path):
    config = matrix_config("V0")
    matrix_dir = tmp_path / "results" / "held"
    save_plan(build_plan(config, matrix_dir), matrix_dir)
    with matrix_lock(matrix_dir):
        with pytest.raises(MatrixLocked, match="locked by"):
            matrix_lock(matrix_dir).acquire()
        for command in ("run", "continue"):
            proc = cli(command, "--config", config, "--dir", matrix_dir, timeout=60)
            assert proc.returncode == 2
            assert "is locked by" in proc.stderr and f"pid {os.getpid()}" in proc.stderr
    assert read_state(matrix_dir, "V0-s1").status == "pending"  # nothing ran


# ---- the scheduler's GPU pool, with a stand-in trainer ---------------------------------------------

FAKE_TRAINER = """
import json, os, sys, time
run_dir = sys.argv[sys.argv.index("--run-dir") + 1]
os.makedirs(run_dir, exist_ok=True)
start = time.time()
time.sleep(0.4)
with open(os.path.join(run_dir, "gpus.json"), "w") as f:
    json.dump({"gpus": os.environ.get("CUDA_VISIBLE_DEVICES"), "start": start, "end": time.time()}, f)
with open(os.path.join(run_dir, "metrics.json"), "w") as f:
    json.dump({"status": "done", "final_val_loss": 1.0}, f)
"""


def test_gpu_pool_runs_floor_n_over_g_cells_pinned_to_disjoint_gpus(matrix_config, tmp_path):
    fake = tmp_path / "fake_train.py"
    fake.write_text(FAKE_TRAINER)
    config = matrix_config("V0,V1", "1,2,3", DEVICE_CUDA="y", TRAIN_NUM_GPUS="2", TRAIN_GRAD_ACCUM="2")
    matrix_dir = tmp_path / "m"
    plan = build_plan(config, matrix_dir)
    save_plan(plan, matrix_dir)
    options = matrix_run.RunOptions(gpu_ids=["0", "1", "2", "3", "4"], train_command=[sys.executable, str(fake)],
                                    echo=False, poll_s=0.05)
    outcome = matrix_run.run_matrix(matrix_dir, plan, options)
    assert len(outcome.done) == 6 and not outcome.failed
    runs = [json.loads((c.run_dir(matrix_dir) / "gpus.json").read_text()) for c in plan.cells]
    assert all(len(r["gpus"].split(",")) == 2 for r in runs)
    for a in runs:  # cells that overlapped in time never shared a GPU, and at most 2 ran at once
        overlapping = [b for b in runs if b["start"] < a["end"] and a["start"] < b["end"]]
        assert len(overlapping) <= 2
        used = [g for b in overlapping for g in b["gpus"].split(",")]
        assert len(used) == len(set(used))
    assert matrix_gpus.parallel_cells(plan.cells, ["0", "1", "2", "3", "4"]) == 2
    assert matrix_gpus.parallel_cells(plan.cells, ["0", "1", "2", "3", "4"], cap=1) == 1
    with pytest.raises(matrix_gpus.SchedulerError, match="needs 2 GPU"):
        matrix_gpus.check_feasible(plan.cells, ["0"])


# Prints the trainer's warm-up line after a "compilation" of 0.6 s, then trains 0.8 s more.
COMPILING_TRAINER = """
import json, os, sys, time
run_dir = sys.argv[sys.argv.index("--run-dir") + 1]
start = time.time()
time.sleep(0.6)
warm = time.time()
print("WARM_MARK: 2 step(s) in 0.6s", flush=True)
time.sleep(0.8)
with open(os.path.join(run_dir, "span.json"), "w") as f:
    json.dump({"start": start, "warm": warm, "end": time.time()}, f)
with open(os.path.join(run_dir, "metrics.json"), "w") as f:
    json.dump({"status": "done", "final_val_loss": 1.0}, f)
"""


def test_a_variant_compiles_once_before_its_other_cells_start_and_others_fill_the_gpus(matrix_config, tmp_path):
    from gpt2.io import WARM_MARK

    fake = tmp_path / "fake_train.py"
    fake.write_text(COMPILING_TRAINER.replace("WARM_MARK", WARM_MARK))
    config = matrix_config("V0,V1", "1,2,3", DEVICE_CUDA="y", TORCH_COMPILE="y")
    matrix_dir = tmp_path / "m"
    plan = build_plan(config, matrix_dir)
    save_plan(plan, matrix_dir)
    assert all(c.compiles for c in plan.cells)
    options = matrix_run.RunOptions(gpu_ids=["0", "1", "2", "3", "4", "5"], train_command=[sys.executable, str(fake)],
                                    echo=False, poll_s=0.05)
    outcome = matrix_run.run_matrix(matrix_dir, plan, options)
    assert len(outcome.done) == 6 and not outcome.failed
    span = {c.id: json.loads((c.run_dir(matrix_dir) / "span.json").read_text()) for c in plan.cells}
    for variant in ("V0", "V1"):
        first = span[f"{variant}-s1"]
        for seed in (2, 3):  # after the first cell's warm-up, not after its end: GPUs were free all along
            assert first["warm"] <= span[f"{variant}-s{seed}"]["start"] < first["end"], (variant, seed, span)
    assert span["V1-s1"]["start"] < span["V0-s1"]["warm"]  # the other variant took a free GPU meanwhile
    # Without compilation nothing waits: 3 cells of one variant start together.
    config = matrix_config("V0", "1,2,3", DEVICE_CUDA="y", TORCH_COMPILE="n")
    plan = build_plan(config, tmp_path / "n")
    save_plan(plan, tmp_path / "n")
    assert not any(c.compiles for c in plan.cells)
    assert len(matrix_run.run_matrix(tmp_path / "n", plan, options).done) == 3
    span = [json.loads((c.run_dir(tmp_path / "n") / "span.json").read_text()) for c in plan.cells]
    assert max(s["start"] for s in span) < min(s["warm"] for s in span)


def test_a_runner_that_never_started_cuda_may_fork_cells_that_use_it():
    assert matrix_process.ForkedTrainer.cuda_fork_safe()


PRELOAD_PROBE = """
import sys, tempfile
from pathlib import Path
from lib.matrix.process import ForkedTrainer
ForkedTrainer.preload(compiles=sys.argv[1] == "compiles")
from bench.loop import CellRuns
before = set(sys.modules)
CellRuns("shakespeare-gpu-ra-matrix", Path(tempfile.mkdtemp())).build("V0")
print(sorted(m for m in set(sys.modules) - before if m.startswith(("torch._inductor.", "networkx", "tiktoken"))
             and m != "torch._inductor.compiler_bisector"))  # imported by the compile call itself: small
"""


@pytest.mark.parametrize("compiles", [True, False])
def test_preloading_leaves_a_compiling_cell_no_compiler_to_import(compiles):
    """A forked cell's setup imported inductor and networkx itself (3.2 s of a 4.4 s setup on a CPU): with
    compiles=True the runner imports them once before forking; without it, it leaves them to the cells."""
    proc = subprocess.run([sys.executable, "-c", PRELOAD_PROBE, "compiles" if compiles else "no"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = eval(proc.stdout.strip().splitlines()[-1])  # noqa: S307 - our own probe's printed list
    assert not any(m.startswith("tiktoken") for m in imported)  # the data code is preloaded either way
    compiler = [m for m in imported if not m.startswith("tiktoken")]
    assert (compiler == []) if compiles else len(compiler) > 10, compiler[:10]


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="GPU cells need a CUDA GPU")
def test_gpu_cells_fork_from_the_runner_and_train_on_their_own_gpus(matrix_config, tmp_path):
    import torch

    config = matrix_config("V0,V1", "1,2", DEVICE_CUDA="y", TORCH_COMPILE="y")
    proc = cli("run", "--config", config, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    matrix_dir = only_matrix_dir(tmp_path / "results")
    plan = matrix_plan.load_plan(matrix_dir)
    gpus = set()
    for cell in plan.cells:
        console = (cell.run_dir(matrix_dir) / "console.log").read_text()
        assert "(forked from the matrix runner)" in console and "device NVIDIA" in console, console[-2000:]
        assert "warm-up done" in console
        gpus.add(read_state(matrix_dir, cell.id).gpus)
    assert len(gpus) == min(2, torch.cuda.device_count())  # pinned to one GPU each, on every GPU there is
    # A runner that has started CUDA cannot fork a child that uses it, and says so.
    probe = subprocess.run([sys.executable, "-c", "import torch; torch.cuda.init(); from lib.matrix.process import "
                            "ForkedTrainer; print(ForkedTrainer.cuda_fork_safe())"], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=120, env=ENV)
    assert probe.stdout.strip() == "False", probe.stdout + probe.stderr


def test_failure_reasons_are_specific():
    assert "out of memory" in matrix_cell.failure_reason(1, None, "x\ntorch.OutOfMemoryError: CUDA out of memory.")
    assert "NaN" in matrix_cell.failure_reason(1, None, "iter 3 | loss nan | lr 1e-3")
    assert "SIGKILL" in matrix_cell.failure_reason(-9, None, "")
    assert matrix_cell.failure_reason(1, {"status": "failed", "failure_reason": "non-finite loss at step 2"},
                                     "").startswith("non-finite loss at step 2")
    assert "ValueError: boom" in matrix_cell.failure_reason(1, None, "Traceback ...\nValueError: boom")


# ---- real cells ------------------------------------------------------------------------------------

def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_matrix_survives_sigkill_resumes_and_reports(matrix_config, tmp_path):
    """3 steps x 2 seeds end to end, with the runner SIGKILLed while a cell is training.

    40 short steps with a checkpoint every 3 leave a window of a few tenths of a second in
    which a cell has a checkpoint but has not finished; the kill lands in it.
    """
    config = matrix_config("V0,V1,F1", "1,2", TRAIN_MAX_ITERS="40", TRAIN_EVAL_INTERVAL="20",
                           TRAIN_LOG_INTERVAL="10")
    results = tmp_path / "results"
    command = [*MATRIX, "run", "--config", str(config)]
    with open(tmp_path / "first.log", "w") as log:
        runner = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=ENV)
        matrix_dir = wait_for(lambda: next(iter(results.glob("*/plan.json")), None), 60, "plan.json").parent

        def mid_cell():
            now = states(matrix_dir)
            done = [c for c, s in now.items() if s.status == "done"]
            busy = [c for c, s in now.items() if s.status == "running"
                    and (matrix_dir / "cells" / c / "ckpt.pt").exists()]
            return len(done) >= 2 and busy and (done, busy)

        done_before, interrupted = wait_for(mid_cell, 240, "two finished cells and one with a checkpoint")
        runner.send_signal(signal.SIGKILL)
        runner.wait(timeout=30)
    before = {c: (matrix_dir / "cells" / c / "metrics.json").stat().st_mtime_ns for c in done_before}
    # The killed runner's cell does not keep training on its own.
    pgid = read_state(matrix_dir, interrupted[0]).pgid
    wait_for(lambda: not matrix_process.group_alive(pgid), 30, "the orphaned cell to exit")

    rerun = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr
    assert only_matrix_dir(results) == matrix_dir  # the same command picked up the same directory
    final = states(matrix_dir)
    assert all(s.status == "done" for s in final.values()), final
    for cell in done_before:  # finished cells were not rerun
        assert (matrix_dir / "cells" / cell / "metrics.json").stat().st_mtime_ns == before[cell]
        assert final[cell].attempts == 1
    assert final[interrupted[0]].attempts == 2  # the interrupted cell resumed from its checkpoint
    console = (matrix_dir / "cells" / interrupted[0] / "console.log").read_text()
    assert "==== attempt 2 (resume)" in console and "resuming at iter" in console
    assert "(forked from the matrix runner)" in console  # no GPU here: cells fork from the runner, torch imported

    report = (matrix_dir / "report.md").read_text()
    for section in ("# Matrix report", "**Hardware**", "**Git commit**", "**Budget**", "**Seeds**: 1, 2",
                    "## Verdicts", "## Results per step", "## Matched comparisons", "## Learned gates",
                    "## Plots", "## Cells", "val_loss_vs_time.png", "gates.png"):
        assert section in report, section
    assert "6 done, 0 failed" in report
    for name in ("val_loss_vs_time.png", "val_loss_vs_tokens.png", "throughput.png", "gates.png",
                 "report.json", "report.csv", "report_cells.csv"):
        assert (matrix_dir / name).stat().st_size > 0
    data = json.loads((matrix_dir / "report.json").read_text())
    assert [s["variant"] for s in data["steps"]] == ["V0", "V1", "F1"]
    assert data["comparisons"]["V1"]["tokens"]["n"] == 2  # same tokens per step: every seed pairs up
    assert data["matched"]["train_time_s"] > 0
    # A second identical run finds nothing to do.
    again = cli("run", "--config", config, timeout=120)
    assert again.returncode == 0 and "0 of 6 cells to run" in again.stdout


def test_a_failing_cell_is_reported_while_the_others_finish(matrix_config, steps_file, tmp_path):
    config = matrix_config("V0,NAN,V1")
    first = cli("run", "--config", config, "--steps", steps_file, "--stop-on-failure")
    assert first.returncode == 1, first.stdout[-3000:] + first.stderr
    matrix_dir = only_matrix_dir(tmp_path / "results")
    now = states(matrix_dir)
    assert now["V0-s1"].status == "done" and now["NAN-s1"].status == "failed"
    assert now["V1-s1"].status == "pending"  # stop on failure: nothing new started
    assert "FAILED [NAN/s1]" in first.stdout and "nan" in now["NAN-s1"].failure_reason.lower()

    second = cli("continue", "--config", config)  # goes on past the failure, with the plan's own steps file
    assert second.returncode == 1
    now = states(matrix_dir)
    assert now["V1-s1"].status == "done" and now["NAN-s1"].status == "failed" and now["NAN-s1"].attempts == 1
    report = (matrix_dir / "report.md").read_text()
    assert "**Failed cells**" in report and "`NAN/s1`" in report and "2 done, 1 failed" in report
    status = cli("status", "--config", config, "--dir", matrix_dir, timeout=60)
    assert "failed" in status.stdout and "NAN/s1" in status.stdout


def test_check_prints_the_plan_and_runs_every_cell_quickly(matrix_config, tmp_path):
    config = matrix_config("V0,V1,F1", "1,2", GPT2_MAX_TIME="600")
    started = time.monotonic()
    proc = cli("check", "--config", config, timeout=120)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    assert "3 variant(s) x 2 seed(s) = 6 cells" in proc.stdout
    assert "[F1/s2]" in proc.stdout and "time estimate: 600 s budget x 6 cells / 1 at once" in proc.stdout
    assert "check passed" in proc.stdout
    assert elapsed < 60
    results = tmp_path / "results"
    assert not results.exists() or not any(results.iterdir())  # a dry run leaves no matrix behind


def test_submitit_local_executor_runs_cells_from_the_plan(matrix_config, tmp_path):
    config = matrix_config("V0,V1", DEVICE_CPU="y")
    proc = cli("submit", "--config", config, "--cluster", "local", "--wait", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    matrix_dir = only_matrix_dir(tmp_path / "results")
    final = states(matrix_dir)
    assert all(s.status == "done" and s.runner.startswith("slurm:") for s in final.values()), final
    assert (matrix_dir / "report.md").exists() and (matrix_dir / "slurm").stat().st_mode & 0o777 == 0o700
    # submitit starts every local task at once; the CPU cells still trained one after another
    spans = sorted((s.started_at, s.finished_at) for s in final.values())
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:])), spans
    again = cli("submit", "--config", config, "--cluster", "local", timeout=120)
    assert again.returncode == 0 and "no cell left to run" in again.stdout


def test_single_cell_task_leaves_a_locked_cell_alone(matrix_config, tmp_path):
    config = matrix_config("V0")
    matrix_dir = tmp_path / "m"
    plan = build_plan(config, matrix_dir)
    save_plan(plan, matrix_dir)
    with matrix_state.cell_lock(matrix_dir, "V0-s1"):
        state = matrix_foreground.run_single_cell(matrix_dir, plan, "V0-s1", options=matrix_run.RunOptions(echo=False))
    assert state.status == "pending" and state.attempts == 0
