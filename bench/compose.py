"""Section compose (on request): ra-unified's weight-composition kernels at every width a preset uses, per launch
setting, against the casts they replace.

In the baseline, autocast casts c_attn's fp32 weight to bf16 before the QKV GEMM and the bf16 weight gradient
back to fp32 after it; ra-unified's forward kernel writes the composed bf16 weight in the cast's place and its
backward writes the fp32 gradient (plus the gates', P's and u's). Whatever the kernels cost beyond those casts is
ra-unified's whole extra cost per micro-step. The section times, per width, the casts and each candidate launch
setting of the two kernels, with one layer's tensors per model layer in turn (at least MIN_COPIES, so the L2
cache holds none of them, as in a training step), as GPU time per layer. Each candidate's output is compared with
the settings in use, so a faster setting that computes something else shows. compose_kernel's FWD_BLOCK_C and
the others come from this table. At the settings in use it also times one launch for all the layers (what the
trainer runs: compose_ops.compose_every_layer), against one launch per layer.
"""

import torch

from gpt2.model.attention import build_attention
from gpt2.model.attention.compose_ops import offset_table
from gpt2.model.attention.triton_support import HAVE_TRITON, INTERPRET, why_not_triton

from .common import NO_KV, attention_settings, fmt, model_settings, table_lines
from .sizes import SIZES

# (columns per program, warps): BLOCK_C 128 and more spilled registers at 4 warps on an H100 (attention-notes.md).
FWD_CANDIDATES = [(16, 2), (16, 4), (32, 2), (32, 4), (32, 8), (64, 4), (64, 8), (128, 8)]
BWD_CANDIDATES = [(16, 2), (16, 4), (16, 8), (32, 4), (32, 8), (64, 8)]
MIN_COPIES = 24
SMOKE_WIDTH = ("smoke", dict(n_layer=2, n_head=2, n_embd=32))


def layer_tensors(shape, rank, device, copies, seed=0):
    """[(the composition's arguments, bf16 gradient of W~, of b~)] for `copies` layers of one width."""
    m = build_attention(model_settings(shape["n_layer"], shape["n_head"], shape["n_embd"], 1024),
                        attention_settings("ra-unified", rank), NO_KV, 0).to(device)
    C = shape["n_embd"]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        P = m.projection(m.P.dtype).detach().contiguous()
        empty = torch.empty(0, device=device)
        roots = [empty if g is None else g.detach() for g in m.gate_roots()]
        out = []
        for _ in range(copies):
            W = (torch.randn(3 * C, C, generator=gen) * 0.02).to(device)
            b = (torch.randn(3 * C, generator=gen) * 0.02).to(device)
            G = torch.randn(3 * C, C, generator=gen).to(device, torch.bfloat16)
            Gb = torch.randn(3 * C, generator=gen).to(device, torch.bfloat16)
            out.append(((W, b, P, *roots, m.std_dim, m.head_select_threshold), G, Gb))
    return out


def moved_bytes(C, H, D, R, block_c, kernel):
    """Bytes one layer's kernel reads and writes (the bias is column C; partial sums: backward only)."""
    from gpt2.model.attention.compose_kernel import partial_entries

    cells = 3 * C * (C + 1)
    if kernel == "forward":  # fp32 W and b in, bf16 W~ and b~ out
        return cells * (4 + 2)
    n_blocks = -(-(C + 1) // block_c)
    partials = H * n_blocks * partial_entries(D, R, False) * 4  # the benchmark's layers have no u
    # bf16 G in, the q and k rows of W in, fp32 dW out; partials written once and read once by the finish
    return cells * 2 + 2 * C * (C + 1) * 4 + cells * 4 + 2 * partials


def rel_diff(a, b) -> float:
    if a.numel() == 0:
        return 0.0
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def run_compose_section(bench, w):
    """{"widths": [...]} (or {"skipped": why}) for every preset width: casts and kernels, us per layer."""
    if not HAVE_TRITON or (bench.device.type != "cuda" and not INTERPRET):
        return {"skipped": why_not_triton()}
    from gpt2.model.attention import compose_kernel as ck

    out = []
    for name, shape in [SMOKE_WIDTH] if bench.smoke else SIZES:
        C, H = shape["n_embd"], shape["n_head"]
        D, R = C // H, w["rank"]
        copies = 1 if bench.smoke else max(MIN_COPIES, shape["n_layer"])
        layers = layer_tensors(shape, R, bench.device, copies)

        def per_layer_us(fn):
            return bench.attempt(f"compose {name}", lambda: 1000 * bench.gpu_ms(fn) / copies)

        def forward(block_c, warps):
            return [ck.compose_forward(*args, torch.bfloat16, block_c, warps, u_dim=0) for args, _, _ in layers]

        def backward(block_c, warps):
            return [ck.compose_backward(G, Gb, *args, block_c, warps, u_dim=0) for args, G, Gb in layers]

        # One launch for every layer, as compose_ops.compose_every_layer runs it: a W~ and a dW per layer.
        outs = [torch.empty_like(args[0], dtype=torch.bfloat16) for args, _, _ in layers]
        dWs = [torch.empty_like(args[0]) for args, _, _ in layers]
        forward_table = offset_table([list(col) for col in zip(*(args[:7] + (o,)
                                                                  for (args, _, _), o in zip(layers, outs)))])
        backward_table = offset_table([list(col) for col in zip(*(args[:7] + (G, Gb, d)
                                                                   for (args, G, Gb), d in zip(layers, dWs)))])

        def forward_at_once(block_c, warps):
            table, align = forward_table
            out, out_b = ck.compose_forward(*layers[0][0], torch.bfloat16, block_c, warps, u_dim=0, layers=copies,
                                            table=table, align=align, out=outs[0])
            return [(out, out_b[: 3 * C])]  # layer 0's, to compare with the per-layer launch's

        def backward_at_once(block_c, warps):
            (args, G, Gb), (table, align) = layers[0], backward_table
            grads = ck.compose_backward(G, Gb, *args, block_c, warps, u_dim=0, layers=copies, table=table,
                                        align=align, dW=dWs[0])
            return [[g if i == 0 else g[: g.shape[0] // copies] for i, g in enumerate(grads)]]

        casts = {"forward": per_layer_us(lambda: [(a[0].to(torch.bfloat16), a[1].to(torch.bfloat16))
                                                  for a, _, _ in layers]),
                 "backward": per_layer_us(lambda: [(G.float(), Gb.float()) for _, G, Gb in layers])}
        fwd_used, bwd_used = (ck.FWD_BLOCK_C, ck.FWD_WARPS), (ck.BWD_BLOCK_C, ck.BWD_WARPS)
        refs = {"forward": forward(*fwd_used)[0], "backward": backward(*bwd_used)[0]}
        refs.update({f"{k}, every layer in one launch": refs[k] for k in ("forward", "backward")})
        rows = []
        for kernel, run, candidates, used in (
                ("forward", forward, FWD_CANDIDATES, fwd_used), ("backward", backward, BWD_CANDIDATES, bwd_used),
                ("forward, every layer in one launch", forward_at_once, FWD_CANDIDATES, fwd_used),
                ("backward, every layer in one launch", backward_at_once, BWD_CANDIDATES, bwd_used)):
            for block_c, warps in candidates if not bench.smoke else [used, candidates[0]]:
                first = bench.attempt(f"compose {name} {kernel} {block_c}x{warps}", lambda: run(block_c, warps)[0])
                us = per_layer_us(lambda: run(block_c, warps)) if first is not None else None
                diff = None if first is None else max(rel_diff(a, b) for a, b in zip(first, refs[kernel]))
                nbytes = moved_bytes(C, H, D, R, block_c, kernel.partition(",")[0])
                rows.append({"kernel": kernel, "block_c": block_c, "warps": warps, "us": us, "bytes": nbytes,
                             "tb_s": None if not us else nbytes / us / 1e6, "rel_diff": diff,
                             "in_use": (block_c, warps) == used})
        out.append({"size": name, "C": C, "H": H, "D": D, "R": R, "copies": copies, "casts_us": casts,
                    "rows": rows})
        layers.clear()
    return {"widths": out}


def best_rows(block):
    """{kernel: the fastest measured row} of one width."""
    best = {}
    for r in block["rows"]:
        if r["us"] is not None and (r["kernel"] not in best or r["us"] < best[r["kernel"]]["us"]):
            best[r["kernel"]] = r
    return best


def compose_lines(section):
    if not section:
        return []
    lines = ["## Weight composition kernels (ra-unified)", ""]
    if section.get("skipped"):
        return lines + [f"Not measured: {section['skipped']}.", ""]
    lines += ["GPU time per layer (us) of the kernels that compose c_attn's weight (forward) and return its "
              "gradients (backward: the main kernel and the one that adds its partial sums), at each width a preset "
              "trains, per launch setting (columns per program x warps), beside the casts autocast runs in their "
              "place in the baseline. One layer's tensors per model layer in turn (at least "
              f"{MIN_COPIES}), so L2 holds none of them. TB/s = the bytes a kernel must move over its time. "
              "rel diff = the largest difference from the setting in use (*), relative to the largest value.", ""]
    rows = []
    for block in section["widths"]:
        best = best_rows(block)
        for r in block["rows"]:
            cast = block["casts_us"].get(r["kernel"].partition(",")[0])
            mark = ("*" if r["in_use"] else "") + (" fastest" if best.get(r["kernel"]) is r else "")
            rows.append([f"{block['size']} (C {block['C']}, {block['H']} heads)", r["kernel"],
                         f"{r['block_c']} x {r['warps']}{mark}", fmt(r["us"], ".1f"), fmt(r["tb_s"], ".2f"),
                         fmt(cast, ".1f"), fmt(r["us"] / cast if r["us"] and cast else None, ".2f", "x"),
                         fmt(r["rel_diff"], ".1e")])
    lines += table_lines(["width", "kernel", "columns x warps", "us/layer", "TB/s", "casts us", "x casts",
                          "rel diff"], rows)
    return lines + [""]
