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
