"""The training budget and the progress a run has made against it.

A run stops when its *training* time reaches CONFIG_GPT2_MAX_TIME seconds or its step count reaches
CONFIG_TRAIN_MAX_ITERS, whichever comes first (0 disables either). Training time is the wall time of
optimizer steps only: the first step(s) of every process (torch.compile, cuBLAS and allocator warm-up)
are timed as compile time, and evaluation and checkpoint writing are timed on their own; none of these
is charged. The learning-rate schedule follows the budget fraction consumed,

    fraction = min(1, max(train_time / max_time, iters / max_iters)),

so a time-limited run still completes its decay. `Progress` is what a checkpoint carries, so a resumed
run spends only what is left.
"""

import math
from dataclasses import dataclass


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
    last_val_loss: float | None = None
    last_eval_iter: int = -1
    last_train_loss: float | None = None
    sessions: int = 0


def warmup_step_count(compile_enabled: bool, ddp: bool) -> int:
    """Steps timed as warm-up, not budget: the first (compilation, kernel selection, allocator growth);
    with torch.compile or DDP also the second (recompilation for the steady state, DDP bucket rebuild)."""
    return 2 if (compile_enabled or ddp) else 1
