"""`make bench-attention`: see bench/attention.py for what it measures and its options."""

import sys

from bench.attention import main

if __name__ == "__main__":
    sys.exit(main())
