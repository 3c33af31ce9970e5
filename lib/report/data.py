"""Report data: run directories -> RunRecords -> pandas tables (per cell, per step, per gate layer).

Built only from what the runs wrote (metrics.json, eval.jsonl, settings.json or else the config snapshot,
env.json) plus, for a matrix, plan.json and the cells' state.json. Nothing is
re-run or re-measured, so a report can be regenerated at any time.
"""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from lib import config as kcfg
from lib.matrix.plan import CELL_CONFIG, load_plan
from lib.matrix.state import read_state
from lib.report.stats import matched_point, paired_difference, value_at
from gpt2.io import CONFIG_NAME, ENV_NAME, EVAL_NAME, METRICS_NAME, read_jsonl
from gpt2.train.run_dir import SETTINGS_NAME, read_settings_json

EVAL_COLUMNS = ["iter", "tokens", "train_time_s", "wall_time_s", "train_loss", "val_loss", "val_ppl", "lr"]


# ---- loading ------------------------------------------------------------------------

@dataclasses.dataclass
class RunRecord:
    run_dir: Path
    label: str
    variant: str
    seed: int | None
    status: str  # done | failed | running | pending
    failure_reason: str
    attempts: int
    metrics: dict
    evals: pd.DataFrame  # one row per evaluation, sorted by iter, duplicates from resumes dropped
    env: dict
    settings: object  # gpt2.settings.Settings (settings.json, else the snapshot), or None: see settings_error
    settings_error: str = ""  # why settings is None

    @property
    def done(self) -> bool:
        return self.status == "done"


def _read_json(path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def _read_evals(run_dir) -> pd.DataFrame:
    try:
        records = read_jsonl(Path(run_dir) / EVAL_NAME)
    except ValueError:  # a torn last line from a killed writer
        records = []
    frame = pd.DataFrame(records, columns=None if records else EVAL_COLUMNS)
    for column in EVAL_COLUMNS:
        if column not in frame:
            frame[column] = np.nan
    frame = frame.apply(pd.to_numeric, errors="coerce")
    return frame.drop_duplicates("iter", keep="last").sort_values("iter").reset_index(drop=True)


def _read_settings(run_dir) -> tuple:
    """(Settings or None, why there are none): settings.json, which the run wrote; for an older run without
    one, the config snapshot re-read through the Kconfig tree (the tree may have changed since)."""
    run_dir = Path(run_dir)
    if (run_dir / SETTINGS_NAME).exists():
        try:
            return read_settings_json(run_dir / SETTINGS_NAME), ""
        except ValueError as exc:
            return None, str(exc)
    for name in (CONFIG_NAME, CELL_CONFIG):
        path = run_dir / name
        if path.exists():
            try:
                return kcfg.load_settings(path, environ={}), ""
            except kcfg.ConfigError as exc:
                return None, f"no {SETTINGS_NAME}, and {name} does not load: {exc}"
    return None, f"no {SETTINGS_NAME} and no config snapshot"


def load_run(run_dir, label=None, variant=None, seed=None, state=None) -> RunRecord:
    run_dir = Path(run_dir)
    metrics = _read_json(run_dir / METRICS_NAME)
    status = state.status if state is not None else metrics.get("status", "pending")
    reason = (state.failure_reason if state is not None else "") or metrics.get("failure_reason") or ""
    settings, settings_error = _read_settings(run_dir)
    if seed is None and settings is not None:
        seed = settings.general.seed
    return RunRecord(run_dir, label or run_dir.name, variant or run_dir.name, seed, status, reason,
                     state.attempts if state is not None else 1, metrics, _read_evals(run_dir),
                     _read_json(run_dir / ENV_NAME), settings, settings_error)


def load_matrix(matrix_dir) -> tuple:
    """(plan, [RunRecord] in plan order)."""
    plan = load_plan(matrix_dir)
    records = [load_run(c.run_dir(matrix_dir), c.label, c.variant, c.seed, read_state(matrix_dir, c.id))
               for c in plan.cells]
    return plan, records


# ---- tables ---------------------------------------------------------------------------

def cell_table(records, matched_time, matched_tokens) -> pd.DataFrame:
    rows = []
    for r in records:
        m = r.metrics
        rows.append({
            "cell": r.label, "variant": r.variant, "seed": r.seed, "status": r.status, "attempts": r.attempts,
            "failure_reason": r.failure_reason, "params": m.get("params"), "iters": m.get("iters"),
            "tokens_seen": m.get("tokens_seen"), "tokens_per_s": m.get("tokens_per_s"),
            "ms_per_step": m.get("ms_per_step"), "mfu": m.get("mfu"), "train_time_s": m.get("train_time_s"),
            "final_val_loss": m.get("final_val_loss"), "best_val_loss": m.get("best_val_loss"),
            "final_val_ppl": m.get("final_val_ppl"),
            "best_val_ppl": math.exp(min(m["best_val_loss"], 700)) if m.get("best_val_loss") is not None else None,
            "peak_mem_bytes": m.get("peak_mem_bytes"),
            "val_loss_at_matched_time": value_at(r.evals, "train_time_s", matched_time)
            if r.done and matched_time is not None else np.nan,
            "val_loss_at_matched_tokens": value_at(r.evals, "tokens", matched_tokens)
            if r.done and matched_tokens is not None else np.nan,
        })
    frame = pd.DataFrame(rows)
    numeric = [c for c in frame.columns if c not in ("cell", "variant", "status", "failure_reason", "seed")]
    frame[numeric] = frame[numeric].apply(pd.to_numeric, errors="coerce")
    return frame


def _by_seed(cells: pd.DataFrame, variant, column) -> dict:
    rows = cells[(cells.variant == variant) & (cells.status == "done")]
    return {seed: float(v) for seed, v in zip(rows.seed, rows[column]) if pd.notna(v)}


def step_table(variants, cells: pd.DataFrame) -> tuple:
    """(one row per variant, {variant: {comparison: PairedDiff}}); variants[0] is the baseline."""
    baseline = variants[0].id
    rows, diffs = [], {}
    for v in variants:
        mine = cells[cells.variant == v.id]
        done = mine[mine.status == "done"]
        row = {"variant": v.id, "description": v.description,
               "overrides": overrides_text(own_overrides(v, variants[0])),
               "cells_done": len(done), "cells_planned": len(mine),
               "cells_failed": int((mine.status == "failed").sum())}
        for column in ("params", "tokens_seen", "tokens_per_s", "final_val_loss", "best_val_loss", "final_val_ppl",
                       "best_val_ppl", "peak_mem_bytes", "val_loss_at_matched_time", "val_loss_at_matched_tokens",
                       "mfu"):
            values = done[column].dropna()
            row[column] = float(values.mean()) if len(values) else np.nan
            row[column + "_std"] = float(values.std(ddof=1)) if len(values) > 1 else np.nan
        diffs[v.id] = {}
        for key, column in (("final", "final_val_loss"), ("time", "val_loss_at_matched_time"),
                            ("tokens", "val_loss_at_matched_tokens")):
            d = None if v.id == baseline else paired_difference(_by_seed(cells, v.id, column),
                                                                _by_seed(cells, baseline, column))
            diffs[v.id][key] = d
            row[f"delta_{key}"] = d.mean if d else np.nan
            row[f"delta_{key}_ci95"] = d.half_width if d and d.half_width is not None else np.nan
            row[f"delta_{key}_n"] = d.n if d else 0
        rows.append(row)
    return pd.DataFrame(rows), diffs


def own_overrides(variant, baseline) -> dict:
    if variant.id == baseline.id:
        return variant.overrides
    return {k: v for k, v in variant.overrides.items() if baseline.overrides.get(k) != v}


def overrides_text(overrides: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in overrides.items())


def gate_table(records) -> pd.DataFrame:
    """Per variant and layer: gate means and spreads over heads (pooled over seeds), heads under threshold."""
    rows = []
    for variant in dict.fromkeys(r.variant for r in records):
        runs = [r for r in records if r.variant == variant and r.done and r.metrics.get("gates")]
        if not runs:
            continue
        threshold = runs[0].settings.attention.head_select_threshold if runs[0].settings else 0.0
        for layer in sorted({g["layer"] for r in runs for g in r.metrics["gates"]}):
            w_std, w_rec, under = [], [], []
            for r in runs:
                for g in r.metrics["gates"]:
                    if g["layer"] == layer:
                        w_std += list(g.get("w_std") or [])
                        w_rec += list(g.get("w_rec") or [])
                        under.append(sum(abs(w) < threshold for w in g.get("w_rec") or []))
            heads = len(w_rec) // max(len(runs), 1)
            rows.append({"variant": variant, "layer": layer, "seeds": len(runs), "heads": heads,
                         "w_std_mean": np.mean(w_std) if w_std else np.nan,
                         "w_std_std": np.std(w_std) if w_std else np.nan,
                         "w_rec_mean": np.mean(w_rec) if w_rec else np.nan,
                         "w_rec_std": np.std(w_rec) if w_rec else np.nan,
                         "threshold": threshold,
                         "heads_under_threshold": float(np.mean(under)) if under and threshold > 0 else np.nan})
    return pd.DataFrame(rows)


# ---- a matrix's tables -------------------------------------------------------------------

@dataclasses.dataclass
class MatrixTables:
    matched_time: float | None  # training seconds every finished cell reached
    matched_tokens: float | None  # tokens every finished cell reached
    cells: pd.DataFrame  # cell_table
    steps: pd.DataFrame  # step_table, one row per variant
    diffs: dict  # {variant: {"final"|"time"|"tokens": PairedDiff | None}}
    gates: pd.DataFrame  # gate_table


def matrix_tables(plan, records) -> MatrixTables:
    matched_time, matched_tokens = matched_point(records, "train_time_s"), matched_point(records, "tokens")
    cells = cell_table(records, matched_time, matched_tokens)
    steps, diffs = step_table(plan.variants, cells)
    return MatrixTables(matched_time, matched_tokens, cells, steps, diffs, gate_table(records))


def records_json(frame: pd.DataFrame) -> list:
    """A table as JSON-ready records (NaN -> null)."""
    return json.loads(frame.to_json(orient="records")) if not frame.empty else []
