"""One training run: wires data, model, optimizer, step and checkpoint together, then runs the loop.

Budget (gpt2/train/budget.py). A run stops when its training time reaches CONFIG_GPT2_MAX_TIME seconds or its
step count reaches CONFIG_TRAIN_MAX_ITERS, whichever comes first; warm-up/compile, evaluation and
checkpoint time are timed on their own and never charged. The learning rate follows the budget fraction.

    trainer.py   Run.setup(): data, model, optimizer, TrainStep, resume from ckpt.pt; run(): the exit code
    loop.py      the loop and its sync points (log, eval, checkpoint, stop)
    summary.py   metrics.json and the closing log line
"""

import functools
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from gpt2.io import BEST_CHECKPOINT_NAME, CHECKPOINT_NAME, CONFIG_NAME, ENV_NAME, LockHeld
from gpt2.data.streamed import StreamUnavailable
from gpt2.model.gpt import build_model
from gpt2.train import checkpoint as ckpt
from gpt2.train import distributed
from gpt2.train.budget import Budget, Progress
from gpt2.train.disk import RunWriteError, writing
from gpt2.train.log import check_log_writes, close_logging, header_lines, log, setup_logging
from gpt2.train.loop import TrainingFailed, refresh_routing, train
from gpt2.train.metrics import EvalLog, SessionClock, collection_paused, flops_per_token, peak_flops, \
    skip_collections_at_exit, write_metrics
from gpt2.train.optim import build_optimizer
from gpt2.train.machine import MachineLoad
from gpt2.train.run_dir import SETTINGS_NAME, RunDirError, RunLock, prepare_run_dir, write_env_json, \
    write_settings_json
from gpt2.train.signals import Interrupted, StopSignals, exit_code, signal_name
from gpt2.train.step import TrainStep, effective_precision, use_tf32
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
        self.run_lock = None
        self.bar = None
        self.dctx = None
        self.device = None
        self.precision = None
        self.raw_model = None
        self.flops_per_token = None
        self.peak_flops = None
        self.train_tokens = None  # of the training split, for the epoch count
        self.machine = MachineLoad()  # load average and GPU neighbours at log and eval points
        self.session = SessionClock()  # start-up, setup, loop and teardown of this process (metrics.json)
        self.best_weights = None  # the best evaluation's weights in host memory (the loop's)
        self.cuda_graphs = False  # compiled with mode "reduce-overhead" (CONFIG_TORCH_COMPILE_CUDA_GRAPHS on CUDA)

    def setup(self):
        """Everything the loop needs, in order: process group, run directory and logging, data, model and
        step, the checkpoint to resume from, and the run's records."""
        clock = self.session
        with clock.phase("process"):
            self.start_process()
        with clock.phase("data"):
            self.prepare_data()
        with clock.phase("model"):
            self.build_model_and_step()
        with clock.phase("resume"):
            resume_iter = self.resume_from_checkpoint()
        with clock.phase("records"):
            self.start_records(resume_iter)
        refresh_routing(self)  # the loaded (or initial) gates decide the routing before the first step

    def start_records(self, resume_iter):
        """The session count, the eval log, the throughput constants, the tracker and the header lines."""
        s = self.s
        self.p.sessions += 1
        self.wall_base = self.p.wall_time_s
        self.eval_log = EvalLog(self.run_dir, resume_iter) if self.dctx.is_main else None
        self.tokens_per_iter = s.train.batch_size * s.train.grad_accum * s.model.block_size
        self.flops_per_token = flops_per_token(self.raw_model.num_params(non_embedding=True), s.model.n_layer,
                                               s.model.n_head, s.model.head_dim, s.model.block_size)
        self.peak_flops = peak_flops(self.device)
        self.tracker = build_tracker(s, self.run_dir, enabled=self.dctx.is_main)
        for line in header_lines(self, resume_iter):
            log.info(line)

    def start_process(self):
        """Process group, budget, run directory, logging, device settings and seeds."""
        s, train = self.s, self.s.train
        self.dctx = dctx = distributed.setup(s.general.device)
        self.budget = Budget(float(train.max_time_s), train.max_iters)
        if train.grad_accum % dctx.world_size:
            raise ValueError(f"CONFIG_TRAIN_GRAD_ACCUM={train.grad_accum} is not a multiple of the "
                             f"{dctx.world_size} processes; the global batch would change")
        self.micro_steps = train.grad_accum // dctx.world_size
        if dctx.is_main and not distributed.under_torchrun():
            # One trainer per run directory, also when trainer.run is called on its own; under lib.runs.train
            # this adopts the lock the entry point took, and under torchrun the launcher holds it.
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.run_lock = RunLock(self.run_dir).acquire()
        if dctx.is_main:
            with writing(self.run_dir / CONFIG_NAME):  # the directory and its config snapshot
                prepare_run_dir(self.run_dir, self.config_path, self.resume)
        distributed.barrier(dctx)
        setup_logging(self.run_dir, dctx.is_main)
        if dctx.is_main:
            with writing(self.run_dir / ENV_NAME):
                write_env_json(self.run_dir, self.argv)
            with writing(self.run_dir / SETTINGS_NAME):
                write_settings_json(self.run_dir, s)
        self.device = dctx.device
        self.precision = effective_precision(self.device, s.general.precision)
        use_tf32(self.device)
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

        # CUDA graphs: the host launches each step's forward and backward as one graph replay each.
        self.cuda_graphs = s.general.compile and s.general.cuda_graphs and self.device.type == "cuda"
        mode = "reduce-overhead" if self.cuda_graphs else None
        model = torch.compile(self.raw_model, mode=mode) if s.general.compile else self.raw_model
        self.eval_model = model
        # Under DDP with accumulation, ra-unified still composes once per optimizer step: DDP leaves the parameters
        # it composes from to the step, which averages the composed weight's gradient (gpt2/train/step.py).
        composed = self.raw_model.composed_parameters() if dctx.enabled and self.micro_steps > 1 else []
        if dctx.enabled:
            model = distributed.wrap_ddp(model, dctx, reduce_self=composed)
        reduce = functools.partial(distributed.average_gradients, dctx) if composed else None
        self.step = TrainStep(model, self.raw_model, self.optimizer, device=self.device, precision=self.precision,
                              grad_accum=self.micro_steps, grad_clip=train.grad_clip, ddp=dctx.enabled,
                              compiled=s.general.compile, composition_reduce=reduce,
                              cuda_graphs=self.cuda_graphs)

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
        self.machine = MachineLoad(**(self.p.machine or {}))
        if self.dctx.is_main:
            self.reconcile_best_checkpoint()
        return self.p.iters

    def reconcile_best_checkpoint(self):
        """Make ckpt-best.pt the best evaluation the resumed progress knows (best_val_iter), so that the file and
        metrics.json's best_val_* always describe the same weights. A ckpt-best.pt of another evaluation was
        written after ckpt.pt, by steps that are now trained again: it goes. When the best evaluation is the
        one at the checkpoint itself, the weights just loaded are the best ones and are written back."""
        path, p = self.run_dir / BEST_CHECKPOINT_NAME, self.p
        best_iter = ckpt.checkpoint_progress(path).get("best_val_iter") if path.exists() else None
        if best_iter is not None and best_iter == p.best_val_iter:
            return
        if path.exists():
            path.unlink()
            log.info(f"removed {path}: its evaluation (iter {best_iter}) is not the best one of the checkpoint "
                     f"resumed from (iter {p.best_val_iter})")
        if self.s.train.keep_best_checkpoint and p.best_val_iter is not None and p.best_val_iter == p.iters:
            ckpt.save_best_checkpoint(path, model=self.raw_model, signature=self.signature, progress=asdict(p))
            log.info(f"wrote {path} from the checkpoint: its weights are those of the best evaluation")

    def wall_time(self) -> float:
        return self.wall_base + (time.perf_counter() - self.t_start)

    def finish(self):
        """Close the tracker and progress bar. The run's outcome is decided by now: a close that fails (a full
        disk under the tracker's files) is said in one line, not raised over the outcome."""
        if self.run_lock is not None:
            self.run_lock.release()
        for part in (self.tracker, self.bar):
            try:
                if part is not None:
                    part.close()
            except Exception as exc:
                print(f"warning: closing {type(part).__name__} failed: {type(exc).__name__}: {exc}", file=sys.stderr)


def run(settings, config_path, run_dir, resume: bool = False, argv=None) -> int:
    """Train one run; returns the process exit code: 0 done, 1 failed, 128 + signal number when a SIGINT or
    SIGTERM interrupted it (metrics.json status "interrupted"). Rank 0 writes the run directory."""
    close_logging()  # handlers left by an earlier run in this process would take this run's first messages
    r = Run(settings, config_path, run_dir, resume, argv)
    skip_collections_at_exit()
    stop = StopSignals()
    stop.install()
    try:
        # torch.optim imports torch._dynamo at the first optimizer: here, with collection paused, faster
        with r.session.phase("imports"), collection_paused():
            import torch._dynamo  # noqa: F401
        r.setup()
        if r.dctx.is_main:
            with r.session.phase("records"):
                write_metrics(r.run_dir, summary(r))
        stop.defer()  # from here on a signal stops the loop after its step, with a checkpoint
        signum = train(r, stop)
        r.machine.finish()
        r.status = "interrupted" if r.stop_reason == "signal" else "done"
        if r.dctx.is_main:
            log.info(closing_line(r, signum))
            check_log_writes()  # a train.log that lost lines is a failed record, not a finished run
            write_metrics(r.run_dir, summary(r))
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
        expected = isinstance(exc, (TrainingFailed, ckpt.CheckpointError, RunDirError, RunWriteError, LockHeld,
                                    StreamUnavailable))
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
