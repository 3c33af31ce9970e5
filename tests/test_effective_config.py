"""What ran is what is recorded (issue #14): the run directory's config snapshot and settings.json are the
effective configuration (environment overrides folded in), reports read them, and a GPT2_* variable that is
not an override is refused rather than ignored."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lib import config as cfg

REPO = Path(__file__).resolve().parent.parent


def environment(**overrides):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPT2_")}
    env.update(overrides)
    return env


def snapshot_values(path) -> dict:
    return dict(line.split("=", 1) for line in Path(path).read_text().splitlines() if line.startswith("CONFIG_"))


def test_run_records_the_environment_overrides_it_trained_with(make_config, tmp_path):
    config = make_config({"SEED": "1", "GPT2_MAX_TIME": "60", "TRAIN_MAX_ITERS": "20"})
    config.write_text("# preset: cpu-tiny-run\n" + config.read_text())  # as `make defconfig-NAME` writes it
    run_dir = tmp_path / "run"
    env = environment(GPT2_SEED="3", GPT2_MAX_TIME="0", GPT2_MAX_ITERS="2")
    proc = subprocess.run([sys.executable, "-m", "lib.runs.train", "--config", str(config), "--run-dir",
                           str(run_dir)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    values = snapshot_values(run_dir / "config")
    assert (values["CONFIG_SEED"], values["CONFIG_GPT2_MAX_TIME"], values["CONFIG_TRAIN_MAX_ITERS"]) == ("3", "0", "2")
    assert cfg.preset_of(run_dir / "config") == "cpu-tiny-run"
    assert "GPT2_SEED=3" in (run_dir / "config").read_text().split("CONFIG_", 1)[0]  # the header names overrides
    # The snapshot loads on its own (no environment) to the same settings.
    assert cfg.load_settings(run_dir / "config", environ={}).general.seed == 3

    settings = json.loads((run_dir / "settings.json").read_text())
    assert settings["general"]["seed"] == 3 and settings["train"]["max_iters"] == 2
    assert settings["train"]["max_time_s"] == 0

    report = subprocess.run([sys.executable, "-m", "scripts.report", str(run_dir)], cwd=REPO, env=environment(),
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    text = (run_dir / "report.md").read_text()
    assert "seed 3" in text and "seed 1" not in text
    assert "- **Budget**: 2 iterations per cell" in text and "60 s of training time" not in text


def test_unknown_gpt2_variable_is_refused(make_config):
    config = make_config()
    with pytest.raises(cfg.ConfigError, match=r"GPT2_LR.*GPT2_MAX_TIME") as caught:
        cfg.load_settings(config, environ={"GPT2_LR": "1e-3"})
    assert "\n" not in str(caught.value)
    # The variables the code itself reads stay allowed.
    assert cfg.load_settings(config, environ={"GPT2_BPE_FILE": "/nowhere", "GPT2_SEED": "5"}).general.seed == 5


def test_entry_point_refuses_an_unknown_gpt2_variable(make_config, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lib.runs.train", "--config", str(make_config()), "--run-dir",
                           str(tmp_path / "run")], cwd=REPO, env=environment(GPT2_LR="1e-3"), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "GPT2_LR" in proc.stderr and "GPT2_MAX_TIME" in proc.stderr
    assert not (tmp_path / "run").exists()
