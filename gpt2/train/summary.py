"""What a run reports about itself: metrics.json's record and the closing log line.

metrics.json is rewritten (atomically) when setup ends, at every evaluation, at the end, and after a failure
or an early interruption, so that a run stopped at any point leaves a record of how far it got. A run whose
setup failed part-way reports what it has (its attributes not yet built are None). When even that record
cannot be written (a full disk), the console says so in one line: recording an outcome never raises.
"""

import os
import sys

import torch

from gpt2.io import BEST_CHECKPOINT_NAME
from gpt2.train.disk import RunWriteError
from gpt2.train.metrics import mfu, peak_memory_bytes, perplexity, write_metrics
from gpt2.io import LockHeld
from gpt2.train.run_dir import RunDirError
from gpt2.train.signals import signal_name


def summary(run) -> dict:
    """metrics.json of `run` (a gpt2.train.trainer.Run) as it stands."""
    p = run.p
    tokens_per_s = p.timed_tokens / p.train_time_s if p.train_time_s > 0 else None
    raw, device = run.raw_model, run.device or torch.device("cpu")
    world_size = run.dctx.world_size if run.dctx is not None else 1
    return {
        "status": run.status,
        "failure_reason": run.failure_reason,
        "iters": p.iters,
        "tokens_seen": p.tokens_seen,
        # passes over the training split: above 1 the run has seen its data before (a small-data study)
        "train_tokens": run.train_tokens,
        "epochs": p.tokens_seen / run.train_tokens if run.train_tokens else None,
        "tokens_per_s": tokens_per_s,
        "ms_per_step": 1000 * p.train_time_s / p.timed_iters if p.timed_iters else None,
        "mfu": mfu(tokens_per_s, run.flops_per_token or 0.0, run.peak_flops, world_size),
        "params": raw.num_params() if raw is not None else None,
        "final_val_loss": p.last_val_loss,
        "best_val_loss": p.best_val_loss,
        "best_val_iter": p.best_val_iter,  # the evaluation that found it (ckpt-best.pt holds its weights)
        "best_val_tokens": p.best_val_tokens,
        "past_val_minimum": past_val_minimum(p),
        "final_val_ppl": perplexity(p.last_val_loss),
        "unigram_entropy": run.unigram,
        "peak_mem_bytes": peak_memory_bytes(device),
        "train_time_s": p.train_time_s,
        "eval_time_s": p.eval_time_s,
        "compile_time_s": p.compile_time_s,
        "checkpoint_time_s": p.checkpoint_time_s,
        "wall_time_s": run.wall_time(),
        # this process's wall time outside the loop's accounts: start-up, setup, other loop work, teardown
        # (gpt2.train.metrics.SessionClock says which is which)
        "overhead": run.session.record(p),
        "gates": raw.gate_values() if raw is not None else [],
        "stop_reason": run.stop_reason,
        "flops_per_token": run.flops_per_token,
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
        "world_size": world_size,
        "precision": run.precision,
        "budget": {"max_time_s": run.s.train.max_time_s, "max_iters": run.s.train.max_iters,
                   # training time past a time cap that stopped the run (the cap is checked between steps)
                   "overshoot_s": (max(0.0, p.train_time_s - run.s.train.max_time_s)
                                   if run.stop_reason == "max_time" else None)},
        "sessions": p.sessions,
        "machine": run.machine.record(device.type),
    }


def past_val_minimum(p) -> dict | None:
    """How far the run went past its lowest validation loss: None when its last evaluation is the best (or
    ties it, or there was none); else the loss it gave back ("by") and the training after the best."""
    if p.best_val_iter is None or p.last_val_loss is None or p.last_val_loss <= p.best_val_loss:
        return None
    return {"by": p.last_val_loss - p.best_val_loss, "tokens_after": p.tokens_seen - p.best_val_tokens,
            "iters_after": p.iters - p.best_val_iter}


def record_outcome(run, exc: BaseException) -> None:
    """metrics.json after a failure or an early interruption; a directory of another run is left alone."""
    is_main = run.dctx.is_main if run.dctx is not None else int(os.environ.get("RANK", "0")) == 0
    if not is_main or isinstance(exc, (RunDirError, LockHeld)):
        return
    try:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        write_metrics(run.run_dir, summary(run))
    except Exception as error:  # the outcome stands; say it where it can still be said
        what = str(error) if isinstance(error, RunWriteError) else f"{type(error).__name__}: {error}"
        ended = f"the run {run.status}" + (f": {run.failure_reason}" if run.failure_reason not in (None, what) else "")
        try:
            # one "<Name>Error: ..." line, the form lib/matrix/cell.py reads a cause from
            print(f"RunWriteError: {what} (recording that {ended})", file=sys.stderr, flush=True)
        except OSError:
            pass  # no console either: the exit code is all that is left


def closing_line(run, signum: int) -> str:
    """The run's last log line: how to go on after an interruption, else the final loss against the unigram
    entropy of the validation tokens (the loss of a model that knows only token frequencies)."""
    p = run.p
    if run.status == "interrupted":
        return (f"interrupted by {signal_name(signum)} at iter {p.iters}; the checkpoint is written, "
                f"--resume continues with the budget that is left")
    gap = run.unigram - p.last_val_loss
    verdict = f"{gap:.4f} nats better than" if gap > 0 else f"{-gap:.4f} nats WORSE than"
    line = (f"final val loss {p.last_val_loss:.4f} (ppl {perplexity(p.last_val_loss):.2f}) vs "
            f"unigram entropy of the val tokens {run.unigram:.4f} nats: {verdict} a unigram model "
            f"(one that knows only token frequencies)")
    past = past_val_minimum(p)
    if past is not None:
        kept = f"; {BEST_CHECKPOINT_NAME} holds those weights" if (run.run_dir / BEST_CHECKPOINT_NAME).is_file() else ""
        line += (f"; PAST its validation minimum: best {p.best_val_loss:.4f} at iter {p.best_val_iter}, "
                 f"{past['by']:.4f} lower, {past['iters_after']} iters ({past['tokens_after']:,} tokens) before "
                 f"the end{kept}")
    machine = run.machine.record(run.device.type)
    if machine["busy"]:
        line += f"; the machine was busy ({machine['busy_reason']}): times and tokens/s are not clean"
    return line
