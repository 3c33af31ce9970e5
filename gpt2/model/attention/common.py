"""Plumbing shared by every attention backend: projections, the attention call, self-restart, heads.

Shapes: B batch, T tokens, C = n_embd, H heads, D = C / H head dim. Per-head tensors are (B, H, T, D).
The softmax scale is always 1 / sqrt(D) of the real head dim, also for folded heads that are wider
(2D, D + R, ...): the fold only reorganises the sum q~ . k~, it must not change the temperature.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2.settings import AttentionSettings, KVPruningSettings, ModelSettings

from .. import kv_pruning
from .cache import LayerCache, attend_rows
from .gates import Gate, SelfRestart, extra_parameter

# w_disc starts at 1 and u at 0: the bias is off at init (d_j = 0) yet u receives gradient.
W_DISC_INIT = 1.0


class AttentionBase(nn.Module):
    """c_attn (C -> 3C, columns [q | k | v]), c_proj (C -> C), optional KV pruning and self-restart."""

    def __init__(self, model: ModelSettings, attn: AttentionSettings, kv: KVPruningSettings, layer_idx: int):
        super().__init__()
        self.n_head = model.n_head
        self.n_embd = model.n_embd
        self.head_dim = model.head_dim  # ValueError when the width is not a multiple of the head count
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.layer_idx = layer_idx
        self.c_attn = nn.Linear(model.n_embd, 3 * model.n_embd, bias=model.bias)
        self.c_proj = nn.Linear(model.n_embd, model.n_embd, bias=model.bias)
        self.attn_dropout = model.dropout
        self.resid_dropout = nn.Dropout(model.dropout)
        self.kv = kv if kv.enabled else None
        self.restart = SelfRestart(model.n_head) if attn.self_restart else None

    def reset_extra_parameters(self):
        """Re-initialise every parameter that is not a shared (by-name initialised) weight."""
        if self.restart is not None:
            self.restart.reset_parameters()

    def gate_values(self) -> dict:
        """The attention gates, for metrics ({} without gates; the RA backends override)."""
        return {}

    def regularization_loss(self):
        """A term added to the objective once per optimizer step (None without one; the RA backends override)."""
        return None

    def zero_unused_weights(self) -> None:
        """Zero the c_attn entries this backend never reads (none here; tied same-FLOP RA overrides)."""

    def unused_weight_count(self) -> int:
        """How many c_attn entries this backend never reads (not counted as parameters)."""
        return 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split_heads(self.project(x))  # (B, H, T, D) each
        return self.finish(self.attention_heads(q, k, v), v)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, T, 3C) = [q | k | v]; ra-unified replaces it by its composed GEMM."""
        return self.c_attn(x)

    def attention_heads(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The backend's attention proper: per-head q, k, v (B, H, T, D) -> (B, H, T, D)."""
        return self.attend(q, k, v)

    def split_heads(self, qkv: torch.Tensor):
        """(B, T, 3C) -> q, k, v each (B, H, T, D) (strided views, no copy)."""
        B, T, _ = qkv.shape
        return qkv.view(B, T, 3, self.n_head, -1).permute(2, 0, 3, 1, 4).unbind(0)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention with logits scale * q . k; q/k may be wider than v. -> (B, H, T, Dv)."""
        dropout_p = self.attn_dropout if self.training else 0.0
        if self.kv is not None:
            return kv_pruning.pruned_attention(q, k, v, self.scale, self.kv, dropout_p)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, scale=self.scale)

    def finish(self, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Self-restart, merge heads, output projection: (B, H, T, D) -> (B, T, C)."""
        if self.restart is not None:
            y = self.restart(y, v)
        B, H, T, D = y.shape
        y = y.transpose(1, 2).reshape(B, T, H * D)
        return self.resid_dropout(self.c_proj(y))

    # --- incremental decoding (cache.py): the rows of new tokens, equal to forward()'s ---------------------
    def forward_cached(self, x: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        """x (B, T, C) holds the T tokens after the cache's; -> (B, T, C), forward()'s rows for them (eval: no
        dropout). The cache grows by the T tokens."""
        q, k, v = self.split_heads(self.project(x))
        return self.finish(self.cached_heads(q, k, v, cache), v)

    def cache_fold(self, q: torch.Tensor, k: torch.Tensor):
        """Per-token (q~, k~) with L_ij = q~_i . k~_j * scale: plain attention's q, k (RA backends fold)."""
        return q, k

    def cached_heads(self, q, k, v, cache: LayerCache) -> torch.Tensor:
        """attention_heads() for the new tokens' rows: fold, append k~ and v to the cache, attend. -> (B, H, T, D)"""
        start = cache.length
        q, k = self.cache_fold(q, k)
        keys, values = cache.extend(keys=k, values=v)
        if self.kv is None:
            return attend_rows(q, keys, values, start, self.scale)
        dt = torch.promote_types(q.dtype, torch.float32)  # pruned_attention's logits
        return self.pruned_rows((q.to(dt) @ keys.to(dt).transpose(-1, -2)) * self.scale, values, cache, start)

    def pruned_rows(self, logits, values, cache: LayerCache, start: int) -> torch.Tensor:
        """KV-pruned attention of the rows start.. from their logits (B, H, T, start + T); keeps `received`."""
        y, cache.received = kv_pruning.pruned_attention_rows(logits, values, self.kv, cache.received, start)
        return y


class RAAttentionBase(AttentionBase):
    """Adds the RA gates, the discoverability bias and head-selective routing.

    Logits of head h (S_ij = q_i . k_j / sqrt(D), j <= i):
        L_ij = w_std,h S_ij + w_rec,h S^rec_ij + w_disc,h d_j,     d_j = k_j . u_h
    where S^rec is the reciprocal score of the backend's formula (S_ji for full rank).
    """

    def __init__(self, model: ModelSettings, attn: AttentionSettings, kv: KVPruningSettings, layer_idx: int):
        super().__init__(model, attn, kv, layer_idx)
        H = model.n_head
        self.w_std = Gate(H, attn.gate_granularity, attn.w_std_init)
        self.w_rec = Gate(H, attn.gate_granularity, attn.w_rec_init)
        self.discoverability = attn.discoverability
        if attn.discoverability:
            self.w_disc = Gate(H, attn.gate_granularity, W_DISC_INIT)
            self.u = extra_parameter(torch.zeros(H, self.head_dim))  # never weight-decayed
        self.head_select_threshold = attn.head_select_threshold
        self.w_rec_l1 = attn.w_rec_l1
        # Heads that take the RA path, as a Python tuple (a static shape for torch.compile); None = all.
        self.routed_heads = None
        self.refresh_head_routing()

    def reset_extra_parameters(self):
        super().reset_extra_parameters()
        self.w_std.reset_parameters()
        self.w_rec.reset_parameters()
        if self.discoverability:
            self.w_disc.reset_parameters()
            with torch.no_grad():
                self.u.zero_()
        self.refresh_head_routing()

    # --- reporting and regularisation -------------------------------------------------------
    @torch.no_grad()
    def gate_values(self) -> dict:
        return {"w_std": self.w_std().float().cpu().tolist(), "w_rec": self.w_rec().float().cpu().tolist()}

    def regularization_loss(self) -> torch.Tensor | None:
        """CONFIG_ATTN_W_REC_L1 * sum_h |w_rec,h| (w_rec >= 0, so the sum itself). Summed over the H heads also
        with a per-layer gate, where all H heads share one w_rec: the penalty is H w_rec, as documented."""
        if self.w_rec_l1 == 0:  # None, not a zero tensor: no eager adds and backward work on every step
            return None
        return self.w_rec_l1 * self.w_rec().sum()

    # --- head-selective routing -------------------------------------------------------------
    def rec_gate(self) -> torch.Tensor:
        """w_rec with routed-off heads (w_rec < threshold) set to exactly 0. (H,)"""
        w_rec = self.w_rec()
        if self.head_select_threshold > 0:
            w_rec = torch.where(w_rec >= self.head_select_threshold, w_rec, torch.zeros_like(w_rec))
        return w_rec

    @torch.no_grad()
    def refresh_head_routing(self) -> bool:
        """Recompute which heads take the RA path (a host sync). Returns whether the set changed.

        Eager forwards call it every step. Under torch.compile the set is a guarded constant: the trainer
        refreshes it now and then (GPT.refresh_routing, gpt2/model/attention/hooks.py), and a change recompiles.
        """
        if self.head_select_threshold <= 0:
            new = None
        else:
            on = (self.w_rec() >= self.head_select_threshold).tolist()
            new = tuple(h for h, flag in enumerate(on) if flag)
            if len(new) == self.n_head:
                new = None
        changed = new != self.routed_heads
        self.routed_heads = new
        return changed

    def current_routing(self):
        if (self.head_select_threshold > 0 and not torch.compiler.is_compiling()
                and not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())):
            self.refresh_head_routing()
        return self.routed_heads

    def head_gates(self, dtype, idx=None):
        """w_std, w_rec as (1, h, 1, 1) in dtype for the heads idx (None = all)."""
        w_std, w_rec = self.w_std(), self.w_rec()
        if idx is not None:
            w_std, w_rec = w_std.index_select(0, idx), w_rec.index_select(0, idx)
        return w_std.to(dtype).view(1, -1, 1, 1), w_rec.to(dtype).view(1, -1, 1, 1)

    def fold(self, q, k, idx, reciprocal: bool):
        """(q~, k~) for the heads idx (q, k already restricted to them). Backends that route define it."""
        raise NotImplementedError

    # Backends whose attention_heads is attend_routed (the folds): routing runs through forward_routed.
    routes_heads = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ra_heads = self.current_routing() if self.routes_heads and self.kv is None and self.restart is None else None
        if ra_heads is None:
            return super().forward(x)
        return self.forward_routed(x, ra_heads)

    def forward_routed(self, x: torch.Tensor, ra_heads: tuple) -> torch.Tensor:
        """forward() with the heads split into a plain group and an RA group by permuting weights, not
        activations. attend_routed gathers q, k, v of each group and scatters y back: ~3 activation-sized
        copies per group, which made 6 of 12 routed heads cost more than 12 RA heads. Here c_attn's rows
        are gathered into the order o = (plain heads, RA heads), so the GEMM emits the heads grouped and each
        group is a view of it; y, in order o, meets c_proj's columns gathered the same way:
            y_o @ W_proj[:, o]^T = y @ W_proj^T        (a permutation of the summed-over columns)
        The gathers touch weights (C x 3C and C x C) only. Without self-restart and KV pruning, whose
        per-head state is in head order (they take attend_routed)."""
        H, D = self.n_head, self.head_dim
        plain_heads = tuple(h for h in range(H) if h not in ra_heads)
        order = torch.tensor(plain_heads + tuple(ra_heads), device=x.device)
        columns = (order.view(H, 1) * D + torch.arange(D, device=x.device)).view(-1)  # head blocks of C
        rows = torch.cat([columns + part * self.n_embd for part in range(3)])  # of [q | k | v]
        bias = self.c_attn.bias
        bias = None if bias is None else bias.index_select(0, rows)
        qkv = F.linear(x, self.c_attn.weight.index_select(0, rows), bias)
        q, k, v = self.split_heads(qkv)
        n = len(plain_heads)
        y = []
        for lo, hi, heads, reciprocal in ((0, n, plain_heads, False), (n, H, ra_heads, True)):
            if lo < hi:
                idx = torch.tensor(heads, device=x.device)
                y.append(self.attend(*self.fold(q[:, lo:hi], k[:, lo:hi], idx, reciprocal), v[:, lo:hi]))
        y = torch.cat(y, dim=1) if len(y) > 1 else y[0]
        B, _, T, _ = y.shape
        y = y.transpose(1, 2).reshape(B, T, H * D)
        return self.resid_dropout(F.linear(y, self.c_proj.weight.index_select(1, columns), self.c_proj.bias))

    def attend_routed(self, q, k, v):
        """Attention over folded heads. With routing on, RA heads and plain heads (reciprocal part dropped)
        run as two packed calls, reassembled in head order. -> (B, H, T, Dv)"""
        ra_heads = self.current_routing()
        if ra_heads is None:
            return self.attend(*self.fold(q, k, None, True), v)
        plain_heads = tuple(h for h in range(self.n_head) if h not in ra_heads)
        outputs, order = [], []
        for heads, reciprocal in ((plain_heads, False), (ra_heads, True)):
            if not heads:
                continue
            idx = torch.tensor(heads, device=q.device)
            pick = lambda t: t.index_select(1, idx)  # noqa: E731
            outputs.append(self.attend(*self.fold(pick(q), pick(k), idx, reciprocal), pick(v)))
            order.extend(heads)
        y = torch.cat(outputs, dim=1)
        inverse = torch.tensor(sorted(range(self.n_head), key=lambda h: order[h]), device=q.device)
        return y.index_select(1, inverse)

    def cache_fold(self, q, k):
        """(q~, k~) of every head at one width, for the decode cache (backends that define fold()). With routing,
        the plain heads' fold (q~ = w_std q (+ bias), k~ = k) is zero-padded to the RA heads' width: the zeros
        add nothing to q~ . k~, so the logits are attend_routed's."""
        ra_heads = self.current_routing()
        if ra_heads is None:
            return self.fold(q, k, None, True)
        plain_heads = tuple(h for h in range(self.n_head) if h not in ra_heads)
        groups, order = [], []
        for heads, reciprocal in ((plain_heads, False), (ra_heads, True)):
            if heads:
                idx = torch.tensor(heads, device=q.device)
                groups.append(self.fold(q.index_select(1, idx), k.index_select(1, idx), idx, reciprocal))
                order.extend(heads)
        width = max(q_t.shape[-1] for q_t, _ in groups)
        q_t, k_t = (torch.cat([F.pad(g[i], (0, width - g[i].shape[-1])) for g in groups], dim=1) for i in (0, 1))
        inverse = torch.tensor(sorted(range(self.n_head), key=lambda h: order[h]), device=q.device)
        return q_t.index_select(1, inverse), k_t.index_select(1, inverse)

    # --- discoverability fold ----------------------------------------------------------------
    def std_query(self, q: torch.Tensor, w_std: torch.Tensor, idx=None) -> torch.Tensor:
        """The standard part of q~ when k~ holds the full key k: w_std q_i (+ sqrt(D) w_disc u_h).

        d_j = k_j . u_h is linear in k_j, so the bias rides on the standard dims at no extra width:
            (w_std q_i + sqrt(D) w_disc u_h) . k_j / sqrt(D) = w_std S_ij + w_disc d_j.
        Gradients reach u, w_disc and (through k~) k exactly as in the formula. One fused multiply-add.
        """
        if not self.discoverability:
            return q * w_std
        u, w_disc = self.u, self.w_disc()
        if idx is not None:
            u, w_disc = u.index_select(0, idx), w_disc.index_select(0, idx)
        shift = (math.sqrt(self.head_dim) * w_disc.unsqueeze(-1) * u).to(q.dtype).unsqueeze(1)  # (1, h, 1, D)
        return torch.addcmul(shift, q, w_std)

    def key_bias_vector(self) -> torch.Tensor:
        """u (H, D): d_j = k_j . u_h. Tied same-FLOP RA overrides it to read only the standard dims."""
        return self.u

    def disc_columns(self, k: torch.Tensor):
        """The bias as one extra head dim, for backends whose k~ lacks the full key (same-flop, unified):
        (query column, key column), each (B, H, T, 1).

        Query side carries the constant sqrt(D) w_disc,h, key side d_j = k_j . u_h (gradient flows to
        both u and k); times the softmax scale 1/sqrt(D) this adds exactly w_disc,h d_j to L_ij.
        """
        B, H, T, _ = k.shape
        d = (k * self.key_bias_vector().to(k.dtype).unsqueeze(1)).sum(-1, keepdim=True)  # (B, H, T, 1)
        c = (self.w_disc() * math.sqrt(self.head_dim)).to(k.dtype).view(1, H, 1, 1).expand(B, H, T, 1)
        return c, d
