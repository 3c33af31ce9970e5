"""The sweep section of a matrix report: the verdict measure (best val loss) against each swept value.

CONFIG_MATRIX_SWEEP crosses Kconfig symbols with the steps (lib/matrix/sweep.py); a variant is a step at one
point of the sweep. One row per variant:

    best val loss        mean ± 95% CI of the mean over its finished seeds, t(0.975, n-1)·sd/√n
    Δ vs baseline        paired by seed with the baseline step at the same swept values (lib.report.data
                         .baseline_for): the verdicts' comparison. Where an axis does not apply to the baseline
                         step (it runs once, unswept), that one run stands for every value of the axis
    Δ vs first <SYMBOL>  paired by seed with the same step at the axis's first value, the other values equal:
                         what moving along the axis does to the step itself
Negative Δ is better. "–": no pair (the row is its own reference, or no seed finished for both).
"""

import numpy as np
import pandas as pd

from lib.report.data import baseline_for, baseline_name, by_seed, records_json
from lib.report.markdown import md_table
from lib.report.stats import mean_interval, paired_difference

MEASURE = "best_val_loss"


def _first_value_variant(variant, axis, first, variants):
    """The same step with `axis` at its first value and every other swept value equal (None: not swept by it)."""
    if axis not in variant.sweep:
        return None
    wanted = {**variant.sweep, axis: first}
    return next((v for v in variants if v.head == variant.head and v.sweep == wanted), None)


def _delta(prefix, variant, reference, cells, mine) -> dict:
    d = None if reference is None or reference.id == variant.id else \
        paired_difference(mine, by_seed(cells, reference.id, MEASURE))
    return {f"{prefix}": d.mean if d else np.nan,
            f"{prefix}_ci95": d.half_width if d and d.half_width is not None else np.nan,
            f"{prefix}_n": d.n if d else 0, f"{prefix}_reference": reference.id if reference else ""}


def sweep_table(plan, cells: pd.DataFrame) -> pd.DataFrame:
    """One row per variant (module doc); empty when the plan sweeps nothing."""
    if not plan.sweep:
        return pd.DataFrame()
    rows = []
    for variant in plan.variants:
        mine = by_seed(cells, variant.id, MEASURE)
        n, mean, half = mean_interval(list(mine.values()))
        row = {"variant": variant.id, "step": variant.head,
               **{axis: variant.sweep.get(axis, "") for axis, _ in plan.sweep},
               "seeds": n, MEASURE: mean, f"{MEASURE}_ci95": np.nan if half is None else half,
               **_delta("delta_baseline", variant, baseline_for(variant, plan.variants), cells, mine)}
        for axis, values in plan.sweep:
            row.update(_delta(f"delta_first_{axis}", variant,
                              _first_value_variant(variant, axis, values[0], plan.variants), cells, mine))
        rows.append(row)
    return pd.DataFrame(rows)


def _pm(mean, half) -> str:
    if not np.isfinite(mean):
        return "–"
    return f"{mean:.4f}" + (f" ± {half:.4f}" if np.isfinite(half) else " (1 seed)")


def _signed(row, prefix) -> str:
    mean, half = row[prefix], row[f"{prefix}_ci95"]
    if not np.isfinite(mean):
        return "–"
    return f"{mean:+.4f}" + (f" ± {half:.4f}" if np.isfinite(half) else " (n=1)")


def sweep_lines(plan, table: pd.DataFrame, plot_name: str = "") -> list:
    """The report's "Sweep" section; [] without a sweep."""
    if table.empty:
        return []
    axes = [axis for axis, _ in plan.sweep]
    firsts = {axis: values[0] for axis, values in plan.sweep}
    lines = ["", "## Sweep", "",
             "Swept (CONFIG_MATRIX_SWEEP), crossed with the steps and seeds: "
             + "; ".join(f"**{axis}** = {', '.join(values)}" for axis, values in plan.sweep) + ".", "",
             f"Best val loss: mean ± 95% CI of the mean over seeds (t·sd/√n). Δ vs baseline: paired by seed with "
             f"{baseline_name(plan)} (the verdicts' comparison; a baseline step an axis does not apply to runs once "
             f"and stands for every value of it). "
             + " ".join(f"Δ vs {axis}={firsts[axis]}: paired by seed with the same step at {axis}={firsts[axis]}, "
                        f"the other values equal." for axis in axes)
             + " Negative is better; – : no pair. \"not swept\": the axis does not apply to that step.", ""]
    lines += [f"- {note}" for note in plan.notes] + ([""] if plan.notes else [])
    header = ["step", *axes, "seeds", "best val loss", "Δ vs baseline", *(f"Δ vs {a}={firsts[a]}" for a in axes)]
    rows = [[row["step"], *(row[axis] or "not swept" for axis in axes), row["seeds"],
             _pm(row[MEASURE], row[f"{MEASURE}_ci95"]), _signed(row, "delta_baseline"),
             *(_signed(row, f"delta_first_{axis}") for axis in axes)] for _, row in table.iterrows()]
    lines.append(md_table(header, rows))
    if plot_name:
        lines += ["", f"Plotted against each swept value in `{plot_name}` (under Plots)."]
    return lines


def sweep_json(plan, table: pd.DataFrame) -> dict:
    """report.json's "sweep": the axes, what each step is compared with, the plan's notes and the rows."""
    if table.empty:
        return {}
    return {"axes": [{"symbol": axis, "values": list(values)} for axis, values in plan.sweep],
            "baseline": baseline_name(plan), "notes": list(plan.notes), "rows": records_json(table)}
