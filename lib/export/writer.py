"""Export a run's trained model into a directory of its own: a Hugging Face GPT-2 when it is one, else ours.

    <out>/
      config.json          hf: a transformers GPT2LMHeadModel's config
      model.safetensors    hf: HF GPT-2 tensor names and layout (lib/export/hf_layout.py)
                           native: our state_dict names (tied lm_head stored once, as wte)
      vocab.json, merges.txt, tokenizer_config.json     GPT-2 BPE runs only (lib/export/tokens.py)
      settings.json        the run's settings.json, byte for byte (what the model was trained with)
      export.json          format + version, kind, vocabulary, tokenizer, source run and checkpoint, and why
                           the model is (or is not) a GPT2LMHeadModel
      README.md            the same in words: what this is, how to load it

Both kinds hold the tokenizer's vocabulary (e.g. 50257 rows), not the padded one our model computes with:
the padded rows are layout only (their logits are masked to -inf), and a loader pads them back with zeros.
The directory is written under a temporary name beside <out> and renamed into place; an earlier export at
<out> is replaced only once the new one is complete.
"""

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from gpt2.io import atomic_write_json, atomic_write_text, to_json
from gpt2.train.run_dir import SETTINGS_NAME
from gpt2.train.trained import load_trained

from .hf_layout import hf_config, hf_state_dict
from .kind import NOT_GPT2, composed_settings, hf_blockers
from .tokens import tokenizer_record, write_gpt2_tokenizer_files

FORMAT = "gpt2-ra-export"
FORMAT_VERSION = 1
EXPORT_RECORD = "export.json"
WEIGHTS = "model.safetensors"
KINDS = ("auto", "hf", "native")


class ExportError(ValueError):
    """The export cannot be made as asked; the message names the culprit and the remedy."""


@dataclasses.dataclass
class Exported:
    directory: Path
    kind: str  # "hf" | "native"
    reasons: list  # hf: the settings composed into plain GPT-2 weights; native: why it is not a GPT-2
    tokenizer: str

    def summary(self) -> str:
        """The console line of `make export`."""
        if self.kind == "hf":
            composed = "; composed into GPT-2 weights: " + ", ".join(r.split(":")[0] for r in self.reasons) \
                if self.reasons else ""
            return (f"export: {self.directory} (Hugging Face GPT2LMHeadModel{composed}; {self.tokenizer}; "
                    f"load with transformers.GPT2LMHeadModel.from_pretrained)")
        why = ("NOT a transformers model: " + "; ".join(self.reasons)) if self.reasons else \
            "asked for with --native; a GPT2LMHeadModel export is possible too"
        return f"export: {self.directory} (gpt2-ra native format, {why}; {self.tokenizer}; load with " \
               f"lib.export.load_exported)"


def export_run(run_dir, out_dir=None, which: str = "best", kind: str = "auto") -> Exported:
    """Export `run_dir`'s best (or last) checkpoint into `out_dir` (default <run_dir>/export).

    kind "auto" writes a GPT2LMHeadModel whenever the settings allow one (lib/export/kind.py), else our
    format; "hf" refuses a model that cannot be one, naming the setting; "native" always writes ours."""
    if kind not in KINDS:
        raise ExportError(f"export kind {kind!r}: expected one of {', '.join(KINDS)}")
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir / "export"
    trained = load_trained(run_dir, which=which)  # CheckpointError names the file when there is none
    settings = trained.settings
    blockers = hf_blockers(settings)
    if kind == "hf" and blockers:
        raise ExportError(f"--hf: {run_dir} cannot be a transformers GPT2LMHeadModel: " + "; ".join(blockers))
    kind = "native" if kind == "native" or blockers else "hf"
    tokenizer = tokenizer_record(settings)
    vocab = tokenizer["vocab_size"]
    if vocab != trained.model.vocab_size:
        raise ExportError(f"{trained.checkpoint}: the model has {trained.model.vocab_size} tokens, its "
                          f"{tokenizer['name']} tokenizer {vocab}; the run's data was prepared differently")
    _check_destination(out_dir, run_dir)

    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=_made(out_dir.parent)))
    try:
        if kind == "hf":
            save_file(hf_state_dict(trained.model), str(staging / WEIGHTS), metadata={"format": "pt"})
            atomic_write_json(staging / "config.json", hf_config(trained.model, settings, tokenizer["eot_token"]))
            reasons = composed_settings(settings)
        else:
            save_file(native_state_dict(trained.model), str(staging / WEIGHTS), metadata={"format": "pt"})
            reasons = blockers  # empty when --native was asked for a model that could be a GPT-2
        files = [WEIGHTS] + (["config.json"] if kind == "hf" else [])
        if tokenizer["name"] == "gpt2":
            files += write_gpt2_tokenizer_files(staging, settings.model.block_size)
        shutil.copyfile(run_dir / SETTINGS_NAME, staging / SETTINGS_NAME)
        record = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": kind,
            "vocab_size": vocab,
            "padded_vocab_size": trained.model.padded_vocab_size,
            "tokenizer": tokenizer,
            "source": {"run_dir": str(run_dir.resolve()), "checkpoint": trained.checkpoint.name,
                       "iters": trained.iters},
            "files": files + [SETTINGS_NAME, EXPORT_RECORD, "README.md"],
        }
        if kind == "hf":
            record["composed_into_gpt2_weights"] = reasons
        else:
            record["not_a_transformers_model_because"] = reasons
            record.update({"not_a_transformers_model": NOT_GPT2} if reasons else {"native_asked_for": True})
        atomic_write_json(staging / EXPORT_RECORD, record)
        atomic_write_text(staging / "README.md", readme(record, run_dir))
        _swap_into_place(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    name = "GPT-2 BPE tokenizer files included" if tokenizer["name"] == "gpt2" else \
        f"character tokenizer ({vocab} characters, listed in export.json)"
    return Exported(out_dir, kind, reasons, name)


def native_state_dict(model) -> dict:
    """Our state_dict with the real vocabulary's rows of wte (and of an untied lm_head); a tied lm_head is the
    same tensor as wte and stored once (safetensors refuses two names for one tensor)."""
    V, out = model.vocab_size, {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.settings.tie_weights:
            continue
        if name in ("transformer.wte.weight", "lm_head.weight"):
            tensor = tensor[:V]
        out[name] = tensor.detach().cpu().contiguous().clone()
    return out


def _made(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _check_destination(out_dir: Path, run_dir: Path) -> None:
    """A non-empty <out> is replaced only when it is an earlier export (export.json), never a run or anything else."""
    if out_dir.resolve() == run_dir.resolve():
        raise ExportError(f"OUT={out_dir} is the run directory itself; choose a directory of its own")
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"OUT={out_dir} is a file; choose a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / EXPORT_RECORD).is_file():
        raise ExportError(f"OUT={out_dir} exists and is not an export (no {EXPORT_RECORD}); "
                          f"choose another OUT or remove it")


def _swap_into_place(staging: Path, out_dir: Path) -> None:
    """Rename the finished export to out_dir; an earlier export there is moved aside first and removed after."""
    previous = None
    if out_dir.exists():
        previous = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
        os.replace(out_dir, previous / out_dir.name)
    os.replace(staging, out_dir)
    if previous is not None:
        shutil.rmtree(previous)


def readme(record: dict, run_dir: Path) -> str:
    """README.md of an export: what it is, its tokenizer, how to load it, and why it is (not) a GPT-2."""
    tokenizer = record["tokenizer"]
    lines = [f"# {run_dir.name}: exported model", "",
             f"From run `{record['source']['run_dir']}`, checkpoint `{record['source']['checkpoint']}` "
             f"(after {record['source']['iters']} optimizer steps). Weights in float32, vocabulary of "
             f"{record['vocab_size']} tokens. Training settings: `settings.json` (the run's own).", ""]
    if tokenizer["name"] == "gpt2":
        lines += ["Tokenizer: GPT-2 byte-level BPE (50257 tokens, `<|endoftext|>` = 50256), as `vocab.json` + "
                  "`merges.txt` (transformers' AutoTokenizer reads them). Note: a Hugging Face tokenizer turns the "
                  "literal text `<|endoftext|>` into token 50256; this project's tokenizer encodes it as plain "
                  "text.", ""]
    else:
        lines += [f"Tokenizer: one token per character, {record['vocab_size']} characters; token i is character "
                  f"i of `tokenizer.chars` in `export.json`. There is no end-of-text token and no Hugging Face "
                  f"tokenizer file for it.", ""]
    if record["kind"] == "hf":
        lines += ["## A transformers GPT2LMHeadModel", "", "```python",
                  "from transformers import GPT2LMHeadModel",
                  "model = GPT2LMHeadModel.from_pretrained(DIR)  # logits equal this project's within 1e-5 (fp32)",
                  "```", ""]
        composed = record["composed_into_gpt2_weights"]
        if composed:
            lines += ["The run trained a variant whose inference forward is still a GPT-2 forward; these parts "
                      "were composed into plain GPT-2 weights (exactly, as the modules' own forwards compose them), "
                      "so the variant's own parameters (gates, P, mixer) are not stored separately:", ""]
            lines += [f"- {reason}" for reason in composed] + [""]
    else:
        reasons = record["not_a_transformers_model_because"]
        if reasons:
            lines += ["## This project's own format, not a transformers model", "",
                      f"This model is not a GPT-2 for transformers: {NOT_GPT2}. The settings that make it so:", ""]
            lines += [f"- {reason}" for reason in reasons] + [""]
        else:
            lines += ["## This project's own format", "", "Asked for with `--native`: the variant's own parameters "
                      "(gates, P, mixer) are kept as trained. Without it the export would be a GPT2LMHeadModel.", ""]
        lines += ["Load it with this project's code (the weights are `model.safetensors` with our tensor names, "
                  "the architecture `settings.json`):", "", "```python", "from lib.export import load_exported",
                  "model = load_exported(DIR)  # a gpt2.model.gpt.GPT in eval mode, logits bit-identical to the run's",
                  "```", ""]
    lines += ["Downstream evaluation with lm-evaluation-harness (this project's `extras/lm-eval.txt`):", "",
              "```sh", "python -m lib.export.harness --model gpt2-ra --model_args run=DIR --tasks lambada_openai",
              "```", "", "export.json:", "", "```json", to_json(record), "```", ""]
    return "\n".join(lines)
