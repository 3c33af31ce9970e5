"""CONFIG_MATRIX_SWEEP: any Kconfig symbol as an axis of the matrix (lib/matrix/sweep.py states the syntax and
rules). Plans are built through the real Kconfig tree and kconfiglib; the report is checked on hand-written run
files with known numbers (test_report.write_run); `make check` and `make cell` train real tiny cells."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lib.matrix import describe as matrix_describe
from lib.matrix import plan as matrix_plan
from lib.matrix import sweep as matrix_sweep
from lib.matrix.plan import PlanError, build_plan, load_plan, save_plan
from lib.matrix.state import CellState, write_state
from lib.report import writer as report
from test_report import write_run

REPO_ROOT = Path(__file__).resolve().parent.parent
FAST = {"TRAIN_MAX_ITERS": "4", "TRAIN_EVAL_INTERVAL": "2", "TRAIN_EVAL_BATCHES": "1", "TRAIN_LOG_INTERVAL": "1",
        "TRAIN_CHECKPOINT_INTERVAL": "2", "MATRIX": "y"}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SAFE_ID = re.compile(r"[A-Za-z0-9_.+=-]+")


@pytest.fixture
def sweep_config(make_config):
    def build(sweep, steps="V0,V1", seeds="1", **extra):
        return make_config({**FAST, "MATRIX_STEPS": steps, "MATRIX_SEEDS": seeds, "MATRIX_SWEEP": sweep, **extra})
    return build


def values_of(plan, matrix_dir, cell_id) -> dict:
    return matrix_plan.config_values(plan.cell(cell_id).config_path(matrix_dir))


# ---- syntax -------------------------------------------------------------------------------------------

def test_the_syntax_survives_kconfig_string_quoting_and_says_what_is_wrong(sweep_config, tmp_path):
    axes = matrix_sweep.parse_sweep(" CONFIG_ATTN_RA_RANK = 2, 4 ,8 ; TRAIN_LR=6e-4,1e-3;")
    assert axes == [("ATTN_RA_RANK", ("2", "4", "8")), ("TRAIN_LR", ("6e-4", "1e-3"))]
    assert matrix_sweep.parse_sweep("") == []
    # The .config line needs no escaping: the string reads back exactly as written.
    config = sweep_config("ATTN_RA_RANK=2,4,8;TRAIN_LR=6e-4,1e-3")
    assert 'CONFIG_MATRIX_SWEEP="ATTN_RA_RANK=2,4,8;TRAIN_LR=6e-4,1e-3"' in config.read_text()
    for text, message in {"ATTN_RA_RANK": "is not SYMBOL=value,value",
                          "=2,4": "is not SYMBOL=value,value",
                          "ATTN_RA_RANK=2,,4": "ATTN_RA_RANK=2,,4 has an empty value",
                          "ATTN_RA_RANK=2,2": "ATTN_RA_RANK lists 2 twice",
                          "ATTN_RA_RANK=2;ATTN_RA_RANK=4": "ATTN_RA_RANK is swept twice",
                          "TRAIN_LR=a\\b": "cannot hold quotes, backslashes"}.items():
        with pytest.raises(matrix_sweep.SweepError, match=re.escape(message)):
            matrix_sweep.parse_sweep(text)


# ---- planning -----------------------------------------------------------------------------------------

def test_a_sweep_crosses_the_steps_and_seeds_under_the_stated_rules(sweep_config, tmp_path):
    config = sweep_config("ATTN_RA_RANK=2,8;TRAIN_LR=6e-4,1e-3", steps="V0,V1,V7", seeds="1,2")
    plan = build_plan(config, tmp_path / "m", environ={})
    # V0 has no rank (SDPA): it runs once per learning rate, and the plan says why.
    assert [v.id for v in plan.variants] == [
        "V0/TRAIN_LR=6e-4", "V0/TRAIN_LR=1e-3",
        "V1/ATTN_RA_RANK=2/TRAIN_LR=6e-4", "V1/ATTN_RA_RANK=2/TRAIN_LR=1e-3",
        "V1/ATTN_RA_RANK=8/TRAIN_LR=6e-4", "V1/ATTN_RA_RANK=8/TRAIN_LR=1e-3"]
    assert any(n.startswith("V0: CONFIG_ATTN_RA_RANK does not apply (it depends on ATTN_BACKEND_RA_FOLD_LOWRANK")
               and "V0 is not swept over it" in n for n in plan.notes), plan.notes
    # V7 is V1 at R=8; swept, its cells are V1's: planned once, and said.
    assert "V7 has the configuration of V1 at every swept value: planned once, as V1" in plan.notes
    assert not any(c.step == "V7" for c in plan.cells)
    # Cells are named by their values, as safe directory names, seed-major.
    assert len(plan.cells) == 12 and plan.cells[2].id == "V1-ATTN_RA_RANK=2-TRAIN_LR=6e-4-s1"
    assert plan.cells[-1].label == "V1/ATTN_RA_RANK=8/TRAIN_LR=1e-3/s2"
    assert all(SAFE_ID.fullmatch(c.id) for c in plan.cells)
    # A swept value overrides the step's own (V1 sets ATTN_RA_RANK=4) and the step's description says so.
    v1 = values_of(plan, tmp_path / "m", "V1-ATTN_RA_RANK=8-TRAIN_LR=1e-3-s2")
    assert (v1["ATTN_RA_RANK"], v1["TRAIN_LR"], v1["SEED"], v1["ATTN_BACKEND_RA_UNIFIED"]) == ("8", "1e-3", "2", "y")
    assert plan.variants[4].description.endswith("; swept ATTN_RA_RANK=8 (not the step's 4), TRAIN_LR=6e-4")
    assert "ATTN_RA_RANK" not in values_of(plan, tmp_path / "m", "V0-TRAIN_LR=1e-3-s1")
    # plan.json keeps the sweep; `make check` prints it with the notes.
    save_plan(plan, tmp_path / "m")
    again = load_plan(tmp_path / "m")
    assert again.sweep == [["ATTN_RA_RANK", ["2", "8"]], ["TRAIN_LR", ["6e-4", "1e-3"]]]
    assert again.variants == plan.variants and again.notes == plan.notes and again.hash == plan.hash
    text = matrix_describe.describe_plan(plan, tmp_path / "m", parallel=1)
    assert "sweep (CONFIG_MATRIX_SWEEP), crossed with the steps and seeds: ATTN_RA_RANK = 2, 8; TRAIN_LR = 6e-4" in text
    assert "  note: V7 has the configuration of V1" in text and "[V1/ATTN_RA_RANK=8/TRAIN_LR=1e-3/s2]" in text


def test_the_fingerprint_holds_the_sweep(sweep_config, tmp_path):
    plan = build_plan(sweep_config("ATTN_RA_RANK=2,8"), tmp_path / "a", environ={})
    assert plan.fingerprint["sweep"] == {"axes": "ATTN_RA_RANK", "ATTN_RA_RANK": "2,8"}
    wider = build_plan(sweep_config("ATTN_RA_RANK=2,4,8"), tmp_path / "b", environ={})
    changes = matrix_describe.describe_changes(plan, wider)
    assert wider.hash != plan.hash and "CONFIG_MATRIX_SWEEP ATTN_RA_RANK: 2,8 -> 2,4,8" in changes
    two = build_plan(sweep_config("ATTN_RA_RANK=2,8;TRAIN_LR=6e-4"), tmp_path / "c", environ={})
    assert "CONFIG_MATRIX_SWEEP TRAIN_LR: new" in matrix_describe.describe_changes(plan, two)
    # A plan that sweeps nothing has no sweep part: its fingerprint is what it was before sweeps existed.
    assert "sweep" not in build_plan(sweep_config(""), tmp_path / "d", environ={}).fingerprint


def test_a_plan_json_from_before_sweeps_still_loads(sweep_config, tmp_path):
    plan = build_plan(sweep_config(""), tmp_path / "m", environ={})
    save_plan(plan, tmp_path / "m")
    path = tmp_path / "m" / "plan.json"
    data = json.loads(path.read_text())
    for key in ("sweep", "notes"):
        data.pop(key)
    for variant in data["variants"]:
        variant.pop("sweep")
    path.write_text(json.dumps(data))
    old = load_plan(tmp_path / "m")
    assert old.sweep == [] and old.variants[1].sweep == {} and old.cells == plan.cells and old.hash == plan.hash


def test_steps_with_the_same_configuration_are_planned_once_without_a_sweep(sweep_config, tmp_path):
    steps_file = tmp_path / "steps.yaml"
    steps_file.write_text("V0:\n  description: baseline\n  set: {ATTN_BACKEND_SDPA: y, MLP_EXPANSION: 4}\n"
                          "SAME:\n  description: V0 again\n  extends: V0\n  set: {MLP_EXPANSION: 4}\n")
    plan = build_plan(sweep_config("", steps="V0,SAME", seeds="1,2"), tmp_path / "m", steps_file=steps_file,
                      environ={})
    assert [v.id for v in plan.variants] == ["V0"] and [c.id for c in plan.cells] == ["V0-s1", "V0-s2"]
    assert plan.notes == ["SAME has the configuration of V0: planned once, as V0"]
    assert not (tmp_path / "m" / "cells" / "SAME-s1").exists()


def test_values_that_would_share_a_cell_directory_are_refused(sweep_config, tmp_path):
    with pytest.raises(PlanError, match=re.escape("cells V0/SAMPLE_PROMPT=a b/s1 and V0/SAMPLE_PROMPT=a-b/s1 would "
                                                  "share the directory cells/V0-SAMPLE_PROMPT=a-b-s1")):
        build_plan(sweep_config("SAMPLE_PROMPT=a b,a-b", steps="V0"), tmp_path / "m", environ={})


@pytest.mark.parametrize("sweep, message", [
    ("ATTN_RA_RANKK=2", "CONFIG_MATRIX_SWEEP: unknown symbol CONFIG_ATTN_RA_RANKK (did you mean CONFIG_ATTN_RA_RANK?)"),
    ("ATTN_RA_RANK=2,600", "cell V1/ATTN_RA_RANK=600/s1 (step V1, CONFIG_MATRIX_SWEEP ATTN_RA_RANK=600): "),
    ("ATTN_RA_RANK=2,40", "CONFIG_ATTN_RA_RANK=40 is outside 1..16"),        # the backend's limit, head dim 32
    ("ATTN_RA_RANK=two", "CONFIG_ATTN_RA_RANK='two' is not an integer"),
    ("TRAIN_LR=6e-4,fast", 'CONFIG_MATRIX_SWEEP TRAIN_LR=fast): '),
    ("SEED=1,2", "CONFIG_MATRIX_SWEEP: SEED is an axis already; list seeds in CONFIG_MATRIX_SEEDS"),
    ("MATRIX_STEPS=V0", "CONFIG_MATRIX_STEPS configures the matrix itself"),
    ("MLP_RA_RFF=32,64", "CONFIG_MATRIX_SWEEP: CONFIG_MLP_RA_RFF applies to none of the steps (it depends on "
                         "MLP_RECIPROCAL, which is off)"),
])
def test_a_bad_sweep_stops_the_plan_in_one_line_naming_symbol_and_value(sweep_config, tmp_path, sweep, message):
    config = sweep_config(sweep)
    with pytest.raises(PlanError) as err:
        build_plan(config, tmp_path / "m", environ={})
    assert message in str(err.value) and "\n" not in str(err.value)
    if sweep == "ATTN_RA_RANK=2,600":  # through the command line too: exit 2, one line, no matrix directory
        proc = subprocess.run([sys.executable, "-m", "scripts.matrix", "run", "--config", str(config)],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env=ENV)
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert not any((tmp_path / "results").glob("*/plan.json"))


# ---- the report ---------------------------------------------------------------------------------------

SEED_SHIFT = {1: 0.00, 2: 0.03, 3: -0.02}


def best_loss(step, sweep, seed) -> float:
    """Known numbers: rank helps V1 (more with more seeds' noise), the higher LR hurts everyone a little."""
    rank = int(sweep.get("ATTN_RA_RANK", 0))
    lr_cost = 0.05 if sweep.get("TRAIN_LR") == "1e-3" else 0.0
    return 3.0 + SEED_SHIFT[seed] + lr_cost - (0.01 * rank + 0.002 * seed * rank if step == "V1" else 0.0)


def paired(a: dict, b: dict) -> tuple:
    d = np.array([a[s] - b[s] for s in a])
    return d.mean(), 4.303 * d.std(ddof=1) / math.sqrt(len(d))  # t(0.975, 2)


def test_the_report_compares_each_value_with_the_baseline_at_that_value_and_with_the_first(sweep_config, tmp_path):
    config = sweep_config("ATTN_RA_RANK=2,8;TRAIN_LR=6e-4,1e-3", seeds="1,2,3")
    matrix_dir = tmp_path / "m"
    plan = build_plan(config, matrix_dir, environ={})
    save_plan(plan, matrix_dir)
    sweep_of = {v.id: v.sweep for v in plan.variants}
    losses = {}
    for cell in plan.cells:
        losses.setdefault(cell.variant, {})[cell.seed] = best_loss(cell.step, sweep_of[cell.variant], cell.seed)
        write_run(cell.run_dir(matrix_dir), cell.config_path(matrix_dir), losses[cell.variant][cell.seed])
        write_state(matrix_dir, cell.id, CellState(status="done", attempts=1, exit_code=0))
    text = report.write_matrix_report(matrix_dir).read_text()
    data = json.loads((matrix_dir / "report.json").read_text())
    rows = {r["variant"]: r for r in data["sweep"]["rows"]}

    target = "V1/ATTN_RA_RANK=8/TRAIN_LR=1e-3"
    row = rows[target]
    mean = np.mean(list(losses[target].values()))
    assert row["best_val_loss"] == pytest.approx(mean) and row["seeds"] == 3
    spread = np.std(list(losses[target].values()), ddof=1)
    assert row["best_val_loss_ci95"] == pytest.approx(4.303 * spread / math.sqrt(3), rel=1e-3)
    # vs the baseline step at the same learning rate: V0 has no rank, its one run stands for every rank
    for key, reference in (("delta_baseline", "V0/TRAIN_LR=1e-3"),
                           ("delta_first_ATTN_RA_RANK", "V1/ATTN_RA_RANK=2/TRAIN_LR=1e-3"),
                           ("delta_first_TRAIN_LR", "V1/ATTN_RA_RANK=8/TRAIN_LR=6e-4")):
        expected, half = paired(losses[target], losses[reference])
        assert row[f"{key}_reference"] == reference
        assert row[key] == pytest.approx(expected) and row[f"{key}_ci95"] == pytest.approx(half, rel=1e-3)
    # The baseline step at the higher LR is that value's baseline; along the LR axis it compares with 6e-4.
    v0 = rows["V0/TRAIN_LR=1e-3"]
    assert v0["delta_baseline"] is None and v0["ATTN_RA_RANK"] == "" and v0["delta_first_ATTN_RA_RANK"] is None
    assert v0["delta_first_TRAIN_LR"] == pytest.approx(0.05)
    assert data["verdicts"]["V0/TRAIN_LR=1e-3"].startswith("baseline")
    assert data["verdicts"][target].startswith("better than V0/TRAIN_LR=1e-3 by")
    assert data["steps"][5]["baseline"] == "V0/TRAIN_LR=1e-3"

    assert data["sweep"]["axes"] == [{"symbol": "ATTN_RA_RANK", "values": ["2", "8"]},
                                     {"symbol": "TRAIN_LR", "values": ["6e-4", "1e-3"]}]
    for part in ("## Sweep", "**ATTN_RA_RANK** = 2, 8; **TRAIN_LR** = 6e-4, 1e-3",
                 "| step | ATTN_RA_RANK | TRAIN_LR | seeds | best val loss | Δ vs baseline | Δ vs ATTN_RA_RANK=2 | "
                 "Δ vs TRAIN_LR=6e-4 |", "| V0 | not swept | 1e-3 | 3 |",
                 "paired by seed with V0 at the same swept values", "- V0: CONFIG_ATTN_RA_RANK does not apply",
                 "**Compared**: 6 variants (steps at swept values) × 3 seed(s) = 18 cells", "](sweep.png)",
                 "make cell CELL=V1-ATTN_RA_RANK=8-TRAIN_LR=1e-3-s3"):
        assert part in text, part
    assert (matrix_dir / "sweep.png").stat().st_size > 1000


# ---- real cells ---------------------------------------------------------------------------------------

def test_check_runs_a_swept_matrix_and_reports_the_sweep(sweep_config, tmp_path):
    config = sweep_config("ATTN_RA_RANK=2,8")
    proc = subprocess.run([sys.executable, "-m", "scripts.matrix", "check", "--config", str(config), "--keep"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    assert "3 variant(s) x 1 seed(s) = 3 cells" in proc.stdout and "note: V0: CONFIG_ATTN_RA_RANK" in proc.stdout
    assert "[V1/ATTN_RA_RANK=8/s1]" in proc.stdout and "check passed" in proc.stdout
    kept = Path(re.search(r"kept (\S+)", proc.stdout).group(1))
    try:
        text = (kept / "cells" / "report.md").read_text()
        assert "## Sweep" in text and (kept / "cells" / "sweep.png").exists()
    finally:
        import shutil
        shutil.rmtree(kept, ignore_errors=True)


def test_make_set_sweeps_and_make_cell_trains_a_swept_cell_alone(repo_copy, sweep_config, tmp_path):
    config = sweep_config("")
    environ = {k: v for k, v in ENV.items() if not k.startswith("GPT2_") and k not in ("KCONFIG_CONFIG", "ARGS")}

    def make(*args):
        return subprocess.run(["make", "-s", "-C", str(repo_copy), *args, f"KCONFIG_CONFIG={config}"],
                              capture_output=True, text=True, timeout=300, env=environ)

    done = make("set", 'ARGS=MATRIX_SWEEP="ATTN_RA_RANK=2,8;TRAIN_LR=6e-4"')  # as the README writes it
    assert done.returncode == 0, done.stderr
    assert 'CONFIG_MATRIX_SWEEP="ATTN_RA_RANK=2,8;TRAIN_LR=6e-4"' in config.read_text()
    proc = make("cell", "CELL=V1-ATTN_RA_RANK=8-TRAIN_LR=6e-4-s1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    assert "cell V1/ATTN_RA_RANK=8/TRAIN_LR=6e-4/s1 of matrix" in proc.stdout
    (run_dir,) = (tmp_path / "results").glob("*-V1-ATTN_RA_RANK=8-TRAIN_LR=6e-4-s1-*")
    snapshot = matrix_plan.config_values(run_dir / "config")
    assert snapshot["ATTN_RA_RANK"] == "8" and snapshot["MATRIX"] == "n"
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "done"
