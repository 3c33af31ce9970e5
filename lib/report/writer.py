"""Reports: run directories -> pandas tables -> report.md + PNG plots + report.json/csv.

    lib.report.data      run files -> RunRecords -> tables (per cell, per step, per gate layer)
    lib.report.evaluation eval.json -> HellaSwag columns, and which cells compare on it
    lib.report.sweep     the sweep section: best val loss against each swept value
    lib.report.stats     paired differences with 95% CIs, interpolation at matched time/tokens
    lib.report.verdicts  tables -> verdicts on best val loss, and what the comparison can support
    lib.report.reproduce run files -> the command line that trains each run again
    lib.report.markdown  tables, verdicts, commands -> report.md
    lib.report.plots     tables -> PNGs

This module only wires them together and writes the files. Built only from what
the runs wrote, so a report can be regenerated at any time.
"""

import dataclasses
from pathlib import Path

from lib import config as kcfg
from lib.report import plots as report_plots
from lib.matrix.plan import PLAN_FILE
from lib.report.data import gate_table, load_matrix, load_run, matrix_tables, records_json
from lib.report.markdown import (CELLS_CSV, REPORT_CSV, REPORT_JSON, REPORT_MD, describe_budget, describe_git,
                                 describe_hardware, matrix_markdown, run_markdown)
from lib.report.evaluation import hellaswag_json
from lib.report.reproduce import matrix_commands, run_command
from lib.report.sweep import sweep_json, sweep_lines, sweep_table
from lib.report.verdicts import (VERDICT_MEASURE, max_epochs, resolution, step_verdicts, study_kind,
                                 throughput_flags)
from gpt2.io import CONFIG_NAME, EVAL_NAME, METRICS_NAME, atomic_write_json, atomic_write_text


def write_matrix_report(matrix_dir) -> Path:
    """report.md, report.json, report.csv, report_cells.csv and PNG plots in matrix_dir."""
    matrix_dir = Path(matrix_dir)
    plan, records = load_matrix(matrix_dir)
    tables = matrix_tables(plan, records)
    baseline = plan.baseline.id
    verdicts = step_verdicts(tables, baseline)
    sweep = sweep_table(plan, tables.cells)
    plots = report_plots.matrix_plots(matrix_dir, records, tables.steps, tables.gates, plan.variants,
                                      tables.matched_time, tables.matched_tokens, sweep, plan.sweep)
    settings_errors = {r.label: r.settings_error for r in records if r.settings_error}
    commands = matrix_commands(matrix_dir, records)
    markdown = matrix_markdown(matrix_dir, plan, records, tables, verdicts, plots, commands,
                               sweep_lines(plan, sweep, report_plots.SWEEP_PNG if not sweep.empty else ""))
    atomic_write_text(matrix_dir / REPORT_MD, _with_settings_errors(markdown, settings_errors))
    tables.steps.assign(verdict=tables.steps.variant.map(verdicts)).to_csv(matrix_dir / REPORT_CSV, index=False)
    tables.cells.to_csv(matrix_dir / CELLS_CSV, index=False)
    atomic_write_json(matrix_dir / REPORT_JSON, {
        "matrix": plan.name, "baseline": baseline, "plan_hash": plan.hash, "seeds": plan.seeds,
        "study": study_kind(records, max_epochs(tables.cells)), "verdict_measure": VERDICT_MEASURE,
        "resolution": resolution(tables.diffs), "throughput_flags": throughput_flags(tables.cells, tables.steps),
        "budget": describe_budget(records), "hardware": describe_hardware(records), "git": describe_git(records),
        "matched": {"train_time_s": tables.matched_time, "tokens": tables.matched_tokens},
        "steps": records_json(tables.steps),
        "comparisons": {v: {k: d.to_dict() if d else None for k, d in ds.items()} for v, ds in tables.diffs.items()},
        "verdicts": verdicts, "gates": records_json(tables.gates), "cells": records_json(tables.cells),
        "sweep": sweep_json(plan, sweep), "hellaswag": hellaswag_json(tables.cells),
        "plots": [name for _, name in plots], "settings_errors": settings_errors,
        "reproduce": {label: {"command": c, "warning": w} for label, (c, w) in commands.items()}})
    return matrix_dir / REPORT_MD


def write_run_report(run_dir) -> Path:
    """report.md + report.json + plots for one training run directory."""
    run_dir = Path(run_dir)
    record = load_run(run_dir)
    gates = gate_table([dataclasses.replace(record, status="done")] if record.metrics.get("gates") else [])
    plots = report_plots.run_plots(run_dir, record, gates)
    preset = kcfg.preset_of(run_dir / CONFIG_NAME) if (run_dir / CONFIG_NAME).exists() else ""
    command = run_command(run_dir, record)
    markdown = run_markdown(run_dir, record, preset, gates, plots, command)
    atomic_write_text(run_dir / REPORT_MD, _with_settings_errors(markdown, {run_dir.name: record.settings_error}
                                                                 if record.settings_error else {}))
    atomic_write_json(run_dir / REPORT_JSON, {"run": run_dir.name, "status": record.status,
                                              "failure_reason": record.failure_reason,
                                              "evaluation": record.evaluation,
                                              "settings_error": record.settings_error, "metrics": record.metrics,
                                              "evals": records_json(record.evals), "gates": records_json(gates),
                                              "plots": [n for _, n in plots],
                                              "reproduce": {"command": command[0], "warning": command[1]}})
    return run_dir / REPORT_MD


def _with_settings_errors(markdown, errors: dict) -> str:
    """The report with a line per run whose settings could not be read (its model, seed and budget then show
    as unknown), placed before the first section so it is not missed."""
    if not errors:
        return markdown
    note = "\n".join(f"- **Settings of {name} unknown**: {why}" for name, why in errors.items()) + "\n"
    head, sep, rest = markdown.partition("\n## ")
    return f"{head.rstrip()}\n{note}\n## {rest}" if sep else f"{markdown.rstrip()}\n\n{note}"


def write_report(path) -> Path:
    """A matrix directory (plan.json) gets the matrix report, a run directory the run report."""
    path = Path(path)
    if (path / PLAN_FILE).exists():
        return write_matrix_report(path)
    if (path / METRICS_NAME).exists() or (path / EVAL_NAME).exists():
        return write_run_report(path)
    raise FileNotFoundError(f"{path} is neither a matrix directory ({PLAN_FILE}) nor a run directory "
                            f"({METRICS_NAME} or {EVAL_NAME})")


def newest_reportable(results_dir) -> Path:
    """The most recently modified matrix or run directory directly under results_dir."""
    results_dir = Path(results_dir)
    candidates = [p for p in results_dir.glob("*") if p.is_dir() and not p.name.startswith(".")
                  and any((p / name).exists() for name in (PLAN_FILE, METRICS_NAME, EVAL_NAME))]
    if not candidates:
        raise FileNotFoundError(f"no run or matrix directory under {results_dir}; pass one explicitly")

    def last_change(path):
        return max(f.stat().st_mtime for f in [path, *path.glob("*"), *path.glob("cells/*")])

    return max(candidates, key=last_change)


