"""`make bench-cells`: see bench/cells.py for what it measures and its options."""

import sys

from bench.cells import main

if __name__ == "__main__":
    sys.exit(main())
