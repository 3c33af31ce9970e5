"""The time-budgeted training loop: wires data, model, optimizer, checkpoints and metrics together.

Budget (gpt2/budget.py). A run stops when its training time reaches CONFIG_GPT2_MAX_TIME seconds or its
step count reaches CONFIG_TRAIN_MAX_ITERS, whichever comes first; warm-up/compile, evaluation and
checkpoint time are timed on their own and never charged. The learning rate follows the budget fraction.

Hot loop (the step itself is gpt2/step.py). No host-device synchronisation per step: losses stay on the
device and are read back at "sync points" (log interval, evaluation, checkpoint, and budget checks planned
from the measured step time so the time budget is checked about when it runs out). Elapsed time is
measured between sync points, so it is exact device time; under DDP every rank agrees on it (max over
ranks) and so takes the same stop decision and the same learning rate.

Interruption (gpt2/train_signals.py): SIGTERM/SIGINT stop the run after the current step; all DDP ranks
agree on it at a sync point; the run checkpoints and ends "interrupted" with exit code 128 + signal.
"""

import math
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from gpt2.train import checkpoint as ckpt
from gpt2.model.attention import RoutingMonitor
from gpt2.train import distributed
from gpt2.train.budget import Budget, Progress, warmup_step_count
from gpt2.train.metrics import EvalLog, flops_per_token, mfu, peak_flops, peak_memory_bytes, perplexity, write_metrics
from gpt2.model.gpt import build_model
from gpt2.train.optim import build_optimizer, lr_at, set_lr
from gpt2.train.step import TrainStep, autocast_context, effective_precision, evaluate, sync
from gpt2.train.tracking import build_tracker
from gpt2.train.log import budget_bar, close_logging, header_lines, log, setup_logging
from gpt2.train.signals import Interrupted, StopSignals, exit_code, signal_name
from gpt2.io import CHECKPOINT_NAME
from gpt2.train.run_dir import RunDirError, prepare_run_dir, write_env_json


class TrainingFailed(RuntimeError):
    """The run cannot go on (non-finite loss, ...); the message becomes metrics.json's failure_reason."""


class Run:
    """One training run in one run directory (one instance per process; rank 0 writes)."""

    def __init__(self, settings, config_path, run_dir, resume: bool, argv=None):
        self.s = settings
        self.config_path = Path(config_path)
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.argv = argv
        self.t_start = time.perf_counter()
        self.wall_base = 0.0
        self.p = Progress()
        self.status = "running"
        self.failure_reason = None
        self.stop_reason = None
        self.unigram = None
        self.tracker = None
        self.bar = None
        self.routing = None  # RoutingMonitor when head-selective routing is on

    # -- setup --
    def setup(self):
        s, train = self.s, self.s.train
        self.dctx = distributed.setup(s.general.device)
        dctx = self.dctx
        self.budget = Budget(float(train.max_time_s), train.max_iters)
        if train.grad_accum % dctx.world_size:
            raise ValueError(f"CONFIG_TRAIN_GRAD_ACCUM={train.grad_accum} is not a multiple of the "
                             f"{dctx.world_size} processes; the global batch would change")
        self.micro_steps = train.grad_accum // dctx.world_size
        if dctx.is_main:
            prepare_run_dir(self.run_dir, self.config_path, self.resume)
        distributed.barrier(dctx)
        setup_logging(self.run_dir, dctx.is_main)
        if dctx.is_main:
            write_env_json(self.run_dir, self.argv)
        self.device = dctx.device
        self.precision = effective_precision(self.device, s.general.precision)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        ckpt.seed_everything(s.general.seed + dctx.rank)

        from gpt2.data import prepare as data  # the data layer pulls in tokenizers; imported when a run starts

        if dctx.is_main:
            data_path = data.prepare(s.data)
        distributed.barrier(dctx)
        if not dctx.is_main:
            data_path = data.prepare(s.data)
        self.data_path = Path(data_path)
        self.vocab_size = int(data.load_meta(self.data_path)["vocab_size"])
        self.unigram = float(data.unigram_entropy(self.data_path, "val"))

        self.raw_model = build_model(s, self.vocab_size).to(self.device)
        self.optimizer = build_optimizer(self.raw_model, s.optimizer, train.lr, self.device.type)
        self.batches = data.BatchSource(self.data_path, "train", s.model.block_size, train.batch_size,
                                        s.general.seed, rank=dctx.rank, world_size=dctx.world_size)
        self.eval_batches = [(x.to(self.device), y.to(self.device)) for x, y in
                             data.fixed_eval_batches(self.data_path, s.model.block_size, train.batch_size,
                                                     train.eval_batches)]
        self.signature = ckpt.signature(s, self.vocab_size, dctx.world_size, self.raw_model)

        model = torch.compile(self.raw_model) if s.general.compile else self.raw_model
        self.eval_model = model
        if dctx.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(model, device_ids=[dctx.local_rank] if self.device.type == "cuda" else None)
        self.step = TrainStep(model, self.raw_model, self.optimizer, device=self.device, precision=self.precision,
                              grad_accum=self.micro_steps, grad_clip=train.grad_clip, ddp=dctx.enabled,
                              compiled=s.general.compile)

        ckpt_path = self.run_dir / CHECKPOINT_NAME
        resume_iter = None
        if self.resume and ckpt_path.exists():
            state = ckpt.load_checkpoint(ckpt_path, self.signature)
            data_state = ckpt.restore_checkpoint(state, model=self.raw_model, optimizer=self.optimizer,
                                                 scaler=self.step.scaler, rank=dctx.rank, path=ckpt_path)
            if data_state is not None:
                self.batches.load_state_dict(data_state)
            self.p = Progress(**state["progress"])
            resume_iter = self.p.iters
            del state
        elif self.resume:
            log.info(f"--resume: no checkpoint in {self.run_dir}, starting from scratch")
        self.routing = RoutingMonitor(self.raw_model) if s.attention.head_select_threshold > 0 else None
        self.p.sessions += 1
        self.wall_base = self.p.wall_time_s
        self.eval_log = EvalLog(self.run_dir, resume_iter) if dctx.is_main else None
        self.tokens_per_iter = train.batch_size * train.grad_accum * s.model.block_size
        head_dim = s.model.n_embd // s.model.n_head
        self.flops_per_token = flops_per_token(self.raw_model.num_params(non_embedding=True), s.model.n_layer,
                                               s.model.n_head, head_dim, s.model.block_size)
        self.peak_flops = peak_flops(self.device)
        self.tracker = build_tracker(s.tracking, self.run_dir, enabled=dctx.is_main)
        for line in header_lines(self, resume_iter):
            log.info(line)
        self.refresh_routing()  # the loaded (or initial) gates decide the routing before the first step

    # -- the loop --
    def train(self, stop: StopSignals):
        """Train until the budget is spent or a stop signal is agreed on; ends with a checkpoint."""
        s, train, p, dctx = self.s, self.s.train, self.p, self.dctx
        warmup_steps = warmup_step_count(s.general.compile, dctx.enabled)
        steps_here = 0
        pending = []  # per-step loss tensors since the last sync point
        step_time_s = None  # agreed mean step time of the last timed chunk
        session_time_s, session_steps = 0.0, 0  # timed steps of this process, for a steadier estimate
        chunk_start, chunk_steps = None, 0
        next_budget_check = p.iters + 1
        signum = 0  # the stop signal all ranks agreed on at the last sync point (0: none)
        lr = lr_at(self.budget.fraction(p.train_time_s, p.iters), train)
        self.bar = budget_bar(self.budget.fraction(p.train_time_s, p.iters), enabled=dctx.is_main)
        log_losses = []

        while True:
            self.stop_reason = self.budget.stop_reason(p.train_time_s, p.iters) or ("signal" if signum else None)
            if self.stop_reason:
                break
            # Budget fraction at the end of the coming step; its time part is extrapolated from this
            # process's mean step time (identical on every rank: it is built from agreed times).
            mean_step_s = session_time_s / session_steps if session_steps else 0.0
            expected_time = p.train_time_s + (chunk_steps + 1) * mean_step_s
            lr = lr_at(self.budget.fraction(expected_time, p.iters + 1), train)
            set_lr(self.optimizer, lr)
            warm = steps_here < warmup_steps
            if warm:
                sync(self.device)
                t0 = time.perf_counter()
            loss = self.step(self.batches, inject_nan=train.inject_nan_at_iter == p.iters + 1)
            steps_here += 1
            p.iters += 1
            p.tokens_seen += self.tokens_per_iter
            pending.append(loss)
            if warm:
                sync(self.device)
                p.compile_time_s += distributed.all_reduce_max(dctx, time.perf_counter() - t0)
            else:
                chunk_steps += 1

            due_log = p.iters % train.log_interval == 0
            due_eval = p.iters % train.eval_interval == 0
            due_ckpt = train.checkpoint_interval > 0 and p.iters % train.checkpoint_interval == 0
            due_budget = p.iters >= next_budget_check or (train.max_iters and p.iters >= train.max_iters)
            # One process reads its own signal after every step; ranks of a DDP run agree at sync points.
            due_stop = stop.requested and not dctx.enabled
            if not (warm or due_log or due_eval or due_ckpt or due_budget or due_stop):
                continue

            # ---- sync point: close the timed chunk, agree on a stop signal, read the losses back ----
            local_elapsed_s = 0.0
            if chunk_steps:
                sync(self.device)
                local_elapsed_s = time.perf_counter() - chunk_start
            elapsed, agreed = distributed.all_reduce_max_values(dctx, [local_elapsed_s, float(stop.signum or 0)])
            signum = int(agreed)
            if chunk_steps:
                p.train_time_s += elapsed
                p.timed_iters += chunk_steps
                p.timed_tokens += chunk_steps * self.tokens_per_iter
                step_time_s = elapsed / chunk_steps
                session_time_s += elapsed
                session_steps += chunk_steps
            chunk_steps = 0
            losses = self.read_losses(pending, p.iters - len(pending) + 1)
            pending = []
            log_losses.extend(losses)
            p.last_train_loss = losses[-1]
            if due_log or (warm and p.iters == 1):
                self.log_progress(log_losses, lr, step_time_s)
                log_losses = []
            if signum:
                continue  # stop: the checkpoint after the loop stands in for this point's eval and checkpoint
            if due_eval:
                self.refresh_routing()
                self.run_eval(lr)
            if due_ckpt:
                self.save()
            next_budget_check = self.budget.next_check(p.iters, p.train_time_s, step_time_s,
                                                       session_time_s / session_steps if session_steps else 0.0,
                                                       train.log_interval)
            self.bar.update(int(1000 * self.budget.fraction(p.train_time_s, p.iters)) - self.bar.n)
            self.bar.set_postfix_str(f"iter {p.iters} loss {p.last_train_loss:.3f}")
            chunk_start = time.perf_counter()

        if log_losses:
            self.log_progress(log_losses, lr, step_time_s)
        if p.last_eval_iter != p.iters and self.stop_reason != "signal":
            self.run_eval(lr)
        self.bar.close()
        self.save()
        cause = f"{signal_name(signum)} (signal)" if self.stop_reason == "signal" else self.stop_reason
        log.info(f"stopped by {cause} at iter {p.iters}: {p.train_time_s:.1f}s training, "
                 f"{p.compile_time_s:.1f}s warm-up/compile, {p.eval_time_s:.1f}s eval, "
                 f"{p.checkpoint_time_s:.1f}s checkpoints")
        return signum

    def read_losses(self, pending, first_iter) -> list:
        """Copy per-step losses to the host (the sync), averaged over ranks; non-finite -> TrainingFailed."""
        if not pending:
            return []
        values = distributed.all_reduce_mean(self.dctx, torch.stack(pending).float()).tolist()
        for offset, value in enumerate(values):
            if not math.isfinite(value):
                raise TrainingFailed(f"non-finite training loss ({value}) at iter {first_iter + offset}")
        return values

    def throughput(self, step_time_s):
        tokens_per_s = self.tokens_per_iter / step_time_s if step_time_s else None
        return tokens_per_s, mfu(tokens_per_s, self.flops_per_token, self.peak_flops, self.dctx.world_size)

    def log_progress(self, losses, lr, step_time_s):
        p = self.p
        loss = sum(losses) / len(losses)
        tokens_per_s, util = self.throughput(step_time_s)
        grad_norm = float(self.step.grad_norm) if self.step.grad_norm is not None else None
        parts = [f"iter {p.iters}", f"loss {loss:.4f}", f"lr {lr:.3e}"]
        if grad_norm is not None:
            parts.append(f"grad norm {grad_norm:.3f}")
        if step_time_s:
            parts.append(f"{step_time_s * 1000:.1f} ms/step, {tokens_per_s:,.0f} tok/s")
        if util is not None:
            parts.append(f"mfu {100 * util:.1f}%")
        parts.append(f"budget {100 * self.budget.fraction(p.train_time_s, p.iters):.1f}%")
        log.info(" | ".join(parts))
        self.tracker.log({"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                          "perf/tokens_per_s": tokens_per_s, "perf/mfu": util}, p.iters)

    def refresh_routing(self):
        """Recompute head routing (a constant to compiled forwards) and log changed layers."""
        if self.routing is not None:
            for line in self.routing.refresh():
                log.info(line)

    def run_eval(self, lr):
        p = self.p
        sync(self.device)
        t0 = time.perf_counter()
        val_loss = evaluate(self.eval_model, self.raw_model, self.eval_batches, self.dctx, self.step.autocast)
        p.eval_time_s += distributed.all_reduce_max(self.dctx, time.perf_counter() - t0)
        p.last_eval_iter = p.iters
        if not math.isfinite(val_loss):
            raise TrainingFailed(f"non-finite validation loss ({val_loss}) at iter {p.iters}")
        p.last_val_loss = val_loss
        p.best_val_loss = val_loss if p.best_val_loss is None else min(p.best_val_loss, val_loss)
        record = {"iter": p.iters, "tokens": p.tokens_seen, "train_time_s": round(p.train_time_s, 4),
                  "wall_time_s": round(self.wall_time(), 4), "train_loss": p.last_train_loss,
                  "val_loss": val_loss, "val_ppl": perplexity(val_loss), "lr": lr}
        log.info(f"eval iter {p.iters}: val loss {val_loss:.4f} (ppl {perplexity(val_loss):.2f}), "
                 f"best {p.best_val_loss:.4f}, unigram entropy {self.unigram:.4f}")
        if self.dctx.is_main:
            self.eval_log.append(record)
            write_metrics(self.run_dir, self.summary())
        self.tracker.log({"val/loss": val_loss, "val/ppl": perplexity(val_loss)}, p.iters)

    def save(self):
        """Checkpoint (all ranks take part: each contributes its RNG and data position)."""
        t0 = time.perf_counter()
        self.p.wall_time_s = self.wall_time()
        ranks = distributed.gather_objects(self.dctx, {"rng": ckpt.capture_rng_state(),
                                                       "data": self.batches.state_dict()})
        if self.dctx.is_main:
            ckpt.save_checkpoint(self.run_dir / CHECKPOINT_NAME, model=self.raw_model, optimizer=self.optimizer,
                                 scaler=self.step.scaler, signature=self.signature, ranks=ranks,
                                 progress=asdict(self.p))
        distributed.barrier(self.dctx)
        self.p.checkpoint_time_s += time.perf_counter() - t0

    # -- records --
    def wall_time(self) -> float:
        return self.wall_base + (time.perf_counter() - self.t_start)

    def summary(self) -> dict:
        p = self.p
        tokens_per_s = p.timed_tokens / p.train_time_s if p.train_time_s > 0 else None
        raw = getattr(self, "raw_model", None)
        device = getattr(self, "device", torch.device("cpu"))
        return {
            "status": self.status,
            "failure_reason": self.failure_reason,
            "iters": p.iters,
            "tokens_seen": p.tokens_seen,
            "tokens_per_s": tokens_per_s,
            "ms_per_step": 1000 * p.train_time_s / p.timed_iters if p.timed_iters else None,
            "mfu": mfu(tokens_per_s, getattr(self, "flops_per_token", 0.0), getattr(self, "peak_flops", None),
                       self.dctx.world_size if hasattr(self, "dctx") else 1),
            "params": raw.num_params() if raw is not None else None,
            "final_val_loss": p.last_val_loss,
            "best_val_loss": p.best_val_loss,
            "final_val_ppl": perplexity(p.last_val_loss),
            "unigram_entropy": self.unigram,
            "peak_mem_bytes": peak_memory_bytes(device),
            "train_time_s": p.train_time_s,
            "eval_time_s": p.eval_time_s,
            "compile_time_s": p.compile_time_s,
            "checkpoint_time_s": p.checkpoint_time_s,
            "wall_time_s": self.wall_time(),
            "gates": raw.gate_values() if raw is not None else [],
            "stop_reason": self.stop_reason,
            "flops_per_token": getattr(self, "flops_per_token", None),
            "device": (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
            "world_size": self.dctx.world_size if hasattr(self, "dctx") else 1,
            "precision": getattr(self, "precision", None),
            "budget": {"max_time_s": self.s.train.max_time_s, "max_iters": self.s.train.max_iters},
            "sessions": p.sessions,
        }

    def record_outcome(self, exc: BaseException) -> None:
        """metrics.json after a failure or an early interruption; a directory of another run is left alone."""
        is_main = self.dctx.is_main if hasattr(self, "dctx") else int(os.environ.get("RANK", "0")) == 0
        if is_main and not isinstance(exc, RunDirError):
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_metrics(self.run_dir, self.summary())

    def finish(self):
        if self.tracker is not None:
            self.tracker.close()
        if self.bar is not None:
            self.bar.close()


def run(settings, config_path, run_dir, resume: bool = False, argv=None) -> int:
    """Train one run; returns the process exit code: 0 done, 1 failed, 128 + signal number when a SIGINT or
    SIGTERM interrupted it (metrics.json status "interrupted"). Rank 0 writes the run directory."""
    r = Run(settings, config_path, run_dir, resume, argv)
    stop = StopSignals()
    stop.install()
    try:
        r.setup()
        if r.dctx.is_main:
            write_metrics(r.run_dir, r.summary())
        stop.defer()  # from here on a signal stops the loop after its step, with a checkpoint
        signum = r.train(stop)
        r.status = "interrupted" if r.stop_reason == "signal" else "done"
        if r.dctx.is_main:
            write_metrics(r.run_dir, r.summary())
            if r.status == "interrupted":
                log.info(f"interrupted by {signal_name(signum)} at iter {r.p.iters}; the checkpoint is written, "
                         f"--resume continues with the budget that is left")
            else:
                gap = r.unigram - r.p.last_val_loss
                verdict = f"{gap:.4f} nats better than" if gap > 0 else f"{-gap:.4f} nats WORSE than"
                log.info(f"final val loss {r.p.last_val_loss:.4f} (ppl {perplexity(r.p.last_val_loss):.2f}) vs "
                         f"unigram entropy of the val tokens {r.unigram:.4f} nats: {verdict} a unigram model "
                         f"(one that knows only token frequencies)")
        return exit_code(signum) if r.status == "interrupted" else 0
    except (Interrupted, KeyboardInterrupt) as exc:  # before the loop: nothing to checkpoint
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        r.status, r.stop_reason = "interrupted", "signal"
        message = f"interrupted by {signal_name(signum)} before training started"
        if log.handlers:
            log.warning(message)
        else:
            print(message, file=sys.stderr)
        r.record_outcome(exc)
        return exit_code(signum)
    except Exception as exc:
        r.status = "failed"
        expected = isinstance(exc, (TrainingFailed, ckpt.CheckpointError, RunDirError))
        r.failure_reason = str(exc) if expected else f"{type(exc).__name__}: {exc}"
        if log.handlers:
            (log.error if expected else log.exception)(f"run failed: {r.failure_reason}")
        else:
            print(f"error: {r.failure_reason}", file=sys.stderr)
        r.record_outcome(exc)
        return 1
    finally:
        r.finish()
        close_logging()
        if hasattr(r, "dctx"):
            distributed.teardown(r.dctx)
        stop.restore()
