"""Downstream evaluation of our checkpoints: the scoring functions against a direct full forward (no
lm-evaluation-harness needed), then the harness model "gpt2-ra" (skipped, saying why, without extras/lm-eval.txt):
registered, scoring as the functions do, and evaluating an RA run exactly as the harness evaluates the same
model exported to transformers."""

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_OVERRIDES, shared_data_dir
from gpt2.train import trainer
from gpt2.train.trained import load_trained
from lib import config as cfg
from lib.config.steps import load_steps
from lib.export import export_run
from lib.export.scoring import cut_at_stop, generate_until, greedy_tokens, rolling_loglikelihood, rolling_windows, \
    score_continuations

STEPS = load_steps()
T = 32  # TINY_OVERRIDES' block size


def train(root, name, overrides) -> object:
    """A real tiny run (2 optimizer steps) of the CPU test configuration."""
    base = root / f"{name}.base"
    cfg.apply_defconfig(cfg.preset_path("cpu-default"), base)
    merged = {**TINY_OVERRIDES, "RESULTS_DIR": str(root / "results"), "DATA_DIR": str(shared_data_dir()),
              "TRAIN_MAX_ITERS": "2", "TRAIN_EVAL_BATCHES": "1", **overrides}
    config = root / f"{name}.config"
    cfg.write_cell_config(base, merged, config)
    run_dir = root / name
    assert trainer.run(cfg.load_settings(config, environ={}), config, run_dir, argv=["tests"]) == 0
    return run_dir


@pytest.fixture(scope="module")
def fold_full_run(tmp_path_factory):
    """Full-rank RA folded into head dim 2D: no transformers model computes it, only our own code."""
    return train(tmp_path_factory.mktemp("runs"), "f1", STEPS["F1"].overrides)


@pytest.fixture(scope="module")
def model(fold_full_run):
    return load_trained(fold_full_run, which="last").model


def direct_logprob(model, context, continuation):
    """Independently: one unpadded forward over the last T + 1 tokens, log-softmax summed over the continuation."""
    sequence = (context + continuation)[-(T + 1):]
    with torch.no_grad():
        logprobs = F.log_softmax(model(torch.tensor([sequence[:-1]]))[0][0].float(), dim=-1)
    targets = sequence[1:]
    positions = range(len(targets) - len(continuation), len(targets))
    return (sum(logprobs[p, targets[p]].item() for p in positions),
            all(logprobs[p].argmax() == targets[p] for p in positions))


def random_requests(n=12, vocab=76, seed=3):
    g = torch.Generator().manual_seed(seed)
    draw = lambda low, high: torch.randint(0, vocab, (int(torch.randint(low, high, (1,), generator=g)),),  # noqa
                                           generator=g).tolist()
    return [(draw(1, 70), draw(1, 12)) for _ in range(n)]  # contexts up to 69 tokens: most are cut on the left


# ---- the scoring functions, without the harness -------------------------------------------------------------

def test_continuation_scores_match_a_direct_full_forward(model):
    requests = random_requests()
    one_by_one = score_continuations(model, requests, T, batch_size=1)
    batched = score_continuations(model, requests, T, batch_size=5)  # right-padded batches of mixed lengths
    for (context, continuation), single, padded in zip(requests, one_by_one, batched):
        expected, greedy = direct_logprob(model, context, continuation)
        # token-exact: the same forward and the same terms (summed in another order: float64 rounding only)
        assert single == (pytest.approx(expected, abs=0, rel=1e-12), greedy)
        assert padded[0] == pytest.approx(expected, abs=1e-4) and padded[1] == greedy
    assert score_continuations(model, [([1, 2], [])], T) == [(0.0, True)]


def test_the_greedy_flag_follows_the_argmax(model):
    context = [5, 9, 13, 2]
    greedy = greedy_tokens(model, context, 6, T)
    with torch.no_grad():  # the same chain, one argmax at a time
        chain = list(context)
        for _ in range(6):
            chain.append(int(model(torch.tensor([chain]))[0][0, -1].argmax()))
    assert greedy == chain[len(context):]
    (logprob, is_greedy), (_, not_greedy) = score_continuations(
        model, [(context, greedy), (context, greedy[:-1] + [(greedy[-1] + 1) % 76])], T)
    assert is_greedy and not not_greedy and logprob == pytest.approx(direct_logprob(model, context, greedy)[0])


def test_rolling_windows_predict_every_token_once_with_the_most_context(model):
    tokens = torch.randint(0, 76, (100,), generator=torch.Generator().manual_seed(4)).tolist()
    windows = rolling_windows(tokens, prefix_token=0, block_size=T)
    assert [t for _, continuation in windows for t in continuation] == tokens
    assert windows[0] == ([0], tokens[:T])
    for context, continuation in windows[1:]:
        assert len(context) + len(continuation) == T + 1  # a full window: T inputs
        joined = context + continuation  # a contiguous stretch of the text
        assert any(tokens[start: start + T + 1] == joined for start in range(len(tokens)))
    total = sum(direct_logprob(model, c, x)[0] for c, x in windows)
    assert rolling_loglikelihood(model, tokens, 0, T, batch_size=1) == pytest.approx(total, rel=1e-6)
    short = tokens[:20]  # one window: the prefix, then every token conditioned on all before it
    with torch.no_grad():
        logprobs = F.log_softmax(model(torch.tensor([[0] + short[:-1]]))[0][0], dim=-1)
    expected = sum(logprobs[i, t] for i, t in enumerate(short)).item()
    assert rolling_loglikelihood(model, short, 0, T) == pytest.approx(expected, abs=1e-4)


def test_generation_stops_at_the_first_stop_string(model, fold_full_run):
    from lib.export.tokens import tokenizer_from_record, tokenizer_record

    tokenizer = tokenizer_from_record(tokenizer_record(load_trained(fold_full_run).settings))
    context = tokenizer.encode("ROMEO:\nWhat light")
    free = tokenizer.decode(greedy_tokens(model, context, 12, T))
    stop = free[5:7]
    assert generate_until(model, tokenizer, context, [stop], 12, T) == free[: free.find(stop)]
    assert generate_until(model, tokenizer, context, [], 12, T) == free
    assert len(greedy_tokens(model, context, 40, T)) == 40  # more than the block: each step sees the last T
    assert cut_at_stop("abcabc", ["c", "b"]) == "a" and cut_at_stop("abc", ["", "x"]) == "abc"


def test_requests_that_cannot_be_scored_are_refused(model):
    with pytest.raises(ValueError, match="at least one context token"):
        score_continuations(model, [([], [1, 2])], T)
    with pytest.raises(ValueError, match="does not fit the block size 32"):
        score_continuations(model, [([1], list(range(33)))], T)
    with pytest.raises(ValueError, match="no end-of-text token"):
        rolling_windows([1, 2, 3], None, T)


# ---- the harness model (lm_eval installed) --------------------------------------------------------------------

@pytest.fixture(scope="module")
def lm_eval():
    return pytest.importorskip("lm_eval", reason="lm-evaluation-harness is optional: pip install -r extras/lm-eval.txt")


def test_gpt2_ra_is_registered_and_scores_as_the_functions_do(lm_eval, fold_full_run, model):
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from lib.export.harness import GPT2RALM

    assert get_model("gpt2-ra") is GPT2RALM
    lm = get_model("gpt2-ra").create_from_arg_string(f"run={fold_full_run},checkpoint=last",
                                                     {"device": "cpu", "batch_size": 4})
    pairs = [("ROMEO:\nWhat light", " through yonder"), ("JULIET: ", "Ay me"), ("A" * 80, "BC")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    encode = lm.tokenizer.encode
    # the harness's own tokenization: trailing context spaces move to the continuation
    expected = score_continuations(model, [(encode("ROMEO:\nWhat light"), encode(" through yonder")),
                                           (encode("JULIET:"), encode(" Ay me")), (encode("A" * 80), encode("BC"))], T)
    assert got == expected
    tokens = list(range(70))
    theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, 0, T, context_len=1)]
    assert [tuple(map(list, w)) for w in theirs] == [tuple(w) for w in rolling_windows(tokens, 0, T)]
    with pytest.raises(ValueError, match="no end-of-text token"):  # the char tokenizer has nothing to prefix
        lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("some text",), 0)])
    with pytest.raises(ValueError, match="unknown model_args colour"):
        GPT2RALM(run=str(fold_full_run), colour="red")


def local_tasks(docs_path):
    """Three tasks on a local JSONL file, one per request type, built from config dicts (no task index)."""
    from lm_eval.api.task import ConfigurableTask

    common = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(docs_path)}}, "test_split": "test"}
    configs = {
        "choice": {"output_type": "multiple_choice", "doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}",
                   "doc_to_target": "{{label}}", "metric_list": [{"metric": "acc"}]},
        "perplexity": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                       "metric_list": [{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}]},
        "generation": {"output_type": "generate_until", "doc_to_text": "{{context}}", "doc_to_target": "{{answer}}",
                       "generation_kwargs": {"until": ["\n"], "max_gen_toks": 6, "do_sample": False},
                       "metric_list": [{"metric": "exact_match"}]},
    }
    return {name: ConfigurableTask(config={"task": name, **common, **c}) for name, c in configs.items()}


def test_an_ra_run_is_evaluated_as_its_transformers_export_is(lm_eval, tmp_path_factory, monkeypatch):
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    from lib.export.harness import GPT2RALM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    root = tmp_path_factory.mktemp("bpe")
    run_dir = train(root, "v1", {**STEPS["V1"].overrides, "TOKENIZER_GPT2": "y"})  # ra-unified, GPT-2 BPE
    export = export_run(run_dir, root / "export")
    assert export.kind == "hf"
    docs = [{"context": "The king said", "choices": [" yes", " no", " my lord"], "label": 2, "answer": "lord",
             "text": "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the "
                     "slings and arrows of outrageous fortune, or to take arms against a sea of troubles."},
            {"context": "Enter HAMLET ", "choices": ["and", "the"], "label": 1, "answer": "x",
             "text": "Now is the winter of our discontent"}]
    docs_path = root / "docs.jsonl"
    docs_path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    models = {"ours": GPT2RALM(run=str(run_dir), device="cpu", batch_size=4),
              "ours, exported": GPT2RALM(run=str(export.directory), device="cpu", batch_size=4),
              "transformers": HFLM(pretrained=str(export.directory), device="cpu", batch_size=4)}
    outcomes = {}
    for name, lm in models.items():
        results = evaluate(lm, local_tasks(docs_path), bootstrap_iters=0, log_samples=True)
        metrics = {task: {k: v for k, v in r.items() if k.endswith(",none") and "stderr" not in k}
                   for task, r in results["results"].items()}
        outcomes[name] = metrics, {task: [s["resps"] for s in samples] for task, samples in results["samples"].items()}
    reference_metrics, reference_responses = outcomes["transformers"]
    for name in ("ours", "ours, exported"):
        metrics, responses = outcomes[name]
        assert responses["generation"] == reference_responses["generation"], name
        for task in ("choice", "perplexity", "generation"):
            for key, value in reference_metrics[task].items():
                assert metrics[task][key] == pytest.approx(value, rel=1e-5), (name, task, key)
        for ours, theirs in zip(responses["choice"], reference_responses["choice"]):
            for (lp, greedy), (lp_ref, greedy_ref) in zip((r[0] for r in ours), (r[0] for r in theirs)):
                assert lp == pytest.approx(lp_ref, abs=1e-4) and greedy == greedy_ref
