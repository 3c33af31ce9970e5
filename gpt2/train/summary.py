"""What a run reports about itself: metrics.json's record and the closing log line.

metrics.json is rewritten (atomically) when setup ends, at every evaluation, at the end, and after a failure
or an early interruption, so that a run stopped at any point leaves a record of how far it got. A run whose
setup failed part-way reports what it has (its attributes not yet built are None).
"""

import os

import torch

from gpt2.train.metrics import mfu, peak_memory_bytes, perplexity, write_metrics
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
        "final_val_ppl": perplexity(p.last_val_loss),
        "unigram_entropy": run.unigram,
        "peak_mem_bytes": peak_memory_bytes(device),
        "train_time_s": p.train_time_s,
        "eval_time_s": p.eval_time_s,
        "compile_time_s": p.compile_time_s,
        "checkpoint_time_s": p.checkpoint_time_s,
        "wall_time_s": run.wall_time(),
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
    }


def record_outcome(run, exc: BaseException) -> None:
    """metrics.json after a failure or an early interruption; a directory of another run is left alone."""
    is_main = run.dctx.is_main if run.dctx is not None else int(os.environ.get("RANK", "0")) == 0
    if is_main and not isinstance(exc, RunDirError):
        run.run_dir.mkdir(parents=True, exist_ok=True)
        write_metrics(run.run_dir, summary(run))


def closing_line(run, signum: int) -> str:
    """The run's last log line: how to go on after an interruption, else the final loss against the unigram
    entropy of the validation tokens (the loss of a model that knows only token frequencies)."""
    p = run.p
    if run.status == "interrupted":
        return (f"interrupted by {signal_name(signum)} at iter {p.iters}; the checkpoint is written, "
                f"--resume continues with the budget that is left")
    gap = run.unigram - p.last_val_loss
    verdict = f"{gap:.4f} nats better than" if gap > 0 else f"{-gap:.4f} nats WORSE than"
    return (f"final val loss {p.last_val_loss:.4f} (ppl {perplexity(p.last_val_loss):.2f}) vs "
            f"unigram entropy of the val tokens {run.unigram:.4f} nats: {verdict} a unigram model "
            f"(one that knows only token frequencies)")
