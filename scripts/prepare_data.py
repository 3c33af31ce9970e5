"""Prepare the dataset a configuration names: python -m scripts.prepare_data --config .config

Tokenizes the dataset into <data_dir>/<dataset>-<tokenizer>[...]/ (train.bin, val.bin,
meta.json) unless that directory is already current, then says where it is.
"""

import argparse
import sys

from gpt2.data.prepare import load_meta, prepare
from gpt2.data.streamed import StreamUnavailable
from gpt2.data.wheel_assets import AssetFetchError
from lib.config import ConfigError, load_settings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=".config", help="the .config to read (default: .config)")
    args = parser.parse_args(argv)
    try:
        data = load_settings(args.config).data
        data_path = prepare(data)
    except (ConfigError, AssetFetchError, StreamUnavailable, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    meta = load_meta(data_path)
    print(f"{data.dataset} / {meta['tokenizer']} (vocab {meta['vocab_size']}): {data_path}")
    print(f"  train {meta['train_tokens']:,} tokens, val {meta['val_tokens']:,} tokens ({meta['dtype']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
