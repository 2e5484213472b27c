"""Synthetic abdominal contrast CT with liver, kidney, spleen and pancreas labels.

How a case is made
------------------
1. The grid (synthetic.grids): the one asked for, or a CT-like grid drawn from the seed.
2. A patient is drawn from the seed alone (synthetic.patient): body, skeleton, organs and their
   neighbours, each an implicit field in mm (synthetic.fields) in a patient frame; its organs are
   scaled to the patient's target volumes (synthetic.scene).
3. The patient is placed relative to the grid (synthetic.patient): only the grid's centre and
   length matter, so one seed seen through flipped, permuted or oblique grids of the same scan has
   its organs at the same physical places and of the same shapes.
4. The scene is painted on a coarse patient-frame lattice (2-3 mm) covering the scan
   (synthetic.scene): an HU map, with tissue intensities per contrast phase from
   synthetic.appearance, and one field per organ, carved so that organs never overlap.
5. The scanner's image (synthetic.appearance): the HU map with partial volume, the reconstruction
   circle and noise, resampled onto the grid; the labels (here): each organ's field resampled
   around that organ and thresholded at 0, so labels are smooth at full resolution.

synthetic.anatomy makes cases in the same way around real patients' label maps.

All randomness comes from ``np.random.default_rng(seed)``, split into independent streams
(grid, patient, placement, textures, noise) so that one does not shift the others.

Labels: 0 background, 1 liver, 2 kidneys (both), 3 spleen, 4 pancreas.  Intrahepatic vessels
belong to the liver, the renal sinus and pelvis to the kidney; the inferior vena cava, the
portal vein outside the liver, the gallbladder and the splenic vein are excluded.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from app import method
from synthetic.appearance import _scan
from synthetic.fields import _FAR_MM, Field
from synthetic.grids import (CaseGeometry, Lattice, _coarse_grid, _resample, _to_image,
                             random_geometry)
from synthetic.patient import Patient, _place
from synthetic.scene import _body_box, _calibrate, _render

# Offered here too, for code that imports them from the entry point; nothing here uses them.
from synthetic.appearance import _PHASE_HU, HU_MAX, HU_MIN  # noqa: F401
from synthetic.fields import _ellipsoid, _ramp  # noqa: F401
from synthetic.scene import _Scene  # noqa: F401

# Label values by organ name: the inverse of the segmenter's labels.
LABELS = {name: value for value, name in method.LABELS.items()}


def _streams(seed):
    """Independent random streams of a case: grid, patient, placement, textures, noise."""
    return np.random.default_rng(seed).spawn(5)


def patient_of(seed: int) -> Patient:
    """The patient ``generate_case(seed)`` draws (before its organ volumes are calibrated)."""
    return Patient(_streams(seed)[1])


def generate_case(seed: int, geometry: CaseGeometry | None = None, in_plane_size: int = 512,
                  max_voxels: int | None = None) -> tuple[sitk.Image, sitk.Image]:
    """One synthetic case: (image int16 HU, label uint8) on exactly the same grid.

    Labels: 0 background, 1 liver, 2 kidneys, 3 spleen, 4 pancreas.  Without ``geometry`` a grid
    is drawn with :func:`random_geometry` (``in_plane_size``, ``max_voxels``) from the same seed.
    The patient depends on the seed only; the grid only decides where the patient lies in it.
    """
    geometry_rng, patient_rng, place_rng, texture_rng, noise_rng = _streams(seed)
    if geometry is None:
        geometry = random_geometry(geometry_rng, in_plane_size, max_voxels)
    patient = Patient(patient_rng)
    _calibrate(patient)
    offset = _place(patient, geometry, place_rng)
    grid, physical_spacing = _coarse_grid(geometry, offset)

    body_box = _body_box(patient, grid)
    hu, organs, _ = _render(patient, grid, texture_rng, body_box)
    image = _scan(hu, patient, grid, geometry, offset, physical_spacing, noise_rng)
    del hu
    label = _organ_labels(organs, grid, geometry, offset)
    return image, geometry.apply_to(sitk.GetImageFromArray(label))


# Lowest priority first: later organs win wherever interpolation makes two overlap.
_LABEL_ORDER = (("pancreas", 4), ("liver", 1), ("spleen", 3), ("kidney_l", 2), ("kidney_r", 2))


def _organ_labels(organs: dict, grid: Lattice, geometry: CaseGeometry, offset,
                  names=None) -> np.ndarray:
    """Label array (z, y, x) uint8 on ``geometry`` of the organ fields (all, or ``names``)."""
    size_arr = np.asarray(geometry.size)
    label = np.zeros(tuple(int(v) for v in size_arr[::-1]), np.uint8)
    for name, value in _LABEL_ORDER:
        field = organs.get(name)
        if field is None or (names is not None and name not in names):
            continue
        # Resample only around the organ itself (its block has room for the worst case).
        inside = field.values > -2 * grid.spacing.max()
        if not inside.any():
            continue
        crop = []
        for axis in range(3):
            hits = np.nonzero(inside.any(axis=tuple(a for a in range(3) if a != axis)))[0]
            crop.append(slice(int(hits[0]), int(hits[-1]) + 1))
        field = Field(tuple(slice(s.start + c.start, s.start + c.stop)
                            for s, c in zip(field.sl, crop)), field.values[tuple(crop)])
        sub = Lattice(grid.block_origin(field.sl), grid.spacing, field.values.shape)
        box = geometry.physical_to_index(
            np.array([[x, y, z] for x in (sub.x[0], sub.x[-1]) for y in (sub.y[0], sub.y[-1])
                      for z in (sub.z[0], sub.z[-1])]) + offset)
        start = np.clip(np.floor(box.min(axis=0)).astype(int), 0, size_arr)
        stop = np.clip(np.ceil(box.max(axis=0)).astype(int) + 1, 0, size_arr)
        if np.any(stop <= start):
            continue
        values = _resample(_to_image(field.values, grid, field.sl, offset), geometry, start,
                           stop - start, -_FAR_MM, sitk.sitkFloat32)
        inside = sitk.GetArrayViewFromImage(values) > 0
        region = label[start[2]:stop[2], start[1]:stop[1], start[0]:stop[0]]
        region[inside] = value
    return label


def write_case(out_dir: str | Path, name: str, seed: int, **kwargs) -> tuple[Path, Path]:
    """Generate a case and write ``NAME_0000.nii.gz`` (image) and ``NAME.nii.gz`` (label)
    with :func:`write_pair`.  ``kwargs`` go to :func:`generate_case`."""
    return write_pair(out_dir, name, *generate_case(seed, **kwargs))


def write_pair(out_dir: str | Path, name: str, image: sitk.Image,
               label: sitk.Image) -> tuple[Path, Path]:
    """Write a case in the FLARE layout: ``NAME_0000.nii.gz`` (image), ``NAME.nii.gz`` (label).

    Each file is written under a temporary name in the same folder and renamed into place, so a
    reader never sees a half-written file.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = (out_dir / f"{name}_0000.nii.gz", out_dir / f"{name}.nii.gz")
    for item, path in zip((image, label), paths):
        # Unique per writer; ends in .nii.gz so SimpleITK picks the format from the name.
        temporary = out_dir / f".{path.name[:-len('.nii.gz')]}.{uuid.uuid4().hex}.tmp.nii.gz"
        try:
            sitk.WriteImage(item, str(temporary), useCompression=True)
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
    return paths
