"""Overlap metrics on label images. Arrays are (z, y, x) as SimpleITK gives them."""

import numpy as np
import SimpleITK as sitk

from app import method


def dice(prediction, reference):
    """Dice similarity coefficient of two boolean arrays; 1.0 when both are empty."""
    prediction = np.asarray(prediction, dtype=bool)
    reference = np.asarray(reference, dtype=bool)
    total = int(prediction.sum()) + int(reference.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(prediction, reference).sum()) / total


def same_grid(a, b, tolerance_mm=1e-3):
    """True when two images have the same size, spacing, origin and direction."""
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-6)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tolerance_mm)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-6))


def organ_dice(prediction, reference, labels=method.LABELS):
    """DSC per organ name for two label images on the same grid.

    Raises ValueError when the grids differ (compare on one grid, never as raw arrays).
    """
    if not same_grid(prediction, reference):
        raise ValueError("prediction and reference lie on different grids")
    predicted = sitk.GetArrayViewFromImage(prediction)
    expected = sitk.GetArrayViewFromImage(reference)
    return {name: dice(predicted == label, expected == label) for label, name in labels.items()}
