"""Sampling text from a GPT with an incremental decoding cache.

    cache = DecodeCache(model)
    logits = model.forward_cached(prompt, cache)   # the prompt in one call: logits (B, T0, V), cache of T0 tokens
    logits = model.forward_cached(token, cache)    # then one token per call: (B, 1, V)

Each call computes only the new tokens' rows, and they equal forward()'s logits at those positions (causal: the
earlier rows never change). What each attention backend caches per layer (folded keys, the reciprocal term's
query side, KV pruning's received attention) is in gpt2/model/attention/cache.py and docs/attention.md.

Beyond the block size. wpe has block_size positions, so the model sees at most the last block_size tokens (as
in training). Once the sequence outgrows that, the window slides: every token in it moves to a new position and
the cache no longer describes it, so each further token recomputes the window (one forward of block_size tokens
through the cache path, nanoGPT's generate without a cache). The logits are still exactly those of forward() on
the cropped window; only the speed-up is lost.
"""

import torch

from gpt2.model.attention.cache import LayerCache
from gpt2.model.attention.hooks import cached_composition


class DecodeCache:
    """One LayerCache per block, and `length`: the tokens cached (GPT.forward_cached reads and advances it)."""

    def __init__(self, model):
        self.layers = [LayerCache() for _ in model.transformer.h]
        self.length = 0


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, generator=None) -> torch.Tensor:
    """One token per row of logits (B, V) -> (B, 1).

        temperature 0:  argmax (greedy)
        otherwise:      draw from softmax(logits / temperature) restricted to the top_k largest (0 = all V)
    """
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)


@torch.no_grad()
def generate(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """idx (B, T0) int64 prompt -> (B, T0 + max_new_tokens): the prompt followed by the sampled tokens.

    The model runs in eval mode (no dropout) for the call. generator (on idx's device) makes the draws
    reproducible. Token ids stay below model.vocab_size: forward_cached drops the padded vocabulary columns.
    """
    if idx.shape[1] == 0:
        raise ValueError("generate needs a prompt of at least one token")
    block = model.settings.block_size
    was_training = model.training
    model.eval()
    try:
        # The weights are fixed while generating: ra-unified composes its QKV weights once, not once per token.
        with cached_composition(model):
            out, cache = idx, None
            for _ in range(max_new_tokens):
                if cache is None or cache.length == block:  # the start, or a full window: positions shift
                    cache = DecodeCache(model)
                    logits = model.forward_cached(out[:, -block:], cache)
                else:
                    logits = model.forward_cached(out[:, -1:], cache)
                out = torch.cat([out, sample_next(logits[:, -1], temperature, top_k, generator)], dim=1)
        return out
    finally:
        model.train(was_training)
