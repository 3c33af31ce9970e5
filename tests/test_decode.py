"""Incremental decoding: the cached forward gives forward()'s logits at every position, for every backend and form
(with and without the discoverability bias, with exact and sampled KV pruning, with routing and self-restart), in
float64 on a tiny model; the attention rows also against the explicit reference of their formula; generation
beyond the block size, seeds, and the padded vocabulary."""

import pytest
import torch

from gpt2.model.attention import build_attention
from gpt2.model.attention.cache import LayerCache
from gpt2.model.decode import DecodeCache, generate, sample_next
from gpt2.model.gpt import GPT
from test_attention_helpers import (FORM, attn_settings, explicit_attention, kv_settings, mlp_settings,
                                    model_settings, randomize, rel_err)

VOCAB = 50  # padded to 64 inside the model
# (backend, form): every backend, and both forms of the same-FLOP pair
VARIANTS = [("sdpa", ""), ("ra-reference", ""), ("ra-fold-full", ""), ("ra-fold-lowrank", ""),
            ("ra-same-flop", "tied"), ("ra-same-flop", "untied"), ("ra-unified", "tied"), ("ra-unified", "untied")]
KV = {"off": kv_settings(),
      "exact": kv_settings(enabled=True, keep_ratio=0.3, recency=2),
      # rows i + 1 >= 64 sample s_i = 64 of their n_i = i - 1 candidates from i = 66 on (a strict subset, so the
      # per-row Weyl offset matters); the shorter rows select exactly
      "sampled": kv_settings(enabled=True, keep_ratio=0.3, recency=2, sampling=True, min_length=64, fraction=0.05)}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Thousands of tiny ops: with one intra-op thread they run ~20x faster on a busy machine (no hand-offs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_gpt(backend, form="", disc=False, kv="off", threshold=0.0, block_size=40, seed=0, mlp=None):
    """A float64 2-layer GPT whose every parameter is random (gates, P, u, self-restart included), in eval mode."""
    model = model_settings(n_embd=32, n_head=4, block_size=block_size)
    attn = attn_settings(backend, rank=2, disc=disc, restart=True, threshold=threshold, form=form)
    gpt = GPT(model, attn, mlp or mlp_settings(), KV[kv], VOCAB, seed=seed).double().eval()
    for i, m in enumerate(gpt.attention_modules()):
        randomize(m, seed=seed + i)
    gpt.zero_unused_weights()
    return gpt


def incremental_logits(gpt, idx, cuts):
    """forward_cached over the chunks idx[:, a:b] for consecutive (a, b) in cuts, then one token per call."""
    cache, pieces, start = DecodeCache(gpt), [], 0
    for end in cuts:
        pieces.append(gpt.forward_cached(idx[:, start:end], cache))
        start = end
    for t in range(start, idx.shape[1]):
        pieces.append(gpt.forward_cached(idx[:, t:t + 1], cache))
    assert cache.length == idx.shape[1] and all(layer.length == idx.shape[1] for layer in cache.layers)
    return torch.cat(pieces, dim=1)


def check_incremental(gpt, T, cuts):
    idx = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(T))
    full, _ = gpt(idx)
    for chunks in ([], cuts):  # token by token from the first, and a prompt then chunks then tokens
        inc = incremental_logits(gpt, idx, chunks)
        assert inc.shape == full.shape
        err = (inc - full).abs().max().item()
        assert err < 1e-10, f"cuts {chunks}: max |incremental - forward| = {err:.2e}"
    return full


@pytest.mark.parametrize("backend, form", VARIANTS)
@pytest.mark.parametrize("disc", [False, True])
@pytest.mark.parametrize("kv", ["off", "exact"])
def test_incremental_equals_forward(backend, form, disc, kv):
    if backend == "sdpa" and disc:
        pytest.skip("discoverability needs an RA backend")
    # a 5-token prompt, 4 single tokens, then a 3-token chunk (query and key lengths differ: explicit mask)
    check_incremental(tiny_gpt(backend, form, disc, kv), T=24, cuts=[5, 6, 7, 8, 9, 12])


@pytest.mark.parametrize("backend, form", VARIANTS)
def test_incremental_equals_forward_with_sampled_kv_pruning(backend, form):
    """Sampled thresholds past CONFIG_RA_SAMPLING_MIN_LENGTH: the prompt ends before it and the next chunk
    crosses it (the exact prefix and the sampled rows split inside a chunk), then tokens one by one."""
    disc = backend != "sdpa"
    gpt = tiny_gpt(backend, form, disc, "sampled", block_size=100)
    full = check_incremental(gpt, T=96, cuts=[60, 68])
    unpruned = tiny_gpt(backend, form, disc, "off", block_size=100)  # the same weights
    idx = torch.randint(0, VOCAB, (2, 96), generator=torch.Generator().manual_seed(96))
    assert (unpruned(idx)[0] - full).abs().max() > 1e-3, "the test must actually prune"


@pytest.mark.parametrize("backend", ["ra-reference", "ra-fold-full", "ra-fold-lowrank", "ra-same-flop", "ra-unified"])
def test_incremental_equals_forward_with_routing_and_reciprocal_mlp(backend):
    """Head-selective routing (ra-fold-* pack the plain heads at their own width: the cache pads them) and the
    reciprocal MLP (per token, nothing to cache)."""
    gpt = tiny_gpt(backend, disc=True, kv="exact", threshold=0.3,
                   mlp=mlp_settings("reciprocal", rff=16, mixer=True, gates=True))
    with torch.no_grad():
        for m in gpt.attention_modules():
            m.w_rec.sqrt_weight.copy_(torch.tensor([0.2, 0.9, 0.1, 1.1]))  # w_rec .04, .81, .01, 1.21
            m.refresh_head_routing()
    check_incremental(gpt, T=20, cuts=[4, 9])
    if backend.startswith("ra-fold"):
        assert all(m.routed_heads == (1, 3) for m in gpt.attention_modules())


@pytest.mark.parametrize("backend, form", VARIANTS)
def test_cached_attention_rows_match_the_explicit_reference(backend, form):
    """One attention module, its rows through the cache vs the formula materialised (test_attention_helpers)."""
    disc = backend != "sdpa"
    m = build_attention(model_settings(), attn_settings(backend, rank=2, disc=disc, restart=True, threshold=0.3,
                                                        form=form), kv_settings(), 0).double().eval()
    randomize(m, seed=3)
    m.zero_unused_weights()
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    cache = LayerCache()
    with torch.no_grad():
        y = torch.cat([m.forward_cached(x[:, a:b], cache) for a, b in ((0, 3), (3, 4), (4, 7), (7, 8), (8, 11))], 1)
    ref = explicit_attention(dict(m.named_parameters()), x, form=FORM[backend], n_head=4, rank=2, disc=disc,
                             restart=True, threshold=0.3)
    assert rel_err(y, ref) < 1e-12


def test_a_lone_query_sees_every_cached_key():
    """SDPA's is_causal aligns top-left when query and key lengths differ; the decoder must not use it there."""
    gpt = tiny_gpt("sdpa")
    idx = torch.randint(0, VOCAB, (1, 6))
    cache = DecodeCache(gpt)
    gpt.forward_cached(idx[:, :5], cache)
    last = gpt.forward_cached(idx[:, 5:], cache)
    assert torch.allclose(last[:, 0], gpt(idx)[0][:, -1], atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="exceed the block size 40"):
        gpt.forward_cached(torch.zeros(1, 35, dtype=torch.long), cache)


@pytest.mark.parametrize("backend, kv", [("ra-unified", "exact"), ("ra-reference", "exact"), ("sdpa", "off")])
def test_generation_beyond_the_block_size_recomputes_the_window(backend, kv):
    """Greedy generation past block_size equals forward() on the last block_size tokens at every step."""
    gpt = tiny_gpt(backend, disc=backend != "sdpa", kv=kv, block_size=16)
    prompt = torch.randint(0, VOCAB, (2, 5))
    out = generate(gpt, prompt, 30, temperature=0)
    expected = prompt
    for _ in range(30):
        logits, _ = gpt(expected[:, -16:])
        expected = torch.cat([expected, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out.shape == (2, 35) and torch.equal(out, expected)


def test_seeded_sampling_is_reproducible_and_seeds_differ():
    gpt = tiny_gpt("ra-same-flop", "tied", disc=True)
    prompt = torch.randint(0, VOCAB, (3, 4))

    def draw(seed):
        return generate(gpt, prompt, 25, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))
    assert torch.equal(draw(1)[:, :4], prompt)


def test_tokens_stay_in_the_real_vocabulary():
    """The padded vocabulary rows (50..63) get huge logits here; no token ever comes from them."""
    gpt = tiny_gpt("ra-fold-full", disc=True)
    with torch.no_grad():
        gpt.lm_head.weight[VOCAB:] = 100.0 * torch.randn(14, 32, dtype=torch.float64)
    assert gpt.padded_vocab_size == 64
    out = generate(gpt, torch.zeros(4, 1, dtype=torch.long), 40, temperature=2.0, top_k=0,
                   generator=torch.Generator().manual_seed(0))
    assert out.max() < VOCAB and gpt.forward_cached(out[:, :8], DecodeCache(gpt)).shape[-1] == VOCAB


def test_sample_next_temperature_and_top_k():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert sample_next(logits, 0, 0).item() == 1  # greedy
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 5.0, 2, g).item() for _ in range(200)}
    assert draws == {1, 3}  # only the two largest, both drawn at a high temperature


def test_generation_leaves_the_training_mode_alone():
    gpt = tiny_gpt("sdpa").train()
    generate(gpt, torch.zeros(1, 1, dtype=torch.long), 2, temperature=0)
    assert gpt.training
    with pytest.raises(ValueError, match="at least one token"):
        generate(gpt, torch.zeros(1, 0, dtype=torch.long), 2)
