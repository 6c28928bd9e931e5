"""The benchmark against the diffusers example's loop runs both loops on the same tiny model (its
timings are measured in benchmarks/, not here)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import vs_diffusers_example as bench  # noqa: E402


@pytest.mark.parametrize("case", [bench.reference_case, bench.ours_case])
def test_both_loops_train_the_asked_steps_and_report_their_figures(case, tiny_sd15):
    figures = case(tiny_sd15, 32, "no", 10)
    assert figures["steps"] == 10
    # 8 example images at batch 1: steps 3-8 are the first epoch, 9-10 the second
    assert figures["median_step_s_epoch1"] > 0 and figures["median_step_s_later"] > 0
    assert 0 < figures["to_first_step_s"] <= figures["total_s"]
    assert 0 < figures["steps_anon_gib"] <= figures["peak_anon_gib"] <= figures["peak_rss_gib"] + 0.05
