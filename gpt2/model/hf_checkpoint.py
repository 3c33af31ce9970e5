"""Hugging Face GPT-2 checkpoints: their config.json as ModelSettings, and their weight files read without pickle
where the file allows (safetensors; a .bin is read with torch.load(weights_only=True)). GPT.from_pretrained and
the export loader use them."""

from pathlib import Path

import torch

from gpt2.settings import ModelSettings

LAYER_NORM_EPS = 1e-5  # GPT-2's layer_norm_epsilon: what its checkpoints assume, and gpt.py's LayerNorm uses


def hf_model_settings(hf: dict, where="config.json") -> ModelSettings:
    """ModelSettings equivalent to a Hugging Face GPT-2 config.json; refuses variants we do not implement."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"{where}: model_type {hf.get('model_type')!r} is not gpt2")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"{where}: activation_function {activation!r}; only GPT-2's tanh GELU is supported")
    if abs(hf.get("layer_norm_epsilon", LAYER_NORM_EPS) - LAYER_NORM_EPS) > 1e-12:
        raise ValueError(f"{where}: layer_norm_epsilon {hf['layer_norm_epsilon']} differs from GPT-2's {LAYER_NORM_EPS}")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(flag):
            raise ValueError(f"{where}: {flag}=true is not supported")
    if not hf.get("scale_attn_weights", True):
        raise ValueError(f"{where}: scale_attn_weights=false is not supported")
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        raise ValueError(f"{where}: n_inner={hf['n_inner']} (only 4 x n_embd is supported)")
    return ModelSettings(size="custom", n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                         block_size=hf["n_positions"], dropout=0.0, bias=True,
                         tie_weights=hf.get("tie_word_embeddings", True), init_from="hf", hf_checkpoint_dir="")


def read_hf_weights(directory) -> dict:
    directory = Path(directory)
    if (directory / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(directory / "model.safetensors"))
    if (directory / "pytorch_model.bin").is_file():
        return torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{directory} has neither model.safetensors nor pytorch_model.bin "
                            f"(sharded checkpoints are not supported)")
