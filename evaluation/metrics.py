"""Overlap metrics on label images. Arrays are (z, y, x) as SimpleITK gives them."""

import numpy as np
import SimpleITK as sitk

from app import method
from evaluation.surface import surface_dice


def dice(prediction, reference):
    """Dice similarity coefficient of two boolean arrays; 1.0 when both are empty."""
    prediction = np.asarray(prediction, dtype=bool)
    reference = np.asarray(reference, dtype=bool)
    total = np.count_nonzero(prediction) + np.count_nonzero(reference)
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(prediction & reference)) / int(total)


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


def challenge_scores(label_mask, prediction_mask, spacing_mm, tolerance_mm,
                     nsd_zero_below_dsc=None):
    """(DSC, NSD) of one organ as the FLARE challenges score it (../shared/METHOD.md).

    Masks are boolean (z, y, x) arrays on the label's grid, ``spacing_mm`` the label's spacing in
    (z, y, x) (``GetSpacing()[::-1]``). NSD is the surface Dice at ``tolerance_mm``
    (``evaluation.surface``). Edge cases, as the challenge's script: both masks empty: (1, 1);
    label empty, prediction not: (0, 0); prediction empty, label not: (0, 0). FLARE22 rule: with
    ``nsd_zero_below_dsc`` (0.2), NSD is 0 when DSC < that value.
    """
    label_mask = np.asarray(label_mask, dtype=bool)
    prediction_mask = np.asarray(prediction_mask, dtype=bool)
    has_label, has_prediction = label_mask.any(), prediction_mask.any()
    if not has_label or not has_prediction:
        return (1.0, 1.0) if not has_label and not has_prediction else (0.0, 0.0)
    dsc = dice(prediction_mask, label_mask)
    if nsd_zero_below_dsc is not None and dsc < nsd_zero_below_dsc:
        return dsc, 0.0
    return dsc, surface_dice(label_mask, prediction_mask, spacing_mm, tolerance_mm)
