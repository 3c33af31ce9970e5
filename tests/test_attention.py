"""Attention backends: each against an explicit materialised reference of its own formula, causality,
equalities between backends, routing, discoverability, self-restart, gates and initialisation."""

import pytest
import torch

from gpt2.model.attention import BACKENDS, build_attention
from gpt2.model.attention.common import AttentionBase
from gpt2.model.attention.hooks import RoutingMonitor, cached_composition, refresh_head_routing
from gpt2.model.attention.gates import Gate, SelfRestart
from test_attention_helpers import (ALL_BACKENDS, FORM, RA_BACKENDS, attn_settings, explicit_attention, kv_settings,
                                    model_settings, randomize, rel_err)

RANK = 2
B, T, C, H = 2, 9, 32, 4


def build(backend, *, bias=True, disc=False, restart=False, gate="per-head", threshold=0.0, w_rec=0.5,
          kv=None, n_embd=C, n_head=H, rank=RANK, layer_idx=0, form=""):
    model = model_settings(n_embd=n_embd, n_head=n_head, bias=bias)
    attn = attn_settings(backend, rank=rank, gate=gate, w_rec=w_rec, threshold=threshold, disc=disc, restart=restart,
                         form=form)
    return build_attention(model, attn, kv or kv_settings(), layer_idx)


def reference_of(module, backend, x, params=None, **flags):
    params = params if params is not None else dict(module.named_parameters())
    return explicit_attention(params, x, form=FORM[backend], n_head=module.n_head, rank=RANK, **flags)


def check_against_reference(module, backend, x, dtype=torch.float32, **flags):
    """Forward and every gradient of the module (dtype) vs the explicit reference in float64."""
    module = module.to(dtype)
    x = x.to(dtype).requires_grad_()
    y = module(x)
    g = torch.randn_like(y)
    y.backward(g)
    ref_params = {n: p.detach().double().requires_grad_() for n, p in module.named_parameters()}
    x_ref = x.detach().double().requires_grad_()
    y_ref = reference_of(module, backend, x_ref, ref_params, **flags)
    y_ref.backward(g.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert rel_err(y, y_ref) <= tol, f"forward rel err {rel_err(y, y_ref):.2e}"
    assert rel_err(x.grad, x_ref.grad) <= tol
    for n, p in module.named_parameters():
        assert p.grad is not None, f"{n} got no gradient"
        if ref_params[n].grad is None:  # e.g. gate rows the formula never reads
            assert p.grad.abs().max() == 0, n
            continue
        scale = max(ref_params[n].grad.norm().item(), per_head_scale(module, backend, x_ref, ref_params, n, g, flags))
        err = (p.grad.double() - ref_params[n].grad).norm().item() / scale if scale > 0 else p.grad.abs().max().item()
        assert err <= tol, f"grad of {n}: rel err {err:.2e}"


def per_head_scale(module, backend, x_ref, ref_params, name, g, flags):
    """For a per-layer gate: the sum of the magnitudes of its per-head parts (0 for any other parameter).

    A per-layer gate's gradient is the sum of one term per head, which can nearly cancel; float32 rounding
    then scales with the terms, not with their sum, and an error relative to the sum alone would blame the
    backend for the cancellation. The parts come from the float64 reference with that gate given per head."""
    if not name.endswith("sqrt_weight") or ref_params[name].numel() != 1 or module.n_head == 1:
        return 0.0
    per_head = dict(ref_params)
    per_head[name] = ref_params[name].detach().expand(module.n_head).clone().requires_grad_()
    y = reference_of(module, backend, x_ref.detach(), per_head, **flags)
    (parts,) = torch.autograd.grad(y, per_head[name], g.double())
    return parts.abs().sum().item()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("disc", [False, True])
@pytest.mark.parametrize("restart", [False, True])
def test_backend_matches_explicit_reference(backend, disc, restart):
    if backend == "sdpa" and disc:
        pytest.skip("discoverability needs an RA backend")
    torch.manual_seed(0)
    m = build(backend, disc=disc, restart=restart)
    randomize(m, seed=1)
    check_against_reference(m, backend, torch.randn(B, T, C), disc=disc, restart=restart)


@pytest.mark.parametrize("backend", RA_BACKENDS)
def test_per_layer_gates_and_no_bias(backend):
    m = build(backend, bias=False, gate="per-layer", disc=True)
    randomize(m, seed=2)
    assert m.w_std.sqrt_weight.shape == (1,)
    check_against_reference(m, backend, torch.randn(B, T, C), disc=True)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_gradcheck_float64(backend):
    """torch.autograd.gradcheck through input and every parameter on a tiny shape (head dim 4, rank 1)."""
    disc = backend != "sdpa"
    model = model_settings(n_embd=8, n_head=2, bias=True)
    attn = attn_settings(backend, rank=1, disc=disc, restart=True)
    m = build_attention(model, attn, kv_settings(), 0).double()
    randomize(m, seed=3)
    names = [n for n, _ in m.named_parameters()]
    inputs = [torch.randn(1, 4, 8, dtype=torch.float64, requires_grad=True)]
    inputs += [p.detach().clone().requires_grad_() for _, p in m.named_parameters()]

    def f(x, *params):
        return torch.func.functional_call(m, dict(zip(names, params)), (x,))

    assert torch.autograd.gradcheck(f, tuple(inputs), eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("kv", [False, True])
def test_causal(backend, kv):
    """Changing token t never changes an output before t (and does change the output at t)."""
    torch.manual_seed(0)
    kvs = kv_settings(enabled=True, keep_ratio=0.3, recency=2) if kv else None
    m = build(backend, disc=backend != "sdpa", restart=True, kv=kvs).eval()
    randomize(m, seed=4)
    x = torch.randn(B, 16, C)
    y = m(x)
    for t in (0, 5, 15):
        x2 = x.clone()
        x2[:, t] += torch.randn(B, C)
        y2 = m(x2)
        assert torch.equal(y[:, :t], y2[:, :t]), f"output before {t} changed"
        assert not torch.allclose(y[:, t], y2[:, t])


@pytest.mark.parametrize("backend", ["ra-reference", "ra-fold-full", "ra-fold-lowrank"])
def test_zero_w_rec_without_bias_equals_sdpa(backend):
    """Full-width backends with w_rec = 0 and w_std = 1 are exactly the baseline."""
    torch.manual_seed(0)
    base = build("sdpa", bias=False)
    m = build(backend, bias=False, w_rec=0.0)
    m.load_state_dict(base.state_dict(), strict=False)  # same c_attn / c_proj
    x = torch.randn(B, T, C)
    assert torch.allclose(m(x), base(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["ra-same-flop", "ra-unified"])
def test_same_flop_with_zero_w_rec_is_its_own_formula_not_sdpa(backend):
    """Same-flop keeps only D - R standard dims: with w_rec = 0 it equals its own reference, not SDPA."""
    torch.manual_seed(0)
    base = build("sdpa", bias=False)
    m = build(backend, bias=False, w_rec=0.0)
    m.load_state_dict(base.state_dict(), strict=False)
    x = torch.randn(B, T, C)
    y = m(x)
    assert rel_err(y, reference_of(m, backend, x)) < 1e-5
    assert not torch.allclose(y, base(x), atol=1e-4)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("disc", [False, True])
def test_unified_equals_same_flop_on_the_same_weights(bias, disc):
    torch.manual_seed(0)
    same = build("ra-same-flop", bias=bias, disc=disc, restart=True)
    randomize(same, seed=5)
    uni = build("ra-unified", bias=bias, disc=disc, restart=True)
    uni.load_state_dict(same.state_dict())  # strict: identical parameter sets
    x = torch.randn(B, T, C)
    y_s, y_u = same(x), uni(x)
    assert rel_err(y_u, y_s) < 1e-5
    g = torch.randn_like(y_s)
    y_s.backward(g)
    y_u.backward(g)
    for (n, ps), (_, pu) in zip(same.named_parameters(), uni.named_parameters()):
        assert rel_err(pu.grad, ps.grad) < 1e-5, n


def test_unified_is_reciprocal_not_a_plain_metric():
    """With w_std = 0 only the reciprocal term is left: ra-unified must give L_ij = w_rec (P^T k_i).(P^T q_j),
    not the plain low-rank metric (P^T q_i).(P^T k_j) that independent K_low/Q_low rows would learn."""
    torch.manual_seed(0)
    m = build("ra-unified", bias=False)
    randomize(m, seed=6)
    with torch.no_grad():
        m.w_std.sqrt_weight.zero_()
    x = torch.randn(B, T, C)
    y = m(x)
    params = {n: p.detach() for n, p in m.named_parameters()}
    assert rel_err(y, reference_of(m, "ra-unified", x, params)) < 1e-5
    # Swapping W_q and W_k in the reference turns (P^T k_i).(P^T q_j) into (P^T q_i).(P^T k_j).
    W = params["c_attn.weight"]
    plain = dict(params, **{"c_attn.weight": torch.cat([W[C:2 * C], W[:C], W[2 * C:]])})
    assert rel_err(y, reference_of(m, "ra-unified", x, plain)) > 1e-2


@pytest.mark.parametrize("backend", RA_BACKENDS)
def test_head_selective_routing_equals_per_head_paths(backend):
    """Heads below the threshold run the plain path; the result equals each head on its own formula."""
    torch.manual_seed(0)
    threshold = 0.3
    m = build(backend, threshold=threshold, disc=True, restart=True)
    randomize(m, seed=7)
    with torch.no_grad():
        m.w_rec.sqrt_weight.copy_(torch.tensor([0.2, 0.9, 0.1, 1.1]))  # w_rec = .04, .81, .01, 1.21
    x = torch.randn(B, T, C)
    y = m(x)
    if backend in ("ra-fold-full", "ra-fold-lowrank"):  # the others mask w_rec instead of packing
        assert m.routed_heads == (1, 3)
    ref = reference_of(m, backend, x, plain_heads=(0, 2), disc=True, restart=True)
    assert rel_err(y, ref) < 1e-5
    # Gradients reach both groups.
    y.sum().backward()
    assert m.c_attn.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["ra-fold-full", "ra-fold-lowrank"])
@pytest.mark.parametrize("disc", [False, True])
def test_routed_heads_by_permuted_weights_equal_the_reference_and_never_see_the_future(backend, disc):
    """Without self-restart and KV pruning, routing permutes c_attn's rows and c_proj's columns instead of the
    activations (RAAttentionBase.forward_routed): forward and every gradient equal the explicit per-head
    reference in float64, and it matches the activation-gathering path it replaces."""
    m = build(backend, threshold=0.3, disc=disc)
    randomize(m, seed=11)
    with torch.no_grad():
        m.w_rec.sqrt_weight.copy_(torch.tensor([1.1, 0.2, 0.9, 0.1]))  # RA heads 0 and 2, plain 1 and 3
    m.refresh_head_routing()
    assert m.routed_heads == (0, 2)
    calls = []
    m.forward_routed = (lambda f: lambda x, ra: calls.append(ra) or f(x, ra))(m.forward_routed)
    x = torch.randn(B, T, C, dtype=torch.float64)
    check_against_reference(m, backend, x, dtype=torch.float64, plain_heads=(1, 3), disc=disc)
    assert calls == [(0, 2)]
    with torch.no_grad():  # the activation-gathering path it replaces: AttentionBase.forward -> attend_routed
        assert rel_err(m(x), AttentionBase.forward(m, x)) < 1e-12
    # Causality: changing the last token changes no earlier output.
    x2 = x.clone()
    x2[:, -1] += 1.0
    with torch.no_grad():
        assert torch.equal(m(x)[:, :-1], m(x2)[:, :-1])


def test_routing_packs_groups_and_refreshes():
    m = build("ra-fold-full", threshold=0.3)
    calls = []
    orig = m.attend
    m.attend = lambda q, k, v: calls.append(q.shape) or orig(q, k, v)
    with torch.no_grad():
        m.w_rec.sqrt_weight.copy_(torch.tensor([0.2, 0.9, 0.1, 1.1]))
    m(torch.randn(1, T, C))
    assert sorted(calls) == sorted([(1, 2, T, 8), (1, 2, T, 16)])  # plain heads at D, RA heads at 2D
    with torch.no_grad():
        m.w_rec.sqrt_weight.fill_(1.0)
    assert refresh_head_routing(torch.nn.Sequential(m)) is True
    assert m.routed_heads is None


def test_self_restart_formula_and_range():
    sr = SelfRestart(3)
    assert torch.allclose(sr.alpha(), torch.full((3,), SelfRestart.ALPHA_INIT))
    with torch.no_grad():
        sr.alpha_logit.copy_(torch.tensor([-50.0, 0.0, 50.0]))
    a = sr.alpha()
    assert a.min() >= 0 and a.max() <= 0.5 and abs(a[1] - 0.25) < 1e-7
    y, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    expected = (1 - a.view(1, 3, 1, 1)) * y + a.view(1, 3, 1, 1) * v
    assert torch.allclose(sr(y, v), expected, atol=1e-6)


def test_gates_are_non_negative_and_zero_stays_zero():
    g = Gate(4, "per-head", 0.0)
    assert torch.equal(g(), torch.zeros(4))
    with torch.no_grad():
        g.sqrt_weight.copy_(torch.tensor([-2.0, -0.5, 0.5, 2.0]))
    assert (g() >= 0).all()
    # A model whose reciprocal term starts at 0 keeps w_rec exactly 0 through training steps.
    m = build("ra-fold-full", w_rec=0.0)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for _ in range(3):
        m(torch.randn(B, T, C)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(m.w_rec(), torch.zeros(H))
    assert Gate(2, "per-layer", 0.7)().tolist() == pytest.approx([0.7, 0.7])


def test_gate_values_and_regularization():
    m = build("ra-fold-full", gate="per-layer", w_rec=0.5)
    vals = m.gate_values()
    assert set(vals) == {"w_std", "w_rec"}
    assert vals["w_rec"] == pytest.approx([0.5] * H) and vals["w_std"] == pytest.approx([1.0] * H)
    assert m.regularization_loss() is None  # off: nothing joins the objective
    model = model_settings()
    l1 = build_attention(model, attn_settings("ra-unified", w_rec=0.5, l1=0.1), kv_settings(), 0)
    assert l1.regularization_loss().item() == pytest.approx(0.1 * 0.5 * H)
    l1.regularization_loss().backward()
    assert (l1.w_rec.sqrt_weight.grad > 0).all()  # the penalty pushes w_rec down


@pytest.mark.parametrize("backend", RA_BACKENDS)
def test_extra_parameters_do_not_touch_global_rng_and_are_deterministic(backend):
    # The global stream after building a variant is the one after building the baseline: extras draw
    # nothing from it (the shared Linear layers' default init does, identically in every variant).
    torch.manual_seed(123)
    build("sdpa", layer_idx=3)
    state = torch.get_rng_state()
    torch.manual_seed(123)
    a = build(backend, disc=True, restart=True, layer_idx=3)
    assert torch.equal(torch.get_rng_state(), state)
    b = build(backend, disc=True, restart=True, layer_idx=3)
    extras = lambda m: {n: p for n, p in m.named_parameters() if not n.startswith(("c_attn", "c_proj"))}  # noqa: E731
    for (n, pa), (_, pb) in zip(extras(a).items(), extras(b).items()):
        assert torch.equal(pa, pb), n
    if hasattr(a, "P"):
        eye = torch.eye(RANK).expand(H, RANK, RANK)
        assert torch.allclose(a.P.transpose(1, 2) @ a.P, eye, atol=1e-6)  # orthonormal columns
        c = build(backend, layer_idx=4)
        assert not torch.equal(a.P, c.P)
    with torch.no_grad():
        for p in extras(a).values():
            p.add_(1.0)
    a.reset_extra_parameters()
    for (n, pa), (_, pb) in zip(extras(a).items(), extras(b).items()):
        assert torch.equal(pa, pb), n


def test_ra_model_with_zero_w_rec_equals_baseline_model():
    """Through gpt2.model.gpt.GPT: same seed, fold-full with w_rec = 0 and no bias gives the baseline's logits."""
    from gpt2.model.gpt import GPT
    from test_attention_helpers import mlp_settings

    model = model_settings(bias=False)
    torch.manual_seed(0)
    idx = torch.randint(0, 50, (2, 12))
    outs = [GPT(model, attn, mlp_settings(), kv_settings(), vocab_size=50, seed=7)(idx)[0]
            for attn in (attn_settings("sdpa"), attn_settings("ra-fold-full", w_rec=0.0))]
    assert torch.allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compiled", [False, True])
def test_cached_composition_gives_the_same_gradients(compiled):
    torch.manual_seed(0)
    a = build("ra-unified", disc=True)
    randomize(a, seed=8)
    b = build("ra-unified", disc=True)
    b.load_state_dict(a.state_dict())
    xs = [torch.randn(B, T, C) for _ in range(2)]
    for x in xs:
        a(x).square().mean().backward()
    with cached_composition(torch.nn.Sequential(b), compiled=compiled):
        for x in xs:
            b(x).square().mean().backward()
    assert b._cached is None
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert rel_err(pb.grad, pa.grad) < 1e-5, n


def test_configuration_errors_name_the_symbol():
    with pytest.raises(ValueError, match="CONFIG_ATTN_BACKEND"):
        build("ra-magic")
    with pytest.raises(ValueError, match="CONFIG_ATTN_DISCOVERABILITY"):
        build("sdpa", disc=True)
    # head dim 8: tied same-FLOP RA needs R <= (D - disc) / 2; untied takes R up to D - 1 - disc
    with pytest.raises(ValueError, match="CONFIG_ATTN_RA_RANK=5 is outside 1..4 .*at most half the head"):
        build("ra-same-flop", rank=5)
    with pytest.raises(ValueError, match=r"CONFIG_ATTN_RA_RANK=4 is outside 1..3"):
        build("ra-unified", rank=4, disc=True)
    with pytest.raises(ValueError, match="CONFIG_ATTN_RA_RANK=8 is outside 1..7"):
        build("ra-same-flop", rank=8, form="untied")
    with pytest.raises(ValueError, match=r"CONFIG_ATTN_RA_RANK=7 is outside 1..6"):
        build("ra-unified", rank=7, disc=True, form="untied")
    with pytest.raises(ValueError, match="CONFIG_ATTN_GATE"):
        build("ra-fold-full", gate="per-token")
    assert set(BACKENDS) == set(ALL_BACKENDS)


@pytest.mark.parametrize("backend", ["ra-fold-full", "ra-fold-lowrank"])
def test_folded_width_is_padded_to_multiple_of_8(backend):
    m = build(backend, disc=True)
    seen = []
    orig = m.attend
    m.attend = lambda q, k, v: seen.append((q.shape[-1], k.shape[-1], v.shape[-1])) or orig(q, k, v)
    m(torch.randn(1, T, C))
    dq, dk, dv = seen[0]
    assert dq == dk and dq % 8 == 0 and dv == C // H


def test_routing_is_known_at_construction():
    """Compiled models never refresh inside forward: the routed set must already be right after __init__."""
    assert build("ra-fold-full", threshold=0.1, w_rec=0.0).routed_heads == ()  # every head plain
    assert build("ra-fold-full", threshold=0.1, w_rec=0.5).routed_heads is None  # every head RA
    m = build("ra-fold-lowrank", threshold=0.1, w_rec=0.0)
    x = torch.randn(1, T, C)
    assert rel_err(m(x), reference_of(m, "ra-fold-lowrank", x)) < 1e-5


def test_compiled_routing_switches_path_after_refresh():
    """Under torch.compile forwards never refresh routing: a head whose w_rec drops below the threshold keeps
    the RA path until RoutingMonitor.refresh (what the trainer calls at evaluations and after loading)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = build("ra-fold-full", threshold=0.3)
    randomize(m, seed=3)
    with torch.no_grad():
        m.w_rec.sqrt_weight.fill_(0.9)  # every head on the RA path
    monitor = RoutingMonitor(torch.nn.Sequential(m))
    assert monitor.refresh() == [] and m.routed_heads is None
    compiled = torch.compile(m, backend="eager")
    x = torch.randn(1, T, C)
    assert rel_err(compiled(x), reference_of(m, "ra-fold-full", x)) < 1e-5
    with torch.no_grad():
        m.w_rec.sqrt_weight[2] = 0.2  # w_rec = 0.04 < 0.3
    # Stale: head 2 still runs the RA path with its (small, non-zero) reciprocal term.
    assert rel_err(compiled(x), reference_of(m, "ra-fold-full", x)) < 1e-5
    assert m.routed_heads is None
    assert monitor.refresh() == ["routing: layer 0 now 1/4 heads on the plain path (w_rec < 0.3: heads [2])"]
    assert m.routed_heads == (0, 1, 3)
    y = compiled(x)  # recompiles once for the new head set
    assert rel_err(y, reference_of(m, "ra-fold-full", x, plain_heads=(2,))) < 1e-5
    assert rel_err(y, reference_of(m, "ra-fold-full", x)) > 1e-4
    assert monitor.refresh() == []  # nothing changed since
    with torch.no_grad():
        m.w_rec.sqrt_weight[2] = 0.9
    assert monitor.refresh() == ["routing: layer 0 now 0/4 heads on the plain path (w_rec < 0.3: heads [])"]


@pytest.mark.parametrize("backend", ["ra-same-flop", "ra-unified"])
@pytest.mark.parametrize("disc", [False, True])
def test_untied_form_matches_explicit_reference(backend, disc):
    """The untied form (P reads the whole head) against the same explicit reference, P then D x R."""
    m = build(backend, disc=disc, form="untied")
    assert m.P.shape[1] == C // H
    randomize(m, seed=4)
    check_against_reference(m, backend, torch.randn(B, T, C), disc=disc)
