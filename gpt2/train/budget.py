"""The training budget and the progress a run has made against it.

A run stops when its *training* time reaches CONFIG_GPT2_MAX_TIME seconds or its step count reaches
CONFIG_TRAIN_MAX_ITERS, whichever comes first (0 disables either). Training time is the wall time of
optimizer steps only: the first step(s) of every process (torch.compile, cuBLAS and allocator warm-up)
are timed as compile time, and evaluation and checkpoint writing are timed on their own; none of these
is charged. The learning-rate schedule follows the budget fraction consumed,

    fraction = min(1, max(train_time / max_time, iters / max_iters)),

so a time-limited run still completes its decay. `Progress` is what a checkpoint carries, so a resumed
run spends only what is left; `BudgetClock` is the loop's time bookkeeping between its sync points.
"""

import math
import time
from dataclasses import dataclass
from typing import Callable

from gpt2.settings import check_budget


@dataclass(frozen=True)
class Budget:
    max_time_s: float  # 0 = no time cap
    max_iters: int  # 0 = no step cap

    def __post_init__(self):
        check_budget(self.max_time_s, self.max_iters)

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

    def next_check(self, iters: int, train_time_s: float, step_time_s: float | None, mean_step_s: float,
                   log_interval: int) -> int:
        """The iteration of the next time-budget check (a sync point), planned from the measured step time.

        With a time cap it lands about when the budget runs out, estimated with the faster of the last
        chunk's and the session's mean step time (so early rather than late), and at least every
        log_interval steps; without a measured step time it checks every step. Without a time cap the
        step cap needs no sync, so the check is only every log_interval steps.
        """
        if step_time_s and self.max_time_s > 0:
            remaining_s = self.max_time_s - train_time_s
            fastest_s = min(step_time_s, mean_step_s)
            return iters + max(1, min(log_interval, math.ceil(remaining_s / fastest_s)))
        return iters + (1 if self.max_time_s > 0 else log_interval)


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
    best_val_iter: int | None = None  # the evaluation that found best_val_loss (ckpt-best.pt holds its weights)
    best_val_tokens: int | None = None
    last_val_loss: float | None = None
    last_eval_iter: int = -1
    last_train_loss: float | None = None
    sessions: int = 0
    machine: dict | None = None  # gpt2.train.machine.MachineLoad's samples over all sessions


class BudgetClock:
    """Times the training loop's steps in chunks between sync points and plans the next budget check.

    Steps after the warm-up run without host-device synchronisation; a sync point closes the open chunk,
    and its elapsed time, agreed over ranks (the max), is charged to the budget. Every estimate here is
    built from agreed times only, so every rank computes the same learning rate and stop decision.
    """

    def __init__(self, budget: Budget, iters: int, sync: Callable[[], None], every_step: bool = False):
        """every_step: check a time cap after every step. Right where a sync point costs nothing (the CPU, which
        computes as the host waits): the run then stops within one step of its budget however the step time
        moves (on a loaded machine it does), instead of at a check planned from earlier step times."""
        self.budget = budget
        self.every_step = every_step and budget.max_time_s > 0
        self.sync = sync  # waits for the device, so that host time covers the queued steps
        self.step_time_s = None  # agreed mean step time of the last closed chunk
        self.session_time_s, self.session_steps = 0.0, 0  # timed steps of this process, for a steadier estimate
        self.chunk_start, self.chunk_steps = None, 0
        self.next_check = iters + 1

    def mean_step_s(self) -> float:
        return self.session_time_s / self.session_steps if self.session_steps else 0.0

    def fraction_after_next_step(self, p: Progress) -> float:
        """Budget fraction at the end of the coming step; its time part is extrapolated with the session's
        mean step time over the steps of the open chunk and the coming one:

            time = train_time_s + (chunk_steps + 1) * mean_step_s
        """
        expected_time_s = p.train_time_s + (self.chunk_steps + 1) * self.mean_step_s()
        return self.budget.fraction(expected_time_s, p.iters + 1)

    def count_step(self) -> None:
        """One more timed (post-warm-up) step in the open chunk."""
        self.chunk_steps += 1

    def check_due(self, iters: int) -> bool:
        """Whether the budget must be checked after step `iters` (the planned check, or the step cap)."""
        return (self.every_step or iters >= self.next_check
                or (self.budget.max_iters > 0 and iters >= self.budget.max_iters))

    def chunk_elapsed_s(self) -> float:
        """This process's time since the chunk opened, after waiting for the device (0 for an empty chunk)."""
        if not self.chunk_steps:
            return 0.0
        self.sync()
        return time.perf_counter() - self.chunk_start

    def close_chunk(self, elapsed_s: float, p: Progress, tokens_per_iter: int) -> None:
        """Charge the chunk's agreed elapsed time to the budget and take its mean step time."""
        if self.chunk_steps:
            p.train_time_s += elapsed_s
            p.timed_iters += self.chunk_steps
            p.timed_tokens += self.chunk_steps * tokens_per_iter
            self.step_time_s = elapsed_s / self.chunk_steps
            self.session_time_s += elapsed_s
            self.session_steps += self.chunk_steps
        self.chunk_steps = 0

    def plan_next_check(self, p: Progress, log_interval: int) -> None:
        self.next_check = self.budget.next_check(p.iters, p.train_time_s, self.step_time_s, self.mean_step_s(),
                                                 log_interval)

    def open_chunk(self) -> None:
        """Start timing the next chunk (the last thing a sync point does)."""
        self.chunk_start = time.perf_counter()


def warmup_step_count(compile_enabled: bool, ddp: bool, cuda_graphs: bool = False) -> int:
    """Steps timed as warm-up, not budget: the first (compilation, kernel selection, allocator growth);
    with torch.compile or DDP also the second (recompilation for the steady state, DDP bucket rebuild);
    with CUDA graphs also the third (the first replays record the graphs)."""
    if cuda_graphs:
        return 3
    return 2 if (compile_enabled or ddp) else 1
