"""scripts/bench_train.py: the --smoke code path (real model, optimizer and TrainStep on tiny CPU sizes)."""

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_smoke_run_times_every_loop_in_shared_rounds_and_writes_the_report(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "scripts.bench_train", "--smoke", "--out-dir", str(tmp_path),
                           "--repeats", "3"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "train-cpu-smoke.json").read_text())
    names = [report["ours"]["name"], report["bare"]["name"]] + [r["name"] for r in report["ideas"]]
    assert names == ["ours", "bare", "ours, micro-batch x2"]  # CUDA graphs: CUDA only
    for r in [report["ours"], report["bare"], *report["ideas"]]:
        assert len(r["ms_per_step_rounds"]) == 3 and r["ms_per_step"] > 0 and r["vs_bare"] > 0
    assert report["bare"]["vs_bare"] == 1.0 and report["ratio"] == report["ours"]["vs_bare"]
    assert report["ideas"][0]["tokens_per_step"] == 2 * report["ours"]["tokens_per_step"]
    md = (tmp_path / "train-cpu-smoke.md").read_text()
    assert "| ours, micro-batch x2 |" in md and "goal 5" in md
