"""The GPU trace check's verdicts on sample series built to be right and built to be wrong.

The check itself needs a GPU (``python -m evaluation.check_trace_gpu``); here its judgement is
tested on series shaped like the ones NVML gave on an H200.
"""

import argparse

import pytest

from evaluation.check_trace_gpu import check_case
from evaluation.gpu_load import hold
from evaluation.trace import flare21_max_gpu_mb

BEFORE, CONTEXT, START = 615.0, 620.0, 1000.0
HOLDS = [{"mib": 1024, "begin": START + 4.0, "end": START + 6.0},
         {"mib": 4096, "begin": START + 6.0, "end": START + 8.0}]


def series(lag_s=0.0, noise_mib=0.0, end_s=8.5):
    """Samples every 0.1 s of a load that holds HOLDS; NVML reports the state ``lag_s`` late."""
    samples = []
    for i in range(int(end_s / 0.1)):
        t = START + i * 0.1
        seen = t - lag_s
        used = BEFORE + (CONTEXT if seen >= START + 3.9 else 0.0)
        for held in HOLDS:
            if held["begin"] <= seen < held["end"]:
                used += held["mib"]
        if seen >= START + 8.0:
            used = BEFORE
        used += noise_mib * (i % 2)
        samples.append({"t_s": i * 0.1, "unix_time_s": t, "gpu_used_mb": used})
    return samples


def result_of(samples, tree_max=4096 + CONTEXT):
    used = [s["gpu_used_mb"] for s in samples]
    return {"gpu_used_before_mb": BEFORE, "gpu_max_mb_flare21": flare21_max_gpu_mb(used),
            "gpu_tree_max_mb": tree_max, "mean_interval_s": 0.1, "max_interval_s": 0.1}


def failed(checks):
    return [name for name, passed, _ in checks if not passed]


def test_a_faithful_series_passes_every_check():
    samples = series()
    checks = check_case(result_of(samples), samples, {"holds": HOLDS}, gpu_after_mib=BEFORE)
    assert len(checks) == 7 and failed(checks) == []


def test_samples_that_lag_the_holds_fail():
    samples = series(lag_s=0.5)  # the reading would come half a second after the allocation
    checks = check_case(result_of(samples), samples, {"holds": HOLDS}, gpu_after_mib=BEFORE)
    assert any("hold seen" in name for name in failed(checks))


def test_unsteady_readings_memory_left_behind_and_no_process_memory_fail():
    samples = series(noise_mib=64.0)
    checks = check_case(result_of(samples, tree_max=None), samples, {"holds": HOLDS},
                        gpu_after_mib=BEFORE + 512)
    names = failed(checks)
    assert any("steady" in n for n in names)
    assert any("per-process" in n for n in names)
    assert any("back to the start" in n for n in names)


def test_hold_arguments_are_checked():
    assert hold("4096:2.5") == (4096, 2.5)
    for bad in ("4096", "-1:2", "10:0", "a:b"):
        with pytest.raises(argparse.ArgumentTypeError):
            hold(bad)
