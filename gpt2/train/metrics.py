"""Throughput and utilisation: FLOPs per token, MFU, peak memory, and the run's JSON records."""

import math
from pathlib import Path

import torch

from gpt2.io import EVAL_NAME, METRICS_NAME, atomic_write_json, atomic_write_jsonl, read_jsonl

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
        atomic_write_jsonl(self.path, self.records)


def write_metrics(run_dir, summary: dict) -> None:
    atomic_write_json(Path(run_dir) / METRICS_NAME, summary)
