"""Training cases: finding them on disk, and preparing each once for fast augmentation.

A prepared case keeps, in the canonical (LPS-closest) orientation, two low-resolution copies of
the CT that already carry the method's anti-aliasing: one over the whole image for the
localization net, one around the organs for the SCN. Augmented samples are then resampled from
these small images instead of the full-resolution CT.

A case's label may cover only some organs (training/coverage.py: a labelled.json or dataset.json
beside the cases); the prepared case carries the label ids it covers, and the losses treat the
other organs as unknown.

A pseudo-labelled case (training/pseudo_label.py) has an ignore mask besides its labels (1 =
uncertain voxel): it is resampled as the labels are (nearest neighbour) and the losses leave its
voxels out. Cases without one carry None.
"""

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from app import method
from app.geometry import Grid, centred_grid, image_centre_axis_mm, resample, to_canonical
from app.preprocessing import network_input
from training.coverage import ALL_ORGANS, covered_organs, folder_declarations

LOCALIZATION_CACHE_SPACING_MM = 4.0
SEGMENTATION_CACHE_SPACING_MM = 1.5
# room around the training ROI for translation, rotation and scaling augmentation
AUGMENTATION_ROOM_MM = 48.0


@dataclass
class PreparedCase:
    """One case ready for augmentation. Images in whole HU (int16), labels uint8, canonical
    frame."""

    name: str
    image_grid: Grid  # the canonical full-resolution image's grid
    localization_image: sitk.Image
    localization_labels: sitk.Image
    segmentation_image: sitk.Image
    segmentation_labels: sitk.Image
    roi_low_mm: np.ndarray  # training ROI (ground-truth box + 32 mm), physical axis mm of
    roi_high_mm: np.ndarray  # segmentation_image's frame, from its origin
    covered: tuple = ALL_ORGANS  # label ids the labels cover; the others are unknown, not absent
    # uint8 ignore masks (1 = the label is uncertain there) on the labels' grids, or None
    localization_ignore: sitk.Image | None = None
    segmentation_ignore: sitk.Image | None = None


def find_cases(folder):
    """(name, image path, label path) for FLARE naming or an nnU-Net imagesTr/labelsTr folder."""
    folder = Path(folder)
    if (folder / "imagesTr").is_dir():
        images_dir, labels_dir = folder / "imagesTr", folder / "labelsTr"
    elif (folder / "images").is_dir() and (folder / "labels").is_dir():
        images_dir, labels_dir = folder / "images", folder / "labels"
    else:
        images_dir = labels_dir = folder
    cases = []
    for image_path in sorted(images_dir.glob("*_0000.nii.gz")):
        name = image_path.name[: -len("_0000.nii.gz")]
        label_path = labels_dir / f"{name}.nii.gz"
        if label_path.is_file():
            cases.append((name, image_path, label_path))
    return cases


def case_coverage(folder):
    """{case name: covered label ids} of ``find_cases(folder)``, from the labelled.json and
    dataset.json in ``folder`` (training/coverage.py); undeclared cases cover every organ.
    Raises coverage.DeclarationError naming the file for a bad declaration."""
    declarations = folder_declarations(folder)
    return {name: covered_organs(declarations, name) for name, _, _ in find_cases(folder)}


def covering(case, covered):
    """``case`` covering ``covered``: a declaration (labelled.json, a pseudo-label record) wins
    over what a cache entry of the same files was prepared with."""
    return case if case.covered == tuple(covered) else replace(case, covered=tuple(covered))


def _labels_on(labels, grid):
    return resample(labels, grid, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)


def prepare_case(name, image, labels, covered=ALL_ORGANS, ignore=None):
    """Prepare a (CT image in HU, labels) pair on the same grid for training; ``covered``: the
    label ids the labels cover (the training ROI is the box of the labelled organs);
    ``ignore``: None, or a uint8 mask on the same grid, 1 where the label is to be ignored."""
    image, _ = to_canonical(image)
    labels, _ = to_canonical(labels)
    labels.CopyInformation(image)
    if ignore is not None:
        ignore, _ = to_canonical(ignore)
        ignore.CopyInformation(image)
    grid = Grid.of(image)

    spacing = LOCALIZATION_CACHE_SPACING_MM
    size = np.ceil(np.asarray(grid.extent_mm) / spacing).astype(int) + 2
    coarse = centred_grid(grid, image_centre_axis_mm(grid), size, spacing)
    localization_image = _hu_image(image, coarse, method.LOCALIZATION_TRAINING_SIGMA_MM)
    localization_labels = _labels_on(labels, coarse)
    localization_ignore = None if ignore is None else _labels_on(ignore, coarse)

    array = sitk.GetArrayViewFromImage(labels)
    present = np.nonzero(array)
    if len(present[0]) == 0:
        raise ValueError(f"{name}: label image has no organ voxels")
    spacing_xyz = np.asarray(grid.spacing_mm)
    low = np.array([present[a].min() for a in (2, 1, 0)]) * spacing_xyz - spacing_xyz / 2
    high = np.array([present[a].max() for a in (2, 1, 0)]) * spacing_xyz + spacing_xyz / 2
    roi_low = low - method.TRAINING_ROI_MARGIN_MM
    roi_high = high + method.TRAINING_ROI_MARGIN_MM
    spacing = SEGMENTATION_CACHE_SPACING_MM
    extent = roi_high - roi_low + 2 * AUGMENTATION_ROOM_MM
    fine = centred_grid(grid, (roi_low + roi_high) / 2, np.ceil(extent / spacing).astype(int),
                        spacing)
    segmentation_image = _hu_image(image, fine, method.SEGMENTATION_SMOOTHING_SIGMA_MM)
    segmentation_labels = _labels_on(labels, fine)
    segmentation_ignore = None if ignore is None else _labels_on(ignore, fine)
    offset = Grid.of(image).physical_to_axis_mm(fine.origin_mm)
    return PreparedCase(name, grid, localization_image, localization_labels, segmentation_image,
                        segmentation_labels, roi_low - offset, roi_high - offset,
                        tuple(sorted(covered)), localization_ignore, segmentation_ignore)


def _hu_image(image, grid, sigma_mm):
    """Anti-aliased HU image on ``grid`` (the same smoothing as inference), padded -1024 HU,
    in whole HU (int16, see ``whole_hu``)."""
    scaled = network_input(image, grid, sigma_mm, method.PADDING_HU)
    hu = sitk.GetImageFromArray(whole_hu(scaled * np.float32(method.INTENSITY_DIVISOR_HU)))
    hu.SetSpacing(grid.spacing_mm)
    hu.SetOrigin(grid.origin_mm)
    hu.SetDirection(grid.direction)
    return hu


def whole_hu(hu):
    """HU rounded to int16. A prepared case's images are held in memory for a whole run; int16
    halves what float32 needs (with the labels, 3 bytes a voxel instead of 5), and a step of
    1 HU is far below CT noise and below the network's input resolution (1/2048 per HU before
    the augmentation's linear interpolation, which resamples to float32). The network's input
    is clipped to +-2048 HU, well inside int16; the clip here only keeps any other input from
    wrapping around."""
    return np.rint(np.clip(hu, -32768, 32767)).astype(np.int16)


def load_case(name, image_path, label_path, covered=ALL_ORGANS, ignore_path=None):
    """``prepare_case`` of an image file and its label file (and ignore-mask file)."""
    ignore = None if ignore_path is None else sitk.ReadImage(str(ignore_path), sitk.sitkUInt8)
    return prepare_case(name, sitk.ReadImage(str(image_path)), sitk.ReadImage(str(label_path)),
                        covered, ignore)
