"""Validation during training: DSC of the EMA weights on unaugmented held-out cases."""

import numpy as np

from app import method
from app.geometry import Grid
from app.localization import Roi
from app.segmentation import segmentation_grid
from training import augment

NSD_TOLERANCE_MM = 1.0  # the challenge's tolerance (../shared/METHOD.md)


def dice(prediction, reference):
    """DSC of two boolean arrays; 1.0 when both are empty."""
    total = prediction.sum() + reference.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(prediction, reference).sum() / total)


def _roi_of(case):
    """The case's training ROI as a box of voxels of its segmentation cache image."""
    grid = Grid.of(case.segmentation_image)
    spacing = np.asarray(grid.spacing_mm)
    start = np.clip(np.ceil(case.roi_low_mm / spacing), 0, None).astype(int)
    stop = np.minimum(np.floor(case.roi_high_mm / spacing).astype(int) + 1, grid.size)
    return grid, Roi(tuple(int(a) for a in start), tuple(int(n) for n in stop - start))


def segmentation_scores(model, cases, nsd_tolerance_mm=NSD_TOLERANCE_MM):
    """Mean DSC per organ over ``cases`` on the inference crop of each training ROI, and the
    mean NSD (``NAME_nsd``) at ``nsd_tolerance_mm`` on that crop's grid; each organ over the
    cases whose labels cover it (``case.covered``) and hold it."""
    from evaluation.metrics import challenge_scores

    scores = {name: [] for name in method.LABELS.values()}
    surface = {name: [] for name in method.LABELS.values()}
    rng = np.random.default_rng(0)
    for case in cases:
        grid, roi = _roi_of(case)
        crop = segmentation_grid(grid, roi)
        none = augment.AugmentationRanges.none()
        transform = augment.random_transform(rng, crop, crop.origin_mm, none)
        image, labels = augment.resample_pair(case.segmentation_image, case.segmentation_labels,
                                              crop, transform, rng, none)
        probabilities = model(image[None, ..., None], training=False)["probabilities"]
        prediction = np.argmax(np.asarray(probabilities, dtype=np.float32)[0], axis=-1)
        for label, name in method.LABELS.items():
            if label in case.covered and (labels == label).any():
                scores[name].append(dice(prediction == label, labels == label))
                surface[name].append(challenge_scores(
                    labels == label, prediction == label, crop.spacing_mm[::-1],
                    nsd_tolerance_mm)[1])
    out = {name: round(float(np.mean(v)), 4) for name, v in scores.items() if v}
    out.update({f"{name}_nsd": round(float(np.mean(v)), 4) for name, v in surface.items() if v})
    return out


def localization_scores(model, cases):
    """Mean foreground DSC and recall on the localization grid. A partly labelled case gives
    recall only: its unlabelled organs are foreground its labels do not show."""
    rng = np.random.default_rng(0)
    dsc, recall = [], []
    for case in cases:
        image, foreground = augment.localization_sample(case, rng,
                                                        augment.AugmentationRanges.none())
        logits = np.asarray(model(image[None, ..., None], training=False), dtype=np.float32)[0]
        predicted = logits[..., 1] > logits[..., 0]
        if set(case.covered) >= set(method.LABELS):
            dsc.append(dice(predicted, foreground > 0))
        recall.append(float((predicted & (foreground > 0)).sum() / max(1, foreground.sum())))
    return {**({"foreground_dsc": round(float(np.mean(dsc)), 4)} if dsc else {}),
            "foreground_recall": round(float(np.mean(recall)), 4)}


def validate(model, ema, cases, stage):
    """Scores of the EMA weights; the model's own weights are restored afterwards."""
    current = [v.numpy() for v in model.trainable_variables]
    for variable, average in zip(model.trainable_variables, ema):
        variable.assign(average)
    try:
        if stage == "segmentation":
            return segmentation_scores(model, cases)
        return localization_scores(model, cases)
    finally:
        for variable, value in zip(model.trainable_variables, current):
            variable.assign(value)
