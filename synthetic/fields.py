"""Implicit fields: the generator's shapes.

Every structure of a synthetic patient is a field in millimetres, positive inside and roughly the
distance to its surface, in the patient frame (synthetic.patient).  A :class:`Field` holds one
structure's values on a block of a Lattice (synthetic.grids); carving one field out of another keeps
organs from overlapping.  Smooth minima and maxima blend parts, :func:`_ramp` turns a field into
a soft (anti-aliased) mask, :func:`_tube` and :class:`_EllipsoidOrgan` build vessels, bowel and
organs, and :class:`_Warp` deforms them analytically, so that a patient deforms identically
whatever grid it is evaluated on.
"""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from app.geometry import IDENTITY_DIRECTION
from synthetic.grids import Lattice, _overlap, _rotation, _shape_of

_FAR_MM = 200.0  # field value for "far outside" a structure


# ------------------------------------------------------------------------------------------------
# Fields on blocks of a grid
# ------------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------------
# Primitives
# ------------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------------
# Evaluation on a grid
# ------------------------------------------------------------------------------------------------


def _upsample(low: np.ndarray, shape) -> np.ndarray:
    """Linear upsampling of a small (z, y, x) array so that its corners meet the target's."""
    image = sitk.GetImageFromArray(low.astype(np.float32))
    spacing = [(shape[2 - a] - 1) / max(low.shape[2 - a] - 1, 1) for a in range(3)]
    image.SetSpacing([max(s, 1e-3) for s in spacing])
    out = sitk.Resample(image, [int(shape[2]), int(shape[1]), int(shape[0])], sitk.Transform(),
                        sitk.sitkLinear, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), IDENTITY_DIRECTION, 0.0,
                        sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def _evaluate(grid: Lattice, sl, function, factor: int = 1) -> np.ndarray:
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
    low = Lattice(grid.block_origin(sl), grid.spacing * factor, low_shape)
    Z, Y, X = low.coords(low.full())
    values = np.ascontiguousarray(np.broadcast_to(function(Z, Y, X), low_shape), np.float32)
    image = sitk.GetImageFromArray(values)
    image.SetSpacing((float(factor),) * 3)
    out = sitk.Resample(image, [shape[2], shape[1], shape[0]], sitk.Transform(),
                        sitk.sitkLinear, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), IDENTITY_DIRECTION, 0.0,
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


# ------------------------------------------------------------------------------------------------
# Deformations and ellipsoid organs
# ------------------------------------------------------------------------------------------------


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
