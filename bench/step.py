"""Sections step and step-accum: the whole training step of GPT-2 124M per backend, as a ratio to SDPA.

step        one micro-batch per optimizer step (forward, backward, clip, fused AdamW): the per-micro-step cost
step-accum  the trainer's own optimizer step (gpt2.train.step.TrainStep) with gradient accumulation: for
            ra-unified the micro-steps run inside cached_composition, so the QKV weight is composed once per
            optimizer step, as single-process training does
All variants are built and warmed up (compiled) first, then timed in rounds (wall clock). In a round sdpa
brackets every other variant (sdpa, v1, sdpa, v2, ..., sdpa), and each timing of a variant is divided by the
mean of the two sdpa timings around it: the GPU's clock drifts by ~1-3% as it warms, and a ratio to the
neighbours cancels that. A variant's ratio is the median of those bracketed ratios over rounds, reported
with their quartiles; the variant order rotates from round to round. Every timing starts after one untimed
step of the same model.
"""

import contextlib
import gc
import re
import statistics
import time
from pathlib import Path

import torch

from gpt2.io import atomic_write_text

from .common import BENCH_LR, BENCH_OPTIMIZER, NO_KV, STANDARD_MLP, act_dtype, apply_variant_flags, attention_settings, \
    autocast, model_settings

# Whole-step variants, in the order they are compiled (the goal backends first, in case the budget runs out).
# ra-reference is left out: its T x T tensors for 12 layers at batch 16 are slow by design.
# "sdpa+again" is a second, separately built baseline: its ratio (ideally 1) shows the measurement's noise.
# "sdpa+fold-traffic" is the baseline plus only the memory traffic of an activation-level fold (ra-same-flop's
# design): the floor of that design.
STEP_VARIANTS = ["sdpa", "ra-unified", "ra-same-flop", "sdpa+again", "sdpa+fold-traffic", "ra-unified+disc",
                 "ra-unified+plain", "ra-same-flop+plain", "ra-fold-full", "ra-fold-lowrank"]
ACCUM_VARIANTS = ["sdpa", "ra-unified", "ra-same-flop"]
BASELINE = "sdpa"
COMPILE_ESTIMATE_S = 75  # per variant; variants that would start compiling too late are skipped


def build_training(variant, w, device, compile_model):
    """(model, optimizer, forward, x, y): GPT-2 of the step workload, fused AdamW, one fixed batch."""
    from gpt2.model.gpt import GPT
    from gpt2.train.optim import build_optimizer

    s = w["step"]
    settings = model_settings(s["n_layer"], s["n_head"], s["n_embd"], s["block_size"])
    model = GPT(settings, attention_settings(variant, w["rank"]), STANDARD_MLP, NO_KV, s["vocab_size"], seed=1)
    model = apply_variant_flags(model.to(device), variant)
    optimizer = build_optimizer(model, BENCH_OPTIMIZER, BENCH_LR, device.type)
    # "reduce-overhead": CUDA graphs (the forward and backward each replay as one launch; bench/sizes.py)
    mode = w.get("compile_mode", "default")
    forward = torch.compile(model, mode=None if mode == "default" else mode) if compile_model else model
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(s["vocab_size"], (s["batch_size"], s["block_size"] + 1), generator=g)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    return model, optimizer, forward, x, y


def build_step(variant, w, device, compile_model):
    from gpt2.train.step import caches_composition

    model, optimizer, forward, x, y = build_training(variant, w, device, compile_model)
    x, y = x.to(device), y.to(device)
    params = [p for p in model.parameters() if p.requires_grad]

    graphs = compile_model and w.get("compile_mode") == "reduce-overhead"
    # As the trainer's step with one micro-batch and one process decides (gpt2.train.step.TrainStep).
    hook = caches_composition(model, 1, False, None, graphs)

    def step():
        if graphs:  # a new step: the graphs may overwrite the previous step's outputs
            torch.compiler.cudagraph_mark_step_begin()
        with model.accumulation(compile_model, dtype=act_dtype(device)) if hook else contextlib.nullcontext():
            with autocast(device):
                _, loss = forward(x, y)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=device.type == "cuda")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


class FixedBatches:
    """A BatchSource stand-in that hands out the same CPU batch (the trainer's copy to the GPU still runs)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def next(self):
        return self.x, self.y


def build_accum_step(variant, w, device, compile_model, accum):
    """The trainer's optimizer step: TrainStep with `accum` micro-batches, bf16 autocast, clip 1.0; it caches
    ra-unified's composed QKV weight over the micro-steps (single process, accum > 1)."""
    from gpt2.train.step import TrainStep, effective_precision

    model, optimizer, forward, x, y = build_training(variant, w, device, compile_model)
    train_step = TrainStep(forward, model, optimizer, device=device, precision=effective_precision(device, "bf16"),
                           grad_accum=accum, grad_clip=1.0, compiled=compile_model)
    batches = FixedBatches(x, y)
    step = lambda: train_step(batches)  # noqa: E731
    step.cache_composition = train_step.cache_composition
    return step


def profile_step(step, variant, out_dir, steps=3):
    """Kernel table (top 80 by device time: enough to find a variant's extra kernels, which are small) and host
    table (top 40 by the host's own time) of a few steps -> <out_dir>/profile-<variant>.txt"""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    tables = [averages.table(sort_by=key, row_limit=rows, max_name_column_width=90)
              for key, rows in (("self_cuda_time_total", 80), ("self_cpu_time_total", 40))]
    path = Path(out_dir) / f"profile-{re.sub(r'[^a-z0-9]+', '-', variant.lower())}.txt"
    atomic_write_text(path, f"{variant}: {steps} steps, by device time\n{tables[0]}\n\nby host time\n{tables[1]}\n")


def bracket_sequence(variants, round_index, baseline=BASELINE):
    """The timing order of one round: the baseline (sdpa) before and after every other variant (sdpa, v1,
    sdpa, v2, ..., sdpa), the others rotated by the round index so none always follows the same one. Without
    the baseline, the variants alone."""
    others = [v for v in variants if v != baseline]
    if others:
        shift = round_index % len(others)
        others = others[shift:] + others[:shift]
    if baseline not in variants:
        return others
    return [v for other in others for v in (baseline, other)] + [baseline]


def bracketed_ratios(sequence, times, baseline=BASELINE):
    """[(variant, its time / mean of the baseline's times just before and after it)] for one round; timings
    that failed (None) give no ratio. The GPU clock drifts as it warms: a ratio to the neighbours cancels that."""
    ratios = []
    for j, variant in enumerate(sequence):
        if variant == baseline or times[j] is None or not 0 < j < len(sequence) - 1:
            continue
        before, after = times[j - 1], times[j + 1]
        if sequence[j - 1] == sequence[j + 1] == baseline and before is not None and after is not None:
            ratios.append((variant, times[j] / ((before + after) / 2)))
    return ratios


def build_and_time(bench, w, variants, build, label, warmup, rounds, steps, baseline=BASELINE):
    """Build and warm up (compile) every variant, then time them in interleaved rounds, each bracketed by
    `baseline`.
    -> (results {variant: {warmup_s, rounds_ms} or {skipped}}, built {variant: step})"""
    built, results = {}, {}
    for variant in variants:
        left = bench.budget_s - bench.elapsed_s()
        if w["compile"] and left < COMPILE_ESTIMATE_S + 30:
            results[variant] = {"skipped": f"time budget ({left:.0f} s left)"}
            continue
        print(f"{label}: build + compile {variant}", flush=True)

        def prepare():
            step = build(variant)
            t0 = time.perf_counter()
            for _ in range(warmup):
                step()
            bench.sync()
            return step, time.perf_counter() - t0

        r = bench.attempt(f"{label} {variant}", prepare)
        if r is not None:
            built[variant] = r[0]
            results[variant] = {"warmup_s": r[1], "rounds_ms": []}
    # As the trainer after its warm-up steps (gpt2/train/loop.py): compilation left ~10^6 long-lived objects, and a
    # cyclic collection walking them stalls the host for tens of ms, charged to whichever variant's step set it
    # off (the one that allocates the most small objects: ra-unified's composition outside the graph).
    gc.collect()
    gc.freeze()
    try:
        time_rounds(bench, built, results, label, rounds, steps, baseline)
    finally:
        gc.unfreeze()
    return results, built


def time_rounds(bench, built, results, label, rounds, steps, baseline):
    """The interleaved, bracketed rounds of build_and_time, into results (a variant that fails leaves built)."""
    for i in range(rounds):
        sequence = bracket_sequence(list(built), i, baseline)
        times = []
        for variant in sequence:
            if variant not in built:  # failed earlier in this round
                times.append(None)
                continue
            step = built[variant]

            def timed():
                # One untimed step first, so that whatever switching models costs is charged to no one's
                # timing (on an H100 the first step of ra-same-flop after a switch took ~0.3-0.4 ms longer;
                # for the other variants the difference was inside the per-step noise).
                step()
                bench.sync()
                t0 = time.perf_counter()
                for _ in range(steps):
                    step()
                bench.sync()
                return 1000 * (time.perf_counter() - t0) / steps

            ms = bench.attempt(f"{label} {variant} (timing)", timed)
            times.append(ms)
            if ms is None:
                del built[variant]
            else:
                results[variant]["rounds_ms"].append(ms)
        for variant, ratio in bracketed_ratios(sequence, times, baseline):
            results[variant].setdefault("round_ratios", []).append(ratio)


def summarize(results, tokens_per_step, baseline=BASELINE):
    """Median round, tokens/s, and the ratio to the baseline (median and quartiles of the bracketed ratios),
    in place."""
    for variant, r in results.items():
        if not r.get("rounds_ms"):
            continue
        r["ms_per_step"] = statistics.median(r["rounds_ms"])
        r["tokens_per_s"] = tokens_per_step / (r["ms_per_step"] / 1000)
        ratios = [1.0] if variant == baseline else r.get("round_ratios")
        if ratios:
            r["ratio"] = statistics.median(ratios)
            r["ratio_q1"], _, r["ratio_q3"] = (statistics.quantiles(ratios, n=4, method="inclusive")
                                               if len(ratios) > 1 else (ratios[0], None, ratios[0]))


def run_step_section(bench, w, variants, warmup=3, rounds=15, steps=10, profile_dir=None, profile_variants=()):
    """One micro-batch per optimizer step, every variant."""
    if bench.smoke:
        warmup, rounds, steps = 1, 1, 1
    s = w["step"]
    results, built = build_and_time(bench, w, variants, lambda v: build_step(v, w, bench.device, w["compile"]),
                                    "step", warmup, rounds, steps)
    if profile_dir is not None:
        for variant, step in built.items():
            if variant not in profile_variants:
                continue
            bench.attempt(f"profile {variant}", lambda: profile_step(step, variant, profile_dir))
    summarize(results, s["batch_size"] * s["block_size"])
    built.clear()
    return {"workload": {**s, "compile": w["compile"], "rank": w["rank"], "warmup": warmup, "rounds": rounds,
                         "steps_per_round": steps}, "variants": results}


def run_step_accum_section(bench, w, accum, variants=ACCUM_VARIANTS, warmup=2, rounds=5, steps=3):
    """The trainer's whole optimizer step with `accum` micro-batches (cached composition for ra-unified)."""
    if bench.smoke:
        warmup, rounds, steps = 1, 1, 1
    s = w["step"]
    cached = {}

    def build(variant):
        step = build_accum_step(variant, w, bench.device, w["compile"], accum)
        if variant.startswith("ra-unified"):  # the only backend with a composition to cache
            cached[variant] = step.cache_composition
        return step

    results, built = build_and_time(bench, w, variants, build, "step-accum", warmup, rounds, steps)
    summarize(results, accum * s["batch_size"] * s["block_size"])
    for variant, r in results.items():
        if variant in cached:
            r["cached_composition"] = cached[variant]
    built.clear()
    return {"workload": {**s, "compile": w["compile"], "rank": w["rank"], "accum": accum, "warmup": warmup,
                         "rounds": rounds, "steps_per_round": steps}, "variants": results}
