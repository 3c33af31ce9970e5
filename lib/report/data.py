"""Report data: run directories -> RunRecords -> pandas tables (per cell, per step, per gate layer).

Built only from what the runs wrote (metrics.json, eval.jsonl, settings.json or else the config snapshot,
env.json, eval.json when `make eval` scored the run) plus, for a matrix, plan.json and the cells' state.json as
observed (a cell or run recorded "running" whose process is gone shows as "stopped"). Nothing is re-run or
re-measured, so a report can be regenerated at any time.
"""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from lib import config as kcfg
from lib.matrix.plan import CELL_CONFIG, load_plan
from lib.matrix.state import GONE_NOTE, observed_state
from lib.report import evaluation as report_eval
from lib.report.stats import matched_point, paired_difference, value_at
from gpt2.io import CONFIG_NAME, ENV_NAME, EVAL_NAME, METRICS_NAME, read_jsonl
from gpt2.train.run_dir import SETTINGS_NAME, read_settings_json, run_is_live

STOPPED = "stopped"  # recorded "running", but no process trains it: it died without a final record
GONE_REASON = "process gone without a final record"

EVAL_COLUMNS = ["iter", "tokens", "train_time_s", "wall_time_s", "train_loss", "val_loss", "val_ppl", "lr"]


# ---- loading ------------------------------------------------------------------------

@dataclasses.dataclass
class RunRecord:
    run_dir: Path
    label: str
    variant: str
    seed: int | None
    status: str  # done | failed | running | pending | stopped
    failure_reason: str
    attempts: int
    metrics: dict
    evals: pd.DataFrame  # one row per evaluation, sorted by iter, duplicates from resumes dropped
    env: dict
    settings: object  # gpt2.settings.Settings (settings.json, else the snapshot), or None: see settings_error
    settings_error: str = ""  # why settings is None
    evaluation: dict = dataclasses.field(default_factory=dict)  # eval.json (lib/report/evaluation.py); {}: none

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
    if state is None and status == "running" and not run_is_live(run_dir):
        status, reason = STOPPED, reason or GONE_REASON  # `make resume` goes on from its last checkpoint
    settings, settings_error = _read_settings(run_dir)
    if seed is None and settings is not None:
        seed = settings.general.seed
    return RunRecord(run_dir, label or run_dir.name, variant or run_dir.name, seed, status, reason,
                     state.attempts if state is not None else 1, metrics, _read_evals(run_dir),
                     _read_json(run_dir / ENV_NAME), settings, settings_error, report_eval.read_evaluation(run_dir))


def load_matrix(matrix_dir) -> tuple:
    """(plan, [RunRecord] in plan order); each cell's state as observed, a dead "running" one "stopped"."""
    plan = load_plan(matrix_dir)
    records = []
    for c in plan.cells:
        state = observed_state(matrix_dir, c.id)
        if state.note == GONE_NOTE:
            state = dataclasses.replace(state, status=STOPPED)
        records.append(load_run(c.run_dir(matrix_dir), c.label, c.variant, c.seed, state))
    return plan, records


# ---- tables ---------------------------------------------------------------------------

# Columns of the cell table that hold words or flags rather than numbers.
TEXT_COLUMNS = ("cell", "variant", "status", "failure_reason", "seed", "device", "past_val_minimum_recorded",
                "machine_busy", "machine_busy_reason", "git_commit", "git_dirty", *report_eval.TEXT_COLUMNS)


def past_minimum(metrics) -> dict:
    """metrics.json's "past_val_minimum": null (the run ended at its best evaluation: by 0) or {by, tokens_after,
    iters_after}; runs older than the field leave it out, which is kept apart ("not recorded") from null."""
    if "past_val_minimum" not in metrics:
        return {"past_val_minimum_recorded": False, "past_val_minimum_by": np.nan,
                "past_val_minimum_iters": np.nan, "past_val_minimum_tokens": np.nan}
    past = metrics["past_val_minimum"] or {}
    return {"past_val_minimum_recorded": True, "past_val_minimum_by": past.get("by", 0.0),
            "past_val_minimum_iters": past.get("iters_after"), "past_val_minimum_tokens": past.get("tokens_after")}


def machine_load(metrics) -> dict:
    """metrics.json's "machine" (load while training); busy is None when the run did not record it."""
    machine = metrics.get("machine") or {}
    return {"machine_busy": bool(machine["busy"]) if machine.get("busy") is not None else None,
            "machine_busy_reason": machine.get("busy_reason") or "",
            "load_avg_max": machine.get("load_avg_max"), "cpus": machine.get("cpus")}


def _device(record) -> str:
    """The device that trained: metrics.json's "device", else env.json's first GPU, else unknown."""
    if record.metrics.get("device"):
        return str(record.metrics["device"])
    gpus = (record.env or {}).get("gpus") or []
    return gpus[0].get("name", "unknown") if gpus else ("cpu" if record.env else "unknown")


def cell_table(records, matched_time, matched_tokens) -> pd.DataFrame:
    rows = []
    for r in records:
        m = r.metrics
        git = (r.env or {}).get("git") or {}
        rows.append({
            "cell": r.label, "variant": r.variant, "seed": r.seed, "status": r.status, "attempts": r.attempts,
            "failure_reason": r.failure_reason, "params": m.get("params"),
            "flops_per_token": m.get("flops_per_token"), "iters": m.get("iters"),
            "tokens_seen": m.get("tokens_seen"), "epochs": m.get("epochs"), "tokens_per_s": m.get("tokens_per_s"),
            "ms_per_step": m.get("ms_per_step"), "mfu": m.get("mfu"), "train_time_s": m.get("train_time_s"),
            "device": _device(r),
            "final_val_loss": m.get("final_val_loss"), "best_val_loss": m.get("best_val_loss"),
            "best_val_iter": m.get("best_val_iter"), "best_val_tokens": m.get("best_val_tokens"),
            **past_minimum(m),
            "final_val_ppl": m.get("final_val_ppl"),
            "best_val_ppl": math.exp(min(m["best_val_loss"], 700)) if m.get("best_val_loss") is not None else None,
            "peak_mem_bytes": m.get("peak_mem_bytes"),
            "val_loss_at_matched_time": value_at(r.evals, "train_time_s", matched_time)
            if r.done and matched_time is not None else np.nan,
            "val_loss_at_matched_tokens": value_at(r.evals, "tokens", matched_tokens)
            if r.done and matched_tokens is not None else np.nan,
            **machine_load(m),
            "git_commit": git.get("commit") or "", "git_dirty": bool(git.get("dirty")),
            **report_eval.hellaswag_columns(r.evaluation),
        })
    frame = pd.DataFrame(rows)
    numeric = [c for c in frame.columns if c not in TEXT_COLUMNS]
    frame[numeric] = frame[numeric].apply(pd.to_numeric, errors="coerce")
    return report_eval.with_hellaswag(frame)[0]


def by_seed(cells: pd.DataFrame, variant, column) -> dict:
    rows = cells[(cells.variant == variant) & (cells.status == "done")]
    return {seed: float(v) for seed, v in zip(rows.seed, rows[column]) if pd.notna(v)}


def throughput_spread(done: pd.DataFrame) -> float:
    """The largest max/min - 1 of tokens/s among one step's finished cells on the same device (NaN with fewer
    than two cells on any one device): seeds run the same work, so a spread is the machine, not the step."""
    spreads = [values.max() / values.min() - 1 for _, values in done.groupby("device")["tokens_per_s"]
               if len(values.dropna()) > 1 and values.min() > 0]
    return float(max(spreads)) if spreads else np.nan


# Paired comparisons: "best" (best val loss) is the verdict's measure; the others are shown beside it.
# HellaSwag acc_norm only over the cells lib.report.evaluation lets compare (higher is better there).
COMPARISONS = (("best", "best_val_loss"), ("final", "final_val_loss"), ("time", "val_loss_at_matched_time"),
               ("tokens", "val_loss_at_matched_tokens"), ("hellaswag", "hellaswag_acc_norm"))


def baseline_for(variant, variants):
    """The variant `variant` is compared with: the baseline step (variants[0]'s defconfig and step) at the same
    swept values on the axes the baseline is swept over (one it is not swept over, because it does not apply
    to it, stands for every value); without such a variant, variants[0]."""
    first = variants[0]
    for candidate in variants:
        if (candidate.step, candidate.defconfig) == (first.step, first.defconfig) and \
                all(variant.sweep.get(k) == value for k, value in candidate.sweep.items()):
            return candidate
    return first


def baseline_name(plan) -> str:
    """How the report names what each step is compared with."""
    return f"{plan.baseline.head} at the same swept values" if plan.sweep else plan.baseline.id


def step_table(variants, cells: pd.DataFrame) -> tuple:
    """(one row per variant, {variant: {comparison: PairedDiff}}); each row's "baseline" is baseline_for's."""
    rows, diffs = [], {}
    for v in variants:
        baseline = baseline_for(v, variants).id
        mine = cells[cells.variant == v.id]
        done = mine[mine.status == "done"]
        row = {"variant": v.id, "description": v.description, "baseline": baseline,
               "overrides": overrides_text(own_overrides(v, variants[0])),
               "cells_done": len(done), "cells_planned": len(mine),
               "cells_failed": int((mine.status == "failed").sum())}
        for column in ("params", "flops_per_token", "tokens_seen", "epochs", "tokens_per_s", "final_val_loss",
                       "best_val_loss", "final_val_ppl", "best_val_ppl", "peak_mem_bytes",
                       "val_loss_at_matched_time", "val_loss_at_matched_tokens", "mfu", "hellaswag_acc_norm"):
            values = done[column].dropna()
            row[column] = float(values.mean()) if len(values) else np.nan
            row[column + "_std"] = float(values.std(ddof=1)) if len(values) > 1 else np.nan
        row["tokens_per_s_spread"] = throughput_spread(done)
        diffs[v.id] = {}
        for key, column in COMPARISONS:
            d = None if v.id == baseline else paired_difference(by_seed(cells, v.id, column),
                                                                by_seed(cells, baseline, column))
            diffs[v.id][key] = d
            row[f"delta_{key}"] = d.mean if d else np.nan
            row[f"delta_{key}_ci95"] = d.half_width if d and d.half_width is not None else np.nan
            row[f"delta_{key}_n"] = d.n if d else 0
        rows.append(row)
    return pd.DataFrame(rows), diffs


def own_overrides(variant, baseline) -> dict:
    """The variant's overrides (its step's, then its swept values) where they differ from the baseline's."""
    mine, theirs = {**variant.overrides, **variant.sweep}, {**baseline.overrides, **baseline.sweep}
    if variant.id == baseline.id:
        return mine
    return {k: v for k, v in mine.items() if theirs.get(k) != v}


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
    diffs: dict  # {variant: {"best"|"final"|"time"|"tokens"|"hellaswag": PairedDiff | None}}
    gates: pd.DataFrame  # gate_table


def matrix_tables(plan, records) -> MatrixTables:
    matched_time, matched_tokens = matched_point(records, "train_time_s"), matched_point(records, "tokens")
    cells = cell_table(records, matched_time, matched_tokens)
    steps, diffs = step_table(plan.variants, cells)
    return MatrixTables(matched_time, matched_tokens, cells, steps, diffs, gate_table(records))


def records_json(frame: pd.DataFrame) -> list:
    """A table as JSON-ready records (NaN -> null)."""
    return json.loads(frame.to_json(orient="records")) if not frame.empty else []
