"""ra-unified's weight composition in Triton: one forward kernel and two backward kernels per layer.

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
Every gate is stored as its square root s (w = s^2, gates.py); the kernels square it themselves and
the backward returns dL/ds, so no small gate kernels run around them.

Forward: each program owns one head and one block of columns, reads the head's q, k, v rows once and
writes the composed rows once, in the GEMM's dtype (the bf16 cast autocast would add is fused in). A is
never built: P^T W is one small dot with P^T zero-padded to 16 rows (tl.dot's minimum).
Backward: one program per head and block of columns writes dW there (what autocast's gradient cast
moves in the baseline, plus the R reciprocal gradient rows, plus a read of W) and its partial sums of the
parameter gradients (dP, du, the gate roots'). A small second kernel adds each head's partials up with
one tile load and one tl.sum: a fixed order, so the result is deterministic (no atomics). An earlier
design summed each head's columns in one looping program; that loop was latency bound (43.5 us per layer
on an H100, results/bench/attention-notes.md).
Registered with torch.library.triton_op: torch.compile sees the kernels and launches them from its own
generated code (a Python custom op costs ~0.3 ms of host time per call, which showed in the step time).
Launch settings measured per width: FWD_BLOCK_C and the others below.
"""

import math

import torch
from torch.library import wrap_triton

from .triton_support import HAVE_TRITON, kernel_op, tl, triton


# Columns per program and warps of the forward kernel and of the backward's main kernel: at every width a preset
# trains (C = 384, 768, 1024) the fastest of the settings `--sections compose` sweeps, or within 4% of it
# (H200, results/bench/attention-nvidia-h200.md; first tuned on an H100 at C = 768, attention-notes.md).
FWD_BLOCK_C, FWD_WARPS = 32, 4
BWD_BLOCK_C, BWD_WARPS = 16, 4
PARTIAL_PRECISION = "tf32x3"  # the backward's partial-sum dots: fp32 accuracy from three tf32 tensor-core dots
FINISH_TILE, FINISH_WARPS = 1024, 1  # elements of partials each finishing program sums at once


def partial_entries(D: int, R: int, disc: bool) -> int:
    """fp32 partial sums the backward's main kernel writes per head and column block: D x (R, + 1 for u)."""
    return D * (R + int(disc))


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _block_r(R: int, disc: bool) -> int:
    """Rows of the small P^T / gradient tiles: R (+1 for u) padded to what tl.dot accepts."""
    return max(16, triton.next_power_of_2(R + int(disc)))


if HAVE_TRITON:
    @triton.jit
    def _load_rows(ptr, b_ptr, rows, row_ok, cols, C, s_row, s_col, HAS_BIAS: tl.constexpr):
        """Rows `rows` (where row_ok) of [W | b] at columns `cols` (column C is the bias), fp32, else 0."""
        w = tl.load(ptr + rows[:, None] * s_row + cols[None, :] * s_col,
                    mask=row_ok[:, None] & (cols < C)[None, :], other=0.0).to(tl.float32)
        if HAS_BIAS:
            b = tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
            w = tl.where((cols == C)[None, :], b[:, None], w)
        return w

    @triton.jit
    def _store_rows(ptr, b_ptr, rows, row_ok, cols, C, val, STORE_BIAS: tl.constexpr):
        """Store val (len(rows), BLOCK_C) into rows `rows` (where row_ok) of a contiguous [W | b]."""
        tl.store(ptr + rows[:, None] * C + cols[None, :], val.to(ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (cols < C)[None, :])
        if STORE_BIAS:
            tl.store(b_ptr + rows[:, None] + 0 * cols[None, :], val.to(b_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & (cols == C)[None, :])

    @triton.jit
    def _load_p(P_ptr, h, d, r, D: tl.constexpr, R: tl.constexpr):
        """P_h as a (BLOCK_D, BLOCK_R) fp32 tile, zero outside D x R."""
        return tl.load(P_ptr + h * D * R + d[:, None] * R + r[None, :], mask=(d < D)[:, None] & (r < R)[None, :],
                       other=0.0).to(tl.float32)

    @triton.jit
    def _gate(s_ptr, h, stride, threshold):
        """(w, s) of head h, w = s^2 (stride 0: one gate for the layer), w = 0 below threshold (routed off)."""
        s = tl.load(s_ptr + h * stride).to(tl.float32)
        return tl.where(s * s >= threshold, s * s, 0.0), s

    @triton.jit
    def _compose_fwd(W_ptr, b_ptr, P_ptr, ss_ptr, sr_ptr, u_ptr, sd_ptr, out_ptr, outb_ptr,
                     C, Ds, sqrt_d, gs_std, gs_rec, gs_disc, rec_threshold, D: tl.constexpr, R: tl.constexpr,
                     HAS_BIAS: tl.constexpr, OUT_BIAS: tl.constexpr, DISC: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        h = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        d = tl.arange(0, BLOCK_D)
        r = tl.arange(0, BLOCK_R)
        q0, k0, v0 = h * D, C + h * D, 2 * C + h * D
        wq = _load_rows(W_ptr, b_ptr, q0 + d, d < D, cols, C, C, 1, HAS_BIAS)
        wk = _load_rows(W_ptr, b_ptr, k0 + d, d < D, cols, C, C, 1, HAS_BIAS)
        wv = _load_rows(W_ptr, b_ptr, v0 + d, d < D, cols, C, C, 1, HAS_BIAS)  # all loads first
        ws, _ = _gate(ss_ptr, h, gs_std, 0.0)
        wr, _ = _gate(sr_ptr, h, gs_rec, rec_threshold)
        # Pt: rows r < R hold P^T, row R holds u^T (discoverability); zero elsewhere.
        pt = tl.load(P_ptr + h * D * R + d[None, :] * R + r[:, None], mask=(r < R)[:, None] & (d < D)[None, :],
                     other=0.0).to(tl.float32)
        if DISC:
            u = tl.load(u_ptr + h * D + d, mask=d < D, other=0.0).to(tl.float32)
            pt = tl.where((r == R)[:, None], u[None, :], pt)
        rec_of_q = tl.dot(pt, wq, input_precision="ieee")  # rows r < R: P^T W_q -> k~ rows Ds + r
        rec_of_k = tl.dot(pt, wk, input_precision="ieee")  # rows r < R: P^T W_k; row R: u^T W_k
        _store_rows(out_ptr, outb_ptr, q0 + d, d < Ds, cols, C, ws * wq, OUT_BIAS)
        _store_rows(out_ptr, outb_ptr, q0 + Ds + r, r < R, cols, C, wr * rec_of_k, OUT_BIAS)
        _store_rows(out_ptr, outb_ptr, k0 + d, d < Ds, cols, C, wk, OUT_BIAS)
        _store_rows(out_ptr, outb_ptr, k0 + Ds + r, r < R, cols, C, rec_of_q, OUT_BIAS)
        if DISC:  # row D - 1: q~ carries sqrt(D) w_disc in its bias only, k~ carries u^T W_k (row R above)
            wd, _ = _gate(sd_ptr, h, gs_disc, 0.0)
            q_last = tl.where((cols == C)[None, :], sqrt_d * wd, 0.0) + 0.0 * rec_of_k
            _store_rows(out_ptr, outb_ptr, q0 + D - 1 - R + r, r == R, cols, C, q_last, OUT_BIAS)
            _store_rows(out_ptr, outb_ptr, k0 + D - 1 - R + r, r == R, cols, C, rec_of_k, OUT_BIAS)
        _store_rows(out_ptr, outb_ptr, v0 + d, d < D, cols, C, wv, OUT_BIAS)

    @triton.jit
    def _rec_grad_rows(G_ptr, gb_ptr, q0, k0, Ds, r, cols, C, s_g0, s_g1, D: tl.constexpr, R: tl.constexpr,
                       OUT_BIAS: tl.constexpr, DISC: tl.constexpr):
        """(g_krec, g_qrec), BLOCK_R x BLOCK_C: g_krec[r] = dL/d(k~ row Ds+r = P_r^T W_q), g_qrec[r] =
        dL/d(q~ row Ds+r = w_rec P_r^T W_k) and, with discoverability, g_qrec[R] = dL/d(k~ row D-1 = u^T W_k)."""
        g_krec = _load_rows(G_ptr, gb_ptr, k0 + Ds + r, r < R, cols, C, s_g0, s_g1, OUT_BIAS)
        qrec_ok = r < R
        if DISC:
            qrec_ok = r <= R
        g_qrec = _load_rows(G_ptr, gb_ptr, tl.where(r < R, q0 + Ds + r, k0 + D - 1), qrec_ok, cols, C,
                            s_g0, s_g1, OUT_BIAS)
        return g_krec, g_qrec

    @triton.jit
    def _compose_bwd(G_ptr, gb_ptr, W_ptr, b_ptr, P_ptr, ss_ptr, sr_ptr, u_ptr, dW_ptr, db_ptr, part_ptr,
                     part_s_ptr, C, Ds, s_g0, s_g1, gs_std, gs_rec, rec_threshold, D: tl.constexpr, R: tl.constexpr,
                     HAS_BIAS: tl.constexpr, OUT_BIAS: tl.constexpr, DISC: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, PREC: tl.constexpr):
        """Head h, one block of columns: dW there, and the parameter gradients' partial sums over them."""
        h, blk, n_blocks = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
        d = tl.arange(0, BLOCK_D)
        r = tl.arange(0, BLOCK_R)
        cols = blk * BLOCK_C + tl.arange(0, BLOCK_C)
        q0, k0, v0 = h * D, C + h * D, 2 * C + h * D
        gq = _load_rows(G_ptr, gb_ptr, q0 + d, d < D, cols, C, s_g0, s_g1, OUT_BIAS)
        gk = _load_rows(G_ptr, gb_ptr, k0 + d, d < D, cols, C, s_g0, s_g1, OUT_BIAS)
        gv = _load_rows(G_ptr, gb_ptr, v0 + d, d < D, cols, C, s_g0, s_g1, OUT_BIAS)
        g_krec, g_qrec = _rec_grad_rows(G_ptr, gb_ptr, q0, k0, Ds, r, cols, C, s_g0, s_g1, D, R, OUT_BIAS, DISC)
        wq = _load_rows(W_ptr, b_ptr, q0 + d, d < D, cols, C, C, 1, HAS_BIAS)
        wk = _load_rows(W_ptr, b_ptr, k0 + d, d < D, cols, C, C, 1, HAS_BIAS)
        ws, _ = _gate(ss_ptr, h, gs_std, 0.0)
        wr, _ = _gate(sr_ptr, h, gs_rec, rec_threshold)
        p = _load_p(P_ptr, h, d, r, D, R)
        pu = wr * p
        if DISC:
            u = tl.load(u_ptr + h * D + d, mask=d < D, other=0.0).to(tl.float32)
            pu = tl.where((r == R)[None, :], u[:, None], pu)
        std = (d < Ds)[:, None]
        dwq = tl.where(std, ws * gq, 0.0) + tl.dot(p, g_krec, input_precision="ieee")
        dwk = tl.where(std, gk, 0.0) + tl.dot(pu, g_qrec, input_precision="ieee")
        _store_rows(dW_ptr, db_ptr, q0 + d, d < D, cols, C, dwq, HAS_BIAS)
        _store_rows(dW_ptr, db_ptr, k0 + d, d < D, cols, C, dwk, HAS_BIAS)
        _store_rows(dW_ptr, db_ptr, v0 + d, d < D, cols, C, gv, HAS_BIAS)
        # Partial sums over these columns; _compose_bwd_finish adds the blocks up in a fixed order.
        wq_gk = tl.dot(wq, tl.trans(g_krec), input_precision=PREC)  # (BLOCK_D, BLOCK_R): W_q g_krec^T
        wk_gq = tl.dot(wk, tl.trans(g_qrec), input_precision=PREC)  # W_k g_qrec^T; column R: du
        part = tl.where((r < R)[None, :], wq_gk + wr * wk_gq, wk_gq)
        slot = h * n_blocks + blk
        # Only the D x R1 entries that are gradients (R1 = R, + 1 for u): the dots' padding stays in registers.
        R1: tl.constexpr = R + DISC
        tl.store(part_ptr + (slot * D + d[:, None]) * R1 + r[None, :], part,
                 mask=(d < D)[:, None] & (r < R1)[None, :])
        tl.store(part_s_ptr + 2 * slot, tl.sum(tl.sum(tl.where(std, gq * wq, 0.0), axis=1), axis=0))
        tl.store(part_s_ptr + 2 * slot + 1, tl.sum(tl.sum(p * wk_gq, axis=1), axis=0))

    @triton.jit
    def _compose_bwd_finish(part_ptr, part_s_ptr, gb_ptr, ss_ptr, sr_ptr, sd_ptr, dP_ptr, dss_ptr, dsr_ptr,
                            du_ptr, dsd_ptr, n_blocks, sqrt_d, gs_std, gs_rec, gs_disc, rec_threshold,
                            D: tl.constexpr, R: tl.constexpr, DISC: tl.constexpr, BLOCK_E: tl.constexpr,
                            BLOCK_N: tl.constexpr):
        """Head h, entries BLOCK_E*j.. of the D x R1 partials (R1 = R, + 1 for u): sum the column blocks'
        partials (one tile load, one tl.sum, so the order is fixed and the result deterministic) into dP, du
        and the gate roots' grads."""
        h, j = tl.program_id(0), tl.program_id(1)
        R1: tl.constexpr = R + DISC
        n = tl.arange(0, BLOCK_N)
        e = j * BLOCK_E + tl.arange(0, BLOCK_E)
        tile = tl.load(part_ptr + (h * n_blocks + n[:, None]) * (D * R1) + e[None, :],
                       mask=(n < n_blocks)[:, None] & (e < D * R1)[None, :], other=0.0)
        total = tl.sum(tile, axis=0)
        d, r = e // R1, e % R1
        tl.store(dP_ptr + h * D * R + d * R + r, total, mask=(d < D) & (r < R))
        if DISC:
            tl.store(du_ptr + h * D + d, total, mask=(d < D) & (r == R))
        if j == 0:
            sums = tl.load(part_s_ptr + 2 * (h * n_blocks + n), mask=n < n_blocks, other=0.0)
            rec_sums = tl.load(part_s_ptr + 2 * (h * n_blocks + n) + 1, mask=n < n_blocks, other=0.0)
            _, s_std = _gate(ss_ptr, h, gs_std, 0.0)
            _, s_rec = _gate(sr_ptr, h, gs_rec, rec_threshold)
            rec_on = (s_rec * s_rec >= rec_threshold).to(tl.float32)
            tl.store(dss_ptr + h, 2 * s_std * tl.sum(sums, axis=0))
            tl.store(dsr_ptr + h, 2 * s_rec * rec_on * tl.sum(rec_sums, axis=0))
            if DISC:
                _, s_disc = _gate(sd_ptr, h, gs_disc, 0.0)
                g_bias = tl.load(gb_ptr + h * D + D - 1).to(tl.float32)  # dL/d(q~ bias of row D-1 = sqrt(D) w_disc)
                tl.store(dsd_ptr + h, 2 * s_disc * sqrt_d * g_bias)


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0)


def _stride(gate_root: torch.Tensor) -> int:
    """0 for a per-layer gate (one value for every head), 1 per head."""
    return int(gate_root.numel() > 1)


@kernel_op("gpt2ra::compose_qkv", mutates_args=())
def compose_qkv(weight: torch.Tensor, bias: torch.Tensor, P: torch.Tensor, s_std: torch.Tensor,
                s_rec: torch.Tensor, u: torch.Tensor, s_disc: torch.Tensor, std_dim: int, rec_threshold: float,
                out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(W~ (3C, C), b~ (3C,), or an empty b~ without bias and discoverability). Gates come as their square
    roots s (w = s^2, per head or one per layer; w_rec is 0 where below rec_threshold). Absent bias / u /
    s_disc are passed as empty tensors."""
    return compose_forward(weight, bias, P, s_std, s_rec, u, s_disc, std_dim, rec_threshold, out_dtype,
                           FWD_BLOCK_C, FWD_WARPS)


def compose_forward(weight, bias, P, s_std, s_rec, u, s_disc, std_dim: int, rec_threshold: float, out_dtype,
                    block_c: int, warps: int):
    """compose_qkv's kernel launch at the given settings (the benchmark sweeps them)."""
    C = weight.shape[1]
    H, D, R = P.shape
    has_bias, disc = bias.numel() > 0, u.numel() > 0
    out_bias = has_bias or disc
    out = weight.new_empty(3 * C, C, dtype=out_dtype)
    out_b = weight.new_empty(3 * C if out_bias else 0, dtype=out_dtype)
    grid = (H, triton.cdiv(C + int(out_bias), block_c))
    wrap_triton(_compose_fwd)[grid](
        weight, bias, P.contiguous(), s_std, s_rec, u.contiguous(), s_disc, out, out_b, C, std_dim,
        math.sqrt(D), _stride(s_std), _stride(s_rec), _stride(s_disc), rec_threshold, D=D, R=R,
        HAS_BIAS=has_bias, OUT_BIAS=out_bias, DISC=disc, BLOCK_D=_block_d(D), BLOCK_R=_block_r(R, disc),
        BLOCK_C=block_c, num_warps=warps)
    return out, out_b


@kernel_op("gpt2ra::compose_qkv_backward", mutates_args=())
def compose_qkv_backward(grad: torch.Tensor, grad_bias: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                         P: torch.Tensor, s_std: torch.Tensor, s_rec: torch.Tensor, u: torch.Tensor,
                         s_disc: torch.Tensor, std_dim: int, rec_threshold: float) -> list[torch.Tensor]:
    """[dW, db, dP, dL/ds_std, dL/ds_rec, du, dL/ds_disc]: the gate roots' gradients per head (H,), summed
    over heads by the caller for a per-layer gate; db, du, dL/ds_disc are empty where absent."""
    return compose_backward(grad, grad_bias, weight, bias, P, s_std, s_rec, u, s_disc, std_dim, rec_threshold,
                            BWD_BLOCK_C, BWD_WARPS)


def compose_backward(grad, grad_bias, weight, bias, P, s_std, s_rec, u, s_disc, std_dim: int, rec_threshold: float,
                     block_c: int, warps: int) -> list[torch.Tensor]:
    """compose_qkv_backward's two kernel launches, the main one at the given settings (the benchmark sweeps them)."""
    C = weight.shape[1]
    H, D, R = P.shape
    has_bias, disc = bias.numel() > 0, u.numel() > 0
    out_bias = grad_bias.numel() > 0
    n_blocks = triton.cdiv(C + int(out_bias), block_c)
    block_d, block_r = _block_d(D), _block_r(R, disc)
    dW, db, dP = torch.empty_like(weight), torch.empty_like(bias), torch.empty_like(P)
    per_head = lambda ref: ref.new_empty(H if ref.numel() else 0)  # noqa: E731
    d_std, d_rec, d_disc = per_head(s_std), per_head(s_rec), per_head(s_disc)
    du = torch.empty_like(u)
    entries = partial_entries(D, R, disc)
    partials = weight.new_empty(H * n_blocks * entries, dtype=torch.float32)
    partial_sums = weight.new_empty(H * n_blocks * 2, dtype=torch.float32)
    P, u, grad_bias = P.contiguous(), u.contiguous(), grad_bias.contiguous()
    wrap_triton(_compose_bwd)[(H, n_blocks)](
        grad, grad_bias, weight, bias, P, s_std, s_rec, u, dW, db, partials, partial_sums, C,
        std_dim, *grad.stride(), _stride(s_std), _stride(s_rec), rec_threshold, D=D, R=R, HAS_BIAS=has_bias,
        OUT_BIAS=out_bias, DISC=disc, BLOCK_D=block_d, BLOCK_R=block_r, BLOCK_C=block_c,
        PREC=PARTIAL_PRECISION, num_warps=warps)
    block_n = triton.next_power_of_2(n_blocks)
    block_e = min(triton.next_power_of_2(entries), max(1, FINISH_TILE // block_n))
    wrap_triton(_compose_bwd_finish)[(H, triton.cdiv(entries, block_e))](
        partials, partial_sums, grad_bias, s_std, s_rec, s_disc, dP, d_std, d_rec, du, d_disc, n_blocks,
        math.sqrt(D), _stride(s_std), _stride(s_rec), _stride(s_disc), rec_threshold, D=D, R=R, DISC=disc,
        BLOCK_E=block_e, BLOCK_N=block_n, num_warps=FINISH_WARPS)
    return [dW, db, dP, d_std, d_rec, du, d_disc]


def _per_gate(s: torch.Tensor, per_head: torch.Tensor) -> torch.Tensor:
    return per_head if s.numel() > 1 else per_head.sum(0, keepdim=True)


def _setup_context(ctx, inputs, output):
    weight, bias, P, s_std, s_rec, u, s_disc, std_dim, rec_threshold, _ = inputs
    ctx.save_for_backward(weight, bias, P, s_std, s_rec, u, s_disc)
    ctx.std_dim, ctx.rec_threshold = std_dim, rec_threshold


def _backward(ctx, grad, grad_bias):
    weight, bias, P, s_std, s_rec, u, s_disc = ctx.saved_tensors
    out_bias = bias.numel() > 0 or u.numel() > 0
    if grad_bias is None or (out_bias and grad_bias.numel() == 0):  # b~ took no part in the loss
        grad_bias = grad.new_zeros(grad.shape[0] if out_bias else 0)
    dW, db, dP, d_std, d_rec, du, d_disc = compose_qkv_backward(
        grad, grad_bias, weight, bias, P, s_std, s_rec, u, s_disc, ctx.std_dim, ctx.rec_threshold)
    return (dW, db if bias.numel() else None, dP, _per_gate(s_std, d_std), _per_gate(s_rec, d_rec),
            du if u.numel() else None, _per_gate(s_disc, d_disc) if s_disc.numel() else None, None, None, None)


compose_qkv.register_autograd(_backward, setup_context=_setup_context)


def compose_qkv_fused(weight, bias, P, s_std, s_rec, u, s_disc, std_dim: int, rec_threshold: float,
                      out_dtype: torch.dtype):
    """(W~, b~ or None) through the kernels; bias, u and s_disc may be None. Gates as square roots."""
    none = _empty(weight)
    out, out_b = compose_qkv(weight, none if bias is None else bias, P, s_std, s_rec, none if u is None else u,
                             none if s_disc is None else s_disc, std_dim, rec_threshold, out_dtype)
    return out, (out_b if out_b.numel() else None)
