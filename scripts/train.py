#!/usr/bin/env python
"""Train GPT-2 into a run directory.

    python scripts/train.py --config .config --run-dir results/runs/NAME [--resume]

With CONFIG_TRAIN_NUM_GPUS > 1 this re-launches itself through torchrun (one process per GPU).
Exit code 0 when the run finished; 1 on failure (metrics.json then says why); 130 / 143 when SIGINT /
SIGTERM stopped it after a step and a checkpoint (metrics.json status "interrupted"; --resume goes on).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpt2.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], script=str(Path(__file__).resolve())))
