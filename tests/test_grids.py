"""Grid rules of both stages (METHOD.md numbers) and the ROI in physical space."""

import numpy as np
import pytest
import SimpleITK as sitk

from app import method
from app.geometry import Grid, centred_grid, from_canonical, image_centre_axis_mm, to_canonical
from app.localization import (Roi, body_mask, localization_grid, localization_spacing_mm,
                              roi_from_foreground)
from app.preprocessing import extend_partial_axes, scale_intensity, smallest_valid_size
from app.segmentation import MAX_CROP_VOXELS, segmentation_grid, segmentation_spacing_mm

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def grid(size, spacing, origin=(0.0, 0.0, 0.0), direction=IDENTITY):
    return Grid(tuple(size), tuple(spacing), tuple(origin), tuple(direction))


def test_valid_size_is_strictly_larger_or_the_largest():
    assert smallest_valid_size(31, (32, 48, 64)) == 32
    assert smallest_valid_size(32, (32, 48, 64)) == 48
    assert smallest_valid_size(70, (32, 48, 64)) == 64


def test_localization_grid_for_a_typical_ct_is_6mm_and_valid_sized():
    loc = localization_grid(grid((512, 512, 200), (0.8, 0.8, 2.5)))
    assert loc.spacing_mm == (6.0, 6.0, 6.0)
    # 409.6 mm -> 69 voxels -> 80; 500 mm -> 84 voxels -> 96
    assert loc.size == (80, 80, 96)


def test_localization_spacing_grows_when_the_image_does_not_fit():
    big = grid((512, 512, 1000), (0.97, 0.97, 2.0))  # 2000 mm in z
    ratio = max(np.ceil(np.array(big.extent_mm) / 6.0) / np.array([80, 80, 256])) + 0.02
    assert localization_spacing_mm(big) == pytest.approx(6.0 * ratio)
    assert localization_grid(big).size[2] == 256


def test_localization_grid_is_centred_on_the_image():
    image_grid = grid((100, 90, 80), (1.0, 1.0, 2.0), origin=(-10.0, 20.0, 5.0))
    loc = localization_grid(image_grid)
    centre_of_loc = loc.axis_mm_to_physical(image_centre_axis_mm(loc))
    centre_of_image = image_grid.axis_mm_to_physical(image_centre_axis_mm(image_grid))
    np.testing.assert_allclose(centre_of_loc, centre_of_image, atol=1e-9)


def test_roi_is_the_foreground_box_plus_10mm_clipped_to_the_image():
    image_grid = grid((200, 200, 100), (1.0, 1.0, 2.0))
    loc = localization_grid(image_grid)  # 6 mm, centred
    foreground = np.zeros(tuple(reversed(loc.size)), bool)
    foreground[10, 12, 14] = True  # one voxel at (x=14, y=12, z=10)
    roi = roi_from_foreground(foreground, loc, image_grid)
    low, high = roi.axis_mm(image_grid)
    voxel_centre = image_grid.physical_to_axis_mm(
        loc.axis_mm_to_physical(np.array([14, 12, 10]) * 6.0))
    # the box spans the voxel (+-3 mm) plus 10 mm, rounded out to whole image voxels
    assert np.all(low <= voxel_centre - 13.0 + 1e-9) and np.all(low > voxel_centre - 13.0 - 2.0)
    assert np.all(high >= voxel_centre + 13.0 - 1e-9) and np.all(high < voxel_centre + 13.0 + 2.0)
    foreground[:] = True
    assert roi_from_foreground(foreground, loc, image_grid) == Roi.whole(image_grid)
    foreground[:] = False
    assert roi_from_foreground(foreground, loc, image_grid) == Roi.whole(image_grid)


def test_segmentation_grid_is_2mm_valid_sized_and_centred_on_the_roi():
    image_grid = grid((512, 512, 200), (0.8, 0.8, 2.5))
    roi = Roi((100, 150, 20), (250, 200, 100))  # 200 x 160 x 250 mm
    crop = segmentation_grid(image_grid, roi)
    assert crop.spacing_mm == (2.0, 2.0, 2.0)
    assert crop.size == (128, 96, 128)
    low, high = roi.axis_mm(image_grid)
    crop_centre = image_grid.physical_to_axis_mm(
        crop.axis_mm_to_physical(image_centre_axis_mm(crop)))
    np.testing.assert_allclose(crop_centre, (low + high) / 2, atol=1e-9)


def test_segmentation_spacing_grows_for_a_large_roi():
    assert segmentation_spacing_mm((300.0, 240.0, 300.0)) == method.SEGMENTATION_SPACING_MM
    assert segmentation_spacing_mm((400.0, 250.0, 300.0)) == pytest.approx(400 / 160 + 0.1)
    crop = segmentation_grid(grid((500, 300, 300), (1.0, 1.0, 1.0)),
                             Roi((0, 0, 0), (500, 300, 300)))
    assert crop.size == (160, 96, 96) and crop.spacing_mm[0] == pytest.approx(500 / 160 + 0.1)


def test_a_thin_slab_keeps_2mm_while_its_crop_is_no_larger_than_the_largest_valid_one():
    slab = grid((512, 512, 20), (0.977, 0.977, 2.0))  # 500 x 500 x 40 mm, as ../shared's DICOM
    roi = Roi((0, 147, 0), (512, 284, 20))  # the body box across, the whole slab
    crop = segmentation_grid(slab, roi)
    assert crop.spacing_mm == (2.0, 2.0, 2.0)
    assert crop.size == (256, 160, 32)  # multiples of 32 strictly larger than 250 x 139 x 20
    low, high = roi.axis_mm(slab)
    crop_centre = slab.physical_to_axis_mm(crop.axis_mm_to_physical(image_centre_axis_mm(crop)))
    np.testing.assert_allclose(crop_centre, (low + high) / 2, atol=1e-9)
    # a 180 mm slab of this body would need 256 x 160 x 96 voxels at 2 mm: more than the
    # largest valid crop, so the method's fitting spacing applies
    thick = grid((512, 512, 90), (0.977, 0.977, 2.0))
    assert 256 * 160 * 96 > MAX_CROP_VOXELS
    crop = segmentation_grid(thick, Roi((0, 147, 0), (512, 284, 90)))
    assert crop.spacing_mm[0] == pytest.approx(512 * 0.977 / 160 + 0.1)
    assert crop.size == (160, 96, 64)


@pytest.mark.parametrize("direction", [
    IDENTITY,
    (0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0),  # permuted and flipped
])
def test_a_partial_axis_is_extended_by_repeating_its_edge_slices(direction):
    array = np.random.default_rng(1).integers(-1000, 1000, (5, 6, 7)).astype(np.int16)
    image = sitk.GetImageFromArray(array)  # x 7, y 6, z 5 voxels
    image.SetSpacing((1.0, 1.5, 2.0))
    image.SetOrigin((10.0, -20.0, 30.0))
    image.SetDirection(direction)
    image_grid = Grid.of(image)
    # z: the image spans 10 mm, the crop 16 mm: 3 mm beyond each end, plus a 1 mm margin, is
    # two 2 mm slices at each end; across, the crop lies inside the image
    crop = centred_grid(image_grid, image_centre_axis_mm(image_grid), (1, 1, 4), 4.0)
    extended = extend_partial_axes(image, crop, (False, False, True), margin_mm=1.0)
    assert extended.GetSize() == (7, 6, 5 + 2 * 2)  # x 7 mm, y 9 mm: the crop is inside
    assert extended.GetDirection() == image.GetDirection()
    values = sitk.GetArrayFromImage(extended)
    np.testing.assert_array_equal(values[2:-2], array)
    assert all((values[k] == array[0]).all() for k in range(2))
    assert all((values[-1 - k] == array[-1]).all() for k in range(2))
    # the original voxels keep their physical positions
    first_original = extended.TransformIndexToPhysicalPoint((0, 0, 2))
    np.testing.assert_allclose(first_original, image.GetOrigin(), atol=1e-9)
    # not a partial axis, or nothing missing: the image itself
    assert extend_partial_axes(image, crop, (True, True, False), margin_mm=1.0) is image


def test_the_body_is_the_largest_region_above_minus_500_hu():
    hu = np.full((10, 40, 40), -1000.0, np.float32)
    hu[:, 5:30, 8:32] = 40.0  # trunk
    hu[:, 10:20, 34:38] = 40.0  # an arm, apart from the trunk
    hu[:, 33:35, 2:38] = 100.0  # the table
    body = body_mask(scale_intensity(hu))
    assert body[:, 5:30, 8:32].all()
    assert body.sum() == 10 * 25 * 24
    assert not body_mask(np.full((4, 4, 4), -0.5, np.float32)).any()


@pytest.mark.parametrize("direction", [
    IDENTITY,
    (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0),  # RAS-stored
    (0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0),  # permuted and flipped
])
def test_canonical_orientation_round_trip_is_exact(direction):
    array = np.random.default_rng(0).integers(0, 5, (7, 6, 5)).astype(np.uint8)
    image = sitk.GetImageFromArray(array)
    image.SetDirection(direction)
    image.SetSpacing((0.7, 0.9, 3.0))
    image.SetOrigin((12.0, -40.0, 7.5))
    canonical, code = to_canonical(image)
    np.testing.assert_allclose(np.array(canonical.GetDirection()).reshape(3, 3), np.eye(3),
                               atol=1e-9)
    # the same physical point holds the same value
    point = image.TransformIndexToPhysicalPoint((1, 2, 3))
    assert canonical[canonical.TransformPhysicalPointToIndex(point)] == image[1, 2, 3]
    back = from_canonical(canonical, code, image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), array)
    assert back.GetDirection() == image.GetDirection() and back.GetOrigin() == image.GetOrigin()


def test_centred_grid_follows_an_oblique_parent_direction():
    angle = np.deg2rad(5)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0],
                         [0, 0, 1]])
    parent = grid((100, 100, 50), (1.0, 1.0, 2.0), (5.0, 6.0, 7.0), tuple(rotation.ravel()))
    child = centred_grid(parent, (50.0, 40.0, 30.0), (10, 10, 10), 2.0)
    assert child.direction == parent.direction
    np.testing.assert_allclose(parent.physical_to_axis_mm(child.origin_mm), (41.0, 31.0, 21.0))
