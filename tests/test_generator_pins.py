"""The procedural generator's output is pinned: refactoring it (splitting it into modules, adding
the real-anatomy path beside it) must not change a single voxel of a procedural case.

The digests were taken on the generator before such changes. A deliberate change of the
procedural cases (new anatomy, new appearance) updates them in the same commit, saying why.
"""

import hashlib

import numpy as np
import pytest
import SimpleITK as sitk

from synthetic.__main__ import DIRECTIONS, fixed_geometry, oblique
from synthetic.generator import generate_case

# seed, grid (None: drawn from the seed), image and label SHA-256 prefixes, label voxel counts
PINNED = [
    (3, ((96, 96, 48), (4.0, 4.0, 5.0), DIRECTIONS["identity"]),
     "4fef2c0a109d039b", "70e92fb5ad25b76e", [411668, 20992, 4168, 4839, 701]),
    (11, ((80, 72, 40), (5.0, 5.0, 6.0), oblique(5.0)),
     "8e65c3e9d47302bc", "1b68e0b89472b33f", [213932, 12391, 2011, 1527, 539]),
    (27, None, "56779a13f8b3656b", "065dfcd9b41925aa", [371165, 18198, 4024, 2188, 713]),
]


def digest(array):
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


@pytest.mark.parametrize("seed, grid, image_digest, label_digest, counts", PINNED,
                         ids=[f"seed{p[0]}" for p in PINNED])
def test_procedural_cases_are_unchanged(seed, grid, image_digest, label_digest, counts):
    if grid is None:
        image, label = generate_case(seed, in_plane_size=96, max_voxels=400_000)
    else:
        image, label = generate_case(seed, geometry=fixed_geometry(*grid))
    labels = sitk.GetArrayViewFromImage(label)
    # Counts first: a mismatch there says how far the labels moved, not just that they did.
    assert np.bincount(labels.ravel(), minlength=5).tolist() == counts
    assert digest(labels) == label_digest
    assert digest(sitk.GetArrayViewFromImage(image)) == image_digest
