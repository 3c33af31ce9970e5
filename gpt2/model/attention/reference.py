"""ra-reference: full-rank reciprocal attention, open-coded. The ground truth; slow by design.

Per head h, S_ij = q_i . k_j / sqrt(D), for j <= i:
    L_ij   = w_std,h S_ij + w_rec,h S_ji + w_disc,h d_j,      d_j = k_j . u_h
    out_i  = sum_j softmax_j(L_ij) v_j
S_ji = q_j . k_i only involves tokens <= i, so it is causal. Everything is materialised (T x T) and
the softmax runs in float32. Decoding (cached_heads) caches q as well as k: row i's S_ji reads every q_j.
"""

import torch
import torch.nn.functional as F

from .. import kv_pruning
from .cache import softmax_rows
from .common import RAAttentionBase


def reciprocal_logits(q, k, w_std, w_rec, scale, u=None, w_disc=None):
    """L (B, H, T, T) in float32 from q, k (B, H, T, D) and per-head gates (H,)."""
    dt = torch.promote_types(q.dtype, torch.float32)  # at least float32 (float64 stays float64)
    q, k = q.to(dt), k.to(dt)
    S = (q @ k.transpose(-1, -2)) * scale  # S[i, j] = q_i . k_j / sqrt(D)
    L = w_std.to(dt).view(1, -1, 1, 1) * S + w_rec.to(dt).view(1, -1, 1, 1) * S.transpose(-1, -2)
    if u is not None:
        d = (k * u.to(dt).unsqueeze(1)).sum(-1)  # d_j = k_j . u_h, (B, H, T)
        L = L + w_disc.to(dt).view(1, -1, 1, 1) * d.unsqueeze(-2)
    return L


def reciprocal_logit_rows(q, k, q_all, k_all, w_std, w_rec, scale, u=None, w_disc=None):
    """The rows of the new tokens i (q, k (B, H, T, D)) against every token j so far (q_all, k_all (B, H, N, D),
    the new ones last), for incremental decoding:
        L_ij = w_std q_i.k_j / sqrt(D) + w_rec k_i.q_j / sqrt(D) + w_disc k_j.u_h      -> (B, H, T, N)
    The reciprocal term reads q_j of every earlier token, so the decoder caches q as well as k."""
    dt = torch.promote_types(q.dtype, torch.float32)
    q, k, q_all, k_all = q.to(dt), k.to(dt), q_all.to(dt), k_all.to(dt)
    gate = lambda w: w.to(dt).view(1, -1, 1, 1)  # noqa: E731
    L = gate(w_std) * (q @ k_all.transpose(-1, -2)) * scale + gate(w_rec) * (k @ q_all.transpose(-1, -2)) * scale
    if u is not None:
        d = (k_all * u.to(dt).unsqueeze(1)).sum(-1)  # d_j = k_j . u_h, (B, H, N)
        L = L + gate(w_disc) * d.unsqueeze(-2)
    return L


def causal_softmax_attention(L, v, dropout_p=0.0):
    """softmax over j <= i of L (float32), times v."""
    T = L.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=L.device).tril()
    p = torch.softmax(L.masked_fill(~causal, float("-inf")), dim=-1)
    if dropout_p > 0:
        p = F.dropout(p, dropout_p)
    return (p @ v.to(p.dtype)).to(v.dtype)


class RAReferenceAttention(RAAttentionBase):
    def attention_heads(self, q, k, v):
        disc = (self.u, self.w_disc()) if self.discoverability else (None, None)
        # Routed-off heads (w_rec below the threshold) simply get w_rec = 0: same function, no speed-up.
        L = reciprocal_logits(q, k, self.w_std(), self.rec_gate(), self.scale, *disc)
        dropout_p = self.attn_dropout if self.training else 0.0
        if self.kv is not None:
            return kv_pruning.pruned_attention_from_logits(L, v, self.kv, dropout_p)
        return causal_softmax_attention(L, v, dropout_p)

    def cached_heads(self, q, k, v, cache):
        """The new tokens' rows (reciprocal_logit_rows) against the cached q, k, v; the softmax over j <= i."""
        start = cache.length
        q_all, k_all, values = cache.extend(queries=q, keys=k, values=v)
        disc = (self.u, self.w_disc()) if self.discoverability else (None, None)
        L = reciprocal_logit_rows(q, k, q_all, k_all, self.w_std(), self.rec_gate(), self.scale, *disc)
        if self.kv is not None:
            return self.pruned_rows(L, values, cache, start)
        return softmax_rows(L, values, start)
