"""Network inputs: anti-aliased resampling onto a network grid and intensity scaling."""

import numpy as np
import SimpleITK as sitk

from app import method
from app.geometry import (Grid, area_resample, crop_with_margin, image_centre_axis_mm,
                          margin_region, resample, smooth, smooth_and_resample)


def scale_intensity(hu):
    """HU -> network units: divide by 2048 and clip to [-1, 1] (METHOD.md, "Intensity")."""
    return np.clip(np.asarray(hu, dtype=np.float32) / method.INTENSITY_DIVISOR_HU, -1.0, 1.0)


def smallest_valid_size(voxels, valid_sizes):
    """The smallest valid size strictly larger than ``voxels``, or the largest valid size."""
    larger = [size for size in valid_sizes if size > voxels]
    return min(larger) if larger else max(valid_sizes)


def network_input(image, grid, sigma_mm, padding_hu, downsampling="gaussian", *, plain=False):
    """Resample a CT onto a network grid and scale it: float32 array (z, y, x).

    ``downsampling`` "gaussian" (ours): Gaussian smoothing (``sigma_mm``, physical) of the part
    of the image the grid covers, then linear interpolation. "area" (the published inference's
    localization input): area averaging over each grid voxel's box (``geometry.area_resample``),
    after Gaussian smoothing only if ``sigma_mm`` > 0. Voxels outside the image get ``padding_hu``.

    Both are computed in one separable pass over the image's own voxels
    (``geometry.smooth_and_resample``: no float copy of the image, no smoothed intermediate).
    ``plain=True`` computes the same thing step by step with SimpleITK filters (crop, cast,
    smooth, resample): the reference the fast pass is tested against, equal to float32
    rounding; grids with another direction than the image's always take that way.
    """
    if downsampling not in method.LOCALIZATION_DOWNSAMPLING:
        raise ValueError(f"downsampling {downsampling!r} is not one of "
                         f"{', '.join(method.LOCALIZATION_DOWNSAMPLING)}")
    image_grid = Grid.of(image)
    centre_in_image = image_grid.physical_to_axis_mm(
        grid.axis_mm_to_physical(image_centre_axis_mm(grid)))
    parent_spacing = np.asarray(image_grid.spacing_mm)
    margin_mm = 3 * sigma_mm + 2 * float(parent_spacing.max())
    if downsampling == "area":
        margin_mm += max(grid.spacing_mm)  # a box reaches half a grid voxel beyond its centre
    same_direction = np.allclose(image_grid.direction, grid.direction, atol=1e-6)
    if not plain and same_direction:
        region = margin_region(image_grid, centre_in_image, grid.extent_mm, margin_mm)
        values = smooth_and_resample(image, grid, sigma_mm,
                                     "area" if downsampling == "area" else "linear", padding_hu,
                                     region)
        values /= np.float32(method.INTENSITY_DIVISOR_HU)  # scale_intensity, in place
        return np.clip(values, -1.0, 1.0, out=values)
    region = crop_with_margin(image, centre_in_image, grid.extent_mm, margin_mm)
    if downsampling == "area":
        source = smooth(region, sigma_mm) if sigma_mm > 0 else region
        resampled = area_resample(source, grid, padding_hu)
    else:
        resampled = resample(smooth(region, sigma_mm), grid, sitk.sitkLinear, padding_hu)
    return scale_intensity(sitk.GetArrayViewFromImage(resampled))
