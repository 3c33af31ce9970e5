"""KV pruning: each query attends only to the keys that received the most attention so far.

Definition (causal by construction). Let A_mj be the layer's causal attention probabilities
(A_mj = 0 for j > m). For query i and a key j <= i,

    importance_i(j) = (1 / (i - j + 1)) * sum_{m=j..i} A_mj

i.e. the attention mass key j received, averaged over the queries that can see it AND are not in
query i's future. (Averaging over every query m >= j, as the original study did, lets tokens after i
decide which keys query i sees: that leaks the future.) Everything query i's selection reads comes
from tokens <= i, so perturbing token t never changes an output before t.

Keep set of query i, with W = max(CONFIG_KV_PRUNE_RECENCY, 1) (a query always sees itself):
    window_i     = { j : i - W < j <= i }                         always kept
    candidates_i = { j : j <= i - W }                             n_i = max(0, i + 1 - W) keys
    k_i          = min(ceil(keep_ratio * (i + 1)), n_i)
    keep_i       = window_i  U  top-k_i of candidates_i by importance_i
so the last row keeps min(T, W + ceil(keep_ratio * T)) keys. The output is the softmax of the
layer's logits over keep_i only (renormalised), times v. The selection is not differentiated.

Selection of the top k_i (select_keys):
    exact    torch.topk over the candidates.
    sampled  (CONFIG_RA_USE_SAMPLING and row length >= CONFIG_RA_SAMPLING_MIN_LENGTH) take a
             systematic random sample of s = max(64, ceil(sample_fraction * N)) candidates,
                 positions o + m * stride,  m = 0..s-1,  stride = n_i / s,
             with one random offset o in [0, stride) drawn on the host (Python's random module, which
             the trainer seeds; torch.compile replays it as a graph input), take the
             ceil(k_i / n_i * s)-th largest sampled importance as the threshold, and keep every
             candidate at or above it. The threshold comes from the sample, the selection runs over all
             keys, so the keep count is k_i on average. With one count for all rows the stride is the
             integer floor(n / s) and the sample is a strided view of the scores: the whole selection is
             one k-th-value kernel on the view and one comparison over all keys (no RNG kernel, no
             gather). Systematic sampling assumes importance is not periodic with the stride: a pattern
             that repeats every `stride` keys would bias the threshold (random-order data is fine).
"""

import math
import random

import torch
import torch.nn.functional as F

from gpt2.settings import KVPruningSettings

MIN_SAMPLE = 64


def uses_sampling(kv: KVPruningSettings, length: int) -> bool:
    return kv.use_sampling and length >= kv.sampling_min_length


def sample_size(kv: KVPruningSettings, length: int) -> int:
    return max(MIN_SAMPLE, math.ceil(kv.sample_fraction * length))


def select_exact(scores: torch.Tensor, k, k_max: int | None = None) -> torch.Tensor:
    """Bool mask (..., N) of the k largest scores per row.

    k is an int (every row) or a tensor (...,) of per-row counts, each <= the row's finite scores,
    with k_max >= max(k) given as an int (no device sync).
    """
    if isinstance(k, int):
        keep = torch.zeros_like(scores, dtype=torch.bool)
        return keep.scatter_(-1, scores.topk(k, dim=-1, sorted=False).indices, True) if k > 0 else keep
    keep = torch.zeros_like(scores, dtype=torch.bool)
    if k_max == 0:
        return keep
    idx = scores.topk(k_max, dim=-1, sorted=True).indices
    take = torch.arange(k_max, device=scores.device) < k.unsqueeze(-1)
    return keep.scatter(-1, idx, take.expand_as(idx))


def sample_rank(k, n_valid, n_sample: int):
    """Rank, within n_sample draws, of the estimate of the k-th largest of n_valid values (>= 1)."""
    if isinstance(k, int):
        return min(max(math.ceil(k / max(n_valid, 1) * n_sample - 1e-9), 1), n_sample)
    return torch.ceil(k / n_valid.clamp(min=1) * n_sample - 1e-9).long().clamp(1, n_sample)


def select_sampled(scores: torch.Tensor, k, n_valid, n_sample: int) -> torch.Tensor:
    """Bool mask (..., N): every score >= the k-th largest as estimated from a systematic sample of
    n_sample positions (see the module doc; at least MIN_SAMPLE unless the row has fewer candidates).

    The valid scores of a row are its first n_valid entries (-inf beyond). k and n_valid are ints (all
    rows alike: two kernels) or per-row tensors (...,). The sample's offset comes from the host's Python
    RNG and never depends on the data.
    """
    if isinstance(k, int):
        if k == 0:
            return torch.zeros_like(scores, dtype=torch.bool)
        n_sample = min(n_sample, n_valid)  # a short row: the "sample" is every candidate
        stride = n_valid // n_sample
        start = random.randrange(stride)
        sample = scores.narrow(-1, start, (n_sample - 1) * stride + 1)[..., ::stride]  # (..., s) view
        rank = sample_rank(k, n_valid, n_sample)  # the rank-th largest = the (s - rank + 1)-th smallest
        threshold = sample.kthvalue(n_sample - rank + 1, dim=-1, keepdim=True).values
        return scores >= threshold
    # Per-row strides n_i / s: positions floor((m + o) n_i / s) for m = 0..s-1, o in [0, 1).
    offset = random.random()
    steps = torch.arange(n_sample, device=scores.device, dtype=torch.float32) + offset
    pos = (steps * (n_valid.unsqueeze(-1).float() / n_sample)).long()
    pos = pos.clamp(min=0, max=scores.shape[-1] - 1)  # (..., s) in [0, n_valid)
    pos = pos.expand(*scores.shape[:-1], n_sample)
    sample = scores.gather(-1, pos).sort(dim=-1, descending=True).values
    rank = sample_rank(k, n_valid, n_sample)
    threshold = sample.gather(-1, (rank - 1).unsqueeze(-1).expand(*scores.shape[:-1], 1))
    return (scores >= threshold) & (k > 0).unsqueeze(-1)


def select_keys(scores: torch.Tensor, k, n_valid, k_max: int | None, kv: KVPruningSettings):
    """Dispatch exact / sampled selection by the settings and the row length N = scores.shape[-1]."""
    length = scores.shape[-1]
    if uses_sampling(kv, length):
        return select_sampled(scores, k, n_valid, sample_size(kv, length))
    return select_exact(scores, k, k_max)


def keep_counts(length: int, kv: KVPruningSettings, device=None):
    """Per query row i: (n_i candidates outside the window, k_i keys to select, window W)."""
    window = max(kv.recency_window, 1)
    rows = torch.arange(length, device=device, dtype=torch.float64)
    n_valid = (rows + 1 - window).clamp(min=0)
    k = torch.ceil(kv.keep_ratio * (rows + 1) - 1e-9).clamp(min=0)
    k = torch.minimum(k, n_valid)
    return n_valid.long(), k.long(), window


def causal_keep_mask(probs: torch.Tensor, kv: KVPruningSettings) -> torch.Tensor:
    """Bool (..., T, T) keep mask from causal attention probabilities probs (..., T, T) (see module doc)."""
    T = probs.shape[-1]
    device = probs.device
    n_valid, k, window = keep_counts(T, kv, device)
    lag = torch.arange(T, device=device).unsqueeze(1) - torch.arange(T, device=device).unsqueeze(0)  # i - j
    received = probs.cumsum(dim=-2)  # [i, j] = sum_{m <= i} A_mj
    importance = received / (lag + 1).clamp(min=1)
    scores = importance.masked_fill(lag < window, float("-inf"))  # candidates: j <= i - W
    k_max = int(min(math.ceil(kv.keep_ratio * T - 1e-9), max(T - window, 0)))
    chosen = select_keys(scores, k, n_valid, k_max, kv)
    return chosen | ((lag >= 0) & (lag < window))


def pruned_attention_from_logits(logits: torch.Tensor, v: torch.Tensor, kv: KVPruningSettings,
                                 dropout_p: float = 0.0) -> torch.Tensor:
    """out_i = sum_{j in keep_i} softmax_{keep_i}(logits_ij) v_j. logits (B, H, T, T), v (B, H, T, Dv)."""
    T = logits.shape[-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    causal = torch.ones(T, T, dtype=torch.bool, device=logits.device).tril()
    with torch.no_grad():
        probs = torch.softmax(logits.detach().masked_fill(~causal, float("-inf")), dim=-1)
        keep = causal_keep_mask(probs, kv) & causal
    p = torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1)
    if dropout_p > 0:
        p = F.dropout(p, dropout_p)
    return (p @ v.to(p.dtype)).to(v.dtype)


def pruned_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, kv: KVPruningSettings,
                     dropout_p: float = 0.0) -> torch.Tensor:
    """Pruned attention with logits scale * q . k (q, k may be folded RA heads of any width)."""
    dt = torch.promote_types(q.dtype, torch.float32)
    logits = (q.to(dt) @ k.to(dt).transpose(-1, -2)) * scale
    return pruned_attention_from_logits(logits, v, kv, dropout_p)
