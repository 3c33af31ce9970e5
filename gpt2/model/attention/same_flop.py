"""ra-same-flop: D_std + R (+1) = D, so the head dim and attention FLOPs equal the baseline's.

Formula (per head h, j <= i; D_std = D - R, minus 1 more with discoverability; q_s = q[:D_std], k_s = k[:D_std]):
    tied (default):  L_ij = w_std q_s,i.k_s,j / sqrt(D) + w_rec (P^T k_s,i).(P^T q_s,j) / sqrt(D) (+ w_disc d_j)
                     P is D_std x R and d_j = u_h . k_s,j: the reciprocal term reads the dims the standard
                     term uses, so the last R (+1) dims of q and k are unused (their W_q/W_k rows are zero).
    untied:          P is D x R and reads the whole q and k (d_j = u_h . k_j): with the free last rows of
                     W_q/W_k, P^T W_k and P^T W_q can be any R x C matrices, so this spans plain attention
                     at head dim D (docs/attention.md). CONFIG_ATTN_RA_FORM picks the form.
Both run as one code path: the tied P is zero-padded to D rows (LowRankMixin.projection). Fold:
    q~_i = [w_std q_i[:D_std] , w_rec P^T k_i (, sqrt(D) w_disc)]
    k~_j = [k_j[:D_std]       , P^T q_j       (, d_j          )]
one SDPA call at head dim D, scale 1/sqrt(D). On CUDA the fold is one Triton kernel each way
(same_flop_kernel.py); the torch code below is the CPU path and computes the same thing. With w_rec = 0
this is NOT the baseline (the standard term has only D_std dims). Head-selective routing sets w_rec = 0
on routed-off heads (same head dim, so there is nothing to save by packing). The legal R (D_std >= 1) is
this backend's entry in registry.py, checked by build_attention.
"""

import torch
import torch.nn.functional as F

from gpt2.settings import AttentionSettings, KVPruningSettings, ModelSettings

from .common import RAAttentionBase
from .fold_lowrank import LowRankMixin
from .gates import fold_cat
from .registry import lookup
from .same_flop_kernel import fold_same_flop
from .triton_support import triton_runs_on


class RASameFlopAttention(LowRankMixin, RAAttentionBase):
    use_kernels = True  # the Triton kernels where they can run (benchmarks switch them off to compare)

    def __init__(self, model: ModelSettings, attn: AttentionSettings, kv: KVPruningSettings, layer_idx: int):
        super().__init__(model, attn, kv, layer_idx)
        self.std_dim = self.head_dim - attn.reciprocal_rank - int(attn.discoverability)
        self.tied = lookup(attn.backend).tied(attn.reciprocal_form)
        self.init_projection(attn.reciprocal_rank, rows=self.std_dim if self.tied else None)

    def reset_extra_parameters(self):
        super().reset_extra_parameters()
        self.reset_projection()

    # --- the tied form's unused dims ----------------------------------------------------------
    def key_bias_vector(self) -> torch.Tensor:
        """u (H, D) as d_j reads it: tied, only the standard dims (u's other entries get no gradient)."""
        if not self.tied:
            return self.u
        return F.pad(self.u[:, : self.std_dim], (0, self.head_dim - self.std_dim))

    def unused_rows(self):
        """c_attn rows never read (tied): the last D - D_std rows of each head's W_q and W_k."""
        if not self.tied:
            return []
        C, D = self.n_embd, self.head_dim
        return [part * C + h * D + d for part in (0, 1) for h in range(self.n_head) for d in range(self.std_dim, D)]

    @torch.no_grad()
    def zero_unused_weights(self) -> None:
        rows = self.unused_rows()
        if rows:
            index = torch.tensor(rows, device=self.c_attn.weight.device)
            self.c_attn.weight.index_fill_(0, index, 0.0)
            if self.c_attn.bias is not None:
                self.c_attn.bias.index_fill_(0, index, 0.0)

    def unused_weight_count(self) -> int:
        per_row = self.n_embd + (1 if self.c_attn.bias is not None else 0)
        unused_u = self.n_head * (self.head_dim - self.std_dim) if self.tied and self.discoverability else 0
        return len(self.unused_rows()) * per_row + unused_u

    def kernels_take(self, t: torch.Tensor) -> bool:
        """Whether this module's Triton kernels run for t (they compute in float32: float64 stays on torch)."""
        return self.use_kernels and triton_runs_on(t) and t.dtype != torch.float64

    def kernel_parameters(self):
        """(P, w_std, w_rec, u, w_disc) as the kernels take them; u, w_disc are None without discoverability."""
        disc = self.discoverability
        return (self.projection(self.P.dtype), self.w_std(), self.rec_gate(),
                self.key_bias_vector() if disc else None, self.w_disc() if disc else None)

    def attention_heads(self, q, k, v):
        return self.attend(*self.fold_heads(q, k), v)

    def fold_heads(self, q, k):
        """(q~, k~) of the module doc, each (B, H, T, D): the Triton kernel where it runs, else torch."""
        if self.kernels_take(q):
            P, w_std, w_rec, u, w_disc = self.kernel_parameters()
            return fold_same_flop(q, k, P, w_std, w_rec, self.std_dim, u, w_disc)
        H, Ds = self.n_head, self.std_dim
        w_std = self.w_std().to(q.dtype).view(1, H, 1, 1)
        w_rec = self.rec_gate().to(q.dtype).view(1, H, 1, 1)
        P = self.projection(q.dtype)  # (H, D, R); k @ P = P^T k per head
        q_parts = [q[..., :Ds] * w_std, (k @ P) * w_rec]
        k_parts = [k[..., :Ds], q @ P]
        if self.discoverability:
            c, d = self.disc_columns(k)
            q_parts.append(c)
            k_parts.append(d)
        return fold_cat(q_parts), fold_cat(k_parts)

    def cache_fold(self, q, k):
        """The decode cache holds k~ (cache.py): the fold is per token."""
        return self.fold_heads(q, k)
