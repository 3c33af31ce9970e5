"""The training loop: check stop -> set lr -> step, and at sync points agree, read losses, log, eval, checkpoint.

Hot loop (the step itself is gpt2/train/step.py). No host-device synchronisation per step: losses stay on the
device and are read back at "sync points" (log interval, evaluation, checkpoint, and budget checks planned
from the measured step time so the time budget is checked about when it runs out; gpt2/train/budget.py's
BudgetClock). Elapsed time is measured between sync points, so it is exact device time; under DDP every
rank agrees on it (max over ranks) and so takes the same stop decision and the same learning rate.

An evaluation that improves on the best validation loss records its iteration and tokens in the progress,
which ckpt.pt carries over a resume, and copies the weights into host memory (checkpoint.BestWeights);
ckpt-best.pt (the model only, CONFIG_TRAIN_KEEP_BEST_CHECKPOINT) is written from that copy just before each
ckpt.pt (interval, end, interruption) and when the run fails, not at every improvement: so whenever the run
stops it holds the best weights, and a kill -9 loses only what the last ckpt.pt would lose too.

Interruption (gpt2/train/signals.py): SIGTERM/SIGINT stop the run after the current step; all DDP ranks
agree on it at a sync point; the run checkpoints and ends "interrupted" with exit code 128 + signal.
"""

import gc
import math
import time
from dataclasses import asdict

import torch

from gpt2.io import BEST_CHECKPOINT_NAME, CHECKPOINT_NAME, WARM_MARK
from gpt2.train import checkpoint as ckpt
from gpt2.train import distributed
from gpt2.train.budget import BudgetClock, warmup_step_count
from gpt2.train.log import budget_bar, check_log_writes, log
from gpt2.train.metrics import mfu, perplexity, write_metrics
from gpt2.train.optim import lr_at, set_lr
from gpt2.train.signals import StopSignals, signal_name
from gpt2.train.step import evaluate, sync
from gpt2.train.summary import summary
from gpt2.train.tracking import gate_scalars


class TrainingFailed(RuntimeError):
    """The run cannot go on (non-finite loss, ...); the message becomes metrics.json's failure_reason."""


def train(run, stop: StopSignals) -> int:
    """Train `run` (a set-up gpt2.train.trainer.Run) until the budget is spent or a stop signal is agreed on;
    ends with a checkpoint. Returns the agreed stop signal (0: none). A run that fails on the way still
    writes the best weights it has seen."""
    run.best_weights = ckpt.BestWeights() if run.s.train.keep_best_checkpoint and run.dctx.is_main else None
    run.session.start_loop(run.p)
    try:
        return _train(run, stop)
    except BaseException:
        write_best_after_failure(run)
        raise


def _train(run, stop: StopSignals) -> int:
    s, train, p, dctx = run.s, run.s.train, run.p, run.dctx
    warmup_steps = warmup_step_count(s.general.compile, dctx.enabled, run.cuda_graphs)
    clock = BudgetClock(run.budget, p.iters, sync=lambda: sync(run.device), every_step=run.device.type == "cpu")
    steps_here = 0
    compiled_before = p.compile_time_s  # a resumed run's record includes its earlier sessions' warm-ups
    signum = 0  # the stop signal all ranks agreed on at the last sync point (0: none)
    pending = []  # per-step loss tensors since the last sync point
    log_losses = []  # losses since the last log line
    lr = lr_at(run.budget.fraction(p.train_time_s, p.iters), train)
    run.bar = budget_bar(run.budget.fraction(p.train_time_s, p.iters), enabled=dctx.is_main)

    while True:
        run.stop_reason = run.budget.stop_reason(p.train_time_s, p.iters) or ("signal" if signum else None)
        if run.stop_reason:
            break
        lr = lr_at(clock.fraction_after_next_step(p), train)
        set_lr(run.optimizer, lr)
        warm = steps_here < warmup_steps
        inject_nan = train.inject_nan_at_iter == p.iters + 1
        if warm:
            loss = warmup_step(run, inject_nan)
        else:
            loss = run.step(run.batches, inject_nan=inject_nan)
            clock.count_step()
        steps_here += 1
        if steps_here == warmup_steps:
            # Compilation left ~10^6 long-lived objects; a cyclic collection walking them stalls the host for
            # tens of ms mid-step. Frozen, they are out of its reach; refcounting still frees what dies.
            gc.freeze()
            log.info(f"{WARM_MARK}: {warmup_steps} step(s) in {p.compile_time_s - compiled_before:.1f}s"
                     " (compilation included)")
        p.iters += 1
        p.tokens_seen += run.tokens_per_iter
        pending.append(loss)

        due_log = p.iters % train.log_interval == 0
        due_eval = p.iters % train.eval_interval == 0
        due_ckpt = train.checkpoint_interval > 0 and p.iters % train.checkpoint_interval == 0
        # One process reads its own signal after every step; ranks of a DDP run agree at sync points.
        due_stop = stop.requested and not dctx.enabled
        if not (warm or due_log or due_eval or due_ckpt or clock.check_due(p.iters) or due_stop):
            continue

        # ---- sync point: close the timed chunk, agree on a stop signal, read the losses back ----
        elapsed_s, agreed = distributed.all_reduce_max_values(dctx, [clock.chunk_elapsed_s(), float(stop.signum or 0)])
        signum = int(agreed)
        clock.close_chunk(elapsed_s, p, run.tokens_per_iter)
        losses = read_losses(run, pending, p.iters - len(pending) + 1)
        pending = []
        log_losses.extend(losses)
        p.last_train_loss = losses[-1]
        if due_log or (warm and p.iters == 1):
            log_progress(run, log_losses, lr, clock.step_time_s)
            log_losses = []
        check_log_writes()  # a train.log the disk refused ends the run here, not unrecorded at its end
        if signum:
            continue  # stop: the checkpoint after the loop stands in for this point's eval and checkpoint
        if due_eval:
            refresh_routing(run)
            run_eval(run, lr)
        # A budget spent here with this iteration evaluated: the loop ends next and its checkpoint, with nothing
        # in between, is this one (the same ckpt.pt written twice cost a full write).
        ends_here = run.budget.stop_reason(p.train_time_s, p.iters) and p.last_eval_iter == p.iters
        if due_ckpt and not ends_here:
            save(run)
        clock.plan_next_check(p, train.log_interval)
        run.bar.update(int(1000 * run.budget.fraction(p.train_time_s, p.iters)) - run.bar.n)
        run.bar.set_postfix_str(f"iter {p.iters} loss {p.last_train_loss:.3f}")
        clock.open_chunk()

    if log_losses:
        log_progress(run, log_losses, lr, clock.step_time_s)
    if p.last_eval_iter != p.iters and run.stop_reason != "signal":
        run_eval(run, lr)
    run.bar.close()
    save(run)
    run.session.end_loop(p)
    cause = f"{signal_name(signum)} (signal)" if run.stop_reason == "signal" else run.stop_reason
    startup = run.session.startup_s
    log.info(f"stopped by {cause} at iter {p.iters}: {p.train_time_s:.1f}s training, "
             f"{p.compile_time_s:.1f}s warm-up/compile, {p.eval_time_s:.1f}s eval, "
             f"{p.checkpoint_time_s:.1f}s checkpoints, {run.session.other_s(p):.1f}s logs/records; "
             + (f"{startup:.1f}s start-up and " if startup is not None else "")
             + f"{run.session.setup_s():.1f}s setup before the loop")
    return signum


def warmup_step(run, inject_nan: bool) -> torch.Tensor:
    """One step timed on its own (synchronised before and after) and charged to compile time, not the budget."""
    sync(run.device)
    t0 = time.perf_counter()
    loss = run.step(run.batches, inject_nan=inject_nan)
    sync(run.device)
    run.p.compile_time_s += distributed.all_reduce_max(run.dctx, time.perf_counter() - t0)
    return loss


def read_losses(run, pending, first_iter) -> list:
    """Copy per-step losses to the host (the sync), averaged over ranks; non-finite -> TrainingFailed."""
    if not pending:
        return []
    values = distributed.all_reduce_mean(run.dctx, torch.stack(pending).float()).tolist()
    for offset, value in enumerate(values):
        if not math.isfinite(value):
            raise TrainingFailed(f"non-finite training loss ({value}) at iter {first_iter + offset}")
    return values


def log_progress(run, losses, lr, step_time_s) -> None:
    p = run.p
    loss = sum(losses) / len(losses)
    tokens_per_s = run.tokens_per_iter / step_time_s if step_time_s else None
    util = mfu(tokens_per_s, run.flops_per_token, run.peak_flops, run.dctx.world_size)
    grad_norm = float(run.step.grad_norm) if run.step.grad_norm is not None else None
    parts = [f"iter {p.iters}", f"loss {loss:.4f}", f"lr {lr:.3e}"]
    if grad_norm is not None:
        parts.append(f"grad norm {grad_norm:.3f}")
    if step_time_s:
        parts.append(f"{step_time_s * 1000:.1f} ms/step, {tokens_per_s:,.0f} tok/s")
    if util is not None:
        parts.append(f"mfu {100 * util:.1f}%")
    parts.append(f"budget {100 * run.budget.fraction(p.train_time_s, p.iters):.1f}%")
    log.info(" | ".join(parts))
    if run.dctx.is_main:
        run.machine.sample()  # the load average only: a file read
    run.tracker.log({"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                     "perf/tokens_per_s": tokens_per_s, "perf/mfu": util}, p.iters)


def refresh_routing(run) -> None:
    """Let the model recompute what its forwards treat as constant (head routing) and log what changed."""
    for line in run.raw_model.refresh_routing():
        log.info(line)


def run_eval(run, lr) -> None:
    p = run.p
    sync(run.device)
    t0 = time.perf_counter()
    val_loss = evaluate(run.eval_model, run.raw_model, run.eval_batches, run.dctx, run.step.autocast,
                        run.cuda_graphs)
    p.eval_time_s += distributed.all_reduce_max(run.dctx, time.perf_counter() - t0)
    p.last_eval_iter = p.iters
    if not math.isfinite(val_loss):
        raise TrainingFailed(f"non-finite validation loss ({val_loss}) at iter {p.iters}")
    p.last_val_loss = val_loss
    improved = p.best_val_loss is None or val_loss < p.best_val_loss
    if improved:
        p.best_val_loss, p.best_val_iter, p.best_val_tokens = val_loss, p.iters, p.tokens_seen
    record = {"iter": p.iters, "tokens": p.tokens_seen, "train_time_s": round(p.train_time_s, 4),
              "wall_time_s": round(run.wall_time(), 4), "train_loss": p.last_train_loss,
              "val_loss": val_loss, "val_ppl": perplexity(val_loss), "lr": lr}
    log.info(f"eval iter {p.iters}: val loss {val_loss:.4f} (ppl {perplexity(val_loss):.2f}), "
             f"best {p.best_val_loss:.4f} (iter {p.best_val_iter}), unigram entropy {run.unigram:.4f}")
    if improved and run.s.train.keep_best_checkpoint:
        keep_best(run)
    if run.dctx.is_main:
        run.machine.sample(run.device)  # and the GPU's other processes (nvidia-smi, in the background)
        run.eval_log.append(record)
        write_metrics(run.run_dir, summary(run))
    run.tracker.log({"val/loss": val_loss, "val/ppl": perplexity(val_loss),
                     **gate_scalars(run.raw_model.gate_values())}, p.iters)


def save(run) -> None:
    """Checkpoint (all ranks take part: each contributes its RNG and data position)."""
    t0 = time.perf_counter()
    run.p.wall_time_s = run.wall_time()
    run.p.machine = run.machine.state()
    ranks = distributed.gather_objects(run.dctx, {"rng": ckpt.capture_rng_state(),
                                                  "data": run.batches.state_dict()})
    if run.dctx.is_main:
        if run.best_weights is not None:  # first: the best on disk, then the progress that names it
            run.best_weights.write(run.run_dir / BEST_CHECKPOINT_NAME, run.signature)
        ckpt.save_checkpoint(run.run_dir / CHECKPOINT_NAME, model=run.raw_model, optimizer=run.optimizer,
                             scaler=run.step.scaler, signature=run.signature, ranks=ranks,
                             progress=asdict(run.p))
    distributed.barrier(run.dctx)
    run.p.checkpoint_time_s += time.perf_counter() - t0


def keep_best(run) -> None:
    """Copy the weights of the evaluation that just improved on the best into host memory; save() writes them
    as ckpt-best.pt. Rank 0 keeps them (the weights are the same on every rank) and waits for its device to
    finish the copies (milliseconds), the others wait for rank 0: so the copy is charged to checkpoint time on
    all of them, not to the next chunk of training time, whose steps would otherwise queue behind it."""
    t0 = time.perf_counter()
    if run.best_weights is not None:
        run.best_weights.capture(run.raw_model, asdict(run.p))
        sync(run.device)
    distributed.barrier(run.dctx)
    run.p.checkpoint_time_s += time.perf_counter() - t0


def write_best_after_failure(run) -> None:
    """The run is failing: ckpt-best.pt from the weights kept since the last checkpoint, if any (rank 0, no
    collective: the other ranks may be anywhere). A write that fails too is said, not raised over the cause."""
    best = getattr(run, "best_weights", None)
    if best is None or not best.pending:
        return
    t0 = time.perf_counter()
    try:
        best.write(run.run_dir / BEST_CHECKPOINT_NAME, run.signature)
        log.info(f"wrote {BEST_CHECKPOINT_NAME}: the weights of the best evaluation (iter {best.iters})")
    except Exception as exc:
        log.warning(f"could not write {BEST_CHECKPOINT_NAME} with the best weights (iter {best.iters}): {exc}")
    run.p.checkpoint_time_s += time.perf_counter() - t0
