"""GPU pool of the matrix scheduler: which GPUs are visible, and how many cells fit at once.

With N visible GPUs (CUDA_VISIBLE_DEVICES, else torch's count) and cells of g
GPUs (CONFIG_TRAIN_NUM_GPUS), floor(N/g) cells run at once, capped by
CONFIG_MATRIX_PARALLEL when it is above 0; the scheduler pins each cell to its
GPUs with CUDA_VISIBLE_DEVICES. On a machine without GPUs cells run one after
another (or `cpu_parallel` at once for `check`). GPUs are only ever selected,
never reset or reconfigured.
"""

import os


class SchedulerError(Exception):
    """The matrix cannot run on this machine as planned (e.g. not enough GPUs)."""


def visible_gpus(environ=None) -> list:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES when set, else every GPU torch sees."""
    environ = os.environ if environ is None else environ
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no torch or no driver: no GPUs
        return []


def gpus_needed(cell, gpu_ids) -> int:
    """GPUs a cell occupies: 0 for CPU cells (device cpu, or auto without GPUs)."""
    if cell.device == "cpu" or (cell.device == "auto" and not gpu_ids):
        return 0
    return cell.num_gpus


def check_feasible(cells, gpu_ids) -> None:
    """Refuse up front a cell that can never get its GPUs here (instead of failing it hours later)."""
    for cell in cells:
        if cell.device == "cpu":
            continue
        short = len(gpu_ids) < cell.num_gpus
        # device auto without any GPU falls back to one CPU process, which only works for 1-GPU cells
        if short and (cell.device == "cuda" or gpu_ids or cell.num_gpus > 1):
            raise SchedulerError(f"cell {cell.label} needs {cell.num_gpus} GPU(s) (CONFIG_TRAIN_NUM_GPUS, device "
                                 f"{cell.device}) but {len(gpu_ids)} are visible; lower CONFIG_TRAIN_NUM_GPUS "
                                 f"or run on a machine with more GPUs")


def parallel_cells(cells, gpu_ids, cap=0, cpu_parallel=1) -> int:
    """How many cells run at once: floor(N / g) on GPUs (capped by `cap`), cpu_parallel on CPU."""
    needs = [gpus_needed(c, gpu_ids) for c in cells] or [0]
    widest = max(needs)
    n = len(gpu_ids) // widest if widest else cpu_parallel
    if cap > 0:
        n = min(n, cap)
    return max(n, 1)
