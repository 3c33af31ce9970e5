"""Fused Triton fold for ra-same-flop: q, k -> (q~, k~) in one kernel, the backward in one kernel.

Per head h (rows are tokens; P is D x R, Ds = D - R - [disc], head dim stays D):
    q~ = [w_std q[:Ds], w_rec k P, (sqrt(D) w_disc)]        k~ = [k[:Ds], q P, (k . u)]
Backward, with G = dL/dq~ and K = dL/dk~ (each T x D, summed over batch and tokens where a parameter),
m the indicator of the first Ds columns and G_rec = G[:, Ds:Ds+R], K_rec = K[:, Ds:Ds+R]:
    dq      = w_std m * G + K_rec P^T
    dk      = m * K + w_rec G_rec P^T + K[:, D-1] u^T
    dP      = w_rec k^T G_rec + q^T K_rec
    dw_std  = sum(m * q * G)                         dw_rec = sum(P * (k^T G_rec))   (= sum(kP * G_rec))
    du      = k^T K[:, D-1]                          dw_disc = sqrt(D) sum(G[:, D-1])
Only the R reciprocal columns involve P, so the kernels multiply by P itself, zero-padded to BLOCK_R =
max(16, next_pow2(R)) columns (tl.dot wants every dim >= 16): a token tile times P is BLOCK_T x BLOCK_R.
The forward places the reciprocal block at columns Ds.. with a 0/1 selection dot and stores each output as
one full tile (a second, partial-row store at offset Ds ran ~2x slower on an H100). The backward reads G_rec, K_rec as a
second masked load of the grads it already loaded (the same lines, hot in cache).
Each program owns one (token tile, batch, head); it writes dq, dk and its partial parameter grads,
which torch then reduces with one .sum per tensor (deterministic, no atomics). Both passes are
torch.library.triton_ops: torch.compile launches the two kernels from its own code instead of the small
GEMMs and copies inductor emits for the fold.
Compute is in fp32 (fp64 for fp64 inputs); outputs take q's dtype, parameter grads each parameter's.
"""

import math
from typing import Optional

import torch
from torch.library import wrap_triton

from .triton_support import HAVE_TRITON, kernel_op, tl, triton

# Token rows per program; tests lower it to exercise several tiles. Warps: best measured on an H100.
BLOCK_T = 64
NUM_WARPS_FWD = 4
NUM_WARPS_BWD = 4

if HAVE_TRITON:

    @triton.jit
    def _tile_ptrs(ptr, b, h, rows, cols, keep, T, s_b, s_h, s_t, s_d):
        # Strided (B, H, T, D) access: the QKV views and upstream grads are read in place, no copy.
        base = ptr + b.to(tl.int64) * s_b + h.to(tl.int64) * s_h
        offs = rows[:, None].to(tl.int64) * s_t + cols[None, :] * s_d
        return base + offs, (rows[:, None] < T) & keep[None, :]

    @triton.jit
    def _load_tile(ptr, b, h, rows, cols, keep, T, s_b, s_h, s_t, s_d, ACC: tl.constexpr):
        ptrs, mask = _tile_ptrs(ptr, b, h, rows, cols, keep, T, s_b, s_h, s_t, s_d)
        return tl.load(ptrs, mask=mask, other=0.0).to(ACC)

    @triton.jit
    def _store_tile(ptr, val, b, h, rows, cols, keep, T, s_b, s_h, s_t, s_d):
        ptrs, mask = _tile_ptrs(ptr, b, h, rows, cols, keep, T, s_b, s_h, s_t, s_d)
        tl.store(ptrs, val.to(ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _load_p(p_ptr, h, D, R, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, ACC: tl.constexpr):
        # P_h zero-padded to BLOCK_D x BLOCK_R.
        d, r = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_R)
        mask = (d[:, None] < D) & (r[None, :] < R)
        return tl.load(p_ptr + h * D * R + d[:, None] * R + r[None, :], mask=mask, other=0.0).to(ACC)

    @triton.jit
    def _program_tile(BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
        """This program's (token tile, batch, head) and its index ranges: token rows, head dims, rank columns."""
        pid_t, b, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        return pid_t, b, h, rows, tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_R)

    @triton.jit
    def _fold_fwd_kernel(q_ptr, k_ptr, p_ptr, ws_ptr, wr_ptr, u_ptr, wd_ptr, qt_ptr, kt_ptr,
                         T, D, R, DS, sqrt_d,
                         sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, so_b, so_h, so_t, so_d,
                         DISC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_R: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
        pid_t, b, h, rows, cols, rc = _program_tile(BLOCK_T, BLOCK_D, BLOCK_R)
        q = _load_tile(q_ptr, b, h, rows, cols, cols < D, T, sq_b, sq_h, sq_t, sq_d, ACC)
        k = _load_tile(k_ptr, b, h, rows, cols, cols < D, T, sk_b, sk_h, sk_t, sk_d, ACC)
        P = _load_p(p_ptr, h, D, R, BLOCK_D, BLOCK_R, ACC)
        w_rec = tl.load(wr_ptr + h).to(ACC)
        q_rec = w_rec * tl.dot(k, P, input_precision=PREC)  # BLOCK_T x BLOCK_R, padded columns zero
        k_rec = tl.dot(q, P, input_precision=PREC)
        # Place the reciprocal columns at Ds.. with a 0/1 selection dot (exact), so each output is
        # stored as one full tile: partial-row stores at an unaligned offset ran ~2x slower on an H100.
        place = ((cols[None, :] == DS + rc[:, None]) & (rc[:, None] < R)).to(ACC)  # BLOCK_R x BLOCK_D
        std = (cols < DS)[None, :]
        qt = tl.where(std, tl.load(ws_ptr + h).to(ACC) * q, 0.0) + tl.dot(q_rec, place, input_precision=PREC)
        kt = tl.where(std, k, 0.0) + tl.dot(k_rec, place, input_precision=PREC)
        if DISC:
            last = (cols == D - 1)[None, :]
            u = tl.load(u_ptr + h * D + cols, mask=cols < D, other=0.0).to(ACC)
            bias = tl.sum(k * u[None, :], axis=1)  # d_j = k_j . u_h
            qt = tl.where(last, sqrt_d * tl.load(wd_ptr + h).to(ACC), qt)
            kt = tl.where(last, bias[:, None], kt)
        _store_tile(qt_ptr, qt, b, h, rows, cols, cols < D, T, so_b, so_h, so_t, so_d)
        _store_tile(kt_ptr, kt, b, h, rows, cols, cols < D, T, so_b, so_h, so_t, so_d)

    @triton.jit
    def _fold_bwd_kernel(gq_ptr, gk_ptr, q_ptr, k_ptr, p_ptr, ws_ptr, wr_ptr, u_ptr,
                         dq_ptr, dk_ptr, pp_ptr, pws_ptr, pwr_ptr, pu_ptr, pwd_ptr,
                         T, H, D, R, DS, sqrt_d,
                         sg_b, sg_h, sg_t, sg_d, sh_b, sh_h, sh_t, sh_d,
                         sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, so_b, so_h, so_t, so_d,
                         DISC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_R: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
        pid_t, b, h, rows, cols, rc = _program_tile(BLOCK_T, BLOCK_D, BLOCK_R)
        # Rows past T (and padded columns) load as zeros, so they add nothing to the partial sums below.
        G = _load_tile(gq_ptr, b, h, rows, cols, cols < D, T, sg_b, sg_h, sg_t, sg_d, ACC)
        K = _load_tile(gk_ptr, b, h, rows, cols, cols < D, T, sh_b, sh_h, sh_t, sh_d, ACC)
        q = _load_tile(q_ptr, b, h, rows, cols, cols < D, T, sq_b, sq_h, sq_t, sq_d, ACC)
        k = _load_tile(k_ptr, b, h, rows, cols, cols < D, T, sk_b, sk_h, sk_t, sk_d, ACC)
        G_rec = _load_tile(gq_ptr, b, h, rows, DS + rc, rc < R, T, sg_b, sg_h, sg_t, sg_d, ACC)
        K_rec = _load_tile(gk_ptr, b, h, rows, DS + rc, rc < R, T, sh_b, sh_h, sh_t, sh_d, ACC)
        P = _load_p(p_ptr, h, D, R, BLOCK_D, BLOCK_R, ACC)
        Pt = tl.trans(P)
        w_std = tl.load(ws_ptr + h).to(ACC)
        w_rec = tl.load(wr_ptr + h).to(ACC)
        std = (cols < DS)[None, :]
        dq = tl.where(std, w_std * G, 0.0) + tl.dot(K_rec, Pt, input_precision=PREC)
        dk = tl.where(std, K, 0.0) + w_rec * tl.dot(G_rec, Pt, input_precision=PREC)
        kG = tl.dot(tl.trans(k), G_rec, input_precision=PREC)  # BLOCK_D x BLOCK_R: serves dP and dw_rec
        dP = w_rec * kG + tl.dot(tl.trans(q), K_rec, input_precision=PREC)
        part = (pid_t + b * tl.num_programs(0)).to(tl.int64) * H + h  # this program's slot
        tl.store(pws_ptr + part, tl.sum(tl.where(std, q * G, 0.0)))
        tl.store(pwr_ptr + part, tl.sum(P * kG))
        pmask = (cols[:, None] < D) & (rc[None, :] < R)
        tl.store(pp_ptr + part * D * R + cols[:, None] * R + rc[None, :], dP, mask=pmask)
        if DISC:
            last = (cols == D - 1)[None, :]
            u = tl.load(u_ptr + h * D + cols, mask=cols < D, other=0.0).to(ACC)
            K_last = tl.sum(tl.where(last, K, 0.0), axis=1)  # dL/dd_j
            dk += K_last[:, None] * u[None, :]
            tl.store(pu_ptr + part * D + cols, tl.sum(k * K_last[:, None], axis=0), mask=cols < D)
            tl.store(pwd_ptr + part, sqrt_d * tl.sum(tl.where(last, G, 0.0)))
        _store_tile(dq_ptr, dq, b, h, rows, cols, cols < D, T, so_b, so_h, so_t, so_d)
        _store_tile(dk_ptr, dk, b, h, rows, cols, cols < D, T, so_b, so_h, so_t, so_d)


def _check_width(D: int, R: int, std_dim: int, disc: bool) -> None:
    if std_dim + R + int(disc) != D or std_dim < 1:
        raise ValueError(f"same-flop fold needs std_dim + R (+1 with discoverability) = D, got "
                         f"std_dim={std_dim}, R={R}, disc={disc}, D={D}")


def _fresh_heads(q: torch.Tensor) -> torch.Tensor:
    """A (B, H, T, D) tensor stored as (B, T, H, D): last dim contiguous, the layout SDPA gets in the baseline."""
    B, H, T, D = q.shape
    return q.new_empty(B, T, H, D).permute(0, 2, 1, 3)


def _launch_args(q: torch.Tensor, R: int):
    """Grid and compile-time constants: fp32 math (fp64 for fp64), exact dots for fp32/fp64 inputs."""
    B, H, T, D = q.shape
    acc = tl.float64 if q.dtype == torch.float64 else tl.float32
    prec = "ieee" if q.dtype in (torch.float32, torch.float64) else "tf32"
    grid = (triton.cdiv(T, BLOCK_T), B, H)
    consts = dict(BLOCK_T=BLOCK_T, BLOCK_D=max(16, triton.next_power_of_2(D)), ACC=acc, PREC=prec,
                  BLOCK_R=max(16, triton.next_power_of_2(R)))
    return grid, consts


@kernel_op("gpt2ra::fold_same_flop", mutates_args=())
def fold_same_flop(q: torch.Tensor, k: torch.Tensor, P: torch.Tensor, w_std: torch.Tensor,
                   w_rec: torch.Tensor, std_dim: int, u: Optional[torch.Tensor] = None,
                   w_disc: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q~, k~), each (B, H, T, D) in q's dtype (memory (B, T, H, D)). Only where triton_runs_on(q)."""
    if not HAVE_TRITON:
        raise RuntimeError("fold_same_flop needs triton; use fold_same_flop_reference")
    H, D, R = P.shape
    disc = u is not None
    _check_width(q.shape[-1], R, std_dim, disc)
    P, w_std, w_rec = P.contiguous(), w_std.contiguous(), w_rec.contiguous()
    u = u.contiguous() if disc else P  # unused pointer placeholders when discoverability is off
    w_disc = w_disc.contiguous() if disc else w_std
    qt, kt = _fresh_heads(q), _fresh_heads(q)
    grid, consts = _launch_args(q, R)
    wrap_triton(_fold_fwd_kernel)[grid](q, k, P, w_std, w_rec, u, w_disc, qt, kt,
                           q.shape[2], D, R, std_dim, math.sqrt(D),
                           *q.stride(), *k.stride(), *qt.stride(),
                           DISC=disc, num_warps=NUM_WARPS_FWD, **consts)
    return qt, kt


@kernel_op("gpt2ra::fold_same_flop_backward", mutates_args=())
def _fold_same_flop_backward(gq: torch.Tensor, gk: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                             P: torch.Tensor, w_std: torch.Tensor, w_rec: torch.Tensor, std_dim: int,
                             u: Optional[torch.Tensor], w_disc: Optional[torch.Tensor]) -> list[torch.Tensor]:
    """[dq, dk, dP, dw_std, dw_rec, du, dw_disc]; du, dw_disc are empty without discoverability."""
    H, D, R = P.shape
    disc = u is not None
    P, w_std, w_rec = P.contiguous(), w_std.contiguous(), w_rec.contiguous()
    dq, dk = _fresh_heads(q), _fresh_heads(q)
    grid, consts = _launch_args(q, R)
    n_part = grid[0] * grid[1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    part = lambda *shape: torch.empty(n_part, H, *shape, dtype=acc, device=q.device)  # noqa: E731
    p_P, p_ws, p_wr = part(D, R), part(), part()
    p_u, p_wd = (part(D), part()) if disc else (p_ws, p_ws)  # never written when disc is off
    wrap_triton(_fold_bwd_kernel)[grid](gq, gk, q, k, P, w_std, w_rec, u.contiguous() if disc else P,
                           dq, dk, p_P, p_ws, p_wr, p_u, p_wd,
                           q.shape[2], H, D, R, std_dim, math.sqrt(D),
                           *gq.stride(), *gk.stride(), *q.stride(), *k.stride(), *dq.stride(),
                           DISC=disc, num_warps=NUM_WARPS_BWD, **consts)
    grads = [dq, dk, p_P.sum(0).to(P.dtype), p_ws.sum(0).to(w_std.dtype), p_wr.sum(0).to(w_rec.dtype)]
    if disc:
        grads += [p_u.sum(0).to(u.dtype), p_wd.sum(0).to(w_disc.dtype)]
    else:
        grads += [q.new_empty(0), q.new_empty(0)]
    return grads


def _setup_context(ctx, inputs, output):
    q, k, P, w_std, w_rec, std_dim, u, w_disc = inputs
    ctx.std_dim = std_dim
    ctx.save_for_backward(q, k, P, w_std, w_rec, u, w_disc)


def _backward(ctx, gq, gk):
    q, k, P, w_std, w_rec, u, w_disc = ctx.saved_tensors
    dq, dk, dP, dws, dwr, du, dwd = _fold_same_flop_backward(gq, gk, q, k, P, w_std, w_rec, ctx.std_dim,
                                                             u, w_disc)
    if u is None:
        du = dwd = None
    return dq, dk, dP, dws, dwr, None, du, dwd


fold_same_flop.register_autograd(_backward, setup_context=_setup_context)


def fold_same_flop_reference(q: torch.Tensor, k: torch.Tensor, P: torch.Tensor, w_std: torch.Tensor,
                             w_rec: torch.Tensor, std_dim: int, u: Optional[torch.Tensor] = None,
                             w_disc: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The same fold in plain torch (ra-same-flop's construction); for CPU and as the tests' oracle."""
    B, H, T, D = q.shape
    _check_width(D, P.shape[-1], std_dim, u is not None)
    per_head = lambda w: w.to(q.dtype).view(1, H, 1, 1)  # noqa: E731
    P = P.to(q.dtype)
    q_parts = [q[..., :std_dim] * per_head(w_std), (k @ P) * per_head(w_rec)]
    k_parts = [k[..., :std_dim], q @ P]
    if u is not None:
        q_parts.append(per_head(w_disc * math.sqrt(D)).expand(B, H, T, 1))
        k_parts.append((k * u.to(k.dtype).unsqueeze(1)).sum(-1, keepdim=True))
    # The width is exactly D, so fold_cat would add no padding: a plain cat is the same thing.
    return torch.cat(q_parts, dim=-1), torch.cat(k_parts, dim=-1)
