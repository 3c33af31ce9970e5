"""`make bench-train`: see bench/train.py for what it measures and its options."""

import sys

from bench.train import main

if __name__ == "__main__":
    sys.exit(main())
