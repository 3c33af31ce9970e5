"""Report text: number formatting, provenance lines, verdicts, and the report.md of a matrix or a run.

Everything here turns tables (lib.report.data) and paired differences
(lib.report.stats) into words; nothing is computed from the runs' files here.
"""

import time

import numpy as np

from lib.matrix.state import CONSOLE_LOG
from lib.report.data import overrides_text, own_overrides
from lib.report.stats import PairedDiff
from gpt2.io import CONFIG_NAME

# The files a report writes next to the runs (report.md names the numbers files).
REPORT_MD, REPORT_JSON, REPORT_CSV, CELLS_CSV = "report.md", "report.json", "report.csv", "report_cells.csv"


# ---- numbers ---------------------------------------------------------------------------

def _missing(value) -> bool:
    return value is None or not np.isfinite(value)


def _num(value, digits=4) -> str:
    return "–" if _missing(value) else f"{value:.{digits}f}"


def _si(value, unit="") -> str:
    if _missing(value):
        return "–"
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{prefix}{unit}"
    return f"{value:.3g}{unit}"


def _seconds(value) -> str:
    return "–" if _missing(value) else (f"{value:.0f} s" if value >= 10 else f"{value:.2f} s")


def _gib(value) -> str:
    return "–" if _missing(value) else f"{value / 2**30:.2f} GiB"


def _pm(mean, std, digits=4) -> str:
    if _missing(mean):
        return "–"
    return _num(mean, digits) + ("" if _missing(std) else f" ± {std:.{digits}f}")


def _delta(row, key) -> str:
    mean, half = getattr(row, f"delta_{key}"), getattr(row, f"delta_{key}_ci95")
    if _missing(mean):
        return "–"
    return f"{mean:+.4f}" + (" (n=1)" if _missing(half) else f" ± {half:.4f}")


def md_table(header: list, rows: list) -> str:
    def cell(x):
        return str(x).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


# ---- provenance -------------------------------------------------------------------------

def describe_hardware(records) -> str:
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


def describe_git(records) -> str:
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


def describe_budget(records) -> str:
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


def _provenance_lines(records) -> list:
    return [f"- **Budget**: {describe_budget(records)}",
            f"- **Hardware**: {describe_hardware(records)}",
            f"- **Git commit**: {describe_git(records)}"]


# ---- verdicts ---------------------------------------------------------------------------

def _diff_phrase(d: PairedDiff, baseline: str, where: str) -> str:
    if d.half_width is None:
        return f"single seed: no confidence interval (Δ {d.mean:+.4f} {where}, n=1)"
    if not d.significant:
        return f"within noise: Δ {d.mean:+.4f} ± {d.half_width:.4f} {where}, the 95% CI includes 0 (n={d.n})"
    word = "better" if d.mean < 0 else "worse"
    return f"{word} than {baseline} by {abs(d.mean):.4f} ± {d.half_width:.4f} val loss {where} (95% CI, n={d.n})"


def verdict(variant_id, baseline_id, diffs: dict, row) -> str:
    """One sentence per step: the matched-time comparison (else final loss), plus matched tokens."""
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


def step_verdicts(tables, baseline_id) -> dict:
    """{variant: verdict} for every row of tables.steps (a lib.report.data.MatrixTables)."""
    return {row["variant"]: verdict(row["variant"], baseline_id, tables.diffs[row["variant"]], row)
            for _, row in tables.steps.iterrows()}


# ---- sections both reports have -----------------------------------------------------------

def _gate_lines(gates) -> list:
    if gates.empty:
        return ["No step has learned attention gates (no RA backend among the finished cells)."]
    lines = ["Per layer, mean ± std over heads (pooled over seeds). Heads under threshold: mean count per seed "
             "of heads with |w_rec| below CONFIG_ATTN_HEAD_SELECT_THRESHOLD (routed to plain attention).", ""]
    rows = [[g.variant, g.layer, _pm(g.w_std_mean, g.w_std_std, 3), _pm(g.w_rec_mean, g.w_rec_std, 3),
             (f"{g.heads_under_threshold:.1f} / {g.heads} (< {g.threshold:g})" if np.isfinite(g.heads_under_threshold)
              else "– (threshold 0: off)")]
            for g in gates.itertuples()]
    return lines + [md_table(["step", "layer", "w_std", "w_rec", "heads under threshold"], rows)]


def _gates_and_plots(gates, plots) -> list:
    return (["", "## Learned gates", ""] + _gate_lines(gates)
            + ["", "## Plots", ""] + [f"![{title}]({name})" for title, name in plots])


# ---- the matrix report ----------------------------------------------------------------------

def matrix_markdown(matrix_dir, plan, records, tables, verdicts, plots) -> str:
    """report.md of a matrix: header, verdicts, per-step results, matched comparisons, gates, plots, cells."""
    baseline = plan.baseline.id
    steps = tables.steps
    failed = [r for r in records if r.status == "failed"]
    unfinished = [r for r in records if r.status in ("pending", "running")]
    seeds = ", ".join(map(str, plan.seeds)) if plan.seeds else "each cell's configured seed"
    lines = [f"# Matrix report: {plan.name}", "",
             f"- **Compared**: {len(plan.variants)} steps × {max(len(plan.seeds), 1)} seed(s) = {len(plan.cells)} "
             f"cells; baseline **{baseline}** ({plan.baseline.description})",
             f"- **Seeds**: {seeds}",
             *_provenance_lines(records),
             f"- **Planned**: {plan.created}; **report written**: {time.strftime('%Y-%m-%d %H:%M:%S')}",
             f"- **Directory**: `{matrix_dir}` (plan hash {plan.hash})",
             f"- **Cells**: {sum(r.done for r in records)} done, {len(failed)} failed, {len(unfinished)} not finished"]
    if failed:
        lines += ["", "**Failed cells** (excluded from every comparison below):", ""]
        lines += [f"- `{r.label}`: {r.failure_reason or 'unknown reason'} (attempts: {r.attempts}; log: "
                  f"`{(r.run_dir / CONSOLE_LOG).relative_to(matrix_dir)}`)" for r in failed]
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
            text = overrides_text(own_overrides(v, plan.baseline))
            lines.append(f"- **{v.id}**: " + (f"`{text}`" if text else
                                               "(base config)" if v.id == baseline else f"(same as {baseline})"))

    lines += ["", "## Matched comparisons", ""]
    if tables.matched_time is None:
        lines.append("No finished cell yet.")
    else:
        at_time, at_tokens = _seconds(tables.matched_time), _si(tables.matched_tokens)
        lines += [f"Validation loss interpolated from the evaluation logs at the largest point every finished cell "
                  f"reached: **{at_time}** of training time and **{at_tokens} tokens** "
                  f"(– where a cell's first evaluation came later).", ""]
        rows = [[s.variant, _pm(s.val_loss_at_matched_time, s.val_loss_at_matched_time_std), _delta(s, "time"),
                 _pm(s.val_loss_at_matched_tokens, s.val_loss_at_matched_tokens_std), _delta(s, "tokens")]
                for s in steps.itertuples()]
        lines.append(md_table(["step", f"val loss @ {at_time}", f"Δ vs {baseline}",
                               f"val loss @ {at_tokens} tok", f"Δ vs {baseline}"], rows))

    lines += _gates_and_plots(tables.gates, plots)
    lines += ["", "## Cells", ""]
    rows = [[c.cell, c.status, c.attempts, _num(c.final_val_loss), _num(c.val_loss_at_matched_time),
             _si(c.tokens_seen), _si(c.tokens_per_s), _num(c.train_time_s, 0), c.failure_reason or ""]
            for c in tables.cells.itertuples()]
    lines.append(md_table(["cell", "status", "attempts", "final val loss", "val loss @ matched time", "tokens",
                           "tokens/s", "train s", "failure"], rows))
    lines += ["", f"Numbers: `{REPORT_JSON}`, `{REPORT_CSV}` (per step), `{CELLS_CSV}` (per cell)."]
    return "\n".join(lines) + "\n"


# ---- the run report -----------------------------------------------------------------------------

def run_markdown(run_dir, record, preset, gates, plots) -> str:
    """report.md of one training run: header, final numbers, every evaluation, gates, plots."""
    m, s = record.metrics, record.settings
    lines = [f"# Run report: {run_dir.name}", "",
             f"- **Status**: {record.status}" + (f" — {record.failure_reason}" if record.failure_reason else ""),
             f"- **Preset**: {preset or 'custom'}; config snapshot `{CONFIG_NAME}`",
             "- **Model**: " + (f"{s.model.n_layer} layers × {s.model.n_head} heads × {s.model.n_embd}, block "
                                 f"{s.model.block_size}; attention {s.attention.backend}; MLP {s.mlp.kind}; seed "
                                 f"{s.general.seed}" if s else "unknown"),
             *_provenance_lines([record]),
             f"- **Report written**: {time.strftime('%Y-%m-%d %H:%M:%S')}", "", "## Numbers", ""]
    rows = [["parameters", _si(m.get("params"))], ["iterations", m.get("iters", "–")],
            ["tokens seen", _si(m.get("tokens_seen"))],
            ["epochs (passes over the training split)", _num(m.get("epochs"), 2)],
            ["tokens/s", _si(m.get("tokens_per_s"))],
            ["ms/step", _num(m.get("ms_per_step"), 1)], ["MFU", _num(m.get("mfu"), 3)],
            ["final val loss", _num(m.get("final_val_loss"))], ["best val loss", _num(m.get("best_val_loss"))],
            ["final val perplexity", _num(m.get("final_val_ppl"), 2)],
            ["unigram entropy (nats)", _num(m.get("unigram_entropy"))],
            ["peak memory", _gib(m.get("peak_mem_bytes") or None)],  # 0: not measured
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
    lines += _gates_and_plots(gates, plots)
    return "\n".join(lines) + "\n"
