"""Evaluation: the HellaSwag scorer against a direct computation with a transformers GPT-2, and a real tiny
trained run evaluated into eval.json (val loss as training logged it, HellaSwag on the fixture, offline)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2.data.tokenizer import GPT2Tokenizer
from gpt2.io import BEST_CHECKPOINT_NAME, read_json
from gpt2.train import trainer as train
from gpt2.train.trained import load_trained
from lib.config import load_settings
from lib.evaluate import EVAL_RESULTS_NAME, evaluate_run
from lib.evaluate import hellaswag as hs
from lib.evaluate.scoring import metrics, score_items
from scripts import eval as eval_cli

FIXTURE = Path(__file__).parent / "fixtures" / "hellaswag" / "hellaswag_val_sample.jsonl"


@pytest.fixture(scope="module")
def bpe():
    return GPT2Tokenizer()


def direct_loglikelihoods(hf, items, encode, block_size):
    """Independently: one unpadded sequence per ending, sum of log-softmax over the ending's tokens."""
    lls, counts = np.zeros((len(items), 4)), np.zeros((len(items), 4))
    for i, item in enumerate(items):
        for j, choice in enumerate(item.choices):
            context, ending = encode(item.query), encode(" " + choice)
            assert encode(item.query + " " + choice) == context + ending  # BPE splits at the space here
            sequence = (context + ending)[-(block_size + 1):]  # truncated from the left
            scored = min(len(ending), len(sequence) - 1)
            with torch.no_grad():
                log_probs = torch.log_softmax(hf(torch.tensor([sequence[:-1]])).logits[0], dim=-1).double()
            targets = sequence[1:]
            lls[i, j] = sum(log_probs[t, targets[t]].item() for t in range(len(targets) - scored, len(targets)))
            counts[i, j] = scored
    return lls, counts


@pytest.fixture(scope="module")
def hf_gpt2(bpe):
    """A transformers GPT-2 with random weights, built locally: tiny, but the real architecture and vocabulary."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=bpe.vocab_size, n_positions=128, n_embd=32, n_layer=2, n_head=2)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("block_size", [128, 24])  # 24: most contexts lose tokens on the left
def test_scores_match_a_direct_computation_with_transformers_gpt2(block_size, bpe, hf_gpt2):
    hf = hf_gpt2
    items = hs.read_items(FIXTURE)
    scores = score_items(items, bpe.encode, lambda idx: hf(idx).logits, block_size, "cpu", batch_size=5)
    expected, counts = direct_loglikelihoods(hf, items, bpe.encode, block_size)
    np.testing.assert_allclose(scores.loglikelihood, expected, rtol=0, atol=1e-4)
    assert (scores.tokens == counts).all()
    assert scores.truncated.any() == (block_size == 24)

    gold = np.array([item.gold for item in items])
    chars = np.array([[len(c) for c in item.choices] for item in items])
    got = metrics(items, scores)
    assert got["acc"] == np.mean(expected.argmax(axis=1) == gold)
    assert got["acc_norm"] == np.mean((expected / chars).argmax(axis=1) == gold)
    assert got["acc_norm_tokens"] == np.mean((expected / counts).argmax(axis=1) == gold)
    # the one non-ASCII ending ("café") is where characters and bytes differ
    assert any(len(c) != len(c.encode("utf-8")) for item in items for c in item.choices)


def test_a_trained_run_is_evaluated_into_eval_json(make_config, tmp_path, bpe, monkeypatch, capsys):
    config = make_config({"TOKENIZER_GPT2": "y", "MODEL_BLOCK_SIZE": "32", "TRAIN_MAX_ITERS": "3",
                          "EVAL_AFTER_TRAIN": "y", "EVAL_HELLASWAG_LIMIT": "2"})
    settings = load_settings(config, environ={})
    run_dir = tmp_path / "results" / "bpe-run"
    assert train.run(settings, config, run_dir, argv=["tests"]) == 0

    lines = []
    record = evaluate_run(run_dir, which="last", items_file=FIXTURE, device="cpu", batch_size=7, log=lines.append)
    assert read_json(run_dir / EVAL_RESULTS_NAME) == record
    assert (record["checkpoint"], record["checkpoint_choice"], record["iters"]) == ("ckpt.pt", "last", 3)
    val = record["val"]
    assert val["logged_loss"] is not None and val["loss"] == pytest.approx(val["logged_loss"], abs=1e-5)
    assert val["ppl"] == pytest.approx(np.exp(val["loss"]))
    h = record["hellaswag"]
    assert (h["status"], h["items"], h["partial"], h["official"]) == ("done", 8, False, False)
    assert all(0.0 <= h[name] <= 1.0 for name in ("acc", "acc_norm", "acc_bytes", "acc_norm_tokens"))
    assert h["truncated_items"] > 0  # block 32: the longer contexts are cut on the left
    assert any("HellaSwag" in line and "all 8 items" in line for line in lines)

    # Padding never reaches a scored position: one sequence per batch gives the same numbers
    trained = load_trained(run_dir, "last")
    items = hs.read_items(FIXTURE)
    one = score_items(items, bpe.encode, lambda idx: trained.model(idx)[0], 32, "cpu", batch_size=1)
    many = score_items(items, bpe.encode, lambda idx: trained.model(idx)[0], 32, "cpu", batch_size=11)
    np.testing.assert_allclose(one.loglikelihood, many.loglikelihood, rtol=0, atol=1e-5)

    # The Kconfig limit applies through the settings a matrix cell passes in
    assert evaluate_run(run_dir, settings, which="last", items_file=FIXTURE, device="cpu",
                        log=lambda _: None)["hellaswag"]["items"] == 2

    assert eval_cli.main([str(run_dir), "--checkpoint", "last", "--limit", "3", "--items", str(FIXTURE),
                          "--device", "cpu"]) == 0
    assert "PARTIAL: the first 3 of 8 items" in capsys.readouterr().out
    assert read_json(run_dir / EVAL_RESULTS_NAME)["hellaswag"]["partial"] is True

    # Offline: one line saying what to do; the val loss is still written
    monkeypatch.setattr(hs, "DEFAULT_CACHE", tmp_path / "cache" / "hellaswag_val.jsonl")
    monkeypatch.delenv(hs.FILE_ENV, raising=False)
    monkeypatch.setenv(hs.URL_ENV, "http://127.0.0.1:9/hellaswag_val.jsonl")
    assert eval_cli.main([str(run_dir), "--checkpoint", "last", "--device", "cpu"]) == 1
    offline = [line for line in capsys.readouterr().out.splitlines() if line.startswith("HellaSwag")]
    assert len(offline) == 1 and "cannot download HellaSwag" in offline[0] and hs.FILE_ENV in offline[0]
    written = read_json(run_dir / EVAL_RESULTS_NAME)
    assert written["hellaswag"]["status"] == "unavailable" and written["val"]["loss"] == pytest.approx(val["loss"])


def test_the_newest_run_is_named_and_a_char_run_skips_hellaswag(make_config, tmp_path, capsys):
    config = make_config({"TRAIN_MAX_ITERS": "2"})
    run_dir = tmp_path / "results" / "char-run"
    assert train.run(load_settings(config, environ={}), config, run_dir, argv=["tests"]) == 0
    assert eval_cli.main(["--config", str(config), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"evaluating the newest run, {run_dir}" in out
    assert ("(the run kept no best checkpoint)" in out) == (not (run_dir / BEST_CHECKPOINT_NAME).exists())
    assert "HellaSwag skipped: HellaSwag needs the GPT-2 BPE tokenizer" in out
    assert read_json(run_dir / EVAL_RESULTS_NAME)["hellaswag"]["status"] == "skipped"
    assert eval_cli.main([str(tmp_path / "absent")]) == 2


def test_eval_after_train_writes_eval_json_through_the_training_entry_point(make_config, tmp_path):
    """CONFIG_EVAL_AFTER_TRAIN: the entry point every run and matrix cell starts evaluates the finished run."""
    import json

    from lib.runs import train as entry

    config = make_config({"TRAIN_MAX_ITERS": "2", "GPT2_MAX_TIME": "0", "EVAL_AFTER_TRAIN": "y"}, name="after")
    run_dir = tmp_path / "after-run"
    assert entry.main(["--config", str(config), "--run-dir", str(run_dir)]) == 0
    record = json.loads((run_dir / "eval.json").read_text())
    assert record["iters"] == 2 and record["val"]["loss"] > 0
    assert record["hellaswag"]["status"] == "skipped"  # the tiny test model reads characters, not GPT-2 BPE
