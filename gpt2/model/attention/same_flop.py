"""ra-same-flop: D_std + R (+1) = D, so the head dim and attention FLOPs equal the baseline's.

Formula (per head h, j <= i; D_std = D - R, minus 1 more with discoverability):
    L_ij = w_std q_i[:D_std].k_j[:D_std] / sqrt(D) + w_rec (P^T k_i).(P^T q_j) / sqrt(D) (+ w_disc d_j)
P^T k and P^T q use the full D-dim key/query; the standard term keeps only the first D_std dims
(the remaining query/key dims are unused). Fold, built from activations:
    q~_i = [w_std q_i[:D_std] , w_rec P^T k_i (, sqrt(D) w_disc)]
    k~_j = [k_j[:D_std]       , P^T q_j       (, d_j          )]
one SDPA call at head dim D, scale 1/sqrt(D). On CUDA the fold is one Triton kernel each way
(same_flop_kernel.py); the torch code below is the CPU path and computes the same thing. With w_rec = 0
this is NOT the baseline (the standard term has only D_std dims). Head-selective routing sets w_rec = 0
on routed-off heads (same head dim, so there is nothing to save by packing). The legal R (D_std >= 1) is
this backend's entry in registry.py, checked by build_attention.
"""

import torch

from gpt2.settings import AttentionSettings, KVPruningSettings, ModelSettings

from .common import RAAttentionBase
from .fold_lowrank import LowRankMixin
from .gates import fold_cat
from .same_flop_kernel import fold_same_flop
from .triton_support import triton_runs_on


class RASameFlopAttention(LowRankMixin, RAAttentionBase):
    use_kernels = True  # the Triton kernels where they can run (benchmarks switch them off to compare)

    def __init__(self, model: ModelSettings, attn: AttentionSettings, kv: KVPruningSettings, layer_idx: int):
        super().__init__(model, attn, kv, layer_idx)
        self.init_projection(attn.reciprocal_rank)
        self.std_dim = self.head_dim - attn.reciprocal_rank - int(attn.discoverability)

    def reset_extra_parameters(self):
        super().reset_extra_parameters()
        self.reset_projection()

    def kernels_take(self, t: torch.Tensor) -> bool:
        """Whether this module's Triton kernels run for t (they compute in float32: float64 stays on torch)."""
        return self.use_kernels and triton_runs_on(t) and t.dtype != torch.float64

    def kernel_parameters(self):
        """(P, w_std, w_rec, u, w_disc) as the kernels take them; u, w_disc are None without discoverability."""
        disc = self.discoverability
        return (self.P, self.w_std(), self.rec_gate(), self.u if disc else None,
                self.w_disc() if disc else None)

    def attention_heads(self, q, k, v):
        if self.kernels_take(q):
            P, w_std, w_rec, u, w_disc = self.kernel_parameters()
            q_t, k_t = fold_same_flop(q, k, P, w_std, w_rec, self.std_dim, u, w_disc)
            return self.attend(q_t, k_t, v)
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
        return self.attend(fold_cat(q_parts), fold_cat(k_parts), v)
