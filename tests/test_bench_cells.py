"""scripts/bench_cells.py: a real two-cell matrix on the CPU (--smoke), and the goal arithmetic."""

import json
import subprocess
import sys
from pathlib import Path

from bench.cells import evaluate

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_smoke_run_times_two_real_cells_from_their_records(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "scripts.bench_cells", "--smoke", "--out-dir", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    report = json.loads((tmp_path / "cells-cpu-smoke.json").read_text())
    (run,) = report["runs"]
    first, second = run["cells"]
    assert (first["cell"], first["first_of_variant"], second["first_of_variant"]) == ("V0-s1", True, False)
    for cell in run["cells"]:  # each trained its 2 s budget (a step past it on a busy CPU), and its wall time
        assert cell["budget_s"] == 2 and cell["train_s"] >= 2  # holds that and the overheads
        assert cell["wall_s"] > cell["train_s"] + cell["compile_s"] + cell["eval_s"]
        # the setup's phases, timed by the trainer, add up to no more than its setup
        assert {"process", "data", "model", "resume", "records"} <= set(cell["setup_parts_s"])
        assert 0 < sum(cell["setup_parts_s"].values()) <= cell["setup_s"] + 1e-3
    assert run["command_wall_s"] > run["span_s"] >= first["wall_s"] + second["wall_s"]  # one CPU cell at a time
    assert "cells after the first of their variant <= 1.3x their budget" in report["goals"]
    markdown = (tmp_path / "cells-cpu-smoke.md").read_text()
    assert "| V0-s2 |" in markdown and "setup by phase s" in markdown and "model " in markdown


def test_goals_count_only_warm_cells_and_scale_by_the_gpu_count():
    def cell(first, wall, compile_s):
        return {"first_of_variant": first, "wall_over_budget": wall, "compile_s": compile_s}

    one = {"gpus": 1, "span_s": 300.0, "command_wall_s": 310.0, "cells": [cell(True, 1.9, 20.0), cell(False, 1.25, 2.0)]}
    two = {"gpus": 2, "span_s": 160.0, "command_wall_s": 180.0, "cells": [cell(True, 2.0, 25.0), cell(False, 1.28, 2.5)]}
    goals = evaluate([one, two])
    assert goals["cells after the first of their variant <= 1.3x their budget"]["value"] == 1.28
    assert goals["their compile <= 5 s"] == {"value": 2.5, "met": True}
    span = goals["2 GPUs >= 0.9 x 2 x one GPU's speed (cells' span)"]
    command = goals["2 GPUs >= 0.9 x 2 x one GPU's speed (matrix command)"]
    assert (span["value"], span["met"]) == (300 / 160, True)
    assert (command["value"], command["met"]) == (310 / 180, False)
