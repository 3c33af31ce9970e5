"""What every benchmark section shares: backends, settings builders, the workload sizes, and timing.

Bench times callables (GPU time from torch.profiler kernel durations, or the wall clock) and records a
failing measurement in the report instead of raising.
"""

import contextlib
import dataclasses
import gc
import re
import statistics
import time
import traceback

import torch

from lib.report.markdown import md_table
from gpt2.settings import AttentionSettings, KVPruningSettings, MLPSettings, ModelSettings, OptimizerSettings

BACKENDS = ["sdpa", "ra-reference", "ra-fold-full", "ra-fold-lowrank", "ra-same-flop", "ra-unified"]
FAST_RA = ["ra-fold-full", "ra-fold-lowrank", "ra-same-flop", "ra-unified"]
RANK = 8
KEEP_RATIO = 0.382
MODES = ("eager", "compiled")

# ---- settings ---------------------------------------------------------------------------------

def model_settings(n_layer, n_head, n_embd, block_size):
    """GPT-2's defaults (gpt2.settings) at another size."""
    return dataclasses.replace(ModelSettings(), size="custom", n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                               block_size=block_size)


def attention_settings(variant, rank, threshold=0.0):
    """variant: backend, backend+disc or backend+untied (the same-FLOP backends' untied form), or any of these
    + "+plain" (the torch code instead of the Triton kernels)."""
    backend, _, extra = variant.replace("+plain", "").partition("+")
    return dataclasses.replace(AttentionSettings(), backend=backend, reciprocal_rank=rank, gate_granularity="per-head",
                               w_std_init=1.0, w_rec_init=0.5, head_select_threshold=threshold,
                               discoverability=extra == "disc", reciprocal_form="untied" if extra == "untied" else "")


# Every benchmark's optimizer: fused AdamW as GPT-2 trains (SPAM off), at lr 6e-4.
BENCH_OPTIMIZER = OptimizerSettings(name="adamw", beta1=0.9, beta2=0.95, weight_decay=0.1, spam_theta=0.0,
                                    spam_reset_interval=0, spam_warmup=0)
BENCH_LR = 6e-4


def allow_many_compiled_models() -> None:
    """Raise dynamo's recompile limits: a benchmark compiles many models and modules that share code objects,
    and past the default limit dynamo would fall back to eager for the later ones."""
    for limit in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, 64)


NO_KV = KVPruningSettings()  # the defaults: pruning off
STANDARD_MLP = MLPSettings()  # the defaults: GPT-2's MLP


def workload(smoke: bool) -> dict:
    if smoke:
        return dict(op_shapes=[(2, 2, 16, 8)], rank=2, step=dict(n_layer=2, n_head=2, n_embd=16, block_size=16,
                    batch_size=2, vocab_size=64), compile=False, gate_shape=(2, 16, 2, 8),
                    kv_lengths=[256, 1024])
    return dict(op_shapes=[(8, 12, 1024, 64), (2, 12, 4096, 64)], rank=RANK,
                step=dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=16, vocab_size=50257),
                compile=True, gate_shape=(16, 1024, 12, 64), kv_lengths=[1024, 4096, 16384, 65536, 131072])


def apply_variant_flags(model, variant):
    """"+plain" variants switch the Triton kernels off, so both paths are measured side by side;
    "sdpa+fold-traffic" adds an activation-level fold's memory traffic to the baseline (fold_traffic.py)."""
    if variant.endswith("+fold-traffic"):
        from .fold_traffic import add_fold_traffic
        return add_fold_traffic(model)
    if variant.endswith("+plain"):
        for m in model.modules():
            if hasattr(m, "use_kernels"):
                m.use_kernels = False
    return model


# ---- timing -----------------------------------------------------------------------------------

class Bench:
    """Times callables and records failures instead of raising."""

    def __init__(self, device, smoke, budget_s):
        self.device, self.smoke = device, smoke
        self.start = time.perf_counter()
        self.budget_s = budget_s
        self.errors = []
        self.section = None  # the section being measured; failures are tagged with it
        try:
            from triton.testing import do_bench
            self.do_bench = do_bench if device.type == "cuda" else None
        except ImportError:
            self.do_bench = None

    def elapsed_s(self):
        return time.perf_counter() - self.start

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def ms(self, fn) -> float:
        """Median wall milliseconds per fn() (host launch overhead included), once in smoke mode."""
        if self.smoke or self.device.type != "cuda":
            t0 = time.perf_counter()
            fn()
            return 1000 * (time.perf_counter() - t0)
        if self.do_bench is not None:
            return float(self.do_bench(fn, warmup=25, rep=100, return_mode="median"))
        for _ in range(5):
            fn()
        times = []
        for _ in range(30):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    def gpu_ms(self, fn, iters=20) -> float:
        """GPU milliseconds per fn(): the summed duration of its kernels (torch.profiler CUDA activity), so
        neither the host's launch overhead nor idle gaps count. Once, by the wall clock, in smoke mode."""
        if self.smoke or self.device.type != "cuda":
            return self.ms(fn)
        from torch.profiler import ProfilerActivity, profile

        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                fn()
            torch.cuda.synchronize()
        total_us = 0.0
        for event in prof.events():
            if event.device_type == torch.autograd.DeviceType.CUDA:
                total_us += event.time_range.elapsed_us()
        if total_us == 0:
            raise RuntimeError("the profiler recorded no GPU kernels")
        return total_us / iters / 1000

    def attempt(self, label, fn):
        """fn() or None; a failure (including out-of-memory) is recorded with its label."""
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - any failure of one measurement must not end the run
            self.errors.append({"label": label, "section": self.section,
                                "error": f"{type(exc).__name__}: {exc}".strip()[:2000],
                                "traceback": traceback.format_exc(limit=6)})
            print(f"  FAILED {label}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            return None
        finally:
            if self.device.type == "cuda":
                gc.collect()
                torch.cuda.empty_cache()


def autocast(device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def act_dtype(device):
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def gpu_slug(device) -> str:
    """The GPU's name as a file-name part ("NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"); "cpu-smoke" off CUDA."""
    if device.type != "cuda":
        return "cpu-smoke"
    return name_slug(torch.cuda.get_device_name(device))


def name_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def compile_fn(fn, smoke):
    """torch.compile(fn, dynamic=False): one static compile per shape, as the training step compiles
    (symbolic-shape kernels were several times slower here). Smoke runs keep fn as it is."""
    return fn if smoke else torch.compile(fn, dynamic=False)


def time_fwd_and_bwd(bench, forward, inputs, profile=None):
    """{fwd, fwd_bwd: GPU kernel ms; fwd_bwd_wall: wall ms} of forward() and forward() + gradients to inputs;
    profile(forward_backward), if given, runs after the timings (a kernel table of the same calls)."""
    grad = torch.randn_like(forward())

    def forward_backward():
        torch.autograd.grad(forward(), inputs, grad, allow_unused=True)

    forward_backward()  # compiles the backward graph, if any, before timing
    with torch.no_grad():
        forward()
        fwd = bench.gpu_ms(forward)
    out = {"fwd": fwd, "fwd_bwd": bench.gpu_ms(forward_backward), "fwd_bwd_wall": bench.ms(forward_backward)}
    if profile is not None:
        profile(forward_backward)
    return out


# ---- text -------------------------------------------------------------------------------------

def fmt(x, spec=".3f", unit=""):
    return "n/a" if x is None else f"{x:{spec}}{unit}"


def table_lines(header, rows):
    """A Markdown table (lib.report.markdown.md_table) as a list of lines, the form every report section returns."""
    return md_table(header, rows).split("\n")
