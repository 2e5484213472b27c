"""Stage 2: the segmentation grid around the ROI, and probabilities back to labels."""

import math

import numpy as np
import SimpleITK as sitk

from app import method
from app.geometry import centred_grid, linear_positions
from app.localization import partial_fov_axes
from app.preprocessing import smallest_valid_size

MAX_CROP_SIZE = (max(method.SEGMENTATION_VALID_SIZES_X), max(method.SEGMENTATION_VALID_SIZES_Y),
                 max(method.SEGMENTATION_VALID_SIZES_Z))
# Ours, for partial fields of view only: the crop sizes are multiples of this (the step of the
# valid sizes, which the SCN's pooling needs) and may exceed the largest valid size along an axis,
# as long as the crop holds no more voxels than the largest valid crop (the GPU-memory bound the
# size limits stand for).
CROP_SIZE_STEP = 32
MAX_CROP_VOXELS = math.prod(MAX_CROP_SIZE)


def segmentation_spacing_mm(extent_mm):
    """2 mm, or the spacing that fits an ROI this large plus 0.1 mm (METHOD.md, stage 2)."""
    fitting = max(extent / limit for extent, limit in zip(extent_mm, MAX_CROP_SIZE))
    if fitting > method.SEGMENTATION_ENLARGE_THRESHOLD_MM:
        return fitting + method.SEGMENTATION_ENLARGE_STEP_MM
    return method.SEGMENTATION_SPACING_MM


def partial_fov_crop_size(voxels):
    """Crop size (x, y, z) for an ROI of ``voxels`` 2 mm voxels in a partial field of view: per
    axis the next multiple of ``CROP_SIZE_STEP`` strictly larger; None if that crop holds more
    voxels than ``MAX_CROP_VOXELS``.

    A thin slab's body box is wide (often the whole field of view, arms and table included):
    fitting it into the method's largest crop coarsened the spacing to about 3.2 mm on the real
    40 mm slab of ../shared/data (512 x 356 voxels of 0.98 mm in-plane), where the SCN, trained at
    2 mm, found 66 % of the spleen; at 2 mm it found 87 % (liver DSC 0.94 -> 0.96, spleen 0.75
    -> 0.89). The slab is thin, so the 2 mm crop is still smaller than the largest valid one.
    """
    size = [(n // CROP_SIZE_STEP + 1) * CROP_SIZE_STEP for n in voxels]
    return size if math.prod(size) <= MAX_CROP_VOXELS else None


def segmentation_grid(image_grid, roi):
    """The SCN's crop grid: isotropic, valid size strictly larger than the ROI, centred on it.

    Partial fields of view (``partial_fov_axes``) keep 2 mm when ``partial_fov_crop_size``
    allows it (ours, not the method's)."""
    low_mm, high_mm = roi.axis_mm(image_grid)
    extent_mm = high_mm - low_mm
    centre_mm = (low_mm + high_mm) / 2
    if any(partial_fov_axes(image_grid)):
        spacing = method.SEGMENTATION_SPACING_MM
        size = partial_fov_crop_size([math.ceil(extent / spacing) for extent in extent_mm])
        if size is not None:
            return centred_grid(image_grid, centre_mm, size, spacing)
    spacing = segmentation_spacing_mm(extent_mm)
    voxels = [math.ceil(extent / spacing) for extent in extent_mm]
    valid = (method.SEGMENTATION_VALID_SIZES_X, method.SEGMENTATION_VALID_SIZES_Y,
             method.SEGMENTATION_VALID_SIZES_Z)
    size = [smallest_valid_size(n, sizes) for n, sizes in zip(voxels, valid)]
    return centred_grid(image_grid, centre_mm, size, spacing)


def labels_on_roi(probabilities, crop_grid, roi_grid, *, plain=False):
    """Linear resampling of the class probabilities onto the ROI grid, then argmax.

    ``probabilities``: float array (z, y, x, classes) on ``crop_grid``. Returns uint8 labels
    (z, y, x) on ``roi_grid``; ROI voxels outside the crop get 0 (background).

    The fast way (default; grids sharing one direction, as the crop and the ROI do) never builds
    the probabilities at ROI resolution: where all 8 crop voxels around an ROI voxel have the
    same argmax, so has their linear interpolation (a convex combination keeps the largest
    component largest, ties going to the lower label as in ``np.argmax``), and the label is
    looked up; only in the cells where the crop's labels differ are the probabilities
    interpolated (``labels_by_cells``). ``plain=True``: resample all channels onto the ROI with
    SimpleITK, then argmax (the reference; the two agree but for float rounding at exact ties).
    """
    if plain or not np.allclose(crop_grid.direction, roi_grid.direction, atol=1e-6):
        vector = sitk.GetImageFromArray(np.ascontiguousarray(probabilities, dtype=np.float32),
                                        isVector=True)
        vector.SetSpacing(crop_grid.spacing_mm)
        vector.SetOrigin(crop_grid.origin_mm)
        vector.SetDirection(crop_grid.direction)
        on_roi = sitk.Resample(vector, roi_grid.reference(), sitk.Transform(), sitk.sitkLinear,
                               0.0, sitk.sitkVectorFloat32)
        return np.argmax(sitk.GetArrayViewFromImage(on_roi), axis=-1).astype(np.uint8)
    first_mm = crop_grid.physical_to_axis_mm(roi_grid.origin_mm)
    positions = [linear_positions(crop_grid.size[a], crop_grid.spacing_mm[a], first_mm[a],
                                  roi_grid.size[a], roi_grid.spacing_mm[a]) for a in range(3)]
    return labels_by_cells(probabilities, positions)


def labels_by_cells(probabilities, positions_xyz):
    """Argmax of the linearly interpolated ``probabilities`` (z, y, x, classes) at the output
    voxels given per axis by ``geometry.linear_positions`` (x, y, z): uint8 labels (z, y, x).

    Works one output slice at a time; each slice looks up the labels of uniform cells and
    interpolates (in float64) only the output voxels in cells whose 8 corners disagree.
    """
    probabilities = np.asarray(probabilities)
    crop_labels = np.argmax(probabilities, axis=-1).astype(np.uint8)
    x_axis, y_axis, z_axis = positions_xyz
    (lower_x, fraction_x, inside_x), (lower_y, fraction_y, inside_y) = x_axis, y_axis
    lower_z, fraction_z, inside_z = z_axis
    # cell (i, j, k) spans crop voxels i..i+1, j..j+1, k..k+1 (clamped at the last voxel)
    upper = [np.minimum(np.arange(n) + 1, n - 1) for n in crop_labels.shape]
    corner = crop_labels
    uniform = np.ones(crop_labels.shape, bool)
    for dz, dy, dx in np.ndindex(2, 2, 2):
        if dz or dy or dx:
            other = crop_labels[np.ix_(upper[0] if dz else np.arange(crop_labels.shape[0]),
                                       upper[1] if dy else np.arange(crop_labels.shape[1]),
                                       upper[2] if dx else np.arange(crop_labels.shape[2]))]
            uniform &= other == corner
    labels = np.zeros((len(lower_z), len(lower_y), len(lower_x)), np.uint8)
    if not (inside_x.any() and inside_y.any()):
        return labels
    # the inside of an axis is one interval of output voxels
    rows, columns = np.flatnonzero(inside_y), np.flatnonzero(inside_x)
    rows_slice, columns_slice = slice(rows[0], rows[-1] + 1), slice(columns[0], columns[-1] + 1)
    cell_y, cell_x = lower_y[rows], lower_x[columns]
    weight_y, weight_x = fraction_y[rows][:, None], fraction_x[columns]
    upper_y, upper_x = upper[1][cell_y], upper[2][cell_x]
    for z in np.flatnonzero(inside_z):
        cz = lower_z[z]
        slice_labels = crop_labels[cz][cell_y][:, cell_x]
        mixed_y, mixed_x = np.nonzero(~uniform[cz][cell_y][:, cell_x])
        if mixed_y.size:
            plane = ((1 - fraction_z[z]) * probabilities[cz].astype(np.float64)
                     + fraction_z[z] * probabilities[upper[0][cz]])  # (y, x, classes)
            y0, y1, x0, x1 = cell_y[mixed_y], upper_y[mixed_y], cell_x[mixed_x], upper_x[mixed_x]
            wy, wx = weight_y[mixed_y], weight_x[mixed_x][:, None]
            values = ((1 - wy) * ((1 - wx) * plane[y0, x0] + wx * plane[y0, x1])
                      + wy * ((1 - wx) * plane[y1, x0] + wx * plane[y1, x1]))
            slice_labels[mixed_y, mixed_x] = np.argmax(values, axis=-1)
        labels[z, rows_slice, columns_slice] = slice_labels
    return labels


def paste(roi_labels, roi, image_size):
    """A zero label volume (z, y, x) of the image's size with ``roi_labels`` put at the ROI."""
    labels = np.zeros(tuple(reversed(image_size)), dtype=np.uint8)
    (x0, y0, z0), (x1, y1, z1) = roi.start, roi.stop
    labels[z0:z1, y0:y1, x0:x1] = roi_labels
    return labels


def drop_islands(labels, min_fraction, edges=None):
    """Relabel as background, in place, each organ's connected pieces (26-connectivity) holding
    fewer voxels than ``min_fraction`` of that organ's largest piece, except pieces that touch
    the image's edge; returns the number of voxels relabelled. Ours, not the paper's (its labels
    are the plain argmax).

    Each organ is one connected piece, so only the scan's edge can cut a true piece off the
    rest: a thin slab may hold a liver in several parts, all of them touching its edge. A
    fraction rather than the largest piece alone keeps both kidneys. ``edges``: for each axis
    of ``labels`` (low face, high face), whether that face is the image's edge (default: all
    six, ``labels`` being the whole image; for an ROI, the faces it shares with the image)."""
    if not 0.0 <= min_fraction <= 1.0:
        raise ValueError(f"min_fraction {min_fraction} is not between 0 and 1")
    if min_fraction == 0.0:
        return 0
    if edges is None:
        edges = ((True, True),) * labels.ndim
    dropped = 0
    for label in method.LABELS:
        mask = labels == label
        box = bounding_box(mask)
        if box is None:
            continue
        pieces, count = connected_pieces(mask[box])
        if count < 2:
            continue
        sizes = np.bincount(pieces.ravel(), minlength=count + 1)[1:]
        small = set(np.flatnonzero(sizes < min_fraction * sizes.max()) + 1)
        small -= pieces_at_edges(pieces, box, labels.shape, edges)
        if small:
            small = np.array(sorted(small))
            labels[box][np.isin(pieces, small)] = 0
            dropped += int(sizes[small - 1].sum())
    return dropped


def connected_pieces(mask):
    """(piece number per voxel, 0 outside; the number of pieces) of a boolean (z, y, x) mask,
    26-connectivity (ITK's connected components, fully connected)."""
    image = sitk.GetImageFromArray(mask.view(np.uint8))
    pieces = sitk.GetArrayFromImage(sitk.ConnectedComponent(image, True))
    return pieces, int(pieces.max())


def pieces_at_edges(pieces, box, shape, edges):
    """The piece numbers of ``pieces`` (labelled within ``box`` of an array of ``shape``) on
    the faces of that array that ``edges`` marks as the image's edge."""
    found = set()
    for axis, (low, high) in enumerate(edges):
        if low and box[axis].start == 0:
            found.update(np.unique(np.take(pieces, 0, axis=axis)).tolist())
        if high and box[axis].stop == shape[axis]:
            found.update(np.unique(np.take(pieces, -1, axis=axis)).tolist())
    found.discard(0)
    return found


def bounding_box(mask):
    """The slices of the smallest box holding every true voxel of ``mask`` (None if none)."""
    bounds = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hits.size == 0:
            return None
        bounds.append(slice(hits[0], hits[-1] + 1))
    return tuple(bounds)
