"""The fused same-flop fold (Triton) against its plain torch formula: values, every gradient, torch.compile.

On CPU these run through Triton's interpreter (TRITON_INTERPRET=1 with triton importable); elsewhere
the module skips. Sizes are small and BLOCK_T is lowered so that T spans several token tiles.
"""

import pytest
import torch

from gpt2.model.attention import same_flop_kernel as sfk
from gpt2.model.attention.same_flop_kernel import fold_same_flop, fold_same_flop_reference
from gpt2.model.attention.triton_support import triton_runs_on, why_not_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not triton_runs_on(torch.empty(0, device=DEVICE)), reason=why_not_triton())
B, H = 2, 3
# (D, T, R): D = 24, 48 are not powers of two, so the padded head-dim lanes of the kernel are exercised;
# R = 16 fills BLOCK_R exactly (R + 1 with disc crosses 16), R = 17 pads P to 32 columns.
SHAPES = [(16, 5, 1), (16, 33, 4), (16, 17, 8), (32, 33, 1), (32, 20, 4), (32, 9, 8), (32, 33, 8), (24, 21, 4),
          (64, 33, 8), (32, 20, 16), (48, 17, 17)]


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setattr(sfk, "BLOCK_T", 16)  # several tiles, including a ragged last one


def make_inputs(D, T, R, disc, dtype, seed=0):
    """q, k as strided views of one (B, T, 3, H, D) QKV tensor (like split_heads), plus the parameters."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    qkv = rand(B, T, 3, H, D).to(DEVICE, dtype).requires_grad_()
    q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    params = dict(P=0.3 * rand(H, D, R), w_std=0.5 + rand(H).abs(), w_rec=0.5 + rand(H).abs())
    if disc:
        params.update(u=0.3 * rand(H, D), w_disc=0.5 + rand(H).abs())
    params = {name: p.to(DEVICE, torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_()
              for name, p in params.items()}
    std_dim = D - R - int(disc)
    return q, k, params, std_dim


def upstream(q, seed=1):
    """A random output gradient whose last dim is NOT contiguous (the kernel must honour strides)."""
    g = torch.Generator().manual_seed(seed)
    B_, H_, T_, D_ = q.shape
    return torch.randn(B_, H_, D_, T_, generator=g, dtype=torch.float64).to(q.device, q.dtype).transpose(-1, -2)


def grads(fold, q, k, params, std_dim):
    inputs = [q, k, *params.values()]
    qt, kt = fold(q, k, std_dim=std_dim, **params)
    gq, gk = upstream(qt, 1), upstream(kt, 2)
    loss = (qt * gq).sum() + (kt * gk).sum()
    return (qt, kt), torch.autograd.grad(loss, inputs)


def assert_close(actual, expected, dtype, tol=None):
    tol = tol or {torch.float32: 1e-5, torch.float64: 1e-10}[dtype]
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * (1 + expected.abs().max().item()))


# float64 through the kernels only in the interpreter: on CUDA Triton passes sqrt(D) as a float32 scalar, and the
# backend sends float64 to its torch path anyway.
DTYPES = [torch.float32] + ([torch.float64] if DEVICE == "cpu" else [])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("disc", [False, True], ids=["plain", "disc"])
@pytest.mark.parametrize("D,T,R", SHAPES)
def test_forward_matches_reference(D, T, R, disc, dtype):
    q, k, params, std_dim = make_inputs(D, T, R, disc, dtype)
    with torch.no_grad():
        qt, kt = fold_same_flop(q, k, std_dim=std_dim, **params)
        ref_q, ref_k = fold_same_flop_reference(q, k, std_dim=std_dim, **params)
    assert qt.shape == kt.shape == (B, H, T, D) and qt.dtype == dtype
    assert qt.stride(-1) == 1 and kt.stride(-1) == 1  # SDPA-friendly layout
    assert_close(qt, ref_q, dtype)
    assert_close(kt, ref_k, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("disc", [False, True], ids=["plain", "disc"])
@pytest.mark.parametrize("D,T,R", SHAPES)
def test_gradients_match_reference(D, T, R, disc, dtype):
    q, k, params, std_dim = make_inputs(D, T, R, disc, dtype)
    _, got = grads(fold_same_flop, q, k, params, std_dim)
    _, want = grads(fold_same_flop_reference, q, k, params, std_dim)
    names = ["q", "k", *params]
    for name, g_got, g_want in zip(names, got, want):
        assert g_got.shape == g_want.shape and g_got.dtype == g_want.dtype, name
        assert_close(g_got, g_want, dtype)


def test_low_precision_activations_with_fp32_parameters():
    """bf16 q, k (autocast) with fp32 parameters: outputs bf16, parameter grads fp32, math in fp32."""
    q, k, params, std_dim = make_inputs(32, 20, 4, True, torch.bfloat16)
    (qt, kt), got = grads(fold_same_flop, q, k, params, std_dim)
    assert qt.dtype == kt.dtype == torch.bfloat16
    # Oracle: the same fold in fp32 on the same bf16 values.
    q32, k32 = (t.detach().float().requires_grad_() for t in (q, k))
    (ref_q, ref_k), want = grads(fold_same_flop_reference, q32, k32, params, std_dim)
    assert_close(qt.float(), ref_q, None, tol=1e-2)
    assert_close(kt.float(), ref_k, None, tol=1e-2)
    for name, g_got, g_want in zip(["q", "k", *params], got, want):
        assert g_got.dtype == (torch.bfloat16 if name in "qk" else torch.float32), name
        assert_close(g_got.float(), g_want, None, tol=2e-2)


def test_wrong_width_is_rejected():
    q, k, params, std_dim = make_inputs(16, 5, 4, False, torch.float32)
    with pytest.raises(ValueError, match="std_dim"):
        fold_same_flop(q, k, std_dim=std_dim - 1, **params)
    with pytest.raises(ValueError, match="std_dim"):
        fold_same_flop_reference(q, k, std_dim=std_dim - 1, **params)


# torch.library.triton_op traces real Triton kernels only; under TRITON_INTERPRET=1 they are interpreter objects.
needs_real_triton = pytest.mark.skipif(DEVICE == "cpu", reason="tracing a triton_op needs compiled Triton kernels "
                                                               "(CUDA); the interpreter's cannot be traced")


@needs_real_triton
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiles_as_an_opaque_op(backend):
    """torch.compile traces through the custom op (fake impl + registered autograd) without graph breaks."""
    torch._dynamo.reset()
    q, k, params, std_dim = make_inputs(16, 20, 4, True, torch.float32)
    compiled = torch.compile(fold_same_flop, backend=backend, fullgraph=True)
    (qt, kt), got = grads(lambda *a, **kw: compiled(*a, **kw), q, k, params, std_dim)
    (ref_q, ref_k), want = grads(fold_same_flop_reference, q, k, params, std_dim)
    assert_close(qt, ref_q, torch.float32)
    assert_close(kt, ref_k, torch.float32)
    for g_got, g_want in zip(got, want):
        assert_close(g_got, g_want, torch.float32)


@needs_real_triton
def test_opcheck():
    """torch.library's own consistency checks: schema, fake tensor, autograd registration."""
    q, k, params, std_dim = make_inputs(16, 9, 4, True, torch.float32)
    args = (q.detach().requires_grad_(), k.detach().requires_grad_(), params["P"], params["w_std"],
            params["w_rec"], std_dim, params["u"], params["w_disc"])
    torch.library.opcheck(fold_same_flop, args, test_utils=("test_schema", "test_autograd_registration",
                                                           "test_faketensor"))
