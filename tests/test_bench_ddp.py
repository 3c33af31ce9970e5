"""scripts/bench_ddp.py: the --smoke path (2 gloo processes through the same torchrun relaunch) and the skip."""

import json
import subprocess
import sys

import pytest
import torch


def test_smoke_run_measures_every_section_on_two_processes(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "scripts.bench_ddp", "--smoke", "--accum", "2", "--out-dir",
                           str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "ddp-cpu-smoke-x2.json").read_text())
    assert report["gpus"] == 2 and report["workload"]["accum"] == 2 and report["precision"] == "fp32"
    sections = report["sections"]
    assert list(sections["single"]) == ["sdpa", "ra-unified"] and list(sections["ddp"]) == ["sdpa"]
    assert list(sections["accum"]) == ["sdpa", "ra-unified", "sdpa+again"]
    rounds = report["workload"]["rounds"]
    for section in sections.values():
        for name, r in section.items():  # sdpa brackets the others: timed before and after each of them
            expected = rounds * max(1, len(section) - 1) + (rounds if len(section) > 1 else 0) if name == "sdpa" \
                else rounds
            assert len(r["rounds_ms"]) == expected and r["ms_per_step"] > 0 and r["ratio"] is not None
    # tokens/s counts every process's tokens: DDP's steps carry world_size micro-batches, accum's 2 more each.
    micro = report["workload"]["batch_size"] * report["workload"]["block_size"]
    ddp = sections["ddp"]["sdpa"]
    assert ddp["tokens_per_s"] == pytest.approx(2 * micro / (ddp["ms_per_step"] / 1000))
    assert report["scaling"] == pytest.approx(ddp["tokens_per_s"] / sections["single"]["sdpa"]["tokens_per_s"])
    md = (tmp_path / "ddp-cpu-smoke-x2.md").read_text()
    assert "**Scaling**" in md and "Smoke run" in md and "2 micro-batches per GPU per optimizer step" in md


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="checks the skip path without two GPUs")
def test_without_two_gpus_it_says_why_and_skips(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "scripts.bench_ddp", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "skipping" in proc.stdout
    assert not list(tmp_path.iterdir())
