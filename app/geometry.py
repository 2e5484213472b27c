"""Image grids, canonical orientation and resampling in physical space.

A ``Grid`` is the geometry of an image (SimpleITK order: size and spacing along x, y, z) without
its voxels. All network grids share the direction of the image they are cut from, so a box along
the image axes stays a box; positions along those axes are measured in mm from the image origin
("axis mm").
"""

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

CANONICAL_ORIENTATION = "LPS"  # DICOM/ITK patient axes: +x left, +y posterior, +z superior


@dataclass(frozen=True)
class Grid:
    """Geometry of an image: size (x, y, z) in voxels, spacing in mm, origin in mm, direction."""

    size: tuple
    spacing_mm: tuple
    origin_mm: tuple
    direction: tuple

    @classmethod
    def of(cls, image):
        """The grid of a SimpleITK image."""
        return cls(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                   tuple(image.GetDirection()))

    def reference(self, pixel_type=sitk.sitkUInt8):
        """An empty SimpleITK image on this grid (for sitk.Resample)."""
        image = sitk.Image([int(n) for n in self.size], pixel_type)
        image.SetSpacing(self.spacing_mm)
        image.SetOrigin(self.origin_mm)
        image.SetDirection(self.direction)
        return image

    @property
    def extent_mm(self):
        """Physical extent (x, y, z) from the first voxel's outer edge to the last's."""
        return tuple(n * s for n, s in zip(self.size, self.spacing_mm))

    def axis_mm_to_physical(self, axis_mm):
        """Points in mm along this grid's axes from its origin -> physical points (both (..., 3))."""
        matrix = np.array(self.direction).reshape(3, 3)
        return np.asarray(self.origin_mm) + np.asarray(axis_mm) @ matrix.T

    def physical_to_axis_mm(self, points):
        """Physical points -> mm along this grid's axes from its origin (both (..., 3))."""
        matrix = np.array(self.direction).reshape(3, 3)
        return (np.asarray(points) - np.asarray(self.origin_mm)) @ matrix


def centred_grid(parent, centre_axis_mm, size, spacing_mm):
    """A grid with the parent grid's direction, ``size`` voxels of ``spacing_mm``, centred on a point.

    ``centre_axis_mm`` is the centre in mm along the parent's axes from the parent's origin.
    """
    size = np.asarray(size, dtype=int)
    spacing = np.broadcast_to(np.asarray(spacing_mm, dtype=float), (3,))
    first_voxel = np.asarray(centre_axis_mm) - (size - 1) / 2.0 * spacing
    origin = parent.axis_mm_to_physical(first_voxel)
    return Grid(tuple(int(n) for n in size), tuple(float(s) for s in spacing),
                tuple(float(o) for o in origin), parent.direction)


def image_centre_axis_mm(grid):
    """Centre of the image in mm along its axes from its origin (a voxel-centre coordinate)."""
    return (np.asarray(grid.size) - 1) / 2.0 * np.asarray(grid.spacing_mm)


def orientation_code(image):
    """Three-letter orientation of the closest axis-aligned frame, e.g. 'LPS' or 'RAS'."""
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())


def to_canonical(image):
    """Permute and flip the voxel axes (no interpolation) so that they point closest to LPS.

    Returns the reoriented image and the input's orientation code, for ``from_canonical``. An
    oblique image stays oblique by its remaining small rotation; its voxels are not resampled.
    """
    code = orientation_code(image)
    if code == CANONICAL_ORIENTATION:
        return image, code
    return sitk.DICOMOrient(image, CANONICAL_ORIENTATION), code


def from_canonical(image, code, reference):
    """Undo ``to_canonical`` and copy the reference's geometry exactly onto the result.

    Raises ValueError if the reoriented image does not lie on the reference grid (a bug).
    """
    if code != CANONICAL_ORIENTATION:
        image = sitk.DICOMOrient(image, code)
    if image.GetSize() != reference.GetSize():
        raise ValueError(f"reoriented size {image.GetSize()} != input size {reference.GetSize()}")
    for name, tolerance in (("Origin", 1e-3), ("Spacing", 1e-6), ("Direction", 1e-6)):
        got = np.array(getattr(image, f"Get{name}")())
        want = np.array(getattr(reference, f"Get{name}")())
        if not np.allclose(got, want, atol=tolerance):
            raise ValueError(f"reoriented {name.lower()} {got} != input {want}")
    image.CopyInformation(reference)
    return image


def smooth(image, sigma_mm):
    """Gaussian smoothing with a physical sigma (float32 output); sigma 0 only casts."""
    image = sitk.Cast(image, sitk.sitkFloat32)
    if sigma_mm <= 0:
        return image
    return sitk.SmoothingRecursiveGaussian(image, sigma_mm)


def axis_weights(n_in, spacing_in_mm, first_mm, n_out, spacing_out_mm):
    """Resampling weights along one axis: ((n_out, n_in) float32 matrix, (n_out,) inside mask).

    Input voxel j is centred at ``j * spacing_in_mm`` and fills the interval of +- half its
    spacing (nearest-neighbour reading of the image); output voxel k is centred at
    ``first_mm + k * spacing_out_mm``. Downsampling (output spacing larger): output k is the mean
    of the input over its own box, +- half the output spacing, each input voxel weighted by the
    length it overlaps, normalised over the part of the box inside the image (area averaging).
    Otherwise: linear interpolation between the two nearest input centres, clamped at the border
    (a box as wide as one input voxel is the same thing). Outputs whose centre lies outside the
    image's outer voxel edges get no weights and ``inside`` False.
    """
    centres = first_mm + np.arange(n_out) * spacing_out_mm
    inside = (centres >= -spacing_in_mm / 2) & (centres < (n_in - 0.5) * spacing_in_mm)
    if spacing_out_mm > spacing_in_mm:
        edges = (np.arange(n_in) - 0.5) * spacing_in_mm
        low, high = centres[:, None] - spacing_out_mm / 2, centres[:, None] + spacing_out_mm / 2
        weights = np.clip(np.minimum(high, edges + spacing_in_mm) - np.maximum(low, edges), 0, None)
    else:
        position = np.clip(centres / spacing_in_mm, 0, n_in - 1)
        lower = np.floor(position).astype(int)
        upper = np.minimum(lower + 1, n_in - 1)
        weights = np.zeros((n_out, n_in))
        np.add.at(weights, (np.arange(n_out), lower), 1 - (position - lower))
        np.add.at(weights, (np.arange(n_out), upper), position - lower)
    weights[~inside] = 0
    totals = weights.sum(axis=1, keepdims=True)
    weights = np.divide(weights, totals, out=np.zeros_like(weights), where=totals > 0)
    return weights.astype(np.float32), inside


def area_resample(image, grid, default_value=0.0, slices_per_block=16):
    """Area (box) downsampling of ``image`` onto ``grid``; float32 SimpleITK image on ``grid``.

    The grid must share the image's direction (network grids do), so the resampling separates
    into one weight matrix per axis (``axis_weights``): every output voxel is the mean of the
    image over the output voxel's box, where the output spacing is larger than the image's, and
    linear interpolation along axes that are not downsampled. Voxels whose centre lies outside
    the image get ``default_value``. Raises ValueError for a grid with another direction.
    """
    image_grid = Grid.of(image)
    if not np.allclose(image_grid.direction, grid.direction, atol=1e-6):
        raise ValueError("area resampling needs a grid with the image's direction, got "
                         f"{grid.direction} for an image with {image_grid.direction}")
    first_mm = image_grid.physical_to_axis_mm(grid.origin_mm)
    (wx, in_x), (wy, in_y), (wz, in_z) = (
        axis_weights(image_grid.size[a], image_grid.spacing_mm[a], first_mm[a], grid.size[a],
                     grid.spacing_mm[a]) for a in range(3))
    voxels = sitk.GetArrayViewFromImage(image)  # (z, y, x)
    used = np.flatnonzero(wz.any(axis=0))
    first, last = (used[0], used[-1] + 1) if used.size else (0, 0)
    planes = np.zeros((last - first, grid.size[1], grid.size[0]), np.float32)
    for start in range(first, last, slices_per_block):  # bounded memory for large images
        block = voxels[start:min(start + slices_per_block, last)].astype(np.float32)
        planes[start - first:start - first + len(block)] = np.matmul(wy, block @ wx.T)
    values = np.tensordot(wz[:, first:last], planes, axes=(1, 0)).astype(np.float32)
    values[~(in_z[:, None, None] & in_y[None, :, None] & in_x[None, None, :])] = default_value
    resampled = sitk.GetImageFromArray(values)
    resampled.SetSpacing(grid.spacing_mm)
    resampled.SetOrigin(grid.origin_mm)
    resampled.SetDirection(grid.direction)
    return resampled


def resample(image, grid, interpolator=sitk.sitkLinear, default_value=0.0,
             pixel_type=sitk.sitkFloat32):
    """Resample ``image`` onto ``grid`` in physical space (SimpleITK, multithreaded)."""
    return sitk.Resample(image, grid.reference(), sitk.Transform(), interpolator,
                         float(default_value), pixel_type)


def crop_with_margin(image, centre_axis_mm, extent_mm, margin_mm):
    """The part of ``image`` that a box (centre, extent, in axis mm) plus a margin overlaps.

    Used to restrict smoothing to what a small resampled grid needs. Returns the image itself
    when the box covers it all.
    """
    spacing = np.asarray(image.GetSpacing())
    low = (np.asarray(centre_axis_mm) - np.asarray(extent_mm) / 2 - margin_mm) / spacing
    high = (np.asarray(centre_axis_mm) + np.asarray(extent_mm) / 2 + margin_mm) / spacing
    size = np.asarray(image.GetSize())
    start = np.clip(np.floor(low).astype(int), 0, size)
    stop = np.clip(np.ceil(high).astype(int) + 1, 0, size)
    if np.all(start == 0) and np.all(stop == size):
        return image
    if np.any(stop <= start):
        start = np.zeros(3, int)
        stop = np.minimum(size, 1)
    return sitk.RegionOfInterest(image, [int(n) for n in stop - start], [int(n) for n in start])
