"""Evaluate a trained run: val loss/perplexity and HellaSwag zero-shot accuracy, written to <run>/eval.json.

    python -m scripts.eval [RUN_DIR] [--checkpoint best|last] [--limit N]

Without RUN_DIR: the newest run with a checkpoint (a single run or a matrix cell) under the results directory
of .config. Exit status: 0 done (HellaSwag skipped for a char-tokenizer run included); 1 HellaSwag could not be
scored (offline, a corrupt file; the val loss is still written); 2 no such run or no usable checkpoint.
"""

import argparse
import sys

from gpt2.train.checkpoint import CheckpointError
from gpt2.train.trained import WHICH
from lib.evaluate import evaluate_run, newest_run_dir
from lib.evaluate.evaluation import DEFAULT_BATCH_SIZE
from lib.config import configured_results_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", nargs="?", help="a run directory (default: the newest run)")
    parser.add_argument("--checkpoint", choices=WHICH, default="best",
                        help="best: ckpt-best.pt (the last checkpoint when the run kept none); last: ckpt.pt")
    parser.add_argument("--limit", type=int, default=0, help="score the first N HellaSwag items (0: all 10,042)")
    parser.add_argument("--items", help="a HellaSwag-format JSONL file to score instead of the official one")
    parser.add_argument("--device", help="cuda or cpu (default: cpu for a run configured for the CPU, else cuda "
                                         "when there is one)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="sequences per forward pass")
    parser.add_argument("--config", default=".config", help="finds the results directory when no run is given")
    args = parser.parse_args(argv)
    if args.limit < 0 or args.batch_size < 1:
        parser.error("--limit must be >= 0 and --batch-size >= 1")
    try:
        run_dir = args.run_dir
        if not run_dir:
            run_dir = newest_run_dir(configured_results_dir(args.config, default_if_unreadable=True))
            print(f"no RUN given: evaluating the newest run, {run_dir} (RUN=<dir> to choose)")
        record = evaluate_run(run_dir, which=args.checkpoint, limit=args.limit, items_file=args.items,
                              device=args.device, batch_size=args.batch_size)
    except (FileNotFoundError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if record["hellaswag"]["status"] in ("done", "skipped") else 1


if __name__ == "__main__":
    sys.exit(main())
