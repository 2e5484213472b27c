"""Stage 2: the segmentation grid around the ROI, and probabilities back to labels."""

import math

import numpy as np
import SimpleITK as sitk

from app import method
from app.geometry import centred_grid
from app.preprocessing import smallest_valid_size

MAX_CROP_SIZE = (max(method.SEGMENTATION_VALID_SIZES_X), max(method.SEGMENTATION_VALID_SIZES_Y),
                 max(method.SEGMENTATION_VALID_SIZES_Z))


def segmentation_spacing_mm(extent_mm):
    """2 mm, or the spacing that fits an ROI this large plus 0.1 mm (METHOD.md, stage 2)."""
    fitting = max(extent / limit for extent, limit in zip(extent_mm, MAX_CROP_SIZE))
    if fitting > method.SEGMENTATION_ENLARGE_THRESHOLD_MM:
        return fitting + method.SEGMENTATION_ENLARGE_STEP_MM
    return method.SEGMENTATION_SPACING_MM


def segmentation_grid(image_grid, roi):
    """The SCN's crop grid: isotropic, valid size strictly larger than the ROI, centred on it."""
    low_mm, high_mm = roi.axis_mm(image_grid)
    extent_mm = high_mm - low_mm
    spacing = segmentation_spacing_mm(extent_mm)
    voxels = [math.ceil(extent / spacing) for extent in extent_mm]
    valid = (method.SEGMENTATION_VALID_SIZES_X, method.SEGMENTATION_VALID_SIZES_Y,
             method.SEGMENTATION_VALID_SIZES_Z)
    size = [smallest_valid_size(n, sizes) for n, sizes in zip(voxels, valid)]
    return centred_grid(image_grid, (low_mm + high_mm) / 2, size, spacing)


def labels_on_roi(probabilities, crop_grid, roi_grid):
    """Linear resampling of the class probabilities onto the ROI grid, then argmax.

    ``probabilities``: float array (z, y, x, classes) on ``crop_grid``. Returns uint8 labels
    (z, y, x) on ``roi_grid``.
    """
    vector = sitk.GetImageFromArray(np.ascontiguousarray(probabilities, dtype=np.float32),
                                    isVector=True)
    vector.SetSpacing(crop_grid.spacing_mm)
    vector.SetOrigin(crop_grid.origin_mm)
    vector.SetDirection(crop_grid.direction)
    on_roi = sitk.Resample(vector, roi_grid.reference(), sitk.Transform(), sitk.sitkLinear, 0.0,
                           sitk.sitkVectorFloat32)
    return np.argmax(sitk.GetArrayViewFromImage(on_roi), axis=-1).astype(np.uint8)


def paste(roi_labels, roi, image_size):
    """A zero label volume (z, y, x) of the image's size with ``roi_labels`` put at the ROI."""
    labels = np.zeros(tuple(reversed(image_size)), dtype=np.uint8)
    (x0, y0, z0), (x1, y1, z1) = roi.start, roi.stop
    labels[z0:z1, y0:y1, x0:x1] = roi_labels
    return labels
