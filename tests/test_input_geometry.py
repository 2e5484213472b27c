"""Input geometry: any direction, spacing and origin keeps the output on the input grid and the
organs where they are in physical space; partial fields of view, very large extents, many slices.

Property tests (hypothesis) run the geometry pipeline pieces of ``Predictor.predict`` (canonical
orientation, localization grid, ROI, segmentation grid, probabilities back onto the ROI, paste,
original orientation) with a known structure in place of the networks' outputs, and a couple of
full predictions through the real Predictor.
"""

import os

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app import method
from app.geometry import Grid, from_canonical, to_canonical
from app.localization import (PARTIAL_FOV_EXTENT_MM, Roi, localization_grid, partial_fov_axes,
                              roi_from_foreground)
from app.predictor import Predictor
from app.preprocessing import scale_intensity
from app.segmentation import MAX_CROP_SIZE, MAX_CROP_VOXELS, labels_on_roi, paste, segmentation_grid
from evaluation.metrics import organ_dice
from release.roi_coverage import roi_coverage
from synthetic import CaseGeometry, generate_case
from tests.conftest import ROOT
from tests.test_predictor import rotation

UPSTREAM = ROOT.parent / "shared" / "upstream" / "efficientscn"
FAST = settings(deadline=None, max_examples=25, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------
# Random geometries
# ---------------------------------------------------------------------------------------------


@st.composite
def directions(draw, max_oblique_degrees=10.0):
    """Direction matrices: any axis permutation with any flips, then a small oblique rotation."""
    permutation = draw(st.permutations([0, 1, 2]))
    signs = draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=3, max_size=3))
    matrix = np.zeros((3, 3))
    for image_axis, physical_axis in enumerate(permutation):
        matrix[physical_axis, image_axis] = signs[image_axis]
    if draw(st.booleans()):
        axis = draw(st.lists(st.floats(-1, 1), min_size=3, max_size=3).filter(
            lambda v: np.linalg.norm(v) > 0.1))
        matrix = rotation(axis, draw(st.floats(-max_oblique_degrees, max_oblique_degrees))) @ matrix
    return matrix


@st.composite
def grids(draw, sizes=st.integers(2, 12), spacings=st.floats(0.3, 8.0)):
    """(size, spacing, origin, direction) of a random image grid."""
    size = tuple(draw(sizes) for _ in range(3))
    spacing = tuple(draw(spacings) for _ in range(3))
    origin = tuple(draw(st.floats(-800.0, 800.0)) for _ in range(3))
    return size, spacing, origin, tuple(draw(directions()).ravel())


def image_on(grid, values):
    size, spacing, origin, direction = grid
    image = sitk.GetImageFromArray(values)
    assert image.GetSize() == tuple(size)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def voxel_centres_mm(image):
    """Physical centres (z, y, x, 3) of every voxel of ``image``."""
    size = image.GetSize()
    index = np.stack(np.meshgrid(*[np.arange(n) for n in reversed(size)], indexing="ij")[::-1],
                     axis=-1).astype(float)  # (z, y, x, 3) holding (x, y, z) indices
    matrix = np.array(image.GetDirection()).reshape(3, 3)
    return np.asarray(image.GetOrigin()) + (index * image.GetSpacing()) @ matrix.T


def grid_of(image):
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


# ---------------------------------------------------------------------------------------------
# Properties of the geometry pipeline
# ---------------------------------------------------------------------------------------------


@FAST
@given(grid=grids(), seed=st.integers(0, 2**16))
def test_canonical_orientation_round_trip_is_exact_and_keeps_voxels_in_place(grid, seed):
    values = np.random.default_rng(seed).integers(-1024, 2000, tuple(reversed(grid[0])))
    image = image_on(grid, values.astype(np.int16))
    canonical, code = to_canonical(image)
    # the canonical voxel axes point closest to L, P, S
    matrix = np.array(canonical.GetDirection()).reshape(3, 3)
    assert list(np.abs(matrix).argmax(axis=0)) == [0, 1, 2] and np.all(np.diag(matrix) > 0)
    # every voxel keeps its value at its physical place
    centres = voxel_centres_mm(image)
    index = np.rint((centres - canonical.GetOrigin()) @ matrix / canonical.GetSpacing()).astype(int)
    moved = sitk.GetArrayViewFromImage(canonical)[index[..., 2], index[..., 1], index[..., 0]]
    np.testing.assert_array_equal(moved, values)
    back = from_canonical(canonical, code, image)
    assert grid_of(back) == grid_of(image)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), values)


def ball_probabilities(crop_grid, centre_mm, radius_mm, width_mm=0.25):
    """What a perfect network would output on ``crop_grid`` for a ball of liver: (z, y, x, 5)."""
    reference = crop_grid.reference()
    depth_mm = radius_mm - np.linalg.norm(voxel_centres_mm(reference) - centre_mm, axis=-1)
    inside = 1.0 / (1.0 + np.exp(-np.clip(depth_mm / width_mm, -50, 50)))
    probabilities = np.zeros((*inside.shape, method.NUM_CLASSES), np.float32)
    probabilities[..., 0], probabilities[..., 1] = 1.0 - inside, inside
    return probabilities


@settings(deadline=None, max_examples=20, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(grid=grids(sizes=st.integers(12, 40), spacings=st.floats(1.0, 10.0)),
       offset=st.lists(st.floats(-0.15, 0.15), min_size=3, max_size=3),
       radius_share=st.floats(0.2, 0.3))
def test_a_structure_stays_where_it_is_through_roi_crop_and_paste(grid, offset, radius_share):
    """The ball comes out of the pipeline on the input's exact grid, at its physical place.

    In place of the networks: the localization foreground is the ball on the localization grid,
    and the class probabilities on the segmentation crop are the ball's (``ball_probabilities``).
    Voxels farther from the ball's surface than one crop voxel must be labelled exactly.
    """
    image = image_on(grid, np.zeros(tuple(reversed(grid[0])), np.int16))
    extent = np.asarray(grid[0]) * np.asarray(grid[1])
    matrix = np.array(grid[3]).reshape(3, 3)
    centre = np.asarray(grid[2]) + matrix @ ((np.asarray(grid[0]) - 1) / 2 * grid[1]
                                             + np.asarray(offset) * extent)
    radius = radius_share * extent.min()

    canonical, code = to_canonical(image)
    image_grid = Grid.of(canonical)
    loc_grid = localization_grid(image_grid)
    foreground = np.linalg.norm(voxel_centres_mm(loc_grid.reference()) - centre, axis=-1) < radius
    body = np.full(foreground.shape, scale_intensity(0.0))  # the whole image is "body"
    roi = roi_from_foreground(foreground, loc_grid, image_grid, network_input=body)
    crop_grid = segmentation_grid(image_grid, roi)
    assert np.prod(crop_grid.size) <= MAX_CROP_VOXELS
    if not any(partial_fov_axes(image_grid)):  # a partial field of view may exceed one axis
        assert all(n <= limit for n, limit in zip(crop_grid.size, MAX_CROP_SIZE))
    roi_labels = labels_on_roi(ball_probabilities(crop_grid, centre, radius), crop_grid,
                               roi.grid(image_grid))
    labels = sitk.GetImageFromArray(paste(roi_labels, roi, image_grid.size))
    labels.CopyInformation(canonical)
    labels = from_canonical(labels, code, image)

    assert grid_of(labels) == grid_of(image)
    distance_inside = radius - np.linalg.norm(voxel_centres_mm(image) - centre, axis=-1)
    tolerance = crop_grid.spacing_mm[0]
    array = sitk.GetArrayViewFromImage(labels)
    assert np.all(array[distance_inside > tolerance] == 1)
    assert np.all(array[distance_inside < -tolerance] == 0)


@settings(deadline=None, max_examples=2, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(direction=directions(max_oblique_degrees=8.0),
       spacing=st.tuples(st.floats(5.0, 6.5), st.floats(5.0, 6.5), st.floats(2.5, 6.0)),
       seed=st.integers(40, 60))
def test_full_predictions_keep_the_input_grid_and_find_the_liver(predictor, direction, spacing,
                                                                 seed):
    """Whole-abdomen scans (about 330 x 330 x 330 mm) in random orientations through the real
    Predictor: the output grid is the input's exactly, and the liver is found in place."""
    physical_size = np.array([int(330 / spacing[0]), int(330 / spacing[1]), int(330 / spacing[2])])
    physical_axis = np.abs(direction).argmax(axis=0)  # image axis i runs along this patient axis
    size = physical_size[physical_axis]
    spacing_on_axes = np.asarray(spacing)[physical_axis]
    centre = np.array([0.0, -30.0, -400.0])
    origin = centre - direction @ (spacing_on_axes * (size - 1) / 2)
    geometry = CaseGeometry(tuple(int(n) for n in size), tuple(spacing_on_axes), tuple(origin),
                            tuple(direction.ravel()))
    image, labels = generate_case(seed, geometry=geometry)
    output = predictor.predict(image).labels
    assert grid_of(output) == grid_of(image) and output.GetPixelID() == sitk.sitkUInt8
    assert organ_dice(output, labels)["liver"] >= 0.5


# ---------------------------------------------------------------------------------------------
# Partial field of view
# ---------------------------------------------------------------------------------------------


def identity_grid(size, spacing):
    return Grid(tuple(size), tuple(spacing), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))


def test_partial_fov_is_an_extent_below_200_mm_along_an_axis():
    assert PARTIAL_FOV_EXTENT_MM == 200.0
    assert partial_fov_axes(identity_grid((512, 512, 11), (0.8, 0.8, 5.0))) == (False, False, True)
    assert partial_fov_axes(identity_grid((100, 512, 40), (1.99, 0.8, 5.0))) == (True, False, False)
    assert partial_fov_axes(identity_grid((250, 250, 40), (0.8, 0.8, 5.0))) == (False,) * 3


def test_on_a_thin_slab_the_roi_spans_the_slab_and_the_body_whatever_the_network_found():
    image_grid = identity_grid((128, 128, 11), (3.0, 3.0, 5.0))  # 384 x 384 x 55 mm
    loc_grid = localization_grid(image_grid)
    shape = tuple(reversed(loc_grid.size))
    foreground = np.zeros(shape, bool)
    foreground[shape[0] // 2, 30:33, 30:33] = True  # a scrap: what the network finds on a slab
    # the body: an ellipse of soft tissue in air, from x = 92..292 mm and y = 132..252 mm
    centres = voxel_centres_mm(loc_grid.reference())
    inside = ((centres[..., 0] - 192) / 100) ** 2 + ((centres[..., 1] - 192) / 60) ** 2 < 1
    network_input = np.where(inside, scale_intensity(40.0), scale_intensity(-1000.0))
    roi = roi_from_foreground(foreground, loc_grid, image_grid, network_input=network_input)
    low, high = roi.axis_mm(image_grid)
    assert roi.start[2] == 0 and roi.size[2] == 11  # the whole slab
    assert np.all(low[:2] <= [92, 132]) and np.all(high[:2] >= [292, 252])  # holds the body
    assert high[0] - low[0] < 384 - 40  # the body's box, not the whole field of view
    assert roi_from_foreground(foreground, loc_grid, image_grid) == Roi.whole(image_grid)


def test_a_whole_abdomen_keeps_the_networks_roi():
    image_grid = identity_grid((128, 128, 80), (3.0, 3.0, 5.0))  # 384 x 384 x 400 mm
    loc_grid = localization_grid(image_grid)
    foreground = np.zeros(tuple(reversed(loc_grid.size)), bool)
    foreground[30:40, 30:40, 30:40] = True
    roi = roi_from_foreground(foreground, loc_grid, image_grid,
                              network_input=np.zeros(foreground.shape, np.float32))
    low, high = roi.axis_mm(image_grid)
    assert np.all(high - low < 100)  # 10 voxels of 6 mm plus 2 x 10 mm, rounded to image voxels


def slab_of(image, labels, centre_slice, slices, thickness_mm):
    """``slices`` slices of ``thickness_mm`` centred on a slice of ``image`` (labels alike)."""
    reference = sitk.Image([image.GetSize()[0], image.GetSize()[1], slices], sitk.sitkInt16)
    reference.SetDirection(image.GetDirection())
    reference.SetSpacing((*image.GetSpacing()[:2], thickness_mm))
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint((0, 0, centre_slice)))
    matrix = np.array(image.GetDirection()).reshape(3, 3)
    reference.SetOrigin(tuple(centre - matrix @ [0, 0, (slices - 1) / 2 * thickness_mm]))
    return (sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, -1024,
                          sitk.sitkInt16),
            sitk.Resample(labels, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                          sitk.sitkUInt8))


# 5 mm slabs of ../shared/data's real CT: (centre slice of the 3 mm scan, slices) -> the share of
# their organ voxels that the published network's ROI held without the partial-FOV rule (with it:
# 1.0 each). The project's own weights held 1.0 either way: that scan was in their training data.
THIN_SLABS = {(74, 8): 0.0, (92, 8): 0.138, (68, 11): 0.849, (62, 16): 0.882}


@pytest.fixture(scope="module")
def published_localization(tmp_path_factory):
    """A Predictor with the published localization network (from ../shared/upstream)."""
    if not (UPSTREAM / "localization" / "variables" / "variables.index").exists():
        if os.environ.get("REQUIRE_SHARED_DATA"):
            pytest.fail(f"{UPSTREAM} is missing but REQUIRE_SHARED_DATA is set")
        pytest.skip(f"{UPSTREAM} is absent (the published weights are obtained by users)")
    from release.import_weights import import_weights

    out = tmp_path_factory.mktemp("published") / "weights"
    import_weights(UPSTREAM, out, only="localization")
    return Predictor(out)


@pytest.mark.parametrize("weights", ["project", "published"])
def test_on_thin_slabs_of_real_ct_the_roi_holds_the_organs(weights, shared_data, request):
    chosen = request.getfixturevalue("predictor" if weights == "project"
                                     else "published_localization")
    image = sitk.ReadImage(str(shared_data / "images" / "ts_example_0000.nii.gz"))
    labels = sitk.ReadImage(str(shared_data / "labels" / "ts_example.nii.gz"))
    for (centre_slice, slices), before in THIN_SLABS.items():
        slab, slab_labels = slab_of(image, labels, centre_slice, slices, 5.0)
        record = roi_coverage(chosen, slab, slab_labels)
        assert record["organ_voxels"] > 1000
        assert record["coverage"] >= 0.99, (centre_slice, slices, before, record)


# ---------------------------------------------------------------------------------------------
# Very large extents and many slices
# ---------------------------------------------------------------------------------------------


def test_a_huge_roi_gets_grids_of_valid_size_that_cover_it():
    image_grid = identity_grid((40, 40, 48), (16.0, 16.0, 16.0))  # 640 x 640 x 768 mm
    loc_grid = localization_grid(image_grid)
    assert loc_grid.spacing_mm[0] > method.LOCALIZATION_SPACING_MM
    assert loc_grid.size[:2] <= (80, 80) and loc_grid.size[2] <= 256
    assert np.all(np.array(loc_grid.extent_mm) >= image_grid.extent_mm)
    roi = Roi.whole(image_grid)
    crop_grid = segmentation_grid(image_grid, roi)
    assert all(n <= limit for n, limit in zip(crop_grid.size, MAX_CROP_SIZE))
    low, high = roi.axis_mm(image_grid)
    assert np.all(np.array(crop_grid.extent_mm) >= high - low)
    assert crop_grid.spacing_mm[0] == pytest.approx(max(640 / 128, 768 / 160) + 0.1)


def test_a_1100_slice_image_of_large_extent_is_segmented_on_its_grid(predictor, shared_data):
    """32 x 32 x 1,100 voxels of 20 x 20 x 0.7 mm (640 x 640 x 770 mm) around the real CT:
    many slices, and a field of view that needs the enlarged localization spacing."""
    ct = sitk.ReadImage(str(shared_data / "images" / "ts_example_0000.nii.gz"))
    reference = sitk.Image([32, 32, 1100], sitk.sitkInt16)
    reference.SetSpacing((20.0, 20.0, 0.7))
    centre = np.array(ct.TransformContinuousIndexToPhysicalPoint(
        [(n - 1) / 2 for n in ct.GetSize()]))
    reference.SetOrigin(tuple(centre - np.array([31 * 10.0, 31 * 10.0, 1099 * 0.35])))
    image = sitk.Resample(ct, reference, sitk.Transform(), sitk.sitkLinear, -1024, sitk.sitkInt16)
    result = predictor.predict(image)
    assert grid_of(result.labels) == grid_of(image)
    assert result.localization_spacing_mm > method.LOCALIZATION_SPACING_MM
    labels = sitk.GetArrayViewFromImage(result.labels)
    body = sitk.GetArrayViewFromImage(image) > -500
    assert (labels == 1).sum() > 0 and labels.max() <= 4
    # the organs are found inside the body, not in the padding above and below the real scan
    assert (body & (labels > 0)).sum() >= 0.8 * (labels > 0).sum()
