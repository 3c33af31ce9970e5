"""Read an export back (lib/export/writer.py wrote it), and open a run or an export for evaluation.

    model = load_exported("results/run/export")          # a GPT in eval mode
    scored = open_model("results/run")                   # run dir or export dir: model, tokenizer, block size

A native export rebuilds the GPT its settings.json describes and loads model.safetensors into it: the logits
are bit-identical to the run's (the padded vocabulary rows come back as zeros, which change nothing: their
logits are masked and no token id reaches them). An HF export rebuilds the plain GPT-2 its config.json
describes (sdpa, standard MLP) and loads the HF tensors through GPT.load_hf_state_dict.
"""

import dataclasses
import json
from pathlib import Path

import torch

from gpt2.model.gpt import GPT
from gpt2.model.hf_checkpoint import read_hf_weights
from gpt2.settings import AttentionSettings, KVPruningSettings, MLPSettings
from gpt2.train.run_dir import SETTINGS_NAME, read_settings_json
from gpt2.train.trained import load_trained

from .tokens import tokenizer_from_record, tokenizer_record
from .writer import EXPORT_RECORD, FORMAT, FORMAT_VERSION, WEIGHTS, ExportError


def read_export_record(directory) -> dict:
    """export.json of an export directory, checked for our format and a version this code reads."""
    path = Path(directory) / EXPORT_RECORD
    if not path.is_file():
        raise ExportError(f"{directory} is not an export of this project (no {EXPORT_RECORD}); "
                          f"a Hugging Face GPT-2 directory loads with gpt2.model.gpt.GPT.from_pretrained")
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ExportError(f"{path}: not a {FORMAT} record")
    if record.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{path}: export format version {record.get('format_version')}; this code reads "
                          f"version {FORMAT_VERSION} (export the run again)")
    if record.get("kind") not in ("hf", "native"):
        raise ExportError(f"{path}: unknown export kind {record.get('kind')!r}")
    return record


def load_exported(directory, device="cpu") -> GPT:
    """The model of an export directory, in eval mode on `device`."""
    directory = Path(directory)
    record = read_export_record(directory)
    try:
        settings = read_settings_json(directory / SETTINGS_NAME)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    if record["kind"] == "native":
        model = GPT(settings.model, settings.attention, settings.mlp, settings.kv_pruning, record["vocab_size"],
                    seed=settings.general.seed)
        _load_native(model, directory / WEIGHTS)
    else:
        # What config.json describes: GPT-2 with biases, SDPA attention and a standard MLP of the run's width.
        plain = dataclasses.replace(settings.model, bias=True)
        model = GPT(plain, AttentionSettings(), MLPSettings(expansion=settings.mlp.expansion), KVPruningSettings(),
                    record["vocab_size"], seed=settings.general.seed)
        model.load_hf_state_dict(read_hf_weights(directory), source=str(directory))
    model.to(torch.device(device)).eval()
    model.refresh_routing()  # head-selective routing follows the loaded gates
    return model


def _load_native(model: GPT, path: Path) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    state = {}
    for name, tensor in tensors.items():
        if name in ("transformer.wte.weight", "lm_head.weight"):  # the padded rows come back as zeros
            padded = tensor.new_zeros(model.padded_vocab_size, tensor.shape[1])
            padded[: tensor.shape[0]] = tensor
            tensor = padded
        state[name] = tensor
    if model.settings.tie_weights and "transformer.wte.weight" in state:
        state["lm_head.weight"] = state["transformer.wte.weight"]  # one tensor under both names
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ExportError(f"{path} does not fit the model its settings.json describes: {exc}") from None


@dataclasses.dataclass
class OpenedModel:
    model: GPT  # eval mode
    tokenizer: object  # gpt2.data.tokenizer: encode, decode, eot_token, vocab_size, name
    block_size: int
    source: str  # what was opened, for logs


def open_model(path, checkpoint: str = "best", device="cpu") -> OpenedModel:
    """A run directory (its best or last checkpoint) or an export directory, with its tokenizer."""
    path = Path(path)
    if (path / EXPORT_RECORD).is_file():
        record = read_export_record(path)
        model = load_exported(path, device)
        tokenizer = tokenizer_from_record(record["tokenizer"])
        source = f"export {path} ({record['kind']})"
    elif (path / SETTINGS_NAME).is_file():
        trained = load_trained(path, which=checkpoint, device=device)
        model, tokenizer = trained.model, tokenizer_from_record(tokenizer_record(trained.settings))
        model.refresh_routing()
        source = f"run {path} ({trained.checkpoint.name}, {trained.iters} iters)"
    else:
        raise ExportError(f"{path} is neither a run directory ({SETTINGS_NAME}) nor an export ({EXPORT_RECORD})")
    if tokenizer.vocab_size != model.vocab_size:
        raise ExportError(f"{path}: the model has {model.vocab_size} tokens, its {tokenizer.name} tokenizer "
                          f"{tokenizer.vocab_size}")
    return OpenedModel(model, tokenizer, model.settings.block_size, source)
