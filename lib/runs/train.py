"""The training entry point: one run of a .config into a run directory.

    python -m lib.runs.train --config .config --run-dir results/NAME [--resume]

The run directory's `config` snapshot is the effective configuration: the .config with the GPT2_* environment
overrides folded in and validated (lib.config.write_effective_config), so what ran is what is recorded.

With CONFIG_TRAIN_NUM_GPUS > 1 it re-launches this module under torchrun (one process per GPU). A matrix
cell starts the same module. Exit code 0 when the run finished; 1 on failure (metrics.json then says why);
2 for a configuration error; 130 / 143 when SIGINT / SIGTERM stopped it after a step and a checkpoint
(metrics.json status "interrupted"; --resume goes on).
"""

import argparse
import sys
import tempfile
from pathlib import Path

MODULE = "lib.runs.train"


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
    """Load the settings, re-launch under torchrun for several GPUs, or train here."""
    from gpt2.train import distributed
    from gpt2.train.trainer import run
    from gpt2.io import CONFIG_NAME
    from lib.config import ConfigError, write_effective_config

    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    # The run directory's snapshot is what trains: the .config with the GPT2_* overrides folded in.
    with tempfile.TemporaryDirectory(prefix="gpt2-effective-config-") as scratch:
        effective = Path(scratch) / CONFIG_NAME
        try:
            settings = write_effective_config(args.config, effective)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if settings.train.num_gpus > 1 and not distributed.under_torchrun():
            device_type = distributed.resolve_device_type(settings.general.device)
            return distributed.relaunch(settings.train.num_gpus, ["-m", MODULE], argv, device_type)
        return run(settings, effective, args.run_dir, args.resume, argv=["-m", MODULE, *argv])


if __name__ == "__main__":
    sys.exit(main())
