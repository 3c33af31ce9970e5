"""Helpers (no tests) shared by the attention / MLP / KV-pruning tests: settings builders and explicit references.

The references here are written from the formulas, independently of gpt2/attention: they only share the
parametrisations that are part of the spec (gate w = s^2, alpha = 0.5 sigmoid(a)).
"""

import math

import torch

from gpt2.settings import AttentionSettings, KVPruningSettings, MLPSettings, ModelSettings

RA_BACKENDS = ["ra-reference", "ra-fold-full", "ra-fold-lowrank", "ra-same-flop", "ra-unified"]
ALL_BACKENDS = ["sdpa"] + RA_BACKENDS
# The formula each backend implements.
FORM = {"sdpa": "sdpa", "ra-reference": "full", "ra-fold-full": "full", "ra-fold-lowrank": "lowrank",
        "ra-same-flop": "same-flop", "ra-unified": "same-flop"}


def model_settings(n_embd=32, n_head=4, bias=True, dropout=0.0, block_size=64, n_layer=2):
    return ModelSettings(size="custom", n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                         dropout=dropout, bias=bias)


def attn_settings(backend="sdpa", rank=2, gate="per-head", w_std=1.0, w_rec=0.5, threshold=0.0, l1=0.0,
                  disc=False, restart=False, form=""):
    """form: "" or "tied" (the same-FLOP default) or "untied"."""
    return AttentionSettings(backend=backend, reciprocal_rank=rank, gate_granularity=gate, w_std_init=w_std,
                             w_rec_init=w_rec, head_select_threshold=threshold, w_rec_l1=l1,
                             discoverability=disc, self_restart=restart, reciprocal_form=form)


def kv_settings(enabled=False, keep_ratio=0.5, recency=2, sampling=False, min_length=4096, fraction=0.02):
    return KVPruningSettings(enabled=enabled, keep_ratio=keep_ratio, recency_window=recency, use_sampling=sampling,
                             sampling_min_length=min_length, sample_fraction=fraction)


def mlp_settings(kind="standard", expansion=4, rff=0, mixer=False, gates=False):
    return MLPSettings(kind=kind, expansion=expansion, reciprocal_ff=rff, mixer=mixer, gates=gates)


SHARED = ("c_attn.", "c_proj.", "c_fc.")


@torch.no_grad()
def randomize(module, seed=0, shared=True):
    """Random values for every parameter (gates kept away from 0 so they are differentiable)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if name.startswith(SHARED):
            if shared:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        elif name.endswith("sqrt_weight"):
            p.copy_(0.5 + torch.rand(p.shape, generator=g))
        else:
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def gate(params, name, H):
    return params[f"{name}.sqrt_weight"].square().expand(H)


def explicit_attention(params, x, *, form, n_head, rank=0, disc=False, restart=False, threshold=0.0,
                       plain_heads=()):
    """Materialised attention of `form` (sdpa | full | lowrank | same-flop), straight from the formulas.

    params: name -> tensor (the module's named_parameters, possibly cast). plain_heads get w_rec = 0.
    """
    B, T, C = x.shape
    H, D = n_head, C // n_head
    qkv = x @ params["c_attn.weight"].T
    if "c_attn.bias" in params:
        qkv = qkv + params["c_attn.bias"]
    q, k, v = (t.reshape(B, T, H, D).transpose(1, 2) for t in qkv.split(C, dim=-1))
    S = q @ k.transpose(-1, -2) / math.sqrt(D)  # S[b, h, i, j] = q_i . k_j / sqrt(D)
    if form == "sdpa":
        L = S
    else:
        w_std, w_rec = gate(params, "w_std", H), gate(params, "w_rec", H).clone()
        if threshold > 0:
            w_rec = torch.where(w_rec >= threshold, w_rec, torch.zeros_like(w_rec))
        for h in plain_heads:
            w_rec = w_rec.index_fill(0, torch.tensor([h]), 0.0)
        if form == "full":
            std, rec = S, S.transpose(-1, -2)  # rec[i, j] = S_ji = q_j . k_i
        else:
            # P (H, Dp, R) reads the first Dp dims of q and k: Dp = D (lowrank, untied same-flop), or the D_std
            # standard dims (tied same-flop: P^T q_s, P^T k_s).
            P = params["P"]
            Dp = P.shape[1]
            Sp = (q[..., :Dp] @ P) @ (k[..., :Dp] @ P).transpose(-1, -2) / math.sqrt(D)  # (P^T q_i).(P^T k_j)
            rec = Sp.transpose(-1, -2)  # rec[i, j] = (P^T k_i) . (P^T q_j)
            if form == "lowrank":
                std = S
            else:
                Ds = D - rank - int(disc)
                std = q[..., :Ds] @ k[..., :Ds].transpose(-1, -2) / math.sqrt(D)
        L = w_std.view(1, H, 1, 1) * std + w_rec.view(1, H, 1, 1) * rec
        if disc:
            # d_j = k_j . u_h (B, H, T); tied same-flop reads only the standard dims of k
            Du = params["P"].shape[1] if form == "same-flop" else D
            d = (k[..., :Du] * params["u"][:, :Du].unsqueeze(1)).sum(-1)
            L = L + gate(params, "w_disc", H).view(1, H, 1, 1) * d.unsqueeze(-2)
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    A = torch.softmax(L.masked_fill(~causal, float("-inf")), dim=-1)
    y = A @ v
    if restart:
        alpha = 0.5 * torch.sigmoid(params["restart.alpha_logit"]).view(1, H, 1, 1)
        y = (1 - alpha) * y + alpha * v
    y = y.transpose(1, 2).reshape(B, T, C) @ params["c_proj.weight"].T
    if "c_proj.bias" in params:
        y = y + params["c_proj.bias"]
    return y


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()
