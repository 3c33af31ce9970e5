"""Reports from run files: paired statistics, matched comparisons, gates, verdicts, single-run reports.

The run directories here are written by hand with known numbers (real plans and cell
configs, made-up metrics), so every figure in the report can be checked exactly.
"""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lib.report import writer as report
from lib.report import stats as report_stats
from lib.matrix.plan import build_plan, save_plan
from lib.matrix.state import CellState, write_state

REPO_ROOT = Path(__file__).resolve().parent.parent

V0_FINAL = {1: 3.00, 2: 3.10, 3: 3.05}
V1_SHIFT = {1: -0.101, 2: -0.099, 3: -0.100}  # clearly better, tiny spread
H1_SHIFT = {1: 0.05, 2: -0.04, 3: 0.01}  # noise around zero
ENV = {"host": "node1", "cpu_count": 16, "torch": "2.11.0", "cuda": "13.0",
       "gpus": [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_bytes": 85e9}],
       "git": {"commit": "0123456789abcdef", "dirty": False}}


GPU = "NVIDIA H100 80GB HBM3"
IDLE = {"cpus": 16, "load_avg_max": 1.2, "load_avg_mean": 0.8, "gpu_other_processes": 0, "busy": False,
        "busy_reason": None}


def curve(final, slow, best=None):
    """(train_time_s, tokens, val_loss) at three evaluations; a slow step covers less time per token. With
    `best`, the middle evaluation is the lowest: the run ended past its validation minimum."""
    times = [10.0, 40.0, 80.0] if slow else [10.0, 50.0, 100.0]
    tokens = [800, 3200, 6400] if slow else [1000, 5000, 10000]
    return list(zip(times, tokens, [final + 1.0, final + 0.5 if best is None else best, final]))


def write_run(run_dir, config_path, final, slow=False, gates=None, best=None, tokens_per_s=None, params=124_000_000,
              epochs=12.0, device=GPU, machine=IDLE, env=None, legacy=False):
    """The files a finished run writes. legacy: metrics.json as runs wrote it before best_val_iter,
    past_val_minimum and machine were recorded."""
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(config_path, run_dir / "config")
    points = curve(final, slow, best)
    with open(run_dir / "eval.jsonl", "w") as f:
        for i, (t, tok, loss) in enumerate(points, start=1):
            f.write(json.dumps({"iter": 100 * i, "tokens": tok, "train_time_s": t, "wall_time_s": t + 5,
                                "train_loss": loss + 0.02, "val_loss": loss, "val_ppl": math.exp(loss),
                                "lr": 1e-4}) + "\n")
    low = min(range(3), key=lambda i: points[i][2])
    metrics = {
        "status": "done", "failure_reason": None, "iters": 300, "tokens_seen": points[-1][1], "epochs": epochs,
        "tokens_per_s": tokens_per_s or points[-1][1] / points[-1][0], "ms_per_step": 10.0, "mfu": 0.4,
        "params": params, "flops_per_token": 6.0 * params + 12 * 2 * 4 * 16 * 32, "device": device,
        "final_val_loss": final, "best_val_loss": points[low][2], "final_val_ppl": math.exp(final),
        "unigram_entropy": 7.5, "peak_mem_bytes": 2 * 2**30, "train_time_s": points[-1][0], "eval_time_s": 3.0,
        "compile_time_s": 20.0, "gates": gates or []}
    if not legacy:
        metrics.update({"best_val_iter": 100 * (low + 1), "best_val_tokens": points[low][1], "machine": machine,
                        "past_val_minimum": None if low == 2 else {"by": final - points[low][2],
                                                                   "tokens_after": points[2][1] - points[low][1],
                                                                   "iters_after": 100 * (2 - low)}})
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    (run_dir / "env.json").write_text(json.dumps(env or ENV))


H1_GATES = [{"layer": 0, "w_std": [1.0, 0.9], "w_rec": [0.05, 0.5]},
            {"layer": 1, "w_std": [1.1, 0.8], "w_rec": [0.02, 0.01]}]
V1_GATES = [{"layer": 0, "w_std": [1.0, 1.0], "w_rec": [0.5, 0.6]},
            {"layer": 1, "w_std": [0.9, 1.0], "w_rec": [0.4, 0.5]}]


@pytest.fixture
def synthetic_matrix(make_config, tmp_path):
    """build(seeds, failed, customise, overrides) -> matrix directory of V0, V1, H1 with the runs written.
    customise(cell, final) -> write_run keyword arguments for that cell (e.g. a different final loss)."""
    def build(seeds="1,2,3", failed=(), customise=None, overrides=None):
        config = make_config({"MATRIX": "y", "MATRIX_STEPS": "V0,V1,H1", "MATRIX_SEEDS": seeds, **(overrides or {})})
        matrix_dir = tmp_path / "matrix"
        plan = build_plan(config, matrix_dir)
        save_plan(plan, matrix_dir)
        for cell in plan.cells:
            if cell.id in failed:
                write_state(matrix_dir, cell.id, CellState(status="failed", attempts=1, exit_code=1,
                                                           failure_reason="non-finite training loss (nan) at iter 7"))
                continue
            final = V0_FINAL[cell.seed] + {"V0": 0.0, "V1": V1_SHIFT[cell.seed], "H1": H1_SHIFT[cell.seed]}[cell.step]
            kwargs = {"final": final, "slow": cell.step == "V1",
                      "gates": {"V0": None, "V1": V1_GATES, "H1": H1_GATES}[cell.step]}
            kwargs.update(customise(cell, final) if customise else {})
            write_run(cell.run_dir(matrix_dir), cell.config_path(matrix_dir), **kwargs)
            write_state(matrix_dir, cell.id, CellState(status="done", attempts=1, exit_code=0))
        return matrix_dir
    return build


def test_t_quantile_matches_the_tables():
    for df, expected in ((1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (30, 2.042)):
        assert abs(report_stats.t_quantile(0.975, df) - expected) < 1e-3


def test_paired_difference_and_interpolation():
    d = report_stats.paired_difference({1: 2.0, 2: 3.0, 3: 4.5}, {1: 2.5, 2: 3.2, 3: 4.6, 4: 9.0})
    diffs = np.array([-0.5, -0.2, -0.1])
    assert d.n == 3 and d.mean == pytest.approx(diffs.mean())
    assert d.half_width == pytest.approx(4.303 * diffs.std(ddof=1) / math.sqrt(3), rel=1e-3)
    assert report_stats.paired_difference({1: 2.0}, {1: 2.5}).half_width is None
    assert report_stats.paired_difference({1: 2.0}, {2: 2.5}) is None
    import pandas as pd

    evals = pd.DataFrame({"train_time_s": [10.0, 50.0, 100.0], "val_loss": [4.0, 3.5, 3.0]})
    assert report_stats.value_at(evals, "train_time_s", 80.0) == pytest.approx(3.2)
    assert math.isnan(report_stats.value_at(evals, "train_time_s", 5.0))


def test_matrix_report_numbers_verdicts_and_sections(synthetic_matrix):
    matrix_dir = synthetic_matrix()
    path = report.write_matrix_report(matrix_dir)
    text = path.read_text()
    data = json.loads((matrix_dir / "report.json").read_text())

    # Matched points: the slow step V1 reaches 80 s and 6400 tokens; V0 is interpolated there.
    assert data["matched"] == {"train_time_s": 80.0, "tokens": 6400.0}
    v0_at_80 = {s: f + 0.5 - 0.5 * (30 / 50) for s, f in V0_FINAL.items()}
    diffs = np.array([V0_FINAL[s] + V1_SHIFT[s] - v0_at_80[s] for s in (1, 2, 3)])
    time = data["comparisons"]["V1"]["time"]
    assert time["n"] == 3 and time["mean"] == pytest.approx(diffs.mean())
    assert time["ci95_half_width"] == pytest.approx(4.303 * diffs.std(ddof=1) / math.sqrt(3), rel=1e-3)
    final = data["comparisons"]["V1"]["final"]
    assert final["mean"] == pytest.approx(-0.1) and final["ci95_half_width"] < 0.01
    # The verdicts' one measure: best val loss paired by seed (every run here ends at its minimum).
    best = data["comparisons"]["V1"]["best"]
    shifts = np.array(list(V1_SHIFT.values()))
    assert best["mean"] == pytest.approx(shifts.mean())
    assert best["ci95_half_width"] == pytest.approx(4.303 * shifts.std(ddof=1) / math.sqrt(3), rel=1e-3)
    assert data["verdict_measure"] == "best val loss" and data["resolution"]["V1"] == best["ci95_half_width"]

    verdicts = data["verdicts"]
    assert verdicts["V0"] == "baseline (3 of 3 cells finished)"
    assert verdicts["V1"] == (f"better than V0 by 0.1000 ± {best['ci95_half_width']:.4f} best val loss "
                              f"(95% CI, 3 paired seeds)")
    h1 = data["comparisons"]["H1"]["best"]
    assert verdicts["H1"] == (f"within noise: Δ best val loss {h1['mean']:+.4f} ± {h1['ci95_half_width']:.4f} "
                              f"(95% CI, 3 paired seeds) includes 0; these seeds cannot detect a difference under "
                              f"{h1['ci95_half_width']:.4f}")
    assert "matched" not in verdicts["V1"]  # one measure, not matched time for one step and final loss for another

    # Gates: H1 routes heads with |w_rec| < 0.1 (its threshold); V1 has head selection off.
    gates = {(g["variant"], g["layer"]): g for g in data["gates"]}
    assert gates[("H1", 0)]["heads_under_threshold"] == 1 and gates[("H1", 1)]["heads_under_threshold"] == 2
    assert gates[("H1", 0)]["w_rec_mean"] == pytest.approx(0.275)
    assert gates[("V1", 0)]["heads_under_threshold"] is None and ("V0", 0) not in gates
    assert "1.0 / 2 (< 0.1)" in text and "threshold 0: off" in text

    for section in ("# Matrix report", "**Compared**: 3 steps × 3 seed(s)", "**Hardware**: 1× NVIDIA H100 80GB HBM3",
                    "**Git commit**: 0123456789ab", "**Budget**", "**Seeds**: 1, 2, 3", "## Verdicts",
                    "- **Verdict measure**: best validation loss (the lowest of each cell's evaluations), paired by "
                    "seed with V0", "## What this comparison can support", "## Results per step",
                    "## Matched comparisons", "## Learned gates", "## Plots", "## Cells", "## Reproduce",
                    "val loss @ 80 s", "val loss @ 6.4k tok", "124M", "2.00 GiB", "ATTN_RA_RANK=4"):
        assert section in text, section
    assert text.index("## Verdicts") < text.index("## What this comparison can support") < text.index("## Results")
    for name in ("val_loss_vs_time.png", "val_loss_vs_tokens.png", "throughput.png", "gates.png"):
        assert f"]({name})" in text and (matrix_dir / name).stat().st_size > 1000
    csv = (matrix_dir / "report.csv").read_text().splitlines()
    assert len(csv) == 4 and "verdict" in csv[0] and "delta_time_ci95" in csv[0]
    assert len((matrix_dir / "report_cells.csv").read_text().splitlines()) == 10


def test_single_seed_and_failed_cells_are_said_plainly(synthetic_matrix):
    matrix_dir = synthetic_matrix(seeds="1", failed=("H1-s1",))
    report.write_matrix_report(matrix_dir)
    text = (matrix_dir / "report.md").read_text()
    data = json.loads((matrix_dir / "report.json").read_text())
    assert data["verdicts"]["V1"] == "1 seed: no interval, no verdict (Δ best val loss -0.1010)"
    assert "- **Resolution**: 1 seed: no interval, no verdict" in text
    assert "no step has two finished seeds on one device, so tokens/s noise across seeds is not measured" in text
    assert data["verdicts"]["H1"] == "no finished cell: nothing to compare"
    assert "**Failed cells**" in text and "`H1/s1`: non-finite training loss (nan) at iter 7" in text
    assert "2 done, 1 failed" in text


def test_single_run_report_and_the_command_line(synthetic_matrix, tmp_path):
    matrix_dir = synthetic_matrix(seeds="1")
    run_dir = tmp_path / "single-run"
    write_run(run_dir, matrix_dir / "cells" / "H1-s1" / "cell.config", 3.2, gates=H1_GATES)
    proc = subprocess.run([sys.executable, "-m", "scripts.report", str(run_dir)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = (run_dir / "report.md").read_text()
    for section in ("# Run report: single-run", "**Status**: done", "**Model**: 2 layers", "## Numbers",
                    "## Evaluations", "## Learned gates", "## Plots", "val_loss_vs_time.png", "3.2000"):
        assert section in text, section
    assert (run_dir / "gates.png").exists() and json.loads((run_dir / "report.json").read_text())["status"] == "done"
    # The same script writes the matrix report when given a matrix directory.
    proc = subprocess.run([sys.executable, "-m", "scripts.report", str(matrix_dir)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and (matrix_dir / "report.md").exists()
    missing = subprocess.run([sys.executable, "-m", "scripts.report", str(tmp_path / "nothing")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "neither a matrix directory" in missing.stderr


def test_run_report_reads_settings_json_and_says_why_settings_are_missing(make_config, tmp_path):
    import dataclasses

    from lib.config import load_settings
    from lib.report.data import load_run

    config = make_config({"SEED": "1"})
    run_dir = tmp_path / "run"
    write_run(run_dir, config, 3.2)
    # settings.json (what the run trained with) wins over re-deriving settings from the snapshot.
    settings = load_settings(config, environ={"GPT2_SEED": "7"})
    (run_dir / "settings.json").write_text(json.dumps(dataclasses.asdict(settings)))
    record = load_run(run_dir)
    assert record.settings == settings and record.seed == 7 and record.settings_error == ""
    assert "seed 7" in report.write_report(run_dir).read_text()
    # An unreadable settings.json is said in the report, not silently dropped.
    (run_dir / "settings.json").write_text(json.dumps({"general": {"seed": 7, "no_such_field": 1}}))
    text = report.write_report(run_dir).read_text()
    assert "no_such_field" in text and "**Model**: unknown" in text
    # An older run (no settings.json) whose snapshot no longer loads: the reason is shown.
    (run_dir / "settings.json").unlink()
    (run_dir / "config").write_text("CONFIG_NO_SUCH_SYMBOL=y\n")
    text = report.write_report(run_dir).read_text()
    assert "no settings.json, and config does not load" in text and "NO_SUCH_SYMBOL" in text
    assert "NO_SUCH_SYMBOL" in json.loads((run_dir / "report.json").read_text())["settings_error"]
