"""Evaluation: DSC and NSD exactly as the FLARE challenges compute them.

The reference is the challenges' own method, the PyPI package ``surface-distance`` 0.1 (DeepMind),
used here only (it fails on empty masks under NumPy 2, so those cases are checked against the
challenge's rules instead). Arrays are (z, y, x), spacings (z, y, x) = SimpleITK's reversed.
"""

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import surface_distance as reference
from scipy import ndimage
from surface_distance import lookup_tables

from evaluation import surface
from evaluation.evaluate import (case_name, evaluate_folder, files_by_case, make_protocol,
                                 parse_organs)
from evaluation.metrics import challenge_scores
from tests.conftest import ROOT

SPACINGS_MM = [(1.0, 1.0, 1.0), (2.5, 0.8, 0.8), (0.8, 0.8, 2.5), (3.0, 0.7, 1.3),
               (0.5, 2.0, 1.1), (5.0, 0.6, 0.9)]
ORGANS = {1: "liver", 2: "kidney", 3: "spleen", 4: "pancreas"}
FLARE22_TOLERANCES_MM = {"liver": 5.0, "kidney": 3.0, "spleen": 3.0, "pancreas": 5.0}


def reference_nsd(label, prediction, spacing_mm, tolerance_mm):
    distances = reference.compute_surface_distances(label, prediction, spacing_mm)
    return reference.compute_surface_dice_at_tolerance(distances, tolerance_mm)


def box_mask(shape, start, size):
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(a, a + n) for a, n in zip(start, size))] = True
    return mask


def ball_mask(shape, centre, radius_vox):
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius_vox ** 2


def box_area_mm2(size, spacing_mm):
    """Area of the surface around a box of voxels, from geometry alone: the faces run between the
    outer voxel centres, the 12 edges are 45-degree strips, the 8 corners are triangles."""
    a, b, c = spacing_mm
    lz, ly, lx = [(n - 1) * s for n, s in zip(size, spacing_mm)]
    faces = 2 * (ly * lx + lz * lx + lz * ly)
    edges = 2 * lz * math.hypot(b, c) + 2 * ly * math.hypot(a, c) + 2 * lx * math.hypot(a, b)
    return faces + edges + single_voxel_area_mm2(spacing_mm)


def single_voxel_area_mm2(spacing_mm):
    """8 corner triangles with vertices at half a voxel along each axis."""
    a, b, c = spacing_mm
    return math.sqrt((a * b) ** 2 + (a * c) ** 2 + (b * c) ** 2)


def random_pair(seed):
    """A label and a prediction (both non-empty, boolean, (z, y, x)) and an anisotropic spacing:
    smooth blobs touching the border, with the prediction dilated/eroded, shifted, independent, or
    speckled with a far stray voxel, depending on the seed."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(12, 34, size=3))
    spacing = tuple(float(s) for s in np.round(np.exp(rng.uniform(np.log(0.4), np.log(4.0), 3)), 3))

    def blob():
        field = ndimage.gaussian_filter(rng.standard_normal(shape), rng.uniform(1.0, 3.0))
        return field > rng.uniform(-0.3, 1.0) * field.std()

    label = blob()
    kind = seed % 4
    if kind == 0:
        prediction = ndimage.binary_dilation(label) & ~(rng.random(shape) < 0.05)
        prediction = ndimage.binary_erosion(prediction) if seed % 8 == 0 else prediction
    elif kind == 1:
        shift = tuple(int(k) for k in rng.integers(-2, 3, size=3))
        prediction = np.roll(label, shift, axis=(0, 1, 2))
    elif kind == 2:
        prediction = blob()
    else:
        prediction = label ^ (rng.random(shape) < 0.01)
        prediction[-1, 0, -1] = True
    label[0, 0, 0], prediction[1, 1, 1] = True, True  # never empty
    return label, prediction, spacing


# --- The neighbour-code table ---------------------------------------------------------------------

@pytest.mark.parametrize("spacing_mm", SPACINGS_MM)
def test_neighbour_code_areas_equal_the_reference_table_for_all_256_codes(spacing_mm):
    ours = surface.neighbour_code_areas_mm2(spacing_mm)
    theirs = lookup_tables.create_table_neighbour_code_to_surface_area(spacing_mm)
    assert ours.shape == (256,)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)


def test_complementary_codes_have_the_same_area():
    areas = surface.neighbour_code_areas_mm2((2.5, 0.8, 0.7))
    np.testing.assert_allclose(areas, areas[::-1], rtol=0, atol=1e-12)
    assert areas[0] == 0 and areas[255] == 0 and np.all(areas[1:255] > 0)


def test_neighbour_codes_follow_the_reference_bit_order():
    mask = np.random.default_rng(3).random((7, 6, 5)) < 0.4
    # The reference correlates its 2x2x2 kernel with the mask padded by one voxel at the far end.
    expected = ndimage.correlate(np.pad(mask, (0, 1)).astype(np.uint8),
                                 lookup_tables.ENCODE_NEIGHBOURHOOD_3D_KERNEL, mode="constant",
                                 cval=0)
    np.testing.assert_array_equal(surface.neighbour_codes(mask), expected)


@pytest.mark.parametrize("spacing_mm", SPACINGS_MM[:4])
def test_single_voxel_and_box_areas_are_analytic(spacing_mm):
    voxel = box_mask((5, 5, 5), (2, 2, 2), (1, 1, 1))
    assert surface.surface_points(voxel, spacing_mm)[1].sum() == pytest.approx(
        single_voxel_area_mm2(spacing_mm), abs=1e-9)
    box = box_mask((12, 14, 16), (2, 3, 4), (5, 7, 9))
    assert surface.surface_points(box, spacing_mm)[1].sum() == pytest.approx(
        box_area_mm2((5, 7, 9), spacing_mm), abs=1e-9)


def test_a_mask_touching_the_array_border_is_closed_there():
    full = np.ones((3, 4, 5), dtype=bool)
    assert surface.surface_points(full, (1.0, 1.0, 1.0))[1].sum() == pytest.approx(
        box_area_mm2((3, 4, 5), (1.0, 1.0, 1.0)), abs=1e-9)


# --- Surfels --------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
def test_surfels_and_their_areas_equal_the_reference(seed):
    label, _, spacing = random_pair(seed)
    corners, areas = surface.surface_points(label, spacing)
    theirs = reference.compute_surface_distances(label, label, spacing)["surfel_areas_gt"]
    assert len(corners) == len(theirs) == len(np.unique(corners, axis=0))
    np.testing.assert_allclose(np.sort(areas), np.sort(theirs), rtol=0, atol=1e-9)


def test_far_apart_objects_get_small_separate_boxes_and_the_same_surfels():
    mask = np.zeros((60, 120, 120), dtype=bool)
    mask[5:20, 10:40, 10:50] = ball_mask((15, 30, 40), (7, 15, 20), 9)
    mask[57:60, 117:120, 115:118] = True  # a stray 27-voxel blob in the far corner, on the border
    boxes = surface.occupied_boxes(mask)
    assert len(boxes) == 2
    covered = np.zeros_like(mask)
    for box in boxes:
        covered[box] = True
    assert np.array_equal(covered & mask, mask)
    assert covered.sum() < 0.02 * mask.size
    whole_codes = surface.neighbour_codes(mask)  # no boxes: the whole array at once
    whole = np.argwhere((whole_codes != 0) & (whole_codes != 255))
    corners, _ = surface.surface_points(mask, (1.0, 1.0, 1.0))
    assert np.array_equal(np.unique(corners, axis=0), np.unique(whole, axis=0))
    assert surface.occupied_boxes(np.zeros((4, 4, 4), dtype=bool)) == []


# --- Distances at the tolerance -------------------------------------------------------------------

def test_lookup_and_kdtree_agree_with_a_distance_transform_including_exact_ties():
    rng = np.random.default_rng(7)
    spacing = (2.5, 0.8, 0.7)
    other_grid = rng.random((10, 16, 18)) < 0.01
    other_grid[5, 8, 9] = True
    other = np.argwhere(other_grid)
    corners = np.argwhere(np.ones(other_grid.shape, dtype=bool))
    # what the reference uses
    truth_mm = ndimage.distance_transform_edt(~other_grid, sampling=spacing)
    exact = [2 * 0.8, 2.5, math.sqrt((1 * 2.5) ** 2 + (1 * 0.8) ** 2 + (2 * 0.7) ** 2), 3 * 0.7]
    for tolerance in exact + [0.0, 0.5, 1.0, 2.0, 4.9999, 5.0, 7.5]:
        expected = truth_mm[tuple(corners.T)] <= tolerance
        assert expected.any() and not expected.all()
        offsets = surface.offsets_within(spacing, tolerance)
        found = surface.found_at_offsets(corners, other, offsets)
        assert np.array_equal(found, expected), tolerance
        assert np.array_equal(surface.nearest_within_kdtree(corners, other, spacing, tolerance),
                              expected), tolerance
        assert np.array_equal(surface.within_tolerance(corners, other, spacing, tolerance),
                              expected), tolerance
    # within_tolerance took both routes above: a complete lookup (small) and the k-d tree (large).
    assert surface.lookup_offsets(spacing, 1.0)[1] and not surface.lookup_offsets(spacing, 5.0)[1]


@pytest.mark.parametrize("spacing_mm, axis, shift, tolerance_mm", [
    ((2.5, 0.8, 0.8), 0, 2, 5.0),    # 2 slices of 2.5 mm: k-d tree route
    ((2.5, 0.8, 0.7), 2, 1, 0.7),    # one in-plane voxel: lookup route
    ((1.0, 1.0, 1.0), 1, 3, 3.0),
])
def test_a_shift_by_exactly_the_tolerance_counts_and_just_below_it_does_not(spacing_mm, axis, shift,
                                                                           tolerance_mm):
    label = box_mask((16, 18, 20), (3, 4, 5), (8, 9, 10))
    prediction = np.roll(label, shift, axis=axis)
    assert surface.surface_dice(label, prediction, spacing_mm, tolerance_mm) == 1.0
    below = surface.surface_dice(label, prediction, spacing_mm, tolerance_mm - 1e-4)
    assert below < 1.0
    assert below == pytest.approx(reference_nsd(label, prediction, spacing_mm, tolerance_mm - 1e-4),
                                  abs=1e-6)
    assert reference_nsd(label, prediction, spacing_mm, tolerance_mm) == pytest.approx(
        1.0, abs=1e-12)


# --- Surface Dice: analytic cases and the reference -----------------------------------------------

def test_a_far_single_voxel_false_positive_gives_the_analytic_surface_dice():
    spacing = (2.5, 0.8, 0.7)
    label = box_mask((30, 40, 40), (3, 4, 5), (6, 8, 10))
    prediction = label.copy()
    prediction[27, 36, 36] = True
    box, voxel = box_area_mm2((6, 8, 10), spacing), single_voxel_area_mm2(spacing)
    expected = 2 * box / (2 * box + voxel)
    assert surface.surface_dice(label, prediction, spacing, 1.0) == pytest.approx(
        expected, abs=1e-12)
    assert reference_nsd(label, prediction, spacing, 1.0) == pytest.approx(expected, abs=1e-12)


def test_concentric_spheres_4_mm_apart_score_0_at_1_mm_and_1_at_6_mm():
    inner = ball_mask((32, 32, 32), (16, 16, 16), 8)
    outer = ball_mask((32, 32, 32), (16, 16, 16), 12)
    assert surface.surface_dice(inner, outer, (1.0, 1.0, 1.0), 1.0) == 0.0
    assert surface.surface_dice(inner, outer, (1.0, 1.0, 1.0), 6.0) == 1.0
    assert surface.surface_dice(inner, inner, (1.0, 1.0, 1.0), 0.0) == 1.0


def test_a_sphere_moved_by_one_voxel_is_within_exactly_one_voxel_spacing():
    # Every surface element of the moved sphere is the original one moved by one voxel: NSD is 1
    # at exactly that spacing (0.9 mm along y), and below it only the elements that coincide count.
    spacing = (2.0, 0.9, 0.7)
    sphere = ball_mask((20, 40, 48), (10, 20, 24), 8)
    moved = np.roll(sphere, 1, axis=1)
    assert surface.surface_dice(sphere, moved, spacing, 0.9) == 1.0
    below = surface.surface_dice(sphere, moved, spacing, 0.89)
    assert 0.0 < below < 1.0
    assert below == pytest.approx(reference_nsd(sphere, moved, spacing, 0.89), abs=1e-6)


@pytest.mark.parametrize("seed", range(12))
def test_surface_dice_equals_the_reference_on_random_masks(seed):
    label, prediction, spacing = random_pair(seed)
    distances = reference.compute_surface_distances(label, prediction, spacing)
    s0, s1, s2 = spacing
    exact = [s0, 2 * s2, math.sqrt((1 * s0) ** 2 + (1 * s1) ** 2 + (1 * s2) ** 2)]
    for tolerance in [0.5, 1.0, 2.0, 3.0, 5.0] + exact:
        theirs = reference.compute_surface_dice_at_tolerance(distances, tolerance)
        assert surface.surface_dice(label, prediction, spacing, tolerance) == pytest.approx(
            theirs, abs=1e-6), tolerance


def test_surface_dice_does_not_depend_on_axis_order_or_flips():
    label, prediction, spacing = random_pair(5)
    order, flips = (2, 0, 1), (slice(None, None, -1), slice(None), slice(None, None, -1))
    moved = [np.transpose(m, order)[flips] for m in (label, prediction)]
    moved_spacing = tuple(spacing[a] for a in order)
    for tolerance in (1.0, 3.0):
        assert surface.surface_dice(*moved, moved_spacing, tolerance) == pytest.approx(
            surface.surface_dice(label, prediction, spacing, tolerance), abs=1e-12)


# --- The challenge's rules ------------------------------------------------------------------------

@pytest.mark.parametrize("label_empty, prediction_empty, expected", [
    (True, True, (1.0, 1.0)), (True, False, (0.0, 0.0)), (False, True, (0.0, 0.0))])
def test_empty_masks_score_as_in_the_challenge(label_empty, prediction_empty, expected):
    full = box_mask((8, 8, 8), (2, 2, 2), (3, 3, 3))
    empty = np.zeros_like(full)
    label, prediction = (empty if label_empty else full), (empty if prediction_empty else full)
    assert challenge_scores(label, prediction, (1.0, 1.0, 1.0), 1.0) == expected
    assert challenge_scores(label, prediction, (1.0, 1.0, 1.0), 1.0, 0.2) == expected


def test_flare22_sets_nsd_to_zero_where_dsc_is_below_0_2():
    label = box_mask((20, 20, 20), (5, 5, 5), (10, 10, 2))
    prediction = np.roll(label, 2, axis=2)  # no overlap, surfaces 2 mm apart
    dsc, nsd = challenge_scores(label, prediction, (1.0, 1.0, 1.0), 5.0)
    assert dsc == 0.0 and nsd > 0.5
    assert challenge_scores(label, prediction, (1.0, 1.0, 1.0), 5.0, 0.2) == (0.0, 0.0)
    overlapping = np.roll(label, 1, axis=2)  # DSC 0.5: the rule does not apply
    assert challenge_scores(label, overlapping, (1.0, 1.0, 1.0), 5.0, 0.2) == (
        0.5, surface.surface_dice(label, overlapping, (1.0, 1.0, 1.0), 5.0))


def test_protocols_set_the_challenge_tolerances():
    assert make_protocol("flare21", ORGANS).tolerances_mm == dict.fromkeys(ORGANS.values(), 1.0)
    flare22 = make_protocol("flare22", ORGANS)
    assert flare22.tolerances_mm == FLARE22_TOLERANCES_MM
    assert flare22.nsd_zero_below_dsc == 0.2
    assert make_protocol("flare21", ORGANS).nsd_zero_below_dsc is None
    assert make_protocol("flare22", {7: "tumour"}, 2.0).tolerances_mm == {"tumour": 2.0}
    with pytest.raises(ValueError, match="tumour"):
        make_protocol("flare22", {7: "tumour"})


@pytest.mark.parametrize("name, case", [
    ("case_001.nii.gz", "case_001"), ("case_001_0000.nii.gz", "case_001"), ("x.nii", "x"),
    ("notes.csv", None), (".hidden.nii.gz", None)])
def test_files_pair_by_case_name(name, case):
    assert case_name(name) == case


def test_a_flare_data_folder_pairs_images_and_labels_without_ambiguity(tmp_path):
    for name in ("a_0000.nii.gz", "a.nii.gz", "b_0000.nii.gz", "c.nii.gz", "c_0000.nii.gz",
                 "c_0000.nii"):
        (tmp_path / name).touch()
    labels = files_by_case(tmp_path)
    assert [p.name for p in labels["a"]] == ["a.nii.gz"]  # the label, not the CT beside it
    assert [p.name for p in labels["b"]] == ["b_0000.nii.gz"]
    assert len(labels["c"]) == 3  # three candidates stay ambiguous
    images = files_by_case(tmp_path, prefer_image_naming=True)
    assert [p.name for p in images["a"]] == ["a_0000.nii.gz"]


# --- The folder tool ------------------------------------------------------------------------------

def organ_labels(shape, seed):
    """A small label map with four blob organs, (z, y, x) uint8."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, dtype=np.uint8)
    centres = [(0.5, 0.35, 0.3), (0.5, 0.7, 0.7), (0.45, 0.3, 0.75), (0.55, 0.65, 0.4)]
    for label_id, centre in enumerate(centres, start=1):
        centre_vox = [c * n + rng.uniform(-1, 1) for c, n in zip(centre, shape)]
        labels[ball_mask(shape, centre_vox, rng.uniform(3.0, 5.0)) & (labels == 0)] = label_id
    return labels


def write_labels(path, array, spacing_xyz=(0.8, 0.9, 2.5), origin=(0.0, 0.0, 0.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing_xyz)
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))
    return path


def spoiled(labels, seed):
    """A prediction: the labels shifted by one voxel along x with some organ voxels lost."""
    rng = np.random.default_rng(seed)
    prediction = np.roll(labels, 1, axis=2)
    prediction[(rng.random(labels.shape) < 0.05) & (prediction > 0)] = 0
    return prediction


def expected_rows(label_path, prediction_path, tolerance_mm=1.0):
    """(DSC, NSD) per organ from the reference, on the arrays SimpleITK reads, spacing reversed."""
    label_image = sitk.ReadImage(str(label_path))
    labels = sitk.GetArrayFromImage(label_image)
    prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(prediction_path)))
    spacing = label_image.GetSpacing()[::-1]
    return {name: (reference.compute_dice_coefficient(labels == i, prediction == i),
                   reference_nsd(labels == i, prediction == i, spacing, tolerance_mm))
            for i, name in ORGANS.items()}


@pytest.fixture
def folders(tmp_path):
    """pred/ and labels/ with three good cases (one prediction named NAME_0000.nii.gz)."""
    pred, labels = tmp_path / "pred", tmp_path / "labels"
    pred.mkdir()
    labels.mkdir()
    for index, case in enumerate(("case_a", "case_b", "case_c")):
        array = organ_labels((14, 30, 32), index)
        write_labels(labels / f"{case}.nii.gz", array)
        name = f"{case}_0000.nii.gz" if case == "case_b" else f"{case}.nii.gz"
        write_labels(pred / name, spoiled(array, index))
    return pred, labels


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "evaluation.evaluate", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, encoding="utf-8",
                          errors="replace", timeout=120)


def test_cli_scores_a_folder_reports_bad_cases_by_file_and_exits_1(folders, tmp_path):
    pred, labels = folders
    (pred / "broken.nii.gz").write_bytes(b"not an image")
    write_labels(labels / "broken.nii.gz", organ_labels((14, 30, 32), 9))
    write_labels(pred / "orphan.nii.gz", organ_labels((14, 30, 32), 8))
    write_labels(pred / "moved.nii.gz", organ_labels((14, 30, 32), 7), origin=(5.0, 0.0, 0.0))
    write_labels(labels / "moved.nii.gz", organ_labels((14, 30, 32), 7))
    out = tmp_path / "results" / "scores.csv"

    result = run_cli("--pred", pred, "--labels", labels, "--out", out, "--workers", "2", "--quiet")

    assert result.returncode == 1, result.stderr
    stderr = result.stderr
    assert f"cannot read prediction {pred / 'broken.nii.gz'}" in stderr
    assert f"no label for prediction {pred / 'orphan.nii.gz'}" in stderr
    assert f"prediction {pred / 'moved.nii.gz'} lies on a different grid from label" in stderr
    assert "origin (5, 0, 0) vs (0, 0, 0)" in stderr
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["case"], r["organ"]) for r in rows] == [
        (case, organ) for case in ("case_a", "case_b", "case_c") for organ in ORGANS.values()]
    expected = expected_rows(labels / "case_b.nii.gz", pred / "case_b_0000.nii.gz")
    for row in (r for r in rows if r["case"] == "case_b"):
        assert float(row["dsc"]) == pytest.approx(expected[row["organ"]][0], abs=1e-12)
        assert float(row["nsd"]) == pytest.approx(expected[row["organ"]][1], abs=1e-6)
        assert float(row["nsd_tolerance_mm"]) == 1.0
        voxel_ml = 0.8 * 0.9 * 2.5 / 1000
        assert float(row["label_volume_ml"]) == pytest.approx(
            int(row["label_voxels"]) * voxel_ml, rel=1e-6)
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["cases"] == 3 and summary["protocol"] == "flare21"
    assert set(summary["failures"]) == {"broken", "orphan", "moved"}
    liver = [float(r["dsc"]) for r in rows if r["organ"] == "liver"]
    assert summary["organs"]["liver"]["dsc"]["mean"] == pytest.approx(np.mean(liver), abs=1e-12)
    assert summary["organs"]["liver"]["dsc"]["median"] == pytest.approx(np.median(liver), abs=1e-12)
    markdown = out.with_suffix(".md").read_text()
    assert "| organ | cases | DSC (%) mean ± std" in markdown and "Failed: 3 cases" in markdown
    assert markdown in result.stdout
    # no temporary files left
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_cli_exits_0_on_a_clean_folder_and_applies_flare22(folders, tmp_path):
    pred, labels = folders
    result = run_cli("--pred", pred, "--labels", labels, "--protocol", "flare22", "--workers", "1",
                     "--quiet")
    assert result.returncode == 0, result.stderr
    with open(pred / "evaluation.csv", newline="") as handle:
        tolerances = {r["organ"]: float(r["nsd_tolerance_mm"]) for r in csv.DictReader(handle)}
    assert tolerances == FLARE22_TOLERANCES_MM
    assert json.loads((pred / "evaluation.json").read_text())["failures"] == {}
    assert run_cli("--pred", tmp_path / "missing", "--labels", labels).returncode == 2


def test_resample_puts_a_prediction_on_the_label_grid_and_says_so(tmp_path):
    pred, labels = tmp_path / "pred", tmp_path / "labels"
    pred.mkdir()
    labels.mkdir()
    array = organ_labels((14, 30, 32), 4)
    write_labels(labels / "case.nii.gz", array, spacing_xyz=(0.8, 0.9, 2.5))
    write_labels(pred / "case.nii.gz", array[:, :, ::2].copy(), spacing_xyz=(1.6, 0.9, 2.5),
                 origin=(0.4, 0.0, 0.0))
    refused = evaluate_folder(pred, labels, tmp_path / "refused.csv", workers=1, progress=False)
    assert "different grid" in refused.failures["case"]
    assert "spacing (1.6, 0.9, 2.5)" in refused.failures["case"]
    accepted = evaluate_folder(pred, labels, tmp_path / "scores.csv", resample=True, workers=1,
                               progress=False)
    assert accepted.failures == {} and accepted.resampled == ["case"]
    assert all(row["prediction_resampled"] for row in accepted.rows)
    # every other column copied: close to the label
    assert min(row["dsc"] for row in accepted.rows) > 0.6
    assert "Resampled onto the label grid" in (tmp_path / "scores.md").read_text()


def test_unusable_options_and_folders_raise_value_errors_naming_them(folders, tmp_path):
    pred, labels = folders
    for kwargs, message in [({"out": tmp_path / "scores.md"}, "must end in .csv"),
                            ({"protocol": "flare99"}, "unknown protocol"),
                            ({"tolerance_mm": -1.0}, "must be >= 0"),
                            ({"images_dir": tmp_path / "nowhere"}, "nowhere")]:
        with pytest.raises(ValueError, match=message):
            evaluate_folder(pred, labels, **{"workers": 1, "progress": False, **kwargs})
    with pytest.raises(ValueError, match="no predictions"):
        evaluate_folder(tmp_path, labels, tmp_path / "scores.csv", workers=1, progress=False)
    with pytest.raises(ValueError, match="ID:NAME"):
        parse_organs("liver")
    assert parse_organs("1:liver, 6:tumour") == {1: "liver", 6: "tumour"}


def test_previews_of_the_worst_case_show_organs_in_colour(folders, tmp_path):
    pred, labels = folders
    images = tmp_path / "images"
    images.mkdir()
    for case in ("case_a", "case_b", "case_c"):
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(labels / f"{case}.nii.gz")))
        write_labels(images / f"{case}_0000.nii.gz", (array * 40 - 50).astype(np.int16))
    previews = tmp_path / "previews"
    evaluation = evaluate_folder(pred, labels, tmp_path / "scores.csv", previews_dir=previews,
                                 previews_worst=1, images_dir=images, workers=1, progress=False)
    means = {case: np.mean([r["dsc"] for r in evaluation.rows if r["case"] == case])
             for case in ("case_a", "case_b", "case_c")}
    worst = min(means, key=means.get)
    assert sorted(p.name for p in previews.iterdir()) == [f"{worst}.png"]
    from matplotlib.image import imread

    pixels = imread(previews / f"{worst}.png")[..., :3]
    panels = pixels[: int(0.8 * len(pixels))]  # above the legend
    reddish = (panels[..., 0] > panels[..., 1] + 0.25) & (panels[..., 0] > panels[..., 2] + 0.25)
    image_panel, label_panel, prediction_panel = np.array_split(reddish, 3, axis=1)
    assert label_panel.sum() > 1000 and prediction_panel.sum() > 1000  # the liver, in colour
    assert image_panel.sum() == 0  # the CT alone: grey


# --- Real CT --------------------------------------------------------------------------------------

@pytest.mark.parametrize("label_file", ["labels/ts_example.nii.gz", "dicom/ts_dicom.nii.gz"])
def test_real_labels_against_their_eroded_and_shifted_selves_equal_the_reference(
        shared_data, tmp_path, label_file):
    label_path = shared_data / label_file
    label = sitk.ReadImage(str(label_path))
    labels = sitk.GetArrayFromImage(label)
    prediction = np.zeros_like(labels)
    for label_id in ORGANS:
        organ = ndimage.binary_erosion(labels == label_id)
        prediction[np.roll(organ, 1, axis=1 + label_id % 2)] = label_id
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    image = sitk.GetImageFromArray(prediction)
    image.CopyInformation(label)
    sitk.WriteImage(image, str(pred_dir / label_path.name))
    spacing = label.GetSpacing()[::-1]
    distances = {i: reference.compute_surface_distances(labels == i, prediction == i, spacing)
                 for i in ORGANS if (labels == i).any()}

    for protocol, tolerances in (("flare21", dict.fromkeys(ORGANS.values(), 1.0)),
                                 ("flare22", FLARE22_TOLERANCES_MM)):
        evaluation = evaluate_folder(pred_dir, label_path.parent, tmp_path / f"{protocol}.csv",
                                     protocol=protocol, workers=1, progress=False)
        assert evaluation.failures == {} and len(evaluation.rows) == 4
        for row in evaluation.rows:
            label_id = row["label_id"]
            if label_id not in distances:  # an organ outside the field of view: both empty
                assert (row["dsc"], row["nsd"]) == (1.0, 1.0) and row["prediction_voxels"] == 0
                continue
            expected = reference.compute_surface_dice_at_tolerance(distances[label_id],
                                                                   tolerances[row["organ"]])
            assert row["label_voxels"] > 100 and 0.2 < row["dsc"] < 1.0 and 0.0 < row["nsd"] < 1.0
            assert row["nsd"] == pytest.approx(expected, abs=1e-6), (protocol, row)
