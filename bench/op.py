"""Sections op and layer: attention proper (per-head q, k, v -> y) and the whole attention module (x -> out),
per backend, eager and torch.compile'd, as GPU time and as a ratio to SDPA."""

import torch

from gpt2.model.attention import build_attention

from .common import BACKENDS, FAST_RA, MODES, NO_KV, act_dtype, attention_settings, autocast, compile_fn, \
    model_settings, time_fwd_and_bwd
from .step import profile_step

# Variants whose compiled op is worth its compile time: ra-unified's op is plain SDPA (its fold is in the
# GEMM) and ra-reference is slow by design.
COMPILED_OP_VARIANTS = {"sdpa", "ra-fold-full", "ra-fold-lowrank", "ra-same-flop", "ra-fold-full+disc",
                        "ra-fold-lowrank+disc", "ra-same-flop+disc", "ra-fold-full, 6/12 heads routed",
                        "ra-fold-lowrank, 6/12 heads routed"}


def op_variants():
    """(label, variant, routed): every backend, discoverability on the fast ones, routing on the folds."""
    out = [(b, b, False) for b in BACKENDS]
    out += [(f"{b}+disc", f"{b}+disc", False) for b in FAST_RA]
    out += [(f"{b}, 6/12 heads routed", b, True) for b in ("ra-fold-full", "ra-fold-lowrank")]
    return out


def build_module(variant, routed, H, D, T_max, rank, device):
    settings = model_settings(1, H, H * D, T_max)
    module = build_attention(settings, attention_settings(variant, rank, threshold=0.3 if routed else 0.0), NO_KV, 0)
    if routed:  # w_rec = 0.81 on even heads, 0.01 on odd heads (below the 0.3 threshold)
        with torch.no_grad():
            module.w_rec.sqrt_weight.copy_(torch.tensor([0.9, 0.1] * (H // 2) + [0.9] * (H % 2)))
        module.refresh_head_routing()
    return module.to(device)



def measure_op(bench, module, fn, shape, profile=None):
    """Attention proper: q, k, v (views of one QKV tensor, as in the model) -> y."""
    B, H, T, D = shape
    device = bench.device
    qkv = torch.randn(B, T, 3, H, D, device=device, dtype=act_dtype(device), requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    extras = [p for n, p in module.named_parameters() if not n.startswith(("c_attn", "c_proj"))]

    def forward():
        with autocast(device):
            return fn(q, k, v)

    return time_fwd_and_bwd(bench, forward, [qkv] + extras, profile)


def measure_layer(bench, module, fn, shape, profile=None):
    """The whole attention module x -> out (projections included)."""
    B, H, T, D = shape
    device = bench.device
    x = torch.randn(B, T, H * D, device=device, dtype=act_dtype(device), requires_grad=True)

    def forward():
        with autocast(device):
            return fn(x)

    return time_fwd_and_bwd(bench, forward, [x] + list(module.parameters()), profile)


def run_op_section(bench, w, name, labels=None, profile_dir=None, profile_labels=()):
    """Every op variant (or those of `labels`) at every shape, eager and (COMPILED_OP_VARIANTS) compiled;
    the compiled fwd+bwd of profile_labels' rows also as kernel tables in profile_dir (CUDA)."""
    shapes = w["op_shapes"]
    H, D = shapes[0][1], shapes[0][3]
    T_max = max(shape[2] for shape in shapes)
    rows = {}
    for label, variant, routed in [v for v in op_variants() if labels is None or v[0] in labels]:
        torch._dynamo.reset()  # each variant compiles from scratch (no recompile-limit fallback to eager)
        module = bench.attempt(f"{name} {label}: build",
                               lambda: build_module(variant, routed, H, D, T_max, w["rank"], bench.device))
        if module is None:
            continue
        target = module.attention_heads if name == "op" else module
        measure = measure_op if name == "op" else measure_layer
        fns = {"eager": target}
        if label in COMPILED_OP_VARIANTS:
            fns["compiled"] = compile_fn(target, bench.smoke)
        for shape in shapes:
            row = rows.setdefault((label, tuple(shape)), {"label": label, "shape": list(shape)})
            for mode, fn in fns.items():
                what = f"{name} {label} {shape} {mode}"
                print(what, flush=True)
                profile = None
                if profile_dir is not None and label in profile_labels and mode == "compiled" \
                        and bench.device.type == "cuda":
                    profile = lambda fwd_bwd, what=what: profile_step(fwd_bwd, what, profile_dir)  # noqa: E731
                r = bench.attempt(what, lambda m=module, f=fn, s=shape, p=profile: measure(bench, m, f, s, p))
                for part, value in (r or {}).items():
                    row[f"{mode}_{part}_ms"] = value
        del module, fns
    out = list(rows.values())
    for row in out:
        base = rows.get(("sdpa", tuple(row["shape"])), {})
        for mode in MODES:
            for key in ("fwd", "fwd_bwd"):
                ms, ref = row.get(f"{mode}_{key}_ms"), base.get(f"{mode}_{key}_ms")
                row[f"{mode}_{key}_ratio"] = ms / ref if ms and ref else None
    return out

