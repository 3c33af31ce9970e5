"""Baseline causal self-attention: one fused (Flash) SDPA call per layer.

    out_i = sum_{j<=i} softmax_j(q_i . k_j / sqrt(D)) v_j
"""

from gpt2.settings import AttentionSettings, KVPruningSettings, ModelSettings

from .common import AttentionBase


class SDPAAttention(AttentionBase):
    def __init__(self, model: ModelSettings, attn: AttentionSettings, kv: KVPruningSettings, layer_idx: int):
        if attn.discoverability:
            raise ValueError("CONFIG_ATTN_DISCOVERABILITY=y needs a reciprocal backend (ra-*), not sdpa")
        super().__init__(model, attn, kv, layer_idx)
