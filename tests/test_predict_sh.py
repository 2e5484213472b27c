"""predict.sh as users run it: real subprocesses on generated cases and on real CT."""

import json
import shutil
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk

from evaluation.metrics import organ_dice
from synthetic import write_case
from tests.conftest import ROOT

PREDICT = str(ROOT / "predict.sh")


@pytest.fixture(scope="module")
def generated_inputs(tmp_path_factory):
    """Two generated cases in FLARE naming (images in inputs/, labels in labels/)."""
    base = tmp_path_factory.mktemp("cases")
    inputs, labels = base / "inputs", base / "labels"
    inputs.mkdir()
    labels.mkdir()
    for index, seed in enumerate((21, 22)):
        image_path, label_path = write_case(base / "written", f"case_{index:04d}", seed,
                                            in_plane_size=160, max_voxels=160 * 160 * 80)
        shutil.move(image_path, inputs / image_path.name)
        shutil.move(label_path, labels / label_path.name)
    (inputs / "notes.txt").write_text("not an image, not FLARE-named: ignored")
    return inputs, labels


def run_predict(*args):
    return subprocess.run([PREDICT, *map(str, args)], capture_output=True, text=True,
                          encoding="utf-8", errors="replace", timeout=600)


def test_predict_sh_segments_every_case_with_flare_naming_and_reports(generated_inputs, tmp_path):
    inputs, labels = generated_inputs
    outputs, report = tmp_path / "outputs", tmp_path / "report.jsonl"
    completed = run_predict(inputs, outputs, "--report", report)
    assert completed.returncode == 0, completed.stderr
    assert sorted(p.name for p in outputs.iterdir()) == ["case_0000.nii.gz", "case_0001.nii.gz"]
    records = [json.loads(line) for line in report.read_text().splitlines()]
    assert [r["case"] for r in records] == ["case_0000", "case_0001"]
    for record in records:
        assert set(record) >= {"input", "output", "size_xyz", "spacing_mm_xyz", "roi_index",
                               "roi_mm", "localization_spacing_mm", "segmentation_spacing_mm",
                               "seconds", "peak_memory_mb", "volumes_ml"}
        assert record["seconds"]["segmentation_network"] > 0
        assert f"{record['case']}: size" in completed.stdout
        output = sitk.ReadImage(record["output"])
        reference = sitk.ReadImage(str(labels / f"{record['case']}.nii.gz"))
        scores = organ_dice(output, reference)
        assert scores["liver"] >= 0.6, scores
        voxel_ml = np.prod(output.GetSpacing()) / 1000
        liver_ml = (sitk.GetArrayViewFromImage(output) == 1).sum() * voxel_ml
        assert record["volumes_ml"]["liver"] == pytest.approx(liver_ml, rel=1e-3)


def test_one_bad_case_fails_alone_and_leaves_no_output(generated_inputs, tmp_path):
    inputs, _ = generated_inputs
    mixed = tmp_path / "inputs"
    shutil.copytree(inputs, mixed)
    good = (mixed / "case_0000_0000.nii.gz").read_bytes()
    (mixed / "broken_0000.nii.gz").write_bytes(good[: len(good) // 3])  # truncated gzip
    outputs = tmp_path / "outputs"
    completed = run_predict(mixed, outputs, "--quiet")
    assert completed.returncode == 1
    assert "broken: FAILED" in completed.stderr and "broken_0000.nii.gz" in completed.stderr
    assert sorted(p.name for p in outputs.iterdir()) == ["case_0000.nii.gz", "case_0001.nii.gz"]


def test_empty_input_folder_is_an_error(tmp_path):
    (tmp_path / "in").mkdir()
    completed = run_predict(tmp_path / "in", tmp_path / "out")
    assert completed.returncode == 2 and "no images named" in completed.stderr


def test_predict_sh_on_real_ct(shared_data, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    shutil.copy(shared_data / "images" / "ts_example_0000.nii.gz", inputs)
    completed = run_predict(inputs, tmp_path / "outputs", "--quiet")
    assert completed.returncode == 0, completed.stderr
    output = sitk.ReadImage(str(tmp_path / "outputs" / "ts_example.nii.gz"))
    reference = sitk.ReadImage(str(shared_data / "labels" / "ts_example.nii.gz"))
    image = sitk.ReadImage(str(inputs / "ts_example_0000.nii.gz"))
    assert (output.GetSize(), output.GetSpacing(), output.GetOrigin(), output.GetDirection()) == (
        image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    assert organ_dice(output, reference)["liver"] >= 0.5
