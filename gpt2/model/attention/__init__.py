"""Pluggable causal self-attention backends, one module per backend.

`build_attention` is the only constructor the model uses; CONFIG_ATTN_BACKEND picks the class:
    sdpa             baseline, one Flash SDPA call                          sdpa.py
    ra-reference     full-rank RA, materialised T x T, float32 softmax      reference.py
    ra-fold-full     full-rank RA folded into head dim 2D, one SDPA call    fold_full.py
    ra-fold-lowrank  rank-R reciprocal term, head dim D + R                 fold_lowrank.py
    ra-same-flop     D - R standard + R reciprocal dims, head dim D         same_flop.py
    ra-unified       ra-same-flop emitted by one composed QKV GEMM          unified.py
registry.py names each backend's module and what it needs of the head dimension (torch-free). Shared
pieces: gates.py (gates, self-restart, P init, fold helper), common.py (projections, attention call, routing,
discoverability fold), ../kv_pruning.py.
"""

from gpt2.settings import AttentionSettings, KVPruningSettings, ModelSettings

from .registry import BACKENDS, lookup

# Nothing here imports torch (build_attention imports the chosen backend's module when called), so the
# registry below this package is readable where torch is not: configuration, planning and reports.
__all__ = ["BACKENDS", "build_attention"]


def build_attention(model: ModelSettings, attn: AttentionSettings, kv: KVPruningSettings, layer_idx: int):
    """The attention nn.Module of block `layer_idx`: (B, T, C) -> (B, T, C), after the backend's registry entry
    has checked the head dimension (construct backends through here, not by their class)."""
    backend = lookup(attn.backend)
    backend.check_rank(model.head_dim, attn.reciprocal_rank, attn.discoverability, attn.reciprocal_form)
    return backend.load()(model, attn, kv, layer_idx)
