#!/usr/bin/env python
"""Attention-backend benchmark: every backend against SDPA on one GPU, side by side in one process.

    python -m scripts.bench_attention [--out-dir results/bench] [--budget-s 600]
    python -m scripts.bench_attention --sections step-accum,kv       # re-measure two sections, merge the rest
    python -m scripts.bench_attention --smoke --out-dir /tmp/bench   # tiny CPU sizes, every function once

Sections (bf16 autocast; default: all but layer and compose; --sections picks others):
  sdpa        which SDPA kernel (default / flash / efficient / cuDNN) takes the widths the folds produce
  op          attention proper, per-head q, k, v -> y (the backend's fold + kernel), forward and
              forward+backward, at (B8, H12, T1024, D64) and (B2, H12, T4096, D64); also with discoverability
              and with half the heads routed to the plain path; eager and torch.compile'd (static shapes)
  layer       (on request) the whole attention module x -> out, same shapes
  gates       gate-scaling micro-benchmark on the QKV projection: split/scale/cat vs one scale tensor vs
              gates composed into the weight
  kv          KV-pruning key selection, exact top-k vs sampled threshold, T = 1K ... 128K (B1, H12, keep 38.2%)
  step        GPT-2 124M training step (torch.compile, fused AdamW, grad clip, T=1024, batch 16) per backend,
              as a ratio to the baseline; all models built first, then timed in interleaved rounds
  step-accum  the trainer's whole optimizer step (gpt2.train.step.TrainStep) with --accum micro-batches of 16 for
              sdpa, ra-unified (composed QKV weight cached over the micro-steps) and ra-same-flop
  sizes       the whole step at every model size a preset uses, compiled by default and with CUDA graphs
  compose     (on request) ra-unified's weight-composition kernels at every preset width, per launch setting,
              beside the casts they replace (GPU time per layer): where compose_kernel's launch settings come from
  loop        the step a matrix cell really runs (gpt2.train.trainer.Run built from the preset's cell config)
              for each ablation step of --loop-preset, against its first step, with an A/A control
Kernel-level sections report GPU time (kernel durations summed by torch.profiler, so the host's launch
overhead, which dominates eager code at these sizes, is left out); the step sections are wall clock.
A full run on an H100 takes about 9 minutes, most of it compiling (--sections step-accum,kv about 3);
--budget-s skips step variants that would start compiling too late. --profile VARIANTS writes a kernel table
per named step variant. A failure in one measurement is recorded in the report, never fatal.
Writes results/bench/attention-<gpu>.md, .json and .png. With --sections, the sections not re-run are kept
from the existing .json (same GPU) and the .md and .png are re-rendered from the merged report.
Without CUDA (and without --smoke) it says why it skips and exits 0. The measurements live in bench/.
"""

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path


import torch

from bench.common import Bench, allow_many_compiled_models, gpu_slug, workload
from gpt2.train.step import use_tf32
from bench.kernels import run_gate_section, run_kv_section, run_sdpa_section
from bench.op import op_variants, run_op_section
from bench.render import write_report
from bench.report import DEFAULT_SECTIONS, SECTIONS, earlier_report, empty_sections, finalize, keep_earlier_sizes, \
    merge_earlier, sizes_section_run
from bench.loop import run_loop_section
from bench.compose import run_compose_section
from bench.sizes import run_sizes_section
from bench.step import STEP_VARIANTS, run_step_accum_section, run_step_section

LOOP_PRESETS = {False: "shakespeare-gpu-ra-matrix", True: "cpu-tiny-run"}  # the loop section's preset (smoke: CPU)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: runs every measured function once")
    parser.add_argument("--out-dir", default="results/bench")
    parser.add_argument("--budget-s", type=float, default=600.0,
                        help="whole-step variants that would start compiling after this many seconds are skipped")
    parser.add_argument("--sections", default=None,
                        help="comma-separated subset of " + ",".join(SECTIONS) + " (default: "
                             + ",".join(DEFAULT_SECTIONS) + "); the other sections of the existing report are kept")
    parser.add_argument("--skip-step", action="store_true", help="leave out the whole-training-step section")
    parser.add_argument("--accum", type=int, default=8, help="micro-batches per optimizer step in step-accum")
    parser.add_argument("--step-rounds", type=int, default=15,
                        help="timing rounds of the step section (each times every variant once, 10 steps)")
    parser.add_argument("--profile", default="", metavar="VARIANTS",
                        help="comma-separated whole-step variants (step and sizes sections) or ablation steps (loop "
                             "section) whose kernel and host tables (CUDA) are written to the output directory as "
                             "profile-<variant>.txt, profile-<size>-<mode>-<variant>.txt, resp. profile-loop-<step>.txt")
    parser.add_argument("--profile-rows", default=None, metavar="LABELS",
                        help="op and layer sections: semicolon-separated row labels whose compiled fwd+bwd kernel "
                             "and host tables (CUDA) are written to the output directory as "
                             "profile-<section>-<label>-<shape>-compiled.txt")
    parser.add_argument("--step-variants", default=",".join(STEP_VARIANTS),
                        help="comma-separated whole-step variants (backend or backend+disc); sdpa is the baseline")
    parser.add_argument("--op-variants", default=None, metavar="LABELS",
                        help="op and layer sections: semicolon-separated row labels to measure (default all), e.g. "
                             "'sdpa;ra-fold-full;ra-fold-full, 6/12 heads routed'")
    parser.add_argument("--sizes", default=None, metavar="NAMES",
                        help="sizes section: comma-separated model sizes (mini,124M,350M; default all)")
    parser.add_argument("--compile-modes", default=None, metavar="MODES",
                        help="sizes section: comma-separated torch.compile modes (default,reduce-overhead)")
    parser.add_argument("--size-variants", default=None, metavar="VARIANTS",
                        help="sizes section: comma-separated variants (default sdpa,ra-unified,sdpa+again,ra-same-flop)")
    parser.add_argument("--loop-preset", default=None, metavar="PRESET",
                        help="loop section: the preset whose cells are timed (default shakespeare-gpu-ra-matrix; "
                             "cpu-tiny-run with --smoke)")
    parser.add_argument("--loop-steps", default=None, metavar="STEPS",
                        help="loop section: comma-separated ablation steps (default: the preset's matrix steps), "
                             "each optionally with @SYMBOL=value overrides (V1@TORCH_COMPILE_CUDA_GRAPHS=n); the "
                             "first is the baseline, and a second build of it follows the second")
    args = parser.parse_args(argv)
    sections = set((args.sections or ",".join(DEFAULT_SECTIONS)).split(","))
    unknown = sections - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    if args.accum < 1:
        parser.error(f"--accum {args.accum} must be >= 1")
    if args.step_rounds < 1:
        parser.error(f"--step-rounds {args.step_rounds} must be >= 1")
    args.op_variants = args.op_variants and [v.strip() for v in args.op_variants.split(";") if v.strip()]
    unknown = set(args.op_variants or []) - {label for label, _, _ in op_variants()}
    if unknown:
        parser.error(f"--op-variants: unknown label(s) {sorted(unknown)}; choose from "
                     + "; ".join(label for label, _, _ in op_variants()))
    if args.skip_step:
        sections.discard("step")
    return args, sections


def main(argv=None) -> int:
    args, sections = parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        print("bench-attention: no CUDA GPU visible, skipping (the bf16 attention benchmarks need one; "
              "--smoke runs every measurement once on tiny CPU sizes)")
        return 0
    device = torch.device("cuda") if torch.cuda.is_available() and not args.smoke else torch.device("cpu")
    use_tf32(device)
    w = workload(args.smoke)
    bench = Bench(device, args.smoke, args.budget_s)
    allow_many_compiled_models()

    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "cuda": torch.version.cuda, "smoke": args.smoke,
        "timer": "wall clock (smoke)" if args.smoke else ("do_bench" if bench.do_bench else "CUDA events"),
        "workload": {"op_shapes": [list(s) for s in w["op_shapes"]], "rank": w["rank"]},
        **empty_sections(), "section_runs": {},
    }
    stem = Path(args.out_dir) / f"attention-{gpu_slug(device)}"
    # --sections: keep what an earlier run measured of the other sections (a full run starts afresh).
    kept_errors = merge_earlier(report, stem.with_suffix(".json"), sections) if args.sections else []
    # The sizes section keeps the blocks a partial run (--sizes, --compile-modes) did not measure again.
    earlier = (earlier_report(stem.with_suffix(".json"), report) or {}) if args.sections else {}
    variants = [v for v in args.step_variants.split(",") if v]
    if "sdpa" not in variants:
        variants.insert(0, "sdpa")
    row_profiles = (args.out_dir if args.profile_rows else None), (args.profile_rows or "").split(";")
    runners = {
        "sdpa": lambda: run_sdpa_section(bench, w),
        "op": lambda: run_op_section(bench, w, "op", args.op_variants, *row_profiles),
        "layer": lambda: run_op_section(bench, w, "layer", args.op_variants, *row_profiles),
        "gates": lambda: run_gate_section(bench, w),
        "kv": lambda: run_kv_section(bench, w),
        "step": lambda: run_step_section(bench, w, variants, rounds=args.step_rounds,
                                         profile_dir=args.out_dir if args.profile else None,
                                         profile_variants=args.profile.split(",")),
        "step-accum": lambda: run_step_accum_section(bench, w, args.accum),
        "sizes": lambda: keep_earlier_sizes(
            run_sizes_section(bench, w, args.sizes and args.sizes.split(","),
                              args.compile_modes and args.compile_modes.split(","),
                              args.size_variants and args.size_variants.split(","),
                              profile_dir=args.out_dir if args.profile else None,
                              profile_variants=args.profile.split(",")),
            earlier, report["date"]),
        "compose": lambda: run_compose_section(bench, w),
        "loop": lambda: run_loop_section(bench, args.loop_preset or LOOP_PRESETS[args.smoke],
                                         args.loop_steps and args.loop_steps.split(","),
                                         profile_dir=args.out_dir if args.profile else None,
                                         profile_variants=args.profile.split(",")),
    }
    for name in SECTIONS:  # the report is rewritten after every section, so a killed run keeps what it had
        if name in sections:
            bench.section, t0 = name, time.perf_counter()
            report[name] = runners[name]()
            run = {"date": report["date"], "section_s": time.perf_counter() - t0}
            if name == "sizes":
                run = sizes_section_run(report[name], run, earlier)
            if run is not None:
                report["section_runs"][name] = run
            finalize(report, bench, w, kept_errors)
            write_report(report, stem, png=False)
    write_report(report, stem, png=True)
    print(f"{len(bench.errors)} failure(s); {bench.elapsed_s():.0f} s -> {stem}.md, .json, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
