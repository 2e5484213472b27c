"""segmentation.drop_islands, the optional step after the argmax (rules R-islands and
R-islands2 in weights/MODEL_CARD.md): an organ's connected pieces smaller than a fraction of its
largest piece become background unless they touch the image's edge; nothing else changes."""

import numpy as np
import pytest
import SimpleITK as sitk

from app.segmentation import bounding_box, drop_islands
from synthetic import generate_case
from tests.test_predictor import geometry


def scene():
    labels = np.zeros((40, 40, 40), np.uint8)
    labels[2:22, 2:22, 2:22] = 1          # liver, 8,000 voxels
    labels[30, 30, 30] = 1                # a stray liver voxel far away
    labels[22, 22, 22] = 1                # touches the liver only at a corner: same piece
    labels[25:31, 2:8, 2:8] = 2           # right kidney, 216 voxels
    labels[25:31, 2:8, 30:35] = 2         # left kidney, 180 voxels
    labels[2:12, 30:38, 30:38] = 3        # spleen cut in two by a gap: 640 ...
    labels[14:20, 30:38, 30:38] = 3       # ... and 384 voxels
    labels[34:38, 34:38, 2:4] = 4         # pancreas, 32 voxels, one piece
    labels[10, 10, 23] = 2                # a kidney voxel beside the liver: a kidney island
    return labels


def test_small_pieces_become_background_and_large_ones_stay():
    labels = scene()
    result = labels.copy()
    assert drop_islands(result, 0.1) == 2
    expected = labels.copy()
    expected[30, 30, 30] = 0
    expected[10, 10, 23] = 0
    np.testing.assert_array_equal(result, expected)


def test_a_higher_fraction_keeps_fewer_pieces():
    result = scene()
    assert drop_islands(result, 0.9) == 2 + 180 + 384  # the smaller kidney and spleen part too
    assert (result == 2).sum() == 216 and (result == 3).sum() == 640
    assert (result == 1).sum() == 8001 and (result == 4).sum() == 32


def test_a_piece_at_the_image_edge_is_kept_and_inside_it_is_not():
    labels = np.zeros((30, 30, 30), np.uint8)
    labels[5:25, 5:25, 5:25] = 1           # the liver's main part
    labels[0:2, 10:12, 10:12] = 1          # a small part cut off by the scan's lowest slice
    labels[27:29, 10:12, 10:12] = 1        # a small part one slice short of the highest
    result = labels.copy()
    assert drop_islands(result, 0.1) == 8
    assert (result[0:2] == 1).sum() == 8 and not result[27:29].any()
    # as an ROI whose low z face lies inside the image: that part is no longer protected
    inside = labels.copy()
    assert drop_islands(inside, 0.1, ((False, True), (True, True), (True, True))) == 16
    assert (inside == 1).sum() == 20 ** 3
    # the high z face an edge: the part one slice short of it is still inside
    high = labels.copy()
    assert drop_islands(high, 0.1, ((False, True),) * 3) == 16


def test_fraction_zero_changes_nothing_and_a_bad_fraction_is_refused():
    labels = scene()
    result = labels.copy()
    assert drop_islands(result, 0.0) == 0
    np.testing.assert_array_equal(result, labels)
    for fraction in (-0.1, 1.5):
        with pytest.raises(ValueError, match=f"min_fraction {fraction} is not between 0 and 1"):
            drop_islands(result, fraction)


def test_bounding_box():
    mask = np.zeros((5, 6, 7), bool)
    assert bounding_box(mask) is None
    mask[1, 2, 3] = mask[3, 4, 1] = True
    assert bounding_box(mask) == (slice(1, 4), slice(2, 5), slice(1, 4))


def test_the_predictor_drops_islands_on_its_output_grid(predictor):
    from app import method
    from app.predictor import Predictor

    image, _ = generate_case(14, geometry=geometry(np.eye(3)))
    argmax = Predictor(predictor.weights_dir, min_island_fraction=0.0).predict(image).labels
    argmax = sitk.GetArrayFromImage(argmax)
    # the shipped default, then 1.0, which keeps only each organ's largest piece: the smaller
    # kidney goes at least
    for fraction, labels in ((method.MIN_ISLAND_FRACTION, predictor.predict(image).labels),
                             (1.0, Predictor(predictor.weights_dir, min_island_fraction=1.0)
                              .predict(image).labels)):
        assert labels.GetSize() == image.GetSize() and labels.GetOrigin() == image.GetOrigin()
        expected = argmax.copy()
        dropped = drop_islands(expected, fraction)
        assert dropped > 0 or fraction < 1.0
        np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), expected)
    with pytest.raises(ValueError, match="min_island_fraction 2 is not between 0 and 1"):
        Predictor(predictor.weights_dir, min_island_fraction=2)


def test_the_command_takes_the_fraction_and_refuses_a_bad_one(tmp_path, predictor, capsys):
    from app.cli import main

    image, _ = generate_case(14, geometry=geometry(np.eye(3)))
    inputs = tmp_path / "in"
    inputs.mkdir()
    sitk.WriteImage(image, str(inputs / "case_0000.nii.gz"))
    assert main([str(inputs), str(tmp_path / "default"), "--quiet"], predictor=predictor) == 0
    assert main([str(inputs), str(tmp_path / "strict"), "--quiet",
                 "--min-island-fraction", "1"]) == 0
    # the default's pieces are a superset of 1.0's: dropping at 1.0 after it is dropping at 1.0
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "default" / "case.nii.gz")))
    assert drop_islands(expected, 1.0) > 0
    strict = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "strict" / "case.nii.gz")))
    np.testing.assert_array_equal(strict, expected)
    # a loaded predictor with another fraction is refused before any work
    assert main([str(inputs), str(tmp_path / "other"), "--quiet", "--min-island-fraction",
                 "0.5"], predictor=predictor) == 2
    assert "min_island_fraction 0.5: the predictor given was loaded with 0.1" in (
        capsys.readouterr().err)
    assert not (tmp_path / "other").exists()
    with pytest.raises(SystemExit) as exit_info:
        main([str(inputs), str(tmp_path / "bad"), "--min-island-fraction", "1.5"])
    assert exit_info.value.code == 2
    assert "1.5 is not between 0 and 1" in capsys.readouterr().err
