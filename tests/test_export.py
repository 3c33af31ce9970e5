"""Export: a model whose forward is GPT-2's becomes a transformers GPT2LMHeadModel with our logits (1e-5, fp32);
every other variant goes through our own format and comes back bit-exact; bad input is one line and exit 2.

Trained runs (3 steps) cover the path end to end; the breadth of variants uses run directories written by the
trainer's own writers (settings.json, ckpt-best.pt) around models whose every parameter was moved off its
initial value (gates, P, u, mixers, biases), so a wrong composition or mapping cannot hide behind an init."""

import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from gpt2.io import BEST_CHECKPOINT_NAME, REPO_ROOT
from gpt2.model.gpt import GPT
from gpt2.train import checkpoint as ckpt
from gpt2.train import trainer
from gpt2.train.run_dir import write_settings_json
from gpt2.train.trained import load_trained
from lib.config import load_settings
from lib.config.steps import load_steps
from lib.export import ExportError, export_run, load_exported, read_export_record
from lib.export.tokens import write_gpt2_tokenizer_files
from scripts import export as export_cli

transformers = pytest.importorskip("transformers")
STEPS = load_steps()
VOCAB = 76  # the shared Shakespeare char vocabulary (tests/conftest.py's data directory)


def step(step_id, **extra):
    return {**STEPS[step_id].overrides, **extra}


# Variants whose inference forward is a GPT-2 forward: exported as GPT2LMHeadModel (lib/export/kind.py).
AS_GPT2 = {
    "V0 plain": step("V0"),
    "V0 no bias, untied embeddings, 6x MLP": step("V0", MODEL_BIAS="n", MODEL_TIE_WEIGHTS="n", MLP_EXPANSION="6"),
    "V1 ra-unified tied": step("V1"),
    "U1 ra-unified untied": step("U1"),
    "F3 ra-same-flop": step("F3"),
    "D1 + head-selective routing": step("D1", ATTN_HEAD_SELECT_THRESHOLD="0.6"),
    "V6 R-MLP mixer and gates": step("V6"),
    "same-flop untied, no bias": step("F3", ATTN_RA_FORM_UNTIED="y", MODEL_BIAS="n"),
}
# Variants that are not: our own format, read back by load_exported; the setting named in the reason.
NATIVE = {
    "F1 ra-fold-full": (step("F1"), "CONFIG_ATTN_BACKEND_RA_FOLD_FULL=y"),
    "F2 ra-fold-lowrank": (step("F2"), "CONFIG_ATTN_BACKEND_RA_FOLD_LOWRANK=y"),
    "D2 fold-full + discoverability": (step("D2"), "CONFIG_ATTN_BACKEND_RA_FOLD_FULL=y"),
    "H1 head-selective fold-full": (step("H1"), "CONFIG_ATTN_BACKEND_RA_FOLD_FULL=y"),
    "ra-reference": (step("V0", ATTN_BACKEND_RA_REFERENCE="y"), "CONFIG_ATTN_BACKEND_RA_REFERENCE=y"),
    "V2 self-restart": (step("V2"), "CONFIG_ATTN_SELF_RESTART=y"),
    "V10 self-restart, 6x MLP": (step("V10"), "CONFIG_ATTN_SELF_RESTART=y"),
    "K1 KV pruning, untied embeddings": (step("K1", MODEL_TIE_WEIGHTS="n"), "CONFIG_KV_PRUNE=y"),
    "K2 sampled KV pruning": (step("K2"), "CONFIG_KV_PRUNE=y"),
}


def tokens(n=3, T=32):
    return torch.randint(0, VOCAB, (n, T), generator=torch.Generator().manual_seed(5))


@torch.no_grad()
def logits_of(model, idx):
    return model(idx)[0]


def transformers_model(directory):
    model, info = transformers.GPT2LMHeadModel.from_pretrained(directory, dtype=torch.float32,
                                                               output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def written_run(make_config, tmp_path, overrides, name="run"):
    """A run directory as the trainer writes it (settings.json, ckpt-best.pt), around a model whose every
    parameter is perturbed: gates land on both sides of a routing threshold, P/u/mixers/biases are random."""
    settings = load_settings(make_config(overrides, name=name), environ={})
    model = GPT(settings.model, settings.attention, settings.mlp, settings.kv_pruning, VOCAB, seed=3)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("sqrt_weight"):
                p.copy_(0.3 + torch.rand(p.shape, generator=generator))  # w = s^2 in (0.09, 1.69)
            else:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
    model.zero_unused_weights()  # what training keeps at zero (tied same-FLOP RA)
    run_dir = tmp_path / f"{name}-dir"
    run_dir.mkdir()
    write_settings_json(run_dir, settings)
    ckpt.save_best_checkpoint(run_dir / BEST_CHECKPOINT_NAME, model=model,
                              signature=ckpt.signature(settings, VOCAB, 1, model), progress={"iters": 7})
    return run_dir, load_trained(run_dir).model


def trained_run(make_config, tmp_path, overrides, name="trained"):
    config = make_config({"TRAIN_MAX_ITERS": "3", **overrides}, name=name)
    run_dir = tmp_path / f"{name}-dir"
    assert trainer.run(load_settings(config, environ={}), config, run_dir, argv=["tests"]) == 0
    return run_dir


# ---- GPT2LMHeadModel exports ----------------------------------------------------------------------------

def test_a_trained_plain_run_is_a_transformers_gpt2_with_our_logits(make_config, tmp_path, capsys):
    run_dir = trained_run(make_config, tmp_path, step("V0"))
    capsys.readouterr()  # the training log
    assert export_cli.main([str(run_dir)]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"export: {run_dir / 'export'} (Hugging Face GPT2LMHeadModel") and "\n" not in out
    export = run_dir / "export"
    config = json.loads((export / "config.json").read_text())
    assert config["vocab_size"] == VOCAB and config["model_type"] == "gpt2"
    weights = load_file(str(export / "model.safetensors"))
    assert weights["transformer.wte.weight"].shape == (VOCAB, 64)  # the real vocabulary, not the padded 128
    assert "lm_head.weight" not in weights  # tied: HF ties it to wte
    assert weights["transformer.h.0.attn.c_attn.weight"].shape == (64, 192)  # Conv1D: (in, out)
    ours = load_trained(run_dir).model
    idx = tokens()
    expected = logits_of(ours, idx)
    torch.testing.assert_close(transformers_model(export)(idx).logits.detach(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits_of(load_exported(export), idx), expected, atol=1e-6, rtol=0)
    record = read_export_record(export)
    assert record["kind"] == "hf" and record["tokenizer"]["name"] == "char"
    assert len(record["tokenizer"]["chars"]) == VOCAB
    assert (export / "settings.json").read_bytes() == (run_dir / "settings.json").read_bytes()


@pytest.mark.parametrize("variant", list(AS_GPT2))
def test_variants_with_a_gpt2_forward_export_as_transformers_models(variant, make_config, tmp_path):
    run_dir, ours = written_run(make_config, tmp_path, AS_GPT2[variant])
    exported = export_run(run_dir, tmp_path / "out")
    assert exported.kind == "hf"
    idx = tokens()
    expected = logits_of(ours, idx)
    torch.testing.assert_close(transformers_model(exported.directory)(idx).logits.detach(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits_of(load_exported(exported.directory), idx), expected, atol=1e-5, rtol=0)
    readme = (exported.directory / "README.md").read_text()
    assert "GPT2LMHeadModel.from_pretrained" in readme
    if variant != "V0 plain":  # what was folded into plain weights is said
        assert read_export_record(exported.directory)["composed_into_gpt2_weights"]
        assert "composed into GPT-2 weights: CONFIG_" in exported.summary()


# ---- our own format ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(NATIVE))
def test_other_variants_round_trip_bit_exact_through_our_format(variant, make_config, tmp_path):
    overrides, setting = NATIVE[variant]
    run_dir, ours = written_run(make_config, tmp_path, overrides)
    exported = export_run(run_dir, tmp_path / "out")
    assert exported.kind == "native" and any(reason.startswith(setting) for reason in exported.reasons)
    assert "NOT a transformers model" in exported.summary() and setting in exported.summary()
    assert not (exported.directory / "config.json").exists()  # nothing for transformers to mistake for a GPT-2
    assert setting in (exported.directory / "README.md").read_text()
    idx = tokens()
    loaded = load_exported(exported.directory)
    assert torch.equal(logits_of(loaded, idx), logits_of(ours, idx))
    for name, tensor in ours.state_dict().items():  # every parameter as trained; padded vocabulary rows aside
        rows = slice(0, VOCAB) if name in ("transformer.wte.weight", "lm_head.weight") else slice(None)
        assert torch.equal(loaded.state_dict()[name][rows], tensor[rows]), name


def test_a_trained_ra_run_forced_native_and_its_hf_export_agree(make_config, tmp_path, capsys):
    run_dir = trained_run(make_config, tmp_path, step("V1"))
    capsys.readouterr()  # the training log
    ours = load_trained(run_dir).model
    idx = tokens()
    expected = logits_of(ours, idx)
    assert export_cli.main([str(run_dir), "--native", "--out", str(tmp_path / "native")]) == 0
    assert "gpt2-ra native format, asked for with --native" in capsys.readouterr().out
    assert torch.equal(logits_of(load_exported(tmp_path / "native"), idx), expected)
    assert export_cli.main([str(run_dir), "--hf", "--out", str(tmp_path / "hf"), "--checkpoint", "last"]) == 0
    assert read_export_record(tmp_path / "hf")["source"]["checkpoint"] == "ckpt.pt"
    last = logits_of(load_trained(run_dir, which="last").model, idx)
    torch.testing.assert_close(transformers_model(tmp_path / "hf")(idx).logits.detach(), last, atol=1e-5, rtol=0)


# ---- refusals: one line, exit 2, nothing written ----------------------------------------------------------

def test_forcing_hf_on_a_model_that_is_not_gpt2_names_the_setting(make_config, tmp_path, capsys):
    run_dir, _ = written_run(make_config, tmp_path, step("F1"))
    assert export_cli.main([str(run_dir), "--hf"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --hf:") and "CONFIG_ATTN_BACKEND_RA_FOLD_FULL=y" in err and "\n" not in err
    assert not (run_dir / "export").exists()


def test_bad_input_is_refused_in_one_line(make_config, tmp_path, capsys):
    assert export_cli.main([]) == 2
    assert export_cli.main([str(tmp_path / "absent")]) == 2
    run_dir, _ = written_run(make_config, tmp_path, step("V0"))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert export_cli.main([str(run_dir), "--out", str(tmp_path / "taken")]) == 2
    assert export_cli.main([str(run_dir), "--out", str(run_dir)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("error: ") for line in lines), lines
    assert "no run directory given" in lines[0] and "absent" in lines[1] and "is not an export" in lines[2]
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    with pytest.raises(ExportError, match="no export.json"):
        load_exported(run_dir)


def test_a_newer_format_version_is_refused_by_name(make_config, tmp_path):
    run_dir, _ = written_run(make_config, tmp_path, step("F1"))
    out = export_run(run_dir).directory
    record = json.loads((out / "export.json").read_text())
    (out / "export.json").write_text(json.dumps({**record, "format_version": 99}))
    with pytest.raises(ExportError, match="export format version 99; this code reads version 1"):
        load_exported(out)


def test_exporting_again_replaces_the_export_and_leaves_no_temporary_files(make_config, tmp_path):
    run_dir, ours = written_run(make_config, tmp_path, step("V1"))
    first = export_run(run_dir, tmp_path / "out")
    second = export_run(run_dir, tmp_path / "out", kind="native")
    assert first.directory == second.directory and read_export_record(second.directory)["kind"] == "native"
    assert not (second.directory / "config.json").exists()  # nothing of the first export survives
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# ---- the tokenizer and the make target ---------------------------------------------------------------------

def test_gpt2_tokenizer_files_encode_as_our_tokenizer(tmp_path):
    from gpt2.data.tokenizer import GPT2Tokenizer

    names = write_gpt2_tokenizer_files(tmp_path, model_max_length=1024)
    assert names == ["vocab.json", "merges.txt", "tokenizer_config.json"]
    assert len(json.loads((tmp_path / "vocab.json").read_text())) == 50257
    assert len((tmp_path / "merges.txt").read_text().splitlines()) == 1 + 50000
    theirs, ours = transformers.AutoTokenizer.from_pretrained(tmp_path), GPT2Tokenizer()
    texts = ["Hello world!  It's 2024, naïve café — 日本語 text\n\nwith   spaces\tand tabs 12345.",
             " leading space, trailing space ", "emoji 😀 and \u00a0 no-break space", "", "a" * 300]
    for text in texts:
        assert theirs.encode(text) == ours.encode(text), text
        assert theirs.decode(ours.encode(text)) == text


def test_make_export_dispatches_to_the_script():
    proc = subprocess.run(["make", "-n", "export", "RUN=results/r", "OUT=/tmp/x", "CKPT=last"], cwd=REPO_ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "-m scripts.export results/r --out /tmp/x --checkpoint last" in proc.stdout
