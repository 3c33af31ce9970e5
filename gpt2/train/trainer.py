"""One training run: wires data, model, optimizer, step and checkpoint together, then runs the loop.

Budget (gpt2/train/budget.py). A run stops when its training time reaches CONFIG_GPT2_MAX_TIME seconds or its
step count reaches CONFIG_TRAIN_MAX_ITERS, whichever comes first; warm-up/compile, evaluation and
checkpoint time are timed on their own and never charged. The learning rate follows the budget fraction.

    trainer.py   Run.setup(): data, model, optimizer, TrainStep, resume from ckpt.pt; run(): the exit code
    loop.py      the loop and its sync points (log, eval, checkpoint, stop)
    summary.py   metrics.json and the closing log line
"""

import signal
import sys
import time
from pathlib import Path

import torch

from gpt2.io import CHECKPOINT_NAME
from gpt2.model.gpt import build_model
from gpt2.train import checkpoint as ckpt
from gpt2.train import distributed
from gpt2.train.budget import Budget, Progress
from gpt2.train.log import close_logging, header_lines, log, setup_logging
from gpt2.train.loop import TrainingFailed, refresh_routing, train
from gpt2.train.metrics import EvalLog, flops_per_token, peak_flops, write_metrics
from gpt2.train.optim import build_optimizer
from gpt2.train.run_dir import RunDirError, prepare_run_dir, write_env_json, write_settings_json
from gpt2.train.signals import Interrupted, StopSignals, exit_code, signal_name
from gpt2.train.step import TrainStep, effective_precision
from gpt2.train.summary import closing_line, record_outcome, summary
from gpt2.train.tracking import build_tracker


class Run:
    """One training run in one run directory (one instance per process; rank 0 writes).

    The state the loop (gpt2/train/loop.py) and the record (gpt2/train/summary.py) work on. Attributes that
    setup() builds are None until it has, so a run that failed part-way still reports what it got to.
    """

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
        self.dctx = None
        self.device = None
        self.precision = None
        self.raw_model = None
        self.flops_per_token = None
        self.peak_flops = None
        self.train_tokens = None  # of the training split, for the epoch count

    def setup(self):
        """Everything the loop needs, in order: process group, run directory and logging, data, model and
        step, the checkpoint to resume from, and the run's records."""
        self.start_process()
        self.prepare_data()
        self.build_model_and_step()
        resume_iter = self.resume_from_checkpoint()
        s = self.s
        self.p.sessions += 1
        self.wall_base = self.p.wall_time_s
        self.eval_log = EvalLog(self.run_dir, resume_iter) if self.dctx.is_main else None
        self.tokens_per_iter = s.train.batch_size * s.train.grad_accum * s.model.block_size
        self.flops_per_token = flops_per_token(self.raw_model.num_params(non_embedding=True), s.model.n_layer,
                                               s.model.n_head, s.model.head_dim, s.model.block_size)
        self.peak_flops = peak_flops(self.device)
        self.tracker = build_tracker(s.tracking, self.run_dir, enabled=self.dctx.is_main)
        for line in header_lines(self, resume_iter):
            log.info(line)
        refresh_routing(self)  # the loaded (or initial) gates decide the routing before the first step

    def start_process(self):
        """Process group, budget, run directory, logging, device settings and seeds."""
        s, train = self.s, self.s.train
        self.dctx = dctx = distributed.setup(s.general.device)
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
            write_settings_json(self.run_dir, s)
        self.device = dctx.device
        self.precision = effective_precision(self.device, s.general.precision)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        ckpt.seed_everything(s.general.seed + dctx.rank)

    def prepare_data(self):
        """The tokenized dataset (rank 0 prepares it first), its vocabulary and unigram entropy, this rank's
        training batches and the fixed evaluation batches."""
        # The data layer pulls in tokenizers: imported when a run starts, not with this module.
        from gpt2.data import batches, prepare

        s, train, dctx = self.s, self.s.train, self.dctx
        if dctx.is_main:
            data_path = prepare.prepare(s.data)
        distributed.barrier(dctx)
        if not dctx.is_main:
            data_path = prepare.prepare(s.data)
        self.data_path = Path(data_path)
        meta = prepare.load_meta(self.data_path)
        self.vocab_size = int(meta["vocab_size"])
        self.train_tokens = int(meta["train_tokens"])
        self.unigram = float(batches.unigram_entropy(self.data_path, "val"))
        self.batches = batches.BatchSource(self.data_path, "train", s.model.block_size, train.batch_size,
                                           s.general.seed, rank=dctx.rank, world_size=dctx.world_size)
        self.eval_batches = [(x.to(self.device), y.to(self.device)) for x, y in
                             batches.fixed_eval_batches(self.data_path, s.model.block_size, train.batch_size,
                                                        train.eval_batches)]

    def build_model_and_step(self):
        """Model, optimizer, checkpoint signature and the optimizer step (compiled / DDP as configured)."""
        s, train, dctx = self.s, self.s.train, self.dctx
        self.raw_model = build_model(s, self.vocab_size).to(self.device)
        self.optimizer = build_optimizer(self.raw_model, s.optimizer, train.lr, self.device.type)
        self.signature = ckpt.signature(s, self.vocab_size, dctx.world_size, self.raw_model)

        model = torch.compile(self.raw_model) if s.general.compile else self.raw_model
        self.eval_model = model
        if dctx.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(model, device_ids=[dctx.local_rank] if self.device.type == "cuda" else None)
        self.step = TrainStep(model, self.raw_model, self.optimizer, device=self.device, precision=self.precision,
                              grad_accum=self.micro_steps, grad_clip=train.grad_clip, ddp=dctx.enabled,
                              compiled=s.general.compile)

    def resume_from_checkpoint(self) -> int | None:
        """With --resume and a ckpt.pt: model, optimizer, scaler, RNG, data position and progress from it.
        Returns the iteration resumed at (None: a fresh start)."""
        if not self.resume:
            return None
        ckpt_path = self.run_dir / CHECKPOINT_NAME
        if not ckpt_path.exists():
            log.info(f"--resume: no checkpoint in {self.run_dir}, starting from scratch")
            return None
        state = ckpt.load_checkpoint(ckpt_path, self.signature)
        data_state = ckpt.restore_checkpoint(state, model=self.raw_model, optimizer=self.optimizer,
                                             scaler=self.step.scaler, rank=self.dctx.rank, path=ckpt_path)
        if data_state is not None:
            self.batches.load_state_dict(data_state)
        self.p = Progress(**state["progress"])
        return self.p.iters

    def wall_time(self) -> float:
        return self.wall_base + (time.perf_counter() - self.t_start)

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
            write_metrics(r.run_dir, summary(r))
        stop.defer()  # from here on a signal stops the loop after its step, with a checkpoint
        signum = train(r, stop)
        r.status = "interrupted" if r.stop_reason == "signal" else "done"
        if r.dctx.is_main:
            write_metrics(r.run_dir, summary(r))
            log.info(closing_line(r, signum))
        return exit_code(signum) if r.status == "interrupted" else 0
    except (Interrupted, KeyboardInterrupt) as exc:  # before the loop: nothing to checkpoint
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        r.status, r.stop_reason = "interrupted", "signal"
        message = f"interrupted by {signal_name(signum)} before training started"
        if log.handlers:
            log.warning(message)
        else:
            print(message, file=sys.stderr)
        record_outcome(r, exc)
        return exit_code(signum)
    except Exception as exc:
        r.status = "failed"
        expected = isinstance(exc, (TrainingFailed, ckpt.CheckpointError, RunDirError))
        r.failure_reason = str(exc) if expected else f"{type(exc).__name__}: {exc}"
        if log.handlers:
            (log.error if expected else log.exception)(f"run failed: {r.failure_reason}")
        else:
            print(f"error: {r.failure_reason}", file=sys.stderr)
        record_outcome(r, exc)
        return 1
    finally:
        r.finish()
        close_logging()
        if r.dctx is not None:
            distributed.teardown(r.dctx)
        stop.restore()
