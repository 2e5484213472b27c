"""The prepared-case cache: whole cases written, one network's images read when asked."""

import numpy as np
import SimpleITK as sitk

from synthetic import generate_case
from training.cases import prepare_case
from training.store import IMAGES, cached, load


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
