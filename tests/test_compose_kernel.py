"""ra-unified's Triton composition kernels against the plain torch composition (computed in float64): forward,
every gradient, autocast's output dtype, and the path the module takes. Runs on CUDA, or on CPU under
TRITON_INTERPRET=1; elsewhere (CI's CPU-only torch has no triton) it skips: test_attention.py checks the plain
path."""

import copy

import pytest
import torch

from gpt2.model.attention import build_attention
from gpt2.model.attention.compose_ops import compose_qkv_fused
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
    from gpt2.model.attention.compose_ops import compose_qkv_backward

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
LAUNCHES = [((32, 4), (32, 4), 64), ((32, 4), (32, 4), 512), ((16, 2), (16, 4), 1024), ((64, 8), (64, 8), 4096)]


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


# ---- every layer in one launch (compose_ops.compose_every_layer) ------------------------------------------

def layers(shapes, bias, disc, form="", gate="per-head", threshold=0.0):
    """ra-unified modules, one per (C, H, R) in shapes, each with its own random parameters."""
    out = []
    for i, (C, H, R) in enumerate(shapes):
        model = model_settings(n_embd=C, n_head=H, bias=bias)
        attn = attn_settings("ra-unified", rank=R, gate=gate, disc=disc, form=form, threshold=threshold)
        m = build_attention(model, attn, kv_settings(), i)
        randomize(m, seed=10 + i)
        out.append(m.to(DEVICE))
    return out


def compose_and_grads(modules, compose, dtype, seed=0):
    """(the composed (W~, b~) per module, every parameter's gradient) for one random gradient per W~ and b~."""
    for m in modules:
        m.zero_grad(set_to_none=True)
    composed = compose(modules, dtype)
    gen = torch.Generator().manual_seed(seed)
    loss = 0
    for w, b in composed:
        loss = loss + (w.float() * torch.randn(w.shape, generator=gen).to(DEVICE)).sum()
        if b is not None:
            loss = loss + (b.float() * torch.randn(b.shape, generator=gen).to(DEVICE)).sum()
    loss.backward()
    return composed, [{n: p.grad for n, p in m.named_parameters()} for m in modules]


def every_layer(modules, dtype):
    from gpt2.model.attention.compose_ops import compose_every_layer

    return compose_every_layer([m.kernel_inputs() for m in modules], dtype)


def layer_by_layer(modules, dtype):
    return [fused(m, dtype) for m in modules]


@pytest.mark.parametrize("bias, disc", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("form", ["tied", "untied"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_layer_in_one_launch_equals_layer_by_layer(bias, disc, form, dtype):
    """One launch for three layers writes each layer's W~, b~ exactly as the per-layer launch does, and sends back
    the same gradients; it reads the stored (tied: D_std-row) P and u without the per-layer path's padding."""
    modules = layers([(64, 4, 4)] * 3, bias, disc, form)
    one, grads_one = compose_and_grads(modules, every_layer, dtype)
    per, grads_per = compose_and_grads(modules, layer_by_layer, dtype)
    for (w1, b1), (w0, b0) in zip(one, per):
        assert w1.dtype == dtype and torch.equal(w1, w0)
        assert (b1 is None) == (b0 is None) and (b1 is None or torch.equal(b1, b0))
    for g1, g0 in zip(grads_one, grads_per):
        assert g1.keys() == g0.keys()
        for name in g0:
            if g0[name] is None:
                assert g1[name] is None, name
                continue
            assert g1[name].shape == g0[name].shape
            err = rel_err(g1[name], g0[name]) if g0[name].norm() > 0 else g1[name].abs().max().item()
            assert err < 1e-6, f"grad of {name}: {err:.2e}"


@pytest.mark.parametrize("gate", ["per-head", "per-layer"])
def test_every_layer_groups_shapes_and_keeps_routing(monkeypatch, gate):
    """Layers of two shapes take one launch each way per shape; per-layer gates and a routing threshold give the
    plain composition's weights and gradients (float64 oracle)."""
    import gpt2.model.attention.compose_ops as ops

    modules = layers([(64, 4, 4), (48, 2, 3), (64, 4, 4)], True, True, gate=gate, threshold=0.3)
    with torch.no_grad():  # head 0 below the threshold (w_rec = 0.09) in every layer
        for m in modules:
            m.w_rec.sqrt_weight[0] = 0.3
    launches = []
    for name in ("compose_forward", "compose_backward"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _real=real, _name=name, **k: launches.append(_name) or _real(*a, **k))
    composed, grads = compose_and_grads(modules, every_layer, torch.float32)
    assert launches == ["compose_forward"] * 2 + ["compose_backward"] * 2
    gen = torch.Generator().manual_seed(0)
    for m, (w, b), g in zip(modules, composed, grads):
        g_w, g_b = torch.randn(w.shape, generator=gen).to(DEVICE), torch.randn(b.shape, generator=gen).to(DEVICE)
        w0, b0, g0 = exact_plain(m, g_w, g_b)
        assert rel_err(w, w0) < 1e-6 and rel_err(b, b0) < 1e-6
        for name, expected in g0.items():
            if expected is not None:
                err = rel_err(g[name], expected) if expected.norm() > 0 else g[name].abs().max().item()
                assert err < 1e-5, f"grad of {name}: {err:.2e}"


def test_offset_table_is_cached_by_address():
    from gpt2.model.attention.compose_ops import offset_table

    a, b = torch.zeros(64, device=DEVICE), torch.zeros(64, device=DEVICE)
    table, align = offset_table([[a, b], [a, a]])
    assert table.dtype == torch.int64 and table.shape == (2, 2)
    assert table.tolist() == [[0, 0], [(b.data_ptr() - a.data_ptr()) // 4, 0]]
    assert offset_table([[a, b], [a, a]])[0] is table  # same addresses: the cached table, nothing copied
    assert offset_table([[a, a[1:]]])[1] == 1  # one element apart: the loads cannot assume 16-element alignment


def test_one_micro_step_composes_every_layer_in_one_launch(monkeypatch):
    """The trainer's step with one micro-batch enters the accumulation hook where the kernels run: one launch each
    way composes both layers, the composed weights come in autocast's dtype, and the step ends at the parameters
    of composing layer by layer inside the forward."""
    import gpt2.model.attention.compose_ops as ops
    from gpt2.model.gpt import GPT
    from gpt2.train.step import TrainStep
    from test_attention_helpers import mlp_settings
    from test_train import ListBatches

    device = torch.device(DEVICE)
    precision = "bf16" if DEVICE == "cuda" else "fp32"
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randint(50, (2, 8), generator=gen), torch.randint(50, (2, 8), generator=gen))]

    def one_step(cache):
        model = GPT(model_settings(n_embd=32, n_head=2, n_layer=2, block_size=8), attn_settings("ra-unified", disc=True),
                    mlp_settings(), kv_settings(), 50, seed=0).to(device)
        for block in model.transformer.h:
            randomize(block.attn, seed=1, shared=False)
        step = TrainStep(model, model, torch.optim.SGD(model.parameters(), lr=0.5), device=device,
                         precision=precision, grad_accum=1, grad_clip=0.0, cache_composition=cache)
        loss = step(ListBatches(batches))
        return step, loss, {n: p.detach().clone() for n, p in model.named_parameters()}

    launches = []
    for name in ("compose_forward", "compose_backward"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _real=real, _name=name, **k: launches.append(_name) or _real(*a, **k))
    step, loss_cached, cached = one_step(None)
    assert step.cache_composition and step.composed_dtype == (torch.bfloat16 if DEVICE == "cuda" else None)
    graphed = TrainStep(step.model, step.raw_model, step.optimizer, device=device, precision=precision, grad_accum=1,
                        grad_clip=0.0, cuda_graphs=True)
    assert not graphed.cache_composition  # under CUDA graphs the composition stays in the graph
    assert launches == ["compose_forward", "compose_backward"]
    _, loss_plain, plain = one_step(False)
    torch.testing.assert_close(loss_cached, loss_plain)
    for name in plain:
        torch.testing.assert_close(cached[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
