"""Tests of the synthetic CT generator, on small grids (3-4 mm voxels) to stay fast."""

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from synthetic import LABELS, CaseGeometry, generate_case, random_geometry, write_case
from synthetic.__main__ import main as cli_main
from synthetic.generator import patient_of

IDENTITY = np.eye(3)
FLIPPED = np.diag([-1.0, 1.0, -1.0])
# Coronal storage: image x = patient left, image y = head to feet, image z = front to back.
CORONAL = np.array([[1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]])
SAGITTAL = np.array([[0, 0, 1.0], [1.0, 0, 0], [0, -1.0, 0]])


def tilt(degrees):
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return np.array([[1.0, 0, 0], [0, c, -s], [0, s, c]])


def grid(direction=IDENTITY, physical_size=(100, 100, 100), physical_spacing=(4.0, 4.0, 4.0),
         center=(5.0, -20.0, -700.0)):
    """A grid covering one physical box (400 mm long: a whole abdomen) whatever its direction.

    Image axis i runs along the physical axis its direction column points to, so its size and
    spacing are that physical axis's.
    """
    matrix = np.asarray(direction, dtype=float)
    axis = np.argmax(np.abs(matrix), axis=0)
    size = np.asarray(physical_size)[axis]
    spacing = np.asarray(physical_spacing, dtype=float)[axis]
    origin = np.asarray(center) - matrix @ (spacing * (size - 1) / 2)
    return CaseGeometry(tuple(int(v) for v in size), tuple(float(v) for v in spacing),
                        tuple(float(v) for v in origin), tuple(float(v) for v in matrix.ravel()))


def arrays(image, label):
    return sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(label)


def volumes_ml(label, geometry):
    voxel_ml = float(np.prod(geometry.spacing_mm)) / 1000.0
    return {name: float((label == value).sum()) * voxel_ml for name, value in LABELS.items()}


def centroid_mm(label, geometry, value):
    """Physical centroid of the voxels with ``value`` (label array is (z, y, x))."""
    zyx = np.argwhere(label == value)
    return geometry.index_to_physical(zyx[:, ::-1]).mean(axis=0)


@pytest.fixture(scope="module")
def abdomen():
    """(image array, label array, geometry) of one whole-abdomen case."""
    geometry = grid()
    image, label = generate_case(11, geometry)
    return (*arrays(image, label), geometry)


def test_same_seed_same_case_and_different_seed_different_case():
    kwargs = dict(in_plane_size=64, max_voxels=64 * 64 * 40)
    first = generate_case(5, **kwargs)
    again = generate_case(5, **kwargs)
    other = generate_case(6, **kwargs)
    assert CaseGeometry.from_image(first[0]) == CaseGeometry.from_image(again[0])
    for a, b in zip(arrays(*first), arrays(*again)):
        np.testing.assert_array_equal(a, b)
    image, label = arrays(*first)
    other_image, other_label = arrays(*other)
    assert (CaseGeometry.from_image(first[0]) != CaseGeometry.from_image(other[0])
            or not np.array_equal(image, other_image))


def test_given_geometry_is_random_geometry_of_the_seed():
    """generate_case(seed) draws its grid from the seed: passing that grid changes nothing."""
    image, label = generate_case(8, in_plane_size=48, max_voxels=48 * 48 * 30)
    geometry = CaseGeometry.from_image(image)
    image2, label2 = generate_case(8, geometry)
    for a, b in zip(arrays(image, label), arrays(image2, label2)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("direction", [IDENTITY, FLIPPED, CORONAL, SAGITTAL, tilt(6.0)],
                         ids=["identity", "flipped", "coronal", "sagittal", "oblique"])
def test_image_and_label_lie_on_the_requested_grid(direction):
    geometry = grid(direction, physical_size=(48, 48, 30), physical_spacing=(8.0, 8.0, 12.0))
    image, label = generate_case(2, geometry)
    for item in (image, label):
        assert item.GetSize() == geometry.size
        np.testing.assert_allclose(item.GetSpacing(), geometry.spacing_mm, atol=1e-9)
        np.testing.assert_allclose(item.GetOrigin(), geometry.origin_mm, atol=1e-9)
        np.testing.assert_allclose(item.GetDirection(), geometry.direction, atol=1e-9)
    assert CaseGeometry.from_image(image) == CaseGeometry.from_image(label)
    assert image.GetPixelID() == sitk.sitkInt16
    assert label.GetPixelID() == sitk.sitkUInt8


def test_whole_abdomen_has_all_organs_with_human_volumes(abdomen):
    image, label, geometry = abdomen
    assert image.dtype == np.int16 and label.dtype == np.uint8
    assert set(np.unique(label)) <= {0, 1, 2, 3, 4}
    volumes = volumes_ml(label, geometry)
    assert 1200 <= volumes["liver"] <= 2200, volumes
    assert 100 <= volumes["spleen"] <= 350, volumes
    assert 2 * 120 <= volumes["kidney"] <= 2 * 200, volumes
    assert 40 <= volumes["pancreas"] <= 120, volumes
    assert image.min() >= -1024 and image.max() <= 3071


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_organ_volumes_and_each_kidney_over_seeds(seed):
    geometry = grid(physical_spacing=(4.0, 4.0, 5.0), physical_size=(100, 100, 80))
    _, label = arrays(*generate_case(seed, geometry))
    volumes = volumes_ml(label, geometry)
    assert 1200 <= volumes["liver"] <= 2200, volumes
    assert 100 <= volumes["spleen"] / patient_of(seed).spleen_growth <= 350, volumes
    assert 40 <= volumes["pancreas"] <= 120, volumes
    # The patient's left (+x in LPS) and right kidneys, split at the spine.
    kidney = np.argwhere(label == LABELS["kidney"])
    x_mm = geometry.index_to_physical(kidney[:, ::-1])[:, 0]
    spine_x = geometry.center_mm()[0]  # the patient is centred in the field of view
    voxel_ml = float(np.prod(geometry.spacing_mm)) / 1000.0
    for side in (x_mm < spine_x, x_mm >= spine_x):
        assert 100 <= side.sum() * voxel_ml <= 220, volumes


@pytest.mark.parametrize("seed", [3, 24])
def test_an_enlarged_spleen_reaches_its_volume_with_the_pancreatic_tail_at_its_hilum(seed):
    patient = patient_of(seed)
    assert patient.spleen_growth >= 1.6  # these seeds draw splenomegaly
    geometry = grid(physical_spacing=(4.0, 4.0, 5.0), physical_size=(100, 100, 80))
    _, label = arrays(*generate_case(seed, geometry))
    volume = volumes_ml(label, geometry)["spleen"]
    assert 0.9 <= volume / patient.target_ml["spleen"] <= 1.1, volume
    assert volume >= 1.6 * 100
    # The spleen grew forward and inward, not away from the gland: the tail still touches it.
    to_spleen = ndimage.distance_transform_edt(label != LABELS["spleen"], sampling=(5.0, 4.0, 4.0))
    assert to_spleen[label == LABELS["pancreas"]].min() <= 8.0


@pytest.mark.parametrize("seed", [1, 3, 4, 6, 8, 10])
def test_a_fatty_pancreas_is_mottled_with_fat_and_a_lean_one_is_not(seed):
    """Seeds 4, 6 and 8 draw fat between the pancreas's lobules (30-40 % of a fine random field),
    1, 3 and 10 none. Inside the gland (one voxel in from its edge) fat pulls a large share of
    voxels far below the gland's own HU; noise and texture alone leave almost none there."""
    patient = patient_of(seed)
    assert (patient.pancreas_fat > 0.3) == (seed in (4, 6, 8))
    geometry = grid(physical_size=(160, 130, 100), physical_spacing=(2.0, 2.0, 4.0))
    image, label = arrays(*generate_case(seed, geometry))
    core = ndimage.binary_erosion(label == LABELS["pancreas"], np.ones((1, 3, 3)))
    assert core.sum() > 1000
    far_below = float(np.mean(image[core] < patient.hu["pancreas"] - 40))
    if patient.pancreas_fat > 0:
        assert far_below > 0.3, far_below
    else:
        assert far_below < 0.05, far_below


def test_organs_sit_where_anatomy_puts_them(abdomen):
    """LPS: liver on the patient's right (-x), spleen left (+x), kidneys behind the pancreas
    (+y), liver above the kidneys' middle (+z)."""
    _, label, geometry = abdomen
    liver, kidney, spleen, pancreas = (centroid_mm(label, geometry, LABELS[k])
                                       for k in ("liver", "kidney", "spleen", "pancreas"))
    assert liver[0] < pancreas[0] < spleen[0]
    assert kidney[1] > pancreas[1]
    assert liver[2] > kidney[2] and spleen[2] > kidney[2]


@pytest.mark.parametrize("direction", [FLIPPED, CORONAL, tilt(5.0)],
                         ids=["flipped", "coronal", "oblique"])
def test_the_anatomy_lives_in_physical_space(abdomen, direction):
    """Another grid over the same box shows the same patient at the same physical place."""
    _, label, geometry = abdomen
    other = grid(direction)
    _, other_label = arrays(*generate_case(11, other))
    for name in ("liver", "spleen", "kidney"):
        expected = centroid_mm(label, geometry, LABELS[name])
        found = centroid_mm(other_label, other, LABELS[name])
        assert np.linalg.norm(found - expected) < 3.0, (name, expected, found)
    ratio = volumes_ml(other_label, other)["liver"] / volumes_ml(label, geometry)["liver"]
    assert 0.97 < ratio < 1.03


def test_intensities_are_ct_like(abdomen):
    image, label, _ = abdomen
    mean = {name: image[label == value].mean() for name, value in LABELS.items()}
    assert -10 <= mean["liver"] <= 170, mean  # fatty native to enhanced portal
    assert 10 <= mean["spleen"] <= 180, mean
    assert 0 <= mean["kidney"] <= 320, mean
    assert 0 <= mean["pancreas"] <= 170, mean
    # Air around the patient (the grid's corners) and a fat peak in the body's histogram.
    corners = image[:, :8, :8]
    assert corners.mean() < -950
    body = image[(image > -400) & (image < 300)]
    counts, edges = np.histogram(body, bins=np.arange(-400, 301, 10))
    soft = edges[:-1] < -40
    fat_peak = edges[:-1][soft][np.argmax(counts[soft])] + 5
    assert -140 <= fat_peak <= -60, fat_peak
    # Bone is present and bright.
    assert (image > 500).sum() > 100


def test_short_scan_holds_only_what_is_in_view():
    geometry = grid(physical_size=(80, 80, 10), physical_spacing=(5.0, 5.0, 5.0))
    image, label = arrays(*generate_case(4, geometry))
    assert image.shape == (10, 80, 80)
    assert set(np.unique(label)) <= {0, 1, 2, 3, 4}
    # 50 mm cannot hold a whole liver.
    assert volumes_ml(label, geometry)["liver"] < 1000


def test_write_case_writes_flare_named_files_atomically(tmp_path):
    geometry = grid(FLIPPED, physical_size=(40, 40, 20), physical_spacing=(10.0, 10.0, 20.0))
    image_path, label_path = write_case(tmp_path / "out", "case_0007", 3, geometry=geometry)
    assert image_path == tmp_path / "out" / "case_0007_0000.nii.gz"
    assert label_path == tmp_path / "out" / "case_0007.nii.gz"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "case_0007.nii.gz", "case_0007_0000.nii.gz"]
    expected = arrays(*generate_case(3, geometry))
    for path, array in zip((image_path, label_path), expected):
        read = sitk.ReadImage(str(path))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(read), array)
        np.testing.assert_allclose(read.GetOrigin(), geometry.origin_mm, atol=1e-3)
        np.testing.assert_allclose(read.GetDirection(), geometry.direction, atol=1e-5)


def test_cli_writes_cases(tmp_path, capsys):
    assert cli_main(["--out", str(tmp_path), "--cases", "2", "--seed", "9", "--prefix", "syn",
                     "--size", "32", "32", "8", "--spacing", "12", "12", "20",
                     "--direction", "coronal"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("syn_0000")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["syn_0000.nii.gz", "syn_0000_0000.nii.gz", "syn_0001.nii.gz",
                     "syn_0001_0000.nii.gz"]
    image = sitk.ReadImage(str(tmp_path / "syn_0001_0000.nii.gz"))
    assert image.GetSize() == (32, 32, 8)
    np.testing.assert_allclose(image.GetDirection(), CORONAL.ravel(), atol=1e-6)


def test_random_geometry_stays_in_its_ranges():
    rng = np.random.default_rng(0)
    kinds = {"identity": 0, "flip": 0, "permutation": 0, "oblique": 0}
    for _ in range(300):
        geometry = random_geometry(rng)
        matrix = geometry.direction_matrix
        np.testing.assert_allclose(matrix @ matrix.T, np.eye(3), atol=1e-9)
        axis = np.argmax(np.abs(matrix), axis=0)  # physical axis of each image axis
        physical_size = np.empty(3)
        physical_spacing = np.empty(3)
        physical_size[axis] = geometry.size
        physical_spacing[axis] = geometry.spacing_mm
        assert tuple(physical_size[:2]) == (512, 512)
        assert 0.6 - 1e-9 <= physical_spacing[0] == physical_spacing[1] <= 1.0 + 1e-9
        assert 0.8 - 1e-9 <= physical_spacing[2] <= 5.0 + 1e-9
        assert 40 - 5 <= physical_size[2] * physical_spacing[2] <= 600 + 5
        assert np.abs(geometry.origin_mm).max() > 1.0
        if np.allclose(matrix, np.eye(3)):
            kinds["identity"] += 1
        elif not np.allclose(np.abs(matrix).max(axis=0), 1.0):
            kinds["oblique"] += 1
        elif (axis == np.arange(3)).all():
            kinds["flip"] += 1
        else:
            kinds["permutation"] += 1
    assert kinds["identity"] > 150 and min(kinds.values()) > 10, kinds
    lengths = [random_geometry(rng).size for _ in range(5)]
    assert len(set(lengths)) > 1

    small = [random_geometry(rng, in_plane_size=128, max_voxels=128 * 128 * 60)
             for _ in range(100)]
    for geometry in small:
        assert np.prod(geometry.size) <= 128 * 128 * 60
        axis = np.argmax(np.abs(geometry.direction_matrix), axis=0)
        extent = np.empty(3)
        extent[axis] = np.asarray(geometry.size) * geometry.spacing_mm
        assert 295 <= extent[0] == extent[1] <= 505, geometry
        assert extent[2] <= 600 + 5
