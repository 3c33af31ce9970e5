"""Optimizers and the budget-driven learning-rate schedule."""

import math

import pytest
import torch

from gpt2.model.gpt import GPT
from gpt2.train.optim import AdamWSpam, build_optimizer, lr_at, param_groups
from gpt2.settings import AttentionSettings, KVPruningSettings, MLPSettings, ModelSettings, OptimizerSettings, TrainSettings
from test_attention_helpers import attn_settings, kv_settings, mlp_settings, model_settings


def tiny_model():
    settings = ModelSettings(size="custom", n_layer=2, n_head=2, n_embd=16, block_size=8, dropout=0.0, bias=True,
                             tie_weights=True, init_from="scratch", hf_checkpoint_dir="")
    return GPT(settings, AttentionSettings(), MLPSettings(), KVPruningSettings(), 50, seed=0)


def opt_settings(name="adamw", **kw):
    fields = dict(name=name, beta1=0.9, beta2=0.95, weight_decay=0.1, spam_theta=5000.0, spam_reset_interval=500,
                  spam_warmup=150)
    fields.update(kw)
    return OptimizerSettings(**fields)


def train_settings(**kw):
    fields = dict(batch_size=1, grad_accum=1, lr=1e-3, lr_min=1e-4, warmup_fraction=0.1, schedule="cosine",
                  max_iters=100, max_time_s=0, grad_clip=1.0, eval_interval=10, eval_batches=1, log_interval=1,
                  checkpoint_interval=0, num_gpus=1, inject_nan_at_iter=0)
    fields.update(kw)
    return TrainSettings(**fields)


def test_param_groups_decay_matrices_only():
    model = tiny_model()
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))  # tied weight once
    assert any(p is model.transformer.wte.weight for p in decay["params"])  # nanoGPT: embeddings decay


@pytest.mark.parametrize("backend", ["ra-fold-lowrank", "ra-same-flop", "ra-unified"])
def test_ra_extras_are_never_weight_decayed(backend):
    """P, u, the R-MLP mixer, gates and alpha are marked no_weight_decay; the shared matrices still decay."""
    model = GPT(model_settings(n_embd=16, n_head=2, n_layer=2), attn_settings(backend, disc=True, restart=True),
                mlp_settings("reciprocal", rff=4, mixer=True, gates=True), kv_settings(), 50, seed=0)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    extras = {n for n in kept if n.endswith((".P", ".u", ".mixer", "sqrt_weight", "alpha_logit"))}
    assert {n.rsplit(".", 1)[-1] for n in extras} >= {"P", "u", "mixer", "sqrt_weight", "alpha_logit"}
    assert all(p.dim() >= 2 for n, p in model.named_parameters() if n.endswith((".P", ".u", ".mixer")))
    assert not any(n.endswith((".P", ".u", ".mixer")) for n in decayed)
    assert "transformer.h.0.attn.c_attn.weight" in decayed and "transformer.h.0.mlp.c_fc.weight" in decayed
    # The mark survives a dtype move, and the optimizer really leaves the mixer alone at lr 0 + decay.
    model.double()
    mixer = model.transformer.h[0].mlp.mixer
    assert getattr(mixer, "no_weight_decay", False)
    opt = torch.optim.AdamW(param_groups(model, 0.5), lr=1.0)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before_mixer, before_w = mixer.detach().clone(), model.transformer.h[0].attn.c_attn.weight.detach().clone()
    opt.step()
    torch.testing.assert_close(mixer.detach(), before_mixer)  # zero gradient, no decay: unchanged
    torch.testing.assert_close(model.transformer.h[0].attn.c_attn.weight.detach(), before_w * 0.5)


def test_build_optimizer_kinds():
    model = tiny_model()
    assert isinstance(build_optimizer(model, opt_settings(), 1e-3, "cpu"), torch.optim.AdamW)
    assert isinstance(build_optimizer(model, opt_settings("adamw-spam"), 1e-3, "cpu"), AdamWSpam)
    with pytest.raises(ValueError, match="adamw-spam"):
        build_optimizer(model, opt_settings("sgd"), 1e-3, "cpu")


def _run(opt_cls, grads, **kw):
    p = torch.nn.Parameter(torch.ones(4))
    opt = opt_cls([{"params": [p], "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.95), **kw)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach().clone(), opt


def test_spam_without_clipping_or_resets_is_adamw():
    grads = [torch.randn(4, generator=torch.Generator().manual_seed(i)) for i in range(20)]
    ours, _ = _run(AdamWSpam, grads, theta=0.0, reset_interval=0, warmup_steps=0)
    reference, _ = _run(torch.optim.AdamW, grads, eps=1e-8)
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-7)


def test_spam_clips_spikes_to_theta_times_second_moment():
    theta = 4.0
    p = torch.nn.Parameter(torch.zeros(2))
    opt = AdamWSpam([p], lr=0.0, betas=(0.9, 0.95), theta=theta, reset_interval=0)
    p.grad = torch.tensor([1.0, 1.0])
    opt.step()  # first step: no history, nothing clipped
    v = opt.state[p]["exp_avg_sq"].clone()
    torch.testing.assert_close(v, torch.full((2,), 0.05))
    p.grad = torch.tensor([100.0, -0.1])  # entry 0: g^2 = 1e4 > theta * v = 0.2 -> spike
    opt.step()
    bound = math.sqrt(theta * 0.05)
    clipped = torch.tensor([bound, -0.1])
    torch.testing.assert_close(opt.state[p]["exp_avg_sq"], 0.95 * v + 0.05 * clipped**2)
    torch.testing.assert_close(opt.state[p]["exp_avg"], 0.9 * 0.1 * torch.ones(2) + 0.1 * clipped)


def test_spam_resets_moments_and_warms_up():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = AdamWSpam([p], lr=1.0, betas=(0.9, 0.95), theta=0.0, reset_interval=5, warmup_steps=4)
    for _ in range(12):
        p.grad = torch.ones(3)
        opt.step()
        if opt.param_groups[0]["updates"] == 6:  # first update after the reset at 5
            assert opt.state[p]["step"] == 1
            torch.testing.assert_close(opt.state[p]["exp_avg_sq"], torch.full((3,), 0.05))
    group = opt.param_groups[0]
    assert group["resets"] == 2 and group["updates"] == 12
    # Cosine warm-up after a reset: factor at the k-th update since the reset is 0.5 (1 - cos(pi (k+1)/4)).
    p2 = torch.nn.Parameter(torch.zeros(1))
    opt2 = AdamWSpam([p2], lr=1.0, theta=0.0, reset_interval=5, warmup_steps=4)
    opt2.param_groups[0].update(updates=5, resets=1)
    assert opt2.lr_factor(opt2.param_groups[0]) == pytest.approx(0.5 * (1 - math.cos(math.pi / 4)))
    opt2.param_groups[0].update(updates=8)
    assert opt2.lr_factor(opt2.param_groups[0]) == pytest.approx(1.0)
    opt2.param_groups[0].update(resets=0, updates=3)
    assert opt2.lr_factor(opt2.param_groups[0]) == 1.0  # no warm-up before the first reset


def test_spam_state_dict_round_trip():
    grads = [torch.randn(4, generator=torch.Generator().manual_seed(i)) for i in range(7)]
    _, opt = _run(AdamWSpam, grads, theta=10.0, reset_interval=3, warmup_steps=2)
    p = torch.nn.Parameter(torch.ones(4))
    fresh = AdamWSpam([{"params": [p], "weight_decay": 0.1}], lr=1e-2)
    fresh.load_state_dict(opt.state_dict())
    g = fresh.param_groups[0]
    assert (g["updates"], g["resets"], g["theta"], g["reset_interval"]) == (7, 2, 10.0, 3)


def test_lr_schedule_shapes():
    t = train_settings()
    assert lr_at(0.0, t) == 0.0
    assert lr_at(0.05, t) == pytest.approx(5e-4)
    assert lr_at(0.1, t) == pytest.approx(1e-3)
    assert lr_at(0.55, t) == pytest.approx(5.5e-4)  # cosine midpoint
    assert lr_at(1.0, t) == pytest.approx(1e-4) and lr_at(1.5, t) == pytest.approx(1e-4)
    lin = train_settings(schedule="linear", warmup_fraction=0.0)
    assert lr_at(0.0, lin) == pytest.approx(1e-3) and lr_at(0.25, lin) == pytest.approx(7.75e-4)
    const = train_settings(schedule="constant")
    assert lr_at(0.9, const) == 1e-3
    values = [lr_at(i / 100, t) for i in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay after warm-up
