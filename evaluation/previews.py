"""PNG previews of a scored case: image, label and prediction side by side, as in the paper's
qualitative figures.

One figure per case, two rows: the axial and the coronal slice with the most organ voxels (label
and prediction together), each shown as the CT alone (abdominal window), the CT with the label and
the CT with the prediction, coloured per organ. Images are reoriented to LPS first, so the patient's
right is on the left of the picture (radiological convention), anterior is up in the axial row and
superior is up in the coronal row; pixels are drawn with their physical aspect ratio.
"""

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from evaluation.metrics import same_grid

# Colours per label id (RGB in [0, 1]); ids beyond these cycle through OTHER_COLOURS.
ORGAN_COLOURS = {1: (0.89, 0.26, 0.20), 2: (1.00, 0.80, 0.10), 3: (0.20, 0.72, 0.30),
                 4: (0.25, 0.45, 0.95)}
OTHER_COLOURS = ((0.80, 0.30, 0.90), (0.10, 0.80, 0.85), (0.95, 0.55, 0.15))
WINDOW_HU = (-160.0, 240.0)  # abdominal soft-tissue window, width 400 HU, level 40 HU
OVERLAY_ALPHA = 0.55


def organ_colour(label_id):
    """RGB colour (floats in [0, 1]) of a label id."""
    if label_id in ORGAN_COLOURS:
        return ORGAN_COLOURS[label_id]
    return OTHER_COLOURS[label_id % len(OTHER_COLOURS)]


def busiest_slices(label, prediction, label_ids):
    """(z, y) indices of the axial and coronal slices with the most organ voxels.

    ``label`` and ``prediction`` are (z, y, x) integer arrays on one grid; organ voxels are those
    with an id in ``label_ids`` in either. The middle slices when there are none.
    """
    organs = np.isin(label, label_ids) | np.isin(prediction, label_ids)
    if not organs.any():
        return label.shape[0] // 2, label.shape[1] // 2
    return int(np.argmax(organs.sum(axis=(1, 2)))), int(np.argmax(organs.sum(axis=(0, 2))))


def windowed(hounsfield):
    """CT values (HU) mapped to grey levels in [0, 1] through ``WINDOW_HU``."""
    low, high = WINDOW_HU
    return np.clip((np.asarray(hounsfield, dtype=np.float32) - low) / (high - low), 0.0, 1.0)


def overlay(grey, labels, label_ids):
    """RGB (H, W, 3) of a grey image (H, W) in [0, 1] with each organ of ``labels`` tinted."""
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    for label_id in label_ids:
        where = labels == label_id
        colour = np.array(organ_colour(label_id))
        rgb[where] = (1 - OVERLAY_ALPHA) * rgb[where] + OVERLAY_ALPHA * colour
    return rgb


def _lps_array(image):
    """(z, y, x) array of an image reoriented to LPS, and its spacing in (z, y, x) mm."""
    oriented = sitk.DICOMOrient(image, "LPS")
    return sitk.GetArrayFromImage(oriented), oriented.GetSpacing()[::-1]


def write_preview(path, label, prediction, organs, image=None, title=""):
    """Write the preview PNG of one case (atomically: temporary name, then rename).

    ``label``, ``prediction`` and ``image`` (CT in HU, optional) are SimpleITK images; the
    prediction must lie on the label's grid, the image is resampled onto it (linear) when it does
    not. ``organs`` maps label id -> organ name. Without an image the grey background is black.
    """
    from matplotlib.figure import Figure  # only needed here; keeps scoring imports light
    from matplotlib.patches import Patch

    label_array, spacing = _lps_array(label)
    prediction_array, _ = _lps_array(prediction)
    if image is None:
        grey = np.zeros(label_array.shape, dtype=np.float32)
    else:
        if not same_grid(image, label):
            image = sitk.Resample(image, label, sitk.Transform(), sitk.sitkLinear, -1024.0)
        grey = windowed(_lps_array(image)[0])
    label_ids = list(organs)
    z, y = busiest_slices(label_array, prediction_array, label_ids)
    rows = [("axial", np.s_[z, :, :], spacing[1] / spacing[2], False),
            ("coronal", np.s_[:, y, :], spacing[0] / spacing[2], True)]

    figure = Figure(figsize=(12, 8.5), dpi=100)
    axes = figure.subplots(2, 3)
    for row, (name, index, aspect, flip) in enumerate(rows):
        panels = [np.repeat(grey[index][..., None], 3, axis=-1),
                  overlay(grey[index], label_array[index], label_ids),
                  overlay(grey[index], prediction_array[index], label_ids)]
        for column, (panel, heading) in enumerate(zip(panels, ("image", "label", "prediction"))):
            ax = axes[row, column]
            ax.imshow(panel[::-1] if flip else panel, aspect=aspect, interpolation="nearest")
            ax.set_title(f"{heading}, {name}", fontsize=10)
            ax.set_axis_off()
    figure.legend(handles=[Patch(color=organ_colour(i), label=n) for i, n in organs.items()],
                  loc="lower center", ncol=len(organs), frameon=False)
    figure.suptitle(title, fontsize=11)
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    figure.savefig(temporary, format="png")
    os.replace(temporary, path)
    return path
