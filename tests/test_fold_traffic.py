"""bench/fold_traffic.py, the "sdpa+fold-traffic" floor variant: it must change nothing but the bytes moved.

The model-level test runs everywhere (the torch copies on CPU, the kernels under TRITON_INTERPRET=1 or on
CUDA); the kernel test needs Triton (make test-kernels runs it through the interpreter).
"""

import pytest
import torch

import bench.fold_traffic as ft
from bench.common import apply_variant_flags, attention_settings
from bench.fold_traffic import add_fold_traffic, fold_traffic
from gpt2.model.attention.triton_support import triton_runs_on, why_not_triton
from gpt2.model.gpt import GPT
from test_attention_helpers import kv_settings, mlp_settings, model_settings

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.skipif(not triton_runs_on(torch.empty(0, device=DEVICE)), reason=why_not_triton())
def test_kernels_copy_values_and_gradients_exactly():
    B, T, H, D = 2, 37, 3, 24  # T spans a ragged tile; D is not a power of two (padded lanes)
    qkv = torch.randn(B, T, 3, H, D, device=DEVICE).requires_grad_()
    q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # strided views, as the model passes them
    qt, kt = fold_traffic(q, k)
    assert torch.equal(qt, q) and torch.equal(kt, k)
    assert qt.stride(-1) == 1 and qt.data_ptr() != q.data_ptr()  # fresh outputs: the bytes are really written
    gq, gk = torch.randn_like(qt), torch.randn_like(kt)
    (grad,) = torch.autograd.grad((qt * gq).sum() + (kt * gk).sum(), qkv)
    assert torch.equal(grad[:, :, 0], gq.transpose(1, 2)) and torch.equal(grad[:, :, 1], gk.transpose(1, 2))
    assert not grad[:, :, 2].any()


def test_the_variant_is_the_baseline_model(monkeypatch):
    """sdpa+fold-traffic builds the baseline's model (same weights, same loss and gradients), only its q and k
    pass through the copies; the attention modules really route through them."""
    model = model_settings(n_embd=32, n_head=2, n_layer=2, block_size=16)
    build = lambda: GPT(model, attention_settings("sdpa+fold-traffic", 2), mlp_settings(), kv_settings(),  # noqa: E731
                        vocab_size=50, seed=3).to(DEVICE)
    base, floor = build(), apply_variant_flags(build(), "sdpa+fold-traffic")
    idx = torch.randint(50, (2, 16), device=DEVICE)
    losses = []
    for m in (base, floor):
        _, loss = m(idx, idx)
        loss.backward()
        losses.append(loss)
    assert torch.equal(losses[0], losses[1])
    for (name, a), b in zip(base.named_parameters(), floor.parameters()):
        assert torch.equal(a.grad, b.grad), name
    calls, copy_traffic = [], ft.copy_traffic

    def counted(q, k):
        calls.append(q.shape)
        return copy_traffic(q, k)

    monkeypatch.setattr(ft, "copy_traffic", counted)
    floor(idx)
    assert len(calls) == 2  # one per layer


def test_add_fold_traffic_leaves_other_modules_alone():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    assert add_fold_traffic(model) is model and not hasattr(model[0], "attention_heads")
