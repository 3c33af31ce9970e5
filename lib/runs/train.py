"""The training entry point: one run of a .config into a run directory.

    python -m lib.runs.train --config .config --run-dir results/NAME [--resume]

The run directory's `config` snapshot is the effective configuration: the .config with the GPT2_* environment
overrides folded in and validated (lib.config.write_effective_config), so what ran is what is recorded.

With CONFIG_TRAIN_NUM_GPUS > 1 it re-launches this module under torchrun (one process per GPU). A matrix
cell starts the same module. Exit code 0 when the run finished; 1 on failure (metrics.json then says why);
2 for a configuration error (or --resume of a directory that does not exist); 75 (EX_TEMPFAIL) when another
process is training the run directory (its lock, gpt2.train.run_dir.RunLock, names it; nothing is written);
130 / 143 when SIGINT / SIGTERM stopped it after a step and a checkpoint (metrics.json status "interrupted";
--resume goes on).

The run lock: this process takes `<run-dir>/.run.lock`, or adopts it when the process that started it took it
and passed it down (`make`, `make resume`); torchrun's workers leave it to the launcher that re-launched them.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

MODULE = "lib.runs.train"
RUN_BUSY_EXIT = 75  # EX_TEMPFAIL: another process trains this run directory; try again later


def command() -> list:
    """The argv prefix that starts this entry point in a new interpreter."""
    return [sys.executable, "-m", MODULE]


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Train GPT-2 for a time/step budget into a run directory.")
    parser.add_argument("--config", required=True, help="the .config to train with")
    parser.add_argument("--run-dir", required=True, help="run directory to create (or continue with --resume)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from <run-dir>/ckpt.pt with the budget that is left")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """Load the settings, take the run's lock, re-launch under torchrun for several GPUs, or train here."""
    from gpt2.io import CONFIG_NAME, LockHeld
    from gpt2.train.run_dir import RunLock
    from lib.config import ConfigError, write_effective_config

    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.resume and not Path(args.run_dir).is_dir():
        print(f"error: --resume {args.run_dir}: no such run directory", file=sys.stderr)
        return 2
    # The run directory's snapshot is what trains: the .config with the GPT2_* overrides folded in.
    with tempfile.TemporaryDirectory(prefix="gpt2-effective-config-") as scratch:
        effective = Path(scratch) / CONFIG_NAME
        try:
            settings = write_effective_config(args.config, effective)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        try:
            lock = take_run_lock(RunLock(args.run_dir))
        except LockHeld as exc:
            print(f"error: {exc}; not starting a second trainer on it", file=sys.stderr)
            return RUN_BUSY_EXIT
        try:
            code = train(settings, effective, args, argv)
            if code == 0 and settings.evaluation.after_train and lock is not None:  # not in torchrun's workers
                evaluate_after_training(args.run_dir, settings)
            return code
        finally:
            if lock is not None:
                lock.release()


def evaluate_after_training(run_dir, settings) -> None:
    """CONFIG_EVAL_AFTER_TRAIN: <run>/eval.json (val loss, HellaSwag) from the finished run's best checkpoint.
    An evaluation that cannot run (HellaSwag offline, say) is reported and never fails the run."""
    from lib.evaluate import evaluate_run

    try:
        evaluate_run(run_dir, settings)
    except Exception as exc:
        print(f"evaluation after training failed (the run is kept): {type(exc).__name__}: {exc}", file=sys.stderr)


def take_run_lock(lock):
    """The run's lock for this process, or None for a torchrun worker: the launcher that re-launched it holds it
    (it names it in the environment), or, under a torchrun started by hand, rank 0 does."""
    from gpt2.train.distributed import under_torchrun

    if under_torchrun() and (lock.handed_down() or os.environ.get("RANK", "0") != "0"):
        return None
    lock.acquire()
    os.environ.update(lock.handoff())  # torchrun, if we re-launch, passes it on to the workers
    return lock


def train(settings, effective_config, args, argv) -> int:
    from gpt2.train import distributed
    from gpt2.train.trainer import run

    if settings.train.num_gpus > 1 and not distributed.under_torchrun():
        from gpt2.train.metrics import skip_collections_at_exit

        skip_collections_at_exit()  # this process only waits for torchrun: ~1.3 s of heap collection at its exit
        device_type = distributed.resolve_device_type(settings.general.device)
        return distributed.relaunch(settings.train.num_gpus, ["-m", MODULE], argv, device_type)
    return run(settings, effective_config, args.run_dir, args.resume, argv=["-m", MODULE, *argv])


if __name__ == "__main__":
    sys.exit(main())
