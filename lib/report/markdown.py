"""Report text: number formatting, provenance lines, and the report.md of a matrix or a run.

Everything here turns tables (lib.report.data), verdicts (lib.report.verdicts) and reproduce commands
(lib.report.reproduce) into markdown; nothing is computed from the runs' files here.
"""

import time

import numpy as np

from lib.matrix.state import CONSOLE_LOG
from lib.report.code import ran_code
from lib.report.data import baseline_name, machine_load, overrides_text, own_overrides, past_minimum
from lib.report.evaluation import compared_group, describe_group, hellaswag_columns
from lib.report.verdicts import max_epochs, measure_text, study_kind, support_lines, throughput_flags
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
        if (r.env or {}).get("git"):
            code = ran_code(r.env)
            key = (code.commit or "no commit")[:12]
            if code.dirty:
                key += " (uncommitted changes)"
            elif not code.same_as_recorded:
                key += f" (ran as uncommitted changes on {(code.recorded or 'no commit')[:12]}; same files)"
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




def _past_text(recorded, by, iters, tokens) -> str:
    """A cell's "past val minimum" entry: by how much its final loss is above its best, and for how long."""
    if not recorded:
        return "not recorded"
    if _missing(by) or by <= 0:
        return "no"
    after = ", ".join(x for x in ((f"{iters:.0f} iters" if not _missing(iters) else ""),
                                  (f"{_si(tokens)} tokens" if not _missing(tokens) else "")) if x)
    return f"yes, by {by:.4f} nats" + (f" ({after} after the best)" if after else "")


def _machine_text(busy, reason) -> str:
    if busy is None or (isinstance(busy, float) and np.isnan(busy)):
        return "not recorded"
    return f"busy: {reason or 'no reason recorded'}" if busy else "not busy"


def _reproduce_lines(commands: dict, intro: str) -> list:
    lines = ["", "## Reproduce", "", intro, ""]
    warned = any(warning for _, warning in commands.values())
    rows = [[label, f"`{command}`", *([warning] if warned else [])] for label, (command, warning) in commands.items()]
    return lines + [md_table(["cell", "command", *(["note"] if warned else [])], rows)]


# ---- the matrix report ----------------------------------------------------------------------

def _header_lines(matrix_dir, plan, records, tables) -> list:
    baseline = plan.baseline.id
    failed = [r for r in records if r.status == "failed"]
    unfinished = [r for r in records if r.status in ("pending", "running", "stopped")]
    seeds = ", ".join(map(str, plan.seeds)) if plan.seeds else "each cell's configured seed"
    epochs = max_epochs(tables.cells)
    lines = [f"# Matrix report: {plan.name}", "",
             f"- **Study**: {study_kind(records, epochs)}",
             f"- **Verdict measure**: {measure_text(baseline_name(plan))}",
             f"- **Compared**: {len(plan.variants)} {'variants (steps at swept values)' if plan.sweep else 'steps'} × "
             f"{max(len(plan.seeds), 1)} seed(s) = {len(plan.cells)} cells; baseline **{baseline}** "
             f"({plan.baseline.description})",
             f"- **Seeds**: {seeds}",
             *_provenance_lines(records),
             f"- **Planned**: {plan.created}; **report written**: {time.strftime('%Y-%m-%d %H:%M:%S')}",
             f"- **Directory**: `{matrix_dir}` (plan hash {plan.hash})",
             f"- **Cells**: {sum(r.done for r in records)} done, {len(failed)} failed, {len(unfinished)} not finished",
             *([f"- **Plan notes**: {'; '.join(plan.notes)}"] if plan.notes and not plan.sweep else [])]
    if failed:
        lines += ["", "**Failed cells** (excluded from every comparison below):", ""]
        lines += [f"- `{r.label}`: {r.failure_reason or 'unknown reason'} (attempts: {r.attempts}; log: "
                  f"`{(r.run_dir / CONSOLE_LOG).relative_to(matrix_dir)}`)" for r in failed]
    if unfinished:
        lines += ["", f"**Not finished** ({len(unfinished)}): " + ", ".join(
            f"`{r.label}` ({r.status}" + (": process gone without a final record" if r.status == "stopped" else "")
            + ")" for r in unfinished) + " — `make continue` resumes them."]
    return lines


def _step_lines(plan, steps, cells) -> list:
    baseline = baseline_name(plan)
    lines = ["", "## Results per step", "",
             f"Mean over finished seeds (± sample std for losses and HellaSwag). Δ: paired by seed with {baseline}, "
             f"± 95% CI half-width (Δ best is the verdict's). FLOPs/token: training FLOPs per token "
             f"(6N + 12·L·H·Q·T). {describe_group(compared_group(cells), cells)}.", ""]
    header = ["step", "description", "params", "FLOPs/token", "tokens seen", "epochs", "tokens/s",
              "best val loss", "Δ best", "final val loss", "HellaSwag acc_norm", "Δ HellaSwag", "peak mem", "cells"]
    rows = [[s.variant, s.description, _si(s.params), _si(s.flops_per_token), _si(s.tokens_seen),
             _num(s.epochs, 2), _si(s.tokens_per_s), _pm(s.best_val_loss, s.best_val_loss_std), _delta(s, "best"),
             _pm(s.final_val_loss, s.final_val_loss_std),
             "not evaluated" if _missing(s.hellaswag_acc_norm) else _pm(s.hellaswag_acc_norm, s.hellaswag_acc_norm_std),
             _delta(s, "hellaswag"), _gib(s.peak_mem_bytes),
             f"{s.cells_done}/{s.cells_planned}" + (f" ({s.cells_failed} failed)" if s.cells_failed else "")]
            for s in steps.itertuples()]
    lines.append(md_table(header, rows))
    first = plan.baseline.id
    if any(v.overrides or v.sweep for v in plan.variants):
        lines += ["", f"Step parameters: Kconfig overrides of {first} on the base config, and of every other "
                      f"step where it differs from {first} (swept values included):", ""]
        for v in plan.variants:
            text = overrides_text(own_overrides(v, plan.baseline))
            lines.append(f"- **{v.id}**: " + (f"`{text}`" if text else
                                               "(base config)" if v.id == first else f"(same as {first})"))
    return lines


def _matched_lines(tables, baseline) -> list:
    lines = ["", "## Matched comparisons", ""]
    if tables.matched_time is None:
        return lines + ["No finished cell yet."]
    at_time, at_tokens = _seconds(tables.matched_time), _si(tables.matched_tokens)
    lines += [f"Not the verdict's measure: validation loss interpolated from the evaluation logs at the largest "
              f"point every finished cell reached: **{at_time}** of training time and **{at_tokens} tokens** "
              f"(– where a cell's first evaluation came later).", ""]
    if throughput_flags(tables.cells, tables.steps):
        lines += ["Throughput was noisy (see *What this comparison can support*): the matched-time column says as "
                  "much about the machine as about the steps.", ""]
    rows = [[s.variant, _pm(s.val_loss_at_matched_time, s.val_loss_at_matched_time_std), _delta(s, "time"),
             _pm(s.val_loss_at_matched_tokens, s.val_loss_at_matched_tokens_std), _delta(s, "tokens")]
            for s in tables.steps.itertuples()]
    return lines + [md_table(["step", f"val loss @ {at_time}", f"Δ vs {baseline}", f"val loss @ {at_tokens} tok",
                              f"Δ vs {baseline}"], rows)]


def _cell_lines(cells) -> list:
    rows = [[c.cell, c.status, c.attempts, _num(c.best_val_loss), _num(c.final_val_loss),
             _past_text(c.past_val_minimum_recorded, c.past_val_minimum_by, c.past_val_minimum_iters,
                        c.past_val_minimum_tokens) if c.status == "done" else "–",
             _num(c.epochs, 2), _si(c.tokens_per_s), c.device, _machine_text(c.machine_busy, c.machine_busy_reason),
             _num(c.train_time_s, 0), c.hellaswag, c.failure_reason or ""]
            for c in cells.itertuples()]
    return ["", "## Cells", "", md_table(["cell", "status", "attempts", "best val loss", "final val loss",
                                          "past val minimum", "epochs", "tokens/s", "device", "machine", "train s",
                                          "HellaSwag acc_norm", "failure"], rows)]


def matrix_markdown(matrix_dir, plan, records, tables, verdicts, plots, commands, sweep_lines=()) -> str:
    """report.md of a matrix: header, verdicts, what they can support, per-step results, the sweep
    (sweep_lines: lib.report.sweep's section), matched comparisons, gates, plots, cells, and the command that
    reproduces each cell."""
    baseline = baseline_name(plan)
    lines = _header_lines(matrix_dir, plan, records, tables)
    lines += ["", "## Verdicts", "", f"Δ = best val loss − the best val loss of {baseline} on the "
                                     f"same seed (negative is better), mean ± 95% CI half-width over the paired "
                                     f"seeds.", ""]
    lines += [f"- **{v}**: {text}" for v, text in verdicts.items()]
    lines += ["", "## What this comparison can support", "", *support_lines(tables, baseline)]
    lines += _step_lines(plan, tables.steps, tables.cells)
    lines += sweep_lines
    lines += _matched_lines(tables, baseline)
    lines += _gates_and_plots(tables.gates, plots)
    lines += _cell_lines(tables.cells)
    lines += _reproduce_lines(commands, "Each command checks out the commit the cell ran, restores the matrix's "
                                        "configuration and trains that one cell with the matrix's budget overrides.")
    lines += ["", f"Numbers: `{REPORT_JSON}`, `{REPORT_CSV}` (per step), `{CELLS_CSV}` (per cell)."]
    return "\n".join(lines) + "\n"


# ---- the run report -----------------------------------------------------------------------------

def _hellaswag_text(h: dict) -> str:
    """A run's HellaSwag as eval.json has it: the score and what it was scored on, or why there is none."""
    if h["hellaswag_status"] != "done":
        return h["hellaswag_status"]
    scope = f"{h['hellaswag_items']:,} items" + (", partial" if h["hellaswag_partial"] else "")
    return (f"{_num(h['hellaswag_acc_norm_scored'])} ({h['hellaswag_checkpoint']} checkpoint, {scope}"
            + ("" if h["hellaswag_official"] else ", not the official file") + ")")


def _run_rows(m, past, machine, hellaswag) -> list:
    best_at = ", ".join(x for x in ((f"iter {m['best_val_iter']}" if m.get("best_val_iter") is not None else ""),
                                    (f"{_si(m['best_val_tokens'])} tokens" if m.get("best_val_tokens") is not None
                                     else "")) if x)
    return [["parameters", _si(m.get("params"))], ["training FLOPs per token", _si(m.get("flops_per_token"))],
            ["iterations", m.get("iters", "–")], ["tokens seen", _si(m.get("tokens_seen"))],
            ["epochs (passes over the training split)", _num(m.get("epochs"), 2)],
            ["tokens/s", _si(m.get("tokens_per_s"))],
            ["ms/step", _num(m.get("ms_per_step"), 1)], ["MFU", _num(m.get("mfu"), 3)],
            ["final val loss", _num(m.get("final_val_loss"))],
            ["best val loss", _num(m.get("best_val_loss")) + (f" (at {best_at})" if best_at else "")],
            ["ended past the validation minimum", _past_text(past["past_val_minimum_recorded"],
                                                             past["past_val_minimum_by"],
                                                             past["past_val_minimum_iters"],
                                                             past["past_val_minimum_tokens"])],
            ["final val perplexity", _num(m.get("final_val_ppl"), 2)],
            ["HellaSwag acc_norm", _hellaswag_text(hellaswag)],
            ["unigram entropy (nats)", _num(m.get("unigram_entropy"))],
            ["peak memory", _gib(m.get("peak_mem_bytes") or None)],  # 0: not measured
            ["device", m.get("device") or "not recorded"],
            ["machine", _machine_text(machine["machine_busy"], machine["machine_busy_reason"])],
            ["training time", f"{_num(m.get('train_time_s'), 1)} s"],
            ["evaluation time", f"{_num(m.get('eval_time_s'), 1)} s"],
            ["compile/warm-up time", f"{_num(m.get('compile_time_s'), 1)} s"]]


def run_markdown(run_dir, record, preset, gates, plots, command) -> str:
    """report.md of one training run: header, final numbers, every evaluation, gates, plots, how to reproduce."""
    m, s = record.metrics, record.settings
    lines = [f"# Run report: {run_dir.name}", "",
             f"- **Status**: {record.status}" + (f" — {record.failure_reason}" if record.failure_reason else ""),
             f"- **Study**: {study_kind([record], m.get('epochs'))}",
             f"- **Preset**: {preset or 'custom'}; config snapshot `{CONFIG_NAME}`",
             "- **Model**: " + (f"{s.model.n_layer} layers × {s.model.n_head} heads × {s.model.n_embd}, block "
                                 f"{s.model.block_size}; attention {s.attention.backend}; MLP {s.mlp.kind}; seed "
                                 f"{s.general.seed}" if s else "unknown"),
             *_provenance_lines([record]),
             f"- **Report written**: {time.strftime('%Y-%m-%d %H:%M:%S')}", "", "## Numbers", ""]
    lines.append(md_table(["metric", "value"], _run_rows(m, past_minimum(m), machine_load(m),
                                                          hellaswag_columns(record.evaluation))))
    lines += ["", "## Evaluations", ""]
    if record.evals.empty:
        lines.append("No evaluation recorded.")
    else:
        lines.append(md_table(["iter", "tokens", "train s", "train loss", "val loss", "val ppl"],
                              [[int(e.iter), _si(e.tokens), _num(e.train_time_s, 1), _num(e.train_loss),
                                _num(e.val_loss), _num(e.val_ppl, 2)] for e in record.evals.itertuples()]))
    lines += _gates_and_plots(gates, plots)
    text, warning = command
    lines += ["", "## Reproduce", "", f"`{text}`"] + (["", f"Note: {warning}."] if warning else [])
    return "\n".join(lines) + "\n"
