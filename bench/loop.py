"""Section loop: the optimizer step a matrix cell really runs, for each step of a preset, side by side.

The step and sizes sections time models built here (bench/common.py: dropout 0, the gate settings written
there, one fixed batch already on the GPU). A cell runs something else: the settings its .config resolves to
(the preset's dropout, every Kconfig default), the real BatchSource (a batch from pinned host memory every
step) and gpt2.train.trainer.Run's TrainStep with whatever the model adds to the objective. A cost that lives
only there (in the partial H200 matrix of 2026-11-29, V1 trained 12% slower than V0 while the bare step was
1.007x) is invisible to those sections. This one writes each cell's config exactly as the matrix planner does
(the preset expanded, the step's overrides applied, validated: lib.config), builds a Run and calls its
setup() (data, model, optimizer, compile), then times run.step(run.batches) in the bracketed, interleaved
rounds of bench/step.py, the preset's first step being the baseline and a second build of it
("<first>+again") the A/A control. It also sums each step's kernel time (torch.profiler): wall time above it
is time the GPU waited for the host.
"""

import re
import tempfile
from pathlib import Path

import torch

from .step import build_and_time, profile_step, summarize

AGAIN = "+again"


def loop_variants(steps) -> list:
    """The preset's steps with a second build of the first one (the A/A control) after the second."""
    steps = list(steps)
    return steps[:2] + [steps[0] + AGAIN] + steps[2:]


def preset_steps(preset) -> list:
    """The ablation steps a matrix preset names (CONFIG_MATRIX_STEPS); V0, V1 for a preset that has none."""
    from lib import config as kcfg

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base.config"
        kcfg.apply_defconfig(kcfg.preset_path(preset), base)
        steps = kcfg.load_settings(base, environ={}).matrix.steps
    return list(steps) or ["V0", "V1"]


class CellRuns:
    """One set-up Run per variant, in a scratch directory: what `make cell` would build for seed 1."""

    def __init__(self, preset, work_dir: Path):
        from lib import config as kcfg

        self.work_dir = work_dir
        self.base = work_dir / "base.config"
        kcfg.apply_defconfig(kcfg.preset_path(preset), self.base)
        self.runs = []

    def build(self, variant):
        """variant: a step id, optionally with "+again" (a second build) and "@SYMBOL=value" overrides after it
        ("V1@TORCH_COMPILE_CUDA_GRAPHS=n")."""
        from gpt2.train.log import close_logging
        from gpt2.train.trainer import Run
        from lib import config as kcfg
        from lib.config.steps import select_steps

        head, *assignments = variant.split("@")
        (step,) = select_steps([head.removesuffix(AGAIN)])
        overrides = dict(a.split("=", 1) for a in assignments)
        name = re.sub(r"[^A-Za-z0-9_.=-]", "-", variant)
        config = self.work_dir / f"{name}.config"
        kcfg.write_cell_config(self.base, {**step.overrides, "SEED": "1", "MATRIX": "n", **overrides}, config)
        close_logging()
        run = Run(kcfg.load_settings(config, environ={}), config, self.work_dir / "runs" / name, resume=False)
        self.runs.append(run)
        run.setup()
        return lambda: run.step(run.batches)

    def close(self):
        from gpt2.train.log import close_logging

        for run in self.runs:
            run.finish()
        close_logging()


def run_loop_section(bench, preset, steps=None, warmup=3, rounds=15, per_round=10, profile_dir=None,
                     profile_variants=()):
    """{preset, variants, workload}: every variant's real cell step, bracketed against the first step; the
    profile_variants' kernel and host tables go to profile_dir (CUDA only)."""
    if bench.smoke:
        warmup, rounds, per_round = 1, 1, 1
    variants = loop_variants(steps or preset_steps(preset))
    with tempfile.TemporaryDirectory(prefix="bench-loop-") as tmp:
        cells = CellRuns(preset, Path(tmp))
        try:
            w = {"compile": True}  # only the budget check of build_and_time reads it
            results, built = build_and_time(bench, w, variants, cells.build, "loop", warmup, rounds, per_round,
                                            baseline=variants[0])
            for variant, step in built.items():
                kernel_ms = bench.attempt(f"loop {variant} (kernel time)", lambda: bench.gpu_ms(step, iters=10))
                if kernel_ms is not None:
                    results[variant]["kernel_ms"] = kernel_ms
                if profile_dir is not None and variant in profile_variants and bench.device.type == "cuda":
                    bench.attempt(f"profile loop {variant}",
                                  lambda: profile_step(step, f"loop {variant}", profile_dir))
            workload = {"preset": preset, "rounds": rounds, "steps_per_round": per_round}
            if cells.runs:  # every variant shares the preset's model size and batch
                run, s = cells.runs[0], cells.runs[0].s
                summarize(results, s.train.batch_size * s.train.grad_accum * s.model.block_size,
                          baseline=variants[0])
                workload.update(n_layer=s.model.n_layer, n_head=s.model.n_head, n_embd=s.model.n_embd,
                                block_size=s.model.block_size, batch_size=s.train.batch_size,
                                grad_accum=s.train.grad_accum, dropout=s.model.dropout,
                                compile=s.general.compile, precision=run.precision, device=str(run.device))
            built.clear()
        finally:
            cells.close()
    torch._dynamo.reset()
    return {"workload": workload, "baseline": variants[0], "variants": results}
