"""ra-fold-lowrank: the reciprocal term through a learned rank-R projection P_h (D x R), head dim D + R.

Formula (per head h, j <= i):
    L_ij = w_std q_i.k_j / sqrt(D) + w_rec (P^T k_i).(P^T q_j) / sqrt(D) (+ w_disc d_j)
The reciprocal score is the full-rank one, k_i . q_j, seen through the projector P P^T; it is still
reciprocal: query i's row uses i's key and j's query. Fold:
    q~_i = [w_std q_i (+ sqrt(D) w_disc u_h) , w_rec P^T k_i]
    k~_j = [k_j                              , P^T q_j      ]
one SDPA call, scale 1/sqrt(D); widths not a multiple of 8 are zero-padded (Flash itself rounds the
head dim up to a multiple of 32, so any R <= 32 costs what R = 32 costs at D = 64). The discoverability
bias rides on the standard dims as in ra-fold-full. Routing as in ra-fold-full. The legal R (1..D, P has
orthonormal columns) is this backend's entry in registry.py, checked by build_attention.
"""

import torch
import torch.nn.functional as F

from gpt2.settings import AttentionSettings, KVPruningSettings, ModelSettings

from .common import RAAttentionBase
from .gates import extra_parameter, fold_cat, orthonormal_columns, private_generator

P_TAG = 1


class LowRankMixin:
    """Owns P (n_head, rows, R), initialised with orthonormal columns from a private generator.

    rows = D reads the whole head (ra-fold-lowrank, untied same-FLOP); rows = D_std < D reads only the first
    D_std dims (tied same-FLOP): projection() then zero-pads P to D rows, so P^T k = P_s^T k[:D_std] exactly
    and every fold, composition and kernel runs unchanged on the padded P (its zero rows get no gradient).
    """

    def init_projection(self, rank: int, rows: int | None = None):
        self.rank = rank
        self.proj_rows = self.head_dim if rows is None else rows
        self.P = extra_parameter(torch.empty(self.n_head, self.proj_rows, rank))  # never weight-decayed
        self.reset_projection()

    @torch.no_grad()
    def reset_projection(self):
        gen = private_generator(self.layer_idx, P_TAG)
        self.P.copy_(orthonormal_columns(self.n_head, self.proj_rows, self.rank, gen))

    def projection(self, dtype, idx=None):
        """P as (h, D, R) in dtype for the heads idx (None = all)."""
        P = self.P if idx is None else self.P.index_select(0, idx)
        if self.proj_rows < self.head_dim:
            P = F.pad(P, (0, 0, 0, self.head_dim - self.proj_rows))
        return P.to(dtype)


class RAFoldLowRankAttention(LowRankMixin, RAAttentionBase):
    routes_heads = True  # head-selective routing packs plain and RA heads (RAAttentionBase.forward_routed)

    def __init__(self, model: ModelSettings, attn: AttentionSettings, kv: KVPruningSettings, layer_idx: int):
        super().__init__(model, attn, kv, layer_idx)
        self.init_projection(attn.reciprocal_rank)

    def reset_extra_parameters(self):
        super().reset_extra_parameters()
        self.reset_projection()

    def fold(self, q, k, idx, reciprocal: bool):
        w_std, w_rec = self.head_gates(q.dtype, idx)
        q_std = self.std_query(q, w_std, idx)  # w_std q (+ sqrt(D) w_disc u)
        if not reciprocal:
            return q_std, k
        P = self.projection(q.dtype, idx)  # (h, D, R); k @ P = P^T k per head
        return fold_cat([q_std, (k @ P) * w_rec]), fold_cat([k, q @ P])

    def attention_heads(self, q, k, v):
        return self.attend_routed(q, k, v)
