"""The attention benchmark's measurements (scripts/bench_attention.py is its command line).

    common.py   backends, settings builders, workload sizes, Bench (GPU / wall-clock timing, failures)
    op.py       sections op and layer: attention per backend, eager and compiled
    kernels.py  sections sdpa (kernel per folded width), gates (gate scaling), kv (KV key selection)
    step.py     sections step (one micro-batch) and step-accum (the trainer's step with accumulation)
    report.py   goal verdicts, the original study's ladder, merging a --sections run into the saved report
    render.py   report.md and the PNG
"""
