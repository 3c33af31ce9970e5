"""The trainer's console and train.log output: rank 0 logs to both, other ranks stay silent."""

import logging
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from gpt2.io import LOG_NAME

log = logging.getLogger("gpt2.train.trainer")


class _TqdmHandler(logging.StreamHandler):
    """Console lines printed above the progress bar instead of through it."""

    def emit(self, record):
        try:
            tqdm.write(self.format(record), file=sys.stdout)
        except Exception:
            self.handleError(record)


def setup_logging(run_dir: Path, is_main: bool) -> None:
    log.setLevel(logging.INFO)
    log.propagate = False
    close_logging()
    if not is_main:
        log.addHandler(logging.NullHandler())
        return
    file_handler = logging.FileHandler(Path(run_dir) / LOG_NAME, mode="a")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    log.addHandler(file_handler)
    console = _TqdmHandler()
    console.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(console)


def close_logging() -> None:
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()


def budget_bar(initial_fraction: float, enabled: bool):
    """A progress bar over the budget fraction (0..1000), shown on a terminal only."""
    bar = tqdm(total=1000, desc="budget", leave=False, dynamic_ncols=True,
               disable=not (enabled and sys.stderr.isatty()),
               bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}] {postfix}")
    bar.update(int(1000 * initial_fraction))
    return bar


def header_lines(run, resume_iter) -> list:
    """What the run is about to do: where, on what, with which model, data and budget."""
    s, p = run.s, run.p
    where = torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else "CPU"
    lines = [f"run {run.run_dir} | config {run.config_path}"]
    if resume_iter is not None:
        lines.append(f"resuming at iter {p.iters}: {p.train_time_s:.1f}s of training time and "
                     f"{p.tokens_seen:,} tokens already spent")
    cpu_note = ""
    if run.device.type == "cpu":
        cpu_note = " (the CPU always computes in float32" + (
            f"; CONFIG_PRECISION={s.general.precision} applies on CUDA only)" if s.general.precision != "fp32"
            else ")")
    lines.append(f"device {where} x{run.dctx.world_size} | precision {run.precision}{cpu_note}"
                 + f" | compile {'on' if s.general.compile else 'off'}")
    lines.append(f"model {s.model.n_layer}x{s.model.n_embd}, {s.model.n_head} heads, block {s.model.block_size}, "
                 f"attention {s.attention.backend}, mlp {s.mlp.kind}, {run.raw_model.num_params():,} parameters "
                 f"(vocab {run.vocab_size}, init {s.model.init_from})")
    lines.append(f"data {run.data_path} | batch {s.train.batch_size} x accum {s.train.grad_accum} x block "
                 f"{s.model.block_size} = {run.tokens_per_iter:,} tokens/iter | optimizer {s.optimizer.name}")
    lines.append(f"budget: {s.train.max_time_s or 'no'} s of training time, {s.train.max_iters or 'no'} iters "
                 f"(whichever ends first) | lr {s.train.lr:g} -> {s.train.lr_min:g} {s.train.schedule}, "
                 f"warm-up {s.train.warmup_fraction:g} of the budget")
    return lines
