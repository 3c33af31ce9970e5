"""KV pruning: the causal keep set against a brute-force transcription of its definition, keep counts,
sampled-threshold statistics, renormalised attention, and causality through the attention modules."""

import math
import random

import pytest
import torch

from gpt2.model import kv_pruning
from gpt2.model.attention import build_attention
from test_attention_helpers import ALL_BACKENDS, attn_settings, kv_settings, model_settings, randomize


def brute_force_keep(A, keep_ratio, recency):
    """Keep sets of one head, written as loops straight from the definition in gpt2/kv_pruning.py."""
    T = A.shape[0]
    W = max(recency, 1)
    keep = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        for j in range(max(0, i - W + 1), i + 1):
            keep[i, j] = True  # recency window (includes the query itself)
        candidates = list(range(0, i - W + 1))
        importance = {j: sum(A[m, j].item() for m in range(j, i + 1)) / (i - j + 1) for j in candidates}
        k = min(math.ceil(keep_ratio * (i + 1) - 1e-9), len(candidates))
        for j in sorted(candidates, key=lambda j: -importance[j])[:k]:
            keep[i, j] = True
    return keep


def random_causal_probs(*shape, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(*shape, T, T, generator=g, dtype=torch.float64) * 2
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return torch.softmax(L.masked_fill(~causal, float("-inf")), dim=-1)


@pytest.mark.parametrize("keep_ratio,recency", [(0.3, 2), (0.5, 0), (0.2, 5), (1.0, 1)])
def test_keep_mask_matches_definition(keep_ratio, recency):
    A = random_causal_probs(2, T=13)
    kv = kv_settings(enabled=True, keep_ratio=keep_ratio, recency=recency)
    keep = kv_pruning.causal_keep_mask(A, kv)
    for h in range(2):
        assert torch.equal(keep[h], brute_force_keep(A[h], keep_ratio, recency))


def test_exact_keep_counts():
    T, ratio, W = 40, 0.382, 4
    kv = kv_settings(enabled=True, keep_ratio=ratio, recency=W)
    keep = kv_pruning.causal_keep_mask(random_causal_probs(3, T=T), kv)
    assert not keep.triu(1).any()  # never a future key
    for i in range(T):
        expected = min(i + 1, W + math.ceil(ratio * (i + 1) - 1e-9))
        assert (keep[..., i, :].sum(-1) == expected).all(), i


def test_sampled_keep_count_within_5_percent_at_16k():
    """Threshold from a 2% sample, selection over all 16K keys: the mean keep count is within 5% of k."""
    torch.manual_seed(0)
    N, ratio = 16384, 0.382
    kv = kv_settings(enabled=True, keep_ratio=ratio, sampling=True, min_length=4096, fraction=0.02)
    assert kv_pruning.uses_sampling(kv, N) and kv_pruning.sample_size(kv, N) == 328
    importance = torch.rand(8, 12, N).pow(3)  # skewed, like attention mass
    k = math.ceil(ratio * N)
    per_row = (torch.tensor(k), torch.tensor(N), torch.tensor(328), torch.arange(12))
    for keep in (kv_pruning.select_sampled(importance, k, N, 328), kv_pruning.select_sampled(importance, *per_row)):
        counts = keep.sum(-1).double()
        assert abs(counts.mean().item() / k - 1) < 0.05
        # Every key above the row's threshold is kept: kept scores all exceed dropped ones.
        for row_imp, row_keep in zip(importance.view(-1, N), keep.view(-1, N)):
            assert row_imp[row_keep].min() >= row_imp[~row_keep].max()
    assert (kv_pruning.select_exact(importance, k).sum(-1) == k).all()


@pytest.mark.parametrize("shared_count", [False, True])
def test_sampled_keep_count_is_centred(shared_count):
    """T = 1024 rows with a 64-key sample: the mean keep count is k within 0.75% (an integer rank k s / n
    rounded up, the earlier rule, kept ~2% too many)."""
    torch.manual_seed(1)
    n, s = 1024, 64
    k = math.ceil(0.382 * n)
    importance = torch.rand(4096, n).pow(3)
    if shared_count:
        keep = kv_pruning.select_sampled(importance, k, n, s)
    else:
        keep = kv_pruning.select_sampled(importance, torch.tensor(k), torch.tensor(n), torch.tensor(s),
                                         torch.arange(4096))
    assert abs(keep.sum(-1).double().mean().item() / k - 1) < 0.0075


def test_sampled_threshold_is_a_systematic_sample_without_any_rng():
    """Row i's sample sits at floor((m + o_i) n / s) with o_i = frac((i + 1) (sqrt 5 - 1) / 2); the threshold
    is the sample's order statistic at real rank k (s + 1) / n; no RNG (torch's or Python's) is touched."""
    N, n_valid, s, k = 1000, 900, 64, 300
    scores = torch.rand(3, N)
    scores[:, n_valid:] = float("-inf")
    rows = torch.tensor([0, 7, 500])
    torch_rng, py_rng = torch.get_rng_state(), random.getstate()
    keep = kv_pruning.select_sampled(scores, torch.tensor(k), torch.tensor(n_valid), torch.tensor(s), rows)
    assert torch.equal(torch.get_rng_state(), torch_rng) and random.getstate() == py_rng
    for r, i in enumerate(rows.tolist()):
        offset = math.modf((i + 1) * (math.sqrt(5) - 1) / 2)[0]
        positions = [math.floor((m + offset) * n_valid / s) for m in range(s)]
        sample = sorted(scores[r, positions].tolist(), reverse=True)
        rank = k * (s + 1) / n_valid
        low = math.floor(rank)
        threshold = sample[low - 1] + (rank - low) * (sample[low] - sample[low - 1])
        assert torch.equal(keep[r], scores[r] >= torch.tensor(threshold, dtype=scores.dtype))
    # Rows shorter than the sample: every candidate is sampled, the threshold is exact.
    short = torch.rand(2, 50)
    assert torch.equal(kv_pruning.select_sampled(short, 10, 50, 64), kv_pruning.select_exact(short, 10))


@pytest.mark.parametrize("backend", ["sdpa", "ra-unified"])
def test_sampled_pruning_at_row_i_ignores_the_length_and_any_rng(backend):
    """Row i's output is a function of tokens <= i and i: the same prefix inside a longer sequence gives the same
    outputs, and Python's RNG state changes nothing (evaluation is reproducible; an incremental decoder can
    match training)."""
    kv = kv_settings(enabled=True, keep_ratio=0.3, recency=2, sampling=True, min_length=8, fraction=0.1)
    m = build_attention(model_settings(), attn_settings(backend), kv, 0).eval().double()
    randomize(m, seed=2)
    x = torch.randn(2, 100, 32, dtype=torch.float64)  # rows past 66 have more candidates than the 64-key sample
    random.seed(1)
    full = m(x)
    random.seed(2)
    again = m(x)
    assert torch.equal(full, again)
    for T in (9, 70, 87):
        assert torch.allclose(m(x[:, :T]), full[:, :T], rtol=0, atol=1e-12), T


def test_sampling_threshold_setting():
    kv = kv_settings(enabled=True, sampling=True, min_length=1024, fraction=0.5)
    assert not kv_pruning.uses_sampling(kv, 1023) and kv_pruning.uses_sampling(kv, 1024)
    assert kv_pruning.sample_size(kv, 1024) == 512 and kv_pruning.sample_size(kv, 10) == 64
    assert not kv_pruning.uses_sampling(kv_settings(enabled=True, sampling=False, min_length=64), 10**6)


def test_pruned_attention_is_renormalised_softmax_over_kept_keys():
    torch.manual_seed(0)
    T = 11
    logits = torch.randn(2, 3, T, T, dtype=torch.float64)
    v = torch.randn(2, 3, T, 5, dtype=torch.float64)
    kv = kv_settings(enabled=True, keep_ratio=0.3, recency=2)
    out = kv_pruning.pruned_attention_from_logits(logits, v, kv)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    A = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)
    for b in range(2):
        for h in range(3):
            keep = brute_force_keep(A[b, h], 0.3, 2)
            for i in range(T):
                js = keep[i].nonzero().flatten()
                p = torch.softmax(logits[b, h, i, js], -1)
                assert torch.allclose(out[b, h, i], p @ v[b, h, js])


def test_keep_everything_equals_plain_attention():
    torch.manual_seed(0)
    m = build_attention(model_settings(), attn_settings("sdpa"), kv_settings(enabled=True, keep_ratio=1.0), 0)
    plain = build_attention(model_settings(), attn_settings("sdpa"), kv_settings(), 0)
    plain.load_state_dict(m.state_dict())
    x = torch.randn(2, 12, 32)
    assert torch.allclose(m(x), plain(x), atol=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("sampling", [False, True])
def test_pruned_attention_is_causal(backend, sampling):
    """Perturbing token t never changes an output before t, with exact or sampled selection."""
    kv = kv_settings(enabled=True, keep_ratio=0.25, recency=2, sampling=sampling, min_length=8)
    m = build_attention(model_settings(), attn_settings(backend, disc=backend != "sdpa"), kv, 0).eval()
    randomize(m, seed=1)
    x = torch.randn(2, 20, 32)
    y = m(x)
    for t in (3, 11, 19):
        x2 = x.clone()
        x2[:, t] += 3 * torch.randn(2, 32)
        y2 = m(x2)
        assert torch.equal(y[:, :t], y2[:, :t]), t
        assert not torch.allclose(y[:, t], y2[:, t])


def test_the_causality_test_would_catch_a_future_seeing_pruner(monkeypatch):
    """Importance averaged over ALL queries (the original study's definition) leaks: the test above fails."""

    def leaky_keep_mask(probs, kv):
        T = probs.shape[-1]
        lag = torch.arange(T).unsqueeze(1) - torch.arange(T).unsqueeze(0)
        importance = probs.sum(-2) / (T - torch.arange(T))  # mass from every query that sees j, future included
        k = max(1, math.ceil(kv.keep_ratio * T))
        top = torch.zeros_like(probs[..., 0, :], dtype=torch.bool).scatter(-1, importance.topk(k, -1).indices, True)
        return top.unsqueeze(-2) | ((lag >= 0) & (lag < max(kv.recency_window, 1)))

    monkeypatch.setattr(kv_pruning, "causal_keep_mask", leaky_keep_mask)
    kv = kv_settings(enabled=True, keep_ratio=0.25, recency=1)
    m = build_attention(model_settings(), attn_settings("sdpa"), kv, 0).eval()
    randomize(m, seed=1)
    x = torch.randn(1, 24, 32)
    y = m(x)
    changed_early = False
    for t in range(4, 24):
        x2 = x.clone()
        x2[:, t] += 5 * torch.randn(1, 32)
        changed_early |= not torch.equal(y[:, :t], m(x2)[:, :t])
    assert changed_early


def test_pruning_gradients_flow():
    kv = kv_settings(enabled=True, keep_ratio=0.3, recency=2)
    m = build_attention(model_settings(), attn_settings("ra-fold-full"), kv, 0)
    x = torch.randn(2, 12, 32, requires_grad=True)
    m(x).square().sum().backward()
    assert x.grad.isfinite().all() and m.c_attn.weight.grad.abs().sum() > 0
