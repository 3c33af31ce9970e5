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

Selection of the top k_i (select_keys), row by row, so that row i's keep set is a function of the
tokens <= i and of i alone (never of the sequence length T, nor of any RNG): evaluation is reproducible and
an incremental decoder that sees i + 1 tokens selects exactly what training selected at row i
(pruned_attention_rows: the new rows only, from the column sums sum_{m < start} A_mj the decoder keeps).
    exact    torch.topk over the candidates.
    sampled  (CONFIG_RA_USE_SAMPLING and i + 1 >= CONFIG_RA_SAMPLING_MIN_LENGTH) take a systematic sample
             of s_i = min(max(64, ceil(sample_fraction * (i + 1))), n_i) candidates at positions
                 floor((m + o_i) n_i / s_i),  m = 0..s_i-1,
             with the offset o_i = frac((i + 1) * (sqrt(5) - 1) / 2) (a Weyl sequence: equidistributed over
             rows, fixed for each row), take the r_i-th largest sampled importance as the threshold,
                 r_i = clamp(round(k_i s_i / n_i), 1, s_i)     (rounding, not ceil: the keep count is k_i on
                                                                average instead of ~n_i / (2 s_i) above it),
             and keep every candidate at or above it. The threshold comes from the sample, the selection runs
             over all keys. Systematic sampling assumes importance is not periodic with the stride.
"""

import math

import torch
import torch.nn.functional as F

from gpt2.settings import KVPruningSettings

MIN_SAMPLE = 64
WEYL_STEP = (math.sqrt(5) - 1) / 2  # row i's sample offset is frac((i + 1) * WEYL_STEP)


def uses_sampling(kv: KVPruningSettings, length: int) -> bool:
    return kv.use_sampling and length >= kv.sampling_min_length


def sample_size(kv: KVPruningSettings, length):
    """s = max(64, ceil(sample_fraction * length)) for an int length, or per row for a tensor of lengths."""
    if isinstance(length, torch.Tensor):
        return torch.ceil(kv.sample_fraction * length.double()).clamp(min=MIN_SAMPLE).long()
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


def sample_rank(k, n_valid, n_sample):
    """The real rank r = k (s + 1) / n, clamped to 1..s, that estimates the k-th largest of n values from an
    s-draw sample: the r-th largest of s draws lies, on average, above a fraction r / (s + 1) of the values
    (ints, or per-row tensors)."""
    if isinstance(k, int):
        return min(max(k / max(n_valid, 1) * (n_sample + 1), 1.0), float(n_sample))
    return (k / n_valid.clamp(min=1) * (n_sample + 1)).double().clamp(min=1.0).minimum(n_sample.double())


def interpolate_ranks(descending: torch.Tensor, rank) -> torch.Tensor:
    """The value at real rank r (1-based) of each row of a descending sample (..., s), linear between the
    floor(r)-th and the next order statistic. -> (..., 1)"""
    s = descending.shape[-1]
    rank = torch.as_tensor(rank, dtype=torch.float64, device=descending.device).expand(descending.shape[:-1])
    low = rank.floor().long().clamp(1, s)
    weight = (rank - low).unsqueeze(-1).to(descending.dtype)
    at_low = descending.gather(-1, (low - 1).unsqueeze(-1))
    at_high = descending.gather(-1, low.clamp(max=s - 1).unsqueeze(-1))
    return torch.where(weight > 0, at_low + weight * (at_high - at_low), at_low)


def sample_offset(rows: torch.Tensor) -> torch.Tensor:
    """o_i = frac((i + 1) * WEYL_STEP) in [0, 1) for query positions i (float64 on the host side of the math)."""
    return torch.frac((rows.double() + 1) * WEYL_STEP)


def select_sampled(scores: torch.Tensor, k, n_valid, n_sample, rows=None, width: int | None = None) -> torch.Tensor:
    """Bool mask (..., N): every score >= the r-th largest of a systematic sample (module doc).

    The valid scores of a row are its first n_valid entries (-inf beyond). k and n_valid are ints (all rows
    alike, one shared offset: a strided view and one k-th-value kernel, for the kernel benchmark) or per-row
    tensors (...,); n_sample is an int or a per-row tensor, width an int >= every row's sample (default: read
    from n_sample, a device sync); rows (...,) are the rows' query positions, which fix each row's offset
    (default: position 0). Nothing here draws a random number.
    """
    if isinstance(k, int):
        if k == 0:
            return torch.zeros_like(scores, dtype=torch.bool)
        n_sample = min(n_sample, n_valid)  # a short row: the "sample" is every candidate
        stride = n_valid // n_sample
        start = int(WEYL_STEP * stride)
        sample = scores.narrow(-1, start, (n_sample - 1) * stride + 1)[..., ::stride]  # (..., s) view
        threshold = interpolate_ranks(sample.sort(dim=-1, descending=True).values, sample_rank(k, n_valid, n_sample))
        return scores >= threshold
    batch = scores.shape[:-1]
    n_valid = n_valid.expand(batch)
    n_sample = torch.as_tensor(n_sample, device=scores.device).expand(batch).minimum(n_valid).clamp(min=1)
    rows = torch.zeros(batch, device=scores.device) if rows is None else rows.expand(batch)
    width = width or (int(n_sample.max()) if n_sample.numel() else 1)
    m = torch.arange(width, device=scores.device, dtype=torch.float64)
    pos = ((m + sample_offset(rows).unsqueeze(-1)) * (n_valid.unsqueeze(-1).double() / n_sample.unsqueeze(-1)))
    pos = pos.long().clamp(min=0, max=scores.shape[-1] - 1)  # (..., width) in [0, n_valid)
    sample = scores.gather(-1, pos).masked_fill(m >= n_sample.unsqueeze(-1), float("-inf"))
    sample = sample.sort(dim=-1, descending=True).values
    threshold = interpolate_ranks(sample, sample_rank(k.expand(batch), n_valid, n_sample))
    return (scores >= threshold) & (k > 0).unsqueeze(-1)


def select_keys(scores: torch.Tensor, k, n_valid, k_max: int | None, kv: KVPruningSettings, start: int = 0):
    """Exact or sampled selection per row (module doc). scores (..., T, N) hold the rows of the query positions
    i = start..start+T-1 (training: start = 0; an incremental decoder: the tokens it has cached), k and n_valid
    (T,) per row; rows with i + 1 >= CONFIG_RA_SAMPLING_MIN_LENGTH sample, the earlier ones (a prefix) select
    exactly."""
    T = scores.shape[-2]
    rows = torch.arange(start, start + T, device=scores.device)
    if not kv.use_sampling:
        return select_exact(scores, k, k_max)
    first = min(max(kv.sampling_min_length - 1 - start, 0), T)  # rows from index `first` on sample
    parts = []
    if first > 0:
        head = slice(0, first)
        parts.append(select_exact(scores[..., head, :], k[head], k_max))
    if T > first:
        tail = slice(first, T)
        # s_i from the row length i + 1, computed on the device; the widest is the last row's
        sizes = sample_size(kv, rows[tail] + 1)
        parts.append(select_sampled(scores[..., tail, :], k[tail], n_valid[tail], sizes, rows[tail],
                                    width=sample_size(kv, start + T)))
    return torch.cat(parts, dim=-2) if len(parts) > 1 else parts[0]


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
    return keep_mask_rows(probs.cumsum(dim=-2), kv)  # [i, j] = sum_{m <= i} A_mj


def keep_mask_rows(received: torch.Tensor, kv: KVPruningSettings, start: int = 0) -> torch.Tensor:
    """Bool (..., T, N) keep mask of the query rows i = start..start+T-1 over N = start + T keys, from
    received (..., T, N) whose row of query i holds sum_{m <= i} A_mj (module doc). start = 0 is the whole
    sequence (causal_keep_mask); an incremental decoder passes the rows of its new tokens."""
    T, N = received.shape[-2:]
    device = received.device
    n_valid, k, window = keep_counts(N, kv, device)
    n_valid, k = n_valid[start:], k[start:]
    lag = torch.arange(start, N, device=device).unsqueeze(1) - torch.arange(N, device=device).unsqueeze(0)  # i - j
    importance = received / (lag + 1).clamp(min=1)
    scores = importance.masked_fill(lag < window, float("-inf"))  # candidates: j <= i - W
    k_max = int(min(math.ceil(kv.keep_ratio * N - 1e-9), max(N - window, 0)))  # the last row's k (k_i grows with i)
    chosen = select_keys(scores, k, n_valid, k_max, kv, start)
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


def pruned_attention_rows(logits: torch.Tensor, v: torch.Tensor, kv: KVPruningSettings, received, start: int):
    """The rows i = start..start+T-1 of pruned_attention_from_logits, for an incremental decoder.

    logits (B, H, T, N) with N = start + T: those rows' logits against every key so far; v (B, H, N, Dv);
    received (B, H, start), or None when start = 0: sum_{m < start} A_mj, the causal attention the earlier
    rows gave each key (the decoder keeps it, gpt2/model/attention/cache.py). Row i's importance adds the rows
    m = start..i of this chunk, so its keep set is the one causal_keep_mask gives row i of the whole sequence.
    -> (out (B, H, T, Dv), received (B, H, N) through the last row, for the next call).
    """
    T, N = logits.shape[-2:]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    device = logits.device
    causal = torch.arange(N, device=device).unsqueeze(0) <= torch.arange(start, N, device=device).unsqueeze(1)
    probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
    so_far = probs.cumsum(dim=-2)  # [r, j] = sum_{m = start..start+r} A_mj
    if received is not None:
        so_far = so_far + F.pad(received.to(so_far.dtype), (0, T)).unsqueeze(-2)
    keep = keep_mask_rows(so_far, kv, start) & causal
    p = torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1)
    return (p @ v.to(p.dtype)).to(v.dtype), so_far[..., -1, :]
