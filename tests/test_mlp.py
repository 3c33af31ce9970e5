"""Standard and reciprocal MLP: explicit formula, every option combination forward + backward."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from gpt2.model.mlp import MLP, ReciprocalMLP, build_mlp
from test_attention_helpers import mlp_settings, model_settings, randomize, rel_err

C = 16


def explicit_rmlp(m, x, rff):
    """hidden = [GELU(W_s x); GELU(W_l x)], low part through the mixer, gates, then c_proj."""
    h = F.gelu(x @ m.c_fc.weight.T + m.c_fc.bias, approximate="tanh")
    h_std, h_low = h[..., :-rff], h[..., -rff:]
    if m.mixer is not None:
        h_low = h_low @ m.mixer.T
    if m.w_std is not None:
        h_std, h_low = m.w_std.sqrt_weight.square() * h_std, m.w_rec.sqrt_weight.square() * h_low
    return torch.cat([h_std, h_low], -1) @ m.c_proj.weight.T + m.c_proj.bias


def test_standard_mlp_formula():
    m = build_mlp(model_settings(n_embd=C), mlp_settings(expansion=3))
    assert type(m) is MLP and m.c_fc.weight.shape == (3 * C, C)
    x = torch.randn(2, 5, C)
    ref = F.gelu(x @ m.c_fc.weight.T + m.c_fc.bias, approximate="tanh") @ m.c_proj.weight.T + m.c_proj.bias
    assert torch.allclose(m(x), ref, atol=1e-6)


@pytest.mark.parametrize("expansion,rff,mixer,gates",
                         [(e, r, mx, g) for e, r, mx, g in itertools.product([1, 4], ["one", "some", "all-but-one"],
                                                                             [False, True], [False, True])])
def test_every_rmlp_combination_matches_formula_and_trains(expansion, rff, mixer, gates):
    hidden = expansion * C
    rff = {"one": 1, "some": hidden // 4, "all-but-one": hidden - 1}[rff]
    m = build_mlp(model_settings(n_embd=C), mlp_settings("reciprocal", expansion, rff, mixer, gates))
    assert isinstance(m, ReciprocalMLP)
    randomize(m, seed=rff)
    x = torch.randn(2, 5, C, requires_grad=True)
    y = m(x)
    assert rel_err(y, explicit_rmlp(m, x, rff)) < 1e-5
    y.square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.isfinite().all(), name
    assert x.grad.isfinite().all()


@pytest.mark.parametrize("mixer,gates", list(itertools.product([False, True], [False, True])))
def test_rmlp_starts_equal_to_standard_mlp(mixer, gates):
    model = model_settings(n_embd=C)
    std = build_mlp(model, mlp_settings())
    r = build_mlp(model, mlp_settings("reciprocal", 4, 8, mixer, gates))
    r.load_state_dict(std.state_dict(), strict=False)
    x = torch.randn(2, 5, C)
    assert torch.allclose(r(x), std(x), atol=1e-6)
    if gates:
        assert r.reciprocal_gate_values() == pytest.approx({"w_std": 1.0, "w_rec": 1.0})


def test_rmlp_settings_errors():
    model = model_settings(n_embd=C)
    for bad in (0, 4 * C):
        with pytest.raises(ValueError, match=f"CONFIG_MLP_RA_RFF={bad}"):
            build_mlp(model, mlp_settings("reciprocal", 4, bad))
    with pytest.raises(ValueError, match="CONFIG_MLP"):
        build_mlp(model, mlp_settings("quadratic"))


def test_rmlp_inside_the_model_keeps_its_own_init():
    from gpt2.model.gpt import GPT
    from test_attention_helpers import attn_settings, kv_settings

    gpt = GPT(model_settings(n_embd=C, n_head=2), attn_settings("ra-unified"),
              mlp_settings("reciprocal", 4, 8, True, True), kv_settings(), vocab_size=40, seed=1)
    mlp = gpt.transformer.h[0].mlp
    assert torch.equal(mlp.mixer, torch.eye(8))
    logits, loss = gpt(torch.randint(0, 40, (2, 6)), torch.randint(0, 40, (2, 6)))
    loss.backward()
    assert mlp.mixer.grad is not None
