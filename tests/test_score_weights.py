"""release.score_weights: DSC / NSD of a weights folder, written into its weights.json."""

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from app.weights import DEFAULT_WEIGHTS_DIR, PROVENANCE
from release.score_weights import main, organ_scores


def test_organ_scores_are_per_organ_of_the_reference_and_need_one_grid():
    reference = np.zeros((6, 8, 8), np.uint8)
    reference[1:5, 2:6, 2:6] = 1  # a liver cube; no other organ
    prediction = reference.copy()
    prediction[1:5, 2:6, 2:4] = 0  # half of it found
    prediction[0, 0, 0] = 3  # a spleen the reference does not have: not scored
    scores = organ_scores(sitk.GetImageFromArray(prediction), sitk.GetImageFromArray(reference))
    assert list(scores) == ["liver"]
    assert scores["liver"]["dsc"] == pytest.approx(2 * 32 / (64 + 32), abs=1e-4)
    shifted = sitk.GetImageFromArray(prediction)
    shifted.SetOrigin((0.5, 0.0, 0.0))
    with pytest.raises(ValueError, match="different grids"):
        organ_scores(shifted, sitk.GetImageFromArray(reference))


def test_organ_scores_of_a_partly_labelled_reference_score_only_its_organs():
    reference = np.zeros((6, 8, 8), np.uint8)
    reference[1:5, 2:6, 2:6] = 1
    reference[1:3, 6:8, 6:8] = 3  # a spleen drawn, but the case declares the liver only
    prediction = reference.copy()
    prediction[reference == 3] = 0
    both = organ_scores(sitk.GetImageFromArray(prediction), sitk.GetImageFromArray(reference))
    assert both["spleen"]["dsc"] == 0.0
    liver_only = organ_scores(sitk.GetImageFromArray(prediction),
                              sitk.GetImageFromArray(reference), organs=("liver",))
    assert list(liver_only) == ["liver"] and liver_only["liver"]["dsc"] == 1.0


def plate_scan(orientation=None):
    """A 1 mm-slice scan at -100 HU with a 1 mm plate of +900 HU at z = 40 mm and a pancreas
    box around it (label 4); its voxels stored in another ``orientation`` (DICOM letters, e.g.
    "LSA": coronal) if given, the physical scan unchanged."""
    hu = np.full((81, 40, 50), -100, np.int16)  # z 0..80 mm
    hu[40] = 900
    labels = np.zeros(hu.shape, np.uint8)
    labels[30:51, 10:30, 10:40] = 4
    labels[5:15, 5:35, 5:45] = 1
    image, label_image = sitk.GetImageFromArray(hu), sitk.GetImageFromArray(labels)
    for item in (image, label_image):
        item.SetSpacing((2.0, 2.0, 1.0))
    if orientation:
        image, label_image = (sitk.DICOMOrient(item, orientation) for item in (image, label_image))
    return image, label_image


def test_a_thick_slab_is_centred_on_the_pancreas_with_a_slice_profile_on_any_grid():
    from release.score_weights import thick_slab
    from training.augment import FWHM_PER_SIGMA

    image, labels = plate_scan()
    slab, slab_labels = thick_slab(image, labels, slices=5, thickness_mm=5.0)
    assert slab.GetSize() == (50, 40, 5) and slab.GetSpacing() == (2.0, 2.0, 5.0)
    assert slab.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    # the pancreas box spans z 30..50 mm: its centroid, and the middle slice, at 40 mm
    assert slab.TransformIndexToPhysicalPoint((0, 0, 2))[2] == pytest.approx(40.0)
    hu = sitk.GetArrayFromImage(slab).astype(float)
    # the 1 mm plate seen through a 5 mm profile: its 1,000 HU spread over the profile
    sigma = np.sqrt(5.0 ** 2 - 1.0 ** 2) / FWHM_PER_SIGMA
    centre = -100 + 1000 / (sigma * np.sqrt(2 * np.pi))
    assert np.median(hu[2]) == pytest.approx(centre, rel=0.1)
    assert np.median(hu[1]) == pytest.approx(-100 + 1000 * np.exp(-25 / (2 * sigma ** 2))
                                             / (sigma * np.sqrt(2 * np.pi)), abs=5)
    # labels are the scan's at the slice centres: z 30, 35, 40, 45, 50 mm all lie in the box
    assert (sitk.GetArrayViewFromImage(slab_labels) == 4).any(axis=(1, 2)).all()
    # the same scan stored along other axes gives the same slab
    stored = plate_scan("LIA")
    assert stored[0].GetDirection() != slab.GetDirection()
    other, other_labels = thick_slab(*stored, slices=5, thickness_mm=5.0)
    assert other.GetSize() == slab.GetSize()
    assert other.GetOrigin() == pytest.approx(slab.GetOrigin())
    np.testing.assert_allclose(sitk.GetArrayFromImage(other), hu, atol=1)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(other_labels),
                                  sitk.GetArrayFromImage(slab_labels))
    # without a pancreas, centred on the organs it has: here the liver box, z 5..14 mm
    liver_only = sitk.Cast(labels == 1, sitk.sitkUInt8)
    slab, _ = thick_slab(image, liver_only, slices=5, thickness_mm=5.0)
    assert slab.TransformIndexToPhysicalPoint((0, 0, 2))[2] == pytest.approx(9.5)
    with pytest.raises(ValueError, match="no organ"):
        thick_slab(image, liver_only * 0)


def test_held_out_anatomy_is_rendered_and_scored(tmp_path, predictor):
    """Three patients' maps (procedural labels): the one training holds out is scored."""
    from release.score_weights import score_anatomy
    from tests.test_anatomy import procedural_map
    from training.train import anatomy_split

    names = []
    for i, seed in enumerate((21, 22, 23, 24, 25, 26, 27)):
        procedural_map(tmp_path, seed=seed, name=f"demo_{i:04d}")
        names.append(f"demo_{i:04d}")
    training, held = anatomy_split(tmp_path)
    assert len(held) == 1 and len(training) == 6  # 15 % of 7 patients
    result, slabs = score_anatomy(predictor, tmp_path, in_plane_size=96, slabs=True)
    assert result["maps"] == slabs["maps"] == [held[0].name.split(".")[0]]
    assert result["dsc"]["liver"]["cases"] == 1
    assert result["dsc"]["liver"]["mean"] > 0.5  # the shipped weights find a rendered liver
    # the slab through the pancreas holds it, and is scored apart
    assert (slabs["slices"], slabs["thickness_mm"]) == (11, 5.0)
    assert slabs["centred_on"] == "pancreas, else all organs"
    assert slabs["dsc"]["pancreas"]["cases"] == 1
    assert slabs["dsc"] != result["dsc"]


def test_slabs_are_cut_from_the_anatomy_renderings_only():
    from release.score_weights import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--anatomy-slabs"])
    assert parse_args(["--anatomy", "maps", "--anatomy-slabs"]).anatomy_slabs


def test_no_generated_cases_gives_strict_json(predictor):
    from release.score_weights import parse_args, score_generated

    with pytest.raises(SystemExit):
        parse_args(["--cases", "-1"])
    none = score_generated(predictor, 0, 96)
    assert none["cases"] == 0 and none["dsc"] == {} and none["mean_predict_seconds"] is None
    json.loads(json.dumps(none), parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))


def test_update_writes_the_scores_into_weights_json_and_keeps_the_rest(tmp_path, shared_data):
    """One small generated case and the real CT: the shipped weights find the held-out slab's
    liver and spleen; the record's other fields survive the update."""
    weights = tmp_path / "weights"
    shutil.copytree(DEFAULT_WEIGHTS_DIR, weights)
    before = json.loads((weights / PROVENANCE).read_text())
    assert main(["--weights", str(weights), "--cases", "1", "--in-plane-size", "96",
                 "--update", "--json", str(tmp_path / "scores.json")]) == 0
    after = json.loads((weights / PROVENANCE).read_text())
    assert json.loads((tmp_path / "scores.json").read_text()) == after["scores"]
    assert {k: v for k, v in after.items() if k != "scores"} == \
        {k: v for k, v in before.items() if k != "scores"}
    generated = after["scores"]["generated_unseen"]
    assert generated["cases"] == 1 and generated["in_plane_size"] == 96
    assert set(after["scores"]["real_ct"]) == {"ts_example", "ts_dicom", "chaos_ct3"}
    # chaos_ct3 has its liver drawn, its other organs present but unlabelled: liver only.
    assert set(after["scores"]["real_ct"]["chaos_ct3"]) == {"liver"}
    slab = after["scores"]["real_ct"]["ts_dicom"]
    assert set(slab) == {"liver", "spleen", "pancreas"}  # no kidney in its field of view
    assert slab["liver"]["dsc"] >= 0.9 and slab["spleen"]["dsc"] >= 0.85, slab
    assert not list(weights.glob("*.partial"))
