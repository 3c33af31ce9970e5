"""What reports read besides the training files: cells and runs whose process died while "running" (shown as
stopped), and HellaSwag from eval.json, compared only between cells scored alike.

eval.json comes from lib.evaluate.evaluate_run on a real tiny GPT-2 BPE run, scored on the HellaSwag fixture; the
official file (10,042 items, downloaded) is out of reach offline, so one evaluation stands it in by replacing
the function that fetches it, and the record is then written exactly as for the official file. Each cell of the
matrix gets that record with its own known acc_norm (and, where a rule is tested, its own checkpoint choice,
item count or status), so every number in the report can be checked.
"""

import copy
import json
import math

import numpy as np
import pytest

from gpt2.train import trainer as train
from gpt2.train.run_dir import RunLock
from lib.config import load_settings
from lib.evaluate import EVAL_RESULTS_NAME, evaluate_run
from lib.evaluate import evaluation as evaluation_module
from lib.matrix.plan import load_plan
from lib.matrix.state import CellState, cell_lock, write_state
from lib.report import evaluation as report_eval
from lib.report import writer as report
from test_eval import FIXTURE
from test_report import synthetic_matrix, write_run  # noqa: F401 (fixture)
from test_report_verdicts import _row

V0_ACC = {1: 0.30, 2: 0.31, 3: 0.29}
V1_GAIN = {1: 0.02, 2: 0.035, 3: 0.01}


# ---- stopped --------------------------------------------------------------------------------------------

def test_a_running_cell_whose_process_is_gone_shows_as_stopped(synthetic_matrix):
    matrix_dir = synthetic_matrix(seeds="1")
    write_state(matrix_dir, "V1-s1", CellState(status="running", attempts=1))
    with cell_lock(matrix_dir, "V1-s1"):  # a runner holds it: still running
        report.write_matrix_report(matrix_dir)
    text = (matrix_dir / "report.md").read_text()
    assert _row(text, "V1/s1")[1] == "running" and "`V1/s1` (running)" in text
    text = report.write_matrix_report(matrix_dir).read_text()  # nobody holds it now
    assert _row(text, "V1/s1")[1] == "stopped"
    assert "`V1/s1` (stopped: process gone without a final record) — `make continue` resumes them" in text
    assert json.loads((matrix_dir / "report.json").read_text())["cells"][1]["status"] == "stopped"


def test_a_single_run_left_running_by_a_dead_process_shows_as_stopped(synthetic_matrix, tmp_path):
    matrix_dir = synthetic_matrix(seeds="1")
    run_dir = tmp_path / "run"
    write_run(run_dir, matrix_dir / "cells" / "V0-s1" / "cell.config", 3.2)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    (run_dir / "metrics.json").write_text(json.dumps({**metrics, "status": "running"}))
    lock = RunLock(run_dir).acquire()
    try:
        assert "- **Status**: running\n" in report.write_report(run_dir).read_text()
    finally:
        lock.release()
    text = report.write_report(run_dir).read_text()
    assert "- **Status**: stopped — process gone without a final record" in text
    assert json.loads((run_dir / "report.json").read_text())["status"] == "stopped"


# ---- HellaSwag ------------------------------------------------------------------------------------------

@pytest.fixture
def eval_records(make_config, tmp_path, monkeypatch):
    """(official record, fixture record): eval.json as lib.evaluate writes it for a real tiny BPE run."""
    config = make_config({"TOKENIZER_GPT2": "y", "MODEL_BLOCK_SIZE": "32", "TRAIN_MAX_ITERS": "3"}, name="bpe")
    run_dir = tmp_path / "bpe-run"
    assert train.run(load_settings(config, environ={}), config, run_dir, argv=["tests"]) == 0
    quiet = {"device": "cpu", "log": lambda _: None}
    fixture = evaluate_run(run_dir, which="best", items_file=FIXTURE, **quiet)
    monkeypatch.setattr(evaluation_module, "official_val_file", lambda: FIXTURE)
    official = evaluate_run(run_dir, which="best", **quiet)
    assert json.loads((run_dir / EVAL_RESULTS_NAME).read_text()) == official
    assert (official["hellaswag"]["official"], fixture["hellaswag"]["official"]) == (True, False)
    assert official["checkpoint_choice"] == "best" and official["hellaswag"]["items"] == 8
    return official, fixture


def _write_eval(run_dir, record, acc_norm=None, **changes):
    record = copy.deepcopy(record)
    if acc_norm is not None:
        record["hellaswag"]["acc_norm"] = acc_norm
    for key, value in changes.items():
        (record["hellaswag"] if key in record["hellaswag"] or key == "status" else record)[key] = value
    (run_dir / EVAL_RESULTS_NAME).write_text(json.dumps(record))


def test_hellaswag_is_compared_only_between_cells_scored_alike(synthetic_matrix, eval_records):
    official, fixture = eval_records
    assert report_eval.EVAL_RESULTS_NAME == EVAL_RESULTS_NAME
    matrix_dir = synthetic_matrix()
    plan = load_plan(matrix_dir)
    cells = {c.id: c.run_dir(matrix_dir) for c in plan.cells}
    for seed in (1, 2, 3):
        _write_eval(cells[f"V0-s{seed}"], official, V0_ACC[seed])
        _write_eval(cells[f"V1-s{seed}"], official, V0_ACC[seed] + V1_GAIN[seed])
    _write_eval(cells["H1-s1"], official, 0.5, checkpoint_choice="last")         # another model
    _write_eval(cells["H1-s2"], fixture, 0.5)                                      # not HellaSwag's file
    _write_eval(cells["H1-s3"], {**official, "hellaswag": {"status": "skipped", "reason": "char tokenizer"}})
    text = report.write_matrix_report(matrix_dir).read_text()
    data = json.loads((matrix_dir / "report.json").read_text())

    d = data["comparisons"]["V1"]["hellaswag"]
    gains = np.array(list(V1_GAIN.values()))
    assert d["n"] == 3 and d["mean"] == pytest.approx(gains.mean())
    assert d["ci95_half_width"] == pytest.approx(4.303 * gains.std(ddof=1) / math.sqrt(3), rel=1e-3)
    steps = {s["variant"]: s for s in data["steps"]}
    assert steps["V0"]["hellaswag_acc_norm"] == pytest.approx(0.30)
    assert steps["H1"]["hellaswag_acc_norm"] is None and data["comparisons"]["H1"]["hellaswag"] is None
    assert data["hellaswag"]["compared"] == {"checkpoint_choice": "best", "items": 8, "partial": False}
    assert data["verdicts"]["V1"].startswith("better than V0")  # the verdict stays on best val loss

    header = next(line for line in text.splitlines() if line.startswith("| step | description"))
    assert "| HellaSwag acc_norm | Δ HellaSwag |" in header
    assert _row(text, "V0")[10] == "0.3000 ± 0.0100"
    assert _row(text, "V1")[11] == f"{gains.mean():+.4f} ± {d['ci95_half_width']:.4f}"
    assert _row(text, "H1")[10:12] == ["not evaluated", "–"]
    assert "6 cells scored on the official file, best checkpoint, all 8 items" in text
    assert _row(text, "V1/s2")[11] == f"{V0_ACC[2] + V1_GAIN[2]:.4f}"
    assert _row(text, "H1/s1")[11] == "left out: last checkpoint (compared: best)"
    assert _row(text, "H1/s2")[11] == "left out: not the official file"
    assert _row(text, "H1/s3")[11] == "not evaluated (skipped)"
    run_report = report.write_report(cells["V1-s2"]).read_text()  # a run's own report names what was scored
    assert f"| HellaSwag acc_norm | {V0_ACC[2] + V1_GAIN[2]:.4f} (best checkpoint, 8 items) |" in run_report

    # LIMIT runs: partial cells compare with each other when they scored the same first N items.
    for seed in (1, 2, 3):
        _write_eval(cells[f"V0-s{seed}"], official, V0_ACC[seed], items=3, partial=True)
        _write_eval(cells[f"V1-s{seed}"], official, V0_ACC[seed] + V1_GAIN[seed], items=3, partial=True)
    _write_eval(cells["H1-s1"], official, 0.5, items=5, partial=True)
    (cells["H1-s2"] / EVAL_RESULTS_NAME).unlink()
    text = report.write_matrix_report(matrix_dir).read_text()
    data = json.loads((matrix_dir / "report.json").read_text())
    assert data["comparisons"]["V1"]["hellaswag"]["mean"] == pytest.approx(gains.mean())
    assert "6 cells scored on the official file, best checkpoint, the first 3 items (partial)" in text
    assert _row(text, "H1/s1")[11] == "left out: 5 items (compared: 3)"
    assert _row(text, "H1/s2")[11] == "not evaluated"


def test_no_eval_json_anywhere_says_not_evaluated(synthetic_matrix, tmp_path):
    matrix_dir = synthetic_matrix(seeds="1")
    text = report.write_matrix_report(matrix_dir).read_text()
    assert "HellaSwag: not evaluated (no finished cell has an eval.json" in text
    assert _row(text, "V1")[10:12] == ["not evaluated", "–"] and _row(text, "V1/s1")[11] == "not evaluated"
