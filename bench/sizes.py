"""Section sizes: the whole training step at every model size a preset uses, with and without CUDA graphs.

The step table (bench/step.py) measures GPT-2 124M only; a ratio there says nothing about a small model, whose
step is short enough for the host's work (Python, dispatch, launches) to matter. This section times sdpa, a
second sdpa build (the A/A control) and the fast RA backends, bracketed and interleaved exactly as the step
section does, for each size and compile mode: torch.compile's default, and "reduce-overhead" (CUDA graphs: the
forward and backward each replay as one launch, which takes the host out of the step). On an H200 (2026-11-29,
results/bench/attention-nvidia-h200.md) CUDA graphs made no size of this step faster: its batch is already on
the GPU and it has no dropout. A matrix cell's own step (section loop) is host-bound at the mini size and gains
from them, which is why the offline GPU presets set CONFIG_TORCH_COMPILE_CUDA_GRAPHS.
"""

import torch

from .step import build_and_time, build_step, profile_step, summarize

# (name, model) for every size a preset trains: the offline GPU presets' GPT-2 mini, the RA study's 124M and
# the 350M the README's scaling notes quote. vocab 50304: GPT-2's BPE padded as the trainer pads it.
SIZES = [
    ("mini 6x384 T256 B64", dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64)),
    ("124M 12x768 T1024 B16", dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=16)),
    ("350M 24x1024 T1024 B8", dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024, batch_size=8)),
]
COMPILE_MODES = ["default", "reduce-overhead"]
SIZE_VARIANTS = ["sdpa", "ra-unified", "sdpa+again", "ra-same-flop"]
SMOKE_SIZE = ("smoke", dict(n_layer=2, n_head=2, n_embd=16, block_size=16, batch_size=2))


def run_sizes_section(bench, w, sizes=None, modes=None, variants=None, rounds=15, warmup=3, steps=10, profile_dir=None,
                      profile_variants=()):
    """[{size, mode, workload, variants}] for every size x compile mode (names from SIZES / COMPILE_MODES);
    profile_variants' kernel and host tables go to profile_dir as profile-<size>-<mode>-<variant>.txt (CUDA)."""
    chosen = [SMOKE_SIZE] if bench.smoke else [s for s in SIZES if sizes is None or s[0].split()[0] in sizes]
    modes = ["default"] if bench.smoke else (modes or COMPILE_MODES)
    if bench.smoke:
        warmup, rounds, steps = 1, 1, 1
    out = []
    for name, shape in chosen:
        for mode in modes:
            sw = {**w, "step": {**shape, "vocab_size": w["step"]["vocab_size"]}, "compile_mode": mode}
            bench.section = f"sizes {name} {mode}"
            results, built = build_and_time(bench, sw, variants or SIZE_VARIANTS,
                                            lambda v, sw=sw: build_step(v, sw, bench.device, sw["compile"]),
                                            f"sizes {name} {mode}", warmup, rounds, steps)
            if profile_dir is not None and bench.device.type == "cuda":
                for variant in [v for v in built if v in profile_variants]:
                    label = f"{name.split()[0]} {mode} {variant}"
                    bench.attempt(f"profile {label}", lambda s=built[variant], l=label: profile_step(s, l, profile_dir))
            summarize(results, shape["batch_size"] * shape["block_size"])
            built.clear()
            torch._dynamo.reset()  # each size compiles afresh; the graphs of the last one are not needed
            out.append({"size": name, "mode": mode, "workload": {**sw["step"], "rounds": rounds,
                                                                "steps_per_round": steps}, "variants": results})
    return out
