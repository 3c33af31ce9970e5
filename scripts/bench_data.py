"""`make bench-data`: see bench/data_prep.py for what it measures and its options."""

import sys

from bench.data_prep import main

if __name__ == "__main__":
    sys.exit(main())
