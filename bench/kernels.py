"""Kernel micro-benchmarks: which SDPA kernel takes the folded widths (sdpa), gate scaling on the QKV
projection (gates), and KV-pruning key selection, exact top-k vs sampled threshold (kv)."""

import contextlib
import math
import warnings

import torch
import torch.nn.functional as F

from gpt2.model import kv_pruning
from gpt2.settings import KVPruningSettings

from .common import KEEP_RATIO, MODES, act_dtype, autocast, compile_fn, time_fwd_and_bwd

# ---- section: which SDPA kernel takes the folded widths ------------------------------------------

SDPA_WIDTHS = [(64, 64), (128, 64), (128, 128), (72, 64), (72, 72), (80, 64)]  # (q/k head dim, v head dim)


def run_sdpa_section(bench, w):
    """Causal SDPA fwd+bwd at the long op shape for q/k widths the folds produce, per kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, H, T, _ = w["op_shapes"][-1]
    device, dtype = bench.device, act_dtype(bench.device)
    kernels = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION}
    rows = []
    for dqk, dv in SDPA_WIDTHS:
        q, k = (torch.randn(B, H, T, dqk, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
        v = torch.randn(B, H, T, dv, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(B, H, T, dv, device=device, dtype=dtype)
        row = {"dqk": dqk, "dv": dv}
        for name, backend in kernels.items():
            def fwd_bwd(backend=backend):
                ctx = sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()
                with ctx:
                    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.125)
                torch.autograd.grad(out, [q, k, v], grad)

            def timed(fn=fwd_bwd):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # a refused kernel explains itself at length
                    try:
                        fn()
                    except RuntimeError as exc:
                        if "No available kernel" in str(exc):
                            return None  # this kernel does not take the shape: n/a, not a failure
                        raise
                    return bench.gpu_ms(fn)

            row[name] = bench.attempt(f"sdpa {name} q/k {dqk} v {dv}", timed) if device.type == "cuda" else None
        rows.append(row)
    return {"shape": [B, H, T], "kernels": list(kernels), "rows": rows}



# ---- section: gate scaling on the QKV projection -------------------------------------------------

def run_gate_section(bench, w):
    """Three ways to apply per-head gates (same-FLOP layout, R reciprocal dims per head) to the QKV output."""
    B, T, H, D = w["gate_shape"]
    C, R = H * D, w["rank"]
    device = bench.device
    x = torch.randn(B, T, C, device=device, dtype=act_dtype(device), requires_grad=True)
    weight = (torch.randn(3 * C, C, device=device) * 0.02).requires_grad_()
    w_std = torch.rand(H, device=device).requires_grad_()
    w_rec = torch.rand(H, device=device).requires_grad_()

    def column_scale():  # (3C,): q columns get [w_std x (D - R), w_rec x R] per head, k and v get 1
        per_head = torch.cat([w_std.view(H, 1).expand(H, D - R), w_rec.view(H, 1).expand(H, R)], 1).reshape(C)
        return torch.cat([per_head, per_head.new_ones(2 * C)])

    def plain():
        return F.linear(x, weight)

    def split_scale_cat():
        qkv = F.linear(x, weight).view(B, T, 3, H, D)
        q = qkv[:, :, 0]
        q = torch.cat([q[..., : D - R] * w_std.view(H, 1).to(q.dtype), q[..., D - R:] * w_rec.view(H, 1).to(q.dtype)], -1)
        return torch.cat([q.unsqueeze(2), qkv[:, :, 1:]], 2)

    def one_scale_tensor():
        return F.linear(x, weight) * column_scale().to(x.dtype)

    def composed_weight():
        return F.linear(x, weight * column_scale().unsqueeze(1))

    rows = []
    for label, fn in (("GEMM only (no gates)", plain), ("split / scale / cat", split_scale_cat),
                      ("one scale tensor", one_scale_tensor), ("gates composed into the weight", composed_weight)):
        inputs = [x, weight] + ([w_std, w_rec] if fn is not plain else [])
        row = {"label": label}
        for mode, f in (("eager", fn), ("compiled", compile_fn(fn, bench.smoke))):
            def forward(f=f):
                with autocast(device):
                    return f()

            r = bench.attempt(f"gates {label} {mode}", lambda: time_fwd_and_bwd(bench, forward, inputs))
            row[f"{mode}_fwd_bwd_ms"] = r["fwd_bwd"] if r else None
        rows.append(row)
    for mode in MODES:
        base = rows[0][f"{mode}_fwd_bwd_ms"]
        for row in rows:
            ms = row[f"{mode}_fwd_bwd_ms"]
            row[f"{mode}_ratio"] = ms / base if ms and base else None
    return {"shape": {"B": B, "T": T, "H": H, "D": D, "R": R}, "rows": rows}


# ---- section: KV pruning selection -------------------------------------------------------------

def run_kv_section(bench, w):
    """Selection over (1, 12, T) importance vectors, every row keeping k = ceil(0.382 T) keys."""
    device = bench.device
    kv = KVPruningSettings(enabled=True, keep_ratio=KEEP_RATIO, recency_window=0, use_sampling=True,
                           sampling_min_length=0, sample_fraction=0.02)
    fns = {"eager": (kv_pruning.select_exact, kv_pruning.select_sampled),
           "compiled": (compile_fn(kv_pruning.select_exact, bench.smoke),
                        compile_fn(kv_pruning.select_sampled, bench.smoke))}
    rows = []
    for T in w["kv_lengths"]:
        importance = torch.rand(1, 12, T, device=device).pow(3)
        k, n_sample = math.ceil(KEEP_RATIO * T), kv_pruning.sample_size(kv, T)
        row = {"T": T, "k": k, "sample": n_sample}
        for mode, (exact_fn, sampled_fn) in fns.items():
            def timed(fn):
                fn()  # compile / warm up
                return bench.gpu_ms(fn)

            exact = bench.attempt(f"kv exact T={T} {mode}", lambda: timed(lambda: exact_fn(importance, k)))
            sampled = bench.attempt(f"kv sampled T={T} {mode}",
                                    lambda: timed(lambda: sampled_fn(importance, k, T, n_sample)))
            row.update({f"{mode}_exact_ms": exact, f"{mode}_sampled_ms": sampled,
                        f"{mode}_speedup": exact / sampled if exact and sampled else None})
        row["sampled_keep_over_k"] = bench.attempt(f"kv keep count T={T}", lambda: torch.stack(
            [kv_pruning.select_sampled(importance, k, T, n_sample).sum(-1).float() for _ in range(10)]
        ).mean().item() / k)
        rows.append(row)
    return {"heads": 12, "keep_ratio": KEEP_RATIO, "sample_fraction": 0.02, "rows": rows}

