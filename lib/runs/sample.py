"""`make sample`: text from a run's checkpoint, continuing a prompt, for every attention backend.

The defaults come from the configuration's Sampling menu (kconfig/sample.Kconfig); an option given on the
command line (make's PROMPT, NUM, TOKENS, TEMP, TOPK, SEED, CKPT) overrides its symbol and is validated like a
.config line. The run is RUN, else the one whose checkpoint changed last under the configuration's results
directory (single runs and matrix cells, as `make eval` picks). Its model is rebuilt from its own settings.json
(gpt2.train.trained) and decodes incrementally with a cache (gpt2.model.decode).
"""

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt2.data.prepare import load_tokenizer, output_dir
from gpt2.data.tokenizer import get_tokenizer
from gpt2.model.decode import generate
from gpt2.train.checkpoint import CheckpointError
from gpt2.train.distributed import resolve_device_type
from gpt2.train.trained import load_trained
from lib import config as cfg
from lib.evaluate import newest_run_dir

SEPARATOR = "---------------"
# Command-line option -> (the symbol it overrides, make's variable). The prompt is free text: it is used as given.
OVERRIDES = {"num_samples": ("SAMPLE_NUM_SAMPLES", "NUM"), "max_new_tokens": ("SAMPLE_MAX_NEW_TOKENS", "TOKENS"),
             "temperature": ("SAMPLE_TEMPERATURE", "TEMP"), "top_k": ("SAMPLE_TOP_K", "TOPK"),
             "seed": ("SAMPLE_SEED", "SEED")}
CHECKPOINT_SYMBOLS = {"best": "SAMPLE_CHECKPOINT_BEST", "last": "SAMPLE_CHECKPOINT_LAST"}


@dataclass
class SampleRequest:
    """What the command line asked for, as typed; None = the configuration's value."""
    run: str | None = None
    prompt: str | None = None
    num_samples: str | None = None
    max_new_tokens: str | None = None
    temperature: str | None = None
    top_k: str | None = None
    seed: str | None = None
    checkpoint: str | None = None


def load_with_overrides(config, request: SampleRequest):
    """The configuration's settings with the request's sampling options applied and validated through Kconfig."""
    given = {name: str(getattr(request, name)) for name in OVERRIDES if getattr(request, name) is not None}
    overrides = {OVERRIDES[name][0]: value for name, value in given.items()}
    if request.checkpoint is not None:
        if request.checkpoint not in CHECKPOINT_SYMBOLS:
            raise cfg.ConfigError(f"CKPT={request.checkpoint}: expected one of {', '.join(CHECKPOINT_SYMBOLS)}")
        overrides[CHECKPOINT_SYMBOLS[request.checkpoint]] = "y"
    if not overrides:
        return cfg.load_settings(config)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sample-overrides.config"
        try:
            cfg.write_cell_config(config, overrides, path)
            return cfg.load_settings(path)
        except cfg.ConfigError as error:  # name the option as typed, not the temporary file
            text = str(error)
            for name, value in given.items():
                symbol, variable = OVERRIDES[name]
                if f"CONFIG_{symbol}=" in text:
                    raise cfg.ConfigError(f"{variable}={value}: {text[text.index('CONFIG_' + symbol):]}") from None
            raise


def run_tokenizer(settings):
    """The tokenizer the run's data was prepared with (GPT-2 BPE needs no prepared data)."""
    try:
        return load_tokenizer(output_dir(settings.data))
    except FileNotFoundError:
        if settings.data.tokenizer == "gpt2":
            return get_tokenizer("gpt2")
        raise


def prompt_ids(tokenizer, prompt: str) -> list:
    """The prompt's tokens; an empty prompt starts from end-of-text, else a newline, else token 0."""
    if prompt:
        return tokenizer.encode(prompt)
    if tokenizer.eot_token is not None:
        return [tokenizer.eot_token]
    try:
        return tokenizer.encode("\n")
    except ValueError:
        return [0]


def sample(config, request: SampleRequest, out=sys.stdout, log=sys.stderr) -> int:
    """Print request.num_samples continuations of the prompt; raises ConfigError, CheckpointError, ValueError."""
    settings = load_with_overrides(config, request)
    s = settings.sample
    if request.run:
        run_dir, why = Path(request.run), ""
    else:
        results = cfg.results_dir(settings.general)
        run_dir = newest_run_dir(results)
        why = f" (the newest run under {results}; RUN=<dir> picks another)"
    device = resolve_device_type(settings.general.device)
    trained = load_trained(run_dir, which=s.checkpoint, device=device)
    tokenizer = run_tokenizer(trained.settings)
    if tokenizer.vocab_size != trained.vocab_size:
        raise CheckpointError(f"{run_dir}: the model has a vocabulary of {trained.vocab_size} tokens, its data's "
                              f"{tokenizer.name} tokenizer {tokenizer.vocab_size}")
    prompt = s.prompt if request.prompt is None else request.prompt
    idx = torch.tensor([prompt_ids(tokenizer, prompt)], dtype=torch.long, device=device)
    print(f"sampling {run_dir}{why}: {trained.checkpoint.name} (iteration {trained.iters}), "
          f"{trained.settings.attention.backend}; {s.num_samples} x {s.max_new_tokens} tokens, temperature "
          f"{s.temperature:g}, top-k {s.top_k or 'off'}, seed {s.seed}, {device}", file=log)
    generator = torch.Generator(device=device).manual_seed(s.seed)
    tokens = generate(trained.model, idx.expand(s.num_samples, -1), s.max_new_tokens, s.temperature, s.top_k,
                      generator)
    for i, row in enumerate(tokens[:, idx.shape[1]:].tolist()):
        print(("" if i == 0 else SEPARATOR + "\n") + prompt + tokenizer.decode(row), file=out)
    return 0
