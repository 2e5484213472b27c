"""release.organ_probe: HU inside organs and the SCN's probabilities at their voxels."""

import numpy as np
import pytest
import SimpleITK as sitk

from release.organ_probe import hu_inside, organ_sizes, probabilities_at_labels
from synthetic import generate_case


def test_hu_inside_leaves_out_the_organs_in_plane_rim():
    """A 6 x 6 x 4 pancreas of 40 HU inside, 1000 HU on its in-plane rim: the rim is partial
    volume, the statistics see only the 40 HU core."""
    labels = np.zeros((4, 10, 10), np.uint8)
    labels[:, 2:8, 2:8] = 4
    hu = np.where(labels == 4, 1000, -100).astype(np.int16)
    hu[:, 3:7, 3:7] = 40
    image, label_image = sitk.GetImageFromArray(hu), sitk.GetImageFromArray(labels)
    assert hu_inside(image, label_image) == {"pancreas": (40.0, 40.0, 40.0)}


def test_organ_sizes_are_axial_whatever_the_voxel_axes():
    """A spleen 20 x 30 mm in-plane and 40 mm tall (24 mL, 6 cm2 sections), stored coronally with
    the head-feet axis as the image's y axis and flipped: its axial section is still 6 cm2."""
    labels = np.zeros((10, 10, 10), np.uint8)  # (image z, y, x)
    labels[2:5, 1:9, 2:6] = 3  # image x: 4 voxels, y: 8, z: 3
    image = sitk.GetImageFromArray(labels)
    image.SetSpacing((5.0, 5.0, 10.0))  # x, y (head-feet), z (front-back)
    image.SetDirection((-1.0, 0, 0, 0, 0, 1.0, 0, -1.0, 0))
    volume_ml, section_cm2 = organ_sizes(image)["spleen"]
    assert volume_ml == pytest.approx(4 * 8 * 3 * 250 / 1000)
    assert section_cm2 == pytest.approx(4 * 3 * 50 / 100)  # x by front-back, not x by head-feet


@pytest.mark.parametrize("seed", [3])
def test_the_scn_gives_each_organ_its_class_where_the_labels_are(seed, predictor):
    """On a generated case the shipped SCN gives each organ a high mean probability at its
    labelled voxels; the labels read on a grid shifted by 30 mm (as a misplaced crop would be)
    lose most of it for the liver's neighbours."""
    image, labels = generate_case(seed, in_plane_size=128)
    found = probabilities_at_labels(predictor, image, labels)
    assert set(found) == {"liver", "kidney", "spleen", "pancreas"}
    for organ, (mean, highest) in found.items():
        assert mean > 0.5 and highest > 0.9, (organ, found)
    shifted = sitk.Image(labels)
    shifted.SetOrigin(tuple(np.add(labels.GetOrigin(), (30.0, 0.0, 0.0))))
    moved = probabilities_at_labels(predictor, image, shifted)
    assert moved["kidney"][0] < 0.5 and moved["spleen"][0] < 0.5, moved
