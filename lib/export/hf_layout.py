"""Our GPT as a Hugging Face GPT-2 checkpoint: config.json and the model.safetensors tensors.

Layout differences from ours (gpt2/model/gpt.py):
  - HF's c_attn, c_proj, c_fc are Conv1D modules storing the weight as (in, out): ours (nn.Linear) transposed;
  - the vocabulary is the tokenizer's (e.g. 50257): our wte/lm_head rows past it are padding, sliced off;
  - a tied lm_head is not stored (HF ties it to wte on load, as tie_word_embeddings says);
  - weights that our modules compose at run time (same-FLOP RA's q~/k~, the R-MLP's c_proj) are written
    composed, and absent biases as zeros (lib/export/kind.py says why each is exact).
"""

import re

import torch
import torch.nn as nn

from gpt2.model.attention.common import RAAttentionBase
from gpt2.model.attention.same_flop import RASameFlopAttention
from gpt2.model.attention.unified import RAUnifiedAttention
from gpt2.model.gpt import GPT
from gpt2.model.hf_checkpoint import LAYER_NORM_EPS
from gpt2.model.mlp import ReciprocalMLP


def hf_config(model: GPT, settings, eot_token) -> dict:
    """config.json of a transformers GPT2LMHeadModel with our model's shape (all of GPT-2's options spelled out,
    so no transformers default decides anything)."""
    s = model.settings
    hidden = settings.mlp.expansion * s.n_embd
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": model.vocab_size,
        "n_positions": s.block_size,
        "n_embd": s.n_embd,
        "n_layer": s.n_layer,
        "n_head": s.n_head,
        "n_inner": None if hidden == 4 * s.n_embd else hidden,  # null: GPT-2's 4 x n_embd
        "activation_function": "gelu_new",  # GELU, tanh approximation: F.gelu(approximate="tanh")
        "resid_pdrop": s.dropout,
        "embd_pdrop": s.dropout,
        "attn_pdrop": s.dropout,
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "use_cache": True,
        "bos_token_id": eot_token,  # None for the char tokenizer, which has no end-of-text token
        "eos_token_id": eot_token,
        "tie_word_embeddings": s.tie_weights,
        "dtype": "float32",
    }


@torch.no_grad()
def hf_state_dict(model: GPT) -> dict:
    """{HF tensor name: CPU float tensor} for model.safetensors. Every parameter of `model` is accounted for
    (written, or composed into a written weight); one that is neither raises, so nothing is dropped silently."""
    t, V = model.transformer, model.vocab_size
    out = {"transformer.wte.weight": t.wte.weight[:V], "transformer.wpe.weight": t.wpe.weight}
    for i, block in enumerate(t.h):
        p = f"transformer.h.{i}."
        _layer_norm(out, p + "ln_1", block.ln_1)
        _layer_norm(out, p + "ln_2", block.ln_2)
        attn_weight, attn_bias = _attention_qkv(block.attn)
        _conv1d(out, p + "attn.c_attn", attn_weight, attn_bias)
        _conv1d(out, p + "attn.c_proj", block.attn.c_proj.weight, block.attn.c_proj.bias)
        _conv1d(out, p + "mlp.c_fc", block.mlp.c_fc.weight, block.mlp.c_fc.bias)
        proj = block.mlp.composed_proj_weight() if isinstance(block.mlp, ReciprocalMLP) else block.mlp.c_proj.weight
        _conv1d(out, p + "mlp.c_proj", proj, block.mlp.c_proj.bias)
    _layer_norm(out, "transformer.ln_f", t.ln_f)
    if not model.settings.tie_weights:
        out["lm_head.weight"] = model.lm_head.weight[:V]
    _check_every_parameter_used(model)
    # Own contiguous copies: safetensors refuses views and tensors that share memory (wte and a tied lm_head).
    return {name: tensor.detach().to("cpu", torch.float32).contiguous().clone() for name, tensor in out.items()}


def _attention_qkv(attn: nn.Module):
    """(weight (3C, C), bias (3C,) or None) of the layer's [q | k | v] projection as a GPT-2 block computes it."""
    if attn.kv is not None or attn.restart is not None or (
            isinstance(attn, RAAttentionBase) and not isinstance(attn, RASameFlopAttention)):
        raise ValueError(f"layer {attn.layer_idx}: {type(attn).__name__} (with its KV pruning / self-restart) has "
                         f"no GPT-2 form (lib/export/kind.py)")
    if isinstance(attn, RASameFlopAttention):
        # ra-unified's composition is the same formula for ra-same-flop (unified.py: "Same formula as
        # ra-same-flop"; RAUnifiedAttention only adds how it is cached), both at head dim D.
        return RAUnifiedAttention.composed_qkv_plain(attn)
    return attn.c_attn.weight, attn.c_attn.bias


def _conv1d(out: dict, name: str, weight: torch.Tensor, bias) -> None:
    out[name + ".weight"] = weight.t()  # nn.Linear (out, in) -> Conv1D (in, out)
    out[name + ".bias"] = bias if bias is not None else weight.new_zeros(weight.shape[0])


def _layer_norm(out: dict, name: str, norm: nn.Module) -> None:
    out[name + ".weight"] = norm.weight
    out[name + ".bias"] = norm.bias if norm.bias is not None else torch.zeros_like(norm.weight)


# Every parameter name an HF export writes, or folds into what it writes (RA gates, P, u; R-MLP mixer, gates).
ACCOUNTED_FOR = re.compile(r"transformer\.(wte|wpe)\.weight|lm_head\.weight|transformer\.ln_f\.(weight|bias)"
                           r"|transformer\.h\.\d+\.(ln_1|ln_2|attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)"
                           r"\.(weight|bias)"
                           r"|transformer\.h\.\d+\.attn\.(P|u|(w_std|w_rec|w_disc)\.sqrt_weight)"
                           r"|transformer\.h\.\d+\.mlp\.(mixer|(w_std|w_rec)\.sqrt_weight)")


def _check_every_parameter_used(model: GPT) -> None:
    for name, _ in model.named_parameters():
        if not ACCOUNTED_FOR.fullmatch(name):
            raise ValueError(f"parameter {name} has no place in a GPT-2 checkpoint; export with --native")
