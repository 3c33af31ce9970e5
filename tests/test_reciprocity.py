"""What the same-FLOP RA forms can express (issue: reciprocity that constrains), on the modules' real weights.

Head h's logits are x_i^T G_h x_j / sqrt(D) with G_h = W~_q,h^T W~_k,h, read from ra-unified's composed QKV
weight (biases off, float64). A plain head reaches rank([G, G^T]) = 2D. The untied form reproduces any plain
head exactly (solving for the free last rows of W_q, W_k); the tied form cannot: its G is built from the
2(D - R) rows W_q,h[:D_std], W_k,h[:D_std] only, so rank([G, G^T]) <= 2(D - R).
"""

import dataclasses

import pytest
import torch

from gpt2.model.attention import build_attention
from gpt2.model.gpt import GPT
from gpt2.settings import MLPSettings, OptimizerSettings
from gpt2.train.optim import build_optimizer
from tests.test_attention_helpers import attn_settings, kv_settings, model_settings, randomize, rel_err

C, H, R = 32, 2, 3  # head dim 16, so C >= 2D
D = C // H


def unified(form, rank=R, disc=False):
    m = build_attention(model_settings(n_embd=C, n_head=H, bias=False),
                        attn_settings("ra-unified", rank=rank, form=form, disc=disc), kv_settings(), 0).double()
    randomize(m, seed=7)
    m.zero_unused_weights()
    return m


def head_forms(weight):
    """G_h (C x C) for each head from a composed (3C, C) weight."""
    q_rows, k_rows = weight[:C].view(H, D, C), weight[C: 2 * C].view(H, D, C)
    return [q_rows[h].T @ k_rows[h] for h in range(H)]


def rank_of(G):
    return torch.linalg.matrix_rank(torch.cat([G, G.T], dim=1)).item()


def test_tied_form_is_constrained_by_rank():
    tied = head_forms(unified("tied").composed_qkv_plain()[0])
    untied = head_forms(unified("untied").composed_qkv_plain()[0])
    W = torch.randn(3 * C, C, dtype=torch.float64)
    plain = head_forms(W)
    for h in range(H):
        assert rank_of(plain[h]) == 2 * D
        assert rank_of(untied[h]) == 2 * D
        assert rank_of(tied[h]) <= 2 * (D - R)


def test_untied_form_reproduces_any_plain_head():
    """Solve for W_q, W_k (P and the gates as they are) so that the composed q~, k~ rows equal arbitrary Q, K."""
    m = unified("untied")
    g = torch.Generator().manual_seed(3)
    Q, K = (torch.randn(H, D, C, generator=g, dtype=torch.float64) for _ in range(2))
    Ds = m.std_dim
    P = m.projection(torch.float64)
    w_std, w_rec = m.w_std().detach(), m.w_rec().detach()
    with torch.no_grad():
        W_qk = m.c_attn.weight[: 2 * C].view(2, H, D, C)
        for h in range(H):
            top, bottom = P[h, :Ds], P[h, Ds:]  # P_h = [top; bottom], bottom R x R (invertible here)
            W_qk[0, h, :Ds] = Q[h, :Ds] / w_std[h]
            W_qk[1, h, :Ds] = K[h, :Ds]
            # w_rec P^T W_k = Q[Ds:]  and  P^T W_q = K[Ds:], solved for the free rows W[Ds:]
            W_qk[1, h, Ds:] = torch.linalg.solve(bottom.T, Q[h, Ds:] / w_rec[h] - top.T @ W_qk[1, h, :Ds])
            W_qk[0, h, Ds:] = torch.linalg.solve(bottom.T, K[h, Ds:] - top.T @ W_qk[0, h, :Ds])
    weight = m.composed_qkv_plain()[0]
    assert rel_err(weight[:C].view(H, D, C), Q) < 1e-10
    assert rel_err(weight[C: 2 * C].view(H, D, C), K) < 1e-10


def test_tied_rows_stay_zero_and_are_not_counted():
    """The tied form's unused W_q/W_k rows start at zero, get no gradient, and AdamW's decay keeps them zero."""
    settings = model_settings(n_embd=C, n_head=H, bias=True, block_size=16)
    attn = attn_settings("ra-unified", rank=R, disc=True)
    model = GPT(settings, attn, MLPSettings(), kv_settings(), 64, seed=0)
    untied = GPT(settings, dataclasses.replace(attn, reciprocal_form="untied"), MLPSettings(), kv_settings(), 64, seed=0)
    block = model.transformer.h[0].attn
    rows = block.unused_rows()
    assert len(rows) == 2 * H * (R + 1)  # R reciprocal dims + the discoverability dim, in W_q and W_k
    per_layer = len(rows) * (C + 1) + H * (R + 1)  # rows with their bias entries, and u's unread entries
    smaller_P = H * (R + 1) * R  # tied P is D_std x R instead of D x R
    n_layer = settings.n_layer
    assert untied.num_params() - model.num_params() == n_layer * (per_layer + smaller_P)
    opt = build_optimizer(model, dataclasses.replace(OptimizerSettings(), weight_decay=0.1), 1e-2, "cpu")
    x = torch.randint(0, 64, (2, 16))
    for _ in range(3):
        _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert block.c_attn.weight[rows].abs().max().item() == 0.0
    assert block.c_attn.bias[rows].abs().max().item() == 0.0


@pytest.mark.parametrize("gate", ["per-head", "per-layer"])
def test_w_rec_l1_sums_over_heads_for_either_granularity(gate):
    """CONFIG_ATTN_W_REC_L1 * sum_h w_rec,h: H = 4, w_rec = 0.5, coefficient 0.1 -> 0.2 per layer either way."""
    m = build_attention(model_settings(n_embd=32, n_head=4), attn_settings("ra-fold-full", gate=gate, w_rec=0.5, l1=0.1),
                        kv_settings(), 0)
    assert m.regularization_loss().item() == pytest.approx(0.2)
