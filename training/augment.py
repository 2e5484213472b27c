"""Random spatial and intensity augmentation (METHOD.md, "Training"), and training samples.

Each sample is resampled once, from a prepared case (training/cases.py), through one random
transform: affine (translation, rotation, scaling) after an elastic B-spline deformation. The image
is interpolated linearly, the labels by nearest neighbour, so they stay aligned; a pseudo-labelled
case's ignore mask (training/cases.py) goes through the same transform by nearest neighbour, as
its labels do. Optionally (``quality_probability``) a sample's image is then shown as another
scanner would show it (``scanner_quality``).
"""

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from app import method
from app.geometry import Grid, centred_grid, image_centre_axis_mm
from app.localization import localization_grid
from app.preprocessing import scale_intensity


@dataclass(frozen=True)
class AugmentationRanges:
    """Ranges of the random augmentation; ``none()`` gives the identity."""

    translation_mm: float = 20.0
    rotation_rad: float = 0.35
    scale: float = 0.2
    axis_scale: float = 0.1
    elastic_mm: float = 15.0
    elastic_control_points: int = 8
    intensity_shift: float = 0.2
    intensity_scale: float = 0.2
    # Ours, not the method's: partial-field-of-view slabs (SCN only). Inference keeps the whole z
    # extent of a slab thinner than 200 mm and the body box across, at 2 mm where the crop stays
    # small enough, else coarser (about 3 mm for a wide body), and extends the slab above and
    # below by repeating its edge slices; these samples show that.
    slab_probability: float = 0.2
    slab_thickness_mm: tuple = (20.0, 160.0)
    slab_spacing_mm: tuple = (method.SEGMENTATION_SPACING_MM, 3.4)
    # Ours: image quality drawn anew per sample (``scanner_quality``). Off by default, and then
    # it draws nothing, so runs without it keep their samples. A real case otherwise shows one
    # scanner's noise, sharpness and slice thickness in every sample.
    quality_probability: float = 0.0
    quality_noise_hu: tuple = (0.0, 20.0)
    quality_blur_mm: tuple = (0.0, 1.5)
    quality_slice_mm: tuple = (2.0, 6.0)

    @classmethod
    def none(cls):
        return cls(translation_mm=0.0, rotation_rad=0.0, scale=0.0, axis_scale=0.0,
                   elastic_mm=0.0, intensity_shift=0.0, intensity_scale=0.0,
                   slab_probability=0.0, quality_probability=0.0)


def rotation_matrix(angles_rad):
    """Rotation about x, then y, then z (physical axes)."""
    cx, cy, cz = np.cos(angles_rad)
    sx, sy, sz = np.sin(angles_rad)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def random_transform(rng, output_grid, centre_physical, ranges):
    """A transform from output-grid points to input points: B-spline first, then affine.

    With an elastic part the result is that composite as a displacement field on
    ``output_grid`` (``displacement_field``): at the grid's points, the only ones a sample
    resamples, it maps as the composite does. The field is evaluated once for the image, the
    labels and an ignore mask, and axis by axis rather than point by point.
    """
    affine, bspline = random_parts(rng, output_grid, centre_physical, ranges)
    if bspline is None:
        return composite(affine, None)
    return displacement_field(affine, bspline, output_grid)


def random_composite(rng, output_grid, centre_physical, ranges):
    """``random_transform``'s map as the ITK composite it evaluates (for reference)."""
    return composite(*random_parts(rng, output_grid, centre_physical, ranges))


def composite(affine, bspline):
    """One transform applying ``bspline`` (if any) first, then ``affine``."""
    transforms = sitk.CompositeTransform(3)
    transforms.AddTransform(affine)
    if bspline is not None:
        transforms.AddTransform(bspline)  # added last = applied first
    return transforms


def random_parts(rng, output_grid, centre_physical, ranges):
    """The random affine and B-spline (None without elastic_mm) of ``random_transform``."""
    scale = (1 + rng.uniform(-ranges.scale, ranges.scale)) * (
        1 + rng.uniform(-ranges.axis_scale, ranges.axis_scale, 3))
    matrix = rotation_matrix(rng.uniform(-ranges.rotation_rad, ranges.rotation_rad, 3))
    # input = R S^-1 (output - centre) + centre + t: scale > 1 shows the anatomy larger
    affine = sitk.AffineTransform(3)
    affine.SetCenter(tuple(float(c) for c in centre_physical))
    affine.SetMatrix(tuple((matrix @ np.diag(1.0 / scale)).ravel()))
    affine.SetTranslation(tuple(rng.uniform(-ranges.translation_mm, ranges.translation_mm, 3)))
    if ranges.elastic_mm <= 0:
        return affine, None
    bspline = grid_bspline(output_grid, ranges.elastic_control_points - 3)
    bspline.SetParameters(tuple(rng.uniform(-ranges.elastic_mm, ranges.elastic_mm,
                                            len(bspline.GetParameters()))))
    return affine, bspline


def grid_bspline(grid, mesh):
    """A cubic B-spline transform (zero displacement) over ``grid``: ``mesh`` intervals per axis,
    ``mesh + 3`` control points. Its domain reaches 0.625 voxels beyond the outer voxel centres,
    as sitk.BSplineTransformInitializer's does, but it is set in double precision along the
    grid's own axes (the initializer's is single precision), so that the control grid's axes
    are the grid's and ``displacement_field`` can evaluate it axis by axis."""
    spacing = np.asarray(grid.spacing_mm, float)
    bspline = sitk.BSplineTransform(3, 3)
    bspline.SetTransformDomainDirection(tuple(float(v) for v in grid.direction))
    bspline.SetTransformDomainOrigin(tuple(grid.axis_mm_to_physical(-0.625 * spacing)))
    bspline.SetTransformDomainPhysicalDimensions(
        tuple((np.asarray(grid.size) + 0.25) * spacing))
    bspline.SetTransformDomainMeshSize([int(mesh)] * 3)
    return bspline


def cubic_bspline_weights(positions, count):
    """(len(positions), count): the cubic B-spline beta3(position - k) for k = 0 .. count - 1."""
    t = np.abs(np.asarray(positions, float)[:, None] - np.arange(count)[None, :])
    return np.where(t < 1, 2 / 3 - t ** 2 + t ** 3 / 2, np.where(t < 2, (2 - t) ** 3 / 6, 0.0))


def displacement_field(affine, bspline, grid):
    """The affine-after-B-spline map at ``grid``'s points as a displacement field transform
    (float64 vectors, so resampling through it onto ``grid`` gives what resampling through the
    composite gives).

    The B-spline's control grid must share ``grid``'s axes (``grid_bspline``): its weights then
    factor per axis, and the displacements are three small tensor contractions instead of 64
    control points per voxel. The affine is linear, so its matrix goes onto the control
    displacements before the sum and onto the grid's index steps after it.
    """
    direction = np.asarray(grid.direction, float).reshape(3, 3)
    fixed = np.asarray(bspline.GetFixedParameters())
    counts, origin, control_spacing = fixed[:3].astype(int), fixed[3:6], fixed[6:9]
    if not np.allclose(fixed[9:].reshape(3, 3), direction, rtol=0, atol=1e-12):
        raise ValueError("the B-spline's control grid does not share the grid's axes")
    start = (np.asarray(grid.origin_mm) - origin) @ direction  # mm along the grid's axes
    wx, wy, wz = (cubic_bspline_weights(
        (start[a] + np.arange(grid.size[a]) * grid.spacing_mm[a]) / control_spacing[a],
        counts[a]) for a in range(3))
    matrix = np.asarray(affine.GetMatrix()).reshape(3, 3)
    control = np.stack([sitk.GetArrayFromImage(c) for c in bspline.GetCoefficientImages()],
                       axis=-1) @ matrix.T  # (z, y, x, 3), as M (displacement)
    field = np.tensordot(wz, control, axes=(1, 0))  # (gz, cy, cx, 3)
    field = np.tensordot(wy, field, axes=(1, 1))  # (gy, gz, cx, 3)
    field = np.ascontiguousarray(
        np.tensordot(wx, field, axes=(1, 2)).transpose(2, 1, 0, 3))  # (gz, gy, gx, 3)
    # M (p + d - c) + c + t - p = M d + (M - I)(origin + D diag(spacing) index) + (I - M) c + t
    linear = matrix - np.eye(3)
    field += (linear @ (np.asarray(grid.origin_mm) - np.asarray(affine.GetCenter()))
              + np.asarray(affine.GetTranslation()))
    steps = linear @ direction * np.asarray(grid.spacing_mm, float)  # column a: one voxel on a
    nx, ny, nz = grid.size
    field += (np.arange(nx)[:, None] * steps[:, 0])[None, None]
    field += (np.arange(ny)[:, None] * steps[:, 1])[None, :, None]
    field += (np.arange(nz)[:, None] * steps[:, 2])[:, None, None]
    image = sitk.GetImageFromArray(field, isVector=True)
    image.SetOrigin(grid.origin_mm)
    image.SetSpacing(grid.spacing_mm)
    image.SetDirection(grid.direction)
    return sitk.DisplacementFieldTransform(image)


def resample_pair(image, labels, grid, transform, rng, ranges):
    """Image (linear, then random intensity shift/scale, scaled and clipped) and labels (nearest)
    through one transform onto ``grid``; arrays (z, y, x)."""
    image = sitk.Resample(image, grid.reference(), transform, sitk.sitkLinear,
                          method.PADDING_HU, sitk.sitkFloat32)
    labels = sitk.Resample(labels, grid.reference(), transform, sitk.sitkNearestNeighbor, 0,
                           sitk.sitkUInt8)
    hu = sitk.GetArrayViewFromImage(image)
    shift = rng.uniform(-ranges.intensity_shift, ranges.intensity_shift)
    factor = 1 + rng.uniform(-ranges.intensity_scale, ranges.intensity_scale)
    if ranges.quality_probability > 0 and rng.uniform() < ranges.quality_probability:
        hu = scanner_quality(hu, tuple(reversed(grid.spacing_mm)), rng, ranges)
    scaled = scale_intensity(hu)
    scaled = np.clip((scaled + shift) * factor, -1.0, 1.0).astype(np.float32)
    return scaled, sitk.GetArrayFromImage(labels)


# A Gaussian of standard deviation sigma has a full width at half maximum of this times sigma.
FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


def widening_sigma_mm(width_mm, present_width_mm):
    """Sigma (mm) of the Gaussian that widens a profile of full width at half maximum
    ``present_width_mm`` to ``width_mm`` (Gaussian widths add in quadrature); 0 where it is
    already that wide."""
    return np.sqrt(max(width_mm ** 2 - present_width_mm ** 2, 0.0)) / FWHM_PER_SIGMA


def scanner_quality(hu, spacing_zyx_mm, rng, ranges):
    """``hu`` (z, y, x) as another scanner and protocol might have shown it: thicker slices (a
    Gaussian slice profile along z whose full width at half maximum is drawn from
    ``ranges.quality_slice_mm``; the grid's own spacing counts as the width it already has), a
    softer in-plane kernel (Gaussian, sigma drawn from ``ranges.quality_blur_mm``) and more
    quantum noise (white, sigma drawn from ``ranges.quality_noise_hu``). New float32 array."""
    slice_mm = rng.uniform(*ranges.quality_slice_mm)
    blur_mm = rng.uniform(*ranges.quality_blur_mm)
    noise_hu = rng.uniform(*ranges.quality_noise_hu)
    spacing = np.asarray(spacing_zyx_mm, dtype=float)
    sigma_voxels = np.array([widening_sigma_mm(slice_mm, spacing[0]), blur_mm, blur_mm]) / spacing
    out = np.asarray(hu, dtype=np.float32)
    if sigma_voxels.any():
        out = ndimage.gaussian_filter(out, sigma_voxels, mode="nearest")
    else:
        out = out.copy()
    out += rng.normal(0.0, noise_hu, out.shape).astype(np.float32)
    return out


def resample_ignore(ignore, grid, transform):
    """An ignore mask (uint8 image, or None: nothing ignored) through ``transform`` onto
    ``grid`` by nearest neighbour, as labels are; outside it 0 (background there is certain).
    uint8 array (z, y, x)."""
    if ignore is None:
        return np.zeros(tuple(reversed(grid.size)), np.uint8)
    return sitk.GetArrayFromImage(sitk.Resample(ignore, grid.reference(), transform,
                                                sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))


def localization_sample(case, rng, ranges=AugmentationRanges(), max_size_zyx=None,
                        with_ignore=False):
    """(image (z, y, x) float32 scaled, foreground (z, y, x) uint8) on the localization grid.

    With ``max_size_zyx`` a random part of the grid no larger than that is returned (cheaper
    training steps; the network is fully convolutional). ``with_ignore``: a third array, the
    case's ignore mask (z, y, x) uint8 (zeros for a case without one); the random draws are the
    same either way.
    """
    grid = localization_grid(case.image_grid)
    centre_axis_mm = image_centre_axis_mm(grid)
    if max_size_zyx is not None:
        size = np.minimum(grid.size, tuple(reversed(max_size_zyx)))
        room = (np.asarray(grid.size) - size) / 2 * np.asarray(grid.spacing_mm)
        grid = centred_grid(grid, centre_axis_mm + rng.uniform(-room, room), size,
                            grid.spacing_mm)
    centre = grid.axis_mm_to_physical(image_centre_axis_mm(grid))
    transform = random_transform(rng, grid, centre, ranges)
    image, labels = resample_pair(case.localization_image, case.localization_labels, grid,
                                  transform, rng, ranges)
    if with_ignore:
        return (image, (labels > 0).astype(np.uint8),
                resample_ignore(case.localization_ignore, grid, transform))
    return image, (labels > 0).astype(np.uint8)


# Organ-centred crops pick the pancreas, the smallest and hardest organ, twice as often.
ORGAN_CENTRE_WEIGHTS = {1: 1.0, 2: 1.0, 3: 1.0, 4: 2.0}


def segmentation_sample(case, rng, crop_size_zyx, ranges=AugmentationRanges(),
                        organ_centred=0.5, with_ignore=False):
    """(image (z, y, x) float32 scaled, labels (z, y, x) uint8) on a 2 mm crop.

    The crop centre lies in the training ROI (ground-truth box + 32 mm); with probability
    ``organ_centred`` it is a voxel of a randomly chosen organ instead, so small organs are seen
    often. With probability ``ranges.slab_probability`` the sample imitates a partial field of
    view: a coarser spacing, and only a z-slab of the crop holds image; beyond it the image and
    the labels repeat the slab's edge rows. ``with_ignore``: a third array, the case's ignore
    mask (z, y, x) uint8 (zeros for a case without one), on the crop as the labels; the random
    draws are the same either way.
    """
    parent = Grid.of(case.segmentation_image)
    low, high = case.roi_low_mm, case.roi_high_mm
    centre = rng.uniform(low, high)
    if rng.uniform() < organ_centred:
        labels = sitk.GetArrayViewFromImage(case.segmentation_labels)
        present = np.unique(labels[labels > 0])
        weights = np.array([ORGAN_CENTRE_WEIGHTS.get(int(o), 1.0) for o in present])
        organ = rng.choice(present, p=weights / weights.sum())
        voxels = np.argwhere(labels == organ)
        z, y, x = voxels[rng.integers(len(voxels))]
        centre = np.array([x, y, z]) * np.asarray(parent.spacing_mm)
    slab = rng.uniform() < ranges.slab_probability
    spacing = rng.uniform(*ranges.slab_spacing_mm) if slab else method.SEGMENTATION_SPACING_MM
    size_xyz = tuple(reversed(crop_size_zyx))
    grid = centred_grid(parent, centre, size_xyz, spacing)
    transform = random_transform(rng, grid, grid.axis_mm_to_physical(image_centre_axis_mm(grid)),
                                 ranges)
    image, labels = resample_pair(case.segmentation_image, case.segmentation_labels, grid,
                                  transform, rng, ranges)
    ignore = (resample_ignore(case.segmentation_ignore, grid, transform),) if with_ignore else ()
    if slab:
        first, last = slab_rows(rng, crop_size_zyx[0], spacing, ranges.slab_thickness_mm)
        keep_slab(image, labels, first, last, *ignore)
    return (image, labels, *ignore)


def keep_slab(image, labels, first, last, *others):
    """In place: rows [first, last) stay; beyond them the image and the labels (and each of
    ``others``, such as an ignore mask) repeat the slab's edge rows, as inference extends a slab
    (app.preprocessing.extend_partial_axes; it pastes no labels from those rows).

    The labels repeat too: with background there (tried from SCN iteration 14,700 to 18,000) the
    network learned to shrink every organ of a slab whose edge rows repeat, the held-out 40 mm
    DICOM slab's liver DSC fell from 0.96 to 0.88 and its spleen's from 0.95 to 0.70."""
    for values in (image, labels, *others):
        values[:first], values[last:] = values[first], values[last - 1]


def slab_rows(rng, rows, spacing_mm, thickness_mm):
    """[first, last) rows of a random slab of ``thickness_mm`` (at least one row) lying in the
    crop's ``rows`` rows; it may run off either end of the crop, as a slab's image does."""
    thickness = int(np.clip(round(rng.uniform(*thickness_mm) / spacing_mm), 1, rows))
    first = int(rng.integers(-thickness // 2, rows - thickness // 2))
    return max(first, 0), min(first + thickness, rows)
