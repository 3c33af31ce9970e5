"""ra-unified: same-FLOP reciprocal attention emitted directly by one QKV GEMM.

Same formula as ra-same-flop. Every block of q~ and k~ is linear in the block input x
(q_h = W_q,h x + b_q,h, k_h = W_k,h x + b_k,h), so the weights are composed once per forward:
    q~_h rows: w_std W_q,h[:D_std]   ; w_rec P_h^T W_k,h ; (0                 with bias sqrt(D) w_disc)
    k~_h rows: W_k,h[:D_std]         ; P_h^T W_q,h       ; (u_h^T W_k,h       with bias u_h . b_k,h  )
    v rows   : W_v
biases likewise (w_std b_q[:D_std], w_rec P^T b_k, b_k[:D_std], P^T b_q, ...). Cost O(H D R C) per step,
no activation-sized multiplies, splits or cats: one GEMM of the baseline's shape (C -> 3C), then one
Flash call at head dim D. The reciprocal rows are P^T of the real key/query projections. In the tied
form (the default) P is zero below row D_std, so they read only W_q,h[:D_std] and W_k,h[:D_std], the rows
the standard term uses, and W~ has rank 2 D_std per head pair; the untied form's P reads every row, which
spans plain attention at head dim D (see same_flop.py and docs/attention.md).
"""

import math

import torch
import torch.nn.functional as F

from .compose_ops import LayerInputs, compose_qkv_fused
from .same_flop import RASameFlopAttention


class RAUnifiedAttention(RASameFlopAttention):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._cached = None  # (weight leaf, bias leaf or None) while composed weights are cached
        self._graph = None  # the composed (weight, bias) those leaves were detached from

    def composed_qkv(self):
        """(W~ (3C, C), b~ (3C,) or None) as described in the module doc, in the dtype the GEMM will use
        (autocast's, when it is on). On CUDA two Triton kernels (compose_kernel.py) do the work; elsewhere
        the plain torch code below, which computes the same thing."""
        W = self.c_attn.weight
        dtype = torch.get_autocast_dtype(W.device.type) if torch.is_autocast_enabled(W.device.type) else W.dtype
        if self.kernels_take(W):
            return compose_qkv_fused(W, self.c_attn.bias, self.projection(self.P.dtype), *self.gate_roots(), self.std_dim,
                                     self.head_select_threshold, dtype)
        weight, bias = self.composed_qkv_plain()
        return weight.to(dtype), (None if bias is None else bias.to(dtype))

    def kernel_inputs(self) -> LayerInputs:
        """This layer's composition inputs as the parameters hold them, for compose_every_layer: P with its
        stored rows (tied: D_std) and u whole, read only in its first D_std entries when tied."""
        s_std, s_rec, _, s_disc = self.gate_roots()
        return LayerInputs(self.c_attn.weight, self.c_attn.bias, self.P, s_std, s_rec,
                           self.u if self.discoverability else None, s_disc, self.std_dim, self.head_select_threshold,
                           self.std_dim if self.tied else self.head_dim)

    def gate_roots(self):
        """(s_std, s_rec, u, s_disc) as the kernels take them: the gates' square roots (w = s^2 is taken
        inside the kernel, which saves a small kernel per layer); u, s_disc are None without discoverability."""
        disc = self.discoverability
        return (self.w_std.sqrt_weight, self.w_rec.sqrt_weight, self.key_bias_vector() if disc else None,
                self.w_disc.sqrt_weight if disc else None)

    def composed_qkv_plain(self):
        """The composition in plain torch ops (CPU, and the check of the kernels)."""
        H, D, Ds, C = self.n_head, self.head_dim, self.std_dim, self.n_embd
        W = self.c_attn.weight
        W_qk = W[: 2 * C].view(2, H, D, C)
        P = self.projection(self.P.dtype)  # (H, D, R); tied: zero below row D_std
        w_std = self.w_std().view(H, 1, 1)
        w_rec = self.rec_gate().view(H, 1, 1)
        # rec = [P^T W_q, P^T W_k] (2, H, R, C). Compiled, it is written as a broadcast multiply-sum over D:
        # Inductor then emits a few fused kernels for the whole composition instead of extra GEMM calls
        # (which cost more than they compute at this size). Eager, one batched GEMM is cheaper.
        if torch.compiler.is_compiling():
            rec = (P.unsqueeze(-1) * W_qk.unsqueeze(3)).sum(2)
        else:
            rec = torch.matmul(P.transpose(1, 2), W_qk)
        q_rows = [w_std * W_qk[0, :, :Ds], w_rec * rec[1]]
        k_rows = [W_qk[1, :, :Ds], rec[0]]
        if self.discoverability:
            q_rows.append(W.new_zeros(H, 1, C))
            k_rows.append((self.key_bias_vector().unsqueeze(-1) * W_qk[1]).sum(1, keepdim=True))  # u_h^T W_k,h
        weight = torch.cat([torch.cat(q_rows, 1).view(C, C), torch.cat(k_rows, 1).view(C, C), W[2 * C:]])

        b = self.c_attn.bias
        if b is None and not self.discoverability:
            return weight, None
        if b is None:
            b = W.new_zeros(3 * C)
        b_qk = b[: 2 * C].view(2, H, D)
        rec_b = (P * b_qk.unsqueeze(-1)).sum(-2)  # (2, H, R): P^T b_q, P^T b_k
        q_b = [w_std[:, :, 0] * b_qk[0, :, :Ds], w_rec[:, :, 0] * rec_b[1]]
        k_b = [b_qk[1, :, :Ds], rec_b[0]]
        if self.discoverability:
            q_b.append((self.w_disc() * math.sqrt(D)).view(H, 1))
            k_b.append((self.key_bias_vector() * b_qk[1]).sum(-1, keepdim=True))
        bias = torch.cat([torch.cat(q_b, 1).view(C), torch.cat(k_b, 1).view(C), b[2 * C:]])
        return weight, bias

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """One GEMM of the baseline's shape emitting [q~ | k~ | v]."""
        weight, bias = self._cached if self._cached is not None else self.composed_qkv()
        return F.linear(x, weight, bias)

    def attention_heads(self, q, k, v):
        """q, k are already q~, k~ (head dim D): one causal SDPA call."""
        return self.attend(q, k, v)

    def cache_fold(self, q, k):
        """q, k are already q~, k~: the decode cache holds the GEMM's k~ as it comes."""
        return q, k

    # --- optional: compose once per optimizer step ---------------------------------------------
    def hold_composition(self, composed):
        """Use `composed` (W~, b~), as gradient-accumulating leaves, until release_composition()."""
        self._graph = composed
        self._cached = tuple(None if t is None else t.detach().requires_grad_() for t in composed)

    def release_composition(self):
        """[(composed tensor, its accumulated gradient)] to back-propagate through the composition."""
        pairs = [(full, leaf.grad) for full, leaf in zip(self._graph, self._cached)
                 if leaf is not None and leaf.grad is not None]
        self._cached, self._graph = None, None
        return pairs
