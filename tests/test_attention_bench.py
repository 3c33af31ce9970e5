"""scripts/bench_attention.py: the CPU skip path and the --smoke code path (every measurement once)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "scripts" / "bench_attention.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU skip path")
def test_skips_cleanly_without_a_gpu(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "scripts.bench_attention", "--out-dir", str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    assert "skipping" in proc.stdout
    assert not list(tmp_path.iterdir())


def test_smoke_run_writes_the_report(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "scripts.bench_attention", "--smoke", "--out-dir", str(tmp_path)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "attention-cpu-smoke.json").read_text())
    assert report["errors"] == [], report["errors"]
    labels = {r["label"] for r in report["op"]}
    assert {"sdpa", "ra-reference", "ra-fold-full", "ra-fold-lowrank", "ra-same-flop", "ra-unified"} <= labels
    assert all(r["eager_fwd_bwd_ms"] is not None for r in report["op"])
    compiled = {r["label"] for r in report["op"] if r.get("compiled_fwd_bwd_ms") is not None}
    assert {"sdpa", "ra-fold-full", "ra-same-flop", "ra-fold-full+disc"} <= compiled
    assert set(report["step"]["variants"]) >= {"sdpa", "ra-unified", "ra-same-flop"}
    assert all(r["eager_sampled_ms"] is not None for r in report["kv"]["rows"])
    md = (tmp_path / "attention-cpu-smoke.md").read_text()
    for heading in ("## SDPA kernels", "## Attention op", "## Whole training step", "## Gate scaling", "## KV-pruning",
                    "## Whole optimizer step with gradient accumulation", "original study's optimisation ladder",
                    "## Goals", "Resolution of the whole-step ratios: the A/A control"):
        assert heading in md
    assert report["step"]["variants"]["sdpa+again"]["ratio"] is not None
    accum = report["step-accum"]
    assert accum["workload"]["accum"] == 8 and set(accum["variants"]) == {"sdpa", "ra-unified", "ra-same-flop"}
    assert accum["variants"]["ra-unified"]["cached_composition"] is True
    assert all(r["ratio"] is not None for r in accum["variants"].values())
    assert "ra-unified whole optimizer step <= 1.005x (grad accum, cached composition)" in report["goals"]
    assert "ra-unified whole step <= 1.005x" in report["goals"]  # the per-micro-step goal stays
    assert (tmp_path / "attention-cpu-smoke.png").stat().st_size > 0
    # The loop section built real cells of the CPU preset (V0, V1 and the A/A control) and timed their steps.
    loop = report["loop"]
    assert loop["workload"]["preset"] == "cpu-tiny-run" and loop["baseline"] == "V0"
    assert list(loop["variants"]) == ["V0", "V1", "V0+again"]
    assert all(r["ratio"] is not None and r["kernel_ms"] > 0 for r in loop["variants"].values())
    assert "## A matrix cell's own step" in md and "Preset cpu-tiny-run" in md

    # --sections re-measures only those and keeps the rest of the saved report.
    proc = subprocess.run([sys.executable, "-m", "scripts.bench_attention", "--smoke", "--sections", "step-accum,kv", "--accum", "2",
                           "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "step: build" not in proc.stdout and "step-accum: build" in proc.stdout
    merged = json.loads((tmp_path / "attention-cpu-smoke.json").read_text())
    for kept in ("sdpa", "op", "gates", "step", "loop", "sizes"):
        assert merged[kept] == report[kept], kept
        assert merged["section_runs"][kept] == report["section_runs"][kept]
    assert merged["step-accum"]["workload"]["accum"] == 2
    assert merged["section_runs"]["kv"]["date"] == merged["date"] != report["date"]
    md = (tmp_path / "attention-cpu-smoke.md").read_text()
    assert "## Whole training step" in md and "## SDPA kernels" in md and "Merged report: " in md
    assert "8 micro-batches" not in md and "2 micro-batches per optimizer step" in md


def test_each_variant_is_timed_between_two_baseline_timings():
    from bench.step import bracket_sequence, bracketed_ratios

    variants = ["sdpa", "a", "b", "c"]
    assert bracket_sequence(variants, 0) == ["sdpa", "a", "sdpa", "b", "sdpa", "c", "sdpa"]
    assert bracket_sequence(variants, 1) == ["sdpa", "b", "sdpa", "c", "sdpa", "a", "sdpa"]
    assert bracket_sequence(variants, 3) == bracket_sequence(variants, 0)
    assert bracket_sequence(["a", "b"], 1) == ["b", "a"]  # no baseline: no brackets, no ratios
    assert bracketed_ratios(["b", "a"], [1.0, 2.0]) == []

    # A baseline drifting 10 -> 12 ms over the round: a variant 5% slower than its neighbours reads 1.05.
    sequence = bracket_sequence(variants, 0)
    times = [10.0, 10.5 * 1.05, 11.0, 11.5, 12.0, None, 12.0]  # b costs what sdpa costs; c's timing failed
    ratios = dict(bracketed_ratios(sequence, times))
    assert set(ratios) == {"a", "b"}
    assert ratios["a"] == pytest.approx(1.05) and ratios["b"] == pytest.approx(1.0)
    times[2] = None  # a failed baseline timing takes the ratios on both sides with it
    assert bracketed_ratios(sequence, times) == []


def test_a_whole_step_verdict_inside_the_a_a_noise_says_so():
    from bench.render import ladder_and_goal_lines

    def goal(value, limit=1.005):
        return {"value": value, "goal": limit, "met": value <= limit}

    report = {"ladder": [], "errors": [], "step": {"variants": {"sdpa+again": {"ratio": 0.992, "ratio_q1": 0.98,
                                                                              "ratio_q3": 1.0}}},
              "goals": {"ra-unified whole step <= 1.005x": goal(1.001),
                        "ra-same-flop whole step <= 1.005x": goal(1.059),
                        "ra-unified whole optimizer step <= 1.005x (grad accum)": goal(1.001)}}
    lines = ladder_and_goal_lines(report)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines if line.startswith("| ra-")}
    assert rows["ra-unified whole step <= 1.005x"].endswith("| met (within the A/A noise) |")
    assert rows["ra-same-flop whole step <= 1.005x"].endswith("| missed |")
    assert rows["ra-unified whole optimizer step <= 1.005x (grad accum)"].endswith("| met |")  # no control there
    report["step"]["variants"] = {}
    assert not any("A/A" in line for line in ladder_and_goal_lines(report))


def test_the_resolution_counts_the_a_a_spread_not_only_its_median():
    """A control whose median sits at 1 but whose rounds scatter still leaves a verdict near its limit unresolved:
    the standard error of a median of 16 ratios with quartiles 0.98-1.02 is 1.2533 * 0.04/1.349 / 4 = 0.93%."""
    from bench.render import ladder_and_goal_lines, step_resolution

    control = {"ratio": 1.0003, "ratio_q1": 0.98, "ratio_q3": 1.02, "round_ratios": [1.0] * 16}
    assert abs(step_resolution(control) - 0.0093) < 1e-4
    assert step_resolution({**control, "ratio": 0.98}) == pytest.approx(0.02)  # a bias beyond the spread
    assert step_resolution({"ratio": 0.999, "ratio_q1": 0.999, "ratio_q3": 0.999, "round_ratios": [0.999]}) == \
        pytest.approx(0.001)  # one round: no spread to count
    report = {"ladder": [], "errors": [], "step": {"variants": {"sdpa+again": control}},
              "goals": {"ra-unified whole step <= 1.005x": {"value": 1.002, "goal": 1.005, "met": True}}}
    lines = ladder_and_goal_lines(report)
    assert any(line.endswith("| met (within the A/A noise) |") for line in lines)
    assert any("resolves about +-0.93%" in line for line in lines)


def test_a_partial_sizes_run_keeps_the_blocks_it_did_not_measure():
    from bench.report import keep_earlier_sizes

    def block(size, mode, ms):
        return {"size": size, "mode": mode, "variants": {"sdpa": {"ms_per_step": ms}}}

    earlier = {"date": "d1", "sizes": [block("mini", "default", 1.0), block("350M", "default", 3.0)]}
    merged = keep_earlier_sizes([block("350M", "default", 4.0)], earlier, "d2")
    assert [(b["size"], b["date"], b["variants"]["sdpa"]["ms_per_step"]) for b in merged] == \
        [("mini", "d1", 1.0), ("350M", "d2", 4.0)]
    assert keep_earlier_sizes([block("mini", "default", 2.0)], {}, "d3") == [{**block("mini", "default", 2.0),
                                                                             "date": "d3"}]


def test_a_sizes_block_the_time_budget_skipped_keeps_the_earlier_measurement():
    """A run whose budget ran out before a block's variants (every ratio skipped) left the report with "not
    measured" where an earlier run had measured that block."""
    from bench.report import keep_earlier_sizes

    measured = {"size": "mini", "mode": "reduce-overhead", "variants": {"sdpa": {"ratio": 1.0},
                                                                      "ra-unified": {"ratio": 1.0053}}}
    skipped = {"size": "mini", "mode": "reduce-overhead", "variants": {
        "sdpa": {"ratio": 1.0}, "ra-unified": {"ratio": None, "skipped": "time budget (103 s left)"}}}
    fresh = {"size": "mini", "mode": "default", "variants": {"sdpa": {"ratio": 1.0}, "ra-unified": {"ratio": 1.02}}}
    merged = keep_earlier_sizes([fresh, skipped], {"date": "d1", "sizes": [measured]}, "d2")
    assert [(b["mode"], b["date"], b["variants"]["ra-unified"]["ratio"]) for b in merged] == \
        [("reduce-overhead", "d1", 1.0053), ("default", "d2", 1.02)]
    # With nothing measured before, the skipped block is what the report has to say.
    assert keep_earlier_sizes([skipped], {"date": "d1", "sizes": []}, "d2") == [{**skipped, "date": "d2"}]


def test_routing_is_judged_against_the_head_weighted_mix_of_its_two_paths():
    # Issue 17's example: 3 of 12 heads on a path that costs 1.46x for all heads -> at most 1.17x.
    from bench.report import evaluate_goals

    def row(label, ratio, T=4096):
        return {"label": label, "shape": [2, 12, T, 64], "compiled_fwd_bwd_ratio": ratio}

    rows = [row("sdpa", 1.0), row("ra-fold-full", 1.46), row("ra-fold-full, 3/12 heads routed", 1.16),
            row("ra-fold-lowrank", 1.5), row("ra-fold-lowrank, 6/12 heads routed", 1.40)]
    report = {"step": None, "op": [], "layer": rows, "kv": {"rows": []}, "workload": {"op_shapes": [[2, 12, 4096, 64]]}}
    goals = {name: v for name, v in evaluate_goals(report).items() if "routed" in name}
    full = next(v for name, v in goals.items() if name.startswith("ra-fold-full, 3/12"))
    assert full["goal"] == pytest.approx((9 + 3 * 1.46) / 12 * 1.05) and full["met"] is True
    assert "<= 1.17x" in next(name for name in goals if name.startswith("ra-fold-full, 3/12"))
    lowrank = next(v for name, v in goals.items() if name.startswith("ra-fold-lowrank, 6/12"))
    assert lowrank["goal"] == pytest.approx((6 + 6 * 1.5) / 12 * 1.05) and lowrank["met"] is False


def test_a_routed_row_without_its_all_heads_row_has_no_verdict():
    """`--op-variants` may measure a routed row without the backend's all-heads row, which sets its limit: the
    goal is then unjudged (it used to raise comparing a ratio with None, and the run lost its report)."""
    from bench.report import evaluate_goals

    routed = {"label": "ra-fold-full, 6/12 heads routed", "shape": [8, 12, 1024, 64], "compiled_fwd_bwd_ratio": 1.49}
    report = {"step": None, "op": [], "layer": [routed], "workload": {"op_shapes": [[8, 12, 1024, 64]]},
              "kv": {"rows": []}}

    def routing_goal():
        [goal] = [g for name, g in evaluate_goals(report).items() if "routed (layer" in name]
        return goal

    assert routing_goal() == {"value": 1.49, "goal": None, "met": None}
    report["layer"].append({"label": "ra-fold-full", "shape": [8, 12, 1024, 64], "compiled_fwd_bwd_ratio": 1.43})
    judged = routing_goal()
    assert judged["goal"] == pytest.approx((6 + 6 * 1.43) / 12 * 1.05) and judged["met"] is False


def test_a_sizes_run_that_measured_nothing_does_not_claim_the_section():
    """A --sections sizes run whose every block the time budget skipped kept the earlier blocks, yet the report's
    header said the sizes section came from it ("sizes from the run of <now> (4 s)"), a run that measured none
    of its rows."""
    from bench.render import merged_note
    from bench.report import keep_earlier_sizes, sizes_section_run

    measured = {"size": "350M", "mode": "default", "variants": {"sdpa": {"ratio": 1.0}, "ra-unified": {"ratio": 1.01}}}
    skipped = {"size": "mini", "mode": "reduce-overhead", "variants": {
        "sdpa": {"ratio": None, "skipped": "time budget"}, "ra-unified": {"ratio": None, "skipped": "time budget"}}}
    earlier_run = {"date": "d1", "section_s": 367.0, "run_elapsed_s": 367.0}
    mini = {**measured, "size": "mini", "mode": "reduce-overhead"}
    earlier = {"date": "d1", "sizes": [measured, mini], "section_runs": {"sizes": earlier_run}}
    blocks = keep_earlier_sizes([skipped], earlier, "d2")
    assert [(b["size"], b["date"]) for b in blocks] == [("350M", "d1"), ("mini", "d1")]
    this_run = {"date": "d2", "section_s": 4.0}
    assert sizes_section_run(blocks, this_run, earlier) == earlier_run
    # A run that measured a block does claim the section; its rows carry their dates.
    fresh = {**measured, "size": "124M"}
    assert sizes_section_run(keep_earlier_sizes([fresh], earlier, "d2"), this_run, earlier) == this_run

    report = {"section_runs": {"sizes": earlier_run, "compose": {"date": "d0", "run_elapsed_s": 54.0}},
              "sizes": blocks}
    note = merged_note(report)
    assert "sizes from the run of d1 (367 s)" in note and "d2" not in note
    report["sizes"] = blocks + [{**fresh, "date": "d0"}]
    assert "sizes (each row names the run that measured it) from the run of d1" in merged_note(report)


def test_timed_rounds_run_with_the_compiled_heap_frozen():
    """build_and_time times its rounds as the trainer runs its steps after warm-up: long-lived objects frozen out
    of the cyclic collector (a collection mid-round would be charged to one variant), and unfrozen afterwards."""
    import gc

    from bench.common import Bench
    from bench.step import build_and_time

    gc.unfreeze()
    seen = {"build": [], "timed": []}

    def build(variant):
        seen["build"].append(gc.get_freeze_count())
        return lambda: seen["timed"].append(gc.get_freeze_count())

    bench = Bench(torch.device("cpu"), smoke=True, budget_s=600)
    results, built = build_and_time(bench, {"compile": False}, ["sdpa", "ra-unified"], build, "test", warmup=1,
                                    rounds=2, steps=2)
    assert set(built) == {"sdpa", "ra-unified"} and len(results["ra-unified"]["round_ratios"]) == 2
    assert seen["build"] == [0, 0]
    assert seen["timed"] and all(count > 0 for count in seen["timed"][2:])  # the first two: warm-up, in build
    assert gc.get_freeze_count() == 0
