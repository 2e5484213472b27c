"""Stage 1: where the organs are. The localization grid and the region of interest (ROI).

Partial fields of view (our rule, not the published method's): the localization network learned
whole abdomens, and on an image that covers less than ``PARTIAL_FOV_EXTENT_MM`` along an axis its
foreground is unreliable along every axis (measured with the published network on sub-blocks of
the real CT in ../shared/data: 40-80 mm slabs lost 12-100% of their organ voxels, mostly in-plane,
and 140-180 mm slabs up to 3%). There the ROI is the whole image along the short axes and, along
the others, the box of the body (voxels above ``BODY_THRESHOLD_HU`` in the network input), which
holds every organ and is rarely wider than the segmentation crop at 2 mm.
"""

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from app import method
from app.geometry import Grid, centred_grid, image_centre_axis_mm
from app.preprocessing import scale_intensity, smallest_valid_size

PARTIAL_FOV_EXTENT_MM = method.PARTIAL_FOV_EXTENT_MM  # the partial-field-of-view rule's length
BODY_THRESHOLD_HU = -500.0  # halfway between air (-1000) and soft tissue (0..100)


@dataclass(frozen=True)
class Roi:
    """A box of image voxels: start index and size (x, y, z) in the (canonical) image."""

    start: tuple
    size: tuple

    @property
    def stop(self):
        return tuple(a + n for a, n in zip(self.start, self.size))

    def grid(self, image_grid):
        """The sub-grid of the image that this box covers."""
        first_voxel_mm = np.asarray(self.start) * np.asarray(image_grid.spacing_mm)
        origin = image_grid.axis_mm_to_physical(first_voxel_mm)
        return Grid(self.size, image_grid.spacing_mm, tuple(float(o) for o in origin),
                    image_grid.direction)

    def axis_mm(self, image_grid):
        """(low, high) outer edges of the box in mm along the image axes from the image origin."""
        spacing = np.asarray(image_grid.spacing_mm)
        low = (np.asarray(self.start) - 0.5) * spacing
        high = (np.asarray(self.stop) - 0.5) * spacing
        return low, high

    @classmethod
    def whole(cls, image_grid):
        return cls((0, 0, 0), tuple(image_grid.size))


def localization_spacing_mm(image_grid):
    """6 mm, or larger so that the whole image fits the largest valid input (METHOD.md)."""
    spacing = method.LOCALIZATION_SPACING_MM
    largest = ((max(method.LOCALIZATION_VALID_SIZES_XY),) * 2
               + (max(method.LOCALIZATION_VALID_SIZES_Z),))
    ratio = max(math.ceil(extent / spacing) / limit
                for extent, limit in zip(image_grid.extent_mm, largest))
    ratio += method.LOCALIZATION_FIT_SLACK
    return spacing * ratio if ratio > 1 else spacing


def localization_grid(image_grid):
    """The network grid of stage 1: isotropic, centred on the image, of a valid size."""
    spacing = localization_spacing_mm(image_grid)
    voxels = [math.ceil(extent / spacing) for extent in image_grid.extent_mm]
    size = (smallest_valid_size(voxels[0], method.LOCALIZATION_VALID_SIZES_XY),
            smallest_valid_size(voxels[1], method.LOCALIZATION_VALID_SIZES_XY),
            smallest_valid_size(voxels[2], method.LOCALIZATION_VALID_SIZES_Z))
    return centred_grid(image_grid, image_centre_axis_mm(image_grid), size, spacing)


def partial_fov_axes(image_grid):
    """Per axis (x, y, z) of ``image_grid``: True where the image is shorter than
    ``PARTIAL_FOV_EXTENT_MM`` (outer voxel edges)."""
    return tuple(bool(extent < PARTIAL_FOV_EXTENT_MM) for extent in image_grid.extent_mm)


def box_of(mask, network_grid, image_grid, margin_mm):
    """Bounding box of a boolean (z, y, x) mask on ``network_grid`` plus ``margin_mm``, as image
    voxels clipped to the image: (start, stop) index arrays (x, y, z); None if it is empty."""
    if not mask.any():
        return None
    indices_zyx = np.nonzero(mask)
    low_index = np.array([indices_zyx[axis].min() for axis in (2, 1, 0)])
    high_index = np.array([indices_zyx[axis].max() for axis in (2, 1, 0)])
    spacing = np.asarray(network_grid.spacing_mm)
    first_voxel = image_grid.physical_to_axis_mm(network_grid.origin_mm)
    low_mm = first_voxel + (low_index - 0.5) * spacing - margin_mm
    high_mm = first_voxel + (high_index + 0.5) * spacing + margin_mm
    image_spacing = np.asarray(image_grid.spacing_mm)
    start = np.clip(np.ceil(low_mm / image_spacing), 0, None).astype(int)
    stop = np.minimum(np.floor(high_mm / image_spacing).astype(int) + 1, image_grid.size)
    if np.any(stop <= start):
        return None
    return start, stop


def body_mask(network_input):
    """The trunk in a scaled network input (z, y, x): the largest connected region (face
    neighbours) of voxels above ``BODY_THRESHOLD_HU``. Arms lying apart from the trunk, the
    table and blankets are other regions, and every abdominal organ lies in the trunk."""
    above = np.asarray(network_input) > scale_intensity(BODY_THRESHOLD_HU)
    regions = sitk.ConnectedComponent(sitk.GetImageFromArray(above.astype(np.uint8)))
    by_size = sitk.RelabelComponent(regions)  # 1 is the largest region
    return sitk.GetArrayViewFromImage(by_size) == 1


def roi_from_foreground(foreground, network_grid, image_grid, margin_mm=method.ROI_MARGIN_MM,
                        network_input=None):
    """Bounding box of all foreground voxels, enlarged by ``margin_mm`` and clipped to the image.

    ``foreground`` is a boolean array (z, y, x) on ``network_grid``, which must share the image's
    direction. No foreground: the whole image.

    Partial field of view (``partial_fov_axes``): the whole image along the short axes; along the
    others the union of the foreground box and the body's box, found in ``network_input`` (the
    network's scaled input (z, y, x) on ``network_grid``; without it, the whole image).
    """
    partial = np.array(partial_fov_axes(image_grid))
    if partial.any():
        whole = (np.zeros(3, int), np.asarray(image_grid.size))
        if network_input is None:
            return Roi.whole(image_grid)
        body = body_mask(network_input)
        boxes = [box for box in (box_of(foreground, network_grid, image_grid, margin_mm),
                                 box_of(body, network_grid, image_grid, margin_mm))
                 if box is not None]
        if not boxes:
            return Roi.whole(image_grid)
        start = np.min([box[0] for box in boxes], axis=0)
        stop = np.max([box[1] for box in boxes], axis=0)
        start, stop = np.where(partial, whole[0], start), np.where(partial, whole[1], stop)
        return Roi(tuple(int(a) for a in start), tuple(int(n) for n in stop - start))
    box = box_of(foreground, network_grid, image_grid, margin_mm)
    if box is None:
        return Roi.whole(image_grid)
    start, stop = box
    return Roi(tuple(int(a) for a in start), tuple(int(n) for n in stop - start))
