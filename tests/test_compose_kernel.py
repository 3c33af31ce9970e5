"""ra-unified's Triton composition kernels against the plain torch composition (computed in float64): forward,
every gradient, autocast's output dtype, and the path the module takes. Runs on CUDA, or on CPU under
TRITON_INTERPRET=1; elsewhere (CI's CPU-only torch has no triton) it skips: test_attention.py checks the plain
path."""

import copy

import pytest
import torch

from gpt2.model.attention import build_attention
from gpt2.model.attention.compose_kernel import compose_qkv_fused
from gpt2.model.attention.triton_support import HAVE_TRITON, INTERPRET, why_not_triton
from test_attention_helpers import attn_settings, kv_settings, model_settings, randomize, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not HAVE_TRITON or (DEVICE == "cpu" and not INTERPRET), reason=why_not_triton())


def unified(n_embd, n_head, rank, bias, disc, gate="per-head", w_rec=0.5):
    model = model_settings(n_embd=n_embd, n_head=n_head, bias=bias)
    attn = attn_settings("ra-unified", rank=rank, gate=gate, w_rec=w_rec, disc=disc)
    m = build_attention(model, attn, kv_settings(), 0)
    randomize(m, seed=5)
    return m.to(DEVICE)


def fused(m, dtype=torch.float32):
    return compose_qkv_fused(m.c_attn.weight, m.c_attn.bias, m.projection(m.P.dtype), *m.gate_roots(), m.std_dim,
                             m.head_select_threshold, dtype)


def exact_plain(m, g_w, g_b):
    """The plain torch composition and its gradients in float64, as the oracle. A gate's gradient is one sum
    over thousands of terms that can nearly cancel, so a float32 oracle's own rounding (which also varies
    with the BLAS kernel chosen) would take up much of the tolerance."""
    m64 = copy.deepcopy(m).double()
    return composed_and_grads(m64, lambda mod: mod.composed_qkv_plain(), g_w.double(), g_b.double())


def composed_and_grads(m, compose, g_w, g_b):
    m.zero_grad(set_to_none=True)
    weight, bias = compose(m)
    loss = (weight.to(g_w.dtype) * g_w).sum() + (0 if bias is None else (bias.to(g_b.dtype) * g_b).sum())
    loss.backward()
    return weight, bias, {n: p.grad for n, p in m.named_parameters()}


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("disc", [False, True])
@pytest.mark.parametrize("shape", [(64, 4, 4), (48, 2, 3), (96, 3, 8)])  # C, H, R: head dims 16, 24, 32
def test_kernels_equal_plain_composition(bias, disc, shape):
    C, H, R = shape
    m = unified(C, H, R, bias, disc)
    g_w = torch.randn(3 * C, C, device=DEVICE)
    g_b = torch.randn(3 * C, device=DEVICE)
    w0, b0, grads0 = exact_plain(m, g_w, g_b)
    w1, b1, grads1 = composed_and_grads(m, fused, g_w, g_b)
    assert rel_err(w1, w0) < 1e-6
    assert (b0 is None) == (b1 is None) == (not bias and not disc)
    if b0 is not None:
        assert rel_err(b1, b0) < 1e-6
    assert grads0.keys() == grads1.keys()
    for name, g0 in grads0.items():
        g1 = grads1[name]
        if g0 is None:
            assert g1 is None or g1.abs().max() == 0, name
            continue
        assert g1 is not None, f"{name} got no gradient from the kernels"
        err = rel_err(g1, g0) if g0.norm() > 0 else g1.abs().max().item()
        assert err < 1e-5, f"grad of {name}: rel err {err:.2e}"


@pytest.mark.parametrize("gate", ["per-head", "per-layer"])
@pytest.mark.parametrize("threshold", [0.0, 0.3])
def test_gate_granularity_and_routing(gate, threshold):
    """The kernels square the gates' roots themselves: per-layer roots, and w_rec cut to 0 below the
    head-selectivity threshold, give the plain composition's weights and gradients."""
    m = unified(64, 4, 4, True, True, gate=gate)
    with torch.no_grad():
        m.w_rec.sqrt_weight.copy_(torch.tensor([0.3, 0.7, 0.5, 0.9])[: m.w_rec.sqrt_weight.numel()])
    m.head_select_threshold = threshold  # heads with w_rec = 0.09 (and 0.25) fall below 0.3
    g_w, g_b = torch.randn(3 * 64, 64, device=DEVICE), torch.randn(3 * 64, device=DEVICE)
    w0, b0, grads0 = exact_plain(m, g_w, g_b)
    w1, b1, grads1 = composed_and_grads(m, fused, g_w, g_b)
    assert rel_err(w1, w0) < 1e-6 and rel_err(b1, b0) < 1e-6
    for name, g0 in grads0.items():
        if g0 is not None:
            err = rel_err(grads1[name], g0) if g0.norm() > 0 else grads1[name].abs().max().item()
            assert err < 1e-5, f"grad of {name}: rel err {err:.2e}"
    if threshold and gate == "per-head":
        assert grads1["w_rec.sqrt_weight"][0] == 0 and grads1["w_rec.sqrt_weight"][1] != 0


def test_module_uses_the_kernels_in_the_autocast_dtype():
    """Under autocast the kernel writes the composed weight in bf16 itself (no separate cast)."""
    m = unified(64, 4, 4, True, False)
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        weight, bias = m.composed_qkv()
    assert weight.dtype == bias.dtype == torch.bfloat16
    with torch.no_grad():
        w_plain, _ = m.composed_qkv_plain()
    assert rel_err(weight.float(), w_plain) < 1e-2  # bf16 rounding only


@pytest.mark.skipif(DEVICE == "cpu", reason="tracing a triton_op needs compiled Triton kernels (CUDA); "
                                            "the interpreter's cannot be traced")
def test_compiled_module_calls_the_kernels_as_one_op():
    """torch.compile traces the module and the kernels' triton_ops (forward and backward) without graph breaks."""
    m = unified(64, 4, 4, True, True)
    x = torch.randn(2, 5, 64, device=DEVICE)
    g = torch.randn(2, 5, 64, device=DEVICE)
    m(x).backward(g)
    eager = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    compiled(x).backward(g)
    for n, p in m.named_parameters():
        assert rel_err(p.grad, eager[n]) < 1e-5, n


def test_backward_reads_a_transposed_gradient_in_place():
    """The GEMM's weight gradient may arrive as a transposed view: the backward takes its strides."""
    from gpt2.model.attention.compose_kernel import compose_qkv_backward

    m = unified(64, 4, 4, True, True)
    s_std, s_rec, u, s_disc = m.gate_roots()
    grad_t = torch.randn(64, 3 * 64, device=DEVICE)
    gb = torch.randn(3 * 64, device=DEVICE)
    P = m.projection(m.P.dtype).detach()  # (H, D, R): the tied P zero-padded, as the module passes it
    args = (m.c_attn.weight.detach(), m.c_attn.bias.detach(), P, s_std.detach(), s_rec.detach(),
            u.detach(), s_disc.detach(), m.std_dim, 0.0)
    strided = compose_qkv_backward(grad_t.t(), gb, *args)
    dense = compose_qkv_backward(grad_t.t().contiguous(), gb, *args)
    assert not grad_t.t().is_contiguous()
    for a, b in zip(strided, dense):  # the compiler may order the sums differently for another layout
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


# (forward columns x warps, backward columns x warps, finishing tile): the settings in use, the sweep's others,
# and finishing tiles that split a head's partials over several programs.
LAUNCHES = [((32, 4), (16, 4), 64), ((32, 4), (16, 4), 512), ((16, 2), (32, 4), 1024), ((64, 8), (64, 8), 4096)]


@pytest.mark.parametrize("fwd, bwd, finish_tile", LAUNCHES)
def test_launch_settings_give_the_plain_composition(monkeypatch, fwd, bwd, finish_tile):
    """Any launch setting the benchmark sweeps (columns per program, warps) and any split of the backward's
    per-block partials over the finishing programs give the plain composition's weights and gradients, and the
    same bits on a second run."""
    import gpt2.model.attention.compose_kernel as kernels

    for name, value in zip(("FWD_BLOCK_C", "FWD_WARPS", "BWD_BLOCK_C", "BWD_WARPS", "FINISH_TILE"),
                           (*fwd, *bwd, finish_tile)):
        monkeypatch.setattr(kernels, name, value)
    m = unified(96, 3, 8, True, True)  # 97 columns with the bias: 7 blocks of 16, 4 of 32, 2 of 64
    g_w, g_b = torch.randn(3 * 96, 96, device=DEVICE), torch.randn(3 * 96, device=DEVICE)
    w0, b0, grads0 = exact_plain(m, g_w, g_b)
    w1, b1, grads1 = composed_and_grads(m, fused, g_w, g_b)
    _, _, grads2 = composed_and_grads(m, fused, g_w, g_b)
    assert rel_err(w1, w0) < 1e-6 and rel_err(b1, b0) < 1e-6
    for name, g0 in grads0.items():
        if g0 is None:  # a parameter outside the composition
            continue
        assert rel_err(grads1[name], g0) < 1e-5, name
        assert torch.equal(grads1[name], grads2[name]), f"{name}: not deterministic"


def test_compose_benchmark_section_times_every_setting_against_the_one_in_use():
    """`--sections compose` (smoke size): the kernels at another launch setting compute what the setting in use
    computes, and the report names the setting in use and the fastest."""
    from bench.common import Bench
    from bench.compose import compose_lines, run_compose_section

    bench = Bench(torch.device(DEVICE), smoke=True, budget_s=600)
    section = run_compose_section(bench, {"rank": 2})
    assert bench.errors == []
    rows = section["widths"][0]["rows"]
    for kernel in ("forward", "backward"):
        mine = [r for r in rows if r["kernel"] == kernel]
        assert len(mine) >= 2 and sum(r["in_use"] for r in mine) == 1
        assert all(r["us"] > 0 and r["rel_diff"] < 1e-5 for r in mine)
    text = "\n".join(compose_lines(section))
    assert "## Weight composition kernels" in text and "*" in text and "fastest" in text
