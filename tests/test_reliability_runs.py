"""Single runs a crash, a kill -9, Ctrl-C or a second runner cannot fool (issue 15, items 3 and 4).

Every run here is a real tiny CPU training run (char tokenizer, block 32) in a real subprocess where the
behaviour under test is about processes: `make resume` is `python -m scripts.run --resume`, killed runs are
killed with real signals, and two runners are two real processes.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from gpt2.train import trainer
from gpt2.train.run_dir import RunLock, run_is_live
from lib.config import load_settings, parse_assignments
from tests.test_matrix import wait_for

REPO_ROOT = Path(__file__).resolve().parent.parent
RUN = [sys.executable, "-m", "scripts.run"]
# One thread per tiny run: as fast, and no OpenMP spin-waiting when the machine is busy. No GPT2_* from the
# developer's shell: the tests set the ones they mean.
ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("GPT2_")}, "OMP_NUM_THREADS": "1"}
# Trains until stopped: no checkpoint before the end, a budget far beyond the test.
UNTIL_STOPPED = {"GPT2_MAX_TIME": "600", "TRAIN_MAX_ITERS": "0", "TRAIN_CHECKPOINT_INTERVAL": "0",
                 "TRAIN_EVAL_INTERVAL": "100000"}


def cli(*args, env=None, timeout=300):
    return subprocess.run([*RUN, *map(str, args)], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**ENV, **(env or {})})


def metrics(run_dir):
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def values(path):
    return {a.symbol: a.value for a in parse_assignments(path)}


def status_is(run_dir, status):
    try:
        return metrics(run_dir)["status"] == status
    except (OSError, ValueError, KeyError):
        return False


def finished_run(config, run_dir):
    """A finished run, trained in this process (what it is, not how it was made, is under test)."""
    assert trainer.run(load_settings(config, environ={}), config, run_dir, argv=["tests"]) == 0
    return Path(run_dir)


def start_trainer(config, run_dir):
    return subprocess.Popen([sys.executable, "-m", "lib.runs.train", "--config", str(config), "--run-dir",
                             str(run_dir)], cwd=REPO_ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def test_resume_never_picks_a_finished_run_and_marks_a_run_killed_before_its_checkpoint(make_config, tmp_path):
    config = make_config({"TRAIN_MAX_ITERS": "4"})
    results = tmp_path / "results"
    finished = finished_run(config, results / "run-finished")
    finished_record = (finished / "metrics.json").read_bytes(), (finished / "eval.jsonl").read_bytes()

    killed_dir = results / "run-killed"
    trainer_proc = start_trainer(make_config(UNTIL_STOPPED, name="long"), killed_dir)
    wait_for(lambda: status_is(killed_dir, "running") and run_is_live(killed_dir), 120, "training to start")
    trainer_proc.send_signal(signal.SIGKILL)  # what the OOM killer or a power cut does
    trainer_proc.wait(timeout=30)
    assert status_is(killed_dir, "running") and not (killed_dir / "ckpt.pt").exists()
    assert not run_is_live(killed_dir)  # the kernel dropped its lock with it

    proc = cli("--config", config, "--resume")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"skipping {killed_dir}: its process died")
    assert "cannot resume: no checkpoint" in lines[0] and "marked failed" in lines[0]
    assert lines[1].startswith(f"skipping {finished}: finished (done at iter 4")
    assert f"make resume RUN={finished} EXTEND=600s" in lines[1]
    assert proc.stderr.startswith("error: no unfinished run") and proc.stderr.count("\n") == 1
    killed = metrics(killed_dir)
    assert killed["status"] == "failed" and "before its first checkpoint" in killed["failure_reason"]
    # The finished run was not touched: not resumed, not extended, its records as they were.
    assert ((finished / "metrics.json").read_bytes(), (finished / "eval.jsonl").read_bytes()) == finished_record

    named = cli("--config", config, "--resume", killed_dir)
    assert named.returncode == 2 and "no checkpoint" in named.stderr
    again = cli("--config", config, "--resume", finished)
    assert again.returncode == 2 and "finished (done at iter 4" in again.stderr and "EXTEND=" in again.stderr
    missing = cli("--config", config, "--resume", results / "no-such-run")
    assert missing.returncode == 2 and "no such run directory" in missing.stderr
    assert not (results / "no-such-run").exists()  # not a fresh run at that path
    assert ((finished / "metrics.json").read_bytes(), (finished / "eval.jsonl").read_bytes()) == finished_record


def test_ctrl_c_checkpoints_and_resume_uses_the_runs_own_budget_with_one_runner(make_config, tmp_path):
    own = {"TRAIN_MAX_ITERS": "300", "TRAIN_CHECKPOINT_INTERVAL": "5", "TRAIN_EVAL_INTERVAL": "100",
           "TRAIN_LOG_INTERVAL": "50", "TRAIN_LR": "2e-3", "TRAIN_LR_MIN": "2e-4"}
    config = make_config(own)
    results = tmp_path / "results"
    # Ctrl-C in a terminal: SIGINT to the whole foreground process group, `make`'s python and the trainer alike.
    first = subprocess.Popen([*RUN, "--config", str(config), "--single"], cwd=REPO_ROOT, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    run_dir = wait_for(lambda: next(iter(results.glob("*/ckpt.pt")), None), 120, "the first checkpoint").parent
    os.killpg(first.pid, signal.SIGINT)
    output, _ = first.communicate(timeout=120)
    assert first.returncode == 130, output
    stopped = metrics(run_dir)
    assert stopped["status"] == "interrupted" and 0 < stopped["iters"] < 300, output
    assert f"`make resume RUN={run_dir}`" in output

    # The .config has changed since (a shorter budget, another learning rate): the resumed run ignores it.
    changed = make_config({**own, "TRAIN_MAX_ITERS": "10", "TRAIN_LR": "9e-3"}, name="changed")
    refused = cli("--config", changed, "--resume", env={"GPT2_MAX_ITERS": "50"})
    assert refused.returncode == 2 and "GPT2_MAX_ITERS=50 is set" in refused.stderr
    assert "CONFIG_TRAIN_MAX_ITERS=300" in refused.stderr and status_is(run_dir, "interrupted")

    resumer = subprocess.Popen([*RUN, "--config", str(changed), "--resume"], cwd=REPO_ROOT, env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: run_is_live(run_dir), 60, "the resumed run to hold its lock")
    second = cli("--config", changed, "--resume", run_dir, timeout=60)
    output, _ = resumer.communicate(timeout=300)
    assert resumer.returncode == 0, output
    assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
    assert f"run {run_dir} is locked by" in second.stderr and f"pid {resumer.pid}" in second.stderr
    assert output.startswith(f"resuming {run_dir}: the newest unfinished run of runs without a preset "
                             f"(interrupted at iter {stopped['iters']}")
    done = metrics(run_dir)
    assert done["status"] == "done" and done["iters"] == 300 and done["budget"]["max_iters"] == 300
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert evals[-1]["iter"] == 300 and evals[-1]["lr"] == 2e-4  # its own schedule, decayed to its own minimum
    log = (run_dir / "train.log").read_text()
    assert log.count(f"resuming at iter {stopped['iters']}") == 1  # one trainer resumed it, once


def test_extend_trains_a_finished_run_further_at_the_rate_it_ended_with(make_config, tmp_path):
    config = make_config({"TRAIN_MAX_ITERS": "6", "TRAIN_EVAL_INTERVAL": "3", "TRAIN_LOG_INTERVAL": "1",
                          "TRAIN_LR": "2e-3", "TRAIN_LR_MIN": "2e-4"})
    run_dir = finished_run(config, tmp_path / "results" / "run-a")
    assert json.loads((run_dir / "eval.jsonl").read_text().splitlines()[-1])["lr"] == 2e-4

    for extend, message in (("5", "give a positive amount with its unit"), ("0it", "positive amount"),
                            ("3 parsecs", "600s, 10m, 2h")):
        proc = cli("--config", config, "--resume", run_dir, "--extend", extend)
        assert proc.returncode == 2 and message in proc.stderr, (extend, proc.stderr)
    no_run = cli("--config", config, "--resume", "--extend", "5it")
    assert no_run.returncode == 2 and "EXTEND needs the run it extends" in no_run.stderr
    assert values(run_dir / "config")["TRAIN_MAX_ITERS"] == "6"  # refusals change nothing

    proc = cli("--config", config, "--resume", run_dir, "--extend", "4it")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    assert proc.stdout.startswith(f"extending {run_dir}: at iter 6 after ")
    assert "4 more iterations (TRAIN_MAX_ITERS=10, no time cap); learning rate held at 2e-4" in proc.stdout
    snapshot = values(run_dir / "config")
    assert snapshot["TRAIN_MAX_ITERS"] == "10" and snapshot["GPT2_MAX_TIME"] == "0"
    assert snapshot["TRAIN_SCHEDULE_CONSTANT"] == "y" and snapshot["TRAIN_LR"] == "2e-4"
    assert "# Extended " in (run_dir / "config").read_text().split("\n#\n")[0]
    done = metrics(run_dir)
    assert done["status"] == "done" and done["iters"] == 10 and done["sessions"] == 2
    lrs = [float(line.split("| lr ")[1].split(" ")[0]) for line in (run_dir / "train.log").read_text().splitlines()
           if "| lr " in line]
    assert lrs[-4:] == [2e-4] * 4  # the extension's steps: no jump back up the schedule


def test_the_trainer_itself_refuses_a_run_directory_another_process_trains(make_config, tmp_path):
    """trainer.run called on its own (not through lib.runs.train) takes the run lock too: a second trainer on a
    held directory fails in one line and writes nothing into the other run's directory."""
    config = make_config({"TRAIN_MAX_ITERS": "2", "GPT2_MAX_TIME": "0"})
    run_dir = tmp_path / "held"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from gpt2.train.run_dir import RunLock; RunLock(sys.argv[1]).acquire(); "
        "print('held', flush=True); time.sleep(60)"), str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code = trainer.run(load_settings(config, environ={}), config, run_dir, argv=["tests"])
        assert code == 1
        assert sorted(p.name for p in run_dir.iterdir()) == [".run.lock"]  # no metrics, log or snapshot
    finally:
        holder.kill()
        holder.wait()
    assert trainer.run(load_settings(config, environ={}), config, run_dir, argv=["tests"]) == 0
    assert not run_is_live(run_dir)
