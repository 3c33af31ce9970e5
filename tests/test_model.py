"""GPT-2 model: Hugging Face equivalence, initialisation by name, shapes and padding."""

import math

import pytest
import torch
import torch.nn as nn

import gpt2.model.gpt as model_module
from gpt2.model.attention.sdpa import SDPAAttention
from gpt2.model.gpt import GPT, build_model
from gpt2.settings import AttentionSettings, KVPruningSettings, MLPSettings, ModelSettings


def tiny(**overrides) -> ModelSettings:
    fields = dict(size="custom", n_layer=2, n_head=4, n_embd=32, block_size=32, dropout=0.0, bias=True,
                  tie_weights=True, init_from="scratch", hf_checkpoint_dir="")
    fields.update(overrides)
    return ModelSettings(**fields)


def make(vocab=100, seed=1, **overrides) -> GPT:
    return GPT(tiny(**overrides), AttentionSettings(), MLPSettings(), KVPruningSettings(), vocab, seed=seed)


def hf_model(tmp_path, vocab=100, n_positions=32, safetensors=True, tie=True):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=n_positions, n_embd=32, n_layer=2, n_head=4,
                                     tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # non-trivial biases and LayerNorm parameters, so a wrong mapping shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.1)
    model.save_pretrained(tmp_path / "hf", safe_serialization=safetensors)
    return model, tmp_path / "hf"


@pytest.mark.parametrize("tie", [True, False])
def test_from_pretrained_matches_transformers_logits(tmp_path, tie):
    reference, directory = hf_model(tmp_path, tie=tie)
    assert (directory / "model.safetensors").exists()
    ours = GPT.from_pretrained(directory).eval()
    idx = torch.randint(0, 100, (3, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference(idx).logits
        logits, _ = ours(idx)
    assert logits.shape == expected.shape == (3, 32, 100)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


def test_from_pretrained_reads_original_pytorch_bin_and_crops_positions(tmp_path):
    """The layout of the original GPT-2 release: pytorch_model.bin of a GPT2Model (no "transformer." prefix,
    no lm_head, causal-mask buffers attn.bias / attn.masked_bias)."""
    reference, directory = hf_model(tmp_path, n_positions=64)
    state = {k.removeprefix("transformer."): v for k, v in reference.state_dict().items() if not k.startswith("lm_head")}
    for i in range(2):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    (directory / "model.safetensors").unlink()
    torch.save(state, directory / "pytorch_model.bin")
    ours = GPT.from_pretrained(directory, model=tiny(block_size=16)).eval()
    assert ours.transformer.wpe.weight.shape[0] == 16
    idx = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], reference(idx).logits, atol=1e-5, rtol=0)


def test_from_pretrained_refuses_mismatched_settings(tmp_path):
    _, directory = hf_model(tmp_path)
    with pytest.raises(ValueError, match="n_embd: config 64, checkpoint 32"):
        GPT.from_pretrained(directory, model=tiny(n_embd=64))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        GPT.from_pretrained(tmp_path)


def test_build_model_hf_init_uses_checkpoint(tmp_path):
    reference, directory = hf_model(tmp_path)

    class S:  # the slice of Settings build_model reads
        model = tiny(init_from="hf", hf_checkpoint_dir=str(directory))
        attention, mlp, kv_pruning = AttentionSettings(), MLPSettings(), KVPruningSettings()

        class general:
            seed = 3

    ours = build_model(S, vocab_size=100)
    torch.testing.assert_close(ours.transformer.h[1].mlp.c_fc.weight, reference.transformer.h[1].mlp.c_fc.weight.t())
    with pytest.raises(ValueError, match="vocabulary of 100 tokens"):
        build_model(S, vocab_size=65)


def test_forward_shapes_loss_and_padding():
    m = make(vocab=100)
    assert m.padded_vocab_size == 128 and m.lm_head.weight is m.transformer.wte.weight
    # The tied lm_head is built without a weight of its own (meta): none may be left in the model.
    assert not any(t.is_meta for t in [*m.parameters(), *m.buffers()])
    assert not any(t.is_meta for t in make(vocab=100, tie_weights=False).parameters())
    idx, targets = torch.randint(0, 100, (2, 2, 32), generator=torch.Generator().manual_seed(0))
    logits, loss = m(idx, targets)
    assert logits.shape == (2, 32, 100)
    assert abs(loss.item() - math.log(100)) < 0.3  # near-uniform predictions at init
    none, loss_only = m(idx, targets, return_logits=False)
    assert none is None and torch.equal(loss_only, loss)
    # The padded vocabulary rows get no gradient: they are layout only.
    loss.backward()
    assert m.transformer.wte.weight.grad[100:].abs().sum() == 0
    with pytest.raises(ValueError, match="longer than the block size"):
        m(torch.zeros(1, 33, dtype=torch.long))


def test_init_is_gpt2_and_seeded_by_name():
    a, b, c = make(seed=1), make(seed=1), make(seed=2)
    for (name, pa), (_, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert torch.equal(pa, pb), name
        if pa.dim() == 2:
            assert not torch.equal(pa, pc), name
    n_layer = a.settings.n_layer
    assert torch.equal(a.transformer.h[0].ln_1.weight, torch.ones(32))
    assert torch.equal(a.transformer.h[0].attn.c_attn.bias, torch.zeros(96))
    big = GPT(tiny(n_embd=256, n_head=4), AttentionSettings(), MLPSettings(), KVPruningSettings(), 100, seed=1)
    std = lambda t: t.detach().std().item()  # noqa: E731
    assert abs(std(big.transformer.h[0].mlp.c_fc.weight) - 0.02) < 0.001
    assert abs(std(big.transformer.h[0].attn.c_proj.weight) - 0.02 / math.sqrt(2 * n_layer)) < 0.001
    # Same name, same draw: layer 0's c_attn does not depend on how many layers follow.
    deeper = make(seed=1, n_layer=3)
    assert torch.equal(deeper.transformer.h[0].attn.c_attn.weight, a.transformer.h[0].attn.c_attn.weight)
    untied = make(seed=1, tie_weights=False)
    assert torch.equal(untied.transformer.wte.weight, a.transformer.wte.weight)


class GatedSDPA(SDPAAttention):
    """A variant that adds parameters, as the RA backends do."""

    def __init__(self, *args):
        super().__init__(*args)
        self.gate = nn.Parameter(torch.rand(self.n_head))
        self.extra = nn.Linear(self.n_embd, 8)


def test_extra_parameters_do_not_shift_shared_weights(monkeypatch):
    baseline = make(seed=5)
    monkeypatch.setattr(model_module, "build_attention", lambda *args: GatedSDPA(*args))
    variant = make(seed=5)
    shared = dict(baseline.named_parameters())
    extras = [n for n, _ in variant.named_parameters() if n not in shared]
    assert extras and all(".gate" in n or ".extra." in n for n in extras)
    for name, p in variant.named_parameters():
        if name in shared:
            assert torch.equal(p, shared[name]), name
    # Extras keep their module's own initialisation, reproducibly from the seed.
    again = make(seed=5)
    assert torch.equal(again.transformer.h[1].attn.gate, variant.transformer.h[1].attn.gate)
    assert not torch.equal(variant.transformer.h[1].attn.extra.bias, torch.zeros(8))


def test_gate_values_and_regularization_are_collected(monkeypatch):
    class WithGates(SDPAAttention):
        def gate_values(self):
            return {"w_std": [1.0] * self.n_head, "w_rec": [0.5] * self.n_head}

        def regularization_loss(self):
            return self.c_proj.weight.abs().sum() * 0 + 1.5

    monkeypatch.setattr(model_module, "build_attention", lambda *args: WithGates(*args))
    m = make()
    assert m.gate_values() == [{"layer": i, "w_std": [1.0] * 4, "w_rec": [0.5] * 4} for i in range(2)]
    assert float(m.regularization_loss().detach()) == 3.0
    monkeypatch.undo()
    plain = make()
    assert plain.gate_values() == [] and plain.regularization_loss() is None


def test_num_params_non_embedding():
    m = make(vocab=100)
    total = sum(p.numel() for p in m.parameters())
    assert m.num_params() == total
    assert m.num_params(non_embedding=True) == total - 32 * 32
    untied = make(vocab=100, tie_weights=False)
    assert untied.num_params(non_embedding=True) == untied.num_params() - 32 * 32 - 128 * 32
