"""Feed-forward blocks: the standard GPT-2 MLP and the reciprocal MLP (R-MLP)."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2.settings import MLPSettings, ModelSettings

from .attention.gates import Gate, extra_parameter


class MLP(nn.Module):
    """Standard GPT-2 MLP: c_proj(GELU_tanh(c_fc(x))), hidden D_ff = expansion * C."""

    def __init__(self, model: ModelSettings, mlp: MLPSettings):
        super().__init__()
        hidden = mlp.expansion * model.n_embd
        self.c_fc = nn.Linear(model.n_embd, hidden, bias=model.bias)
        self.c_proj = nn.Linear(hidden, model.n_embd, bias=model.bias)
        self.dropout = nn.Dropout(model.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class ReciprocalMLP(MLP):
    """R-MLP. With D_ff = expansion * C, R_ff = CONFIG_MLP_RA_RFF, D_s = D_ff - R_ff:

        h_std = GELU(W_s x)            (D_s units,  W_s = c_fc rows [0, D_s))
        h_low = GELU(W_l x)            (R_ff units, W_l = c_fc rows [D_s, D_ff))
        h_low <- M h_low               (mixer, a learned R_ff x R_ff map, starts at identity)
        y = c_proj([w_std h_std ; w_rec h_low])    (gates >= 0, start at 1)

    W_s and W_l are row blocks of one c_fc, so it is one GEMM and HF checkpoints still load. The mixer
    and gates act linearly between GELU and c_proj, so they are composed into c_proj's weight once per
    forward,  W' = [w_std W_p[:, :D_s] , w_rec W_p[:, D_s:] M],  and the block costs what the standard
    MLP costs. With mixer and gates off (or at their initial values) it equals the standard MLP.
    """

    def __init__(self, model: ModelSettings, mlp: MLPSettings):
        super().__init__(model, mlp)
        hidden = mlp.expansion * model.n_embd
        mlp.check_reciprocal_ff(model.n_embd)
        self.reciprocal_ff = mlp.reciprocal_ff
        self.std_ff = hidden - mlp.reciprocal_ff
        # Starts at identity; never weight-decayed (decay would pull it to 0, switching the low units off).
        self.mixer = extra_parameter(torch.empty(mlp.reciprocal_ff, mlp.reciprocal_ff)) if mlp.mixer else None
        self.w_std = Gate(1, "per-layer", 1.0) if mlp.gates else None
        self.w_rec = Gate(1, "per-layer", 1.0) if mlp.gates else None
        self.reset_extra_parameters()

    @torch.no_grad()
    def reset_extra_parameters(self):
        if self.mixer is not None:
            self.mixer.copy_(torch.eye(self.reciprocal_ff))
        if self.w_std is not None:
            self.w_std.reset_parameters()
            self.w_rec.reset_parameters()

    @torch.no_grad()
    def reciprocal_gate_values(self) -> dict:
        if self.w_std is None:
            return {}
        return {"w_std": self.w_std().item(), "w_rec": self.w_rec().item()}

    def composed_proj_weight(self) -> torch.Tensor:
        """W' (C, D_ff) = [w_std W_p[:, :D_s], w_rec W_p[:, D_s:] M]."""
        W = self.c_proj.weight
        if self.mixer is None and self.w_std is None:
            return W
        W_std, W_low = W[:, : self.std_ff], W[:, self.std_ff:]
        if self.mixer is not None:
            W_low = W_low @ self.mixer
        if self.w_std is not None:
            W_std, W_low = W_std * self.w_std(), W_low * self.w_rec()
        return torch.cat([W_std, W_low], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.c_fc(x), approximate="tanh")  # [h_std | h_low]
        return self.dropout(F.linear(h, self.composed_proj_weight(), self.c_proj.bias))


def build_mlp(model: ModelSettings, mlp: MLPSettings) -> nn.Module:
    """The MLP of one block: (B, T, C) -> (B, T, C)."""
    if mlp.kind == "standard":
        return MLP(model, mlp)
    if mlp.kind == "reciprocal":
        return ReciprocalMLP(model, mlp)
    raise ValueError(f"CONFIG_MLP={mlp.kind!r} is unknown; choose standard or reciprocal")
