"""Install the optional packages a .config needs (extras/<name>.txt), or every extra with --all.

    python -m scripts.extras --config .config
    python -m scripts.extras --all
"""

import argparse
import subprocess
import sys

from lib.config import ConfigError, load_settings
from lib.config.extras import all_extras, needed_extras


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=".config")
    parser.add_argument("--all", action="store_true", help="every extra (what the tests need)")
    args = parser.parse_args(argv)
    try:
        files = all_extras() if args.all else needed_extras(load_settings(args.config))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for requirements in files:
        print(f"installing the optional packages of {requirements.name} (pinned in {requirements})")
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                   "-r", str(requirements)]
        if subprocess.call(command) != 0:
            print(f"error: could not install {requirements}; install it by hand or choose another option",
                  file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
