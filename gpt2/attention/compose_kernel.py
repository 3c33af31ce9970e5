"""ra-unified's weight composition as two Triton kernels (one forward, one backward) per layer.

Math (per head h; W_q,h, W_k,h are the head's D x C row blocks of c_attn.weight, the bias is treated as
one more column, so everything below holds for it too). With A_h the D x D matrix whose columns
Ds..Ds+R-1 hold P_h (zero elsewhere), u_h the discoverability vector and e the last row (disc only):
    Q~_h = std * (w_std W_q,h) + w_rec A_h^T W_k,h            (+ sqrt(D) w_disc in the bias of row e)
    K~_h = std * W_k,h          + A_h^T W_q,h   + e (u_h^T W_k,h)
    V~   = W_v
where std keeps rows < Ds. Backward, with G the gradient of the composed [Q~; K~; V~]:
    dW_q = std * (w_std G_q) + A G_k
    dW_k = std * G_k + w_rec A G_q + u_h (e^T G_k)
    dW_v = G_v
    dw_std = sum(std * G_q * W_q),  dw_rec = sum(A * (W_k G_q^T)),  dP = cols of (W_q G_k^T + w_rec W_k G_q^T),
    du = W_k (e^T G_k)^T,  dw_disc = sqrt(D) * (bias gradient of row e of Q~)
Each program owns one head and one block of columns: it reads the head's q, k, v rows once and writes
the composed rows once (in the GEMM's dtype, so the bf16 cast that autocast would add is fused in). The
backward's reductions over columns are written as per-program partial sums (no atomics: deterministic)
and summed by one torch reduction. A is never built: A^T W is accumulated as outer products of P's rows
with W's rows, and the backward reads the R gradient rows it needs straight from memory; neither needs a
reduction across threads (a first version with D x D tl.dot spent ~0.5 ms per call on an H100, one with
row reductions ~20 us).
Registered with torch.library.triton_op: torch.compile sees the kernels and launches them from its own
generated code (a Python custom op costs ~0.3 ms of host time per call, which showed in the step time).
"""

import math

import torch
from torch.library import triton_op, wrap_triton

from .triton_support import HAVE_TRITON, tl, triton

BLOCK_C = 32
NUM_WARPS = 4


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


if HAVE_TRITON:
    @triton.jit
    def _load_rows(W_ptr, b_ptr, row0, d, cols, C, D, HAS_BIAS: tl.constexpr):
        """Rows row0 + d of [W | b] at columns `cols` (column C is the bias), fp32, zero outside."""
        dm = d < D
        w = tl.load(W_ptr + (row0 + d)[:, None] * C + cols[None, :], mask=dm[:, None] & (cols < C)[None, :],
                    other=0.0).to(tl.float32)
        if HAS_BIAS:
            b = tl.load(b_ptr + row0 + d, mask=dm, other=0.0).to(tl.float32)
            w = tl.where((cols == C)[None, :], b[:, None], w)
        return w

    @triton.jit
    def _load_row(W_ptr, b_ptr, row, cols, C, HAS_BIAS: tl.constexpr):
        """Row `row` of [W | b] at columns `cols`, fp32 (BLOCK_C,)."""
        w = tl.load(W_ptr + row * C + cols, mask=cols < C, other=0.0).to(tl.float32)
        if HAS_BIAS:
            w = tl.where(cols == C, tl.load(b_ptr + row).to(tl.float32), w)
        return w

    @triton.jit
    def _store_rows(W_ptr, b_ptr, row0, d, n_rows, cols, C, val, STORE_BIAS: tl.constexpr):
        """Store val (len(d), BLOCK_C) into rows row0 + d (d < n_rows) of [W | b]."""
        dm = d < n_rows
        tl.store(W_ptr + (row0 + d)[:, None] * C + cols[None, :], val.to(W_ptr.dtype.element_ty),
                 mask=dm[:, None] & (cols < C)[None, :])
        if STORE_BIAS:
            tl.store(b_ptr + (row0 + d)[:, None] + 0 * cols[None, :], val.to(b_ptr.dtype.element_ty),
                     mask=dm[:, None] & (cols == C)[None, :])

    @triton.jit
    def _compose_fwd(W_ptr, b_ptr, P_ptr, ws_ptr, wr_ptr, u_ptr, wd_ptr, out_ptr, outb_ptr,
                     C, Ds, sqrt_d, D: tl.constexpr, R: tl.constexpr,
                     HAS_BIAS: tl.constexpr, OUT_BIAS: tl.constexpr, DISC: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        h = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        d = tl.arange(0, BLOCK_D)
        r = tl.arange(0, BLOCK_R)
        ws = tl.load(ws_ptr + h).to(tl.float32)
        wr = tl.load(wr_ptr + h).to(tl.float32)
        wq = _load_rows(W_ptr, b_ptr, h * D, d, cols, C, D, HAS_BIAS)
        wk = _load_rows(W_ptr, b_ptr, C + h * D, d, cols, C, D, HAS_BIAS)
        _store_rows(out_ptr, outb_ptr, h * D, d, Ds, cols, C, ws * wq, OUT_BIAS)  # standard rows only
        _store_rows(out_ptr, outb_ptr, C + h * D, d, Ds, cols, C, wk, OUT_BIAS)
        # P^T W as a sum of outer products over the head's D input rows (rows re-read from L1): no
        # cross-thread reduction, which is what made the first versions slow.
        rec_q = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)  # P^T W_k -> q~ rows Ds.. (times w_rec)
        rec_k = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)  # P^T W_q -> k~ rows Ds..
        disc_k = tl.zeros((BLOCK_C,), tl.float32)  # u^T W_k -> k~ row D-1
        for i in tl.static_range(D):
            p = tl.load(P_ptr + (h * D + i) * R + r, mask=r < R, other=0.0).to(tl.float32)[:, None]
            wk_i = _load_row(W_ptr, b_ptr, C + h * D + i, cols, C, HAS_BIAS)
            rec_q += p * wk_i[None, :]
            rec_k += p * _load_row(W_ptr, b_ptr, h * D + i, cols, C, HAS_BIAS)[None, :]
            if DISC:
                disc_k += tl.load(u_ptr + h * D + i).to(tl.float32) * wk_i
        _store_rows(out_ptr, outb_ptr, h * D + Ds, r, R, cols, C, wr * rec_q, OUT_BIAS)
        _store_rows(out_ptr, outb_ptr, C + h * D + Ds, r, R, cols, C, rec_k, OUT_BIAS)
        if DISC:
            one = tl.arange(0, 1)
            wd = tl.load(wd_ptr + h).to(tl.float32)
            q_last = tl.where(cols == C, sqrt_d * wd, 0.0)[None, :]
            _store_rows(out_ptr, outb_ptr, h * D + D - 1, one, 1, cols, C, q_last, OUT_BIAS)
            _store_rows(out_ptr, outb_ptr, C + h * D + D - 1, one, 1, cols, C, disc_k[None, :], OUT_BIAS)
        wv = _load_rows(W_ptr, b_ptr, 2 * C + h * D, d, cols, C, D, HAS_BIAS)
        _store_rows(out_ptr, outb_ptr, 2 * C + h * D, d, D, cols, C, wv, OUT_BIAS)

    @triton.jit
    def _compose_bwd(G_ptr, gb_ptr, W_ptr, b_ptr, P_ptr, ws_ptr, wr_ptr, u_ptr, dW_ptr, db_ptr, part_ptr,
                     C, Ds, n_blocks, D: tl.constexpr, R: tl.constexpr,
                     HAS_BIAS: tl.constexpr, OUT_BIAS: tl.constexpr, DISC: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr):
        h = tl.program_id(0)
        blk = tl.program_id(1)
        cols = blk * BLOCK_C + tl.arange(0, BLOCK_C)
        d = tl.arange(0, BLOCK_D)
        dm = d < D
        std = (d < Ds)[:, None]
        gq = _load_rows(G_ptr, gb_ptr, h * D, d, cols, C, D, OUT_BIAS)
        gk = _load_rows(G_ptr, gb_ptr, C + h * D, d, cols, C, D, OUT_BIAS)
        wq = _load_rows(W_ptr, b_ptr, h * D, d, cols, C, D, HAS_BIAS)
        wk = _load_rows(W_ptr, b_ptr, C + h * D, d, cols, C, D, HAS_BIAS)
        ws = tl.load(ws_ptr + h).to(tl.float32)
        wr = tl.load(wr_ptr + h).to(tl.float32)
        # partial sums of this block, laid out [dw_std, dw_rec, dP (D x R), du (D)]
        part = part_ptr + (h * n_blocks + blk) * (2 + D * R + D)
        tl.store(part, tl.sum(tl.sum(tl.where(std, gq * wq, 0.0), axis=1), axis=0))
        dwq = tl.where(std, ws * gq, 0.0)
        dwk = tl.where(std, gk, 0.0)
        d_wr = tl.zeros((BLOCK_D,), tl.float32)
        for r in tl.static_range(R):
            p = tl.load(P_ptr + (h * D + d) * R + r, mask=dm, other=0.0).to(tl.float32)
            gk_r = _load_row(G_ptr, gb_ptr, C + h * D + Ds + r, cols, C, OUT_BIAS)  # grad of k~ row P_r^T W_q
            gq_r = _load_row(G_ptr, gb_ptr, h * D + Ds + r, cols, C, OUT_BIAS)  # grad of q~ row w_rec P_r^T W_k
            dwq += p[:, None] * gk_r[None, :]
            dwk += wr * p[:, None] * gq_r[None, :]
            wk_gq = tl.sum(wk * gq_r[None, :], axis=1)  # (BLOCK_D,)
            d_wr += p * wk_gq
            tl.store(part + 2 + d * R + r, tl.sum(wq * gk_r[None, :], axis=1) + wr * wk_gq, mask=dm)
        tl.store(part + 1, tl.sum(d_wr, axis=0))
        if DISC:
            g_last = _load_row(G_ptr, gb_ptr, C + h * D + D - 1, cols, C, OUT_BIAS)
            u = tl.load(u_ptr + h * D + d, mask=dm, other=0.0).to(tl.float32)
            dwk += u[:, None] * g_last[None, :]
            tl.store(part + 2 + D * R + d, tl.sum(wk * g_last[None, :], axis=1), mask=dm)
        _store_rows(dW_ptr, db_ptr, h * D, d, D, cols, C, dwq, HAS_BIAS)
        _store_rows(dW_ptr, db_ptr, C + h * D, d, D, cols, C, dwk, HAS_BIAS)
        gv = _load_rows(G_ptr, gb_ptr, 2 * C + h * D, d, cols, C, D, OUT_BIAS)
        _store_rows(dW_ptr, db_ptr, 2 * C + h * D, d, D, cols, C, gv, HAS_BIAS)


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0)


def _grid(H: int, C: int, out_bias: bool):
    return H, triton.cdiv(C + int(out_bias), BLOCK_C)


@triton_op("gpt2ra::compose_qkv", mutates_args=())
def compose_qkv(weight: torch.Tensor, bias: torch.Tensor, P: torch.Tensor, w_std: torch.Tensor,
                w_rec: torch.Tensor, u: torch.Tensor, w_disc: torch.Tensor, std_dim: int,
                out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(W~ (3C, C), b~ (3C,), or an empty b~ without bias and discoverability). Absent bias / u / w_disc
    are passed as empty tensors."""
    C = weight.shape[1]
    H, D, R = P.shape
    has_bias, disc = bias.numel() > 0, u.numel() > 0
    out_bias = has_bias or disc
    out = weight.new_empty(3 * C, C, dtype=out_dtype)
    out_b = weight.new_empty(3 * C if out_bias else 0, dtype=out_dtype)
    wrap_triton(_compose_fwd)[_grid(H, C, out_bias)](
        weight, bias, P.contiguous(), w_std.contiguous(), w_rec.contiguous(), u.contiguous(),
        w_disc.contiguous(), out, out_b, C, std_dim, math.sqrt(D), D=D, R=R,
        HAS_BIAS=has_bias, OUT_BIAS=out_bias, DISC=disc, BLOCK_D=_block_d(D),
        BLOCK_R=triton.next_power_of_2(R), BLOCK_C=BLOCK_C, num_warps=NUM_WARPS)
    return out, out_b




@triton_op("gpt2ra::compose_qkv_backward", mutates_args=())
def compose_qkv_backward(grad: torch.Tensor, grad_bias: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                         P: torch.Tensor, w_std: torch.Tensor, w_rec: torch.Tensor, u: torch.Tensor,
                         std_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dW, db (empty without bias), partial sums reduced: (H, 2 + D R + D) = [dw_std, dw_rec, dP, du])."""
    C = weight.shape[1]
    H, D, R = P.shape
    has_bias, disc = bias.numel() > 0, u.numel() > 0
    grid = _grid(H, C, grad_bias.numel() > 0)
    dW = torch.empty_like(weight)
    db = torch.empty_like(bias)
    parts = weight.new_empty(H, grid[1], 2 + D * R + D, dtype=torch.float32)  # du slots unused without disc
    wrap_triton(_compose_bwd)[grid](
        grad.contiguous(), grad_bias.contiguous(), weight, bias, P.contiguous(), w_std.contiguous(),
        w_rec.contiguous(), u.contiguous(), dW, db, parts, C, std_dim, grid[1], D=D, R=R,
        HAS_BIAS=has_bias, OUT_BIAS=grad_bias.numel() > 0, DISC=disc, BLOCK_D=_block_d(D), BLOCK_C=BLOCK_C,
        num_warps=NUM_WARPS)
    return dW, db, parts.sum(1)




def _setup_context(ctx, inputs, output):
    weight, bias, P, w_std, w_rec, u, w_disc, std_dim, _ = inputs
    ctx.save_for_backward(weight, bias, P, w_std, w_rec, u, w_disc)
    ctx.std_dim = std_dim


def _backward(ctx, grad, grad_bias):
    weight, bias, P, w_std, w_rec, u, w_disc = ctx.saved_tensors
    H, D, R = P.shape
    out_bias = bias.numel() > 0 or u.numel() > 0
    if grad_bias is None or (out_bias and grad_bias.numel() == 0):  # b~ took no part in the loss
        grad_bias = grad.new_zeros(grad.shape[0] if out_bias else 0)
    dW, db, sums = compose_qkv_backward(grad, grad_bias, weight, bias, P, w_std, w_rec, u, ctx.std_dim)
    sums = sums.to(P.dtype)
    d_ws, d_wr = sums[:, 0].to(w_std.dtype), sums[:, 1].to(w_rec.dtype)
    dP = sums[:, 2:2 + D * R].reshape(H, D, R)
    du = sums[:, 2 + D * R:].to(u.dtype) if u.numel() else None
    d_wd = None
    if w_disc.numel():  # row D-1 of each head's q~ bias is sqrt(D) w_disc
        d_wd = (math.sqrt(D) * grad_bias[: H * D].view(H, D)[:, D - 1]).to(w_disc.dtype)
    return dW, (db if bias.numel() else None), dP, d_ws, d_wr, du, d_wd, None, None


compose_qkv.register_autograd(_backward, setup_context=_setup_context)


def compose_qkv_fused(weight, bias, P, w_std, w_rec, u, w_disc, std_dim: int, out_dtype: torch.dtype):
    """(W~, b~ or None) through the kernels; bias, u and w_disc may be None."""
    none = _empty(weight)
    out, out_b = compose_qkv(weight, none if bias is None else bias, P, w_std, w_rec,
                             none if u is None else u, none if w_disc is None else w_disc, std_dim, out_dtype)
    return out, (out_b if out_b.numel() else None)
