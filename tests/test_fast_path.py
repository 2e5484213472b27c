"""The fast path computes what the plain float32 path computes.

Separable preprocessing equals SimpleITK's smoothing and resampling to float32 rounding; labels
by cells equal full-resolution resampling then argmax; whole cases segmented the fast way
(default precision, bfloat16 on CPUs that have it) agree with the plain float32 path on at
least 99.9% of the voxels; and the fast preprocessing never holds a float copy of the image.
"""

import math
import tracemalloc

import keras
import numpy as np
import pytest
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter

from app import method
from app.geometry import (Grid, centred_grid, gaussian_weights, separable_apply,
                          without_negligible_weights)
from app.localization import Roi, localization_grid
from app.precision import FLOAT32_LAYERS, build_networks
from app.predictor import Predictor
from app.preprocessing import network_input
from app.segmentation import labels_on_roi, segmentation_grid
from synthetic import CaseGeometry, generate_case

# The plain float32 path is the reference; the fast path may differ on at most this fraction.
MIN_AGREEMENT = 0.999


def rotation_matrix(axis, degrees):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    angle = math.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return (np.eye(3) * math.cos(angle) + math.sin(angle) * k
            + (1 - math.cos(angle)) * np.outer(axis, axis))


def random_ct(size_xyz, spacing_mm, direction=None, seed=0):
    """An int16 image of smooth random HU values (-1000 .. 1000) on a given grid."""
    rng = np.random.default_rng(seed)
    values = gaussian_filter(rng.normal(size=tuple(reversed(size_xyz))), 2.0)
    values = np.clip(values / values.std() * 400, -1000, 1000).astype(np.int16)
    image = sitk.GetImageFromArray(values)
    image.SetSpacing(spacing_mm)
    image.SetOrigin((-12.0, 30.0, -400.0))
    if direction is not None:
        image.SetDirection(tuple(np.asarray(direction, float).ravel()))
    return image


# --- preprocessing ------------------------------------------------------------------------------

@pytest.mark.parametrize("spacing_mm", [(0.8, 0.8, 2.5), (3.0, 3.0, 3.0), (0.7, 0.9, 0.6)])
def test_gaussian_weights_repeat_simpleitk_smoothing_along_each_axis(spacing_mm):
    image = sitk.Cast(random_ct((23, 19, 17), spacing_mm), sitk.sitkFloat32)
    for sigma_mm in (1.0, 3.0):
        expected = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(image, sigma_mm))
        matrices = [gaussian_weights(n, s, sigma_mm) for n, s in zip(image.GetSize(), spacing_mm)]
        inside = [np.ones(n, bool) for n in image.GetSize()]
        got = separable_apply(sitk.GetArrayViewFromImage(image), matrices, inside)
        np.testing.assert_allclose(got, expected, atol=1e-3)  # HU, values up to 1000


def test_negligible_weights_are_dropped_without_changing_the_result():
    """The recursive Gaussian's far tails are float32 denormals (slow in BLAS on some CPUs):
    they become zeros, every other weight stays as it was, and a product changes by far less
    than float32's resolution."""
    weights = gaussian_weights(512, 0.8, 3.0).astype(np.float32)
    tiny = np.finfo(np.float32).tiny
    assert ((np.abs(weights) < tiny) & (weights != 0)).any()  # the case this is for
    cleaned = without_negligible_weights(weights)
    assert not ((np.abs(cleaned) < tiny) & (cleaned != 0)).any()
    kept = cleaned != 0
    np.testing.assert_array_equal(cleaned[kept], weights[kept])
    row_largest = np.abs(weights).max(axis=1, keepdims=True)
    assert (np.abs(weights) <= 1e-9 * row_largest)[~kept].all()
    line = np.random.default_rng(0).uniform(-1000, 3000, 512)
    np.testing.assert_allclose(cleaned.astype(np.float64) @ line, weights.astype(np.float64) @ line,
                               rtol=0, atol=1e-4)  # HU; float32 resolution at 1000 HU: 6e-5
    assert without_negligible_weights(np.zeros((0, 4))).shape == (0, 4)


@pytest.mark.parametrize("direction", ["identity", "oblique"])
@pytest.mark.parametrize("downsampling, sigma_mm", [("gaussian", 3.0), ("gaussian", 1.0),
                                                    ("area", 0.0), ("area", 3.0)])
def test_separable_network_input_equals_the_simpleitk_filters(direction, downsampling, sigma_mm):
    matrix = np.eye(3) if direction == "identity" else rotation_matrix([1.0, 0.3, 0.2], 7.0)
    image = random_ct((96, 80, 40), (2.1, 2.3, 5.0), matrix)
    image_grid = Grid.of(image)
    # a localization grid larger than the image (padding) and a crop inside it
    grids = [localization_grid(image_grid),
             centred_grid(image_grid, (90.0, 100.0, 70.0), (32, 32, 32), 2.0)]
    for grid in grids:
        plain = network_input(image, grid, sigma_mm, method.PADDING_HU, downsampling, plain=True)
        fast = network_input(image, grid, sigma_mm, method.PADDING_HU, downsampling)
        assert fast.shape == plain.shape == tuple(reversed(grid.size))
        np.testing.assert_allclose(fast, plain, atol=2e-6)  # network units: HU / 2048


def test_fast_preprocessing_never_holds_a_float_copy_of_the_image():
    # 256 x 256 x 600 int16 (a smooth pattern tiled, to be quick to make): 157 MB as float32
    pattern = np.asarray(sitk.GetArrayViewFromImage(random_ct((64, 64, 60), (1.0, 1.0, 1.0))))
    image = sitk.GetImageFromArray(np.tile(pattern, (10, 4, 4)))
    image.SetSpacing((1.5, 1.5, 0.8))
    float_copy_bytes = 4 * 256 * 256 * 600
    for grid in (localization_grid(Grid.of(image)),
                 centred_grid(Grid.of(image), (190.0, 190.0, 240.0), (160, 128, 160), 2.0)):
        tracemalloc.start()
        network_input(image, grid, 3.0, method.PADDING_HU)
        _, peak_bytes = tracemalloc.get_traced_memory()  # NumPy's allocations
        tracemalloc.stop()
        assert peak_bytes < float_copy_bytes / 4, (grid.size, peak_bytes)


# --- labels back on the ROI ---------------------------------------------------------------------

def smooth_probabilities(shape_zyx, seed, sharpness=20.0):
    """Random smooth class probabilities (z, y, x, 5) with organ-like blobs and many borders."""
    rng = np.random.default_rng(seed)
    fields = np.stack([gaussian_filter(rng.normal(size=shape_zyx), 3.0) for _ in range(5)], -1)
    weights = np.exp(sharpness * fields / fields.std())
    return (weights / weights.sum(axis=-1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("direction", ["identity", "oblique"])
def test_labels_by_cells_equal_full_resampling_then_argmax(direction):
    matrix = np.eye(3) if direction == "identity" else rotation_matrix([0.2, 1.0, 0.1], 11.0)
    parent = Grid((400, 300, 200), (0.8, 0.9, 1.7), (10.0, -5.0, 3.0), tuple(matrix.ravel()))
    crop = centred_grid(parent, (160.0, 120.0, 170.0), (64, 32, 96), 2.0)
    probabilities = smooth_probabilities((96, 32, 64), seed=1)
    rois = {
        "inside the crop": centred_grid(parent, (160.0, 120.0, 170.0), (140, 60, 100),
                                        parent.spacing_mm),
        "reaching out of the crop": centred_grid(parent, (60.0, 100.0, 20.0), (200, 90, 80),
                                                 parent.spacing_mm),
    }
    for name, roi in rois.items():
        plain = labels_on_roi(probabilities, crop, roi, plain=True)
        fast = labels_on_roi(probabilities, crop, roi)
        assert fast.dtype == np.uint8 and fast.shape == plain.shape == tuple(reversed(roi.size))
        assert len(np.unique(plain)) == 5, name  # every class present: a real test of borders
        assert np.mean(fast == plain) >= 0.99999, name


def test_a_label_border_inside_a_cell_lands_where_linear_interpolation_puts_it():
    # crop voxels along x at 0, 5, 10, 15 mm; ROI voxels every 0.5 mm. Between 5 and 10 mm the
    # background falls from 0.7 to 0 and the liver rises from 0.3 to 1: they cross at
    # 5 + 5 * 2/7 = 6.43 mm, so the liver starts at 6.5 mm (index 13), not at the midpoint
    # (7.5 mm) where a nearest-voxel rule would put it.
    identity = tuple(np.eye(3).ravel())
    roi = Grid((40, 2, 2), (0.5, 1.0, 1.0), (0.0, 0.0, 0.0), identity)
    crop = Grid((4, 2, 2), (5.0, 2.0, 2.0), (0.0, 0.0, 0.0), identity)
    probabilities = np.zeros((2, 2, 4, 5), np.float32)
    probabilities[..., 0] = [1.0, 0.7, 0.0, 0.0]
    probabilities[..., 1] = [0.0, 0.3, 1.0, 1.0]
    fast = labels_on_roi(probabilities, crop, roi)
    np.testing.assert_array_equal(fast, labels_on_roi(probabilities, crop, roi, plain=True))
    assert np.flatnonzero(fast[0, 0] == 1)[0] == 13


# --- whole cases --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plain_predictor():
    return Predictor(precision="float32", plain=True)


@pytest.fixture
def fast_predictor(predictor):
    return predictor  # the shipped one (conftest): default precision, fast path


@pytest.fixture(scope="module")
def cases(shared_data):
    """Real CT and generated whole-abdomen cases: identity, flipped and oblique directions."""
    images = {"real CT": sitk.ReadImage(str(shared_data / "images" / "ts_example_0000.nii.gz"))}
    for name, matrix in (("generated", np.eye(3)), ("flipped", np.diag([-1.0, 1.0, -1.0])),
                         ("oblique", rotation_matrix([1.0, 0.3, 0.2], 7.0))):
        size_on_axes = np.array([160, 160, 70])[np.abs(matrix).argmax(axis=0)]
        spacing_on_axes = np.array([2.5, 2.5, 5.0])[np.abs(matrix).argmax(axis=0)]
        centre = np.array([0.0, -20.0, -300.0])
        origin = centre - matrix @ (spacing_on_axes * (size_on_axes - 1) / 2)
        geometry = CaseGeometry(tuple(int(n) for n in size_on_axes),
                                tuple(float(s) for s in spacing_on_axes),
                                tuple(float(o) for o in origin), tuple(matrix.ravel()))
        images[name] = generate_case(21, geometry=geometry)[0]
    return images


@pytest.mark.slow  # 44 s (the plain Keras path on four cases)
def test_fast_labels_agree_with_the_plain_float32_path(plain_predictor, fast_predictor, cases):
    for name, image in cases.items():
        plain = plain_predictor.predict(image)
        fast = fast_predictor.predict(image)
        assert (fast.labels.GetSize(), fast.labels.GetOrigin(), fast.labels.GetSpacing(),
                fast.labels.GetDirection()) == (image.GetSize(), image.GetOrigin(),
                                                image.GetSpacing(), image.GetDirection())
        reference = sitk.GetArrayViewFromImage(plain.labels)
        labels = sitk.GetArrayViewFromImage(fast.labels)
        assert (reference > 0).sum() > 1000, name  # organs were found: agreement means something
        agreement = np.mean(labels == reference)
        assert agreement >= MIN_AGREEMENT, (name, fast_predictor.precision, agreement)


@pytest.mark.slow  # 25 s, 33 s where it builds the plain Predictor
def test_float32_fast_path_gives_the_plain_labels(plain_predictor, cases):
    fast_float32 = Predictor(precision="float32")
    for name in ("real CT", "oblique"):
        plain = sitk.GetArrayFromImage(plain_predictor.predict(cases[name]).labels)
        fast = sitk.GetArrayFromImage(fast_float32.predict(cases[name]).labels)
        assert np.mean(fast == plain) >= 0.99999, name


# --- networks and settings ----------------------------------------------------------------------

def test_bfloat16_networks_keep_outputs_in_float32_and_the_global_policy_untouched():
    before = keras.config.dtype_policy().name
    localization_net, scn = build_networks("bfloat16")
    assert keras.config.dtype_policy().name == before
    compute = {layer.name: layer.compute_dtype for model in (localization_net, scn)
               for layer in model.layers}
    assert compute["local_appearance_contracting_0"] == "bfloat16"
    assert compute["localization_contracting_0"] == "bfloat16"
    for name in (*FLOAT32_LAYERS, "localization_prediction", "local_appearance_prediction",
                 "spatial_liver_prediction"):
        assert compute[name] == "float32", name
    outputs = scn(np.zeros((1, 32, 32, 32, 1), np.float32), training=False)
    assert outputs["probabilities"].dtype == "float32"


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision"):
        build_networks("float8")


def test_segmentation_grid_and_roi_for_the_cells_share_the_image_direction():
    # labels_on_roi's fast way needs the crop and the ROI to share one direction; both come from
    # the image grid, whatever its direction
    matrix = rotation_matrix([0.3, 0.4, 1.0], 20.0)
    image_grid = Grid((300, 280, 90), (0.8, 0.8, 3.0), (1.0, 2.0, 3.0), tuple(matrix.ravel()))
    roi = Roi((40, 50, 10), (200, 150, 60))
    crop = segmentation_grid(image_grid, roi)
    assert crop.direction == roi.grid(image_grid).direction == image_grid.direction
