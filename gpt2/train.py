"""The time-budgeted training loop: wires data, model, optimizer, checkpoints and metrics together.

Budget. A run stops when its *training* time reaches CONFIG_GPT2_MAX_TIME seconds or its step count
reaches CONFIG_TRAIN_MAX_ITERS, whichever comes first (0 disables either). Training time is the wall
time of optimizer steps only: the first step(s) of every process (torch.compile, cuBLAS and allocator
warm-up) are timed as compile time, and evaluation and checkpoint writing are timed on their own;
none of these is charged. The learning-rate schedule follows the budget fraction consumed,
max(train_time / max_time, iters / max_iters), so a time-limited run still completes its decay.

Hot loop. No host-device synchronisation per step: losses stay on the device and are read back at
"sync points" (log interval, evaluation, checkpoint, and budget checks planned from the measured step
time so the time budget is checked about when it runs out). Elapsed time is measured between sync
points, so it is exact device time; under DDP every rank agrees on it (max over ranks) and so takes
the same stop decision and the same learning rate.
"""

import argparse
import logging
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from gpt2 import checkpoint as ckpt
from gpt2 import distributed
from gpt2.metrics import EvalLog, flops_per_token, mfu, peak_flops, peak_memory_bytes, perplexity, write_metrics
from gpt2.model import GPT, build_model
from gpt2.optim import build_optimizer, lr_at, set_lr
from gpt2.tracking import build_tracker
from lib.runs import CHECKPOINT_NAME, LOG_NAME, RunDirError, prepare_run_dir, write_env_json

log = logging.getLogger("gpt2.train")


class TrainingFailed(RuntimeError):
    """The run cannot go on (non-finite loss, ...); the message becomes metrics.json's failure_reason."""


# ---- budget -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Budget:
    max_time_s: float  # 0 = no time cap
    max_iters: int  # 0 = no step cap

    def __post_init__(self):
        if self.max_time_s <= 0 and self.max_iters <= 0:
            raise ValueError("no budget: CONFIG_GPT2_MAX_TIME and CONFIG_TRAIN_MAX_ITERS are both 0; set one")

    def fraction(self, train_time_s: float, iters: float) -> float:
        """Fraction of the budget consumed: the further along of time and steps, in [0, 1]."""
        parts = []
        if self.max_time_s > 0:
            parts.append(train_time_s / self.max_time_s)
        if self.max_iters > 0:
            parts.append(iters / self.max_iters)
        return min(1.0, max(parts))

    def stop_reason(self, train_time_s: float, iters: int) -> str | None:
        if self.max_iters > 0 and iters >= self.max_iters:
            return "max_iters"
        if self.max_time_s > 0 and train_time_s >= self.max_time_s:
            return "max_time"
        return None


@dataclass
class Progress:
    """Counters a checkpoint carries so a resumed run spends only what is left."""
    iters: int = 0
    tokens_seen: int = 0
    train_time_s: float = 0.0  # charged to the budget
    timed_iters: int = 0  # steps inside train_time_s (excludes warm-up steps)
    timed_tokens: int = 0
    compile_time_s: float = 0.0
    eval_time_s: float = 0.0
    checkpoint_time_s: float = 0.0
    wall_time_s: float = 0.0  # whole-process wall time of all sessions before this one
    best_val_loss: float | None = None
    last_val_loss: float | None = None
    last_eval_iter: int = -1
    last_train_loss: float | None = None
    sessions: int = 0


# ---- precision and the optimizer step -----------------------------------------------------------

def autocast_context(device: torch.device, precision: str):
    """A factory of autocast contexts: bf16/fp16 autocast on CUDA; float32 (no autocast) otherwise."""
    if device.type == "cuda" and precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return lambda: torch.autocast(device_type="cuda", dtype=dtype)
    return nullcontext


def effective_precision(device: torch.device, precision: str) -> str:
    return precision if device.type == "cuda" else "fp32"


class TrainStep:
    """One optimizer step: grad_accum micro-batches of forward/backward, clipping, update, zero_grad.

    `model` is what runs forward (possibly compiled and/or DDP-wrapped); `raw_model` the bare GPT that
    owns the parameters. Returns the mean micro-batch loss as a device tensor (no synchronisation).
    """

    def __init__(self, model, raw_model: GPT, optimizer, *, device: torch.device, precision: str, grad_accum: int,
                 grad_clip: float, ddp: bool = False):
        self.model, self.raw_model, self.optimizer = model, raw_model, optimizer
        self.device, self.grad_accum, self.grad_clip, self.ddp = device, grad_accum, grad_clip, ddp
        self.autocast = autocast_context(device, precision)
        fp16 = device.type == "cuda" and precision == "fp16"
        self.scaler = torch.amp.GradScaler("cuda") if fp16 else None
        self.params = [p for p in raw_model.parameters() if p.requires_grad]
        self.has_regularizer = any(hasattr(m, "regularization_loss") for m in raw_model.attention_modules())
        self.grad_norm = None  # device tensor of the last step's pre-clip norm (read at log time)

    def to_device(self, x, y):
        if self.device.type == "cuda":
            return (x.pin_memory().to(self.device, non_blocking=True),
                    y.pin_memory().to(self.device, non_blocking=True))
        return x, y

    def __call__(self, batches, inject_nan: bool = False) -> torch.Tensor:
        loss_sum = None
        for micro in range(self.grad_accum):
            last = micro == self.grad_accum - 1
            x, y = self.to_device(*batches.next())
            # DDP: all-reduce gradients only on the last micro-batch.
            with self.model.no_sync() if self.ddp and not last else nullcontext():
                with self.autocast():
                    _, loss = self.model(x, y, return_logits=False)
                if inject_nan:
                    loss = loss * float("nan")
                objective = loss / self.grad_accum
                if last and self.has_regularizer:
                    objective = objective + self.raw_model.regularization_loss()
                (self.scaler.scale(objective) if self.scaler else objective).backward()
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.grad_clip > 0:
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum / self.grad_accum


@torch.no_grad()
def evaluate(model, raw_model, eval_batches, dctx, autocast) -> float:
    """Mean loss over the fixed validation batches (split across ranks, then averaged)."""
    raw_model.eval()
    mine = eval_batches[dctx.rank::dctx.world_size]
    total = torch.zeros(2, dtype=torch.float64, device=dctx.device)
    for x, y in mine:
        with autocast():
            _, loss = model(x, y, return_logits=False)
        total[0] += loss.double()
    total[1] = len(mine)
    total = distributed.all_reduce_sum(dctx, total)
    raw_model.train()
    return float(total[0] / total[1])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- logging ------------------------------------------------------------------------------------

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
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    if not is_main:
        log.addHandler(logging.NullHandler())
        return
    file_handler = logging.FileHandler(run_dir / LOG_NAME, mode="a")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    log.addHandler(file_handler)
    console = _TqdmHandler()
    console.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(console)


def close_logging() -> None:
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()


# ---- the run ------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def warmup_step_count(compile_enabled: bool, ddp: bool) -> int:
    """Steps timed as warm-up, not budget: the first (compilation, kernel selection, allocator growth);
    with torch.compile or DDP also the second (recompilation for the steady state, DDP bucket rebuild)."""
    return 2 if (compile_enabled or ddp) else 1


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
        seed_everything(s.general.seed + dctx.rank)

        from gpt2 import data  # the data layer pulls in tokenizers; imported when a run starts

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
                              grad_accum=self.micro_steps, grad_clip=train.grad_clip, ddp=dctx.enabled)

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
        self.p.sessions += 1
        self.wall_base = self.p.wall_time_s
        self.eval_log = EvalLog(self.run_dir, resume_iter) if dctx.is_main else None
        self.tokens_per_iter = train.batch_size * train.grad_accum * s.model.block_size
        head_dim = s.model.n_embd // s.model.n_head
        self.flops_per_token = flops_per_token(self.raw_model.num_params(non_embedding=True), s.model.n_layer,
                                               s.model.n_head, head_dim, s.model.block_size)
        self.peak_flops = peak_flops(self.device)
        self.tracker = build_tracker(s.tracking, self.run_dir, enabled=dctx.is_main)
        self.log_header(resume_iter)

    def log_header(self, resume_iter):
        s, dctx = self.s, self.dctx
        where = (torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "CPU")
        log.info(f"run {self.run_dir} | config {self.config_path}")
        if resume_iter is not None:
            log.info(f"resuming at iter {self.p.iters}: {self.p.train_time_s:.1f}s of training time and "
                     f"{self.p.tokens_seen:,} tokens already spent")
        cpu_note = ""
        if self.device.type == "cpu":
            cpu_note = " (the CPU always computes in float32" + (
                f"; CONFIG_PRECISION={s.general.precision} applies on CUDA only)" if s.general.precision != "fp32"
                else ")")
        log.info(f"device {where} x{dctx.world_size} | precision {self.precision}{cpu_note}"
                 + f" | compile {'on' if s.general.compile else 'off'}")
        log.info(f"model {s.model.n_layer}x{s.model.n_embd}, {s.model.n_head} heads, block {s.model.block_size}, "
                 f"attention {s.attention.backend}, mlp {s.mlp.kind}, {self.raw_model.num_params():,} parameters "
                 f"(vocab {self.vocab_size}, init {s.model.init_from})")
        log.info(f"data {self.data_path} | batch {s.train.batch_size} x accum {s.train.grad_accum} x block "
                 f"{s.model.block_size} = {self.tokens_per_iter:,} tokens/iter | optimizer {s.optimizer.name}")
        log.info(f"budget: {s.train.max_time_s or 'no'} s of training time, {s.train.max_iters or 'no'} iters "
                 f"(whichever ends first) | lr {s.train.lr:g} -> {s.train.lr_min:g} {s.train.schedule}, "
                 f"warm-up {s.train.warmup_fraction:g} of the budget")

    # -- the loop --
    def train(self):
        s, train, p, dctx = self.s, self.s.train, self.p, self.dctx
        warmup_steps = warmup_step_count(s.general.compile, dctx.enabled)
        steps_here = 0
        pending = []  # per-step loss tensors since the last sync point
        step_time_s = None  # agreed mean step time of the last timed chunk
        session_time_s, session_steps = 0.0, 0  # timed steps of this process, for a steadier estimate
        chunk_start, chunk_steps = None, 0
        next_budget_check = p.iters + 1
        lr = lr_at(self.budget.fraction(p.train_time_s, p.iters), train)
        self.bar = tqdm(total=1000, desc="budget", leave=False, dynamic_ncols=True,
                        disable=not (dctx.is_main and sys.stderr.isatty()),
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}] {postfix}")
        self.bar.update(int(1000 * self.budget.fraction(p.train_time_s, p.iters)))
        log_losses = []

        while True:
            self.stop_reason = self.budget.stop_reason(p.train_time_s, p.iters)
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
            if not (warm or due_log or due_eval or due_ckpt or due_budget):
                continue

            # ---- sync point: close the timed chunk, read the losses back ----
            if chunk_steps:
                sync(self.device)
                elapsed = distributed.all_reduce_max(dctx, time.perf_counter() - chunk_start)
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
            if due_eval:
                self.run_eval(lr)
            if due_ckpt:
                self.save()
            if step_time_s and self.budget.max_time_s > 0:
                # Plan the next time check for about when the budget runs out (the faster estimate, so early).
                remaining = self.budget.max_time_s - p.train_time_s
                fastest = min(step_time_s, session_time_s / session_steps)
                next_budget_check = p.iters + max(1, min(train.log_interval, math.ceil(remaining / fastest)))
            else:
                next_budget_check = p.iters + (1 if self.budget.max_time_s > 0 else train.log_interval)
            self.bar.update(int(1000 * self.budget.fraction(p.train_time_s, p.iters)) - self.bar.n)
            self.bar.set_postfix_str(f"iter {p.iters} loss {p.last_train_loss:.3f}")
            chunk_start = time.perf_counter()

        if log_losses:
            self.log_progress(log_losses, lr, step_time_s)
        if p.last_eval_iter != p.iters:
            self.run_eval(lr)
        self.bar.close()
        self.save()
        log.info(f"stopped by {self.stop_reason} at iter {p.iters}: {p.train_time_s:.1f}s training, "
                 f"{p.compile_time_s:.1f}s warm-up/compile, {p.eval_time_s:.1f}s eval, "
                 f"{p.checkpoint_time_s:.1f}s checkpoints")

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

    def finish(self):
        if self.tracker is not None:
            self.tracker.close()
        if self.bar is not None:
            self.bar.close()


def run(settings, config_path, run_dir, resume: bool = False, argv=None) -> int:
    """Train one run; returns the process exit code (0 done, 1 failed). Rank 0 writes the run directory."""
    r = Run(settings, config_path, run_dir, resume, argv)
    try:
        r.setup()
        if r.dctx.is_main:
            write_metrics(r.run_dir, r.summary())
        r.train()
        r.status = "done"
        if r.dctx.is_main:
            write_metrics(r.run_dir, r.summary())
            gap = r.unigram - r.p.last_val_loss
            log.info(f"final val loss {r.p.last_val_loss:.4f} (ppl {perplexity(r.p.last_val_loss):.2f}) vs unigram "
                     f"entropy of the val tokens {r.unigram:.4f} nats: {gap:+.4f} nats better than a unigram model")
        return 0
    except (Exception, KeyboardInterrupt) as exc:
        r.status = "failed"
        expected = isinstance(exc, (TrainingFailed, ckpt.CheckpointError, RunDirError))
        if isinstance(exc, KeyboardInterrupt):
            r.failure_reason = "interrupted (KeyboardInterrupt)"
        else:
            r.failure_reason = str(exc) if expected else f"{type(exc).__name__}: {exc}"
        if log.handlers:
            (log.error if expected else log.exception)(f"run failed: {r.failure_reason}")
        else:
            print(f"error: {r.failure_reason}", file=sys.stderr)
        # A directory that belongs to another run is left alone; otherwise the failure is recorded there.
        is_main = r.dctx.is_main if hasattr(r, "dctx") else int(os.environ.get("RANK", "0")) == 0
        if is_main and not isinstance(exc, RunDirError):
            r.run_dir.mkdir(parents=True, exist_ok=True)
            write_metrics(r.run_dir, r.summary())
        return 130 if isinstance(exc, KeyboardInterrupt) else 1
    finally:
        r.finish()
        close_logging()
        if hasattr(r, "dctx"):
            distributed.teardown(r.dctx)


# ---- command line -------------------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(description="Train GPT-2 for a time/step budget into a run directory.")
    parser.add_argument("--config", required=True, help="the .config to train with")
    parser.add_argument("--run-dir", required=True, help="run directory to create (or continue with --resume)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from <run-dir>/ckpt.pt with the budget that is left")
    return parser.parse_args(argv)


def main(argv=None, script=None) -> int:
    """Entry of scripts/train.py: load settings, re-launch under torchrun for several GPUs, train."""
    from lib.config import ConfigError, load_settings

    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if settings.train.num_gpus > 1 and not distributed.under_torchrun():
        device_type = distributed.resolve_device_type(settings.general.device)
        return distributed.relaunch(settings.train.num_gpus, script or sys.argv[0], argv, device_type)
    return run(settings, args.config, args.run_dir, args.resume, argv=[script or sys.argv[0], *argv])
