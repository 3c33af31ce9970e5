"""Verdicts, and what a comparison can support: the one measure every verdict uses, the smallest difference the
seeds could detect, how many passes over the data the cells made, cells that ended past their validation
minimum, and throughput that the machine rather than the step decided.

The verdict measure is each cell's best validation loss (metrics.json best_val_loss), paired by seed with the
baseline. Offline presets train small corpora for many epochs, where the final loss also ranks memorisation (a
model that fits faster overfits sooner); the best loss ranks what each step could reach. Final loss and the
matched time/tokens comparisons are shown beside it, never instead of it.

Everything here reads the tables of lib.report.data; nothing is computed from the runs' files.
"""

import numpy as np
import pandas as pd

from lib.report.stats import PairedDiff, t_quantile

VERDICT_MEASURE = "best val loss"
# Seeds of one step run the same work: tokens/s that differ more than this on one device is the machine.
THROUGHPUT_SPREAD_LIMIT = 0.10


def epochs_text(epochs) -> str:
    """Passes over the training split as a reader takes them in: 12.0, 0.41, under 0.01."""
    return f"{epochs:.1f}" if epochs >= 1 else f"{epochs:.2f}" if epochs >= 0.01 else "under 0.01"


def measure_text(baseline) -> str:
    return (f"best validation loss (the lowest of each cell's evaluations), paired by seed with {baseline}; "
            f"final val loss is shown beside it")


def _state(d: PairedDiff) -> str:
    if d.half_width is None:
        return "no verdict"
    if not d.significant:
        return "within noise"
    return "better" if d.mean < 0 else "worse"


def _diff_phrase(d: PairedDiff, baseline: str) -> str:
    if d.half_width is None:
        return f"1 seed: no interval, no verdict (Δ {VERDICT_MEASURE} {d.mean:+.4f})"
    interval = f"{d.mean:+.4f} ± {d.half_width:.4f}"
    if not d.significant:
        return (f"within noise: Δ {VERDICT_MEASURE} {interval} (95% CI, {d.n} paired seeds) includes 0; "
                f"these seeds cannot detect a difference under {d.half_width:.4f}")
    return (f"{_state(d)} than {baseline} by {abs(d.mean):.4f} ± {d.half_width:.4f} {VERDICT_MEASURE} "
            f"(95% CI, {d.n} paired seeds)")


def _done(cells: pd.DataFrame, variant) -> pd.DataFrame:
    return cells[(cells.variant == variant) & (cells.status == "done")]


def past_minimum_note(done: pd.DataFrame) -> str:
    """"k of n cells ended past their validation minimum (by up to x nats)", or '' when none did (or none
    recorded it)."""
    recorded = done[done.past_val_minimum_recorded.astype(bool)]
    past = recorded[recorded.past_val_minimum_by > 0]
    if past.empty:
        return ""
    return (f"{len(past)} of {len(done)} cells ended past their validation minimum "
            f"(by up to {past.past_val_minimum_by.max():.4f} nats)")


def final_disagrees(diffs: dict) -> str:
    """Said when final val loss would give another verdict than best val loss: cells whose final loss is above
    their best (they ended past their minimum) then decide the ranking."""
    best, final = diffs.get("best"), diffs.get("final")
    if best is None or final is None or best.half_width is None or final.half_width is None:
        return ""
    if _state(best) == _state(final):
        return ""
    return (f"final val loss would say {_state(final)} (Δ {final.mean:+.4f} ± {final.half_width:.4f}): ending "
            f"past the validation minimum changes this verdict")


def verdict(variant_id, baseline_id, diffs: dict, row, cells: pd.DataFrame) -> str:
    """One sentence per step on the verdict measure, plus what ending past the validation minimum did."""
    done = _done(cells, variant_id)
    notes = [past_minimum_note(done)]
    if variant_id == baseline_id:
        text = f"baseline ({row['cells_done']} of {row['cells_planned']} cells finished)"
    elif row["cells_done"] == 0:
        return "no finished cell: nothing to compare"
    elif diffs.get("best") is None:
        text = f"no seed finished for both {variant_id} and {baseline_id}: no paired comparison"
    else:
        text = _diff_phrase(diffs["best"], baseline_id)
        notes.append(final_disagrees(diffs))
    return "; ".join([text, *(n for n in notes if n)])


def step_verdicts(tables, baseline_id) -> dict:
    """{variant: verdict} for every row of tables.steps (a lib.report.data.MatrixTables), each against its row's
    baseline (baseline_id, or in a sweep the baseline step at the same values)."""
    return {row["variant"]: verdict(row["variant"], row.get("baseline") or baseline_id, tables.diffs[row["variant"]],
                                    row, tables.cells)
            for _, row in tables.steps.iterrows()}


# ---- what the comparison can support -----------------------------------------------------------------

def resolution(diffs: dict) -> dict:
    """{variant: 95% CI half-width of Δ best val loss, or None (one seed)} for every compared step."""
    return {v: (d["best"].half_width if d.get("best") else None) for v, d in diffs.items() if d.get("best")}


def resolution_line(tables, baseline) -> str:
    """The smallest difference each step's seeds could detect: t(0.975, n-1) * sd(d) / sqrt(n) of its per-seed
    differences d (t = 12.71 for 2 seeds, 4.30 for 3); one seed gives no interval."""
    compared = {v: d["best"] for v, d in tables.diffs.items() if d.get("best")}
    if not compared:
        return "nothing compared yet"
    ns = sorted({d.n for d in compared.values()})
    if ns == [1]:
        return "1 seed: no interval, no verdict (a difference needs at least 2 paired seeds to be told from noise)"
    formula = "; ".join(f"{n} seeds: t(0.975, {n - 1}) = {t_quantile(0.975, n - 1):.2f}" for n in ns if n > 1)
    steps = ", ".join(f"{v} ±{d.half_width:.4f}" if d.half_width is not None else f"{v} none (1 seed)"
                      for v, d in compared.items())
    return (f"the smallest difference in {VERDICT_MEASURE} the seeds could detect is the 95% CI half-width "
            f"t·sd/√n of the paired per-seed differences with {baseline} ({formula}): {steps}")


def max_epochs(cells: pd.DataFrame) -> float:
    values = cells[cells.status == "done"].epochs.dropna()
    return float(values.max()) if len(values) else np.nan


def _is_demo(records) -> bool:
    """A tiny model or a CPU run shows the machinery works; its numbers do not answer the research question."""
    return any(r.settings is not None and (r.settings.model.size == "gpt2-tiny" or r.settings.general.device ==
                                           "cpu") or r.metrics.get("device") == "cpu" for r in records)


def study_kind(records, epochs) -> str:
    """Demo, small-data multi-epoch study, or real study (a non-demo model under one epoch); epochs: the most
    passes over the training split any run made (None or NaN: not recorded)."""
    epochs = np.nan if epochs is None else float(epochs)
    multi_epoch = np.isfinite(epochs) and epochs > 1
    if not np.isfinite(epochs):
        data = "epochs not recorded"
    elif multi_epoch:
        data = (f"small-data, multi-epoch: {epochs_text(epochs)} epochs (passes over the training split, the most of any "
                f"run), so final losses also measure memorisation")
    else:
        data = f"{epochs_text(epochs)} epochs: no training token was seen twice"
    if _is_demo(records):
        return (f"demo (a tiny model or a CPU run: it shows the pipeline works, it does not answer the research "
                f"question); {data}")
    return data if multi_epoch else f"real study; {data}"


def past_minimum_line(cells: pd.DataFrame, tables_diffs: dict) -> str:
    done = cells[cells.status == "done"]
    unrecorded = int((~done.past_val_minimum_recorded.astype(bool)).sum())
    past = done[done.past_val_minimum_recorded.astype(bool) & (done.past_val_minimum_by > 0)]
    parts = []
    if len(done) > unrecorded:
        parts.append(f"{len(past)} of {len(done) - unrecorded} cells ended past their validation minimum"
                     + (f" (by up to {past.past_val_minimum_by.max():.4f} nats; see Cells)" if len(past) else ""))
    if unrecorded:
        parts.append(f"not recorded for {unrecorded} cells (runs older than the record)")
    changed = [v for v, d in tables_diffs.items() if final_disagrees(d)]
    if changed:
        parts.append(f"final val loss would change the verdict of {', '.join(changed)}")
    return "; ".join(parts) or "no finished cell"


def throughput_flags(cells: pd.DataFrame, steps: pd.DataFrame) -> list:
    """Why tokens/s (and so matched-time comparisons) may reflect the machine rather than the step."""
    flags = []
    for s in steps.itertuples():
        done = _done(cells, s.variant)
        if np.isfinite(s.tokens_per_s_spread) and s.tokens_per_s_spread > THROUGHPUT_SPREAD_LIMIT:
            flags.append(f"{s.variant}'s tokens/s differs by {s.tokens_per_s_spread:.0%} across its seeds on the "
                         f"same device")
        devices = sorted(set(done.device))
        if len(devices) > 1:
            flags.append(f"{s.variant}'s cells ran on different devices ({', '.join(devices)})")
    for c in cells[cells.machine_busy.eq(True)].itertuples():
        flags.append(f"{c.cell} ran on a busy machine ({c.machine_busy_reason or 'no reason recorded'})")
    return flags


def throughput_line(cells: pd.DataFrame, steps: pd.DataFrame) -> str:
    flags = throughput_flags(cells, steps)
    done = cells[cells.status == "done"]
    unrecorded = int(done.machine_busy.isna().sum())
    load = f"; machine load not recorded for {unrecorded} cells" if unrecorded else ""
    if flags:
        return ("**noisy**: " + "; ".join(flags) + ". Tokens/s and the matched-time comparison mean little "
                "there" + load)
    spread = (f"every step's tokens/s is within {THROUGHPUT_SPREAD_LIMIT:.0%} across its seeds on one device"
              if steps.tokens_per_s_spread.notna().any()
              else "no step has two finished seeds on one device, so tokens/s noise across seeds is not measured")
    return spread + (", and no cell's machine was measurably busy" if unrecorded < len(done) else "") + load


def support_lines(tables, baseline) -> list:
    """The 'What this comparison can support' bullets of a matrix report."""
    done = tables.cells[tables.cells.status == "done"]
    seeds = sorted({s for s in done.seed if s is not None and not pd.isna(s)})
    epochs = max_epochs(tables.cells)
    scope = (f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''}"
             + (f", up to {epochs_text(epochs)} epochs of the training split" if np.isfinite(epochs) else ""))
    return [f"- **Scope**: {scope}; the verdicts hold for these models, data and budget, and only for differences "
            f"above the resolution.",
            f"- **Resolution**: {resolution_line(tables, baseline)}.",
            f"- **Past the validation minimum**: {past_minimum_line(tables.cells, tables.diffs)}.",
            f"- **Throughput**: {throughput_line(tables.cells, tables.steps)}."]
