"""`make`: train once, or run the test matrix when the configuration is a matrix.

    python -m scripts.run --config .config            train (or matrix when CONFIG_MATRIX=y)
    python -m scripts.run --config .config --single   one training run even for a matrix preset
    python -m scripts.run --config .config --resume [RUN_DIR]
                                                      resume the newest (or given) single run
"""

import argparse
import sys

from lib.config import ConfigError
from lib.runs import single


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=".config")
    parser.add_argument("--single", action="store_true", help="one run even when the config is a matrix")
    parser.add_argument("--resume", nargs="?", const="", default=None, metavar="RUN_DIR")
    args = parser.parse_args(argv)
    try:
        return single.run(args.config, args.single, args.resume)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
