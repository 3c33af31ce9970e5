"""What a matrix report claims and what it can support: one verdict measure (best val loss) for every step, cells
that ended past their validation minimum, the smallest difference the seeds could detect, the kind of study,
parameters and FLOPs per token, and throughput the machine decided.

The cells' files are written by hand (test_report.write_run: the files a run writes, with known numbers) on a
real plan, so every figure can be checked exactly.
"""

import json
import math

import numpy as np
import pytest

from lib.report import writer as report
from test_report import H1_SHIFT, IDLE, V0_FINAL, V1_SHIFT, synthetic_matrix  # noqa: F401 (fixture)

# A model that is not a demo: no tiny model, no CPU device.
NOT_DEMO = {"DEVICE_AUTO": "y", "MODEL_SIZE_GPT2_MINI": "y"}


def _report(matrix_dir):
    text = report.write_matrix_report(matrix_dir).read_text()
    return text, json.loads((matrix_dir / "report.json").read_text())


def _row(text, first_cell):
    """The cells of the markdown table row that starts with `first_cell`."""
    line = next(line for line in text.splitlines() if line.startswith(f"| {first_cell} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_a_step_past_its_minimum_is_judged_on_best_loss_and_says_final_loss_would_differ(synthetic_matrix):
    # V1 reaches a lower minimum than V0 (by 0.1) but trains 0.25 nats past it: final loss ranks it worse.
    def overfit(cell, final):
        return {"best": final, "final": final + 0.25} if cell.step == "V1" else {}

    text, data = _report(synthetic_matrix(customise=overfit))
    best, final = data["comparisons"]["V1"]["best"], data["comparisons"]["V1"]["final"]
    assert best["mean"] == pytest.approx(np.mean(list(V1_SHIFT.values())))
    assert final["mean"] == pytest.approx(best["mean"] + 0.25)
    verdict = data["verdicts"]["V1"]
    assert verdict.startswith(f"better than V0 by 0.1000 ± {best['ci95_half_width']:.4f} best val loss")
    assert "3 of 3 cells ended past their validation minimum (by up to 0.2500 nats)" in verdict
    assert (f"final val loss would say worse (Δ {final['mean']:+.4f} ± {final['ci95_half_width']:.4f}): ending past "
            f"the validation minimum changes this verdict") in verdict
    assert "past" not in data["verdicts"]["V0"] and "past" not in data["verdicts"]["H1"]
    # The cells say by how much and for how long; the step table shows final loss beside best.
    row = _row(text, "V1/s2")
    assert row[3:6] == [f"{V0_FINAL[2] + V1_SHIFT[2]:.4f}", f"{V0_FINAL[2] + V1_SHIFT[2] + 0.25:.4f}",
                        "yes, by 0.2500 nats (100 iters, 3.2k tokens after the best)"]
    assert _row(text, "V0/s1")[5] == "no"
    assert _row(text, "V1")[7:10] == ["2.9500 ± 0.0510", f"{best['mean']:+.4f} ± {best['ci95_half_width']:.4f}",
                                      "3.2000 ± 0.0510"]
    assert ("- **Past the validation minimum**: 3 of 9 cells ended past their validation minimum (by up to 0.2500 "
            "nats; see Cells); final val loss would change the verdict of V1.") in text


def test_records_older_than_the_fields_say_not_recorded(synthetic_matrix):
    text, data = _report(synthetic_matrix(customise=lambda cell, final: {"legacy": True}))
    assert _row(text, "V1/s1")[5] == "not recorded" and _row(text, "V1/s1")[9] == "not recorded"
    assert "- **Past the validation minimum**: not recorded for 9 cells (runs older than the record)." in text
    assert "machine load not recorded for 9 cells" in text
    assert data["verdicts"]["V1"].startswith("better than V0 by 0.1000")  # the verdict itself needs only best loss


@pytest.mark.parametrize("seeds, t", [("1,2,3", 4.30), ("1,2", 12.71)])
def test_each_step_quotes_the_smallest_difference_its_seeds_could_detect(synthetic_matrix, seeds, t):
    text, data = _report(synthetic_matrix(seeds=seeds))
    n = len(seeds.split(","))
    for step, shift in (("V1", V1_SHIFT), ("H1", H1_SHIFT)):
        d = np.array([shift[s] for s in range(1, n + 1)])
        assert data["resolution"][step] == pytest.approx(t * d.std(ddof=1) / math.sqrt(n), rel=2e-3)
    expected = (f"- **Resolution**: the smallest difference in best val loss the seeds could detect is the 95% CI "
                f"half-width t·sd/√n of the paired per-seed differences with V0 ({n} seeds: t(0.975, {n - 1}) = "
                f"{t:.2f}): V1 ±{data['resolution']['V1']:.4f}, H1 ±{data['resolution']['H1']:.4f}.")
    assert expected in text
    assert f"- **Scope**: {n} seeds, up to 12.0 epochs of the training split" in text


@pytest.mark.parametrize("overrides, epochs, kind", [
    ({}, 3.0, "demo (a tiny model or a CPU run: it shows the pipeline works, it does not answer the research "
              "question); small-data, multi-epoch: 3.0 epochs"),
    (NOT_DEMO, 12.0, "small-data, multi-epoch: 12.0 epochs (passes over the training split, the most of any run), "
                     "so final losses also measure memorisation"),
    (NOT_DEMO, 0.4, "real study; 0.40 epochs: no training token was seen twice"),
])
def test_the_header_says_what_kind_of_study_it_is(synthetic_matrix, overrides, epochs, kind):
    text, data = _report(synthetic_matrix(overrides=overrides, customise=lambda cell, final: {"epochs": epochs}))
    assert f"- **Study**: {kind}" in text and data["study"].startswith(kind)
    assert text.index("- **Study**") < text.index("- **Verdict measure**") < text.index("## Verdicts")


def test_parameters_and_flops_per_token_per_step(synthetic_matrix):
    def bigger_v1(cell, final):
        return {"params": 124_600_000} if cell.step == "V1" else {}

    text, data = _report(synthetic_matrix(customise=bigger_v1))
    header = _row(text, "step")
    assert header[2:4] == ["params", "FLOPs/token"]
    assert _row(text, "V0")[2:4] == ["124M", "744M"] and _row(text, "V1")[2:4] == ["125M", "748M"]
    steps = {s["variant"]: s for s in data["steps"]}
    assert steps["V1"]["flops_per_token"] == 6.0 * 124_600_000 + 12 * 2 * 4 * 16 * 32


def test_throughput_noise_and_busy_machines_are_flagged(synthetic_matrix):
    text, data = _report(synthetic_matrix())
    assert ("- **Throughput**: every step's tokens/s is within 10% across its seeds on one device, and no cell's "
            "machine was measurably busy.") in text
    assert data["throughput_flags"] == [] and "Throughput was noisy" not in text

    def noisy(cell, final):
        if cell.id == "H1-s2":  # 70 tokens/s against 100 on the other seeds: 43% apart on the same GPU
            return {"tokens_per_s": 70.0}
        if cell.id == "V0-s3":
            return {"machine": {**IDLE, "busy": True, "load_avg_max": 31.0,
                                "busy_reason": "load average up to 31.0 on 16 CPUs"}}
        return {}

    text, data = _report(synthetic_matrix(customise=noisy))
    assert data["throughput_flags"] == ["H1's tokens/s differs by 43% across its seeds on the same device",
                                        "V0/s3 ran on a busy machine (load average up to 31.0 on 16 CPUs)"]
    assert ("- **Throughput**: **noisy**: H1's tokens/s differs by 43% across its seeds on the same device; V0/s3 ran "
            "on a busy machine (load average up to 31.0 on 16 CPUs). Tokens/s and the matched-time comparison mean "
            "little there.") in text
    assert "Throughput was noisy" in text.split("## Matched comparisons")[1].split("##")[0]
    assert _row(text, "V0/s3")[9] == "busy: load average up to 31.0 on 16 CPUs"
