"""Ablation steps share the baseline's initialisation: with the reciprocal term off, an RA step trains like V0.

The RA backends whose standard term keeps all D dimensions (fold-full, fold-lowrank) compute exactly V0's
attention when w_rec = 0. Their w_std gate is still a learned per-head temperature (V0 has none), so after
the first update the curves may drift by the effect of that one scalar per head; the first loss is identical
to the bit and the curve stays within a tight tolerance. A w_rec that starts at 0 stays 0 (w = s², ds = 0).
"""

import re
from pathlib import Path

import pytest

from gpt2.train import trainer as train
from lib.config import load_settings
from lib.config.steps import load_steps

STEPS = load_steps()
ITERS = 10


def train_losses(config, run_dir):
    settings = load_settings(config, environ={})
    assert train.run(settings, config, run_dir, resume=False, argv=["tests"]) == 0
    log = (Path(run_dir) / "train.log").read_text()
    return [float(x) for x in re.findall(r"iter \d+ \| loss (\S+)", log)]


@pytest.mark.parametrize("step_id", ["F1", "F2"])
def test_ra_step_with_reciprocal_term_off_trains_like_the_baseline(step_id, make_config, tmp_path):
    common = {"TRAIN_MAX_ITERS": str(ITERS), "TRAIN_LOG_INTERVAL": "1", "TRAIN_EVAL_INTERVAL": str(ITERS),
              "TRAIN_CHECKPOINT_INTERVAL": "0"}
    baseline = make_config({**STEPS["V0"].overrides, **common}, name="v0")
    ra_off = make_config({**STEPS[step_id].overrides, **common, "ATTN_W_REC_INIT": "0"}, name=f"{step_id}-off")
    ra_on = make_config({**STEPS[step_id].overrides, **common}, name=f"{step_id}-on")
    v0, off, on = (train_losses(c, tmp_path / f"run-{c.name}") for c in (baseline, ra_off, ra_on))
    assert len(v0) == len(off) == ITERS
    assert off[0] == v0[0]                                     # identical model at initialisation
    drift_off = max(abs(a - b) for a, b in zip(v0, off))
    drift_on = max(abs(a - b) for a, b in zip(v0, on))
    assert drift_off < 1e-3                                    # only w_std's temperature differs later
    assert drift_on > 2 * drift_off                            # while the reciprocal term really changes training
    gates = load_settings(ra_off, environ={})
    assert gates.attention.w_rec_init == 0.0
