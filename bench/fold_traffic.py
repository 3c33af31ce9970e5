"""The memory-traffic floor of any activation-level fold, as a benchmark variant ("sdpa+fold-traffic").

ra-same-flop folds q and k between the QKV GEMM and the attention call, in kernels of its own: the forward
must read q, k and write q~, k~, and the backward must read dq~, dk~ and (for the gradients of P and the
gates) q, k, and write dq, dk. This op moves exactly those bytes with the same tiles, grid and launch
settings as ra-same-flop's kernels (same_flop_kernel.py), and does no arithmetic: q~ = q, k~ = k, and the
backward returns dq~ + 0 * q (a runtime zero, so the compiler keeps the loads of q and k). Put into the
baseline model, its whole-step ratio to sdpa is what a perfect activation-level fold would cost; the
distance from there to ra-same-flop's ratio is what better fold kernels could still win.
"""

import torch
from torch.library import triton_op, wrap_triton

from gpt2.model.attention import same_flop_kernel as sfk
from gpt2.model.attention.triton_support import HAVE_TRITON, tl, triton, triton_runs_on

if HAVE_TRITON:
    from gpt2.model.attention.same_flop_kernel import _load_tile, _program_tile, _store_tile

    @triton.jit
    def _copy_two_kernel(a_ptr, b_ptr, c_ptr, d_ptr, a_out_ptr, b_out_ptr, zero, T, D,
                         sa_b, sa_h, sa_t, sa_d, sb_b, sb_h, sb_t, sb_d, sc_b, sc_h, sc_t, sc_d,
                         sd_b, sd_h, sd_t, sd_d, so_b, so_h, so_t, so_d,
                         WITH_CD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_R: tl.constexpr, ACC: tl.constexpr):
        # a_out = a (+ zero * c), b_out = b (+ zero * d), tile by tile as the fold kernels go.
        _, b, h, rows, cols, _ = _program_tile(BLOCK_T, BLOCK_D, BLOCK_R)
        keep = cols < D
        a = _load_tile(a_ptr, b, h, rows, cols, keep, T, sa_b, sa_h, sa_t, sa_d, ACC)
        bb = _load_tile(b_ptr, b, h, rows, cols, keep, T, sb_b, sb_h, sb_t, sb_d, ACC)
        if WITH_CD:
            a += zero * _load_tile(c_ptr, b, h, rows, cols, keep, T, sc_b, sc_h, sc_t, sc_d, ACC)
            bb += zero * _load_tile(d_ptr, b, h, rows, cols, keep, T, sd_b, sd_h, sd_t, sd_d, ACC)
        _store_tile(a_out_ptr, a, b, h, rows, cols, keep, T, so_b, so_h, so_t, so_d)
        _store_tile(b_out_ptr, bb, b, h, rows, cols, keep, T, so_b, so_h, so_t, so_d)


def _copy_two(a, b, c=None, d=None):
    """(a + 0*c, b + 0*d) as fresh (B, H, T, D) tensors in (B, T, H, D) memory, like the fold's outputs."""
    a_out, b_out = sfk._fresh_heads(a), sfk._fresh_heads(a)
    grid, consts = sfk._launch_args(a, 1)
    consts.pop("PREC")
    with_cd = c is not None
    c, d = (c, d) if with_cd else (a, b)
    wrap_triton(_copy_two_kernel)[grid](a, b, c, d, a_out, b_out, 0.0, a.shape[2], a.shape[3],
                                        *a.stride(), *b.stride(), *c.stride(), *d.stride(), *a_out.stride(),
                                        WITH_CD=with_cd, **consts,
                                        num_warps=sfk.NUM_WARPS_BWD if with_cd else sfk.NUM_WARPS_FWD)
    return a_out, b_out


@triton_op("gpt2ra_bench::fold_traffic", mutates_args=())
def fold_traffic(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, k) copied: the forward traffic of an activation-level fold (read q, k; write q~, k~)."""
    return _copy_two(q, k)


@triton_op("gpt2ra_bench::fold_traffic_backward", mutates_args=())
def _fold_traffic_backward(gq: torch.Tensor, gk: torch.Tensor, q: torch.Tensor,
                           k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gq, gk), having read q and k too: the backward traffic (read dq~, dk~, q, k; write dq, dk)."""
    return _copy_two(gq, gk, q, k)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, gq, gk):
    return _fold_traffic_backward(gq, gk, *ctx.saved_tensors)


fold_traffic.register_autograd(_backward, setup_context=_setup_context)


def copy_traffic(q, k):
    """fold_traffic where its kernels run; elsewhere (CPU smoke runs) the same copies in torch."""
    if triton_runs_on(q):
        return fold_traffic(q, k)
    return q.clone(), k.clone()


def add_fold_traffic(model):
    """Route every attention layer's q and k through copy_traffic (the baseline's math, the fold's traffic)."""
    for module in model.modules():
        if hasattr(module, "attention_heads") and hasattr(module, "attend"):
            module.attention_heads = lambda q, k, v, attend=module.attend: attend(*copy_traffic(q, k), v)
    return model
