"""`make export`: write a run's trained model into a directory of its own.

    python -m scripts.export RUN_DIR [--out DIR] [--checkpoint best|last] [--hf | --native]

A model whose forward is GPT-2's (plain attention, or a variant that composes into GPT-2 weights exactly)
becomes a Hugging Face directory that transformers' GPT2LMHeadModel loads; any other (RA folded into a wider
head, self-restart, KV pruning) is written in this project's own format, read back by
lib.export.load_exported. The kind is chosen from the run's settings; --hf refuses a model that cannot be a
GPT2LMHeadModel, naming the setting; --native keeps a variant's own parameters (gates, P, mixer) as trained.
"""

import argparse
import sys

from gpt2.train.checkpoint import CheckpointError
from lib.export import ExportError, export_run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", nargs="?", default="", help="the run directory (make export RUN=<dir>)")
    parser.add_argument("--out", default="", help="the export directory (default: <run_dir>/export)")
    parser.add_argument("--checkpoint", default="best", choices=("best", "last"),
                        help="best-validation weights (falls back to the last when the run kept none) or the last")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--hf", action="store_const", dest="kind", const="hf", help="a GPT2LMHeadModel or nothing")
    kind.add_argument("--native", action="store_const", dest="kind", const="native", help="this project's format")
    args = parser.parse_args(argv)
    if not args.run_dir:
        print("error: no run directory given (make export RUN=<dir>)", file=sys.stderr)
        return 2
    try:
        exported = export_run(args.run_dir, args.out or None, args.checkpoint, args.kind or "auto")
    except (ExportError, CheckpointError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(exported.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
