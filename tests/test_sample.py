"""`make sample` / `python -m scripts.sample` end to end on a tiny trained run: the prompt then generated text,
reproducible with a seed, the newest run by default, and one clear line for a bad run or option."""

import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from gpt2.train import trainer as train
from lib.config import load_settings

# ra-unified with the discoverability bias and KV pruning (a recency window shorter than the block, so it prunes):
# the cached decode of the RA family end to end. 40 new tokens outgrow the block of 32: the window slides too.
RUN_OVERRIDES = {"ATTN_BACKEND_RA_UNIFIED": "y", "ATTN_DISCOVERABILITY": "y", "KV_PRUNE": "y", "KV_PRUNE_RECENCY": "4",
                 "TRAIN_MAX_ITERS": "4", "TRAIN_EVAL_INTERVAL": "2", "TRAIN_CHECKPOINT_INTERVAL": "2"}


def sample_cli(config, *args, env=None):
    return subprocess.run([sys.executable, "-m", "scripts.sample", "--config", str(config), *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def samples_of(stdout: str) -> list:
    return stdout.rstrip("\n").split("\n---------------\n")


@pytest.fixture
def trained_run(make_config, tmp_path):
    """(config, run directory) of a 4-step run under the config's results directory."""
    config = make_config(RUN_OVERRIDES)
    run_dir = tmp_path / "results" / "tiny-run"
    assert train.run(load_settings(config, environ={}), config, run_dir, argv=["tests"]) == 0
    return config, run_dir


def test_sample_prints_the_prompt_and_its_continuation(trained_run, repo_copy):
    config, run_dir = trained_run
    args = ["--prompt", "ROMEO:", "--num", "2", "--tokens", "40", "--temperature", "0.9", "--top-k", "20"]
    first = sample_cli(config, "--run", str(run_dir), "--seed", "1", *args)
    assert first.returncode == 0, first.stderr
    texts = samples_of(first.stdout)
    assert len(texts) == 2
    for text in texts:  # the character tokenizer: 40 tokens are 40 characters
        assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 40
    assert str(run_dir) in first.stderr and "ra-unified" in first.stderr
    again = sample_cli(config, "--run", str(run_dir), "--seed", "1", *args)
    assert again.stdout == first.stdout  # the same seed gives the same text
    other = sample_cli(config, "--run", str(run_dir), "--seed", "2", *args)
    assert other.returncode == 0 and other.stdout != first.stdout

    # No --run: the newest run under the results directory, and the configuration's Sampling defaults.
    newest = sample_cli(config, "--tokens", "5", "--checkpoint", "last")
    assert newest.returncode == 0, newest.stderr
    assert f"{run_dir} (the newest run under" in newest.stderr and "ckpt.pt" in newest.stderr
    assert len(samples_of(newest.stdout)) == 2  # CONFIG_SAMPLE_NUM_SAMPLES defaults to 2

    # make sample: make's variables reach the script; TEMP in the environment (not on make's line) is ignored.
    (repo_copy / ".config").write_text(config.read_text())
    made = subprocess.run(["make", "-s", "-C", str(repo_copy), "sample", f"RUN={run_dir}", "PROMPT=JULIET: \"O",
                           "NUM=1", "TOKENS=12", "SEED=3", "CKPT=last"], capture_output=True, text=True,
                          env={**os.environ, "TEMP": "/tmp", "OMP_NUM_THREADS": "1"})
    assert made.returncode == 0, made.stderr
    (text,) = samples_of(made.stdout)
    assert text.startswith('JULIET: "O') and len(text) == len('JULIET: "O') + 12


@pytest.mark.parametrize("args, message", [
    (["--run", "/nonexistent/run"], "/nonexistent/run: no such run directory"),
    (["--run", ".", "--top-k", "-3"], "TOPK=-3: CONFIG_SAMPLE_TOP_K=-3 does not take"),
    (["--run", ".", "--temperature", "hot"], 'TEMP=hot: CONFIG_SAMPLE_TEMPERATURE="hot" is not a number'),
    (["--run", ".", "--checkpoint", "newest"], "CKPT=newest: expected one of best, last"),
])
def test_a_bad_run_or_option_is_one_clear_line(make_config, args, message):
    result = sample_cli(make_config(), *args)
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and message in result.stderr
