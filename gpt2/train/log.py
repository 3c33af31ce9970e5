"""The trainer's console and train.log output: rank 0 logs to both, other ranks stay silent.

A line that cannot be written (a full disk) must not become one "--- Logging error ---" traceback per line,
as logging's handlers would print: train.log keeps its first failure and writes no more, and the loop ends
the run with it at its next sync point (check_log_writes); a console that is gone is left alone.
"""

import logging
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from gpt2.io import LOG_NAME
from gpt2.train.disk import RunWriteError, failure_reason

log = logging.getLogger("gpt2.train.trainer")


class _TqdmHandler(logging.StreamHandler):
    """Console lines printed above the progress bar instead of through it."""

    def emit(self, record):
        try:
            tqdm.write(self.format(record), file=sys.stdout)
        except OSError:
            pass  # a closed pipe or a full disk behind a redirect: nowhere left to say it
        except Exception:
            self.handleError(record)


class _RunLogFile(logging.FileHandler):
    """train.log that keeps its first failed write as `failure` (an OSError) and then writes nothing more."""

    failure = None

    def _open(self):
        # builtins.open looked up when called, like every other write of the run (logging's handler binds the open
        # of its import time): one seam where tests/test_reliability_disk.py stands in for a full disk
        return open(self.baseFilename, self.mode, encoding=self.encoding, errors=self.errors)

    def emit(self, record):
        if self.failure is None:
            super().emit(record)  # write + flush; what the disk refuses reaches handleError or flush below

    def handleError(self, record):
        _, error, _ = sys.exc_info()
        if isinstance(error, OSError):
            self.failure = self.failure or error
        else:
            super().handleError(record)

    def flush(self):
        try:
            super().flush()
        except OSError as error:
            self.failure = self.failure or error

    def close(self):
        try:
            super().close()  # closing flushes what a full disk did not take
        except OSError as error:
            self.failure = self.failure or error


def setup_logging(run_dir: Path, is_main: bool) -> None:
    log.setLevel(logging.INFO)
    log.propagate = False
    close_logging()
    if not is_main:
        log.addHandler(logging.NullHandler())
        return
    file_handler = _RunLogFile(Path(run_dir) / LOG_NAME, mode="a", encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    log.addHandler(file_handler)
    console = _TqdmHandler()
    console.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(console)


def check_log_writes() -> None:
    """Raise RunWriteError when train.log could not be written (the run would go on unrecorded)."""
    for handler in log.handlers:
        if isinstance(handler, _RunLogFile) and handler.failure is not None:
            raise RunWriteError(failure_reason(handler.failure, handler.baseFilename))


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
    compiled = "off"
    if s.general.compile:
        compiled = "on, CUDA graphs" if run.cuda_graphs else "on"
        if s.general.cuda_graphs and not run.cuda_graphs:
            compiled += " (CONFIG_TORCH_COMPILE_CUDA_GRAPHS needs CUDA: without graphs)"
    lines.append(f"device {where} x{run.dctx.world_size} | precision {run.precision}{cpu_note} | compile {compiled}")
    lines.append(f"model {s.model.n_layer}x{s.model.n_embd}, {s.model.n_head} heads, block {s.model.block_size}, "
                 f"attention {s.attention.backend}, mlp {s.mlp.kind}, {run.raw_model.num_params():,} parameters "
                 f"(vocab {run.vocab_size}, init {s.model.init_from})")
    lines.append(f"data {run.data_path} | batch {s.train.batch_size} x accum {s.train.grad_accum} x block "
                 f"{s.model.block_size} = {run.tokens_per_iter:,} tokens/iter | optimizer {s.optimizer.name}")
    lines.append(f"budget: {s.train.max_time_s or 'no'} s of training time, {s.train.max_iters or 'no'} iters "
                 f"(whichever ends first) | lr {s.train.lr:g} -> {s.train.lr_min:g} {s.train.schedule}, "
                 f"warm-up {s.train.warmup_fraction:g} of the budget")
    return lines
