"""torchrun (torch.distributed.run) as the trainer re-launches itself through it (gpt2/train/distributed.py).

The same launcher, except that its exit skips the collections CPython runs over the whole heap as it shuts
down (gpt2.train.metrics.skip_collections_at_exit): with torch loaded they took ~0.9 s at the end of every DDP
run on a CPU (measured), after the workers had already written everything.
"""

import sys

from torch.distributed.run import main

from gpt2.train.metrics import skip_collections_at_exit

if __name__ == "__main__":
    skip_collections_at_exit()
    sys.exit(main())
