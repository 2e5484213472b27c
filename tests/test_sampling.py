"""The one background sampler: fixed schedule, no catch-up bursts, failed readings skipped."""

import time

import numpy as np

from benchmarks.speed import RssSampler
from evaluation.sampling import PeriodicSampler


def test_readings_follow_a_fixed_schedule_and_a_slow_one_is_not_caught_up():
    stamps = []

    def read():
        stamps.append(time.monotonic())
        if len(stamps) == 3:
            time.sleep(0.25)  # misses about five 0.05 s slots
        return len(stamps)

    sampler = PeriodicSampler(read, 0.05).start()
    time.sleep(0.6)
    samples = sampler.stop()
    assert samples == list(range(1, len(samples) + 1))
    assert stamps[3] - stamps[2] >= 0.24  # the slow reading
    # no burst of catch-up readings after it: at most one reading per slot left
    assert len(stamps) - 3 <= (stamps[-1] - stamps[3]) / 0.05 + 2
    assert 4 <= len(samples) <= 12  # 0.6 s at 0.05 s, less the skipped slots


def test_a_failing_reading_is_skipped_and_reported_once(capsys):
    calls = []

    def read():
        calls.append(1)
        if len(calls) % 2:
            raise OSError("device gone")
        return len(calls)

    sampler = PeriodicSampler(read, 0.02, name="probe").start()
    time.sleep(0.2)
    samples = sampler.stop()
    assert samples and all(value % 2 == 0 for value in samples)
    err = capsys.readouterr().err
    assert err.count("probe: a sample failed and was skipped") == 1 and "device gone" in err


def test_rss_sampler_sees_this_process_grow():
    sampler = RssSampler(interval_s=0.005).start()
    before = time.time()
    time.sleep(0.05)
    block = np.ones(200 * 2 ** 20 // 8)  # 200 MB, touched
    time.sleep(0.05)
    after = time.time()
    samples = sampler.stop()
    assert samples and all(len(sample) == 2 for sample in samples)
    start_mb = min(rss for t, rss in samples if t <= before + 0.05) / 2 ** 20
    assert sampler.peak_mb(before, after) >= start_mb + 150
    assert sampler.peak_mb(after + 10, after + 20) is None
    del block
