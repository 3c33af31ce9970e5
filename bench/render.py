"""The report as text: report.md (one table per section, the ladder, the goals) and the PNG."""

import math

from gpt2.io import atomic_write_json, atomic_write_text

from .common import MODES, fmt, table_lines
from .compose import compose_lines
from .op import op_variants
from .report import GOALS, best, find


def sdpa_lines(report):
    sd = report["sdpa"]
    if not sd or not sd.get("rows"):
        return []
    base = sd["rows"][0].get("default")
    lines = ["## SDPA kernels at the folded widths", "",
             f"Causal SDPA forward+backward at B{sd['shape'][0]} H{sd['shape'][1]} T{sd['shape'][2]}, ms "
             f"(x the default kernel at q/k = v = 64); n/a = the kernel refuses the shape.", ""]
    rows = [[r["dqk"], r["dv"]] + [f"{fmt(r.get(k))} ({fmt(r[k] / base if r.get(k) and base else None, '.2f', 'x')})"
                                   for k in sd["kernels"]]
            for r in sd["rows"]]
    return lines + table_lines(["q/k dim", "v dim", *sd["kernels"]], rows) + [""]



def render_markdown(report) -> str:
    lines = [f"# Attention backends: {report['device']}", "",
             f"{report['date']}, torch {report['torch']}, CUDA {report['cuda']}, bf16 autocast. "
             f"Rank R = {report['workload']['rank']} for the low-rank / same-FLOP / unified backends; "
             f"w_std = 1, w_rec = 0.5. Op, SDPA, gate and KV timings are GPU time: kernel durations summed "
             f"by torch.profiler over 20 warmed-up calls (the host's launch overhead, which dominates eager code "
             f"at these sizes, is left out); training steps are wall clock. "
             f"Run time {report['elapsed_s']:.0f} s." + (" **Smoke run on tiny CPU sizes: numbers mean nothing.**"
                                                        if report["smoke"] else "") + merged_note(report), ""]
    lines += sdpa_lines(report)
    for key, title, what in (("op", "Attention op", "Per-head q, k, v -> y: the backend's fold and kernel "
                              "(ra-unified's fold lives in its GEMM, so its op is plain SDPA: see the step table)"),
                             ("layer", "Attention layer", "x -> out: QKV GEMM (composed for ra-unified), fold, "
                              "kernel, output projection")):
        if not report[key]:
            continue
        lines += [f"## {title}", "", what + ". eager = the module's own kernels; compiled = torch.compile with "
                  "static shapes, as the training step compiles (only where it differs from eager). ms = GPU time "
                  "(summed kernel durations); the last column is the compiled fwd+bwd by the wall clock, host "
                  "overhead included.", ""]
        rows = []
        for r in report[key]:
            cells = [r["label"], ", ".join(map(str, r["shape"]))]
            for mode in MODES:
                for part in ("fwd", "fwd_bwd"):
                    cells += [fmt(r.get(f"{mode}_{part}_ms")), fmt(r.get(f"{mode}_{part}_ratio"), ".2f", "x")]
            rows.append(cells + [fmt(r.get("compiled_fwd_bwd_wall_ms"))])
        lines += table_lines(["backend", "B, H, T, D", "eager fwd ms", "x SDPA", "eager fwd+bwd ms", "x SDPA",
                              "compiled fwd ms", "x SDPA", "compiled fwd+bwd ms", "x SDPA",
                              "compiled fwd+bwd wall ms"], rows)
        lines.append("")
    if report.get("step"):
        sw = report["step"]["workload"]
        lines += ["## Whole training step", "",
                  f"GPT-2 {sw['n_layer']}x{sw['n_embd']} ({sw['n_head']} heads), T={sw['block_size']}, batch "
                  f"{sw['batch_size']}, compile {'on' if sw['compile'] else 'off'}, fused AdamW, grad clip 1.0. "
                  f"All variants built and warmed up first, then {sw['rounds']} interleaved rounds of "
                  f"{sw['steps_per_round']} steps (each after one untimed step of the same model, so that any "
                  "cost of switching models is charged to no one); ms/step is the median round. In each round sdpa "
                  "is timed before and after every other variant; x baseline is the median over rounds of the "
                  "variant's time over the mean of those two sdpa timings (the GPU clock drifts as it warms), with "
                  "the quartiles (sdpa+again is a second, separately built baseline: its ratio shows the noise; "
                  "sdpa+fold-traffic is the baseline plus only the bytes an activation-level fold such as "
                  "ra-same-flop's must move, with no arithmetic: the floor of that design). ra-unified and "
                  "ra-same-flop run their Triton kernels (weight composition, resp. the q~/k~ fold, one kernel each "
                  "way); a +plain variant is the same backend with the kernels switched off (its torch code, "
                  "compiled by inductor).", ""]
        header = ["variant", "ms/step", "tokens/s", "x baseline", "quartiles", "warm-up (compile) s"]
        rows = []
        for name, r in report["step"]["variants"].items():
            if "skipped" in r:
                rows.append([name, f"skipped: {r['skipped']}"] + [""] * (len(header) - 2))
                continue
            rows.append([name, fmt(r.get("ms_per_step"), ".2f"), fmt(r.get("tokens_per_s"), ",.0f"),
                         fmt(r.get("ratio"), ".4f", "x"), quartiles(r), fmt(r.get("warmup_s"), ".1f")])
        lines += table_lines(header, rows)
        lines.append("")
    if report.get("step-accum"):
        lines += step_accum_lines(report["step-accum"])
    if report.get("sizes"):
        lines += size_lines(report["sizes"])
    lines += compose_lines(report.get("compose"))
    if report.get("loop"):
        lines += loop_lines(report["loop"])
    g = report["gates"]
    if g["rows"]:
        lines += gate_lines(g)
    if report["kv"]["rows"]:
        lines += kv_lines(report["kv"])
    lines += ladder_and_goal_lines(report)
    lines.append("")
    return "\n".join(lines)


def step_resolution(control):
    """How finely a whole-step median ratio resolves, from the A/A control (None without one): the larger of
    its median's distance from 1 (a bias between two builds of one model) and the standard error of a median
    of n ratios with its spread (1.2533 sigma / sqrt(n), sigma = interquartile range / 1.349 for a normal)."""
    if control.get("ratio") is None:
        return None
    n = len(control.get("round_ratios") or [])
    spread = 0.0
    if n > 1 and control.get("ratio_q1") is not None:
        spread = 1.2533 * (control["ratio_q3"] - control["ratio_q1"]) / 1.349 / math.sqrt(n)
    return max(abs(control["ratio"] - 1), spread)


def quartiles(r):
    """The per-round ratios' quartiles, "q1 - q3" (reports from before they were recorded have none)."""
    if r.get("ratio_q1") is None:
        return "n/a"
    return f"{r['ratio_q1']:.4f} - {r['ratio_q3']:.4f}"


def gate_lines(g):
    lines = ["## Gate scaling on the QKV projection", "",
              f"x (B{g['shape']['B']}, T{g['shape']['T']}, C{g['shape']['H'] * g['shape']['D']}) -> QKV with per-head "
              f"gates on the query's {g['shape']['D'] - g['shape']['R']} standard and {g['shape']['R']} reciprocal "
              "dims; forward+backward (gradients to x, W and the gates); GPU time.", ""]
    rows = [[r["label"], fmt(r["eager_fwd_bwd_ms"]), fmt(r["eager_ratio"], ".3f", "x"),
             fmt(r["compiled_fwd_bwd_ms"]), fmt(r["compiled_ratio"], ".3f", "x")] for r in g["rows"]]
    return lines + table_lines(["method", "eager fwd+bwd ms", "x GEMM only", "compiled fwd+bwd ms", "x GEMM only"],
                               rows) + [""]


def kv_lines(kv):
    lines = ["## KV-pruning key selection", "",
              f"B1, H{kv['heads']} importance vectors, keep {100 * kv['keep_ratio']:.1f}%; sampled = threshold "
              f"from a {100 * kv['sample_fraction']:.0f}% sample (at least 64), selection over all keys.", ""]
    rows = []
    for r in kv["rows"]:
        cells = [r["T"], r["sample"]]
        for mode in MODES:
            cells += [fmt(r.get(f"{mode}_exact_ms")), fmt(r.get(f"{mode}_sampled_ms")),
                      fmt(r.get(f"{mode}_speedup"), ".2f", "x")]
        rows.append(cells + [fmt(r["sampled_keep_over_k"], ".3f")])
    return lines + table_lines(["T", "sample", "eager exact ms", "eager sampled ms", "exact / sampled",
                                "compiled exact ms", "compiled sampled ms", "exact / sampled", "sampled keep / k"],
                               rows) + [""]


def ladder_and_goal_lines(report):
    lines = ["## The original study's optimisation ladder", "",
              "Their figures were measured on a smaller GPU; ours on this one (op: attention op fwd+bwd at the "
              "first shape, x SDPA, compiled where measured (ra-reference: eager); step: whole training step, "
              "x baseline).", ""]
    lines += table_lines(["rung", "original", "our backend", "ours"],
                         [[row["rung"], f"{row['original']}x", f"{row['backend']} ({row['kind']})",
                           fmt(row["ours"], ".2f", "x")] for row in report["ladder"]])
    lines += ["", "## Goals", ""]
    step_variants = (report.get("step") or {}).get("variants") or {}
    control = step_variants.get("sdpa+again", {})
    noise = step_resolution(control)
    rows = []
    for name, v in report["goals"].items():
        verdict = "not measured" if v["met"] is None else ("met" if v["met"] else "missed")
        near = noise is not None and v["met"] is not None and abs(v["value"] - v["goal"]) < noise
        if near and "whole step" in name:  # the step section's goals, which the A/A control speaks for
            verdict += " (within the A/A noise)"
        rows.append([name, fmt(v["value"], ".3f"), verdict])
    lines += table_lines(["goal", "measured", "verdict"], rows)
    if noise is not None:
        lines += ["", f"Resolution of the whole-step ratios: the A/A control (sdpa+again, a second baseline model) "
                      f"measured {control['ratio']:.4f}x (quartiles {quartiles(control)}) in the same run, so a "
                      f"median ratio resolves about +-{100 * noise:.2f}% (the larger of the control's distance from 1 "
                      "and the standard error of a median of that spread). A whole-step verdict closer to its limit "
                      "than that is within the measurement's noise."]
    floor = step_variants.get("sdpa+fold-traffic", {})
    if floor.get("ratio") is not None:
        lines += ["", f"Floor of an activation-level fold: sdpa+fold-traffic (the baseline plus the fold's memory "
                      f"traffic, no arithmetic) measured {floor['ratio']:.4f}x (quartiles {quartiles(floor)}). "
                      "That is what the fold's bytes alone cost with ra-same-flop's tiles and launches: better "
                      "arithmetic in its fold kernels cannot take it below that line."]
    if report["errors"]:
        lines += ["", "## Failures", ""]
        for e in report["errors"]:
            lines.append(f"- {e['label']}: `{e['error'][:300]}`")
    return lines


def render_png(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    shapes = report["workload"]["op_shapes"]
    labels = [label for label, _, _ in op_variants()]
    width = 0.8 / max(len(shapes), 1)
    for i, shape in enumerate(shapes):
        vals = [best(find(report["op"], lab, shape[2]), "fwd_bwd_ratio") or 0 for lab in labels]
        axes[0].bar([x + i * width for x in range(len(labels))], vals, width, label=f"B{shape[0]} T{shape[2]}")
    axes[0].axhline(1.0, color="k", lw=0.8)
    axes[0].set_xticks([x + width * (len(shapes) - 1) / 2 for x in range(len(labels))])
    axes[0].set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    axes[0].set_ylabel("attention op fwd+bwd (compiled), x SDPA")
    axes[0].set_yscale("log")
    axes[0].legend()
    step = report["step"]["variants"] if report.get("step") else {}
    names = [n for n, r in step.items() if r.get("ratio")]
    axes[1].bar(names, [step[n]["ratio"] for n in names])
    axes[1].axhline(1.0, color="k", lw=0.8)
    axes[1].axhline(GOALS["step_unified"], color="r", lw=0.8, ls="--", label="goal 1.005x")
    if names:
        lo = min(step[n]["ratio"] for n in names)
        axes[1].set_ylim(min(0.98, lo - 0.01), max(step[n]["ratio"] for n in names) + 0.02)
    axes[1].set_ylabel("training step, x baseline")
    axes[1].tick_params(axis="x", rotation=30)
    axes[1].legend()
    fig.suptitle(f"Attention backends on {report['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)



def merged_note(report) -> str:
    """' Merged report: ...' when the sections come from more than one run (--sections), else ''."""
    by_date = {}
    for name, run in report.get("section_runs", {}).items():
        if name == "sizes" and len({b.get("date") for b in report.get("sizes") or []}) > 1:
            name = "sizes (each row names the run that measured it)"  # a run may re-measure some blocks only
        by_date.setdefault((run["date"], run.get("run_elapsed_s")), []).append(name)
    if len(by_date) < 2:
        return ""
    parts = [f"{', '.join(names)} from the run of {date} ({fmt(elapsed, '.0f')} s)"
             for (date, elapsed), names in sorted(by_date.items(), key=lambda item: item[0][0], reverse=True)]
    return " Merged report: " + "; ".join(parts) + "."


def size_lines(sizes):
    """The sizes section: one table, a row per size x compile mode x variant, with the block's A/A resolution
    (step_resolution of its sdpa+again) and, when blocks were measured by different runs, their dates."""
    dated = len({b.get("date") for b in sizes}) > 1
    lines = ["## Whole training step at every preset size", "",
             "As the whole-step table (bracketed, interleaved rounds, median with quartiles), for each model size a "
             "preset trains, compiled by default and with CUDA graphs (mode reduce-overhead). sdpa+again is the "
             "A/A control; its resolution (the larger of its median's distance from 1 and the standard error of "
             "its median) is how finely the other ratios of its block are resolved.", ""]
    header = ["size", "compile mode", "variant", "ms/step", "tokens/s", "x baseline", "quartiles",
              "A/A resolution", "warm-up s"] + (["measured"] if dated else [])
    rows = []
    for block in sizes:
        control = block["variants"].get("sdpa+again", {})
        resolution = step_resolution(control) if control.get("rounds_ms") else None
        when = [block.get("date") or "n/a"] if dated else []
        for name, r in block["variants"].items():
            head = [block["size"], block["mode"], name]
            if "skipped" in r or not r.get("rounds_ms"):
                rows.append(head + [f"not measured: {r.get('skipped', 'failed')}"] + [""] * 5 + when)
                continue
            rows.append(head + [fmt(r.get("ms_per_step"), ".2f"), fmt(r.get("tokens_per_s"), ",.0f"),
                                fmt(r.get("ratio"), ".4f", "x"), quartiles(r),
                                fmt(resolution, ".4f") if name != "sdpa" else "",
                                fmt(r.get("warmup_s"), ".1f")] + when)
    return lines + table_lines(header, rows) + [""]


def loop_lines(loop):
    """The loop section: each preset step's real cell step, against the preset's first step."""
    lw, base = loop["workload"], loop["baseline"]
    if "n_layer" not in lw:
        return ["## A matrix cell's own step", "", f"Preset {lw['preset']}: no cell could be built (see the "
                "failures).", ""]
    lines = ["## A matrix cell's own step", "",
             f"Preset {lw['preset']}: GPT-2 {lw['n_layer']}x{lw['n_embd']} ({lw['n_head']} heads), "
             f"T={lw['block_size']}, "
             f"batch {lw['batch_size']} x {lw['grad_accum']} micro-batches, dropout {lw['dropout']}, "
             f"{lw['precision']}, compile {'on' if lw['compile'] else 'off'}, on {lw['device']}. Each variant is the "
             "Run a matrix cell of that step builds for seed 1 (its .config written and validated as the planner "
             "writes it; Run.setup(): data, model, optimizer, compile) and one timing is run.step(run.batches), "
             "the trainer's optimizer step with its batch copied from pinned host memory. "
             f"{lw['rounds']} interleaved rounds of {lw['steps_per_round']} steps, each variant bracketed by {base}; "
             f"x {base} is the median of the bracketed ratios, with quartiles; {base}+again, a second build of "
             f"{base}, is the A/A control. Kernel ms is the GPU time of one step (summed kernel durations): "
             "ms/step above it is time the GPU waited for the host.", ""]
    header = ["step", "ms/step", "kernel ms/step", "tokens/s", f"x {base}", "quartiles", "warm-up s"]
    rows = []
    for name, r in loop["variants"].items():
        if "skipped" in r or not r.get("rounds_ms"):
            rows.append([name, f"not measured: {r.get('skipped', 'failed')}"] + [""] * (len(header) - 2))
            continue
        rows.append([name, fmt(r.get("ms_per_step"), ".2f"), fmt(r.get("kernel_ms"), ".2f"),
                     fmt(r.get("tokens_per_s"), ",.0f"), fmt(r.get("ratio"), ".4f", "x"), quartiles(r),
                     fmt(r.get("warmup_s"), ".1f")])
    return lines + table_lines(header, rows) + [""]


def step_accum_lines(sa):
    sw = sa["workload"]
    tokens = sw["accum"] * sw["batch_size"] * sw["block_size"]
    lines = ["## Whole optimizer step with gradient accumulation", "",
             f"The trainer's own step (gpt2.train.step.TrainStep): GPT-2 {sw['n_layer']}x{sw['n_embd']} ({sw['n_head']} "
             f"heads), T={sw['block_size']}, micro-batch {sw['batch_size']}, {sw['accum']} micro-batches per optimizer "
             f"step ({tokens:,} tokens), compile {'on' if sw['compile'] else 'off'}, bf16 autocast, fused AdamW, grad "
             "clip 1.0. ra-unified composes its QKV weight once per optimizer step (cached composition, as "
             "single-process training does; under DDP it composes per micro-step). All variants built and warmed "
             f"up first, then {sw['rounds']} interleaved rounds of {sw['steps_per_round']} optimizer steps; median "
             "round; x baseline as in the step section (each timing over the sdpa timings around it).", ""]
    header = ["variant", "ms/optimizer step", "ms/micro-step", "tokens/s", "x baseline", "quartiles",
              "cached composition", "warm-up (compile) s"]
    rows = []
    for name, r in sa["variants"].items():
        if "skipped" in r:
            rows.append([name, f"skipped: {r['skipped']}"] + [""] * (len(header) - 2))
            continue
        ms = r.get("ms_per_step")
        cached = {True: "yes", False: "no"}.get(r.get("cached_composition"), "n/a")
        rows.append([name, fmt(ms, ".2f"), fmt(ms / sw["accum"] if ms else None, ".2f"),
                     fmt(r.get("tokens_per_s"), ",.0f"), fmt(r.get("ratio"), ".4f", "x"), quartiles(r), cached,
                     fmt(r.get("warmup_s"), ".1f")])
    return lines + table_lines(header, rows) + [""]


def write_report(report, stem, png):
    atomic_write_json(stem.with_suffix(".json"), report)
    atomic_write_text(stem.with_suffix(".md"), render_markdown(report))
    if png:
        try:
            render_png(report, stem.with_suffix(".png"))
        except Exception as exc:  # noqa: BLE001 - the plot is a convenience; the tables are the result
            print(f"plot failed: {exc}")

