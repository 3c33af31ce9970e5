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
Every launch covers `layers` layers (grid axis 2): one per call inside a compiled forward (compose_ops.py's
per-layer op), or every layer of the model at once, where an int64 table gives each layer's tensors as offsets
from layer 0's (compose_ops.compose_every_layer); outputs are one flat buffer per kind, layer after layer.
Launch settings measured per width: FWD_BLOCK_C and the others below.
"""

import math

import torch
from torch.library import wrap_triton

from .triton_support import HAVE_TRITON, tl, triton


# Columns per program and warps of the forward kernel and of the backward's main kernel: at every width a preset
# trains (C = 384, 768, 1024) the fastest of the settings `--sections compose` sweeps for one launch over every
# layer (what the trainer runs), and within 5% of the fastest launched layer by layer (H200,
# results/bench/attention-nvidia-h200.md; first tuned on an H100 at C = 768, attention-notes.md).
FWD_BLOCK_C, FWD_WARPS = 32, 4
BWD_BLOCK_C, BWD_WARPS = 32, 4
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
    def _at(ptr, table, field: tl.constexpr, FIELDS: tl.constexpr, ALIGN: tl.constexpr):
        """ptr moved to this program's layer. FIELDS == 0: one layer per launch, ptr as given; else the launch covers
        layers 0..L-1 (program_id(2)) and `table` holds, per layer, FIELDS int64 element offsets from layer 0's
        tensors (compose_layers.py); ALIGN is what every offset is a multiple of (16 keeps loads vectorised)."""
        if FIELDS > 0:
            ptr += tl.multiple_of(tl.load(table + tl.program_id(2) * FIELDS + field), ALIGN)
        return ptr

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
    def _load_p(P_ptr, h, d, r, P_ROWS: tl.constexpr, R: tl.constexpr):
        """P_h as a (BLOCK_D, BLOCK_R) fp32 tile: P is stored (H, P_ROWS, R), rows from P_ROWS to D are zero."""
        return tl.load(P_ptr + h * P_ROWS * R + d[:, None] * R + r[None, :],
                       mask=(d < P_ROWS)[:, None] & (r < R)[None, :], other=0.0).to(tl.float32)

    @triton.jit
    def _gate(s_ptr, h, stride, threshold):
        """(w, s) of head h, w = s^2 (stride 0: one gate for the layer), w = 0 below threshold (routed off)."""
        s = tl.load(s_ptr + h * stride).to(tl.float32)
        return tl.where(s * s >= threshold, s * s, 0.0), s

    @triton.jit
    def _compose_fwd(W_ptr, b_ptr, P_ptr, ss_ptr, sr_ptr, u_ptr, sd_ptr, out_ptr, outb_ptr, table,
                     C, Ds, sqrt_d, gs_std, gs_rec, gs_disc, rec_threshold, D: tl.constexpr, R: tl.constexpr,
                     P_ROWS: tl.constexpr, U_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_BIAS: tl.constexpr,
                     DISC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                     FIELDS: tl.constexpr, ALIGN: tl.constexpr):
        W_ptr, b_ptr = _at(W_ptr, table, 0, FIELDS, ALIGN), _at(b_ptr, table, 1, FIELDS, ALIGN)
        P_ptr, ss_ptr = _at(P_ptr, table, 2, FIELDS, ALIGN), _at(ss_ptr, table, 3, FIELDS, ALIGN)
        sr_ptr, u_ptr = _at(sr_ptr, table, 4, FIELDS, ALIGN), _at(u_ptr, table, 5, FIELDS, ALIGN)
        sd_ptr, out_ptr = _at(sd_ptr, table, 6, FIELDS, ALIGN), _at(out_ptr, table, 7, FIELDS, ALIGN)
        outb_ptr += tl.program_id(2).to(tl.int64) * 3 * C  # b~: one flat buffer for every layer of the launch
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
        pt = tl.load(P_ptr + h * P_ROWS * R + d[None, :] * R + r[:, None],
                     mask=(r < R)[:, None] & (d < P_ROWS)[None, :], other=0.0).to(tl.float32)
        if DISC:  # u is stored (H, D); only its first U_DIM entries are read (tied: the standard dims)
            u = tl.load(u_ptr + h * D + d, mask=d < U_DIM, other=0.0).to(tl.float32)
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
                     part_s_ptr, table, C, Ds, s_g0, s_g1, gs_std, gs_rec, rec_threshold, D: tl.constexpr,
                     R: tl.constexpr, P_ROWS: tl.constexpr, U_DIM: tl.constexpr, HAS_BIAS: tl.constexpr,
                     OUT_BIAS: tl.constexpr, DISC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_C: tl.constexpr, PREC: tl.constexpr, FIELDS: tl.constexpr, ALIGN: tl.constexpr):
        """Head h, one block of columns: dW there, and the parameter gradients' partial sums over them."""
        W_ptr, b_ptr = _at(W_ptr, table, 0, FIELDS, ALIGN), _at(b_ptr, table, 1, FIELDS, ALIGN)
        P_ptr, ss_ptr = _at(P_ptr, table, 2, FIELDS, ALIGN), _at(ss_ptr, table, 3, FIELDS, ALIGN)
        sr_ptr, u_ptr = _at(sr_ptr, table, 4, FIELDS, ALIGN), _at(u_ptr, table, 5, FIELDS, ALIGN)
        G_ptr, gb_ptr = _at(G_ptr, table, 7, FIELDS, ALIGN), _at(gb_ptr, table, 8, FIELDS, ALIGN)
        dW_ptr = _at(dW_ptr, table, 9, FIELDS, ALIGN)
        h, blk, n_blocks = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
        layer, n_heads = tl.program_id(2).to(tl.int64), tl.num_programs(0)  # the smaller outputs are flat buffers
        db_ptr += layer * 3 * C
        part_ptr += layer * n_heads * n_blocks * D * (R + DISC)
        part_s_ptr += layer * n_heads * n_blocks * 2
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
        p = _load_p(P_ptr, h, d, r, P_ROWS, R)
        pu = wr * p
        if DISC:
            u = tl.load(u_ptr + h * D + d, mask=d < U_DIM, other=0.0).to(tl.float32)
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
                            du_ptr, dsd_ptr, table, n_blocks, sqrt_d, gs_std, gs_rec, gs_disc, rec_threshold,
                            D: tl.constexpr, R: tl.constexpr, P_ROWS: tl.constexpr, U_DIM: tl.constexpr,
                            DISC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, FIELDS: tl.constexpr,
                            ALIGN: tl.constexpr):
        """Head h, entries BLOCK_E*j.. of the D x R1 partials (R1 = R, + 1 for u): sum the column blocks'
        partials (one tile load, one tl.sum, so the order is fixed and the result deterministic) into dP, du
        and the gate roots' grads."""
        ss_ptr, sr_ptr = _at(ss_ptr, table, 3, FIELDS, ALIGN), _at(sr_ptr, table, 4, FIELDS, ALIGN)
        sd_ptr, gb_ptr = _at(sd_ptr, table, 6, FIELDS, ALIGN), _at(gb_ptr, table, 8, FIELDS, ALIGN)
        R1: tl.constexpr = R + DISC
        h, j = tl.program_id(0), tl.program_id(1)
        first = tl.program_id(2).to(tl.int64) * tl.num_programs(0)  # this layer's first head of the flat outputs
        part_ptr += first * n_blocks * D * R1
        part_s_ptr += first * n_blocks * 2
        dP_ptr += first * P_ROWS * R
        du_ptr += first * D
        dss_ptr += first
        dsr_ptr += first
        dsd_ptr += first
        n = tl.arange(0, BLOCK_N)
        e = j * BLOCK_E + tl.arange(0, BLOCK_E)
        tile = tl.load(part_ptr + (h * n_blocks + n[:, None]) * (D * R1) + e[None, :],
                       mask=(n < n_blocks)[:, None] & (e < D * R1)[None, :], other=0.0)
        total = tl.sum(tile, axis=0)
        d, r = e // R1, e % R1
        tl.store(dP_ptr + h * P_ROWS * R + d * R + r, total, mask=(d < P_ROWS) & (r < R))
        if DISC:  # entries of u past U_DIM are never read: their gradient is 0
            tl.store(du_ptr + h * D + d, tl.where(d < U_DIM, total, 0.0), mask=(d < D) & (r == R))
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


# The columns of the offset table of an every-layer launch (compose_ops.compose_every_layer), which the kernels
# above index by position: the composition's inputs, then the forward's W~ (column 7), or the backward's grad,
# grad_bias and dW (7, 8, 9). The large outputs (W~, dW) have a tensor per layer, as the casts and gradients they
# replace do; the small ones are one flat buffer for all layers.
INPUT_FIELDS = ("weight", "bias", "P", "s_std", "s_rec", "u", "s_disc")


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0)


def _stride(gate_root: torch.Tensor) -> int:
    """0 for a per-layer gate (one value for every head), 1 per head."""
    return int(gate_root.numel() > 1)


def _table_args(table, like, align):
    """(table tensor, FIELDS, ALIGN) for a launch: no table = one layer, pointers as given."""
    return (_empty(like), 0, 1) if table is None else (table, table.shape[1], align)


def compose_forward(weight, bias, P, s_std, s_rec, u, s_disc, std_dim: int, rec_threshold: float, out_dtype,
                    block_c: int, warps: int, u_dim: int, layers: int = 1, table=None, align: int = 1, out=None):
    """The forward kernel's launch at the given settings (the benchmark sweeps them): (W~ (3C, C), b~ (layers *
    3C,)). The tensors are layer 0's; P is (H, rows, R), rows <= D (the rest read as 0); only u's first u_dim
    entries per head are read. With `table` (int64, layers x 8 columns, as above: each layer's tensors' element
    offsets from layer 0's, every one a multiple of `align`) one launch covers every layer; `out` is then layer
    0's W~ (the table finds the others)."""
    C = weight.shape[1]
    H, p_rows, R = P.shape
    D = C // H
    has_bias, disc = bias.numel() > 0, u.numel() > 0
    out_bias = has_bias or disc
    out = weight.new_empty(3 * C, C, dtype=out_dtype) if out is None else out
    out_b = weight.new_empty(layers * 3 * C if out_bias else 0, dtype=out_dtype)
    table, fields, align = _table_args(table, weight, align)
    grid = (H, triton.cdiv(C + int(out_bias), block_c), layers)
    wrap_triton(_compose_fwd)[grid](
        weight, bias, P, s_std, s_rec, u, s_disc, out, out_b, table, C, std_dim, math.sqrt(D), _stride(s_std),
        _stride(s_rec), _stride(s_disc), rec_threshold, D=D, R=R, P_ROWS=p_rows, U_DIM=u_dim, HAS_BIAS=has_bias,
        OUT_BIAS=out_bias, DISC=disc, BLOCK_D=_block_d(D), BLOCK_R=_block_r(R, disc), BLOCK_C=block_c,
        FIELDS=fields, ALIGN=align, num_warps=warps)
    return out, out_b


def compose_backward(grad, grad_bias, weight, bias, P, s_std, s_rec, u, s_disc, std_dim: int, rec_threshold: float,
                     block_c: int, warps: int, u_dim: int, layers: int = 1, table=None, align: int = 1,
                     dW=None) -> list[torch.Tensor]:
    """The backward's two kernel launches, the main one at the given settings (the benchmark sweeps them). Layers
    and table as for compose_forward (10 columns; every layer's grad has grad's strides; dW is layer 0's weight
    gradient). The other outputs hold all layers, one after another: db (layers * 3C,), dP (layers * H, rows, R),
    the gate roots' (layers * H,), du (layers * H, D)."""
    C = weight.shape[1]
    H, p_rows, R = P.shape
    D = C // H
    has_bias, disc = bias.numel() > 0, u.numel() > 0
    out_bias = grad_bias.numel() > 0
    n_blocks = triton.cdiv(C + int(out_bias), block_c)
    block_d, block_r = _block_d(D), _block_r(R, disc)
    dW = torch.empty_like(weight) if dW is None else dW
    db = bias.new_empty(layers * bias.numel())
    dP = P.new_empty(layers * H, p_rows, R)
    per_head = lambda ref: ref.new_empty(layers * H if ref.numel() else 0)  # noqa: E731
    d_std, d_rec, d_disc = per_head(s_std), per_head(s_rec), per_head(s_disc)
    du = u.new_empty((layers * H, D) if disc else (0,))
    entries = partial_entries(D, R, disc)
    partials = weight.new_empty(layers * H * n_blocks * entries, dtype=torch.float32)
    partial_sums = weight.new_empty(layers * H * n_blocks * 2, dtype=torch.float32)
    table, fields, align = _table_args(table, weight, align)
    wrap_triton(_compose_bwd)[(H, n_blocks, layers)](
        grad, grad_bias, weight, bias, P, s_std, s_rec, u, dW, db, partials, partial_sums, table, C,
        std_dim, *grad.stride(), _stride(s_std), _stride(s_rec), rec_threshold, D=D, R=R, P_ROWS=p_rows,
        U_DIM=u_dim, HAS_BIAS=has_bias, OUT_BIAS=out_bias, DISC=disc, BLOCK_D=block_d, BLOCK_R=block_r,
        BLOCK_C=block_c, PREC=PARTIAL_PRECISION, FIELDS=fields, ALIGN=align, num_warps=warps)
    block_n = triton.next_power_of_2(n_blocks)
    block_e = min(triton.next_power_of_2(entries), max(1, FINISH_TILE // block_n))
    wrap_triton(_compose_bwd_finish)[(H, triton.cdiv(entries, block_e), layers)](
        partials, partial_sums, grad_bias, s_std, s_rec, s_disc, dP, d_std, d_rec, du, d_disc, table, n_blocks,
        math.sqrt(D), _stride(s_std), _stride(s_rec), _stride(s_disc), rec_threshold, D=D, R=R, P_ROWS=p_rows,
        U_DIM=u_dim, DISC=disc, BLOCK_E=block_e, BLOCK_N=block_n, FIELDS=fields, ALIGN=align,
        num_warps=FINISH_WARPS)
    return [dW, db, dP, d_std, d_rec, du, d_disc]
