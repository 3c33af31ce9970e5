"""Optimizers (AdamW, AdamW-SPAM) and the budget-driven learning-rate schedule.

Weight decay follows nanoGPT: every parameter with dim >= 2 (weight matrices, embeddings)
decays; biases, LayerNorm gains and gates (dim < 2) do not. Nor does any parameter marked
`no_weight_decay = True` (the RA extras: P, u, the R-MLP mixer, gates; see gpt2/attention/gates.py
extra_parameter), whatever its dims: they start at meaningful values (identity, orthonormal columns)
that decay would pull to 0.
"""

import math

import torch

from gpt2.settings import OptimizerSettings, TrainSettings

ADAM_EPS = 1e-8


def param_groups(model: torch.nn.Module, weight_decay: float) -> list:
    params = [p for p in model.parameters() if p.requires_grad]  # unique: a tied weight appears once
    decays = [p.dim() >= 2 and not getattr(p, "no_weight_decay", False) for p in params]
    decay = [p for p, d in zip(params, decays) if d]
    no_decay = [p for p, d in zip(params, decays) if not d]
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def build_optimizer(model: torch.nn.Module, opt: OptimizerSettings, lr: float, device_type: str):
    groups = param_groups(model, opt.weight_decay)
    betas = (opt.beta1, opt.beta2)
    if opt.name == "adamw":
        # fused: one kernel launch for all parameters; foreach on the CPU.
        fused = device_type == "cuda"
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=ADAM_EPS, fused=fused, foreach=None if fused else True)
    if opt.name == "adamw-spam":
        return AdamWSpam(groups, lr=lr, betas=betas, eps=ADAM_EPS, theta=opt.spam_theta,
                         reset_interval=opt.spam_reset_interval, warmup_steps=opt.spam_warmup)
    raise ValueError(f"CONFIG_OPTIMIZER={opt.name!r} is unknown; choose adamw or adamw-spam")


class AdamWSpam(torch.optim.Optimizer):
    """AdamW with spike-aware clipping and periodic moment resets (after SPAM, Huang et al. 2025).

    Per parameter entry, with g the gradient, m/v the moments, k the updates since the last reset:

      spike clip   if k > 0 and g^2 > theta * v:   g <- sign(g) * sqrt(theta * v)
                   (v is the raw, not bias-corrected, second moment of the previous step; with k = 0
                   there is no history, so nothing is clipped)
      AdamW        p <- p * (1 - lr_t * wd)
                   m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
                   p <- p - lr_t * (m / (1 - b1^(k+1))) / (sqrt(v / (1 - b2^(k+1))) + eps)
      reset        after every `reset_interval` updates: m, v <- 0 and k <- 0 (bias correction restarts)
      warm-up      after a reset (not at the very start, which the main schedule already warms up):
                   lr_t = lr * 0.5 * (1 - cos(pi * min(1, (k + 1) / warmup_steps)))
    """

    def __init__(self, params, lr, betas=(0.9, 0.95), eps=ADAM_EPS, theta=5000.0, reset_interval=500,
                 warmup_steps=150):
        if theta < 0 or reset_interval < 0 or warmup_steps < 0:
            raise ValueError("SPAM theta, reset interval and warm-up must be non-negative")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=0.0, theta=theta, reset_interval=reset_interval,
                        warmup_steps=warmup_steps, updates=0, resets=0)
        super().__init__(params, defaults)

    def lr_factor(self, group) -> float:
        """The post-reset warm-up multiplier for the coming update."""
        if group["resets"] == 0 or group["warmup_steps"] == 0:
            return 1.0
        k = group["updates"] % group["reset_interval"] if group["reset_interval"] else group["updates"]
        return 0.5 * (1.0 - math.cos(math.pi * min(1.0, (k + 1) / group["warmup_steps"])))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            interval = group["reset_interval"]
            if interval and group["updates"] > 0 and group["updates"] % interval == 0:
                for p in group["params"]:
                    state = self.state.get(p)
                    if state:
                        state["exp_avg"].zero_()
                        state["exp_avg_sq"].zero_()
                        state["step"] = 0
                group["resets"] += 1
            lr = group["lr"] * self.lr_factor(group)
            theta, wd, eps = group["theta"], group["weight_decay"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                if theta > 0 and state["step"] > 0:
                    bound = (v * theta).sqrt_()
                    g = torch.maximum(torch.minimum(g, bound), -bound)
                state["step"] += 1
                k = state["step"]
                if wd:
                    p.mul_(1.0 - lr * wd)
                m.lerp_(g, 1.0 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
                denom = (v / (1.0 - beta2 ** k)).sqrt_().add_(eps)
                p.addcdiv_(m, denom, value=-lr / (1.0 - beta1 ** k))
            group["updates"] += 1
        return loss


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def lr_at(progress: float, train: TrainSettings) -> float:
    """Learning rate at `progress`, the fraction of the budget consumed (0..1).

        warm-up   progress < w:   lr * progress / w
        decay     t = (progress - w) / (1 - w)
                  cosine:    lr_min + (lr - lr_min) * 0.5 * (1 + cos(pi t))
                  linear:    lr - (lr - lr_min) * t
                  constant:  lr
    """
    p = min(max(progress, 0.0), 1.0)
    w = train.warmup_fraction
    if p < w:
        return train.lr * p / w
    t = (p - w) / (1.0 - w) if w < 1.0 else 1.0
    if train.schedule == "cosine":
        return train.lr_min + (train.lr - train.lr_min) * 0.5 * (1.0 + math.cos(math.pi * t))
    if train.schedule == "linear":
        return train.lr - (train.lr - train.lr_min) * t
    if train.schedule == "constant":
        return train.lr
    raise ValueError(f"CONFIG_TRAIN_SCHEDULE={train.schedule!r} is unknown; choose cosine, linear or constant")
