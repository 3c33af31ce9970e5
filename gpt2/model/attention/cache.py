"""What an attention layer keeps of the tokens it has seen, for incremental decoding (gpt2/model/decode.py).

Decoding feeds a layer the T new tokens i = start..start+T-1 after the `start` it has cached and needs their
rows of the training forward: logits against every key j <= i, softmax, times v. Earlier rows never change
(causal), so only the new rows are computed. Every backend but ra-reference writes its logit as one scaled dot
product of per-token vectors, L_ij = q~_i . k~_j / sqrt(D) (the fold), so it caches the folded key k~_j and
v_j; k~_j already carries whatever of token j the reciprocal term and the bias read:

    sdpa             k~ = k
    ra-fold-full     k~ = [k, q]                 w_rec S_ji = w_rec k_i . q_j / sqrt(D) reads the cached q_j
    ra-fold-lowrank  k~ = [k, P^T q]
    ra-same-flop     k~ = [k[:D_std], P^T q (, d_j = u . k_j)]    (the bias d_j as its own column)
    ra-unified       k~ as ra-same-flop, straight from the composed QKV GEMM
    ra-reference     k and q themselves: L_ij = w_std q_i.k_j + w_rec k_i.q_j (/ sqrt(D)) + w_disc k_j.u, open-coded

With KV pruning a row's keep set reads sum_{m <= i} A_mj, the (unpruned) attention key j has received from the
queries up to i (gpt2/model/kv_pruning.py), so the cache also keeps those column sums: `received`.
The tensors grow by concatenation (a copy of the cache per step: simple, and small next to the model's GEMMs
at these lengths).
"""

import torch
import torch.nn.functional as F


class LayerCache:
    """Named per-token tensors (B, H, T, width) of one layer, grown along T; `received` (B, H, T) with KV pruning."""

    def __init__(self):
        self.tensors = {}
        self.received = None

    @property
    def length(self) -> int:
        """Tokens cached so far."""
        return next(iter(self.tensors.values())).shape[-2] if self.tensors else 0

    def extend(self, **new):
        """Append the new tokens' tensors (name=tensor); returns the cached tensors (old + new) in that order."""
        for name, tensor in new.items():
            old = self.tensors.get(name)
            self.tensors[name] = tensor.contiguous() if old is None else torch.cat([old, tensor], dim=-2)
        return tuple(self.tensors[name] for name in new)


def causal_rows_mask(start: int, rows: int, keys: int, device) -> torch.Tensor:
    """Bool (rows, keys): row r (query position start + r) sees the keys j <= start + r."""
    query_positions = torch.arange(start, start + rows, device=device)
    return torch.arange(keys, device=device).unsqueeze(0) <= query_positions.unsqueeze(1)


def attend_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float) -> torch.Tensor:
    """Causal attention of the query rows start..start+T-1, q (B, H, T, Dk), against every key so far,
    k (B, H, start + T, Dk) and v (B, H, start + T, Dv). -> (B, H, T, Dv)

    SDPA's is_causal aligns its mask top-left when the query and key lengths differ (a lone query would see only
    the first key), so it is used only when they are equal (start = 0, the prompt); one query sees every key, so
    it needs no mask; any other chunk gets an explicit mask.
    """
    T, N = q.shape[-2], k.shape[-2]
    if start == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    mask = None if T == 1 else causal_rows_mask(start, T, N, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def softmax_rows(logits: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """Materialised causal softmax of the rows start.. (logits (B, H, T, N), float32 or wider), times v."""
    T, N = logits.shape[-2:]
    p = torch.softmax(logits.masked_fill(~causal_rows_mask(start, T, N, logits.device), float("-inf")), dim=-1)
    return (p @ v.to(p.dtype)).to(v.dtype)
