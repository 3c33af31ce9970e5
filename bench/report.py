"""The report as data: goal verdicts, the original study's ladder, and merging a partial run (--sections)
into the report already on disk."""

import json
import re
from pathlib import Path

from .common import FAST_RA, MODES
from .step import BASELINE

GOALS = {
    "step_unified": 1.005, "step_same_flop": 1.005,   # whole step, x baseline
    "op_fold_full_t4096": 1.6,                        # attention op fwd+bwd at T4096, x SDPA
    "disc_overhead": 1.05,                            # discoverability vs the same backend without it
    "kv_sampled_speedup_16k": 5.0,                    # exact / sampled selection time at T=16K
    "routing_slack": 1.05,                            # routed k of H heads vs the head-weighted mix of the paths
    "sizes_unified_q3": 1.01,                         # ra-unified's upper quartile x sdpa at every preset size
    "loop_steps_share": 0.99,                         # a matrix cell's steps in a matched time, x its baseline's
}
ROUTED = re.compile(r"^(?P<backend>.+), (?P<k>\d+)/(?P<H>\d+) heads routed$")

# The original study's optimisation ladder (their figures, measured on a smaller GPU), and which of our
# numbers answers each rung.
LADDER = [
    ("open-coded RA", 4.6, "ra-reference", "op"),
    ("Triton full-rank RA kernel", 2.43, "ra-fold-full", "op"),
    ("folded low-rank RA", 1.89, "ra-fold-lowrank", "op"),
    ("same-FLOP RA", 1.35, "ra-same-flop", "op"),
    ('"unified" RA (whole step)', 1.0, "ra-unified", "step"),
]


# Sections of the report (keys of the JSON) in the order they run; "layer" (whole attention modules) and "compose"
# (ra-unified's composition kernels per launch setting) are on request only.
SECTIONS = ["sdpa", "op", "layer", "gates", "kv", "step", "step-accum", "sizes", "compose", "loop"]
DEFAULT_SECTIONS = ["sdpa", "op", "gates", "kv", "step", "step-accum", "sizes", "loop"]


def empty_sections() -> dict:
    return {"sdpa": None, "op": [], "layer": [], "gates": {"shape": {}, "rows": []}, "kv": {"rows": []},
            "step": None, "step-accum": None, "sizes": [], "compose": None, "loop": None}


def has_data(report, name) -> bool:
    value = report.get(name)
    if isinstance(value, dict) and "rows" in value:
        return bool(value["rows"])
    return bool(value)


def error_section(error) -> str:
    """The section a recorded failure belongs to (older reports lack the tag: read the label)."""
    if error.get("section"):
        return error["section"]
    first = error["label"].split()[0]
    return "step" if first == "profile" else first


def find(rows, label, T):
    for r in rows:
        if r["label"] == label and r["shape"][2] == T:
            return r
    return None


def best(row, key):
    """The compiled measurement when there is one (what training runs), else the eager one."""
    if not row:
        return None
    value = row.get(f"compiled_{key}")
    return value if value is not None else row.get(f"eager_{key}")


def routing_goals(rows, section, verdict) -> dict:
    """Head-selective routing pays for itself: with k of H heads on an RA path that costs r x SDPA when every
    head takes it, the compiled fwd+bwd may cost at most ((H - k) + k r) / H x routing_slack (issue 17)."""
    goals = {}
    for row in rows:
        m = ROUTED.match(row["label"])
        if not m:
            continue
        k, H, T = int(m["k"]), int(m["H"]), row["shape"][2]
        whole = best(find(rows, m["backend"], T), "fwd_bwd_ratio")
        limit = None if whole is None else ((H - k) + k * whole) / H * GOALS["routing_slack"]
        result = verdict(best(row, "fwd_bwd_ratio"), limit)
        bound = "n/a" if limit is None else f"{limit:.2f}x"
        goals[f"{row['label']} ({section} fwd+bwd, B{row['shape'][0]} T{T}) <= {bound} (head-weighted mix of "
              f"{m['backend']} and SDPA + 5%)"] = result
    return goals


def evaluate_goals(report):
    step = report["step"]["variants"] if report.get("step") else {}
    op = report["op"]
    goals = {}

    def verdict(value, limit, greater=False):
        if value is None or limit is None:  # not measured, or (routing) the limit's own row not measured
            return {"value": value, "goal": limit, "met": None}
        return {"value": value, "goal": limit, "met": value >= limit if greater else value <= limit}

    goals["ra-unified whole step <= 1.005x"] = verdict(step.get("ra-unified", {}).get("ratio"), GOALS["step_unified"])
    accum = (report.get("step-accum") or {}).get("variants", {})
    goals["ra-unified whole optimizer step <= 1.005x (grad accum, cached composition)"] = verdict(
        accum.get("ra-unified", {}).get("ratio"), GOALS["step_unified"])
    goals["ra-same-flop whole step <= 1.005x"] = verdict(step.get("ra-same-flop", {}).get("ratio"),
                                                         GOALS["step_same_flop"])
    T_long = max(s[2] for s in report["workload"]["op_shapes"])
    ff = find(op, "ra-fold-full", T_long)
    goals[f"ra-fold-full op fwd+bwd at T{T_long} <= 1.6x SDPA (compiled)"] = verdict(
        best(ff, "fwd_bwd_ratio"), GOALS["op_fold_full_t4096"])
    worst = None
    for b in FAST_RA:
        with_d, without = best(find(op, f"{b}+disc", T_long), "fwd_bwd_ms"), best(find(op, b, T_long), "fwd_bwd_ms")
        if with_d and without:
            worst = max(worst or 0, with_d / without)
    goals[f"discoverability adds <= 5% (worst compiled op fwd+bwd at T{T_long})"] = verdict(
        worst, GOALS["disc_overhead"])
    if step.get("ra-unified+disc", {}).get("ms_per_step") and step.get("ra-unified", {}).get("ms_per_step"):
        goals["discoverability adds <= 5% (ra-unified whole step)"] = verdict(
            step["ra-unified+disc"]["ms_per_step"] / step["ra-unified"]["ms_per_step"], GOALS["disc_overhead"])
    for section in ("op", "layer"):
        goals.update(routing_goals(report.get(section) or [], section, verdict))
    for block in report.get("sizes") or []:  # issue 17 goal 1: the upper quartile, at every size a preset trains
        q3 = block["variants"].get("ra-unified", {}).get("ratio_q3")
        goals[f"ra-unified at {block['size']} ({block['mode']} compile): upper quartile <= "
              f"{GOALS['sizes_unified_q3']}x sdpa"] = verdict(q3, GOALS["sizes_unified_q3"])
    loop = report.get("loop") or {}
    for name, r in (loop.get("variants") or {}).items():  # a cell's steps in its time budget: 1 / (x baseline)
        if name != loop.get("baseline") and "+again" not in name and "@" not in name:
            goals[f"{loop['workload']['preset']} {name} makes >= {GOALS['loop_steps_share']:.0%} of "
                  f"{loop['baseline']}'s steps in a matched time (a cell's own step)"] = verdict(
                1 / r["ratio"] if r.get("ratio") else None, GOALS["loop_steps_share"], greater=True)
    kv16 = next((r for r in report["kv"]["rows"] if r["T"] == 16384), None) if report.get("kv") else None
    speedups = [kv16.get(f"{mode}_speedup") for mode in MODES] if kv16 else []
    speedups = [x for x in speedups if x is not None]
    goals["sampled KV selection >= 5x exact at T=16K (better of eager / compiled)"] = verdict(
        max(speedups) if speedups else None, GOALS["kv_sampled_speedup_16k"], greater=True)
    return goals



def finalize(report, bench, w, kept_errors=()):
    """Ladder, goals, failures (kept_errors: those of sections merged from an earlier run) and run time."""
    T0 = w["op_shapes"][0][2]
    report["ladder"] = []
    for rung, original, backend, kind in LADDER:
        if kind == "op":
            ours = best(find(report["op"], backend, T0), "fwd_bwd_ratio")
        else:
            ours = (report["step"] or {}).get("variants", {}).get(backend, {}).get("ratio")
        report["ladder"].append({"rung": rung, "original": original, "backend": backend, "kind": kind, "ours": ours})
    report["goals"] = evaluate_goals(report)
    report["errors"] = list(kept_errors) + bench.errors
    report["elapsed_s"] = bench.elapsed_s()
    for run in report.get("section_runs", {}).values():
        if run["date"] == report["date"]:
            run["run_elapsed_s"] = report["elapsed_s"]


def earlier_report(json_path: Path, report):
    """The report at json_path when it was measured on the same device (and smoke flag) as `report`, else
    None (said when it exists but is another device's)."""
    if not json_path.exists():
        return None
    earlier = json.loads(json_path.read_text())
    if (earlier.get("device"), earlier.get("smoke")) != (report["device"], report["smoke"]):
        print(f"{json_path} is from {earlier.get('device')} (smoke {earlier.get('smoke')}): not merged")
        return None
    return earlier


def merge_earlier(report, json_path: Path, sections) -> list:
    """Copy into `report` every section of the earlier report at json_path that this run does not measure
    (same device and smoke flag only), with when it was measured; returns the earlier failures of those
    sections. The sections this run measures replace theirs when they finish."""
    earlier = earlier_report(json_path, report)
    if earlier is None:
        return []
    runs = earlier.get("section_runs") or {name: {"date": earlier["date"], "run_elapsed_s": earlier.get("elapsed_s")}
                                            for name in SECTIONS if has_data(earlier, name)}
    for name in SECTIONS:
        if name not in sections and has_data(earlier, name):
            report[name] = earlier[name]
            if name in runs:
                report["section_runs"][name] = runs[name]
    return [e for e in earlier.get("errors", []) if error_section(e) not in sections]


def sizes_section_run(blocks, this_run: dict, earlier: dict) -> dict | None:
    """section_runs' entry for the sizes section after a run measured it: this run's when one of its blocks is in
    the section, else the earlier report's (every block this run tried was skipped: it measured none of them)."""
    if any(b.get("date") == this_run["date"] for b in blocks):
        return this_run
    return (earlier.get("section_runs") or {}).get("sizes")


def keep_earlier_sizes(blocks, earlier: dict, date) -> list:
    """The sizes section after a run that measured only some (size, compile mode) blocks (--sizes,
    --compile-modes): the new blocks, dated, and every block of the earlier report's section (same device,
    already merged by merge_earlier's rules) that was not re-measured, with the date it was measured.
    A new block that measured no ratio (every variant skipped, e.g. for the time budget) does not replace an
    earlier one that did."""
    def measured(block):
        return any(v.get("ratio") is not None and name != BASELINE for name, v in block["variants"].items())

    earlier_blocks = {(b["size"], b["mode"]): b for b in earlier.get("sizes") or []}
    blocks = [b for b in blocks if measured(b) or not measured(earlier_blocks.get((b["size"], b["mode"]),
                                                                                  {"variants": {}}))]
    fresh = {(b["size"], b["mode"]) for b in blocks}
    earlier_date = (earlier.get("section_runs") or {}).get("sizes", {}).get("date", earlier.get("date"))
    kept = [{**b, "date": b.get("date", earlier_date)} for b in earlier_blocks.values()
            if (b["size"], b["mode"]) not in fresh]
    return kept + [{**b, "date": date} for b in blocks]
