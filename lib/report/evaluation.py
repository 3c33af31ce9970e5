"""HellaSwag in the reports: a run's eval.json (lib/evaluate/evaluation.py writes it) -> table columns, and
which cells of a matrix can be compared on it.

    eval.json  {"format": 1, "checkpoint", "checkpoint_choice": "best" | "last", "iters", ..., "val": {...},
                "hellaswag": {"status": "done" | "skipped" | "unavailable", "reason" (when not done), "official",
                              "items", "items_in_file", "partial", "acc", "acc_norm", ..., "*_stderr", "chance"}}

The reports compare acc_norm (the harness's normalisation, the number papers quote) only between cells scored
alike: a finished cell whose HellaSwag status is "done", on the official file (a test file's items are not
HellaSwag's), from the same checkpoint choice (best and last are different models) and over the same items (all
of them, or the same first N of a LIMIT run: partial runs compare only with partial runs of the same N). When
cells differ, the largest such group counts (ties: all items before a partial run, then the best checkpoint),
and every other cell says why it is left out. A cell without eval.json is "not evaluated".
"""

import json
from pathlib import Path

import numpy as np
import pandas as pd

EVAL_RESULTS_NAME = "eval.json"  # lib.evaluate.evaluation.EVAL_RESULTS_NAME (that module imports torch)
NOT_EVALUATED = "not evaluated"
# Columns of the cell table that hold words or flags (lib.report.data.TEXT_COLUMNS adds them).
TEXT_COLUMNS = ("hellaswag", "hellaswag_status", "hellaswag_checkpoint", "hellaswag_partial", "hellaswag_official")


def read_evaluation(run_dir) -> dict:
    """<run>/eval.json, or {} when there is none (or it cannot be read: a report never fails on it)."""
    try:
        record = json.loads((Path(run_dir) / EVAL_RESULTS_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def hellaswag_columns(evaluation: dict) -> dict:
    """One cell's HellaSwag as it was scored, before deciding whether it can be compared."""
    h = evaluation.get("hellaswag") if isinstance(evaluation.get("hellaswag"), dict) else {}
    done = h.get("status") == "done"
    return {"hellaswag_status": h.get("status") or NOT_EVALUATED,
            "hellaswag_checkpoint": evaluation.get("checkpoint_choice") or "",
            "hellaswag_items": h.get("items") if done else None,
            "hellaswag_partial": bool(h.get("partial")), "hellaswag_official": bool(h.get("official")),
            "hellaswag_acc_norm_scored": h.get("acc_norm") if done else None,
            "hellaswag_acc_norm_stderr": h.get("acc_norm_stderr") if done else None}


def _usable(row) -> bool:
    return row.status == "done" and row.hellaswag_status == "done" and bool(row.hellaswag_official) \
        and pd.notna(row.hellaswag_acc_norm_scored) and pd.notna(row.hellaswag_items)


def compared_group(cells: pd.DataFrame):
    """(checkpoint choice, items, partial) the compared cells share, or None when no cell is usable."""
    groups = {}
    for row in cells.itertuples():
        if _usable(row):
            key = (row.hellaswag_checkpoint, int(row.hellaswag_items), bool(row.hellaswag_partial))
            groups[key] = groups.get(key, 0) + 1
    if not groups:
        return None
    return max(groups, key=lambda k: (groups[k], not k[2], k[0] == "best", k[1]))


def _why_not(row, group) -> str:
    if row.hellaswag_status == NOT_EVALUATED:
        return NOT_EVALUATED
    if row.status != "done":
        return f"{NOT_EVALUATED} (cell {row.status})"
    if row.hellaswag_status != "done":
        return f"{NOT_EVALUATED} ({row.hellaswag_status})"
    if not row.hellaswag_official:
        return "left out: not the official file"
    if row.hellaswag_checkpoint != group[0]:
        return f"left out: {row.hellaswag_checkpoint} checkpoint (compared: {group[0]})"
    return f"left out: {int(row.hellaswag_items):,} items (compared: {group[1]:,})"


def with_hellaswag(cells: pd.DataFrame) -> tuple:
    """(cells + "hellaswag_acc_norm" (NaN unless compared) and "hellaswag" (the score, or why not), the group)."""
    group = compared_group(cells)
    values, texts = [], []
    for row in cells.itertuples():
        counted = group is not None and _usable(row) and \
            (row.hellaswag_checkpoint, int(row.hellaswag_items), bool(row.hellaswag_partial)) == group
        values.append(float(row.hellaswag_acc_norm_scored) if counted else np.nan)
        texts.append(f"{row.hellaswag_acc_norm_scored:.4f}" if counted else
                     NOT_EVALUATED if group is None and row.hellaswag_status == NOT_EVALUATED else _why_not(row, group))
    return cells.assign(hellaswag_acc_norm=values, hellaswag=texts), group


def describe_group(group, cells: pd.DataFrame) -> str:
    """What the HellaSwag numbers of a report are, in one sentence (or why there are none)."""
    if group is None:
        return ("HellaSwag: not evaluated (no finished cell has an eval.json scored on the official file; "
                "`make eval RUN=<cell>` or CONFIG_EVAL_AFTER_TRAIN writes one)")
    counted = int(cells.hellaswag_acc_norm.notna().sum())
    scope = f"the first {group[1]:,} items (partial)" if group[2] else f"all {group[1]:,} items"
    left = cells[(cells.hellaswag_acc_norm.isna()) & (cells.status == "done")]
    return (f"HellaSwag acc_norm (zero-shot, per-character normalisation as lm-evaluation-harness; higher is "
            f"better; chance 0.25): {counted} cells scored on the official file, {group[0]} checkpoint, {scope}"
            + (f"; not counted: {', '.join(f'{c.cell} ({c.hellaswag})' for c in left.itertuples())}"
               if len(left) else ""))


def hellaswag_json(cells: pd.DataFrame) -> dict:
    """report.json's "hellaswag": what the compared cells share (null: none compared) and the sentence."""
    group = compared_group(cells)
    return {"compared": None if group is None else {"checkpoint_choice": group[0], "items": group[1],
                                                    "partial": group[2]},
            "cells": int(cells.hellaswag_acc_norm.notna().sum()), "text": describe_group(group, cells)}
