"""Small learned pieces shared by the reciprocal-attention backends.

Every extra parameter of the RA family (gates, P, u, alpha, the R-MLP mixer) is created through
`extra_parameter`, which marks it `no_weight_decay`: gpt2/optim.py never decays it, whatever its
dims (the mixer starts at identity and P with orthonormal columns; decay would pull them to 0).

Gates. Every gate w (w_std, w_rec, w_disc) is stored through its square root s and used as
    w = s^2.
So w >= 0 always, w = 0 is exactly representable (s = 0), and a gate that starts at 0 stays at 0
(dw/ds = 2s = 0 there): with CONFIG_ATTN_W_REC_INIT=0 the reciprocal term is off for the whole run,
which is what lets a full-width RA variant reproduce the baseline at initialisation (only there: w_std
stays a learned per-head temperature, so training can move it away). The fold never needs sqrt(w),
so no infinite gradient appears at w = 0.

Extra parameters (gates, P, u, alpha) never draw from the global torch RNG: gates and u start at
constants, and P comes from a private generator seeded by the layer index. The shared weights
(c_attn, c_proj, ...) therefore get the same random stream in every variant.
"""

import math

import torch
import torch.nn as nn

def extra_parameter(tensor: torch.Tensor) -> nn.Parameter:
    """An nn.Parameter marked `no_weight_decay = True` (read by gpt2.train.optim.param_groups)."""
    param = nn.Parameter(tensor)
    param.no_weight_decay = True
    return param


# Flash kernels want the head dimension to be a multiple of this; folded heads are zero-padded to it.
HEAD_DIM_MULTIPLE = 8


class Gate(nn.Module):
    """A non-negative weight per head (granularity "per-head") or one per layer ("per-layer")."""

    def __init__(self, n_head: int, granularity: str, init: float):
        super().__init__()
        if granularity not in ("per-head", "per-layer"):
            raise ValueError(f"CONFIG_ATTN_GATE={granularity!r} is unknown; choose per-head or per-layer")
        if init < 0:
            raise ValueError(f"gate init {init} must be >= 0")
        self.n_head = n_head
        self.init = float(init)
        self.sqrt_weight = extra_parameter(torch.empty(n_head if granularity == "per-head" else 1))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        self.sqrt_weight.fill_(math.sqrt(self.init))

    def forward(self) -> torch.Tensor:
        """w, shape (n_head,)."""
        return self.sqrt_weight.square().expand(self.n_head)


class SelfRestart(nn.Module):
    """out_h = (1 - alpha_h) * attn_h + alpha_h * v_h with alpha_h = 0.5 * sigmoid(a_h) in (0, 0.5)."""

    ALPHA_INIT = 0.05

    def __init__(self, n_head: int):
        super().__init__()
        self.alpha_logit = extra_parameter(torch.empty(n_head))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        a = 2 * self.ALPHA_INIT  # sigmoid(logit) = 2 * alpha
        self.alpha_logit.fill_(math.log(a / (1 - a)))

    def alpha(self) -> torch.Tensor:
        return 0.5 * torch.sigmoid(self.alpha_logit)

    def forward(self, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """y, v: (B, H, T, D)."""
        alpha = self.alpha().to(y.dtype).view(1, -1, 1, 1)
        return torch.lerp(y, v, alpha)  # y + alpha (v - y) = (1 - alpha) y + alpha v


def private_generator(layer_idx: int, tag: int) -> torch.Generator:
    """A CPU generator that depends only on (layer, tag): never touches the global RNG."""
    return torch.Generator(device="cpu").manual_seed(0x5EED_0000 + 1009 * layer_idx + tag)


def orthonormal_columns(n_head: int, head_dim: int, rank: int, generator: torch.Generator) -> torch.Tensor:
    """(n_head, head_dim, rank), each head's P with orthonormal columns (P P^T is a projector).

    With P orthonormal, (P^T k_i).(P^T q_j) is the full-rank reciprocal score k_i.q_j restricted to a
    random rank-R subspace, so the low-rank term starts on the same scale as the full one.
    """
    gauss = torch.randn(n_head, head_dim, rank, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)
    # Fix the sign ambiguity of QR so the result is unique.
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    return q.float()


def fold_cat(pieces: list) -> torch.Tensor:
    """Concatenate head-dim pieces (..., d_i) in one copy, zero-padding to a multiple of 8."""
    width = sum(p.shape[-1] for p in pieces)
    pad = -width % HEAD_DIM_MULTIPLE
    if pad:
        ref = pieces[0]
        pieces = list(pieces) + [ref.new_zeros(()).expand(*ref.shape[:-1], pad)]
    return torch.cat(pieces, dim=-1)
