"""`make bench-ddp`: see bench/ddp.py for what it measures and its options."""

import sys

from bench.ddp import main

if __name__ == "__main__":
    sys.exit(main())
