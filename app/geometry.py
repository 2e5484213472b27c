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
IDENTITY_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)  # row-major, as SimpleITK


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
        """Points in mm along this grid's axes from its origin -> physical points (both
        (..., 3))."""
        matrix = np.array(self.direction).reshape(3, 3)
        return np.asarray(self.origin_mm) + np.asarray(axis_mm) @ matrix.T

    def physical_to_axis_mm(self, points):
        """Physical points -> mm along this grid's axes from its origin (both (..., 3))."""
        matrix = np.array(self.direction).reshape(3, 3)
        return (np.asarray(points) - np.asarray(self.origin_mm)) @ matrix


def centred_grid(parent, centre_axis_mm, size, spacing_mm):
    """A grid with the parent grid's direction, ``size`` voxels of ``spacing_mm``, centred on a
    point.

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


def linear_positions(n_in, spacing_in_mm, first_mm, n_out, spacing_out_mm):
    """Where output voxels fall between input voxels along one axis, for linear interpolation.

    Input voxel j is centred at ``j * spacing_in_mm``; output voxel k at ``first_mm + k *
    spacing_out_mm``. Returns ``(lower, fraction, inside)``, each of length ``n_out``: the value at
    output k is ``(1 - fraction) * input[lower] + fraction * input[lower + 1]`` (positions clamped
    to the outer input centres, as SimpleITK's linear interpolator clamps its neighbours; ``lower``
    is at most ``n_in - 2``, so ``lower + 1`` is always an index when ``n_in`` >= 2), and
    ``inside`` is False where the output centre lies outside the input's outer voxel edges
    (SimpleITK then writes its default value). With ``n_in`` == 1, ``lower`` is 0 and
    ``fraction`` 0.
    """
    centres = first_mm + np.arange(n_out) * spacing_out_mm
    inside = (centres >= -spacing_in_mm / 2) & (centres < (n_in - 0.5) * spacing_in_mm)
    position = np.clip(centres / spacing_in_mm, 0, n_in - 1)
    lower = np.clip(np.floor(position).astype(int), 0, max(n_in - 2, 0))
    fraction = position - lower
    return lower, fraction, inside


def linear_weights(n_in, spacing_in_mm, first_mm, n_out, spacing_out_mm):
    """Linear interpolation along one axis as a ((n_out, n_in) float64 matrix, inside mask).

    The matrix form of ``linear_positions``: row k holds the two interpolation weights of output
    voxel k, or zeros where ``inside`` is False.
    """
    lower, fraction, inside = linear_positions(n_in, spacing_in_mm, first_mm, n_out,
                                               spacing_out_mm)
    weights = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    np.add.at(weights, (rows, lower), 1 - fraction)
    np.add.at(weights, (rows, np.minimum(lower + 1, n_in - 1)), fraction)
    weights[~inside] = 0
    return weights, inside


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
    if spacing_out_mm <= spacing_in_mm:
        weights, inside = linear_weights(n_in, spacing_in_mm, first_mm, n_out, spacing_out_mm)
        return weights.astype(np.float32), inside
    centres = first_mm + np.arange(n_out) * spacing_out_mm
    inside = (centres >= -spacing_in_mm / 2) & (centres < (n_in - 0.5) * spacing_in_mm)
    edges = (np.arange(n_in) - 0.5) * spacing_in_mm
    low, high = centres[:, None] - spacing_out_mm / 2, centres[:, None] + spacing_out_mm / 2
    weights = np.clip(np.minimum(high, edges + spacing_in_mm) - np.maximum(low, edges), 0, None)
    weights[~inside] = 0
    totals = weights.sum(axis=1, keepdims=True)
    weights = np.divide(weights, totals, out=np.zeros_like(weights), where=totals > 0)
    return weights.astype(np.float32), inside


# ITK's recursive Gaussian needs at least this many voxels along the axis it smooths.
RECURSIVE_GAUSSIAN_MIN_VOXELS = 4


def gaussian_weights(n, spacing_mm, sigma_mm):
    """Gaussian smoothing along one axis of ``n`` voxels as an (n, n) float64 matrix G.

    ``G @ line`` equals what ``smooth`` (SimpleITK's recursive Gaussian, physical ``sigma_mm``)
    does to each line of voxels along an axis of that spacing, borders included: the columns are
    the filter's responses to unit impulses, computed by SimpleITK itself, so the fast separable
    path repeats the reference filter rather than approximating it. Below
    ``RECURSIVE_GAUSSIAN_MIN_VOXELS`` voxels, where ITK refuses to filter, a sampled Gaussian
    with replicated borders stands in. ``sigma_mm`` <= 0: the identity.
    """
    if sigma_mm <= 0:
        weights = np.eye(n)
    elif n >= RECURSIVE_GAUSSIAN_MIN_VOXELS:
        impulses = sitk.GetImageFromArray(np.eye(n))  # row j: a unit impulse at voxel j
        impulses.SetSpacing((float(spacing_mm), 1.0))
        responses = sitk.RecursiveGaussian(impulses, float(sigma_mm), False,
                                           sitk.RecursiveGaussianImageFilter.ZeroOrder, 0)
        weights = sitk.GetArrayFromImage(responses).T
    else:
        reach = int(np.ceil(4 * sigma_mm / spacing_mm))
        offsets = np.arange(-reach, reach + 1)
        kernel = np.exp(-0.5 * (offsets * spacing_mm / sigma_mm) ** 2)
        kernel /= kernel.sum()
        weights = np.zeros((n, n))
        for offset, value in zip(offsets, kernel):
            np.add.at(weights, (np.arange(n), np.clip(np.arange(n) + offset, 0, n - 1)), value)
    return weights


# A weight below this fraction of the largest in its row is set to zero: the recursive Gaussian's
# tails never reach zero but are this far below float32's resolution (6e-8). Far out they are
# float32 denormals, which an Intel Xeon multiplies very slowly (localization preprocessing of
# a 512 x 512 x 300 input: 4.8 s with them, 0.9 s without; `python -m benchmarks.speed`);
# without them each block of slices also updates only the output slices it reaches.
NEGLIGIBLE_WEIGHT = 1e-9


def without_negligible_weights(weights):
    """float32 copy of the (n_out, n_in) matrix ``weights`` with every entry below
    ``NEGLIGIBLE_WEIGHT`` times its row's largest magnitude set to zero (no denormals left)."""
    weights = np.array(weights, dtype=np.float32)
    if weights.size == 0:
        return weights
    magnitude = np.abs(weights)
    weights[magnitude <= NEGLIGIBLE_WEIGHT * magnitude.max(axis=1, keepdims=True)] = 0.0
    return weights


def separable_apply(voxels, weights_xyz, inside_xyz, default_value=0.0, slices_per_block=32):
    """Apply one matrix per axis to a (z, y, x) array: float32 array (z, y, x) of the outputs.

    ``weights_xyz``: matrices (n_out, n_in) for the x, y and z axes (any float dtype);
    ``inside_xyz``: boolean masks (n_out,) per axis; output voxels outside along any axis get
    ``default_value``. The input may be of any numeric dtype (a view of an int16 image, say):
    ``slices_per_block`` slices at a time are converted to float32 and reduced along x, y and z,
    so memory stays bounded by one block and the (small) output, whatever the input's size.
    """
    wx, wy, wz = (without_negligible_weights(w) for w in weights_xyz)
    in_x, in_y, in_z = inside_xyz
    n_y, n_x, n_y_out, n_x_out = wy.shape[1], wx.shape[1], wy.shape[0], wx.shape[0]
    reaches = wz != 0
    used = np.flatnonzero(reaches.any(axis=0))
    first, last = (used[0], used[-1] + 1) if used.size else (0, 0)
    values = np.zeros((len(wz), n_y_out * n_x_out), np.float32)
    wx_t = np.ascontiguousarray(wx.T)
    for start in range(first, last, slices_per_block):  # bounded memory for large images
        stop = min(start + slices_per_block, last)
        slices = stop - start
        # One 2-D product per axis and block: NumPy's stacked matmul is several times slower
        # here, and so are many small banded products (BLAS threads' start-up per call).
        along_x = np.asarray(voxels[start:stop], np.float32).reshape(slices * n_y, n_x) @ wx_t
        by_row = along_x.reshape(slices, n_y, n_x_out).transpose(1, 0, 2).reshape(n_y, -1)
        del along_x
        along_y = wy @ by_row  # (y_out, slices * x_out)
        del by_row
        by_slice = along_y.reshape(n_y_out, slices, n_x_out).transpose(1, 0, 2).reshape(slices, -1)
        del along_y
        rows = np.flatnonzero(reaches[:, start:stop].any(axis=1))
        if rows.size:
            low, high = rows[0], rows[-1] + 1
            values[low:high] += wz[low:high, start:stop] @ by_slice
    values = values.reshape(len(wz), n_y_out, n_x_out)
    values[~in_z] = default_value
    values[:, ~in_y] = default_value
    values[:, :, ~in_x] = default_value
    return values


def _require_same_direction(image_grid, grid, what):
    if not np.allclose(image_grid.direction, grid.direction, atol=1e-6):
        raise ValueError(f"{what} needs a grid with the image's direction, got "
                         f"{grid.direction} for an image with {image_grid.direction}")


def image_on_grid(values, grid):
    """A SimpleITK image of ``values`` (z, y, x) placed on ``grid``."""
    image = sitk.GetImageFromArray(values)
    image.SetSpacing(grid.spacing_mm)
    image.SetOrigin(grid.origin_mm)
    image.SetDirection(grid.direction)
    return image


def area_resample(image, grid, default_value=0.0, slices_per_block=32):
    """Area (box) downsampling of ``image`` onto ``grid``; float32 SimpleITK image on ``grid``.

    The grid must share the image's direction (network grids do), so the resampling separates
    into one weight matrix per axis (``axis_weights``): every output voxel is the mean of the
    image over the output voxel's box, where the output spacing is larger than the image's, and
    linear interpolation along axes that are not downsampled. Voxels whose centre lies outside
    the image get ``default_value``. Raises ValueError for a grid with another direction.
    """
    image_grid = Grid.of(image)
    _require_same_direction(image_grid, grid, "area resampling")
    first_mm = image_grid.physical_to_axis_mm(grid.origin_mm)
    weights, inside = zip(*(
        axis_weights(image_grid.size[a], image_grid.spacing_mm[a], first_mm[a], grid.size[a],
                     grid.spacing_mm[a]) for a in range(3)))
    values = separable_apply(sitk.GetArrayViewFromImage(image), weights, inside, default_value,
                             slices_per_block)
    return image_on_grid(values, grid)


def smooth_and_resample(image, grid, sigma_mm, downsampling="linear", default_value=0.0,
                        region=None):
    """Gaussian smoothing then resampling onto ``grid``, in one separable pass: float32 (z, y, x).

    Computes what ``resample(smooth(crop, sigma_mm), grid, sitk.sitkLinear, default_value)``
    (``downsampling`` "linear") or ``area_resample(smooth(crop, sigma_mm), grid,
    default_value)`` ("area") compute, where ``crop`` is the part of ``image`` given by
    ``region`` = (start, stop) voxel indices (x, y, z) (default: all of it), equal to float32
    rounding. Every step is linear and acts along one axis at a time, so it is one matrix per axis
    (interpolation or area weights times ``gaussian_weights``) applied in z-slabs straight to the
    image's voxels: no float copy of the image, no smoothed full-resolution intermediate, and
    work proportional to the input voxels times the (small) output size per axis.

    The grid must share the image's direction (network grids do); raises ValueError otherwise.
    """
    if downsampling not in ("linear", "area"):
        raise ValueError(f"downsampling {downsampling!r} is not 'linear' or 'area'")
    image_grid = Grid.of(image)
    _require_same_direction(image_grid, grid, "separable resampling")
    start, stop = ((np.zeros(3, int), np.asarray(image_grid.size)) if region is None
                   else (np.asarray(region[0]), np.asarray(region[1])))
    spacing = np.asarray(image_grid.spacing_mm)
    first_mm = image_grid.physical_to_axis_mm(grid.origin_mm) - start * spacing
    weights, inside = [], []
    for axis in range(3):
        n_in = int(stop[axis] - start[axis])
        args = (n_in, spacing[axis], first_mm[axis], grid.size[axis], grid.spacing_mm[axis])
        resampling, axis_inside = (axis_weights(*args) if downsampling == "area"
                                   else linear_weights(*args))
        if sigma_mm > 0:
            resampling = resampling @ gaussian_weights(n_in, spacing[axis], sigma_mm)
        weights.append(resampling)
        inside.append(axis_inside)
    voxels = sitk.GetArrayViewFromImage(image)[start[2]:stop[2], start[1]:stop[1],
                                                 start[0]:stop[0]]
    return separable_apply(voxels, weights, inside, default_value)


def resample(image, grid, interpolator=sitk.sitkLinear, default_value=0.0,
             pixel_type=sitk.sitkFloat32):
    """Resample ``image`` onto ``grid`` in physical space (SimpleITK, multithreaded)."""
    return sitk.Resample(image, grid.reference(), sitk.Transform(), interpolator,
                         float(default_value), pixel_type)


def margin_region(image_grid, centre_axis_mm, extent_mm, margin_mm):
    """Voxel bounds (start, stop), (x, y, z), of what a box (centre, extent, in axis mm) plus a
    margin overlaps in an image; at least one voxel (the first) when the box misses the image."""
    spacing = np.asarray(image_grid.spacing_mm)
    low = (np.asarray(centre_axis_mm) - np.asarray(extent_mm) / 2 - margin_mm) / spacing
    high = (np.asarray(centre_axis_mm) + np.asarray(extent_mm) / 2 + margin_mm) / spacing
    size = np.asarray(image_grid.size)
    start = np.clip(np.floor(low).astype(int), 0, size)
    stop = np.clip(np.ceil(high).astype(int) + 1, 0, size)
    if np.any(stop <= start):
        start = np.zeros(3, int)
        stop = np.minimum(size, 1)
    return start, stop


def crop_with_margin(image, centre_axis_mm, extent_mm, margin_mm):
    """The part of ``image`` that a box (centre, extent, in axis mm) plus a margin overlaps.

    Used to restrict smoothing to what a small resampled grid needs (``margin_region`` gives
    its bounds). Returns the image itself when the box covers it all.
    """
    start, stop = margin_region(Grid.of(image), centre_axis_mm, extent_mm, margin_mm)
    if np.all(start == 0) and np.all(stop == np.asarray(image.GetSize())):
        return image
    return sitk.RegionOfInterest(image, [int(n) for n in stop - start], [int(n) for n in start])
