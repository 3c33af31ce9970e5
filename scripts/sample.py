"""`make sample`: print text generated from a run's checkpoint.

    python -m scripts.sample --config .config [--run DIR] [--prompt TEXT] [--num N] [--tokens N]
                             [--temperature T] [--top-k K] [--seed S] [--checkpoint best|last]

Options left out take the configuration's Sampling menu values (make menuconfig); --run defaults to the newest
run under its results directory.
"""

import argparse
import sys

from gpt2.train.checkpoint import CheckpointError
from lib.config import ConfigError
from lib.runs.sample import SampleRequest, sample


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=".config")
    parser.add_argument("--run", help="run directory (default: the newest run under the results directory)")
    parser.add_argument("--prompt", help="text to continue (CONFIG_SAMPLE_PROMPT)")
    parser.add_argument("--num", dest="num_samples", help="samples (CONFIG_SAMPLE_NUM_SAMPLES)")
    parser.add_argument("--tokens", dest="max_new_tokens", help="new tokens per sample (CONFIG_SAMPLE_MAX_NEW_TOKENS)")
    parser.add_argument("--temperature", help="softmax temperature, 0 = greedy (CONFIG_SAMPLE_TEMPERATURE)")
    parser.add_argument("--top-k", dest="top_k", help="draw among the k likeliest, 0 = all (CONFIG_SAMPLE_TOP_K)")
    parser.add_argument("--seed", help="seed of the draws (CONFIG_SAMPLE_SEED)")
    parser.add_argument("--checkpoint", help="best or last (CONFIG_SAMPLE_CHECKPOINT)")
    args = vars(parser.parse_args(argv))
    config = args.pop("config")
    try:
        return sample(config, SampleRequest(**args))
    except (ConfigError, CheckpointError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
