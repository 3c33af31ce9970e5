"""scripts/bench_data.py: the --smoke path (1 and 2 processes through the real preparation) and its report."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import data_prep
from conftest import shared_data_dir

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_smoke_run_reports_tokens_speedup_and_cpu(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "scripts.bench_data", "--smoke", "--out-dir", str(tmp_path),
                           "--data-dir", str(shared_data_dir())], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    [json_path] = tmp_path.glob("data-prep-*.json")
    report = json.loads(json_path.read_text())
    assert json_path.name.endswith(f"-{report['usable_cores']}cores.json")  # lent hosts of two sizes share a name
    one, two = report["runs"]
    assert (one["workers"], two["workers"]) == (1, 2) and one["speedup"] == 1.0
    assert report["token_cap"] == data_prep.SMOKE_TOKENS < report["tokens"] == one["tokens"] == two["tokens"]
    assert one["same_bytes"] and two["same_bytes"] and one["bins_sha256"] == two["bins_sha256"]
    # The workers' CPU time is counted: two processes each import numpy and load the BPE before tokenising
    # the same tokens, so the 2-process run costs more CPU than the reference, not only its parent's share.
    assert two["cpu_seconds"] > one["cpu_seconds"] > 0
    for run in (one, two):
        assert run["busy_cores"] == pytest.approx(run["cpu_seconds"] / run["seconds"], rel=0.01)
        assert run["cpu_s_per_mtok"] == pytest.approx(run["cpu_seconds"] / run["tokens"] * 1e6, rel=0.01)
    markdown = json_path.with_suffix(".md").read_text()
    assert markdown.startswith(f"# Data preparation of {report['tokens']:,} tokens: 1 process vs N")
    assert f"--tokens {data_prep.SMOKE_TOKENS} --workers 1,2" in markdown
    assert "| 2 | " in markdown and "| yes |" in markdown and "**NO**" not in markdown


@pytest.mark.parametrize("cores, counts", [(1, [1]), (2, [1, 2]), (6, [1, 3, 6]), (16, [1, 4, 8, 16])])
def test_default_process_counts(monkeypatch, cores, counts):
    monkeypatch.setattr(data_prep, "usable_cores", lambda: cores)
    assert data_prep.default_workers() == counts
