"""Reports: run directories -> pandas tables -> report.md + PNG plots + report.json/csv.

Built only from what the runs wrote (metrics.json, eval.jsonl, the config snapshot,
env.json) plus, for a matrix, plan.json and the cells' state.json. Nothing is
re-run or re-measured, so a report can be regenerated at any time.

Statistics. Cells of two steps that share a seed share their initialisation and
batch order, so steps are compared on paired differences: for each seed s both
steps finished, d_s = loss(step, s) - loss(baseline, s); the report gives
mean(d) with a 95% confidence interval mean(d) +- t(0.975, n-1) * sd(d) / sqrt(n).
With one common seed there is no interval, and the verdict says so.

Matched comparisons. Steps differ in speed, so final losses at equal wall-clock
budgets mix "learns better per token" with "sees more tokens". The report also
compares every step at the same training time and at the same token count: the
largest value every finished cell reached, with each cell's validation loss
linearly interpolated between its evaluations.
"""

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd

from lib import config as kcfg
from lib.runs import CONFIG_NAME, ENV_NAME, EVAL_NAME, METRICS_NAME, atomic_write_json, atomic_write_text, read_jsonl

REPORT_MD, REPORT_JSON, REPORT_CSV, CELLS_CSV = "report.md", "report.json", "report.csv", "report_cells.csv"
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
    settings: object  # lib.settings.Settings, or None when the snapshot cannot be read

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


def _read_settings(run_dir):
    for name in (CONFIG_NAME, "cell.config"):
        path = Path(run_dir) / name
        if path.exists():
            try:
                return kcfg.load_settings(path, environ={})
            except kcfg.ConfigError:
                return None
    return None


def load_run(run_dir, label=None, variant=None, seed=None, state=None) -> RunRecord:
    run_dir = Path(run_dir)
    metrics = _read_json(run_dir / METRICS_NAME)
    status = state.status if state is not None else metrics.get("status", "pending")
    reason = (state.failure_reason if state is not None else "") or metrics.get("failure_reason") or ""
    settings = _read_settings(run_dir)
    if seed is None and settings is not None:
        seed = settings.general.seed
    return RunRecord(run_dir, label or run_dir.name, variant or run_dir.name, seed, status, reason,
                     state.attempts if state is not None else 1, metrics, _read_evals(run_dir),
                     _read_json(run_dir / ENV_NAME), settings)


def load_matrix(matrix_dir) -> tuple:
    """(plan, [RunRecord] in plan order)."""
    from lib.matrix_plan import load_plan
    from lib.matrix_state import read_state

    plan = load_plan(matrix_dir)
    records = [load_run(c.run_dir(matrix_dir), c.label, c.variant, c.seed, read_state(matrix_dir, c.id))
               for c in plan.cells]
    return plan, records


# ---- statistics -----------------------------------------------------------------------

def _betacf(a, b, x):
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-14:
            break
    return h


def _incomplete_beta(a, b, x):
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t, df) -> float:
    """Student t distribution function: 1 - I_{df/(df+t^2)}(df/2, 1/2) / 2 for t >= 0."""
    tail = 0.5 * _incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p, df) -> float:
    """Inverse of t_cdf by bisection (t(0.975, 2) = 4.303, t(0.975, 30) = 2.042)."""
    low, high = -1e3, 1e3
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


@dataclasses.dataclass
class PairedDiff:
    n: int  # seeds finished by both
    mean: float
    half_width: float | None  # 95% CI half-width; None when n < 2

    @property
    def significant(self) -> bool:
        return self.half_width is not None and abs(self.mean) > self.half_width

    def to_dict(self) -> dict:
        ci = None if self.half_width is None else [self.mean - self.half_width, self.mean + self.half_width]
        return {"n": self.n, "mean": self.mean, "ci95_half_width": self.half_width, "ci95": ci}


def paired_difference(values: dict, baseline: dict):
    """values, baseline: {seed: loss}. None when no seed has a finite value in both."""
    diffs = [values[s] - baseline[s] for s in values
             if s in baseline and np.isfinite(values[s]) and np.isfinite(baseline[s])]
    if not diffs:
        return None
    n, mean = len(diffs), float(np.mean(diffs))
    if n < 2:
        return PairedDiff(n, mean, None)
    return PairedDiff(n, mean, t_quantile(0.975, n - 1) * float(np.std(diffs, ddof=1)) / math.sqrt(n))


def value_at(evals: pd.DataFrame, x_column: str, x: float, y_column="val_loss") -> float:
    """y interpolated linearly at x between evaluations; NaN outside the evaluated range."""
    points = evals[[x_column, y_column]].dropna().sort_values(x_column)
    if points.empty or x < points[x_column].iloc[0] or x > points[x_column].iloc[-1]:
        return float("nan")
    return float(np.interp(x, points[x_column].to_numpy(), points[y_column].to_numpy()))


def matched_point(records, x_column):
    """The largest x every finished cell's evaluations reach (None without finished cells)."""
    reach = [r.evals[x_column].max() for r in records if r.done and not r.evals.empty]
    reach = [x for x in reach if np.isfinite(x)]
    return float(min(reach)) if reach else None


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
               "overrides": _overrides_text(_own_overrides(v, variants[0])),
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


def _own_overrides(variant, baseline) -> dict:
    if variant.id == baseline.id:
        return variant.overrides
    return {k: v for k, v in variant.overrides.items() if baseline.overrides.get(k) != v}


def _overrides_text(overrides: dict) -> str:
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


# ---- verdicts ---------------------------------------------------------------------------

def _diff_phrase(d: PairedDiff, baseline: str, where: str) -> str:
    if d.half_width is None:
        return f"single seed: no confidence interval (Δ {d.mean:+.4f} {where}, n=1)"
    if not d.significant:
        return f"within noise: Δ {d.mean:+.4f} ± {d.half_width:.4f} {where}, the 95% CI includes 0 (n={d.n})"
    word = "better" if d.mean < 0 else "worse"
    return f"{word} than {baseline} by {abs(d.mean):.4f} ± {d.half_width:.4f} val loss {where} (95% CI, n={d.n})"


def verdict(variant_id, baseline_id, diffs: dict, row) -> str:
    if variant_id == baseline_id:
        return f"baseline ({row['cells_done']} of {row['cells_planned']} cells finished)"
    if row["cells_done"] == 0:
        return "no finished cell: nothing to compare"
    primary = diffs.get("time") or diffs.get("final")
    if primary is None:
        return f"no seed finished for both {variant_id} and {baseline_id}: no paired comparison"
    where = "at matched time" if diffs.get("time") else "in final loss"
    text = _diff_phrase(primary, baseline_id, where)
    tokens = diffs.get("tokens")
    if tokens is not None and tokens.half_width is not None:
        state = ("better" if tokens.mean < 0 else "worse") if tokens.significant else "within noise"
        text += f"; at matched tokens: {state} (Δ {tokens.mean:+.4f} ± {tokens.half_width:.4f})"
    return text


# ---- formatting ---------------------------------------------------------------------------

def _num(value, digits=4) -> str:
    return "–" if value is None or (isinstance(value, float) and not np.isfinite(value)) else f"{value:.{digits}f}"


def _si(value, unit="") -> str:
    if value is None or not np.isfinite(value):
        return "–"
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{prefix}{unit}"
    return f"{value:.3g}{unit}"


def _seconds(value) -> str:
    return "–" if value is None or not np.isfinite(value) else (f"{value:.0f} s" if value >= 10 else f"{value:.2f} s")


def _gib(value) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value / 2**30:.2f} GiB"


def _pm(mean, std, digits=4) -> str:
    if mean is None or not np.isfinite(mean):
        return "–"
    return _num(mean, digits) + (f" ± {std:.{digits}f}" if std is not None and np.isfinite(std) else "")


def _delta(row, key) -> str:
    mean, half = getattr(row, f"delta_{key}"), getattr(row, f"delta_{key}_ci95")
    if not np.isfinite(mean):
        return "–"
    return f"{mean:+.4f}" + (f" ± {half:.4f}" if np.isfinite(half) else " (n=1)")


def md_table(header: list, rows: list) -> str:
    def cell(x):
        return str(x).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def _hardware(records) -> str:
    seen = {}
    for r in records:
        env = r.env
        if not env:
            continue
        gpus = env.get("gpus") or []
        gpu = f"{len(gpus)}× {gpus[0]['name']}" if gpus else f"CPU ({env.get('cpu_count')} cores)"
        key = f"{gpu}, torch {env.get('torch')}" + (f" + CUDA {env['cuda']}" if env.get("cuda") else "")
        seen.setdefault(key, set()).add(env.get("host", "?"))
    return "; ".join(f"{k} on {', '.join(sorted(h))}" for k, h in seen.items()) or "unknown (no env.json yet)"


def _git(records) -> str:
    commits = {}
    for r in records:
        git = (r.env or {}).get("git") or {}
        if git:
            key = (git.get("commit") or "no commit")[:12] + (" (uncommitted changes)" if git.get("dirty") else "")
            commits[key] = commits.get(key, 0) + 1
    if not commits:
        return "unknown"
    if len(commits) == 1:
        return next(iter(commits))
    return "MIXED: " + ", ".join(f"{k} ({n} cells)" for k, n in commits.items())


def _budget(records) -> str:
    budgets = sorted({(r.settings.train.max_time_s, r.settings.train.max_iters) for r in records if r.settings})
    parts = []
    for seconds, iters in budgets:
        part = []
        if seconds:
            part.append(f"{seconds} s of training time")
        if iters:
            part.append(f"{iters} iterations")
        parts.append(" or ".join(part) + " per cell")
    return "; ".join(parts) or "unknown"


# ---- the reports -------------------------------------------------------------------------------

def write_matrix_report(matrix_dir) -> Path:
    """report.md, report.json, report.csv, report_cells.csv and PNG plots in matrix_dir."""
    from lib import report_plots

    matrix_dir = Path(matrix_dir)
    plan, records = load_matrix(matrix_dir)
    matched_time, matched_tokens = matched_point(records, "train_time_s"), matched_point(records, "tokens")
    cells = cell_table(records, matched_time, matched_tokens)
    steps, diffs = step_table(plan.variants, cells)
    gates = gate_table(records)
    baseline = plan.baseline.id
    verdicts = {row["variant"]: verdict(row["variant"], baseline, diffs[row["variant"]], row)
                for _, row in steps.iterrows()}
    plots = report_plots.matrix_plots(matrix_dir, records, steps, gates, plan.variants, matched_time, matched_tokens)

    failed = [r for r in records if r.status == "failed"]
    unfinished = [r for r in records if r.status in ("pending", "running")]
    seeds = ", ".join(map(str, plan.seeds)) if plan.seeds else "each cell's configured seed"
    lines = [f"# Matrix report: {plan.name}", "",
             f"- **Compared**: {len(plan.variants)} steps × {max(len(plan.seeds), 1)} seed(s) = {len(plan.cells)} "
             f"cells; baseline **{baseline}** ({plan.baseline.description})",
             f"- **Seeds**: {seeds}",
             f"- **Budget**: {_budget(records)}",
             f"- **Hardware**: {_hardware(records)}",
             f"- **Git commit**: {_git(records)}",
             f"- **Planned**: {plan.created}; **report written**: {time.strftime('%Y-%m-%d %H:%M:%S')}",
             f"- **Directory**: `{matrix_dir}` (plan hash {plan.hash})",
             f"- **Cells**: {sum(r.done for r in records)} done, {len(failed)} failed, {len(unfinished)} not finished"]
    if failed:
        lines += ["", "**Failed cells** (excluded from every comparison below):", ""]
        lines += [f"- `{r.label}`: {r.failure_reason or 'unknown reason'} (attempts: {r.attempts}; log: "
                  f"`{(r.run_dir / 'console.log').relative_to(matrix_dir)}`)" for r in failed]
    if unfinished:
        lines += ["", f"**Not finished** ({len(unfinished)}): " + ", ".join(f"`{r.label}` ({r.status})"
                                                                            for r in unfinished)
                  + " — `make continue` resumes them."]

    lines += ["", "## Verdicts", "", f"Δ = val loss − {baseline}'s val loss on the same seed (negative is better).", ""]
    lines += [f"- **{v}**: {text}" for v, text in verdicts.items()]

    lines += ["", "## Results per step", "",
              "Mean over finished seeds (± sample std for losses). Δ columns: paired difference to the baseline, "
              "± 95% CI half-width (t-distribution over per-seed differences).", ""]
    header = ["step", "description", "params", "tokens seen", "tokens/s", "final val loss", "best val loss",
              "final ppl", "best ppl", f"Δ final vs {baseline}", "peak mem", "cells"]
    rows = [[s.variant, s.description, _si(s.params), _si(s.tokens_seen), _si(s.tokens_per_s),
             _pm(s.final_val_loss, s.final_val_loss_std), _num(s.best_val_loss), _num(s.final_val_ppl, 2),
             _num(s.best_val_ppl, 2),
             _delta(s, "final"), _gib(s.peak_mem_bytes),
             f"{s.cells_done}/{s.cells_planned}" + (f" ({s.cells_failed} failed)" if s.cells_failed else "")]
            for s in steps.itertuples()]
    lines.append(md_table(header, rows))
    if any(v.overrides for v in plan.variants):
        lines += ["", f"Step parameters: Kconfig overrides of {baseline} on the base config, and of every other "
                      f"step where it differs from {baseline}:", ""]
        for v in plan.variants:
            text = _overrides_text(_own_overrides(v, plan.baseline))
            lines.append(f"- **{v.id}**: " + (f"`{text}`" if text else
                                               "(base config)" if v.id == baseline else f"(same as {baseline})"))

    lines += ["", "## Matched comparisons", ""]
    if matched_time is None:
        lines.append("No finished cell yet.")
    else:
        lines += [f"Validation loss interpolated from the evaluation logs at the largest point every finished cell "
                  f"reached: **{_seconds(matched_time)}** of training time and **{_si(matched_tokens)} tokens** "
                  f"(– where a cell's first evaluation came later).", ""]
        rows = [[s.variant, _pm(s.val_loss_at_matched_time, s.val_loss_at_matched_time_std), _delta(s, "time"),
                 _pm(s.val_loss_at_matched_tokens, s.val_loss_at_matched_tokens_std), _delta(s, "tokens")]
                for s in steps.itertuples()]
        lines.append(md_table(["step", f"val loss @ {_seconds(matched_time)}", f"Δ vs {baseline}",
                               f"val loss @ {_si(matched_tokens)} tok", f"Δ vs {baseline}"], rows))

    lines += ["", "## Learned gates", ""]
    lines += _gate_lines(gates)
    lines += ["", "## Plots", ""] + [f"![{title}]({name})" for title, name in plots]
    lines += ["", "## Cells", ""]
    rows = [[c.cell, c.status, c.attempts, _num(c.final_val_loss), _num(c.val_loss_at_matched_time),
             _si(c.tokens_seen), _si(c.tokens_per_s), _num(c.train_time_s, 0), c.failure_reason or ""]
            for c in cells.itertuples()]
    lines.append(md_table(["cell", "status", "attempts", "final val loss", "val loss @ matched time", "tokens",
                           "tokens/s", "train s", "failure"], rows))
    lines += ["", f"Numbers: `{REPORT_JSON}`, `{REPORT_CSV}` (per step), `{CELLS_CSV}` (per cell)."]

    atomic_write_text(matrix_dir / REPORT_MD, "\n".join(lines) + "\n")
    steps.assign(verdict=steps.variant.map(verdicts)).to_csv(matrix_dir / REPORT_CSV, index=False)
    cells.to_csv(matrix_dir / CELLS_CSV, index=False)
    atomic_write_json(matrix_dir / REPORT_JSON, {
        "matrix": plan.name, "baseline": baseline, "plan_hash": plan.hash, "seeds": plan.seeds,
        "budget": _budget(records), "hardware": _hardware(records), "git": _git(records),
        "matched": {"train_time_s": matched_time, "tokens": matched_tokens},
        "steps": _records(steps), "comparisons": {v: {k: d.to_dict() if d else None for k, d in ds.items()}
                                                  for v, ds in diffs.items()},
        "verdicts": verdicts, "gates": _records(gates), "cells": _records(cells),
        "plots": [name for _, name in plots]})
    return matrix_dir / REPORT_MD


def _gate_lines(gates: pd.DataFrame) -> list:
    if gates.empty:
        return ["No step has learned attention gates (no RA backend among the finished cells)."]
    lines = ["Per layer, mean ± std over heads (pooled over seeds). Heads under threshold: mean count per seed "
             "of heads with |w_rec| below CONFIG_ATTN_HEAD_SELECT_THRESHOLD (routed to plain attention).", ""]
    rows = [[g.variant, g.layer, _pm(g.w_std_mean, g.w_std_std, 3), _pm(g.w_rec_mean, g.w_rec_std, 3),
             (f"{g.heads_under_threshold:.1f} / {g.heads} (< {g.threshold:g})" if np.isfinite(g.heads_under_threshold)
              else "– (threshold 0: off)")]
            for g in gates.itertuples()]
    return lines + [md_table(["step", "layer", "w_std", "w_rec", "heads under threshold"], rows)]


def _records(frame: pd.DataFrame) -> list:
    return json.loads(frame.to_json(orient="records")) if not frame.empty else []


def write_run_report(run_dir) -> Path:
    """report.md + report.json + plots for one training run directory."""
    from lib import report_plots

    run_dir = Path(run_dir)
    record = load_run(run_dir)
    m, s = record.metrics, record.settings
    plots = report_plots.run_plots(run_dir, record)
    gates = gate_table([dataclasses.replace(record, status="done")] if m.get("gates") else [])
    title = kcfg.preset_of(run_dir / CONFIG_NAME) if (run_dir / CONFIG_NAME).exists() else ""
    lines = [f"# Run report: {run_dir.name}", "",
             f"- **Status**: {record.status}" + (f" — {record.failure_reason}" if record.failure_reason else ""),
             f"- **Preset**: {title or 'custom'}; config snapshot `{CONFIG_NAME}`",
             f"- **Model**: " + (f"{s.model.n_layer} layers × {s.model.n_head} heads × {s.model.n_embd}, block "
                                 f"{s.model.block_size}; attention {s.attention.backend}; MLP {s.mlp.kind}; seed "
                                 f"{s.general.seed}" if s else "unknown"),
             f"- **Budget**: {_budget([record])}",
             f"- **Hardware**: {_hardware([record])}",
             f"- **Git commit**: {_git([record])}",
             f"- **Report written**: {time.strftime('%Y-%m-%d %H:%M:%S')}", "", "## Numbers", ""]
    rows = [["parameters", _si(m.get("params"))], ["iterations", m.get("iters", "–")],
            ["tokens seen", _si(m.get("tokens_seen"))], ["tokens/s", _si(m.get("tokens_per_s"))],
            ["ms/step", _num(m.get("ms_per_step"), 1)], ["MFU", _num(m.get("mfu"), 3)],
            ["final val loss", _num(m.get("final_val_loss"))], ["best val loss", _num(m.get("best_val_loss"))],
            ["final val perplexity", _num(m.get("final_val_ppl"), 2)],
            ["unigram entropy (nats)", _num(m.get("unigram_entropy"))],
            ["peak memory", _gib(m.get("peak_mem_bytes") or float("nan"))],
            ["training time", f"{_num(m.get('train_time_s'), 1)} s"],
            ["evaluation time", f"{_num(m.get('eval_time_s'), 1)} s"],
            ["compile/warm-up time", f"{_num(m.get('compile_time_s'), 1)} s"]]
    lines.append(md_table(["metric", "value"], rows))
    lines += ["", "## Evaluations", ""]
    if record.evals.empty:
        lines.append("No evaluation recorded.")
    else:
        lines.append(md_table(["iter", "tokens", "train s", "train loss", "val loss", "val ppl"],
                              [[int(e.iter), _si(e.tokens), _num(e.train_time_s, 1), _num(e.train_loss),
                                _num(e.val_loss), _num(e.val_ppl, 2)] for e in record.evals.itertuples()]))
    lines += ["", "## Learned gates", ""] + _gate_lines(gates)
    lines += ["", "## Plots", ""] + [f"![{t}]({n})" for t, n in plots]
    atomic_write_text(run_dir / REPORT_MD, "\n".join(lines) + "\n")
    atomic_write_json(run_dir / REPORT_JSON, {"run": run_dir.name, "status": record.status,
                                              "failure_reason": record.failure_reason, "metrics": m,
                                              "evals": _records(record.evals), "gates": _records(gates),
                                              "plots": [n for _, n in plots]})
    return run_dir / REPORT_MD


def write_report(path) -> Path:
    """A matrix directory (plan.json) gets the matrix report, a run directory the run report."""
    from lib.matrix_plan import PLAN_FILE

    path = Path(path)
    if (path / PLAN_FILE).exists():
        return write_matrix_report(path)
    if (path / METRICS_NAME).exists() or (path / EVAL_NAME).exists():
        return write_run_report(path)
    raise FileNotFoundError(f"{path} is neither a matrix directory ({PLAN_FILE}) nor a run directory "
                            f"({METRICS_NAME} or {EVAL_NAME})")


def newest_reportable(results_dir) -> Path:
    """The most recently modified matrix or run directory directly under results_dir."""
    from lib.matrix_plan import PLAN_FILE

    results_dir = Path(results_dir)
    candidates = [p for p in results_dir.glob("*") if p.is_dir() and not p.name.startswith(".")
                  and any((p / name).exists() for name in (PLAN_FILE, METRICS_NAME, EVAL_NAME))]
    if not candidates:
        raise FileNotFoundError(f"no run or matrix directory under {results_dir}; pass one explicitly")

    def last_change(path):
        return max(f.stat().st_mtime for f in [path, *path.glob("*"), *path.glob("cells/*")])

    return max(candidates, key=last_change)
