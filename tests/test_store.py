"""The prepared-case cache: whole cases written, one network's images read when asked."""

import numpy as np
import SimpleITK as sitk

from synthetic import generate_case
from training.cases import prepare_case
from training.store import IMAGES, cached, held_bytes, load


def test_a_stage_reads_only_its_own_images_and_they_equal_the_prepared_ones(tmp_path):
    case = prepare_case("demo", *generate_case(5, in_plane_size=64))
    calls = []

    def prepare():
        calls.append(1)
        return case

    whole = cached(tmp_path, "demo", prepare)
    assert calls == [1] and all(getattr(whole, field) is not None for field in IMAGES)
    for stage in ("localization", "segmentation"):
        part = cached(tmp_path, "demo", prepare, stage)
        assert calls == [1]  # from the cache, not prepared again
        for field in IMAGES:
            if field.startswith(stage):
                np.testing.assert_array_equal(sitk.GetArrayFromImage(getattr(part, field)),
                                              sitk.GetArrayFromImage(getattr(case, field)))
                assert getattr(part, field).GetOrigin() == getattr(case, field).GetOrigin()
            else:
                assert getattr(part, field) is None
        assert part.covered == case.covered and part.image_grid == case.image_grid
        np.testing.assert_array_equal(part.roi_low_mm, case.roi_low_mm)
    assert all(getattr(load(tmp_path / "demo"), field) is not None for field in IMAGES)


def test_images_are_held_in_whole_hu_and_float32_entries_load_as_such(tmp_path):
    """Prepared images are int16 (half the memory of float32); an entry written in float32 loads
    as the same values rounded; sampled through the augmentation, the rounding moves a voxel by at
    most half a HU."""
    from training import augment
    from training.cases import whole_hu

    case = prepare_case("demo", *generate_case(6, in_plane_size=64))
    for field in ("localization_image", "segmentation_image"):
        assert getattr(case, field).GetPixelID() == sitk.sitkInt16
    # an entry of the float32 format: HU with fractions
    rng = np.random.default_rng(0)
    hu = sitk.GetArrayFromImage(case.segmentation_image).astype(np.float32)
    hu += rng.uniform(-0.5, 0.5, hu.shape).astype(np.float32)
    old = sitk.GetImageFromArray(hu)
    old.CopyInformation(case.segmentation_image)
    cached(tmp_path, "old", lambda: case)
    sitk.WriteImage(old, str(tmp_path / "old" / "segmentation_image.mha"))
    loaded = load(tmp_path / "old", "segmentation").segmentation_image
    assert loaded.GetPixelID() == sitk.sitkInt16 and loaded.GetSpacing() == old.GetSpacing()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(loaded), whole_hu(hu))

    from app.geometry import Grid

    grid = Grid((40, 36, 32), (2.0, 2.0, 2.0), old.TransformContinuousIndexToPhysicalPoint(
        [n / 3 for n in old.GetSize()]), old.GetDirection())
    transform = sitk.Euler3DTransform()
    transform.SetRotation(0.1, -0.05, 0.2)
    ranges = augment.AugmentationRanges(intensity_shift=0.0, intensity_scale=0.0)
    (exact, _), (held, _) = (augment.resample_pair(image, case.segmentation_labels, grid,
                                                   transform, np.random.default_rng(1), ranges)
                             for image in (old, loaded))
    assert exact.std() > 0.01  # the crop holds structure
    assert np.abs(held - exact).max() <= 0.5 / 2048 + 1e-6

    # what a run holds of this case: 2 bytes a voxel of each image, 1 of each label image
    voxels = [int(np.prod(getattr(case, field).GetSize())) for field in IMAGES]
    assert held_bytes([case]) == 2 * voxels[0] + voxels[1] + 2 * voxels[2] + voxels[3]
    assert held_bytes([case, case]) == 2 * held_bytes([case])
