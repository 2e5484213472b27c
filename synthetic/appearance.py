"""Appearance: tissue intensities and what the scanner makes of the patient.

Mean HU ranges per contrast phase and tissue (each patient draws one value per tissue, see
synthetic.patient), streaks through the spine, and the scan itself (:func:`_scan`): partial
volume of the output voxels, the reconstruction circle, and correlated Gaussian noise added at
full resolution.  Tissue textures are drawn by the scene as it paints (synthetic.scene).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk
from numpy.lib.stride_tricks import sliding_window_view

from synthetic.grids import CaseGeometry, Lattice, _partial_volume, _resample, _to_image

if TYPE_CHECKING:
    from synthetic.patient import Patient
    from synthetic.scene import _Scene

HU_MIN, HU_MAX = -1024, 3071
# Outside the scanner's reconstruction circle; far below HU_MIN so that noise and clipping turn
# it into exactly HU_MIN, as scanners store it.
_PADDING_HU = -3024.0


# ------------------------------------------------------------------------------------------------
# Intensities
# ------------------------------------------------------------------------------------------------


# Mean HU ranges per contrast phase; each case draws one value per tissue.
_PHASE_HU = {
    "native": dict(liver=(50, 66), spleen=(40, 52), cortex=(28, 40), medulla=(26, 36),
                   pelvis=(0, 15), pancreas=(32, 48), aorta=(35, 50), artery=(35, 50),
                   portal=(35, 50), hepatic_vein=(30, 45), ivc=(35, 50), heart=(35, 50),
                   myocardium=(38, 52), muscle=(40, 56), bowel_wall=(30, 45), adrenal=(25, 40),
                   bladder=(2, 15), kidney_vein=(35, 50)),
    "arterial": dict(liver=(62, 85), spleen=(95, 150), cortex=(170, 260), medulla=(70, 110),
                     pelvis=(0, 15), pancreas=(100, 140), aorta=(230, 420), artery=(200, 380),
                     portal=(100, 170), hepatic_vein=(45, 80), ivc=(60, 110), heart=(180, 350),
                     myocardium=(90, 130), muscle=(48, 60), bowel_wall=(60, 100),
                     adrenal=(60, 90), bladder=(2, 15), kidney_vein=(150, 250)),
    "portal": dict(liver=(98, 130), spleen=(105, 135), cortex=(150, 205), medulla=(140, 195),
                   pelvis=(5, 25), pancreas=(85, 115), aorta=(140, 200), artery=(130, 190),
                   portal=(150, 215), hepatic_vein=(130, 190), ivc=(120, 170), heart=(140, 190),
                   myocardium=(90, 120), muscle=(55, 68), bowel_wall=(80, 115), adrenal=(55, 80),
                   bladder=(2, 15), kidney_vein=(140, 190)),
    "delayed": dict(liver=(80, 100), spleen=(80, 100), cortex=(120, 160), medulla=(115, 155),
                    pelvis=(300, 1200), pancreas=(65, 90), aorta=(100, 140), artery=(100, 140),
                    portal=(100, 140), hepatic_vein=(100, 135), ivc=(100, 135), heart=(100, 140),
                    myocardium=(80, 105), muscle=(55, 65), bowel_wall=(60, 85), adrenal=(50, 70),
                    bladder=(5, 400), kidney_vein=(100, 140)),
}
_COMMON_HU = dict(sc_fat=(-120, -92), visceral_fat=(-108, -82), skin=(20, 60), lung=(-890, -830),
                  cortical=(700, 1200), cancellous=(140, 300), disc=(70, 100), csf=(0, 20),
                  bile=(0, 22), marrow_fat=(-80, 10), cartilage=(90, 220), table=(150, 500),
                  stomach_fluid=(0, 25), bowel_fluid=(5, 30), sinus_fat=(-90, -40))


# ------------------------------------------------------------------------------------------------
# The scanner
# ------------------------------------------------------------------------------------------------


def _scan(hu: np.ndarray, patient: Patient, grid: Lattice, geometry: CaseGeometry, offset,
          physical_spacing, noise_rng) -> sitk.Image:
    """The scanner's image (int16 HU on ``geometry``) of the coarse HU map ``hu``: partial
    volume of the output voxels, the reconstruction circle, quantum noise. Modifies ``hu``."""
    hu += np.float32(patient.hu_offset)
    _partial_volume(hu, grid, physical_spacing)
    if patient.circle_padding:
        # Outside the reconstruction circle scanners store a constant.
        centre = geometry.center_mm() - offset
        corners = geometry.corners_mm()
        radius = 0.5 * min(np.ptp(corners[:, 0]), np.ptp(corners[:, 1]))
        outside = ((grid.x[None, :] - centre[0]) ** 2 + (grid.y[:, None] - centre[1]) ** 2
                   > radius ** 2)
        hu[:, outside] = _PADDING_HU

    full = _resample(_to_image(hu, grid, grid.full(), offset), geometry, (0, 0, 0),
                     geometry.size, _PADDING_HU, sitk.sitkInt16)
    clean = sitk.GetArrayViewFromImage(full)
    pixels = np.empty(clean.shape, np.int16)
    for sl, noise in _noise(noise_rng, clean.shape, patient.noise_sigma):
        np.add(clean[sl], noise, out=pixels[sl])
        np.clip(pixels[sl], HU_MIN, HU_MAX, out=pixels[sl])
    del full, clean
    return geometry.apply_to(sitk.GetImageFromArray(pixels))


def _noise(rng: np.random.Generator, shape_zyx, sigma: float):
    """Yields (z slice, int16 noise) chunks: Gaussian noise correlated over ~2 voxels in-plane,
    as reconstruction kernels make it.

    Rows are cut at random offsets from one pool of samples: drawing 50+ million normal
    variates one by one would dominate the generation time, and the rows never line up.
    """
    nz, ny, nx = shape_zyx
    pool = rng.standard_normal(max(1 << 21, 8 * nx), dtype=np.float32)
    pool = np.rint((pool[1:] + pool[:-1]) * (sigma / 2.0)).astype(np.int16)
    windows = sliding_window_view(pool, nx)
    chunk = max(1, (1 << 22) // max(ny * nx, 1))
    for z0 in range(0, nz, chunk):
        z1 = min(nz, z0 + chunk)
        starts = rng.integers(0, len(windows), size=(z1 - z0) * ny)
        block = windows[starts].reshape(z1 - z0, ny, nx)
        block[:, 1:, :] += block[:, :-1, :]  # numpy buffers the overlapping operands
        yield slice(z0, z1), block


def _paint_streaks(scene: _Scene, hu):
    """Faint streaks through the spine in the axial planes (beam hardening, photon starvation)."""
    p, grid = scene.p, scene.grid
    rng = scene.rng if scene.rng is not None else np.random.default_rng(0)
    Y, X = grid.y[:, None], grid.x[None, :]
    pattern = np.zeros((len(grid.y), len(grid.x)), np.float32)
    for _ in range(int(rng.integers(2, 6))):
        angle = rng.uniform(0, np.pi)
        x0, y0 = rng.normal(0, 15), p.vb_y0 + rng.normal(0, 15)
        dist = np.abs((X - x0) * math.sin(angle) - (Y - y0) * math.cos(angle))
        pattern += rng.normal(0, 25) * np.exp(-0.5 * (dist / rng.uniform(1.5, 4.0)) ** 2)
    along = 0.5 + 0.5 * np.sin(grid.z / rng.uniform(20, 80) + rng.uniform(0, 6.3))
    body = hu > -500
    hu += np.where(body, pattern[None] * along[:, None, None], 0).astype(np.float32)
