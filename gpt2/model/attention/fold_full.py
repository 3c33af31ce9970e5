"""ra-fold-full: exact full-rank reciprocal attention in one SDPA call at head dim 2D.

Formula (per head h, j <= i, S_ij = q_i . k_j / sqrt(D)):
    L_ij = w_std S_ij + w_rec S_ji (+ w_disc d_j)
Fold into the head dimension (gates on the query side only, so k~ is a plain concatenation):
    q~_i = [w_std q_i (+ sqrt(D) w_disc u_h) , w_rec k_i]
    k~_j = [k_j                              , q_j      ]
    q~_i . k~_j / sqrt(D) = w_std q_i.k_j/sqrt(D) + w_rec k_i.q_j/sqrt(D) (+ w_disc k_j.u_h) = L_ij
so causal SDPA(q~, k~, v, scale=1/sqrt(D)) is exactly RA, at head dim 2D; v keeps head dim D (Flash
accepts q/k wider than v, so V is never padded). The discoverability bias d_j = k_j . u_h is linear in
k_j, which k~ already holds: it costs no extra dimension (see RAAttentionBase.std_query).

Head-selective routing: heads with w_rec below the threshold drop the reciprocal half,
    q~ = w_std q (+ sqrt(D) w_disc u_h), k~ = k          (head dim D)
and each group runs as one SDPA call.
"""

from .common import RAAttentionBase
from .gates import fold_cat


class RAFoldFullAttention(RAAttentionBase):
    routes_heads = True  # head-selective routing packs plain and RA heads (RAAttentionBase.forward_routed)

    def fold(self, q, k, idx, reciprocal: bool):
        w_std, w_rec = self.head_gates(q.dtype, idx)
        q_std = self.std_query(q, w_std, idx)  # w_std q (+ sqrt(D) w_disc u)
        if not reciprocal:
            return q_std, k
        return fold_cat([q_std, k * w_rec]), fold_cat([k, q])

    def attention_heads(self, q, k, v):
        return self.attend_routed(q, k, v)
