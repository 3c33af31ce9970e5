"""GPT-2 as published (Radford et al. 2019), with pluggable attention and MLP.

    tokens (B, T) -> wte + wpe -> dropout -> n_layer x Block -> LayerNorm -> lm_head -> logits (B, T, V)
    Block:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))          (pre-LayerNorm)

Attention and MLP come from gpt2.model.attention.build_attention and gpt2.model.mlp.build_mlp; their
parameter names (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj) match Hugging Face GPT-2,
so `GPT.from_pretrained` can load a GPT-2 checkpoint directory.

Initialisation is by name: each shared weight is drawn from its own generator seeded by
(seed, parameter name), so a variant that adds parameters leaves every shared weight
exactly as in the baseline. Parameters the model does not know (gates, projections of
attention variants) keep the values their own module gave them.
"""

import json
import math
import re
import zlib
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2.model.attention import build_attention
from gpt2.model.attention.hooks import RoutingMonitor, cached_composition, composed_parameters, composes_in_one_launch
from gpt2.model.hf_checkpoint import LAYER_NORM_EPS, hf_model_settings, read_hf_weights
from gpt2.model.mlp import build_mlp
from gpt2.settings import AttentionSettings, KVPruningSettings, MLPSettings, ModelSettings

INIT_STD = 0.02
VOCAB_PAD_MULTIPLE = 64  # lm_head is stored with a padded vocabulary: matmuls on multiples of 64 are much faster


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (torch's has no bias=False before 2.1 and we keep the names simple)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, LAYER_NORM_EPS)


class Block(nn.Module):
    def __init__(self, model: ModelSettings, attention: AttentionSettings, kv_pruning: KVPruningSettings,
                 mlp: MLPSettings, layer_idx: int):
        super().__init__()
        self.ln_1 = LayerNorm(model.n_embd, model.bias)
        self.attn = build_attention(model, attention, kv_pruning, layer_idx)
        self.ln_2 = LayerNorm(model.n_embd, model.bias)
        self.mlp = build_mlp(model, mlp)

    def forward(self, x):  # (B, T, C) -> (B, T, C)
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x

    def forward_cached(self, x, cache):  # (B, T_new, C) -> (B, T_new, C); cache: this layer's LayerCache
        x = x + self.attn.forward_cached(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2 (module doc) with the hooks a trainer calls around its optimizer step.

    A trainer knows the model only through forward() and these; what an attention variant does behind
    them stays in gpt2/model/attention, and for plain GPT-2 each is a no-op:

        accumulation(compiled, reduce)  context manager around one optimizer step's micro-steps: ra-unified
                                composes its QKV weights once inside it and sends their gradient back
                                through the composition when it closes, after reduce() averaged it across
                                DDP's processes (which then leave composed_parameters() alone).
        accumulation_pays_alone()  whether to enter accumulation() with one micro-step too (ra-unified on its
                                kernels composes every layer in one launch each way there).
        regularization_loss()   a term the trainer adds to the objective once per optimizer step, or None.
        refresh_routing()       recompute what compiled forwards hold constant (head-selective routing)
                                after the parameters changed; one log line per layer whose routing changed.
        gate_values()           the attention gates per layer, for metrics.json ([] without gates).

    The last two collect the attention modules' regularization_loss() and gate_values(), which
    AttentionBase defines as None and {} and the RA backends override.
    """

    def __init__(self, model: ModelSettings, attention: AttentionSettings, mlp: MLPSettings,
                 kv_pruning: KVPruningSettings, vocab_size: int, seed: int = 0):
        super().__init__()
        self.settings = model
        self.vocab_size = vocab_size
        self.padded_vocab_size = -(-vocab_size // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE
        # Modules that initialise their own parameters draw from the global RNG: fix it by the seed, keep the caller's.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.transformer = nn.ModuleDict(dict(
                wte=nn.Embedding(self.padded_vocab_size, model.n_embd),
                wpe=nn.Embedding(model.block_size, model.n_embd),
                drop=nn.Dropout(model.dropout),
                h=nn.ModuleList(Block(model, attention, kv_pruning, mlp, i) for i in range(model.n_layer)),
                ln_f=LayerNorm(model.n_embd, model.bias),
            ))
            head_device = "meta" if model.tie_weights else None  # tied: wte's weight replaces it, so no 50k x C init
            self.lm_head = nn.Linear(model.n_embd, self.padded_vocab_size, bias=False, device=head_device)
        if model.tie_weights:
            self.lm_head.weight = self.transformer.wte.weight
        mask = torch.zeros(self.padded_vocab_size)
        mask[vocab_size:] = float("-inf")
        self.register_buffer("vocab_mask", mask, persistent=False)  # not in state_dict
        self.init_shared_weights(seed)
        self.zero_unused_weights()
        self.routing = RoutingMonitor(self)  # the layers with head-selective routing (often none)

    # ---- initialisation ---------------------------------------------------------------

    def init_shared_weights(self, seed: int) -> None:
        """GPT-2 init for every shared weight, each from a generator seeded by (seed, name).

            embeddings, c_attn, c_fc (and an untied lm_head):  N(0, 0.02)
            c_proj (residual projections):                     N(0, 0.02 / sqrt(2 * n_layer))
            LayerNorm gain / every bias:                       1 / 0
        """
        layer_norms = {name for name, module in self.named_modules() if isinstance(module, (LayerNorm, nn.LayerNorm))}
        residual_std = INIT_STD / math.sqrt(2 * self.settings.n_layer)
        with torch.no_grad():
            for name, param in self.named_parameters():  # tied lm_head.weight is yielded once, as wte.weight
                owner, _, attr = name.rpartition(".")
                kind = owner.rpartition(".")[2]
                if owner in layer_norms:
                    param.fill_(1.0 if attr == "weight" else 0.0)
                elif kind in ("c_attn", "c_fc", "c_proj") and attr == "bias":
                    param.zero_()
                elif kind in ("wte", "wpe", "lm_head", "c_attn", "c_fc", "c_proj") and attr == "weight":
                    std = residual_std if kind == "c_proj" else INIT_STD
                    param.copy_(torch.randn(param.shape, generator=name_generator(seed, name)) * std)

    def zero_unused_weights(self) -> None:
        """Zero the weight entries a backend never reads (tied same-FLOP RA: the last R rows of each head's W_q
        and W_k). They get no gradient, so AdamW leaves them at zero: they never change the model."""
        for m in self.attention_modules():
            m.zero_unused_weights()

    # ---- forward ----------------------------------------------------------------------

    def forward(self, idx, targets=None, return_logits: bool = True):
        """idx (B, T) int64 -> (logits (B, T, vocab_size) or None, mean cross-entropy loss or None).

        Training passes return_logits=False: a compiled graph that need not output the logits runs faster.
        """
        B, T = idx.shape
        if T > self.settings.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than the block size {self.settings.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)  # (B, T, padded_vocab_size)
        if self.padded_vocab_size != self.vocab_size:
            # Padded columns are layout only: -inf gives them zero probability and zero gradient. (Adding a
            # mask fuses into the cross-entropy; slicing them off would copy the logits and their gradient.)
            logits = logits + self.vocab_mask.to(logits.dtype)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        if not return_logits:
            return None, loss
        return logits[..., : self.vocab_size], loss

    @torch.no_grad()
    def forward_cached(self, idx, cache):
        """Incremental decoding (gpt2/model/decode.py): idx (B, T_new) are the tokens after the cache.length
        cached ones -> logits (B, T_new, vocab_size), forward()'s at those positions (eval mode); the cache
        grows by them. Positions run on from cache.length, so cache.length + T_new <= block_size."""
        start, T = cache.length, cache.length + idx.shape[1]
        if T > self.settings.block_size:
            raise ValueError(f"{T} tokens with the cache exceed the block size {self.settings.block_size}")
        pos = torch.arange(start, T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block, layer_cache in zip(self.transformer.h, cache.layers):
            x = block.forward_cached(x, layer_cache)
        cache.length = T
        return self.lm_head(self.transformer.ln_f(x))[..., : self.vocab_size]  # padded columns sliced off

    # ---- introspection used by the trainer --------------------------------------------

    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters; non_embedding drops the position table (and the token table when untied,
        since a lookup costs no FLOPs), which is the N of the 6N FLOP estimate."""
        n = sum(p.numel() for p in self.parameters()) - sum(m.unused_weight_count() for m in self.attention_modules())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
            if not self.settings.tie_weights:
                n -= self.transformer.wte.weight.numel()
        return n

    def attention_modules(self):
        return [block.attn for block in self.transformer.h]

    # ---- hooks the trainer calls (class doc) ------------------------------------------

    def accumulation(self, compiled: bool = False, reduce=None, dtype: torch.dtype | None = None):
        """Context manager for one optimizer step's micro-steps; `compiled`: the model runs under torch.compile;
        `reduce(grads)`: averages the composed weights' gradients across processes (DDP) before they go back;
        `dtype`: what the composed weights are held in (hooks.cached_composition)."""
        return cached_composition(self, compiled, reduce=reduce, dtype=dtype)

    def accumulation_pays_alone(self) -> bool:
        """Whether the accumulation hook pays even for a single micro-step (ra-unified on its kernels: every
        layer composed in one launch each way)."""
        return composes_in_one_launch(self)

    def composed_parameters(self) -> list:
        """The parameters the accumulation hook composes from (DDP must leave their gradients to `reduce`)."""
        return composed_parameters(self)

    def regularization_loss(self) -> torch.Tensor | None:
        """Sum of the attention modules' regularization terms (None when no module has one)."""
        terms = [t for t in (m.regularization_loss() for m in self.attention_modules()) if t is not None]
        return sum(terms) if terms else None

    def refresh_routing(self) -> list:
        """Recompute head-selective routing; log lines for the layers whose routing changed since last time."""
        return self.routing.refresh()

    def gate_values(self) -> list:
        """[{"layer": i, "w_std": [...], "w_rec": [...]}] for the attention modules that have gates."""
        out = []
        for i, m in enumerate(self.attention_modules()):
            gates = m.gate_values()
            if gates:
                out.append({"layer": i, **{k: [float(v) for v in vals] for k, vals in gates.items()}})
        return out

    # ---- Hugging Face checkpoints -----------------------------------------------------

    @classmethod
    def from_pretrained(cls, directory, model: ModelSettings | None = None, attention: AttentionSettings | None = None,
                        mlp: MLPSettings | None = None, kv_pruning: KVPruningSettings | None = None, seed: int = 0):
        """Load a Hugging Face GPT-2 checkpoint directory (config.json + model.safetensors or pytorch_model.bin).

        Nothing is downloaded. With `model` settings given, their sizes must match the checkpoint
        (block_size may be smaller: the position table is cropped). Attention/MLP settings default to
        the baseline (sdpa, standard 4x MLP); variant parameters absent from the checkpoint keep their
        own initialisation.
        """
        directory = Path(directory)
        config_path = directory / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{directory} is not a Hugging Face checkpoint directory (no config.json)")
        hf = json.loads(config_path.read_text())
        hf_model = hf_model_settings(hf, config_path)
        if model is None:
            model = hf_model
        else:
            differences = [f"{field}: config {getattr(model, field)}, checkpoint {getattr(hf_model, field)}"
                           for field in ("n_layer", "n_head", "n_embd", "bias", "tie_weights")
                           if getattr(model, field) != getattr(hf_model, field)]
            if model.block_size > hf_model.block_size:
                differences.append(f"block_size: config {model.block_size} > checkpoint n_positions "
                                   f"{hf_model.block_size}")
            if differences:
                raise ValueError(f"{config_path} does not match the configured model: " + "; ".join(differences))
        gpt = cls(model, attention or AttentionSettings(), mlp or MLPSettings(), kv_pruning or KVPruningSettings(),
                  vocab_size=hf["vocab_size"], seed=seed)
        gpt.load_hf_state_dict(read_hf_weights(directory), source=str(directory))
        gpt.zero_unused_weights()
        return gpt

    def load_hf_state_dict(self, hf_state: dict, source: str = "checkpoint") -> None:
        """Copy Hugging Face GPT-2 tensors into this model (Conv1D weights are (in, out): transposed here)."""
        ours = self.state_dict()
        loaded = set()
        with torch.no_grad():
            for hf_name, tensor in hf_state.items():
                name = hf_name if hf_name.startswith(("transformer.", "lm_head.")) else "transformer." + hf_name
                if re.search(r"\.attn\.(bias|masked_bias)$", name):
                    continue  # causal-mask buffers of old checkpoints
                if name not in ours:
                    raise KeyError(f"{source}: tensor {hf_name!r} has no counterpart in the model")
                if re.search(r"\.(c_attn|c_proj|c_fc)\.weight$", name):
                    tensor = tensor.t()
                target = ours[name]
                if name in ("transformer.wte.weight", "lm_head.weight"):  # padded vocabulary rows stay zero
                    target.zero_()
                    target[: tensor.shape[0]].copy_(tensor)
                elif name == "transformer.wpe.weight":  # a shorter block size crops the position table
                    target.copy_(tensor[: target.shape[0]])
                else:
                    if target.shape != tensor.shape:
                        raise ValueError(f"{source}: {hf_name} has shape {tuple(tensor.shape)}, "
                                         f"the model expects {tuple(target.shape)}")
                    target.copy_(tensor)
                loaded.add(name)
        if self.settings.tie_weights and loaded & {"transformer.wte.weight", "lm_head.weight"}:
            loaded |= {"transformer.wte.weight", "lm_head.weight"}  # one tensor under two names
        shared = {n for n in ours if _is_shared_name(n)}
        missing = sorted(shared - loaded)
        if missing:
            raise KeyError(f"{source}: checkpoint lacks {', '.join(missing[:8])}"
                           f"{' ...' if len(missing) > 8 else ''}")


def name_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator whose stream depends only on (seed, parameter name)."""
    return torch.Generator().manual_seed((seed * 0x1_0000_0001 + zlib.crc32(name.encode())) % (1 << 63))


def _is_shared_name(name: str) -> bool:
    return bool(re.search(r"(wte|wpe|ln_\d|ln_f|c_attn|c_proj|c_fc)\.(weight|bias)$", name)) or name == "lm_head.weight"


# Settings of the plain GPT-2 architecture, for loading checkpoints without a .config.
def build_model(settings, vocab_size: int) -> GPT:
    """The model a run trains: from scratch, or from a Hugging Face checkpoint (CONFIG_MODEL_INIT_HF)."""
    if settings.model.init_from == "hf":
        model = GPT.from_pretrained(settings.model.hf_checkpoint_dir, settings.model, settings.attention,
                                    settings.mlp, settings.kv_pruning, seed=settings.general.seed)
        if model.vocab_size != vocab_size:
            raise ValueError(f"{settings.model.hf_checkpoint_dir}: vocabulary of {model.vocab_size} tokens, "
                             f"the dataset's tokenizer has {vocab_size}")
        return model
    return GPT(settings.model, settings.attention, settings.mlp, settings.kv_pruning, vocab_size,
               seed=settings.general.seed)
