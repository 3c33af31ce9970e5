"""Throughput and utilisation: FLOPs per token, MFU, peak memory, where the process's wall time went, and the
run's JSON records."""

import atexit
import gc
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from gpt2.io import EVAL_NAME, METRICS_NAME, atomic_write_json, atomic_write_jsonl, read_jsonl
from gpt2.train.disk import writing

# Dense bf16 tensor-core peak per GPU (FLOP/s, no sparsity), matched by substring of the device
# name, most specific first. MFU is always measured against this bf16 peak, whatever the precision.
PEAK_BF16_FLOPS = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989.5e12),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("H200", 989.5e12),  # also matches GH200
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
]


def peak_flops(device: torch.device) -> float | None:
    """bf16 dense peak of one GPU, or None (CPU, or a GPU not in the table)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS:
        if key in name:
            return flops
    return None


def flops_per_token(n_params: int, n_layer: int, n_head: int, head_dim: int, seq_len: int) -> float:
    """Training FLOPs per token, nanoGPT/PaLM style (forward + backward = 3x forward):

        6 N  +  12 L H Q T

    N: parameters excluding the position table (the 6N term: 2N forward + 4N backward for every matmul),
    L layers, H heads, Q head dim, T sequence length (the attention score and value matmuls, which N misses;
    counted for the full T x T square as PaLM does, not halved for causality).
    """
    return 6.0 * n_params + 12.0 * n_layer * n_head * head_dim * seq_len


def mfu(tokens_per_s: float, flops_per_tok: float, peak_per_gpu: float | None, world_size: int = 1) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the summed peak of the GPUs used."""
    if not peak_per_gpu or not tokens_per_s:
        return None
    return tokens_per_s * flops_per_tok / (peak_per_gpu * world_size)


def peak_memory_bytes(device: torch.device) -> int | None:
    """Peak GPU memory allocated by tensors since start (None on the CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


def perplexity(loss: float | None) -> float | None:
    if loss is None or not math.isfinite(loss):
        return None
    return math.exp(min(loss, 700.0))


def process_age_s() -> float | None:
    """Seconds since this process started, interpreter start-up included; None without Linux's /proc.

    /proc/self/stat's 22nd field is the start time in clock ticks after boot (10 ms resolution), on the
    clock CLOCK_BOOTTIME reads. A forked process counts from its fork.
    """
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the name in parentheses may hold spaces
        start_s = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # fields[0] is the 3rd field
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - start_s)
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def accounted_s(p) -> float:
    """The time the loop accounts for itself (a Progress, over all sessions): training, warm-up/compile,
    evaluation and checkpoints."""
    return p.train_time_s + p.compile_time_s + p.eval_time_s + p.checkpoint_time_s


class SessionClock:
    """Where this process's wall time went besides the loop's own accounts, for metrics.json's "overhead"
    (this session's process only: a resumed run reports its last one):

        startup_s   process start -> the run object: interpreter, imports, configuration, run lock
                    (None without /proc; a process that trains several runs, like a test, counts them all)
        setup_s     the run object -> the loop: process group, run directory, env.json, data, model,
                    optimizer, the checkpoint resumed from; setup_parts_s splits it by phase (phase())
        other_s     loop time in none of its accounts: log lines, eval.jsonl and metrics.json, machine
                    samples (nvidia-smi at every evaluation), routing refreshes
        teardown_s  the end of the loop -> this record (closing line)
        process_s   process start (else the run object) -> this record

    The process exits after its last record: the matrix's cell runner says how long that took
    (lib/matrix/cell.py), since no record written before it can.
    """

    def __init__(self):
        self.created = time.perf_counter()
        self.startup_s = process_age_s()
        self.loop_start = self.loop_end = None
        self.accounted_at_start = self.accounted_at_end = 0.0
        self.setup_parts = {}

    @contextmanager
    def phase(self, name: str):
        """Time one phase of the setup into setup_parts_s[name]."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.setup_parts[name] = self.setup_parts.get(name, 0.0) + time.perf_counter() - t0

    def start_loop(self, p) -> None:
        self.loop_start, self.accounted_at_start = time.perf_counter(), accounted_s(p)

    def end_loop(self, p) -> None:
        self.loop_end, self.accounted_at_end = time.perf_counter(), accounted_s(p)

    def setup_s(self) -> float:
        return (self.loop_start or time.perf_counter()) - self.created

    def other_s(self, p) -> float | None:
        """Loop wall time minus what the loop accounted for in this session (so far, while it runs)."""
        if self.loop_start is None:
            return None
        end, accounted = (self.loop_end, self.accounted_at_end) if self.loop_end else (time.perf_counter(),
                                                                                       accounted_s(p))
        return max(0.0, (end - self.loop_start) - (accounted - self.accounted_at_start))

    def record(self, p) -> dict:
        now = time.perf_counter()
        return {"startup_s": self.startup_s, "setup_s": self.setup_s(),
                "setup_parts_s": {k: round(v, 3) for k, v in self.setup_parts.items()}, "other_s": self.other_s(p),
                "teardown_s": now - self.loop_end if self.loop_end else None,
                "process_s": (self.startup_s or 0.0) + now - self.created}


@contextmanager
def collection_paused():
    """No cyclic garbage collection inside. An import as large as torch._dynamo's adds ~120k long-lived objects
    and sets off ~60 collections on the way, 3 of them over the whole heap: 0.4-0.8 s of its 2 s (measured)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def skip_collections_at_exit() -> None:
    """Let this process's exit skip the collections CPython runs over the whole heap as it shuts down: with torch,
    dynamo and sympy loaded they took 1.3-1.5 s of a CPU trainer's exit (measured: 1.7 s -> 0.3 s), to free
    memory the OS takes back anyway. gc.freeze() at exit puts every object out of the collector's reach; exit
    handlers run newest first, so it runs before torch's own, which need no collection, and files and locks are
    closed by their owners before that. Idempotent (one registration however often it is called)."""
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)


class EvalLog:
    """eval.jsonl: one record per evaluation, rewritten whole (atomically) on every append.

    A resumed run starts from the records already on disk, dropping any written after the checkpoint
    it resumes from (those iterations are trained again).
    """

    def __init__(self, run_dir, resume_iter: int | None = None):
        self.path = Path(run_dir) / EVAL_NAME
        self.records = read_jsonl(self.path) if resume_iter is not None else []
        if resume_iter is not None:
            self.records = [r for r in self.records if r.get("iter", 0) <= resume_iter]

    def append(self, record: dict) -> None:
        self.records.append(record)
        with writing(self.path):
            atomic_write_jsonl(self.path, self.records)


def write_metrics(run_dir, summary: dict) -> None:
    path = Path(run_dir) / METRICS_NAME
    with writing(path):
        atomic_write_json(path, summary)
