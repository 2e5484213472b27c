"""Synthetic abdominal contrast CT with liver, kidney, spleen and pancreas labels.

How a case is made
------------------
1. A *patient* is drawn from the seed: body outline, fat and muscle layers, skeleton, lungs and
   heart, the four labelled organs and their unlabelled neighbours (vessels, stomach, duodenum,
   bowel, gallbladder, adrenals, bladder).  Every structure is an implicit field in millimetres
   (positive inside, roughly the distance to its surface) in a patient frame with the axes of
   DICOM/ITK LPS: +x patient left, +y posterior, +z superior.  The frame's origin is the middle
   of the L1 vertebral body.
2. The patient is placed in physical space relative to the image grid: centred in the field of
   view in x/y (give or take 15-20 mm), and in z so that the scan covers the whole abdomen, only
   part of it, or chest to pelvis (scans of 350 mm or more always reach from above the liver
   dome to below the kidneys).  Only the grid's centre and its length along its slice axis
   matter, so the grid (size, spacing, origin, direction) is a window onto the patient: one
   seed seen through identity, flipped, permuted or slightly oblique grids of the same scan has
   its organs at the same physical places and of the same shapes.  (The textures, bowel loops
   and noise are drawn on the sampling grid and do differ between such grids.)
3. Everything is evaluated on a coarse axis-aligned grid (2-3 mm) that covers the scan: a float
   HU map painted structure by structure with soft (anti-aliased) masks, and one field per organ.
   Organs never overlap: each is carved out of the lower-priority ones it touches.
4. SimpleITK resamples the HU map onto the target grid (linear) and each organ's field onto the
   part of the target grid around that organ (linear, then thresholded at 0), so labels are smooth
   at full resolution.  Correlated Gaussian noise is added at full resolution.

Array conventions: numpy arrays on a grid are indexed (z, y, x), as SimpleITK's
GetArrayFromImage returns them; points, sizes and spacings are (x, y, z) like SimpleITK.
All randomness comes from ``np.random.default_rng(seed)``, split into independent streams
(grid, patient, placement, textures, noise) so that one does not shift the others.

Labels: 0 background, 1 liver, 2 kidneys (both), 3 spleen, 4 pancreas.  Intrahepatic vessels
belong to the liver, the renal sinus and pelvis to the kidney; the inferior vena cava, the
portal vein outside the liver, the gallbladder and the splenic vein are excluded.
"""

from __future__ import annotations

import math
import os
import statistics
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from numpy.lib.stride_tricks import sliding_window_view
from scipy import ndimage

LABELS = {"liver": 1, "kidney": 2, "spleen": 3, "pancreas": 4}
HU_MIN, HU_MAX = -1024, 3071
# Outside the scanner's reconstruction circle; far below HU_MIN so that noise and clipping turn
# it into exactly HU_MIN, as scanners store it.
_PADDING_HU = -3024.0
_FAR_MM = 200.0  # field value for "far outside" a structure
_IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


# ------------------------------------------------------------------------------------------------
# Geometry
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
    direction: tuple[float, ...] = _IDENTITY

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
# Sampling grids and field helpers
# ------------------------------------------------------------------------------------------------


class Grid:
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
    def covering(cls, lo, hi, spacing) -> Grid:
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


class Field:
    """A structure's field on a block ``sl`` of a grid: positive inside, ~mm to the surface."""

    def __init__(self, sl, values):
        self.sl = sl
        self.values = values

    def carve(self, other: Field | None, gap_mm: float = 0.0):
        """Remove ``other`` (dilated by gap_mm) from this structure."""
        if other is None:
            return
        overlap = _overlap(self.sl, other.sl)
        if overlap is not None:
            mine, theirs = overlap
            np.minimum(self.values[mine], -(other.values[theirs] + gap_mm), out=self.values[mine])

    def intersect(self, other: Field | None, offset_mm: float = 0.0):
        """Keep only the part inside ``other`` shrunk by offset_mm (outside ``other``: nothing)."""
        inside = np.full_like(self.values, -_FAR_MM)
        if other is not None:
            overlap = _overlap(self.sl, other.sl)
            if overlap is not None:
                mine, theirs = overlap
                inside[mine] = other.values[theirs] - offset_mm
        np.minimum(self.values, inside, out=self.values)

    def volume_ml(self, voxel_ml: float, ramp_mm: float) -> float:
        """Partial-volume aware volume (the soft mask's sum)."""
        return float(np.clip(0.5 + self.values / ramp_mm, 0, 1).sum(dtype=np.float64) * voxel_ml)


def _smin(a, b, k):
    """Smooth minimum (polynomial, blend width k mm); k=0 is the plain minimum."""
    if k <= 0:
        return np.minimum(a, b)
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def _smax(a, b, k):
    return -_smin(-a, -b, k)


def _ellipsoid(u, v, w, a, b, c):
    """Signed distance estimate to an ellipsoid with semi-axes a, b, c (positive inside).

    (1 - r) / |grad r| is the first-order distance to the level set r = 1; it stays between the
    smallest and largest semi-axis near the centre instead of blowing up.
    """
    qu, qv, qw = u / a, v / b, w / c
    r = np.sqrt(qu * qu + qv * qv + qw * qw)
    g = np.sqrt((qu / a) ** 2 + (qv / b) ** 2 + (qw / c) ** 2)
    eps = np.float32(1e-6)
    return (1.0 - r) * (r + eps) / (g + eps / np.minimum(np.minimum(a, b), c))


def _ramp(f, width_mm):
    """Soft inside-mask of a field: 0 outside, 1 inside, linear across ``width_mm``."""
    return np.clip(0.5 + f / width_mm, 0.0, 1.0)


def _smoothstep(e0, e1, x):
    t = np.clip((np.asarray(x, dtype=float) - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _spline(points, step_mm=4.0):
    """Catmull-Rom curve through control points (N, 3), resampled about every ``step_mm``.

    Returns (points (M, 3), parameter (M,) in control-point units) so that per-point values
    (radii) can be interpolated along it.
    """
    p = np.asarray(points, dtype=float)
    if len(p) < 2:
        return p, np.zeros(len(p))
    padded = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    out, params = [], []
    for i in range(len(p) - 1):
        p0, p1, p2, p3 = padded[i:i + 4]
        count = max(2, int(math.ceil(np.linalg.norm(p2 - p1) / step_mm)))
        t = np.linspace(0.0, 1.0, count, endpoint=False)[:, None]
        t2, t3 = t * t, t * t * t
        out.append(0.5 * (2 * p1 + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t2
                          + (-p0 + 3 * p1 - 3 * p2 + p3) * t3))
        params.append(i + t[:, 0])
    out.append(p[-1:])
    params.append(np.array([len(p) - 1.0]))
    return np.vstack(out), np.concatenate(params)


def _tube(grid, points, radii, field=None, step_mm=4.0, squash=(1.0, 1.0, 1.0)):
    """Field of a tube of varying radius along a smooth curve through ``points``.

    ``squash`` (x, y, z), each >= 1, shortens the tube's reach along those axes: (1, 2, 1) gives
    a ribbon half as thick front to back. Each curve segment is evaluated only in its own small
    box, so long thin tubes stay cheap. Returns a Field covering the tube's box (or None if it
    misses the grid).
    """
    curve, t = _spline(points, step_mm)
    radius = np.interp(t, np.arange(len(radii)), radii)
    lo = curve.min(axis=0) - radius.max() - 3
    hi = curve.max(axis=0) + radius.max() + 3
    sl = grid.box(lo, hi)
    if sl is None:
        return None
    if field is None:
        field = Field(sl, np.full(_shape_of(sl), -_FAR_MM, np.float32))
    for i in range(len(curve) - 1):
        a, b = curve[i], curve[i + 1]
        ra, rb = radius[i], radius[i + 1]
        reach = max(ra, rb) + 3
        seg = grid.box(np.minimum(a, b) - reach, np.maximum(a, b) + reach)
        if seg is None:
            continue
        overlap = _overlap(field.sl, seg)
        if overlap is None:
            continue
        seg = tuple(slice(s.start + o.start, s.start + o.stop) for s, o in zip(field.sl,
                                                                                 overlap[0]))
        Z, Y, X = grid.coords(seg)
        ab = b - a
        length2 = float(ab @ ab) + 1e-9
        dx, dy, dz = X - a[0], Y - a[1], Z - a[2]
        s = np.clip((dx * ab[0] + dy * ab[1] + dz * ab[2]) / length2, 0.0, 1.0)
        dist = np.sqrt((squash[0] * (dx - s * ab[0])) ** 2 + (squash[1] * (dy - s * ab[1])) ** 2
                       + (squash[2] * (dz - s * ab[2])) ** 2)
        target = field.values[overlap[0]]
        np.maximum(target, (ra + s * (rb - ra)) - dist, out=target)
    return field


def _upsample(low: np.ndarray, shape) -> np.ndarray:
    """Linear upsampling of a small (z, y, x) array so that its corners meet the target's."""
    image = sitk.GetImageFromArray(low.astype(np.float32))
    spacing = [(shape[2 - a] - 1) / max(low.shape[2 - a] - 1, 1) for a in range(3)]
    image.SetSpacing([max(s, 1e-3) for s in spacing])
    out = sitk.Resample(image, [int(shape[2]), int(shape[1]), int(shape[0])], sitk.Transform(),
                        sitk.sitkLinear, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), _IDENTITY, 0.0,
                        sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def _evaluate(grid: Grid, sl, function, factor: int = 1) -> np.ndarray:
    """``function(Z, Y, X)`` on block ``sl``, optionally computed every ``factor`` points and
    interpolated linearly in between.

    Smooth fields (organ and body outlines, whose surfaces curve over centimetres) lose well
    under a tenth of a millimetre this way, for a fraction of the cost.
    """
    shape = _shape_of(sl)
    if factor <= 1:
        Z, Y, X = grid.coords(sl)
        return np.broadcast_to(function(Z, Y, X), shape).astype(np.float32)
    low_shape = [(n - 1) // factor + 2 for n in shape]
    low = Grid(grid.block_origin(sl), grid.spacing * factor, low_shape)
    Z, Y, X = low.coords(low.full())
    values = np.ascontiguousarray(np.broadcast_to(function(Z, Y, X), low_shape), np.float32)
    image = sitk.GetImageFromArray(values)
    image.SetSpacing((float(factor),) * 3)
    out = sitk.Resample(image, [shape[2], shape[1], shape[0]], sitk.Transform(),
                        sitk.sitkLinear, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), _IDENTITY, 0.0,
                        sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def _smooth_noise(rng, shape, spacing_mm, correlation_mm) -> np.ndarray:
    """Gaussian random field with unit standard deviation and about ``correlation_mm`` blobs."""
    step = correlation_mm / 3.0
    low_shape = [max(3, int(math.ceil(shape[i] * spacing_mm[2 - i] / step)) + 3) for i in range(3)]
    low = rng.standard_normal(low_shape, dtype=np.float32)
    low = ndimage.gaussian_filter(low, 1.5, mode="wrap")
    low /= max(float(low.std()), 1e-6)
    return _upsample(low, shape)


class _Warp:
    """A smooth random displacement: a few sine waves with random directions and phases.

    Analytic, so the same patient deforms identically whatever grid it is evaluated on.
    """

    def __init__(self, rng, amplitude_mm, wavelength_mm, terms=4):
        self.k = []
        for _ in range(terms):
            direction = rng.normal(size=3)
            direction /= np.linalg.norm(direction)
            wavelength = rng.uniform(*wavelength_mm)
            amplitude = rng.normal(size=3)
            amplitude *= amplitude_mm / (np.linalg.norm(amplitude) * math.sqrt(terms) / 1.4)
            self.k.append((direction * 2 * math.pi / wavelength, rng.uniform(0, 2 * math.pi),
                           amplitude))

    def __call__(self, X, Y, Z, scale=1.0):
        """Displaced coordinates; ``scale`` stretches the pattern with the organ."""
        dx = dy = dz = 0.0
        for omega, phase, amp in self.k:
            wave = np.sin((X * (omega[0] / scale) + Y * (omega[1] / scale)
                           + Z * (omega[2] / scale)) + phase)
            dx = dx + wave * (amp[0] * scale)
            dy = dy + wave * (amp[1] * scale)
            dz = dz + wave * (amp[2] * scale)
        return X + dx, Y + dy, Z + dz

    @property
    def reach_mm(self):
        return float(sum(np.abs(a).sum() for _, _, a in self.k))


def _unit(v):
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v)


def _frame(primary, secondary):
    """Orthonormal rows (e1, e2, e3): e1 along primary, e2 as close to secondary as possible."""
    e1 = _unit(primary)
    e2 = _unit(np.asarray(secondary, float) - (np.asarray(secondary, float) @ e1) * e1)
    return np.vstack([e1, e2, np.cross(e1, e2)])


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
# The patient
# ------------------------------------------------------------------------------------------------


class _EllipsoidOrgan:
    """An organ built as a smooth union of ellipsoids, warped and scaled as a whole.

    parts: [(centre (3,), semi-axes (3,), rotation rows (3, 3)), ...] in the organ's frame,
    which is placed at ``center`` with rotation ``rows`` (frame axes as rows in patient axes).
    ``notches`` are ellipsoids removed from the union (same format).
    """

    def __init__(self, center, rows, parts, notches=(), blend_mm=10.0, warp=None, taper=None,
                 bend=None):
        self.center = np.asarray(center, float)
        self.rows = np.asarray(rows, float)
        self.parts = parts
        self.notches = notches
        self.blend = blend_mm
        self.warp = warp
        self.taper = taper  # (part index, strength): part thins along its first axis
        self.bend = bend  # curvature (1/mm): bends the organ's third axis along the first two
        self.scale = 1.0

    def box(self):
        """Bounding box (lo, hi) in the patient frame, with room for warp, taper and bend."""
        lo, hi = np.full(3, np.inf), np.full(3, -np.inf)
        extra = (self.warp.reach_mm if self.warp else 0.0) + 4.0
        for index, (c, axes, rows) in enumerate(self.parts):
            axes = np.array(axes, float)
            if self.taper is not None and self.taper[0] == index:
                axes[1] *= 1.0 + 0.5 * self.taper[1]
            to_patient = self.rows.T @ rows.T  # part axes -> patient axes
            half = np.sqrt(((to_patient * axes) ** 2).sum(axis=1)) + extra
            if self.bend:
                half += self.bend * axes.max() ** 2
            centre = self.center + self.scale * (self.rows.T @ c)
            lo = np.minimum(lo, centre - half * self.scale)
            hi = np.maximum(hi, centre + half * self.scale)
        return lo, hi

    def local(self, X, Y, Z):
        """Organ-frame coordinates (unscaled) of patient points."""
        s = self.scale
        dx, dy, dz = (X - self.center[0]) / s, (Y - self.center[1]) / s, (Z - self.center[2]) / s
        if self.warp is not None:
            dx, dy, dz = self.warp(dx, dy, dz)
        r = self.rows
        u = dx * r[0, 0] + dy * r[0, 1] + dz * r[0, 2]
        v = dx * r[1, 0] + dy * r[1, 1] + dz * r[1, 2]
        w = dx * r[2, 0] + dy * r[2, 1] + dz * r[2, 2]
        if self.bend:
            w = w - self.bend * (u * u + v * v)
        return u, v, w

    def _part(self, u, v, w, part, index):
        c, axes, rows = part
        pu, pv, pw = u - c[0], v - c[1], w - c[2]
        a = pu * rows[0, 0] + pv * rows[0, 1] + pw * rows[0, 2]
        b = pu * rows[1, 0] + pv * rows[1, 1] + pw * rows[1, 2]
        d = pu * rows[2, 0] + pv * rows[2, 1] + pw * rows[2, 2]
        if self.taper is not None and self.taper[0] == index:
            # Thinner toward the far end of the first axis: the left lobe's wedge.
            b = b / (1.0 - self.taper[1] * np.clip(a / axes[0], -1.0, 1.0) * 0.5 - 0.0)
        return _ellipsoid(a, b, d, *axes)

    def field(self, X, Y, Z):
        u, v, w = self.local(X, Y, Z)
        f = None
        for i, part in enumerate(self.parts):
            g = self._part(u, v, w, part, i)
            f = g if f is None else _smax(f, g, self.blend)
        for notch in self.notches:
            f = np.minimum(f, -self._part(u, v, w, notch, -1))
        return (f * self.scale).astype(np.float32)


def _rows_from_angles(rng, degrees):
    """Small random rotation (rows) with about ``degrees`` per axis."""
    angles = np.radians(rng.normal(0, degrees, size=3))
    r = _rotation([1, 0, 0], angles[0]) @ _rotation([0, 1, 0], angles[1]) @ _rotation(
        [0, 0, 1], angles[2])
    return r


class Patient:
    """All anatomical parameters of one synthetic patient (patient frame, mm).

    Drawn in a fixed order from its own generator, so that the same seed always gives the same
    patient whatever grid it is later rendered on.
    """

    def __init__(self, rng: np.random.Generator):
        u = rng.uniform
        self.rng_seed = int(rng.integers(2**31))
        # Phase and tissue intensities.
        self.phase = str(rng.choice(list(_PHASE_HU), p=[0.15, 0.2, 0.5, 0.15]))
        self.hu = {k: float(u(*v)) for k, v in sorted({**_PHASE_HU[self.phase],
                                                       **_COMMON_HU}.items())}
        self.hu["medulla"] = min(self.hu["medulla"], self.hu["cortex"])
        if rng.random() < 0.12:  # fatty liver: darker than the spleen
            self.hu["liver"] -= u(20, 55)
        if rng.random() < 0.15:  # fatty pancreas
            self.hu["pancreas"] -= u(15, 40)
        self.oral_contrast = rng.random() < 0.2
        self.oral_hu = u(150, 450)
        self.noise_sigma = u(8, 30)
        self.hu_offset = rng.normal(0, 4)

        # Body frame: size scales, fat.
        self.s_lat = u(0.88, 1.12)  # lateral scale of the trunk
        self.s_ap = u(0.88, 1.12) * (0.5 + 0.5 * self.s_lat)  # AP scale, half tied to width
        self.s_z = u(0.9, 1.1)  # craniocaudal scale
        obesity = rng.beta(1.6, 2.4)  # 0 thin .. 1 obese
        self.fat_ant = 6 + 44 * obesity * u(0.7, 1.3)
        self.fat_lat = 5 + 34 * obesity * u(0.7, 1.3)
        self.fat_post = 5 + 25 * obesity * u(0.6, 1.2)
        self.visceral_fat = obesity * u(0.5, 1.2)
        self.muscle_mm = u(7, 15) * (1.1 - 0.3 * obesity)
        self.cav_a = 128 * self.s_lat + 14 * self.visceral_fat  # cavity half-width at L1
        self.cav_b_ant = 88 * self.s_ap + 22 * self.visceral_fat
        self.cav_b_post = 84 * self.s_ap
        self.cav_n_ant = u(2.0, 2.5)
        self.cav_n_post = u(2.8, 3.6)
        self.body_waves = [(u(150, 400), u(0, 2 * math.pi), u(0.0, 0.05)) for _ in range(3)]
        self.belly = obesity * u(0, 25)  # extra anterior bulge below the ribs

        # Spine: L1 centre at the origin; thoracic kyphosis and lumbar lordosis.
        self.vb_y0 = 35 * self.s_ap
        self.pitch_lumbar = u(33, 38) * self.s_z
        self.pitch_thoracic = u(24, 28) * self.s_z
        self.lordosis = u(5, 18)
        self.kyphosis = u(5, 20)
        self.scoliosis = (u(-6, 6), u(200, 500), u(0, 2 * math.pi))
        self.vb_half_w = u(21, 26) * self.s_lat ** 0.5
        self.vb_half_ap = u(15, 18) * self.s_ap ** 0.5
        self.disc_fraction = u(0.2, 0.28)
        self._spine_table()

        # Diaphragm domes (right higher than left).
        self.dome_r = (u(95, 130) * self.s_z, -65 * self.s_lat + u(-10, 10), u(-15, 10))
        self.dome_l = (self.dome_r[0] - u(5, 25), 70 * self.s_lat + u(-10, 10), u(-10, 15))
        self.diaph_c_ant = u(0.003, 0.006)
        self.diaph_c_post = u(0.009, 0.015)
        self.diaph_c_lat = u(0.006, 0.011)

        # Ribs.
        self.rib_pitch = u(26, 32) * self.s_z
        self.rib12_z = self.vertebra_z(-1) + u(-5, 10)
        self.rib_drop = u(90, 130) * self.s_z
        self.rib_half_h = u(4.0, 5.5)
        self.rib_half_t = u(3.0, 4.5)

        # Pelvis.
        self.crest_z = self.vertebra_z(3.5) + u(-10, 10)
        self.hip_z = self.crest_z - u(140, 170) * self.s_z
        self.pelvis_a = u(100, 120) * self.s_lat
        self.pelvis_b = u(62, 78) * self.s_ap

        # Splenomegaly (portal hypertension, blood diseases) is common among the patients of
        # abdominal CT collections: one in five gets a spleen 1.6-3.5 times the normal volume.
        # Its own stream: the patients without it stay exactly as they were.
        variants = np.random.default_rng([self.rng_seed, 1])
        self.spleen_growth = variants.uniform(1.6, 3.5) if variants.random() < 0.2 else 1.0
        self.target_ml = {"liver": u(1300, 2100), "spleen": u(115, 330) * self.spleen_growth,
                          "kidney_l": u(130, 190), "kidney_r": u(130, 190),
                          "pancreas": u(45, 105)}
        self._organs(rng)
        self._vessels(rng)
        self._gut(rng)
        self.bowel_params = dict(radius=u(10, 13), correlation=u(34, 48), gas=u(0.0, 0.5))
        self.streaks = rng.random() < 0.3
        self.circle_padding = rng.random() < 0.6
        self.table = rng.random() < 0.8
        self.table_gap = u(2, 12)
        self.table_radius = u(500, 1200)
        # Drawn last so that the other parameters of a seed stay as they were (only the liver,
        # carved around the pancreas, changes a little). The pancreas is a ribbon, thinner front
        # to back than it is tall, and with age it shrinks and fat grows between its lobules: real
        # CT shows a thin, mottled gland in fat far more often than a smooth round one.
        self.pancreas_flatness = u(1.0, 2.2)
        self.pancreas_fat = u(0.1, 0.45) if rng.random() < 0.6 else 0.0

    # -- spine ------------------------------------------------------------------------------------

    def _spine_table(self):
        """Vertebral level as a function of z, integrated from the varying level height."""
        z = np.arange(-700.0, 700.0, 0.5)
        pitch = np.interp(z, [0.0, 200.0], [self.pitch_lumbar, self.pitch_thoracic])
        pitch = np.where(z < 0, self.pitch_lumbar, pitch)
        level = np.cumsum(0.5 / pitch)
        level -= np.interp(0.0, z, level)  # L1 centre is level 0
        self._level_z, self._level = z, level  # level increases toward the head

    def level(self, z):
        """Vertebral level coordinate: 0 = L1 centre, +1 = T12 centre, -1 = L2 centre, ..."""
        return np.interp(z, self._level_z, self._level).astype(np.float32)

    def vertebra_z(self, level_below_l1):
        """z of the centre of the vertebra ``level_below_l1`` levels below L1 (negative: above)."""
        return float(np.interp(-level_below_l1, self._level, self._level_z))

    def spine_xy(self, z):
        """(x, y) of the vertebral body centre at height z (arrays broadcast with z)."""
        z = np.asarray(z, dtype=np.float32)
        amp, wl, ph = self.scoliosis
        x = amp * np.sin(2 * np.pi * z / wl + ph)
        lord = -self.lordosis * np.exp(-((z + 110) / 90) ** 2)  # lumbar lordosis: anterior
        kyph = self.kyphosis * np.clip(z / 250.0, 0, None) ** 2
        sacrum = 40 * np.clip((-z + self.vertebra_z(4.5)) / 120.0, 0, None) ** 1.5
        return x.astype(np.float32), (self.vb_y0 + lord + kyph + sacrum).astype(np.float32)

    # -- body cross-section ----------------------------------------------------------------------

    def section(self, z):
        """Cavity shape at height z: (half width, anterior/posterior half depths, centre y)."""
        z = np.asarray(z, dtype=np.float32)
        wave = 1.0 + sum(a * np.sin(2 * np.pi * z / wl + ph) for wl, ph, a in self.body_waves)
        pelvis = _smoothstep(self.crest_z, self.hip_z, z)
        a = self.cav_a * wave * (1 - 0.28 * pelvis)
        chest = _smoothstep(self.dome_r[0] - 40, self.dome_r[0] + 120, z)
        below_ribs = _smoothstep(self.dome_r[0] - 60, self.dome_r[0] - 150, z) * (1 - pelvis)
        b_ant = (self.cav_b_ant * wave * (1 + 0.08 * chest - 0.15 * pelvis)
                 + self.belly * below_ribs)
        b_post = self.cav_b_post * (1 + 0.05 * chest - 0.1 * pelvis) * wave
        return a, b_ant, b_post

    def layers(self, z):
        """Thickness of muscle and fat at height z: (muscle lateral, muscle ant, muscle post,
        fat ant, fat lateral, fat post)."""
        z = np.asarray(z, dtype=np.float32)
        pelvis = _smoothstep(self.crest_z + 20, self.hip_z, z)
        m = self.muscle_mm
        return (m + 55 * pelvis, m + 0 * z, m + 10 + 6 * pelvis,
                self.fat_ant * (1 + 0.3 * pelvis) + 0 * z, self.fat_lat * (1 + 0.6 * pelvis),
                self.fat_post * (1 + 0.3 * pelvis))

    def diaphragm_z(self, X, Y):
        """Height of the diaphragm above (x, y): two domes falling toward the back and sides."""
        out = None
        for z0, x0, y0 in (self.dome_r, self.dome_l):
            dy = Y - y0
            cy = np.where(dy < 0, self.diaph_c_ant, self.diaph_c_post)
            h = z0 - self.diaph_c_lat * (X - x0) ** 2 - cy * dy * dy
            out = h if out is None else np.maximum(out, h)
        # The central tendon under the heart sags a little between the domes.
        return np.maximum(out, min(self.dome_r[0], self.dome_l[0]) - 25 - 0.004 * Y * Y
                          - 0.004 * X * X)

    # -- organs -----------------------------------------------------------------------------------

    def _organs(self, rng):
        u = rng.uniform
        sl, sa, sz = self.s_lat, self.s_ap, self.s_z
        dome = self.dome_r[0]

        # Kidneys: bean = ellipsoid minus a hilum notch; upper poles medial and posterior.
        self.kidneys = {}
        for side, sign in (("kidney_l", 1.0), ("kidney_r", -1.0)):
            z0 = (-5 if sign > 0 else -22) * sz + u(-15, 15)
            center = np.array([sign * (68 * sl + u(-8, 8)), 50 * sa + u(-8, 8), z0])
            long_axis = [-sign * u(0.1, 0.35), u(0.05, 0.35), 1.0]
            hilum = [-sign * 1.0, -u(0.3, 0.9), 0.0]
            rows = _frame(hilum, [0, 0, 1])  # e1 toward the hilum, e2 ~ up
            rows = _frame(rows[0], long_axis)
            axes = np.array([u(25, 30), u(48, 58), u(19, 24)])  # (hilum dir, long, thickness)
            body = (np.zeros(3), axes, np.eye(3))
            notch = (np.array([axes[0] * u(0.85, 1.0), 0, -axes[2] * 0.2]),
                     np.array([u(11, 16), u(16, 24), u(9, 13)]), np.eye(3))
            organ = _EllipsoidOrgan(center, rows, [body], notches=[notch],
                                    warp=_Warp(rng, u(1.5, 4), (60, 140)))
            organ.cortex_mm = u(5, 8)
            organ.sinus = (np.array([axes[0] * 0.3, 0, 0]), np.array([axes[0] * 0.45,
                                                                       axes[1] * 0.55, 8.0]))
            self.kidneys[side] = organ

        # Spleen: bowl-shaped ovoid under the left ribs, hilum toward the front and middle.
        center = np.array([88 * sl + u(-10, 10), 48 * sa + u(-12, 8), dome - 60 * sz + u(-15, 15)])
        inward = [-1.0, -u(0.3, 0.8), u(-0.1, 0.2)]
        rows = _frame(inward, [0, -0.6, -0.8])  # e1 medial, e2 ~ anterior-inferior (long)
        rows = np.vstack([rows[1], rows[2], rows[0]])  # (long, width, thickness=medial)
        axes = np.array([u(50, 65), u(32, 44), u(17, 24)])
        # An enlarged spleen stays against the ribs and the diaphragm: it grows forward, down
        # and toward the middle, and its hilum (the pancreatic tail's end) moves with it.
        growth = self.spleen_growth ** (1.0 / 3.0) - 1.0
        center = center + growth * (0.6 * axes[0] * rows[0] + 0.8 * axes[2] * rows[2])
        self.spleen = _EllipsoidOrgan(center, rows, [(np.zeros(3), axes, np.eye(3))],
                                      warp=_Warp(rng, u(2, 6), (50, 120)), bend=u(0.004, 0.009))

        # Liver: big right lobe, inferior right extension, wedge-shaped left lobe, caudate.
        center = np.array([-45 * sl + u(-8, 8), 5 * sa + u(-6, 6), dome - 70 * sz + u(-8, 8)])
        left = u(0.55, 1.2)  # left lobe size: small to reaching the spleen
        parts = [
            (np.array([-25, 0, 5]) * [sl, sa, sz], np.array([u(65, 80), u(70, 85), u(70, 85)]),
             _rows_from_angles(rng, 6)),
            (np.array([-45, 5, -40]) * [sl, sa, sz], np.array([40, 50, 45]) * u(0.7, 1.3),
             _rows_from_angles(rng, 8)),
            (np.array([48 + 10 * (left - 1), -48, 18]) * [sl, sa, sz],
             np.array([75 * left, 34, 42]) * u(0.85, 1.15),
             _rotation([0, 0, 1], math.radians(u(-25, 5)))),
            (np.array([28, 15, 0]) * [sl, sa, sz], np.array([20, 22, 32]), np.eye(3)),
        ]
        self.liver = _EllipsoidOrgan(center, _rows_from_angles(rng, 4), parts, blend_mm=18.0,
                                     warp=_Warp(rng, u(5, 12), (70, 160)),
                                     taper=(2, u(0.6, 1.2)))

        # Gallbladder: pear under the liver, fundus anterior-inferior; absent after surgery.
        self.has_gallbladder = rng.random() > 0.1
        gb_len = u(28, 45)
        self.gallbladder = _EllipsoidOrgan(
            np.array([-48 * sl + u(-10, 10), -38 * sa + u(-10, 10), dome - 120 * sz + u(-10, 10)]),
            _frame([u(-0.3, 0.1), -u(0.3, 0.7), -1.0], [1, 0, 0]),
            [(np.zeros(3), np.array([gb_len, u(11, 18), u(11, 18)]), np.eye(3)),
             (np.array([gb_len * 0.6, 0, 0]), np.array([gb_len * 0.5, 9, 9]), np.eye(3))],
            warp=_Warp(rng, 2, (40, 80)))

        # Adrenals: thin plates above-medial to the kidneys.
        self.adrenals = []
        for sign, kidney in ((1.0, self.kidneys["kidney_l"]), (-1.0, self.kidneys["kidney_r"])):
            c = kidney.center + np.array([-sign * 30, -12 if sign > 0 else -20, 55 * sz])
            self.adrenals.append(_EllipsoidOrgan(
                c, _frame([sign * 0.4, 1, 0], [0, 0, 1]),
                [(np.zeros(3), np.array([u(3, 4.5), u(10, 16), u(14, 20)]), np.eye(3)),
                 (np.array([0, 6, -6]), np.array([3, 10, 12]), _rotation([1, 0, 0], 0.6))],
                warp=_Warp(rng, 1.5, (30, 60))))

        # Pancreas: curved tube from the head (by the duodenum) across the spine to the tail at
        # the splenic hilum.  Radii are scaled together to reach the target volume.
        jitter = lambda s=6: rng.normal(0, s, size=3)  # noqa: E731
        spleen_hilum = self.spleen.center + self.spleen.rows[2] * axes[2] * 0.8 * (1 + growth)
        base = np.array([0.0, 0.0, u(-15, 15)])
        self.pancreas_points = np.array([
            np.array([-36 * sl, 8 * sa, -58 * sz]) + jitter(4),  # uncinate
            np.array([-45 * sl, -4 * sa, -35 * sz]) + jitter(5),  # head
            np.array([-20 * sl, -24 * sa, -18 * sz]) + jitter(4),  # neck
            np.array([12 * sl, -28 * sa, -8 * sz]) + jitter(5),  # body
            np.array([48 * sl, -12 * sa, 5 * sz]) + jitter(6),  # body-tail
            0.5 * (np.array([78 * sl, 15 * sa, 22 * sz]) + spleen_hilum - [8, 0, 15]),  # tail
        ]) + base
        self.pancreas_points[-1] += jitter(4)
        self.pancreas_radii = np.array([u(10, 14), u(15, 19), u(10, 12), u(10, 13),
                                        u(9, 12), u(7, 10)])
        self.pancreas_warp = _Warp(rng, u(1.5, 4), (25, 60), terms=5)
        self.pancreas_scale = 1.0

    # -- vessels ----------------------------------------------------------------------------------

    def _vessels(self, rng):
        u = rng.uniform
        sz = self.s_z
        zs = np.array([400, 250, 130, 60, 0, -60, -115], float) * [1, 1, sz, sz, sz, sz, 1]
        zs[-1] = self.vertebra_z(3.6)
        sx, sy = self.spine_xy(zs)
        self.aorta_r = u(10, 13)
        ao_front = []
        for z, x, y in zip(zs, sx, sy):
            gap = self.vb_half_ap + self.aorta_r + 1
            if z > 100:  # thorax: left of the spine, further back
                ao_front.append([x + 22, y - gap * 0.5, z])
            else:
                ao_front.append([x + 14 + u(-3, 3), y - gap, z])
        self.aorta = np.array(ao_front)
        self.aorta_radii = np.array([1.1, 1.05, 1.0, 0.95, 0.9, 0.85, 0.8]) * self.aorta_r
        bif = self.aorta[-1]
        self.iliac_arteries = []
        self.iliac_veins = []
        for sign in (1, -1):
            pts = np.array([bif, bif + [sign * 25, 5, -50], [sign * 70, -5, self.hip_z + 30],
                            [sign * 85, -35, self.hip_z - 40], [sign * 90, -45, self.hip_z - 160]])
            self.iliac_arteries.append(pts)
            vpts = pts + [sign * -4 + 0.0, 12, 0]
            vpts[0] = [-18, bif[1] + 10, bif[2] - 30]
            self.iliac_veins.append(vpts)

        # IVC: right of the aorta, behind the liver, into the right atrium.
        ivc_r = u(9, 12)
        ivc = []
        for z, x, y in zip(zs[::-1][1:], sx[::-1][1:], sy[::-1][1:]):
            if z > self.dome_r[0] - 20:
                continue
            ivc.append([x - 24, y - self.vb_half_ap - ivc_r - 2, z])
        ivc[0] = [-18, ivc[0][1] + 8, self.aorta[-1][2] - 30]
        ivc.append([-28, 12 * self.s_ap, self.dome_r[0] - 45])
        ivc.append([-18, -8, self.dome_r[0] + 10])
        ivc.append([-10, -20, self.dome_r[0] + 50])
        self.ivc = np.array(ivc)
        self.ivc_radii = np.full(len(ivc), ivc_r)
        self.ivc_radii[-3:] = ivc_r * 1.2

        # Portal system: confluence behind the pancreatic neck.
        neck = self.pancreas_points[2]
        self.confluence = neck + [8, 13, 2]
        hilum = np.array([-42 * self.s_lat, 2, self.dome_r[0] - 85 * sz]) + rng.normal(0, 5, 3)
        self.portal = np.array([self.confluence, 0.5 * (self.confluence + hilum) + [0, 4, 0],
                                hilum])
        self.portal_r = u(6, 8)
        p = self.pancreas_points
        self.splenic_vein = np.array([self.confluence, p[3] + [0, 14, 6], p[4] + [0, 13, 6],
                                      p[5] + [6, 11, 8],
                                      self.spleen.center + self.spleen.rows[2] * 14])
        self.smv = np.array([self.confluence, self.confluence + [-4, -8, -40],
                             self.confluence + [-6, -20, -110]])
        ao = self.aorta
        self.sma = np.array([ao[4] + [0, -self.aorta_r, 8], ao[4] + [-2, -self.aorta_r - 16, -10],
                             ao[4] + [-5, -self.aorta_r - 26, -60],
                             ao[4] + [-8, -self.aorta_r - 32, -130]])
        self.celiac = np.array([ao[4] + [0, -self.aorta_r, 28],
                                ao[4] + [0, -self.aorta_r - 14, 30]])
        self.splenic_artery = np.array([self.celiac[-1], p[3] + [0, 4, 16], p[4] + [6, 8, 20],
                                        p[5] + [8, 8, 18],
                                        self.spleen.center + self.spleen.rows[2] * 16])
        self.hepatic_artery = np.array([self.celiac[-1], self.celiac[-1] + [-25, -5, 0],
                                        hilum + [4, -8, -4]])
        # Intrahepatic portal branches and hepatic veins (random, inside the liver).
        lc = self.liver.center
        self.portal_branches = [
            np.array([hilum, hilum + [-35, 2, 8], lc + [-55, 10, 15] + rng.normal(0, 8, 3)]),
            np.array([hilum + [-35, 2, 8], lc + [-40, -25, -15] + rng.normal(0, 8, 3)]),
            np.array([hilum + [-35, 2, 8], lc + [-60, 30, 0] + rng.normal(0, 8, 3)]),
            np.array([hilum, hilum + [25, -25, 10], lc + [70, -40, 20] + rng.normal(0, 8, 3)]),
            np.array([hilum + [25, -25, 10], lc + [40, -60, 0] + rng.normal(0, 6, 3)]),
        ]
        top = np.array([-22, 8, self.dome_r[0] - 20])
        self.hepatic_veins = [
            np.array([top, top + [-40, 5, -15], lc + [-75, 15, -5] + rng.normal(0, 8, 3)]),
            np.array([top, top + [-20, -25, -20], lc + [-25, -45, -40] + rng.normal(0, 8, 3)]),
            np.array([top, top + [20, -20, -5], lc + [50, -45, 15] + rng.normal(0, 8, 3)]),
        ]
        # Renal vessels from the hila.
        self.renal_veins, self.renal_arteries, self.ureters = [], [], []
        for side, sign in (("kidney_l", 1), ("kidney_r", -1)):
            k = self.kidneys[side]
            hil = k.center + k.rows[0] * 22
            ivc_pt = np.array([-26, ao[4][1], k.center[2] + 8])
            if sign > 0:  # left renal vein passes in front of the aorta
                vein = [hil, hil + [-20, -8, 4], [ao[4][0] + 2, ao[4][1] - self.aorta_r - 6,
                                                   ivc_pt[2] + 5], ivc_pt]
            else:
                vein = [hil, 0.5 * (hil + ivc_pt) + [0, -4, 0], ivc_pt]
            self.renal_veins.append(np.array(vein))
            self.renal_arteries.append(np.array([[ao[4][0], ao[4][1] + 3, k.center[2] + 12],
                                                 hil + [-sign * 12, 6, 4], hil + [0, 4, 0]]))
            self.ureters.append(np.array([hil + [0, -2, -12], hil + [-sign * 15, 0, -60],
                                          [sign * 45, -5, self.hip_z + 20],
                                          [sign * 30, -20, self.hip_z - 25]]))

    # -- digestive tract --------------------------------------------------------------------------

    def _gut(self, rng):
        u = rng.uniform
        sl, sa, sz = self.s_lat, self.s_ap, self.s_z
        dome_l = self.dome_l[0]
        fill = u(0.6, 1.25)
        self.stomach_fill = fill
        self.stomach_content = str(rng.choice(["fluid", "food", "gas", "collapsed"],
                                              p=[0.4, 0.25, 0.15, 0.2]))
        j = lambda s=6: rng.normal(0, s, 3)  # noqa: E731
        self.stomach = np.array([
            [25 * sl, 10 * sa, dome_l - 45],  # gastro-oesophageal junction
            np.array([55 * sl, 12 * sa, dome_l - 35]) + j(),  # fundus
            np.array([62 * sl, -30 * sa, dome_l - 80]) + j(),  # body
            np.array([42 * sl, -62 * sa, dome_l - 125]) + j(),
            np.array([5 * sl, -65 * sa, dome_l - 135]) + j(),  # antrum
            np.array([-28 * sl, -48 * sa, dome_l - 125]) + j(4),  # pylorus
        ])
        self.stomach_radii = (np.array([10, 38, 36, 30, 22, 11])
                              * [1, fill, fill, fill, fill ** 0.5, 1])
        ph = self.pancreas_points
        self.duodenum = np.array([
            self.stomach[-1], self.stomach[-1] + [-14, 16, -4],  # bulb
            ph[1] + [-24, 4, 8],  # descending, lateral to the head
            ph[1] + [-22, 6, -32],
            ph[0] + [5, 0, -28],  # horizontal, below the head
            [10 * sl, self.aorta[5][1] - self.aorta_r - 12, ph[0][2] - 22],
            [30 * sl, -8, ph[0][2] - 8], [36 * sl, -18, ph[3][2] - 25],  # to the DJ flexure
        ])
        self.duodenum_r = u(9, 13)
        # Colon frame: caecum, ascending, transverse (hanging), descending, sigmoid, rectum.
        lower = self.crest_z
        hip = self.hip_z
        self.colon = np.array([
            np.array([-75 * sl, -25 * sa, lower - 25]) + j(8),  # caecum
            np.array([-100 * sl, 5 * sa, lower + 40]) + j(8),
            np.array([-100 * sl, 10 * sa, -30 * sz]) + j(8),  # hepatic flexure
            np.array([-55 * sl, -62 * sa, -55 * sz]) + j(10),  # transverse
            np.array([10 * sl, -70 * sa, -75 * sz + u(-40, 20)]) + j(10),
            np.array([70 * sl, -45 * sa, -25 * sz]) + j(8),
            np.array([100 * sl, 10 * sa, 20 * sz]) + j(6),  # splenic flexure
            np.array([108 * sl, 25 * sa, -60 * sz]) + j(6),  # descending
            np.array([100 * sl, 20 * sa, lower + 10]) + j(6),
            np.array([70 * sl, -25 * sa, hip + 40]) + j(8),  # sigmoid
            np.array([15 * sl, -35 * sa, hip + 50]) + j(10),
            np.array([0, 55 * sa, hip + 20]) + j(5),  # rectum
            np.array([0, 50 * sa, hip - 50]),
        ])
        self.colon_radii = np.array([28, 24, 22, 20, 20, 20, 20, 17, 17, 16, 16, 20, 18]) * u(0.8,
                                                                                            1.2)
        self.bladder_fill = u(0.4, 1.3)
        self.bladder = _EllipsoidOrgan(
            np.array([0, -40 * sa, hip - 10]), np.eye(3),
            [(np.zeros(3), np.array([48, 36, 36]) * self.bladder_fill, np.eye(3))],
            warp=_Warp(rng, 3, (50, 100)))
        self.oesophagus = np.array([[4, self.vb_y0 - 25, 400], [8, self.vb_y0 - 28, dome_l + 30],
                                    self.stomach[0] + [-5, 0, 20], self.stomach[0]])
        heart_c = np.array([18 * sl, -28 * sa, self.dome_r[0] + 45 * sz])
        self.heart = _EllipsoidOrgan(heart_c, _frame([0.7, -0.5, -0.5], [0, 0, 1]),
                                     [(np.zeros(3), np.array([u(60, 72), u(48, 58), u(45, 55)]),
                                       np.eye(3))], warp=_Warp(rng, 3, (60, 120)))


# ------------------------------------------------------------------------------------------------
# Placement of the patient relative to the scan
# ------------------------------------------------------------------------------------------------


def _place(patient: Patient, geometry: CaseGeometry, rng: np.random.Generator) -> np.ndarray:
    """Offset (x, y, z) mm with physical point = patient-frame point + offset.

    Only the grid's centre and its length along the axis nearest to z are used, so flipped,
    permuted and slightly oblique grids of one scan see the very same patient.
    """
    centre = geometry.center_mm()
    slice_axis = int(np.argmax(np.abs(geometry.direction_matrix[2])))
    length = geometry.size[slice_axis] * geometry.spacing_mm[slice_axis]
    draws = rng.random(6)
    dome = max(patient.dome_r[0], patient.dome_l[0])
    if length >= 350:
        # Whole abdomen from just above the dome; long scans reach further into the chest.
        top = dome + 15 + 45 * draws[0] + max(0.0, length - 480) * draws[1]
    elif draws[2] < 0.5:
        top = dome + 40 * draws[0]
    else:
        top = -110 + 180 * draws[3] + length / 2
    return np.array([centre[0] + (draws[4] - 0.5) * 30,
                     centre[1] + (draws[5] - 0.5) * 40,
                     centre[2] + length / 2 - top])


# ------------------------------------------------------------------------------------------------
# Rendering on the coarse grid
# ------------------------------------------------------------------------------------------------


class _Scene:
    """Paints a patient's HU map and computes its organ fields on one grid."""

    def __init__(self, patient: Patient, grid: Grid, rng: np.random.Generator | None = None):
        self.p = patient
        self.grid = grid
        self.rng = rng
        self.ramp = float(grid.spacing.max())  # anti-aliasing width of masks
        self.fields: dict[str, Field | None] = {}
        self._cavity = None
        self._texture = None
        # Structures taken from a real label map (synthetic.anatomy), by scene name: painted as
        # they are and never carved; procedural structures keep clear of ``keep_clear``.
        self.real: dict[str, Field] = {}
        self.keep_clear: list[tuple[Field, float]] = []
        # Smooth fields are computed every `factor` points when the grid is fine.
        self.factor = 2 if grid.spacing.max() < 3.5 else 1

    # -- shared fields ----------------------------------------------------------------------------

    def _superellipse(self, X, Y, a, b_ant, b_post, n_ant, n_post):
        """Approximate signed distance to a superellipse with different front/back halves."""
        front = Y < 0
        b = np.where(front, b_ant, b_post)
        n = np.where(front, n_ant, n_post)
        ax, ay = np.abs(X) / a, np.abs(Y) / b
        r = (ax ** n + ay ** n) ** (1.0 / n)
        # Scale by the local radius so the value is about mm near the boundary.
        radius = np.sqrt(X * X + Y * Y) / np.maximum(r, 1e-3)
        return ((1.0 - r) * np.minimum(radius, 400.0)).astype(np.float32)

    def cavity(self, sl):
        """Field of the abdominal/thoracic cavity (inside the muscle wall) on block sl."""
        def cavity(Z, Y, X):
            a, b_ant, b_post = self.p.section(Z)
            return self._superellipse(X, Y, a, b_ant, b_post, self.p.cav_n_ant,
                                      self.p.cav_n_post)
        return _evaluate(self.grid, sl, cavity, self.factor)

    def cavity_at(self, sl):
        """Cavity field on block sl (from the cached whole-body field when there is one)."""
        if self._cavity is not None:
            overlap = _overlap(sl, self._cavity.sl)
            if overlap is not None and all(o.stop - o.start == s.stop - s.start
                                           for o, s in zip(overlap[0], sl)):
                return self._cavity.values[overlap[1]]
        return self.cavity(sl)

    def below_diaphragm(self, sl):
        return _evaluate(self.grid, sl, lambda Z, Y, X: self.p.diaphragm_z(X, Y) - Z,
                         self.factor)

    def organ_field(self, organ, clip_cavity=1.5, clip_diaphragm=4.0):
        """An ellipsoid organ's field on its box, inside the cavity and under the diaphragm."""
        lo, hi = organ.box()
        sl = self.grid.box(lo, hi)
        if sl is None:
            return None
        f = _evaluate(self.grid, sl, lambda Z, Y, X: organ.field(X, Y, Z), self.factor)
        if clip_cavity is not None:
            f = _smin(f, self.cavity_at(sl) - clip_cavity, 3.0)
        if clip_diaphragm is not None:
            f = _smin(f, self.below_diaphragm(sl) - clip_diaphragm, 3.0)
        return Field(sl, f.astype(np.float32))

    def pancreas_field(self):
        p = self.p
        radii = p.pancreas_radii * p.pancreas_scale
        f = _tube(self.grid, p.pancreas_points, radii, squash=(1.0, p.pancreas_flatness, 1.0))
        if f is None:
            return None
        # Lobulated outline: evaluate the tube at slightly displaced points.
        Z, Y, X = self.grid.coords(f.sl)
        wx, wy, wz = p.pancreas_warp(X, Y, Z)
        jitter = ((wx - X) + (wy - Y) - (wz - Z)) * 0.5
        f.values = (f.values + jitter).astype(np.float32)
        return f

    # -- organs with carving ----------------------------------------------------------------------

    def vessel(self, name):
        if name not in self.fields:
            p = self.p
            spec = {
                "aorta": (p.aorta, p.aorta_radii),
                "ivc": (p.ivc, p.ivc_radii),
                "portal": (p.portal, [p.portal_r * 1.1, p.portal_r, p.portal_r * 0.9]),
                "splenic_vein": (p.splenic_vein, [5.0, 4.5, 4.5, 4.0, 4.0]),
                "smv": (p.smv, [5.5, 5.0, 3.5]),
            }[name]
            self.fields[name] = _tube(self.grid, *spec)
        return self.fields[name]

    def labelled_organs(self, upto: str | None = None):
        """Fields of the labelled organs, carved so that they never overlap.

        Priority (who keeps contested voxels): kidneys > spleen > gallbladder and large veins
        > pancreas > liver.  ``upto`` stops after that organ (for calibration).
        """
        p = self.p
        out = {}
        out["kidney_l"] = self.organ_field(p.kidneys["kidney_l"], clip_diaphragm=6)
        out["kidney_r"] = self.organ_field(p.kidneys["kidney_r"], clip_diaphragm=6)
        if upto in ("kidney_l", "kidney_r"):
            return out
        spleen = out["spleen"] = self.organ_field(p.spleen)
        if spleen is not None:
            spleen.carve(out["kidney_l"], 3.0)
        if upto == "spleen":
            return out
        gb = self.organ_field(p.gallbladder, clip_cavity=4, clip_diaphragm=15) \
            if p.has_gallbladder else None
        if gb is not None:
            gb.carve(out["kidney_r"], 3.0)
        self.fields["gallbladder"] = gb
        pancreas = out["pancreas"] = self.pancreas_field()
        if pancreas is not None:
            for other, gap in ((spleen, 2.0), (out["kidney_l"], 4.0), (out["kidney_r"], 4.0),
                               (gb, 2.0), (self.vessel("splenic_vein"), 1.0),
                               (self.vessel("smv"), 1.0), (self.vessel("portal"), 1.0),
                               (self.vessel("aorta"), 3.0), (self.vessel("ivc"), 3.0)):
                pancreas.carve(other, gap)
        if upto == "pancreas":
            return out
        liver = out["liver"] = self.organ_field(p.liver, clip_cavity=0.5, clip_diaphragm=3.5)
        if liver is not None:
            for other, gap in ((out["kidney_r"], 2.5), (spleen, 3.0), (self.vessel("ivc"), 0.0),
                               (self.vessel("portal"), 0.5), (gb, 0.0), (pancreas, 3.0)):
                liver.carve(other, gap)
        self.fields.update(out)
        return out

    def kidney_interior(self, side: str, f: Field) -> np.ndarray:
        """HU inside a kidney on its field's block: cortex, medullary pyramids, sinus fat and
        the collecting system, laid out in the procedural kidney's own frame."""
        H, organ = self.p.hu, self.p.kidneys[side]
        Z, Y, X = self.grid.coords(f.sl)
        u, v, w = organ.local(X, Y, Z)
        (cu, cv, cw), (au, av, aw) = organ.sinus
        sinus = _ellipsoid(u - cu, v - cv, w - cw, au, av, aw)
        pelvis = _ellipsoid(u - cu - 0.3 * au, v - cv, w - cw, au * 0.6, av * 0.45, aw * 0.6)
        depth = f.values
        # Medullary pyramids between cortical columns around the long axis.
        angle = np.arctan2(w, u)
        pyramids = (depth > organ.cortex_mm) & (np.cos(7 * angle + 0.7 * v / av) < 0.55)
        value = np.where(pyramids, H["medulla"], H["cortex"]).astype(np.float32)
        sinus_mix = _ramp(sinus, 3.0)
        value = value + sinus_mix * (H["sinus_fat"] - value)
        return value + _ramp(pelvis, 3.0) * (H["pelvis"] - value)

    # -- painting ---------------------------------------------------------------------------------

    def paint(self, hu, field: Field | None, value, offset_mm=0.0, within: Field | None = None):
        """Blend ``value`` (scalar or array on the field's block) into hu where the field is
        positive (shrunk by offset_mm), optionally only inside ``within``."""
        if field is None:
            return
        m = _ramp(field.values - offset_mm, self.ramp)
        if within is not None:
            inside = np.zeros_like(m)
            overlap = _overlap(field.sl, within.sl)
            if overlap is None:
                return
            inside[overlap[0]] = _ramp(within.values[overlap[1]], self.ramp)
            m *= inside
        target = hu[field.sl]
        target += m * (value - target)

    def texture(self, sl, correlation_mm, amplitude):
        """Smooth zero-mean variation (HU) on block sl: tissue inhomogeneity.

        Blobs of about 14 mm are cut from one field over the body (made once); other sizes are
        made for the block.
        """
        if self.rng is None or amplitude == 0:
            return 0.0
        if correlation_mm == 14.0 and self._texture is not None:
            overlap = _overlap(sl, self._texture.sl)
            if overlap is not None and _shape_of(sl) == _shape_of(overlap[0]):
                return amplitude * self._texture.values[overlap[1]]
        return amplitude * _smooth_noise(self.rng, _shape_of(sl), self.grid.spacing,
                                         correlation_mm)


def _render(patient: Patient, grid: Grid, rng: np.random.Generator, body_box,
            scene: _Scene | None = None):
    """HU map (z, y, x) float32 and the labelled organ fields on ``grid``.

    ``scene`` may bring real structures (a scene of synthetic.anatomy); by default everything is
    procedural.
    """
    p, H = patient, patient.hu
    scene = scene or _Scene(patient, grid, rng)
    hu = np.full(grid.shape, -1000.0, np.float32)
    full = grid.full()

    # Table under the patient: carbon shells around a foam core, its sides curving up, with a
    # foam pad between it and the patient's back.
    if p.table:
        Zf, Yf, Xf = grid.coords(full)
        _, _, b_post = p.section(grid.z)
        back = float(np.max(b_post + p.layers(grid.z)[2] + p.layers(grid.z)[5]))
        y_table = back + p.table_gap - (Xf * Xf) / (2 * p.table_radius)
        depth = Yf - y_table
        lateral = np.abs(Xf) < 225
        shell = ((depth > 0) & (depth < 3)) | ((depth > 42) & (depth < 45))
        table = np.where(shell & lateral, H["table"], -1000.0)
        table = np.where((depth >= 3) & (depth <= 42) & lateral, -930.0, table)
        table = np.where((depth > -p.table_gap) & (depth <= 0) & (np.abs(Xf) < 200), -800.0,
                         table)
        hu[:] = table.astype(np.float32)[0]

    # Body: skin, subcutaneous fat, muscle wall, cavity.
    sl = grid.box(*body_box)
    if sl is not None:
        Z, Y, X = grid.coords(sl)
        a, b_ant, b_post = p.section(Z)
        m_lat, m_ant, m_post, f_ant, f_lat, f_post = p.layers(Z)
        cav = scene.cavity(sl)
        scene._cavity = Field(sl, cav)

        def fascia_field(Z, Y, X):
            a, b_ant, b_post = p.section(Z)
            m_lat, m_ant, m_post = p.layers(Z)[:3]
            return scene._superellipse(X, Y, a + m_lat, b_ant + m_ant, b_post + m_post,
                                       p.cav_n_ant, p.cav_n_post + 0.3)

        def skin_field(Z, Y, X):
            a, b_ant, b_post = p.section(Z)
            m_lat, m_ant, m_post, f_ant, f_lat, f_post = p.layers(Z)
            return scene._superellipse(X, Y, a + m_lat + f_lat, b_ant + m_ant + f_ant,
                                       b_post + m_post + f_post, p.cav_n_ant, p.cav_n_post + 0.6)

        fascia = _evaluate(grid, sl, fascia_field, scene.factor)
        skin = _evaluate(grid, sl, skin_field, scene.factor)
        block = hu[sl]
        scene._texture = Field(sl, scene.texture(sl, 14.0, 1.0))
        texture = 4.0 * scene._texture.values
        for f, value in ((skin, H["skin"]), (skin - 2.5, H["sc_fat"] + texture),
                         (fascia, H["muscle"] + texture), (cav, H["visceral_fat"] + texture)):
            m = _ramp(f, scene.ramp)
            block += m * (value - block)
        # Linea alba and the fat line between the obliques break up the muscle wall.
        fat_line = ((np.abs(X) < 3) & (Y < 0)) | ((np.abs(fascia - (m_lat * 0.5)) < 0.8)
                                                   & (np.abs(Y) < 0.4 * b_ant)
                                                   & (Z > p.crest_z))
        block[(fascia > 0) & (cav < 0) & fat_line] = H["sc_fat"]
        scene.skin = Field(sl, skin)

    _paint_thorax(scene, hu)
    _paint_muscles(scene, hu)
    _paint_skeleton(scene, hu)
    organs = scene.labelled_organs()
    _paint_vessels(scene, hu)
    _paint_gut(scene, hu, organs)
    _paint_organs(scene, hu, organs)
    if p.streaks:
        _paint_streaks(scene, hu)
    return hu, organs, scene


def _paint_thorax(scene: _Scene, hu):
    """Diaphragm, lungs with vessels, mediastinal fat and the heart above the diaphragm."""
    p, grid, H = scene.p, scene.grid, scene.p.hu
    lowest = min(p.dome_r[0], p.dome_l[0]) - 110  # bottom of the posterior lung recesses
    sl = grid.box((-300, -300, lowest), (300, 300, 1e4))
    if sl is None or scene._cavity is None:
        return
    overlap = _overlap(sl, scene._cavity.sl)
    if overlap is None:
        return
    sl = tuple(slice(s.start + o.start, s.start + o.stop) for s, o in zip(sl, overlap[0]))
    Z, Y, X = grid.coords(sl)
    cav = scene.cavity_at(sl)
    above = -scene.below_diaphragm(sl)
    # Mediastinum: a band from the spine to the sternum, and the heart in its fat.
    sx, sy = p.spine_xy(Z)
    band = np.minimum(22 - np.abs(X - sx - 6), np.where(Y > sy - 60, 30.0, 12 - np.abs(X)))
    medi = np.where(Y > sy + p.vb_half_ap + 5, -20.0, band)
    heart = scene.organ_field(p.heart, clip_cavity=2.0, clip_diaphragm=None)
    if heart is not None:
        heart.intersect(Field(sl, above), 2.0)
        mine, theirs = _overlap(sl, heart.sl)
        medi[mine] = np.maximum(medi[mine], heart.values[theirs] + 6)
    lung = np.minimum(np.minimum(cav - 4, above - 4), -medi)
    # Lung vessels: where two smooth random fields are both near zero, thin tubes appear.
    vessels = 0.0
    if scene.rng is not None:
        shape = _shape_of(sl)
        low = [(n - 1) // 2 + 2 for n in shape]
        n1 = _smooth_noise(scene.rng, low, grid.spacing * 2, 30.0)
        n2 = _smooth_noise(scene.rng, low, grid.spacing * 2, 30.0)
        tubes = np.clip(1.0 - np.sqrt(n1 * n1 + n2 * n2) / 0.32, 0, 1)
        vessels = _upsample(tubes, shape) * (0.5 * H["aorta"] + 850)
    block = hu[sl]
    r = scene.ramp
    block += _ramp(np.minimum(cav, 4 - np.abs(above)), r) * (H["muscle"] - block)
    block += _ramp(np.minimum(np.minimum(medi, cav), above), r) * (H["visceral_fat"] - block)
    block += _ramp(lung, r) * (H["lung"] + vessels - block)
    if heart is not None:
        # Two chambers (left ventricle and the right side) separated by the septum.
        Zh, Yh, Xh = grid.coords(heart.sl)
        u, v, w = p.heart.local(Xh, Yh, Zh)
        ax, ay, az = p.heart.parts[0][1]
        chambers = np.maximum(
            _ellipsoid(u - 0.2 * ax, v + 0.1 * ay, w, 0.5 * ax, 0.5 * ay, 0.6 * az),
            _ellipsoid(u + 0.35 * ax, v - 0.2 * ay, w, 0.45 * ax, 0.5 * ay, 0.65 * az))
        chambers = _ramp(np.minimum(chambers, heart.values - 6), r)
        scene.paint(hu, heart, H["myocardium"] + chambers * (H["heart"] - H["myocardium"]))


def _paint_muscles(scene: _Scene, hu):
    """Paraspinal, psoas and quadratus lumborum muscles."""
    p, grid, H = scene.p, scene.grid, scene.p.hu
    sl = grid.box((-120, -20, -1000), (120, 200, 1000))
    if sl is None:
        return
    Z, Y, X = grid.coords(sl)
    sx, sy = p.spine_xy(Z)
    field = None
    for sign in (1, -1):
        cx, cy = sx + sign * 34 * p.s_lat, sy + 55 * p.s_ap
        f = (1 - np.sqrt(((X - cx) / (30 * p.s_lat)) ** 2 + ((Y - cy) / 26) ** 2)) * 26
        field = f if field is None else np.maximum(field, f)
    # They shrink into the sacrum below L5.
    field = field - 30 * _smoothstep(p.vertebra_z(4.5), p.hip_z, Z)
    f = Field(sl, field.astype(np.float32))
    f.intersect(scene.skin, 3 + 0.7 * p.fat_post)
    scene.paint(hu, f, H["muscle"])
    for sign in (1, -1):
        lvl = p.vertebra_z
        top, l4 = lvl(-1), lvl(3)
        pts = [[sign * 22, p.vb_y0 - 5, top], [sign * 38, p.vb_y0 - 5, lvl(1.5)],
               [sign * 48, p.vb_y0 - 8, l4], [sign * 62, p.vb_y0 - 25, p.crest_z - 40],
               [sign * 75, -25, p.hip_z - 10]]
        pts = np.array(pts, float)
        _, ys = p.spine_xy(pts[:3, 2])
        pts[:3, 1] = ys - 3
        psoas = _tube(grid, pts, [5, 14, 22, 22, 16])
        scene.paint(hu, psoas, H["muscle"])
        scene.fields[f"psoas_{sign}"] = psoas
        ql = _tube(grid, [[sign * 58, 72 * p.s_ap, lvl(0)], [sign * 68, 72 * p.s_ap, lvl(2)],
                          [sign * 80, 62 * p.s_ap, p.crest_z + 5]], [6, 11, 12])
        scene.paint(hu, ql, H["muscle"])


def _paint_bone(scene, hu, field: Field | None, cortex_mm=2.0, cancellous=None):
    """Bone with a bright cortex and a darker cancellous interior."""
    if field is None:
        return
    H = scene.p.hu
    inner = H["cancellous"] if cancellous is None else cancellous
    value = inner + (H["cortical"] - inner) * np.clip(1.5 - field.values / cortex_mm, 0, 1)
    scene.paint(hu, field, value)


def _paint_skeleton(scene: _Scene, hu):
    p, grid, H = scene.p, scene.grid, scene.p.hu
    # Vertebrae: bodies with endplates, discs, neural arch, spinous and transverse processes.
    _, spine_y = p.spine_xy(grid.z)
    sl = grid.box((-70, float(spine_y.min()) - p.vb_half_ap - 6, p.hip_z - 30),
                  (70, float(spine_y.max()) + 85, 1000))
    if sl is not None:
        Z, Y, X = grid.coords(sl)
        sx, sy = p.spine_xy(Z)
        level = p.level(Z)
        frac = level - np.round(level)  # -0.5..0.5 within a vertebra
        pitch = np.interp(Z, [0.0, 200.0], [p.pitch_lumbar, p.pitch_thoracic]).astype(np.float32)
        half_body = (0.5 - p.disc_fraction / 2) * pitch
        dz = np.abs(frac) * pitch
        sacral = _smoothstep(p.vertebra_z(4.5), p.vertebra_z(5.2), Z)
        width = p.vb_half_w * (1 + 0.15 * (1 - _smoothstep(-200, 100, Z)) + 1.3 * sacral)
        width = width * (1 - 0.6 * _smoothstep(p.vertebra_z(5.5), p.hip_z - 10, Z))
        depth_ap = p.vb_half_ap * (1 - 0.35 * sacral) + 0 * Z
        radial = _ellipsoid(X - sx, Y - sy, 0 * X, width, depth_ap, 1e3)
        body = np.minimum(radial, np.maximum(half_body - dz, sacral * 40 - 20))
        disc = np.minimum(radial - 1, 0.5 * pitch - dz + 40 * sacral)
        canal_y = sy + p.vb_half_ap + 9
        canal_r = 8 + 2 * (1 - sacral)
        rho = np.sqrt((X - sx) ** 2 + (Y - canal_y) ** 2)
        arch_part = np.abs(frac + 0.05) < 0.36
        ring = np.minimum(5.0 - np.abs(rho - canal_r - 5), np.where(arch_part, 10.0, -10.0))
        ring = np.minimum(ring, (Y - sy - p.vb_half_ap + 2))
        spinous = np.minimum(np.minimum(4.5 - np.abs(X - sx), 18 - np.abs(Y - canal_y - 30)),
                             np.where(np.abs(frac - 0.05) < 0.3, 10.0, -10.0))
        spinous = np.minimum(spinous, 8 - 8 * sacral)
        trans_len = np.where(Z < p.rib12_z + 5, 50.0, 30.0) * (1 - sacral)
        transverse = np.minimum(np.minimum(5.0 - np.abs(Y - canal_y + 4),
                                           trans_len - np.abs(X - sx)),
                                np.where(np.abs(frac + 0.05) < 0.17, 10.0, -10.0))
        posterior = np.maximum(np.maximum(ring, spinous), transverse)
        block = hu[sl]
        r = scene.ramp
        block += _ramp(disc, r) * (H["disc"] - block)
        cortex = np.clip(1.5 - np.minimum(radial, half_body - dz) / 2.0, 0, 1)
        block += _ramp(body, r) * (H["cancellous"] + (H["cortical"] - H["cancellous"]) * cortex
                                   - block)
        post_val = H["cancellous"] + (H["cortical"] - H["cancellous"]) * np.clip(
            1.5 - posterior / 2.5, 0.3, 1)
        block += _ramp(posterior, r) * (post_val - block)
        block += _ramp(canal_r - rho, r) * _ramp(Y - sy - p.vb_half_ap, r) * (H["csf"] - block)
        scene.fields["spine"] = Field(sl, np.maximum(np.maximum(body, disc), posterior))

    # Ribs: curved bands in the muscle wall; their height drops from the spine to the front.
    top = 1000
    sl = grid.box((-400, -400, p.rib12_z - p.rib_drop - 40), (400, 400, top))
    if sl is not None and scene._cavity is not None:
        overlap = _overlap(sl, scene._cavity.sl)
        if overlap is not None:
            sl = tuple(slice(s.start + o.start, s.start + o.stop)
                       for s, o in zip(sl, overlap[0]))
            cav = scene.cavity_at(sl)
            muscle = p.layers(grid.z[sl[0]])[0][:, None, None]
            # Ribs live in a thin shell of the muscle wall: work on those voxels only.
            radial_all = p.rib_half_t - np.abs(cav + muscle * 0.45 + 1)
            shell = np.nonzero(radial_all > -scene.ramp)
            radial = radial_all[shell]
            z = grid.z[sl[0]][shell[0]]
            y = grid.y[sl[1]][shell[1]]
            x = grid.x[sl[2]][shell[2]]
            # Angle around the trunk (0 behind the spine, pi in front), from the spine's
            # position at the lower ribs: it barely moves over the ribs' height.
            sx, sy = p.spine_xy(np.float32(p.rib12_z + 100))
            theta = np.arctan2(np.abs(x - sx), y - sy + 10)
            drop = p.rib_drop * (np.clip(theta, 0, np.pi) / np.pi) ** 0.9
            t = (z + drop - p.rib12_z) / p.rib_pitch
            k = np.round(t)
            dz = np.abs(t - k) * p.rib_pitch
            # Floating ribs 12 and 11 end early; 10..1 reach the sternum through cartilage.
            theta_end = np.where(k <= 0, 0.45 * np.pi, np.where(k <= 1, 0.62 * np.pi,
                                                               0.93 * np.pi))
            inner = np.minimum(radial, p.rib_half_h - dz)
            rib = np.minimum(inner, np.minimum((theta - 0.32) * 60, (theta_end - theta) * 80))
            rib = np.where((k >= 0) & (k <= 11), rib, -10.0)
            cortex = np.clip(1.5 - inner / 1.5, 0, 1)
            value = np.where(theta > theta_end - 0.35, H["cartilage"],
                             H["cancellous"] + (H["cortical"] - H["cancellous"]) * cortex)
            block = hu[sl]
            old = block[shell]
            block[shell] = old + _ramp(rib, scene.ramp) * (value - old)
            # Sternum and xiphoid in front, in the chest.
            front = grid.box((-16, -400, p.dome_r[0] - 40), (16, 0, 1000))
            if front is not None:
                overlap = _overlap(sl, front)
                if overlap is not None:
                    Z, Y, X = grid.coords(tuple(slice(s.start + o.start, s.start + o.stop)
                                                for s, o in zip(sl, overlap[0])))
                    sternum = np.minimum(np.minimum(12 - np.abs(X), 5 - np.abs(
                        cav[overlap[0]] + 6)), Z - (p.dome_r[0] - 35))
                    part = block[overlap[0]]
                    part += _ramp(sternum, scene.ramp) * (H["cancellous"] + 200 - part)

    # Pelvis: iliac wings (curved plates), sacrum handled with the spine, hips and femora.
    sl = grid.box((-p.pelvis_a - 30, -p.pelvis_b - 30, p.hip_z - 40),
                  (p.pelvis_a + 30, p.pelvis_b + 40, p.crest_z + 10))
    if sl is not None:
        Z, Y, X = grid.coords(sl)
        depth = _smoothstep(p.crest_z, p.hip_z, Z)  # 0 at the crest, 1 at the hip joint
        ax = p.pelvis_a * (1 - 0.25 * depth)
        ay = p.pelvis_b * (1 - 0.1 * depth)
        cy = -5 + 10 * depth
        rho = np.sqrt((X / ax) ** 2 + ((Y - cy) / ay) ** 2)
        psi = np.arctan2(np.abs(X) / ax, (Y - cy) / ay)  # 0 posterior, pi anterior
        thick = 4 + 10 * depth ** 2
        psi0 = 0.12 * np.pi + 0.25 * depth
        psi1 = 0.7 * np.pi - 0.1 * depth
        wing = np.minimum(thick - np.abs(rho - 1) * np.minimum(ax, ay),
                          np.minimum((psi - psi0) * 60, (psi1 - psi) * 60))
        crest = p.crest_z - 25 * (np.abs(psi - 0.45 * np.pi) / np.pi) ** 1 * 2
        wing = np.minimum(wing, crest - Z)
        wing = np.minimum(wing, Z - (p.hip_z - 15))
        bones = wing
        for sign in (1, -1):
            head = np.array([sign * 0.82 * p.pelvis_a, -8.0, p.hip_z])
            ball = 23 - np.sqrt((X - head[0]) ** 2 + (Y - head[1]) ** 2 + (Z - head[2]) ** 2)
            bones = np.maximum(bones, ball)
            # Acetabular roof linking the wing and the head.
            roof = 16 - np.sqrt((X - head[0] * 0.9) ** 2 + (Y - head[1]) ** 2
                                + ((Z - head[2] - 28) * 0.7) ** 2)
            bones = np.maximum(bones, roof)
        f = Field(sl, bones.astype(np.float32))
        _paint_bone(scene, hu, f, 2.5)
        for sign in (1, -1):
            hx = sign * 0.82 * p.pelvis_a
            femur = _tube(grid, [[hx, -8, p.hip_z], [hx + sign * 30, 0, p.hip_z - 30],
                                 [hx + sign * 38, 2, p.hip_z - 60],
                                 [hx + sign * 30, -5, p.hip_z - 250]], [13, 15, 16, 13])
            _paint_bone(scene, hu, femur, 4.0, cancellous=H["marrow_fat"] + 60)
            pubis = _tube(grid, [[hx * 0.85, -35, p.hip_z - 10], [sign * 35, -70, p.hip_z - 30],
                                 [sign * 6, -78, p.hip_z - 40]], [9, 8, 9])
            _paint_bone(scene, hu, pubis, 2.5)
            ischium = _tube(grid, [[hx * 0.9, 15, p.hip_z - 5], [sign * 55, 35, p.hip_z - 50]],
                            [11, 12])
            _paint_bone(scene, hu, ischium, 2.5)


def _paint_vessels(scene: _Scene, hu):
    p, grid, H = scene.p, scene.grid, scene.p.hu
    paint = scene.paint
    paint(hu, scene.vessel("aorta"), H["aorta"])
    paint(hu, scene.vessel("ivc"), H["ivc"])
    for pts in p.iliac_veins:
        paint(hu, _tube(grid, pts, [9, 8, 7, 7, 6]), H["ivc"])
    for pts in p.iliac_arteries:
        paint(hu, _tube(grid, pts, [7, 6, 5, 5, 4.5]), H["artery"])
    paint(hu, scene.vessel("portal"), H["portal"])
    paint(hu, scene.vessel("splenic_vein"), H["portal"])
    paint(hu, scene.vessel("smv"), H["portal"])
    paint(hu, _tube(grid, p.sma, [4.5, 4, 3.5, 3]), H["artery"])
    paint(hu, _tube(grid, p.celiac, [4, 4]), H["artery"])
    paint(hu, _tube(grid, p.splenic_artery, [3, 3, 3, 3, 2.5]), H["artery"])
    paint(hu, _tube(grid, p.hepatic_artery, [3, 2.5, 2]), H["artery"])
    for pts in p.renal_veins:
        paint(hu, _tube(grid, pts, [5] * len(pts)), H["kidney_vein"])
    for pts in p.renal_arteries:
        paint(hu, _tube(grid, pts, [3.0, 3.0, 2.5]), H["artery"])
    ureter_hu = H["pelvis"] if p.phase == "delayed" else H["bowel_fluid"] + 10
    for pts in p.ureters:
        paint(hu, _tube(grid, pts, [3.5, 2.5, 2.5, 2.5]), ureter_hu)
    # Mesenteric branches fanning out from the SMA/SMV into the bowel fat.
    if scene.rng is not None:
        rng = np.random.default_rng(p.rng_seed)
        for _ in range(10):
            start = p.sma[1 + rng.integers(len(p.sma) - 1)]
            end = start + rng.normal(0, 1, 3) * [60, 25, 50] + [0, -20, -30]
            mid = 0.5 * (start + end) + rng.normal(0, 10, 3)
            paint(hu, _tube(grid, [start, mid, end], [2.5, 2.0, 1.5]), H["artery"] * 0.5
                  + H["portal"] * 0.5)


def _paint_gut(scene: _Scene, hu, organs):
    """Stomach, duodenum, colon, small bowel and bladder: never overlapping the organs."""
    p, grid, H = scene.p, scene.grid, scene.p.hu
    rng = scene.rng if scene.rng is not None else np.random.default_rng(0)
    avoid = [(organs[k], 2.0) for k in ("liver", "spleen", "kidney_l", "kidney_r", "pancreas")]
    avoid += [(scene.fields.get("gallbladder"), 1.5), (scene.vessel("aorta"), 1.0),
              (scene.vessel("ivc"), 1.0), (scene.vessel("smv"), 1.0),
              (scene.vessel("splenic_vein"), 1.0), (scene.vessel("portal"), 1.0)]
    avoid += [(scene.fields.get(f"psoas_{s}"), 1.0) for s in (1, -1)]
    avoid += [(scene.fields.get("spine"), 2.0)] + scene.keep_clear
    real = scene.real

    def prepared(field, clip_diaphragm=4.0, extra=()):
        if field is None:
            return None
        for other, gap in list(avoid) + list(extra):
            field.carve(other, gap)
        field.values = np.minimum(field.values, scene.cavity_at(field.sl) - 1.0)
        if clip_diaphragm is not None:
            field.values = np.minimum(field.values, scene.below_diaphragm(field.sl)
                                      - clip_diaphragm)
        return field

    def paint_lumen(field, wall_mm, wall_hu, content_hu):
        if field is None:
            return
        scene.paint(hu, field, wall_hu)
        scene.paint(hu, field, content_hu, offset_mm=wall_mm)

    def field_center(field):
        y = grid.y[field.sl[1]]
        return float(y.mean())

    def content(field, kind, gas_fraction):
        """HU of the lumen: fluid, food, faeces or gas (gas rises to the front: -y)."""
        Z, Y, X = grid.coords(field.sl)
        shape = _shape_of(field.sl)
        fluid = p.oral_hu if p.oral_contrast else H["bowel_fluid"]
        if kind == "gas":
            return np.float32(-1000.0)
        n = _smooth_noise(rng, shape, grid.spacing, 12.0)
        if kind == "faeces":
            # Stool: soft tissue density mixed with small gas bubbles, gas rising to the front.
            bubbles = _smooth_noise(rng, shape, grid.spacing, 5.0)
            mottled = np.where(bubbles > 1.0 - 0.012 * (Y - field_center(field)), -950.0,
                               -60.0 + 50 * n)
            return mottled.astype(np.float32)
        base = fluid + (35 * n if kind == "food" else 4 * n)
        if gas_fraction <= 0:
            return base.astype(np.float32)
        # Air-fluid level: gas in the front part of each lumen.
        yy = np.broadcast_to(Y, shape)
        inside = field.values > 0
        if not inside.any():
            return base.astype(np.float32)
        level = np.quantile(yy[inside], gas_fraction)
        return np.where(Y < level, -1000.0, base).astype(np.float32)

    # Stomach (with the oesophagus coming down), duodenum.
    stomach = real.get("stomach") or prepared(_tube(grid, p.stomach, p.stomach_radii),
                                              clip_diaphragm=4.0)
    if stomach is not None:
        kind = {"fluid": "fluid", "food": "food", "gas": "fluid", "collapsed": "fluid"}[
            p.stomach_content]
        gas = {"fluid": 0.15, "food": 0.1, "gas": 0.7, "collapsed": 0.0}[p.stomach_content]
        wall = 7.0 if p.stomach_content == "collapsed" else 4.0
        paint_lumen(stomach, wall, H["bowel_wall"], content(stomach, kind, gas))
    scene.paint(hu, real.get("oesophagus") or _tube(grid, p.oesophagus, [8, 8, 9, 10]),
                H["muscle"])
    duodenum = real.get("duodenum") or prepared(
        _tube(grid, p.duodenum, [p.duodenum_r] * len(p.duodenum)), extra=[(stomach, 1.0)])
    paint_lumen(duodenum, 3.0, H["bowel_wall"], content(duodenum, "fluid", 0.1)
                if duodenum is not None else 0)
    colon = real.get("colon") or prepared(_tube(grid, p.colon, p.colon_radii),
                                          extra=[(stomach, 2.0), (duodenum, 2.0)])
    if colon is not None:
        paint_lumen(colon, 2.5, H["bowel_wall"], content(colon, "faeces", 0))
    bladder = real.get("bladder")
    if bladder is None:
        bladder = scene.organ_field(p.bladder, clip_cavity=None, clip_diaphragm=None)
        if bladder is not None:
            prepared(bladder, clip_diaphragm=None, extra=[(colon, 2.0)])
    if bladder is not None:
        Z, Y, X = grid.coords(bladder.sl)
        # Contrast from the ureters sinks to the back of the bladder in the delayed phase.
        back = grid.y[bladder.sl[1]].mean() + 10 if "bladder" in real else p.bladder.center[1] + 10
        urine = H["bladder"] if p.phase != "delayed" else np.where(Y > back, H["bladder"], 10.0)
        paint_lumen(bladder, 2.5, H["muscle"], urine)

    # Small bowel: tubes where two smooth random fields are both near zero, filling the space
    # left in the lower and middle abdomen.
    if "small_bowel" in real:
        bowel = real["small_bowel"]
        gas = _smooth_noise(rng, _shape_of(bowel.sl), grid.spacing, 25.0)
        fluid = p.oral_hu if p.oral_contrast else H["bowel_fluid"]
        lumen = np.where(gas > 2.2 - 2.5 * p.bowel_params["gas"], -1000.0, fluid)
        paint_lumen(bowel, 2.5, H["bowel_wall"], lumen.astype(np.float32))
        return
    top = min(p.pancreas_points[:, 2].min() + 20, p.dome_l[0] - 110)
    sl = grid.box((-160, -200, p.hip_z - 10), (160, 60, top))
    if sl is not None:
        bp = p.bowel_params
        shape = _shape_of(sl)
        n1 = _smooth_noise(rng, shape, grid.spacing, bp["correlation"])
        n2 = _smooth_noise(rng, shape, grid.spacing, bp["correlation"])
        # Scale so that the value is about mm from the tube's centre line.
        scale = bp["correlation"] / 4.0
        Z, Y, X = grid.coords(sl)
        f = bp["radius"] - np.sqrt(n1 * n1 + n2 * n2) * scale
        f = np.minimum(f, (top - Z) * 0.5)
        bowel = prepared(Field(sl, f.astype(np.float32)),
                         extra=[(stomach, 2.0), (duodenum, 2.0), (colon, 2.0), (bladder, 3.0)])
        gas = _smooth_noise(rng, shape, grid.spacing, 25.0)
        fluid = p.oral_hu if p.oral_contrast else H["bowel_fluid"]
        lumen = np.where(gas > 2.2 - 2.5 * bp["gas"], -1000.0, fluid).astype(np.float32)
        paint_lumen(bowel, 2.5, H["bowel_wall"], lumen)


def _paint_organs(scene: _Scene, hu, organs):
    p, grid, H = scene.p, scene.grid, scene.p.hu
    paint = scene.paint

    # Adrenals first (lowest priority: organs are painted over them).
    paint(hu, scene.real.get("adrenal"), H["adrenal"])
    for adrenal in p.adrenals if "adrenal" not in scene.real else ():
        f = scene.organ_field(adrenal, clip_cavity=None, clip_diaphragm=3)
        if f is not None:
            for k in ("liver", "kidney_l", "kidney_r", "spleen", "pancreas"):
                f.carve(organs[k], 2.0)
            f.carve(scene.vessel("ivc"), 1.0)
            f.carve(scene.vessel("aorta"), 2.0)
            paint(hu, f, H["adrenal"])

    gb = scene.fields.get("gallbladder")
    paint(hu, gb, H["bowel_wall"])
    paint(hu, gb, H["bile"], offset_mm=2.0)

    liver = organs["liver"]
    if liver is not None:
        value = H["liver"] + scene.texture(liver.sl, 14.0, 4.0) + scene.texture(liver.sl, 6.0,
                                                                                2.5)
        paint(hu, liver, value)
        for pts in p.portal_branches:
            paint(hu, _tube(grid, pts, [p.portal_r * 0.8, 4.5, 2.5][:len(pts)]), H["portal"],
                  within=liver)
        for pts in p.hepatic_veins:
            paint(hu, _tube(grid, pts, [6.0, 4.5, 2.5]), H["hepatic_vein"], within=liver)

    spleen = organs["spleen"]
    if spleen is not None:
        amp = 30.0 if p.phase == "arterial" else 4.0
        paint(hu, spleen, H["spleen"] + scene.texture(spleen.sl, 10.0 if amp > 10 else 14.0, amp))

    pancreas = organs["pancreas"]
    if pancreas is not None:
        value = H["pancreas"] + scene.texture(pancreas.sl, 5.0, 8.0)
        if p.pancreas_fat > 0 and scene.rng is not None:  # no textures without a stream
            # Fat between the lobules: the top ``pancreas_fat`` share of a fine random field,
            # soft-edged as partial volume makes it.
            field = scene.texture(pancreas.sl, 4.0, 1.0)
            threshold = statistics.NormalDist().inv_cdf(1.0 - p.pancreas_fat)
            fat = np.clip((field - threshold) / 0.6 + 0.5, 0.0, 1.0)
            value = value + 0.85 * fat * (H["visceral_fat"] - value)
        paint(hu, pancreas, value)

    for side in ("kidney_l", "kidney_r"):
        f = organs[side]
        if f is None:
            continue
        paint(hu, f, scene.kidney_interior(side, f) + scene.texture(f.sl, 14.0, 3.0))


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


# ------------------------------------------------------------------------------------------------
# Volume calibration
# ------------------------------------------------------------------------------------------------


def _calibrate(patient: Patient):
    """Scale each labelled organ so that its labelled volume hits the patient's target.

    Measured on a fixed lattice in the patient frame (independent of any image grid) with the
    same clipping and carving as the final rendering; a few power-law updates converge.
    """
    p = patient
    organs = {"kidney_l": p.kidneys["kidney_l"], "kidney_r": p.kidneys["kidney_r"],
              "spleen": p.spleen, "liver": p.liver}

    def measure(name):
        if name == "pancreas":
            reach = p.pancreas_radii.max() * p.pancreas_scale + 12
            lo = p.pancreas_points.min(axis=0) - reach
            hi = p.pancreas_points.max(axis=0) + reach
        else:
            lo, hi = organs[name].box()
        step = {"liver": 5.0, "pancreas": 3.0}.get(name, 4.0)
        # Carving neighbours only matter inside this organ's box: the lattice can stop there.
        scene = _Scene(p, Grid.covering(lo, hi, [step] * 3))
        field = scene.labelled_organs(upto=name)[name]
        return 0.0 if field is None else field.volume_ml(step ** 3 / 1000.0, step)

    for name, exponent in (("kidney_l", 3), ("kidney_r", 3), ("spleen", 3), ("pancreas", 2),
                           ("liver", 3)):
        for _ in range(3 if name == "pancreas" else 2):
            volume = measure(name)
            if volume <= 0:
                break
            ratio = p.target_ml[name] / volume
            if abs(ratio - 1) < 0.015:
                break
            factor = ratio ** (1.0 / exponent)
            if name == "pancreas":
                p.pancreas_scale *= factor
            else:
                organs[name].scale *= factor


# ------------------------------------------------------------------------------------------------
# From the coarse grid to the requested image
# ------------------------------------------------------------------------------------------------


def _coarse_grid(geometry: CaseGeometry, offset: np.ndarray) -> tuple[Grid, np.ndarray]:
    """Axis-aligned patient-frame grid covering the scan; returns (grid, physical spacing)."""
    physical = geometry.physical_spacing_mm()
    spacing = np.array([np.clip(min(physical[0], physical[1]), 2.0, 3.0)] * 2
                       + [np.clip(physical[2], 2.0, 3.0)])
    corners = geometry.corners_mm() - offset
    lo, hi = corners.min(axis=0) - 2 * spacing, corners.max(axis=0) + 2 * spacing
    return Grid.covering(lo, hi, spacing), physical


def _partial_volume(hu: np.ndarray, grid: Grid, physical_spacing):
    """Blur along each axis so that each output voxel averages over its own extent."""
    for axis in range(3):  # physical axis x, y, z -> array axis 2, 1, 0
        extra = physical_spacing[axis] ** 2 - grid.spacing[axis] ** 2
        if extra > 0.25:
            sigma = math.sqrt(extra) / 2.355 / grid.spacing[axis]
            ndimage.gaussian_filter1d(hu, sigma, axis=2 - axis, output=hu, mode="nearest",
                                      truncate=3.0)


def _to_image(values: np.ndarray, grid: Grid, sl, offset) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(values, dtype=np.float32))
    image.SetSpacing(tuple(float(v) for v in grid.spacing))
    image.SetOrigin(tuple(float(v) for v in grid.block_origin(sl) + offset))
    return image


def _resample(image: sitk.Image, geometry: CaseGeometry, start, size, default, pixel_type):
    origin = geometry.index_to_physical(np.asarray(start, dtype=float))
    return sitk.Resample(image, [int(v) for v in size], sitk.Transform(), sitk.sitkLinear,
                         tuple(float(v) for v in origin), geometry.spacing_mm, geometry.direction,
                         float(default), pixel_type)


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


def _body_box(patient: Patient, grid: Grid):
    """Box (lo, hi) in the patient frame that holds the body (skin and all) on ``grid``'s z."""
    a_max = float(np.max(patient.section(grid.z)[0]))
    layers = [float(np.max(v)) for v in patient.layers(grid.z)]
    half_w = a_max + layers[0] + layers[4] + 10
    b_ant = float(np.max(patient.section(grid.z)[1])) + layers[1] + layers[3] + 10
    b_post = float(np.max(patient.section(grid.z)[2])) + layers[2] + layers[5] + 10
    return (-half_w, -b_ant, -1e4), (half_w, b_post, 1e4)


def _scan(hu: np.ndarray, patient: Patient, grid: Grid, geometry: CaseGeometry, offset,
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


# Lowest priority first: later organs win wherever interpolation makes two overlap.
_LABEL_ORDER = (("pancreas", 4), ("liver", 1), ("spleen", 3), ("kidney_l", 2), ("kidney_r", 2))


def _organ_labels(organs: dict, grid: Grid, geometry: CaseGeometry, offset,
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
        sub = Grid(grid.block_origin(field.sl), grid.spacing, field.values.shape)
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
    """Generate a case and write ``NAME_0000.nii.gz`` (image) and ``NAME.nii.gz`` (label).

    Each file is written under a temporary name in the same folder and renamed into place, so a
    reader never sees a half-written file.  ``kwargs`` go to :func:`generate_case`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    image, label = generate_case(seed, **kwargs)
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
