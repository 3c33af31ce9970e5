"""`make`: train once, or run the test matrix when the configuration is a matrix.

    python -m scripts.run --config .config            train (or matrix when CONFIG_MATRIX=y)
    python -m scripts.run --config .config --single   one training run even for a matrix preset
    python -m scripts.run --config .config --resume [RUN_DIR] [--extend 600s|1000it]
                                                      resume the newest unfinished (or the given) single run
                                                      with its own configuration; --extend: a finished one
"""

import argparse
import sys

from lib.config import ConfigError
from lib.runs import single
from lib.runs.resume import ResumeError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=".config")
    parser.add_argument("--single", action="store_true", help="one run even when the config is a matrix")
    parser.add_argument("--resume", nargs="?", const="", default=None, metavar="RUN_DIR")
    parser.add_argument("--extend", default="", metavar="AMOUNT",
                        help="with --resume RUN_DIR: train a finished run further, e.g. 600s, 10m, 2h or 1000it")
    args = parser.parse_args(argv)
    try:
        return single.run(args.config, args.single, args.resume, args.extend or None)
    except (ConfigError, ResumeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
