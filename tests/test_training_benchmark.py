"""benchmarks.training: case preparation is timed when a case is prepared, not when it comes from
the cache, and the pipeline alone (--no-network) delivers samples."""

import re

import numpy as np
import pytest
import SimpleITK as sitk

from benchmarks import training as benchmark

pytestmark = pytest.mark.slow  # training benchmark runs (make test-fast skips them)


def test_case_preparation_is_timed_only_when_a_case_is_prepared(tmp_path):
    cases, generating, preparing = benchmark.prepared_cases(tmp_path, count=1)
    assert len(cases) == len(generating) == len(preparing) == 1
    assert min(generating) > 0 and min(preparing) > 0
    again, generating, preparing = benchmark.prepared_cases(tmp_path, count=1)
    assert generating == [] and preparing == []
    assert again[0].name == cases[0].name
    np.testing.assert_array_equal(sitk.GetArrayFromImage(again[0].segmentation_labels),
                                  sitk.GetArrayFromImage(cases[0].segmentation_labels))


def test_pipeline_only_run_prints_preparation_and_sample_rate(tmp_path, capsys):
    benchmark.main(["--no-network", "--stages", "segmentation", "--samples", "2",
                    "--crop-size", "32", "32", "32", "--cache", str(tmp_path),
                    "--image-quality", "1"])
    printed = capsys.readouterr().out
    assert "s / step" not in printed  # no network table
    seconds = re.search(r"2 cases: generation ([0-9.]+) s, preparation for training ([0-9.]+) s",
                        printed)
    assert seconds and float(seconds.group(1)) > 0 and float(seconds.group(2)) > 0
    assert "image quality 1.0) |" in printed
    rate = re.search(r"^\| segmentation \| ([0-9.]+) \|$", printed, re.MULTILINE)
    assert rate and float(rate.group(1)) > 0


def test_help_describes_both_measurements_in_full(capsys):
    with pytest.raises(SystemExit) as done:
        benchmark.parse_args(["--help"])
    assert done.value.code == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert ("network steps per second per stage and precision, and the throughput of the "
            "augmentation pipeline alone (which must outpace the network).") in printed
