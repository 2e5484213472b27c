"""The procedural generator's output is pinned: refactoring it (splitting it into modules, adding
the real-anatomy path beside it) must not change a single voxel of a procedural case.

The digests were taken on the generator before such changes. A deliberate change of the
procedural cases (new anatomy, new appearance) updates them in the same commit, saying why.

Labels are pinned exactly. Image voxels depend in their last HU on the CPU's vector instructions
(the same code gives other digests on an AVX2-only CPU than on an AVX-512 one): the image digest
is pinned per kind of CPU, and on every CPU the HU mean and standard deviation per label must
agree with the recorded ones within 0.05 HU (a different noise draw moves the pancreas mean by
about 1 HU), which is all that is checked on a kind of CPU with no recorded digest.
"""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from synthetic.__main__ import DIRECTIONS, fixed_geometry, oblique
from synthetic.generator import generate_case

# seed, grid (None: drawn from the seed), image SHA-256 prefix per kind of CPU, label SHA-256
# prefix, label voxel counts, HU (mean, standard deviation) per label 0-4
PINNED = [
    (3, ((96, 96, 48), (4.0, 4.0, 5.0), DIRECTIONS["identity"]),
     {"avx512": "4fef2c0a109d039b", "avx2": "dd8d8b0a28ceee22"}, "70e92fb5ad25b76e",
     [411668, 20992, 4168, 4839, 701],
     [(-630.305, 476.068), (113.283, 26.081), (150.749, 66.501), (118.221, 31.28),
      (85.854, 37.936)]),
    (11, ((80, 72, 40), (5.0, 5.0, 6.0), oblique(5.0)),
     {"avx512": "8e65c3e9d47302bc", "avx2": "8e65c3e9d47302bc"}, "1b68e0b89472b33f",
     [213932, 12391, 2011, 1527, 539],
     [(-565.518, 454.419), (118.81, 26.086), (115.52, 59.332), (115.462, 31.063),
      (42.909, 40.971)]),
    (27, None, {"avx512": "56779a13f8b3656b", "avx2": "37fc573bcf63eec9"}, "065dfcd9b41925aa",
     [371165, 18198, 4024, 2188, 713],
     [(-528.241, 496.874), (66.963, 28.54), (111.8, 62.844), (103.936, 39.091),
      (27.617, 53.612)]),
]
HU_TOLERANCE = 0.05


def cpu_kind():
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if cpuinfo.exists() else ""
    return "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "other"


def digest(array):
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def hu_per_label(image, labels):
    hu = sitk.GetArrayViewFromImage(image).astype(np.float64)
    return [(hu[labels == value].mean(), hu[labels == value].std()) for value in range(5)]


@pytest.mark.parametrize("seed, grid, image_digests, label_digest, counts, hu", PINNED,
                         ids=[f"seed{p[0]}" for p in PINNED])
def test_procedural_cases_are_unchanged(seed, grid, image_digests, label_digest, counts, hu):
    if grid is None:
        image, label = generate_case(seed, in_plane_size=96, max_voxels=400_000)
    else:
        image, label = generate_case(seed, geometry=fixed_geometry(*grid))
    labels = sitk.GetArrayViewFromImage(label)
    # Counts first: a mismatch there says how far the labels moved, not just that they did.
    assert np.bincount(labels.ravel(), minlength=5).tolist() == counts
    assert digest(labels) == label_digest
    np.testing.assert_allclose(hu_per_label(image, labels), hu, rtol=0, atol=HU_TOLERANCE)
    if cpu_kind() in image_digests:
        assert digest(sitk.GetArrayViewFromImage(image)) == image_digests[cpu_kind()]
