"""ra-unified's composition as operations autograd and torch.compile call; the kernels are in compose_kernel.py.

compose_qkv_fused    one layer, as a torch.library.triton_op pair (forward, backward): torch.compile sees the
                     kernels and launches them from its own generated code (a Python custom op cost ~0.3 ms of
                     host time per call, which showed in the step time). The composition then runs inside the
                     model's forward: evaluation, decoding, and any caller that bypasses the trainer's hook.
compose_every_layer  every layer at once, outside torch.compile: one launch per kernel for all the layers of one
                     shape. The trainer composes this way once per optimizer step (hooks.cached_composition).
                     Layer by layer, each of the three launches was too short to reach the memory's bandwidth:
                     a ramp and a tail per launch, 11.3 + 18.5 us per 350M layer in the step against ~7 us each
                     way for the casts they replace (results/bench/attention-notes.md). The launch finds each
                     layer's tensors through a table of their offsets from layer 0's, built from their
                     addresses, which a compiled graph's fake tensors do not have: hence outside the graph.
"""

from collections import OrderedDict
from typing import NamedTuple

import torch

from . import compose_kernel as kernels  # launch settings read at call time (the tests and benchmark set them)
from .compose_kernel import INPUT_FIELDS, compose_backward, compose_forward
from .triton_support import kernel_op

@kernel_op("gpt2ra::compose_qkv", mutates_args=())
def compose_qkv(weight: torch.Tensor, bias: torch.Tensor, P: torch.Tensor, s_std: torch.Tensor,
                s_rec: torch.Tensor, u: torch.Tensor, s_disc: torch.Tensor, std_dim: int, rec_threshold: float,
                out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(W~ (3C, C), b~ (3C,), or an empty b~ without bias and discoverability). Gates come as their square
    roots s (w = s^2, per head or one per layer; w_rec is 0 where below rec_threshold). Absent bias / u /
    s_disc are passed as empty tensors."""
    return compose_forward(weight, bias, P, s_std, s_rec, u, s_disc, std_dim, rec_threshold, out_dtype,
                           kernels.FWD_BLOCK_C, kernels.FWD_WARPS, u_dim=u.shape[-1] if u.numel() else 0)


@kernel_op("gpt2ra::compose_qkv_backward", mutates_args=())
def compose_qkv_backward(grad: torch.Tensor, grad_bias: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                         P: torch.Tensor, s_std: torch.Tensor, s_rec: torch.Tensor, u: torch.Tensor,
                         s_disc: torch.Tensor, std_dim: int, rec_threshold: float) -> list[torch.Tensor]:
    """[dW, db, dP, dL/ds_std, dL/ds_rec, du, dL/ds_disc]: the gate roots' gradients per head (H,), summed
    over heads by the caller for a per-layer gate; db, du, dL/ds_disc are empty where absent."""
    return compose_backward(grad, grad_bias, weight, bias, P, s_std, s_rec, u, s_disc, std_dim, rec_threshold,
                            kernels.BWD_BLOCK_C, kernels.BWD_WARPS, u_dim=u.shape[-1] if u.numel() else 0)


def per_gate(s: torch.Tensor, per_head: torch.Tensor) -> torch.Tensor:
    """A gate root's gradient from the per-head sums the backward writes: (..., H), summed for a per-layer gate."""
    return per_head if s.numel() > 1 else per_head.sum(-1, keepdim=True)


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
    return (dW, db if bias.numel() else None, dP, per_gate(s_std, d_std), per_gate(s_rec, d_rec),
            du if u.numel() else None, per_gate(s_disc, d_disc) if s_disc.numel() else None, None, None, None)


compose_qkv.register_autograd(_backward, setup_context=_setup_context)


def compose_qkv_fused(weight, bias, P, s_std, s_rec, u, s_disc, std_dim: int, rec_threshold: float,
                      out_dtype: torch.dtype):
    """(W~, b~ or None) through the kernels; bias, u and s_disc may be None. Gates as square roots."""
    none = weight.new_empty(0)
    out, out_b = compose_qkv(weight, none if bias is None else bias, P, s_std, s_rec, none if u is None else u,
                             none if s_disc is None else s_disc, std_dim, rec_threshold, out_dtype)
    return out, (out_b if out_b.numel() else None)


class LayerInputs(NamedTuple):
    """One layer's composition inputs as its parameters hold them (no padding, no squaring)."""
    weight: torch.Tensor
    bias: torch.Tensor | None
    P: torch.Tensor  # (H, rows, R): rows < D (tied: D_std) are stored, the rest read as zero
    s_std: torch.Tensor  # gate roots, (H,) or (1,)
    s_rec: torch.Tensor
    u: torch.Tensor | None  # (H, D), of which the first u_dim entries per head are read
    s_disc: torch.Tensor | None
    std_dim: int
    rec_threshold: float
    u_dim: int


TABLE_CACHE = 64  # offset tables kept per process: one for the parameters, a few for the gradients' addresses
_tables: OrderedDict = OrderedDict()


def offset_table(columns: list) -> tuple[torch.Tensor, int]:
    """(int64 table (L, len(columns)) on the tensors' device, align): row l holds each column's layer-l tensor's
    offset from its layer-0 tensor, in elements (0 for an empty tensor); align = 16 if every offset is a
    multiple of 16, else 1. Cached by the addresses, so a step that reuses them copies nothing to the GPU."""
    device = columns[0][0].device
    key = (str(device),) + tuple(t.data_ptr() if t.numel() else 0 for col in columns for t in col)
    if key in _tables:
        _tables.move_to_end(key)
        return _tables[key]
    rows = []
    for layer in range(len(columns[0])):
        row = []
        for col in columns:
            t, first = col[layer], col[0]  # same dtype (the launch's signature): whole elements apart
            row.append((t.data_ptr() - first.data_ptr()) // t.element_size() if t.numel() else 0)
        rows.append(row)
    table = torch.tensor(rows, dtype=torch.int64)
    if device.type == "cuda":  # pinned, so the copy is queued on the stream without waiting for the GPU
        table = table.pin_memory().to(device, non_blocking=True)
    align = 16 if all(o % 16 == 0 for row in rows for o in row) else 1
    _tables[key] = (table, align)
    if len(_tables) > TABLE_CACHE:
        _tables.popitem(last=False)
    return table, align


def _signature(x: LayerInputs, out_dtype) -> tuple:
    """What one launch's layers must share."""
    return (x.weight.shape, x.weight.dtype, x.weight.device, x.bias is None, x.P.shape, x.P.dtype, x.s_std.numel(),
            x.s_rec.numel(), x.u is None, x.s_disc is None, x.std_dim, x.rec_threshold, x.u_dim, out_dtype)


def _tensors(x: LayerInputs) -> list:
    """The layer's tensors in compose_kernel.INPUT_FIELDS order, absent ones as empty tensors."""
    empty = x.weight.new_empty(0)
    return [empty if t is None else t for t in (x.weight, x.bias, x.P, x.s_std, x.s_rec, x.u, x.s_disc)]


def _columns(flat) -> list:
    """Per INPUT_FIELDS entry, its tensor of every layer (flat: the layers' INPUT_FIELDS tensors, one after another)."""
    k = len(INPUT_FIELDS)
    return [list(flat[f::k]) for f in range(k)]


class _EveryLayer(torch.autograd.Function):
    """Forward: W~ of each layer, then b~ of each layer (when there is one). `flat` holds the INPUT_FIELDS tensors
    of each layer, layer after layer."""

    @staticmethod
    def forward(ctx, n, std_dim, rec_threshold, u_dim, out_dtype, *flat):
        columns = _columns(flat)
        outs = [w.new_empty(w.shape, dtype=out_dtype) for w in columns[0]]
        table, align = offset_table(columns + [outs])
        _, out_b = compose_forward(*(col[0] for col in columns), std_dim, rec_threshold, out_dtype,
                                   kernels.FWD_BLOCK_C, kernels.FWD_WARPS, u_dim=u_dim, layers=n, table=table,
                                   align=align, out=outs[0])
        ctx.save_for_backward(*flat)
        ctx.n, ctx.std_dim, ctx.rec_threshold, ctx.u_dim = n, std_dim, rec_threshold, u_dim
        ctx.out_bias = out_b.numel() > 0
        return (*outs, *(out_b.view(n, -1).unbind(0) if ctx.out_bias else ()))

    @staticmethod
    def backward(ctx, *grads):
        n, flat = ctx.n, ctx.saved_tensors
        columns = _columns(flat)
        weight, bias, P, s_std, s_rec, u, s_disc = (col[0] for col in columns)
        G = list(grads[:n])
        if any(g.stride() != G[0].stride() for g in G):  # one launch reads every layer with layer 0's strides
            G = [g.contiguous() for g in G]
        Gb = [g.contiguous() for g in grads[n:]] if ctx.out_bias else [weight.new_empty(0)] * n
        dWs = [torch.empty_like(w) for w in columns[0]]
        table, align = offset_table(columns + [G, Gb, dWs])
        _, db, dP, d_std, d_rec, du, d_disc = compose_backward(
            G[0], Gb[0], weight, bias, P, s_std, s_rec, u, s_disc, ctx.std_dim, ctx.rec_threshold,
            kernels.BWD_BLOCK_C, kernels.BWD_WARPS, u_dim=ctx.u_dim, layers=n, table=table, align=align,
            dW=dWs[0])
        per_layer = [dWs,
                     db.view(n, -1).unbind(0) if bias.numel() else [None] * n,
                     dP.view(n, *P.shape).unbind(0),
                     per_gate(s_std, d_std.view(n, -1)).unbind(0),
                     per_gate(s_rec, d_rec.view(n, -1)).unbind(0),
                     du.view(n, *u.shape).unbind(0) if u.numel() else [None] * n,
                     per_gate(s_disc, d_disc.view(n, -1)).unbind(0) if s_disc.numel() else [None] * n]
        return (None,) * 5 + tuple(g[layer] for layer in range(n) for g in per_layer)


def compose_every_layer(layers: list, out_dtype: torch.dtype) -> list:
    """[(W~, b~ or None)] of every layer (LayerInputs), in out_dtype: one forward launch for all the layers that
    share a shape (and one backward when the gradient comes back). The gate roots are squared in the kernels."""
    groups = {}
    for i, x in enumerate(layers):
        groups.setdefault(_signature(x, out_dtype), []).append(i)
    composed = [None] * len(layers)
    for members in groups.values():
        first, n = layers[members[0]], len(members)
        flat = [t for i in members for t in _tensors(layers[i])]
        outs = _EveryLayer.apply(n, first.std_dim, first.rec_threshold, first.u_dim, out_dtype, *flat)
        for k, i in enumerate(members):
            composed[i] = (outs[k], outs[n + k] if len(outs) > n else None)
    return composed
