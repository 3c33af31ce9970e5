"""DDP benchmark: the trainer's optimizer step on one GPU and under DDP on N, side by side in one process group.

    make bench-ddp                                  # every visible GPU (at least 2), GPT-2 124M, T1024, B16
    python -m scripts.bench_ddp --smoke --out-dir /tmp/bench   # 2 gloo processes on the CPU, tiny sizes

The script re-launches itself under torchrun (one process per GPU) unless it is a worker. Every rank builds
each variant as the trainer builds it (gpt2.train.trainer.Run.build_model_and_step): the model is compiled and
wrapped by gpt2.train.distributed.wrap_ddp. For ra-unified, c_attn, P and the gates are left out of DDP's
reduction, and gpt2.train.step.TrainStep composes the weight once per optimizer step and averages the composed
weight's gradient itself (composition_reduce), which is what the trainer does with accumulation. Three
measurements, each in bracketed interleaved rounds as bench/step.py times them (sdpa before and after every
other variant, the ratio to the mean of the two):

  single  rank 0 alone (the others wait at a barrier) steps the compiled model without DDP: one GPU's speed
  ddp     every rank, one micro-batch each per optimizer step, sdpa only: the scaling
  accum   every rank, --accum micro-batches each per optimizer step: ra-unified's ratio to sdpa under DDP with
          gradient accumulation, with a second sdpa build as the A/A control

A timing is the slowest rank's. tokens/s counts every rank's tokens; scaling = ddp tokens/s over single tokens/s
(ideal: the number of GPUs). Writes results/bench/ddp-<gpu>-x<N>.md and .json from rank 0.
"""

import argparse
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from gpt2.io import REPO_ROOT, atomic_write_json, atomic_write_text

from .common import BENCH_LR, BENCH_OPTIMIZER, NO_KV, STANDARD_MLP, allow_many_compiled_models, attention_settings, \
    gpu_slug, model_settings
from .step import FixedBatches, bracket_sequence, bracketed_ratios, summarize

MODULE = "scripts.bench_ddp"
VARIANTS = ["sdpa", "ra-unified", "sdpa+again"]
RANK = 4  # the ablation steps' R (V1)


def workload(smoke: bool) -> dict:
    if smoke:
        return dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=2, vocab_size=128, compile=False,
                    warmup=1, rounds=2, steps=1)
    return dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=16, vocab_size=50257, compile=True,
                warmup=3, rounds=7, steps=3)


class Variant:
    """One variant built as the trainer builds it: raw model, compiled model, DDP wrapper and optimizer."""

    def __init__(self, name, w, dctx, accum):
        from gpt2.model.gpt import GPT
        from gpt2.train import distributed
        from gpt2.train.optim import build_optimizer

        backend = name.split("+")[0]
        settings = model_settings(w["n_layer"], w["n_head"], w["n_embd"], w["block_size"])
        self.raw = GPT(settings, attention_settings(backend, RANK), STANDARD_MLP, NO_KV, w["vocab_size"],
                       seed=1).to(dctx.device)
        self.optimizer = build_optimizer(self.raw, BENCH_OPTIMIZER, BENCH_LR, dctx.device.type)
        self.compiled = torch.compile(self.raw) if w["compile"] else self.raw
        composed = self.raw.composed_parameters() if accum > 1 else []
        self.ddp = distributed.wrap_ddp(self.compiled, dctx, reduce_self=composed)
        self.reduce = (lambda grads: distributed.average_gradients(dctx, grads)) if composed else None
        g = torch.Generator().manual_seed(dctx.rank)
        tokens = torch.randint(w["vocab_size"], (w["batch_size"], w["block_size"] + 1), generator=g)
        self.batches = FixedBatches(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
        self.device, self.w = dctx.device, w

    def step(self, mode, accum):
        """A callable optimizer step: mode single (no DDP), ddp (1 micro-batch) or accum."""
        from gpt2.train.step import TrainStep, effective_precision

        ddp = mode != "single"
        micro = accum if mode == "accum" else 1
        reduce = self.reduce if mode == "accum" else None
        step = TrainStep(self.ddp if ddp else self.compiled, self.raw, self.optimizer, device=self.device,
                         precision=effective_precision(self.device, "bf16"), grad_accum=micro, grad_clip=1.0,
                         ddp=ddp, compiled=self.w["compile"], composition_reduce=reduce,
                         cache_composition=reduce is not None or None)
        return lambda: step(self.batches)


def timed(dctx, step, steps, alone) -> float:
    """ms per optimizer step, the slowest rank's; alone: rank 0 steps while the others wait."""
    from gpt2.train import distributed
    from gpt2.train.step import sync

    ms = 0.0
    if dctx.rank == 0 or not alone:
        step()  # untimed: switching models costs no one's timing
        sync(dctx.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(dctx.device)
        ms = 1000 * (time.perf_counter() - t0) / steps
    return distributed.all_reduce_max(dctx, ms)


def measure(dctx, steps_by_variant, w, alone, tokens_per_step) -> dict:
    """Bracketed interleaved rounds over the variants (sdpa first) -> summarize()'s results."""
    from gpt2.train import distributed
    from gpt2.train.step import sync

    results = {v: {"rounds_ms": []} for v in steps_by_variant}
    for _ in range(w["warmup"]):  # every rank, also when rank 0 is timed alone: they compile at the same time
        for step in steps_by_variant.values():
            step()
    sync(dctx.device)
    distributed.barrier(dctx)
    for i in range(w["rounds"]):
        sequence = bracket_sequence(list(steps_by_variant), i)
        times = [timed(dctx, steps_by_variant[v], w["steps"], alone) for v in sequence]
        for v, ms in zip(sequence, times):
            results[v]["rounds_ms"].append(ms)
        for v, ratio in bracketed_ratios(sequence, times):
            results[v].setdefault("round_ratios", []).append(ratio)
    summarize(results, tokens_per_step)
    return results


def run_worker(args) -> int:
    from gpt2.train import distributed
    from gpt2.train.step import effective_precision, use_tf32

    dctx = distributed.setup("cpu" if args.smoke else "cuda")
    if dctx.world_size < 2:
        raise SystemExit("bench-ddp: needs at least 2 processes (it re-launches itself under torchrun)")
    use_tf32(dctx.device)
    allow_many_compiled_models()
    w = workload(args.smoke)
    micro_tokens = w["batch_size"] * w["block_size"]
    t0 = time.perf_counter()
    variants = {name: Variant(name, w, dctx, args.accum) for name in VARIANTS}
    sections = {
        "single": measure(dctx, {n: v.step("single", 1) for n, v in variants.items() if n != "sdpa+again"}, w,
                          alone=True, tokens_per_step=micro_tokens),
        "ddp": measure(dctx, {"sdpa": variants["sdpa"].step("ddp", 1)}, w, alone=False,
                       tokens_per_step=dctx.world_size * micro_tokens),
        "accum": measure(dctx, {n: v.step("accum", args.accum) for n, v in variants.items()}, w, alone=False,
                         tokens_per_step=dctx.world_size * args.accum * micro_tokens),
    }
    if dctx.is_main:
        report = {"device": torch.cuda.get_device_name(dctx.device) if dctx.device.type == "cuda" else "cpu",
                  "gpus": dctx.world_size, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "torch": torch.__version__, "cuda": torch.version.cuda, "smoke": args.smoke,
                  "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE"),
                  "precision": effective_precision(dctx.device, "bf16"),
                  "workload": {**w, "accum": args.accum, "rank": RANK}, "sections": sections,
                  "elapsed_s": time.perf_counter() - t0}
        single, ddp = sections["single"]["sdpa"], sections["ddp"]["sdpa"]
        report["scaling"] = ddp["tokens_per_s"] / single["tokens_per_s"]
        stem = Path(args.out_dir) / f"ddp-{gpu_slug(dctx.device)}-x{dctx.world_size}"
        stem.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(stem.with_suffix(".json"), report)
        atomic_write_text(stem.with_suffix(".md"), render(report))
        print(f"bench-ddp: scaling {report['scaling']:.3f}x on {dctx.world_size} -> {stem}.md, .json", flush=True)
    distributed.teardown(dctx)
    return 0


def render(report) -> str:
    from lib.report.markdown import md_table

    w, n = report["workload"], report["gpus"]
    lines = [f"# DDP: {n} x {report['device']}", "",
             f"{report['date']}, torch {report['torch']}, CUDA {report['cuda']}, NCCL_NVLS_ENABLE="
             f"{report['nccl_nvls_enable']}. GPT-2 {w['n_layer']}x{w['n_embd']} ({w['n_head']} heads), "
             f"T={w['block_size']}, micro-batch {w['batch_size']} per GPU, {report['precision']}, compile "
             f"{'on' if w['compile'] else 'off'}, fused AdamW, grad clip 1.0; ra-unified R={w['rank']} (tied). "
             f"Each timing is the slowest rank's; {w['rounds']} bracketed interleaved rounds of {w['steps']} "
             "optimizer steps after one untimed step; ms/step is the median round; x sdpa is the median of the "
             "bracketed ratios with quartiles. Run time "
             f"{report['elapsed_s']:.0f} s." + (" **Smoke run: numbers mean nothing.**" if report["smoke"] else ""),
             "", f"**Scaling**: DDP on {n} GPUs trains sdpa at {report['scaling']:.3f}x the tokens/s of one GPU "
             f"(ideal {n}x; {report['scaling'] / n:.1%} of it).", ""]
    titles = {"single": "One GPU (rank 0 alone, no DDP), one micro-batch per step",
              "ddp": f"DDP on {n} GPUs, one micro-batch per GPU per step",
              "accum": f"DDP on {n} GPUs, {w['accum']} micro-batches per GPU per optimizer step (ra-unified composes "
                       "once per optimizer step and averages the composed weight's gradient itself)"}
    for key, title in titles.items():
        rows = []
        for name, r in report["sections"][key].items():
            q = f"{r['ratio_q1']:.4f} - {r['ratio_q3']:.4f}" if r.get("ratio_q1") is not None else "n/a"
            rows.append([name, f"{r['ms_per_step']:.2f}", f"{r['tokens_per_s']:,.0f}", f"{r['ratio']:.4f}x", q])
        lines += [f"## {title}", "", md_table(["variant", "ms/step", "tokens/s (all GPUs)", "x sdpa", "quartiles"],
                                              rows), ""]
    return "\n".join(lines) + "\n"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="2 gloo processes on the CPU, tiny sizes")
    parser.add_argument("--out-dir", default=str(REPO_ROOT / "results" / "bench"))
    parser.add_argument("--accum", type=int, default=4, help="micro-batches per GPU per optimizer step (accum)")
    parser.add_argument("--nproc", type=int, default=0, help="processes (default: every visible GPU; 2 with --smoke)")
    args = parser.parse_args(argv)
    if args.accum < 2:
        parser.error(f"--accum {args.accum} must be >= 2 (the accumulation measurement)")
    return args


def main(argv=None) -> int:
    from gpt2.train import distributed

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if distributed.under_torchrun():
        return run_worker(args)
    nproc = args.nproc or (2 if args.smoke else torch.cuda.device_count())
    if not args.smoke and nproc < 2:
        print(f"bench-ddp: {torch.cuda.device_count()} CUDA GPU(s) visible, skipping (DDP needs at least 2; "
              "--smoke runs 2 gloo processes on the CPU)")
        return 0
    return distributed.relaunch(nproc, ["-m", MODULE], argv, "cpu" if args.smoke else "cuda")
