"""Grids: the image grid a case is made on, the generator's own lattice, and the way from one to
the other.

* :class:`CaseGeometry` is an image grid in SimpleITK's terms (size, spacing, origin, direction);
  :func:`random_geometry` draws CT-like ones.
* :class:`Lattice` is the generator's own lattice in the patient frame (synthetic.patient): axis
  aligned, ``origin`` and ``spacing`` (x, y, z) in mm, arrays on it indexed (z, y, x).  It is not
  ``app.geometry.Grid`` (an image's grid for the segmenter).  Fields (synthetic.fields) live on
  blocks of it, addressed by (z, y, x) slices.
* From the lattice to the image: a case is painted on a coarse Lattice (2-3 mm) that covers the
  scan (:func:`_coarse_grid`); SimpleITK then resamples its HU map onto the image grid (linear)
  and each organ's field onto the part of the image grid around that organ (linear, then
  thresholded at 0), so labels are smooth at full resolution.

Array conventions: numpy arrays on a grid are indexed (z, y, x), as SimpleITK's
GetArrayFromImage returns them; points, sizes and spacings are (x, y, z) like SimpleITK.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from app.geometry import IDENTITY_DIRECTION


# ------------------------------------------------------------------------------------------------
# The image grid
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaseGeometry:
    """An image grid in SimpleITK's terms.

    size: voxels (x, y, z); spacing_mm: (x, y, z); origin_mm: physical centre of voxel (0, 0, 0);
    direction: 9 values, row-major, as ``sitk.Image.GetDirection()`` (column i is the physical
    direction of image axis i).
    """

    size: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float]
    direction: tuple[float, ...] = IDENTITY_DIRECTION

    def __post_init__(self):
        size = tuple(int(v) for v in self.size)
        spacing = tuple(float(v) for v in self.spacing_mm)
        origin = tuple(float(v) for v in self.origin_mm)
        direction = tuple(float(v) for v in self.direction)
        if len(size) != 3 or min(size) < 1:
            raise ValueError(f"size must be 3 positive ints, got {self.size}")
        if len(spacing) != 3 or min(spacing) <= 0:
            raise ValueError(f"spacing_mm must be 3 positive values, got {self.spacing_mm}")
        if len(origin) != 3 or len(direction) != 9:
            raise ValueError("origin_mm needs 3 values and direction 9")
        matrix = np.array(direction).reshape(3, 3)
        if not np.allclose(matrix @ matrix.T, np.eye(3), atol=1e-4):
            raise ValueError(f"direction is not orthonormal: {direction}")
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "spacing_mm", spacing)
        object.__setattr__(self, "origin_mm", origin)
        object.__setattr__(self, "direction", direction)

    @classmethod
    def from_image(cls, image: sitk.Image) -> CaseGeometry:
        return cls(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.array(self.direction).reshape(3, 3)

    def index_to_physical(self, index_xyz) -> np.ndarray:
        """Continuous (x, y, z) indices, shape (..., 3), to physical points in mm."""
        index = np.asarray(index_xyz, dtype=float)
        return np.asarray(self.origin_mm) + (index * self.spacing_mm) @ self.direction_matrix.T

    def physical_to_index(self, points_mm) -> np.ndarray:
        """Physical points (..., 3) to continuous (x, y, z) indices."""
        offset = np.asarray(points_mm, dtype=float) - self.origin_mm
        return (offset @ self.direction_matrix) / self.spacing_mm

    def corners_mm(self) -> np.ndarray:
        """The 8 corners (8, 3) of the imaged box: voxel edges, half a voxel beyond the centres."""
        lo, hi = -0.5, np.asarray(self.size) - 0.5
        corners = np.array([[(lo, hi[0])[i], (lo, hi[1])[j], (lo, hi[2])[k]]
                            for i in (0, 1) for j in (0, 1) for k in (0, 1)])
        return self.index_to_physical(corners)

    def center_mm(self) -> np.ndarray:
        return self.index_to_physical((np.asarray(self.size) - 1) / 2.0)

    def physical_spacing_mm(self) -> np.ndarray:
        """Sampling step along the physical x, y, z axes (exact unless the grid is oblique)."""
        return np.abs(self.direction_matrix) @ np.asarray(self.spacing_mm)

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        image.SetSpacing(self.spacing_mm)
        image.SetOrigin(self.origin_mm)
        image.SetDirection(self.direction)
        return image


def _rotation(axis, angle_rad) -> np.ndarray:
    axis = np.asarray(axis, dtype=float)
    axis = axis / np.linalg.norm(axis)
    x, y, z = axis
    c, s = math.cos(angle_rad), math.sin(angle_rad)
    k = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
    return np.eye(3) * c + s * k + (1 - c) * np.outer(axis, axis)


def _random_direction(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(direction matrix, permutation): image axis i runs along physical axis permutation[i]."""
    kind = rng.choice(["identity", "flip", "permute", "oblique"], p=[0.65, 0.12, 0.11, 0.12])
    permutation = np.arange(3)
    signs = np.ones(3)
    if kind == "flip":
        while signs.min() > 0:
            signs = rng.choice([-1.0, 1.0], size=3)
    elif kind == "permute":
        # Reformatted volumes: coronal (x, z, y) or sagittal (y, z, x), often with z reversed.
        permutation = np.array([[0, 2, 1], [1, 2, 0], [2, 0, 1], [1, 0, 2]][rng.integers(4)])
        signs = rng.choice([-1.0, 1.0], size=3, p=[0.4, 0.6])
    matrix = np.zeros((3, 3))
    for image_axis, physical_axis in enumerate(permutation):
        matrix[physical_axis, image_axis] = signs[image_axis]
    if kind == "oblique":
        # Gantry tilt (about x) or a slightly rotated reconstruction, a few degrees.
        axis = [1.0, 0.0, 0.0] if rng.random() < 0.5 else rng.normal(size=3)
        angle = math.radians(rng.uniform(1.0, 8.0)) * rng.choice([-1.0, 1.0])
        matrix = _rotation(axis, angle) @ matrix
    return matrix, permutation


def random_geometry(rng: np.random.Generator, in_plane_size: int = 512,
                    max_voxels: int | None = None) -> CaseGeometry:
    """A CT-like grid: in-plane field of view 300-500 mm over ``in_plane_size`` voxels (spacing
    0.6-1.0 mm at 512), slices 0.8-5 mm apart, 40-600 mm long (mostly 250-500 mm), a non-zero
    origin and mostly identity direction, sometimes flipped, permuted (coronal/sagittal storage)
    or oblique by a few degrees.

    ``max_voxels`` caps the voxel count: slices are first spread further apart (up to 5 mm) and
    only then is the scan shortened.
    """
    n = int(in_plane_size)
    if n < 8:
        raise ValueError("in_plane_size must be at least 8")
    fov_lo, fov_hi = max(300.0, 0.6 * n), min(500.0, 1.0 * n)
    if fov_lo > fov_hi:  # sizes where 0.6-1.0 mm cannot give 300-500 mm
        fov_lo, fov_hi = (300.0, 500.0) if n < 500 else (0.6 * n, 0.6 * n)
    fov_mm = rng.triangular(fov_lo, min(max(380.0, fov_lo), fov_hi), fov_hi)
    inplane_mm = fov_mm / n

    if rng.random() < 0.7:
        slice_mm = float(rng.choice([0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0],
                                    p=[0.08, 0.14, 0.08, 0.08, 0.14, 0.14, 0.12, 0.06, 0.16]))
    else:
        slice_mm = float(rng.uniform(0.8, 5.0))
    kind = rng.random()
    if kind < 0.75:
        length_mm = rng.uniform(250.0, 500.0)
    elif kind < 0.87:
        length_mm = rng.uniform(40.0, 250.0)
    else:
        length_mm = rng.uniform(500.0, 600.0)
    nz = max(4, int(round(length_mm / slice_mm)))
    if max_voxels is not None and n * n * nz > max_voxels:
        max_slices = max(4, int(max_voxels) // (n * n))
        slice_mm = min(5.0, max(slice_mm, length_mm / max_slices))
        nz = max(4, min(max_slices, int(round(length_mm / slice_mm))))

    matrix, permutation = _random_direction(rng)
    physical_size = np.array([n, n, nz])
    physical_spacing = np.array([inplane_mm, inplane_mm, slice_mm])
    size = physical_size[permutation]
    spacing = physical_spacing[permutation]
    # Scanner coordinates: the table moves, so z is anywhere; x/y are near the isocentre.
    center = np.array([rng.uniform(-30, 30), rng.uniform(-60, 40), rng.uniform(-1400, 400)])
    origin = center - matrix @ (spacing * (size - 1) / 2.0)
    return CaseGeometry(tuple(int(v) for v in size), tuple(float(v) for v in spacing),
                        tuple(float(v) for v in np.round(origin, 4)),
                        tuple(float(v) for v in matrix.ravel()))


# ------------------------------------------------------------------------------------------------
# The generator's lattice
# ------------------------------------------------------------------------------------------------


class Lattice:
    """An axis-aligned block of sample points in the patient frame (mm).

    ``origin`` and ``spacing`` are (x, y, z); ``shape`` is (nz, ny, nx) like the arrays on it.
    """

    def __init__(self, origin, spacing, shape):
        self.origin = np.asarray(origin, dtype=float)
        self.spacing = np.asarray(spacing, dtype=float)
        self.shape = tuple(int(v) for v in shape)
        self.x, self.y, self.z = (
            (self.origin[a] + self.spacing[a] * np.arange(self.shape[2 - a])).astype(np.float32)
            for a in range(3))

    @classmethod
    def covering(cls, lo, hi, spacing) -> Lattice:
        lo, hi, spacing = (np.asarray(v, dtype=float) for v in (lo, hi, spacing))
        count = np.maximum(1, np.ceil((hi - lo) / spacing).astype(int) + 1)
        return cls(lo, spacing, count[::-1])

    def box(self, lo, hi):
        """Slices (z, y, x) of the points inside [lo, hi] (x, y, z in mm), or None if empty."""
        slices = []
        for axis in (2, 1, 0):
            first = int(math.ceil((lo[axis] - self.origin[axis]) / self.spacing[axis]))
            last = int(math.floor((hi[axis] - self.origin[axis]) / self.spacing[axis]))
            first, last = max(first, 0), min(last, self.shape[2 - axis] - 1)
            if last < first:
                return None
            slices.append(slice(first, last + 1))
        return tuple(slices)

    def full(self):
        return tuple(slice(0, n) for n in self.shape)

    def coords(self, sl):
        """Broadcastable (Z, Y, X) coordinate arrays of the block ``sl``."""
        return (self.z[sl[0]][:, None, None], self.y[sl[1]][None, :, None],
                self.x[sl[2]][None, None, :])

    def block_origin(self, sl):
        return np.array([self.x[sl[2].start], self.y[sl[1].start], self.z[sl[0].start]], float)


def _shape_of(sl):
    return tuple(s.stop - s.start for s in sl)


def _overlap(a, b):
    """Where blocks ``a`` and ``b`` of one grid overlap: (slices into a's array, into b's), or
    None."""
    in_a, in_b = [], []
    for sa, sb in zip(a, b):
        start, stop = max(sa.start, sb.start), min(sa.stop, sb.stop)
        if stop <= start:
            return None
        in_a.append(slice(start - sa.start, stop - sa.start))
        in_b.append(slice(start - sb.start, stop - sb.start))
    return tuple(in_a), tuple(in_b)


# ------------------------------------------------------------------------------------------------
# From the coarse lattice to the image
# ------------------------------------------------------------------------------------------------


def _coarse_grid(geometry: CaseGeometry, offset: np.ndarray) -> tuple[Lattice, np.ndarray]:
    """Axis-aligned patient-frame grid covering the scan; returns (grid, physical spacing)."""
    physical = geometry.physical_spacing_mm()
    spacing = np.array([np.clip(min(physical[0], physical[1]), 2.0, 3.0)] * 2
                       + [np.clip(physical[2], 2.0, 3.0)])
    corners = geometry.corners_mm() - offset
    lo, hi = corners.min(axis=0) - 2 * spacing, corners.max(axis=0) + 2 * spacing
    return Lattice.covering(lo, hi, spacing), physical


def _partial_volume(hu: np.ndarray, grid: Lattice, physical_spacing):
    """Blur along each axis so that each output voxel averages over its own extent."""
    for axis in range(3):  # physical axis x, y, z -> array axis 2, 1, 0
        extra = physical_spacing[axis] ** 2 - grid.spacing[axis] ** 2
        if extra > 0.25:
            sigma = math.sqrt(extra) / 2.355 / grid.spacing[axis]
            ndimage.gaussian_filter1d(hu, sigma, axis=2 - axis, output=hu, mode="nearest",
                                      truncate=3.0)


def _to_image(values: np.ndarray, grid: Lattice, sl, offset) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(values, dtype=np.float32))
    image.SetSpacing(tuple(float(v) for v in grid.spacing))
    image.SetOrigin(tuple(float(v) for v in grid.block_origin(sl) + offset))
    return image


def _resample(image: sitk.Image, geometry: CaseGeometry, start, size, default, pixel_type):
    origin = geometry.index_to_physical(np.asarray(start, dtype=float))
    return sitk.Resample(image, [int(v) for v in size], sitk.Transform(), sitk.sitkLinear,
                         tuple(float(v) for v in origin), geometry.spacing_mm, geometry.direction,
                         float(default), pixel_type)
