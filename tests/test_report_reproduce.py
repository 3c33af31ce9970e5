"""Every run in a report comes with one command line that trains it again: the commit it ran, the preset (or the
saved configuration when it is not a preset as it stands), the GPT2_* budget overrides, and the make target.

Plans and configurations are real (presets expanded through Kconfig, lib.matrix.plan); the last test trains a
real two-cell matrix and checks the command against the commit and overrides it actually ran with.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from lib import config as cfg
from lib.matrix.plan import build_plan, save_plan
from lib.matrix.state import CellState, write_state
from lib.report import writer as report
from test_report import ENV, write_run

REPO_ROOT = Path(__file__).resolve().parent.parent
DIRTY_ENV = {**ENV, "git": {"commit": "fedcba9876543210", "dirty": True, "diff": "--- a/x\n+++ b/x\n"}}


def _reproduce(matrix_dir):
    report.write_matrix_report(matrix_dir)
    text = (matrix_dir / "report.md").read_text()
    commands = json.loads((matrix_dir / "report.json").read_text())["reproduce"]
    return text.split("## Reproduce", 1)[1], commands


def _preset_config(tmp_path, preset) -> Path:
    """A .config exactly as `make defconfig-<preset>` writes it."""
    config = tmp_path / f"{preset}.config"
    cfg.apply_defconfig(cfg.preset_path(preset), config)
    return config


def test_cells_of_a_preset_reproduce_with_make_defconfig_and_the_budget_overrides(tmp_path):
    matrix_dir = tmp_path / "matrix"
    plan = build_plan(_preset_config(tmp_path, "cpu-default"), matrix_dir, environ={"GPT2_MAX_TIME": "600"})
    save_plan(plan, matrix_dir)
    assert [c.id for c in plan.cells] == ["V0-s1", "V1-s1", "F1-s1"]
    for cell, env in (("V0-s1", ENV), ("V1-s1", DIRTY_ENV)):  # F1 has not started
        write_run(plan.cell(cell).run_dir(matrix_dir), plan.cell(cell).config_path(matrix_dir), 3.0, env=env)
        write_state(matrix_dir, cell, CellState(status="done", attempts=1, exit_code=0))
    section, commands = _reproduce(matrix_dir)
    assert commands["V0/s1"] == {"command": "git checkout 0123456789ab && make defconfig-cpu-default && "
                                            "GPT2_MAX_TIME=600 make cell CELL=V0-s1", "warning": ""}
    assert commands["V1/s1"]["command"] == ("git checkout fedcba987654 && make defconfig-cpu-default && "
                                            "GPT2_MAX_TIME=600 make cell CELL=V1-s1")
    assert commands["V1/s1"]["warning"].startswith("uncommitted changes: the checkout lacks them; the diff is in `")
    assert commands["V1/s1"]["warning"].endswith("/cells/V1-s1/env.json` (git.diff)")
    assert commands["F1/s1"] == {"command": "make defconfig-cpu-default && GPT2_MAX_TIME=600 make cell CELL=F1-s1",
                                 "warning": "not started yet: the commit is the one the matrix will run"}
    assert ("| V0/s1 | `git checkout 0123456789ab && make defconfig-cpu-default && GPT2_MAX_TIME=600 make cell "
            "CELL=V0-s1` |  |") in section


def test_a_comparison_of_presets_names_them(tmp_path):
    matrix_dir = tmp_path / "matrix"
    plan = build_plan(_preset_config(tmp_path, "cpu-tiny-run"), matrix_dir,
                      defconfigs=["shakespeare-gpu", "cpu-tiny-run"], environ={})
    save_plan(plan, matrix_dir)
    cell = plan.cell("cpu-tiny-run")
    write_run(cell.run_dir(matrix_dir), cell.config_path(matrix_dir), 3.0)
    write_state(matrix_dir, cell.id, CellState(status="done", attempts=1, exit_code=0))
    _, commands = _reproduce(matrix_dir)
    assert commands["cpu-tiny-run"]["command"] == (
        'git checkout 0123456789ab && make defconfig-cpu-tiny-run && make cell CELL=cpu-tiny-run '
        'DEFCONFIGS="shakespeare-gpu cpu-tiny-run"')


def test_an_edited_configuration_is_restored_from_the_saved_file(tmp_path):
    # menuconfig keeps the preset marker, so the marker alone would claim a preset that is not what ran.
    config = _preset_config(tmp_path, "cpu-default")
    config.write_text(config.read_text().replace("CONFIG_TRAIN_EVAL_INTERVAL=100", "CONFIG_TRAIN_EVAL_INTERVAL=50"))
    assert cfg.preset_of(config) == "cpu-default"
    matrix_dir = tmp_path / "matrix"
    save_plan(build_plan(config, matrix_dir, environ={}), matrix_dir)
    _, commands = _reproduce(matrix_dir)
    assert commands["V0/s1"]["command"] == (f"cp {(matrix_dir / 'base.config').resolve()} .config && "
                                            f"make cell CELL=V0-s1")


def test_a_single_run_reproduces_with_its_preset_and_environment(tmp_path):
    effective = tmp_path / "effective.config"
    cfg.write_effective_config(_preset_config(tmp_path, "cpu-tiny-run"), effective,
                               environ={"GPT2_MAX_TIME": "600", "GPT2_SEED": "3"})
    run_dir = tmp_path / "run"
    write_run(run_dir, effective, 3.2, env=DIRTY_ENV)
    text = report.write_report(run_dir).read_text()
    command = "git checkout fedcba987654 && make defconfig-cpu-tiny-run && GPT2_MAX_TIME=600 GPT2_SEED=3 make train"
    assert f"## Reproduce\n\n`{command}`\n\nNote: uncommitted changes: the checkout lacks them" in text
    assert json.loads((run_dir / "report.json").read_text())["reproduce"]["command"] == command
    # The same run with its configuration edited after the preset: the snapshot (overrides folded in) is copied.
    snapshot = run_dir / "config"
    snapshot.write_text(snapshot.read_text().replace("CONFIG_TRAIN_EVAL_INTERVAL=100",
                                                     "CONFIG_TRAIN_EVAL_INTERVAL=50"))
    text = report.write_report(run_dir).read_text()
    assert f"`git checkout fedcba987654 && cp {snapshot.resolve()} .config && make train`" in text


def test_a_real_matrix_reports_the_commit_budget_and_costs_it_ran_with(make_config, tmp_path):
    """Two real cells, planned as `GPT2_MAX_ITERS=4 make` plans them and trained by the command a cell runs."""
    config = make_config({"MATRIX": "y", "MATRIX_STEPS": "V0,V1", "MATRIX_SEEDS": "1", "TRAIN_EVAL_INTERVAL": "2",
                          "TRAIN_EVAL_BATCHES": "1", "TRAIN_CHECKPOINT_INTERVAL": "0"})
    matrix_dir = tmp_path / "matrix"
    plan = build_plan(config, matrix_dir, environ={"GPT2_MAX_ITERS": "4"})
    save_plan(plan, matrix_dir)
    for cell in plan.cells:
        train = subprocess.run([sys.executable, "-m", "lib.runs.train", "--config", str(cell.config_path(matrix_dir)),
                                "--run-dir", str(cell.run_dir(matrix_dir))], cwd=REPO_ROOT, capture_output=True,
                               text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
        write_state(matrix_dir, cell.id, CellState(status="done", attempts=1, exit_code=0))
    section, commands = _reproduce(matrix_dir)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout
    for cell in ("V0-s1", "V1-s1"):
        git = json.loads((matrix_dir / "cells" / cell / "env.json").read_text())["git"]
        assert git["commit"] == head.strip()
        label = cell.replace("-", "/")
        assert commands[label]["command"] == (f"git checkout {head[:12]} && cp {(matrix_dir / 'base.config').resolve()}"
                                              f" .config && GPT2_MAX_ITERS=4 make cell CELL={cell}")
        assert bool(commands[label]["warning"]) == git["dirty"]
        metrics = json.loads((matrix_dir / "cells" / cell / "metrics.json").read_text())
        assert metrics["iters"] == 4 and metrics["params"] > 0 and metrics["flops_per_token"] > 0
    data = json.loads((matrix_dir / "report.json").read_text())
    steps = {s["variant"]: s for s in data["steps"]}
    for step in ("V0", "V1"):
        metrics = json.loads((matrix_dir / "cells" / f"{step}-s1" / "metrics.json").read_text())
        assert steps[step]["params"] == metrics["params"] and steps[step]["flops_per_token"] == metrics["flops_per_token"]
    assert data["study"].startswith("demo") and data["verdicts"]["V1"].startswith("1 seed: no interval, no verdict")
    # The cells table says what each run recorded about its minimum and its machine.
    text = (matrix_dir / "report.md").read_text()
    for cell in ("V0-s1", "V1-s1"):
        metrics = json.loads((matrix_dir / "cells" / cell / "metrics.json").read_text())
        row = next(line for line in text.splitlines() if line.startswith(f"| {cell.replace('-', '/')} | done |"))
        past, machine = metrics.get("past_val_minimum"), metrics.get("machine") or {}
        assert (f"| {'no' if past is None else 'yes, by %.4f nats' % past['by']}" in row if "past_val_minimum"
                in metrics else "| not recorded |" in row)
        if machine.get("busy") is not None:
            assert (f"| busy: {machine['busy_reason']} |" if machine["busy"] else "| not busy |") in row


def _git(repo, *args):
    return subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=repo, check=True,
                          capture_output=True, text=True).stdout.strip()


def test_a_run_from_uncommitted_files_is_found_once_they_are_committed(tmp_path):
    """The tree id a run records names its files: committed afterwards (or sent to a machine whose git metadata
    is older), the report finds the commit with exactly those files and checks that one out."""
    from gpt2.train.run_dir import UNTRACKED_TREE_LIMIT_BYTES, git_info
    from lib.report.code import commits_by_tree, ran_code
    from lib.report.reproduce import checkout

    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "model.py").write_text("a = 1\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "first")
    first = _git(repo, "rev-parse", "HEAD")
    (repo / "model.py").write_text("a = 2\n")
    (repo / "new.py").write_text("b = 1\n")
    env = {"git": git_info(repo)}
    assert env["git"]["dirty"] and env["git"]["commit"] == first and _git(repo, "status", "--short")  # index intact
    code = ran_code(env, repo)
    assert code.dirty and code.commit == first
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "second")
    second = _git(repo, "rev-parse", "HEAD")
    commits_by_tree.cache_clear()
    code = ran_code(env, repo)
    assert (code.commit, code.recorded, code.dirty) == (second, first, False)
    (repo / "model.py").write_text("a = 3\n")  # files no commit has
    assert ran_code({"git": git_info(repo)}, repo).dirty
    big = repo / "left-behind.bin"  # untracked data past the limit: no tree id, nothing copied into .git
    with open(big, "wb") as f:
        f.truncate(UNTRACKED_TREE_LIMIT_BYTES + 1)
    assert git_info(repo)["tree"] is None and ran_code({"git": git_info(repo)}, repo).dirty
    # In this repository: a record made "dirty" on HEAD~ whose files are HEAD's reproduces from HEAD, no warning.
    head, tree = (_git(cfg.REPO_ROOT, "rev-parse", ref) for ref in ("HEAD", "HEAD^{tree}"))
    commits_by_tree.cache_clear()
    command, warning = checkout({"git": {"commit": "0" * 40, "dirty": True, "tree": tree}}, tmp_path)
    assert command == f"git checkout {head[:12]} && " and warning == ""
    command, warning = checkout({"git": {"commit": "0" * 40, "dirty": True, "tree": "f" * 40}}, tmp_path)
    assert command == f"git checkout {'0' * 12} && " and "uncommitted changes" in warning
