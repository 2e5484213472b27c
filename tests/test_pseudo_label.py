"""Pseudo-labels: the command's folder (labels on the input grid, the ignore mask exactly the
uncertain voxels), ignore masks through caching and augmentation, losses that ignore them, and
a short training run on such a folder. Real parts: the shipped weights, SimpleITK, TensorFlow,
the filesystem."""

import contextlib
import csv
import io
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
import tensorflow as tf

from app import method
from app.geometry import Grid, from_canonical, to_canonical
from app.localization import Roi, localization_grid
from app.predictor import Predictor
from app.segmentation import drop_islands
from app.weights import DEFAULT_WEIGHTS_DIR
from synthetic import generate_case
from training import augment
from training.cases import prepare_case
from training.losses import localization_loss, scn_loss
from training.coverage import ALL_ORGANS
from training.pseudo_label import (PLAUSIBLE_ADULT_ML, Prediction, RECORD, main, plausible_organs,
                                   read_folder, uncertain_mask)

MIN_PROBABILITY = 0.9
PRECISION = "float32"  # the test computes the probabilities again in the same precision
SEEDS = (1, 2)  # case1: RPI-like axes, case2: axes permuted (both reoriented for the networks)


@pytest.fixture(scope="module")
def pseudo_folder(tmp_path_factory):
    """Two generated cases and one corrupt file, pseudo-labelled by the command:
    (input folder, output folder, exit status, stderr)."""
    images = tmp_path_factory.mktemp("unlabelled")
    for seed in SEEDS:
        image, _ = generate_case(seed, in_plane_size=96)
        sitk.WriteImage(image, str(images / f"case{seed}_0000.nii.gz"))
    (images / "broken_0000.nii.gz").write_bytes(b"\x1f\x8b\x08 truncated")
    out = tmp_path_factory.mktemp("pseudo")
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        status = main([str(images), "--weights", str(DEFAULT_WEIGHTS_DIR), "--out", str(out),
                       "--min-probability", str(MIN_PROBABILITY), "--precision", PRECISION])
    return images, out, status, stderr.getvalue()


@pytest.fixture(scope="module")
def predictor():
    return Predictor(DEFAULT_WEIGHTS_DIR, precision=PRECISION)


def reference_labels_and_confidence(predictor, image):
    """Labels, the largest class probability and the margin to the second largest, each a
    (z, y, x) array on the input's grid, computed the reference way: the predictor's steps,
    then SimpleITK's linear resampling of all channels onto the ROI (as
    ``labels_on_roi(plain=True)``) and its argmax, an organ's small pieces dropped as
    ``drop_islands`` drops them on the whole image; outside the ROI background, probability 1."""
    canonical, orientation = to_canonical(image)
    grid = Grid.of(canonical)
    loc_grid = localization_grid(grid)
    roi = predictor.roi(predictor.localization_input(canonical, loc_grid), loc_grid, grid)
    crop_grid, crop = predictor.segmentation_input(canonical, roi)
    probabilities = predictor.segmentation_probabilities(crop)
    vector = sitk.GetImageFromArray(probabilities.astype(np.float32), isVector=True)
    vector.SetSpacing(crop_grid.spacing_mm)
    vector.SetOrigin(crop_grid.origin_mm)
    vector.SetDirection(crop_grid.direction)
    on_roi = sitk.GetArrayFromImage(sitk.Resample(
        vector, roi.grid(grid).reference(), sitk.Transform(), sitk.sitkLinear, 0.0,
        sitk.sitkVectorFloat32))
    ranked = np.sort(on_roi, axis=-1)
    (x0, y0, z0), (x1, y1, z1) = roi.start, roi.stop
    arrays = []
    for inside, outside, dtype in ((np.argmax(on_roi, axis=-1), 0, np.uint8),
                                   (ranked[..., -1], 1, np.float32),
                                   (ranked[..., -1] - ranked[..., -2], 1, np.float32)):
        full = np.full(tuple(reversed(grid.size)), outside, dtype)
        full[z0:z1, y0:y1, x0:x1] = inside
        if dtype == np.uint8:  # the predictor's step after the argmax, on the whole image
            drop_islands(full, predictor.min_island_fraction)
        full = sitk.GetImageFromArray(full)
        full.CopyInformation(canonical)
        arrays.append(sitk.GetArrayFromImage(from_canonical(full, orientation, image)))
    return arrays


def test_a_corrupt_input_fails_by_its_name_and_the_other_cases_are_written(pseudo_folder):
    images, out, status, stderr = pseudo_folder
    assert status == 1
    record = json.loads((out / RECORD).read_text())
    assert sorted(record["cases"]) == [f"case{seed}" for seed in SEEDS]
    assert str(images / "broken_0000.nii.gz") in record["failed"]["broken"]
    assert f"broken: FAILED: {images / 'broken_0000.nii.gz'}" in stderr
    assert not (out / "labels" / "broken.nii.gz").exists()
    assert not (out / "images" / "broken_0000.nii.gz").exists()
    # nothing half-written: no temporary entry is left anywhere
    assert not [p for p in out.rglob("*") if p.name.startswith(".partial-")]
    assert record["min_probability"] == MIN_PROBABILITY and record["second_weights"] is None
    assert record["min_island_fraction"] == method.MIN_ISLAND_FRACTION == 0.1
    assert record["weights"]["folder"] == str(DEFAULT_WEIGHTS_DIR.resolve())
    assert record["weights"]["segmentation"]["iterations"] > 0


@pytest.mark.parametrize("seed", SEEDS)
def test_labels_lie_on_the_input_grid_and_ignore_exactly_the_uncertain_voxels(
        pseudo_folder, predictor, seed):
    images, out, _, _ = pseudo_folder
    name = f"case{seed}"
    source = images / f"{name}_0000.nii.gz"
    image = sitk.ReadImage(str(source))
    labels = sitk.ReadImage(str(out / "labels" / f"{name}.nii.gz"))
    ignore = sitk.ReadImage(str(out / "ignore" / f"{name}.nii.gz"))
    # a NIfTI input is copied byte for byte
    assert (out / "images" / f"{name}_0000.nii.gz").read_bytes() == source.read_bytes()
    for written in (labels, ignore):
        assert written.GetPixelID() == sitk.sitkUInt8
        assert written.GetSize() == image.GetSize()
        assert written.GetSpacing() == image.GetSpacing()
        assert written.GetOrigin() == image.GetOrigin()
        assert written.GetDirection() == image.GetDirection()
    # the labels are the predictor's: the argmax of its probabilities on the input grid, and
    # ignored = the largest probability below the threshold (voxels within float rounding of a
    # tie or of the threshold may go either way)
    expected, confidence, margin = reference_labels_and_confidence(predictor, image)
    label_array = sitk.GetArrayViewFromImage(labels)
    assert (margin > 1e-5).mean() > 0.999
    np.testing.assert_array_equal(label_array[margin > 1e-5], expected[margin > 1e-5])
    ignored = sitk.GetArrayViewFromImage(ignore).astype(bool)
    clear = np.abs(confidence - MIN_PROBABILITY) > 1e-5
    assert clear.mean() > 0.999
    np.testing.assert_array_equal(ignored[clear], confidence[clear] < MIN_PROBABILITY)
    assert ignored.any() and not ignored.all() and label_array.any()
    # the record's volumes and shares are the label map's
    entry = json.loads((out / RECORD).read_text())["cases"][name]
    voxel_ml = math.prod(image.GetSpacing()) / 1000
    for label, organ in method.LABELS.items():
        assert entry["volumes_ml"][organ] == pytest.approx(
            (label_array == label).sum() * voxel_ml, abs=0.01)
    assert entry["ignored_share"] == pytest.approx(ignored.mean(), abs=1e-6)
    assert entry["ignored_share_of_organ_voxels"] == pytest.approx(
        ignored[label_array > 0].mean(), abs=1e-6)


def test_the_labels_are_those_of_predictor_predict(pseudo_folder, predictor):
    """The command repeats predict's steps to reach the probabilities: its labels must stay
    predict's."""
    images, out, _, _ = pseudo_folder
    name = f"case{SEEDS[-1]}"
    expected = predictor.predict(sitk.ReadImage(str(images / f"{name}_0000.nii.gz"))).labels
    written = sitk.ReadImage(str(out / "labels" / f"{name}.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written),
                                  sitk.GetArrayFromImage(expected))


def test_second_weights_disagreement_is_ignored_beside_the_uncertain_voxels():
    image = sitk.Image([6, 5, 4], sitk.sitkUInt8)
    image.SetSpacing((1.0, 2.0, 3.0))
    labels = sitk.GetArrayFromImage(image)
    labels[1:3, 1:4, 1:5] = 1
    first = sitk.GetImageFromArray(labels)
    first.CopyInformation(image)
    second_array = labels.copy()
    second_array[2, 2, 4] = 3
    second = sitk.GetImageFromArray(second_array)
    second.CopyInformation(image)
    roi = Roi((1, 1, 1), (4, 3, 2))
    confidence = np.ones((2, 3, 4), np.float32)
    confidence[0, 0, 0] = 0.5  # image voxel (z, y, x) = (1, 1, 1)
    prediction = Prediction(first, confidence, roi, Grid.of(image), "LPS")
    mask = sitk.GetArrayFromImage(uncertain_mask(prediction, 0.9, second))
    assert sorted(map(tuple, np.argwhere(mask))) == [(1, 1, 1), (2, 2, 4)]
    alone = sitk.GetArrayFromImage(uncertain_mask(prediction, 0.9))
    assert sorted(map(tuple, np.argwhere(alone))) == [(1, 1, 1)]


def test_read_folder_lists_the_recorded_cases_with_their_files(pseudo_folder):
    _, out, _, _ = pseudo_folder
    cases = read_folder(out)
    assert [name for name, *_ in cases] == [f"case{seed}" for seed in SEEDS]
    name, image, labels, ignore, digests, covered = cases[0]
    assert image == out / "images" / f"{name}_0000.nii.gz" and ignore.is_file()
    assert set(digests) == {"labels", "ignore"}
    # without --plausible-only every organ is covered, and the record says so
    record = json.loads((out / RECORD).read_text())
    assert covered == ALL_ORGANS and record["covered"] == {"rule": "every organ"}
    assert record["cases"][name]["covered"] == list(method.LABELS.values())


def test_plausible_organs_are_those_inside_the_adult_ranges():
    inside = {organ: (low + high) / 2 for organ, (low, high) in PLAUSIBLE_ADULT_ML.items()}
    assert plausible_organs(inside) == list(PLAUSIBLE_ADULT_ML)
    edges = {organ: low for organ, (low, _) in PLAUSIBLE_ADULT_ML.items()}
    assert plausible_organs(edges) == list(PLAUSIBLE_ADULT_ML)  # the range includes its ends
    shipped_pancreas = dict(inside, pancreas=48.0, spleen=401.0)  # too small, too large
    assert plausible_organs(shipped_pancreas) == ["liver", "kidney"]


def test_plausible_only_records_the_organs_each_case_covers(pseudo_folder, tmp_path):
    """The command with --plausible-only: each case covers exactly the organs its own
    predicted volumes make plausible, and read_folder hands training those label ids. The case
    is a generated patient shrunk to 0.85 of its size (its voxels' spacing), so that some organs
    are too small to be an adult's."""
    images, _, _, _ = pseudo_folder
    single = tmp_path / "in"
    single.mkdir()
    name = f"case{SEEDS[0]}"
    image = sitk.ReadImage(str(images / f"{name}_0000.nii.gz"))
    image.SetSpacing([0.85 * spacing for spacing in image.GetSpacing()])
    sitk.WriteImage(image, str(single / f"{name}_0000.nii.gz"))
    out = tmp_path / "out"
    assert main([str(single), "--weights", str(DEFAULT_WEIGHTS_DIR), "--out", str(out),
                 "--precision", PRECISION, "--plausible-only"]) == 0
    record = json.loads((out / RECORD).read_text())
    assert record["covered"]["rule"] == "plausible adult volume"
    entry = record["cases"][name]
    expected = [organ for organ, (low, high) in PLAUSIBLE_ADULT_ML.items()
                if low <= entry["volumes_ml"][organ] <= high]
    assert entry["covered"] == expected
    assert 0 < len(expected) < len(PLAUSIBLE_ADULT_ML), entry["volumes_ml"]  # a case that tells
    ids = {organ: label for label, organ in method.LABELS.items()}
    [(_, *_, covered)] = read_folder(out)
    assert covered == tuple(sorted(ids[organ] for organ in expected))


def edited_record(pseudo_folder, tmp_path, covered_by_case):
    """A copy of the pseudo-label folder whose record gives the cases this coverage."""
    import shutil

    _, out, _, _ = pseudo_folder
    copy = tmp_path / "pseudo"
    shutil.copytree(out, copy)
    record = json.loads((copy / RECORD).read_text())
    for name, covered in covered_by_case.items():
        record["cases"][name]["covered"] = covered
    (copy / RECORD).write_text(json.dumps(record))
    return copy


def test_read_folder_reads_a_case_covering_some_or_no_organ_and_names_a_bad_entry(
        pseudo_folder, tmp_path):
    folder = edited_record(pseudo_folder, tmp_path, {"case1": ["liver", "spleen"], "case2": []})
    assert [case[-1] for case in read_folder(folder)] == [(1, 3), ()]
    record = json.loads((folder / RECORD).read_text())
    del record["cases"]["case2"]["covered"]  # a record written before coverage was recorded
    record["cases"]["case1"]["covered"] = ["liver", "gallbladder"]
    (folder / RECORD).write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"pseudo_labels\.json.*case1.*gallbladder"):
        read_folder(folder)
    del record["cases"]["case1"]
    (folder / RECORD).write_text(json.dumps(record))
    assert [case[-1] for case in read_folder(folder)] == [ALL_ORGANS]


def test_training_takes_each_pseudo_case_with_its_coverage_and_leaves_out_one_with_none(
        pseudo_folder, tmp_path, capsys):
    import argparse

    from training.train import prepare_pseudo_cases

    folder = edited_record(pseudo_folder, tmp_path, {"case1": ["liver", "kidney"], "case2": []})
    args = argparse.Namespace(pseudo=[folder], cache=tmp_path / "cache", run=tmp_path / "run",
                              stage="segmentation", workers=1)
    cases = prepare_pseudo_cases(args)
    assert [(case.name, case.covered) for case in cases] == [("case1", (1, 2))]
    assert case_left_out("case2") in capsys.readouterr().out
    # the cache entry is the files' content: another coverage of the same files reuses it
    again = edited_record(pseudo_folder, tmp_path / "again", {"case1": ["pancreas"]})
    args.pseudo = [again]
    cases = prepare_pseudo_cases(args)
    assert [(case.name, case.covered) for case in cases] == [("case1", (4,)), ("case2", ALL_ORGANS)]
    assert len(list((tmp_path / "cache").iterdir())) == 2


def case_left_out(name):
    return f"warning: pseudo-labelled case left out: {name}: its labels cover no organ"


def phantom_with_ignore():
    """A small prepared case whose ignore mask is its pancreas (label 4)."""
    labels = np.zeros((40, 50, 60), np.uint8)
    labels[10:30, 15:35, 10:30] = 1
    labels[15:25, 20:40, 35:50] = 4
    image = sitk.GetImageFromArray(100 * labels.astype(np.int16) - 500)
    image.SetSpacing((3.0, 3.0, 3.0))
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(image)
    ignore = sitk.GetImageFromArray((labels == 4).astype(np.uint8))
    ignore.CopyInformation(image)
    return prepare_case("phantom", image, label_image, ignore=ignore)


def test_the_ignore_mask_follows_the_labels_through_caching_and_augmentation(tmp_path):
    from training.store import cached, load

    case = phantom_with_ignore()
    cached(tmp_path, "phantom", lambda: case)
    case = load(tmp_path / "phantom")
    assert case.segmentation_ignore is not None and case.localization_ignore is not None
    ranges = augment.AugmentationRanges(slab_probability=0.5)
    for seed in range(4):
        image, labels, ignore = augment.segmentation_sample(
            case, np.random.default_rng(seed), (32, 32, 32), ranges, with_ignore=True)
        # nearest neighbour through the same transform: the mask stays the pancreas
        np.testing.assert_array_equal(ignore, (labels == 4).astype(np.uint8))
        same_image, same_labels = augment.segmentation_sample(
            case, np.random.default_rng(seed), (32, 32, 32), ranges)
        np.testing.assert_array_equal(image, same_image)
        np.testing.assert_array_equal(labels, same_labels)
    _, foreground, ignore = augment.localization_sample(case, np.random.default_rng(0),
                                                        with_ignore=True)
    assert ignore.any() and np.all(foreground[ignore > 0] == 1)
    # a case without a mask: nothing ignored, and its cache entry loads without one
    plain = prepare_case("plain", *generate_case(3, in_plane_size=64))
    cached(tmp_path, "plain", lambda: plain)
    plain = load(tmp_path / "plain")
    assert plain.segmentation_ignore is None
    _, _, ignore = augment.segmentation_sample(plain, np.random.default_rng(0), (32, 32, 32),
                                               with_ignore=True)
    assert not ignore.any()


def scn_outputs(seed, shape=(1, 6, 7, 8, 5)):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=shape).astype(np.float32)
    outputs = {"probabilities": tf.nn.softmax(logits).numpy(),
               "local_logits": rng.normal(size=shape).astype(np.float32),
               "spatial_logits": rng.normal(size=shape).astype(np.float32)}
    labels = rng.integers(0, shape[-1], shape[:-1])
    mask = (rng.uniform(size=shape[:-1] + (1,)) > 0.3).astype(np.float32)
    return outputs, tf.one_hot(labels, shape[-1]), mask


PARTIAL = np.array([[1, 1, 0, 1, 0]], np.float32)  # liver and spleen labelled


@pytest.mark.parametrize("coverage", [None, PARTIAL], ids=["full", "partial"])
def test_scn_loss_has_zero_gradient_at_ignored_voxels(coverage):
    outputs, one_hot, mask = scn_outputs(0)
    variables = {key: tf.Variable(value) for key, value in outputs.items()}
    with tf.GradientTape() as tape:
        loss = scn_loss(variables, one_hot, coverage, voxel_mask=mask)
    gradients = tape.gradient(loss, variables)
    ignored, kept = mask[..., 0] == 0, mask[..., 0] == 1
    for key, gradient in gradients.items():
        per_voxel = np.abs(gradient.numpy()).sum(axis=-1)
        assert np.all(per_voxel[ignored] == 0), key
        assert np.all(per_voxel[kept] > 0), key


@pytest.mark.parametrize("coverage", [None, PARTIAL], ids=["full", "partial"])
def test_localization_loss_has_zero_gradient_at_ignored_voxels(coverage):
    rng = np.random.default_rng(1)
    logits = tf.Variable(rng.normal(size=(1, 6, 7, 8, 2)).astype(np.float32))
    labels = rng.integers(0, 2, (1, 6, 7, 8))
    mask = (rng.uniform(size=(1, 6, 7, 8, 1)) > 0.3).astype(np.float32)
    with tf.GradientTape() as tape:
        loss = localization_loss(logits, tf.one_hot(labels, 2), coverage, voxel_mask=mask)
    per_voxel = np.abs(tape.gradient(loss, logits).numpy()).sum(axis=-1)
    ignored = mask[..., 0] == 0
    assert np.all(per_voxel[ignored] == 0)
    # kept: every voxel of a fully labelled case; of a partial one, its labelled organs' voxels
    kept = ~ignored & ((labels == 1) if coverage is not None else True)
    assert np.all(per_voxel[kept] > 0)


@pytest.mark.parametrize("coverage", [None, PARTIAL], ids=["full", "partial"])
def test_nothing_ignored_gives_exactly_the_losses_without_a_mask(coverage):
    outputs, one_hot, mask = scn_outputs(2)
    nothing = np.ones_like(mask)  # the train step's mask of an all-zero ignore mask
    assert float(scn_loss(outputs, one_hot, coverage, voxel_mask=nothing)) == float(
        scn_loss(outputs, one_hot, coverage))
    assert float(scn_loss(outputs, one_hot, coverage, voxel_mask=mask)) != float(
        scn_loss(outputs, one_hot, coverage))
    logits = outputs["local_logits"][..., :2]
    foreground = one_hot[..., :2]
    assert float(localization_loss(logits, foreground, coverage, voxel_mask=nothing)) == float(
        localization_loss(logits, foreground, coverage))


def test_pick_pool_gives_pseudo_labelled_cases_their_share():
    from training.train import pick_pool

    rng = np.random.default_rng(0)
    sources = {"pseudo": ["p"], "real": ["r"], "anatomy": ["a"], "generated": ["g"]}
    draws = [pick_pool(rng, sources["real"], sources["anatomy"], sources["generated"], 0.2, 0.3,
                       sources["pseudo"], 0.25)[0] for _ in range(20000)]
    shares = {source: draws.count(pool[0]) / len(draws) for source, pool in sources.items()}
    assert shares == pytest.approx({"pseudo": 0.25, "real": 0.2, "anatomy": 0.3,
                                    "generated": 0.25}, abs=0.015)
    # alone, pseudo-labelled cases get every sample
    assert pick_pool(rng, [], [], [], 0.2, 0.3, ["p"], 0.25) == ["p"]


@pytest.mark.slow
def test_training_on_a_pseudo_label_folder_runs_and_logs_a_finite_loss(pseudo_folder, tmp_path):
    from training.train import main as train

    _, out, _, _ = pseudo_folder
    run = tmp_path / "run"
    train(["--stage", "segmentation", "--run", str(run), "--pseudo", str(out), "--generated", "0",
           "--validation", "0", "--crop-size", "32", "32", "32", "--iterations", "20",
           "--checkpoint-every", "100", "--precision", "float32", "--workers", "1"])
    with open(run / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["iteration"] for row in rows] == ["20"]
    assert np.isfinite(float(rows[0]["loss"])) and float(rows[0]["loss"]) > 0
    # the pseudo-labelled cases were cached with their ignore masks
    entries = sorted((run / "cache").iterdir())
    assert [entry.name.split("_")[1] for entry in entries] == [f"case{seed}" for seed in SEEDS]
    assert all(json.loads((entry / "meta.json").read_text())["ignore"] for entry in entries)
