"""The whole method as one straight line: read -> canonical -> localize -> crop -> segment ->
paste -> original orientation. ``Predictor`` builds both networks and loads their weights once,
then segments any number of images.
"""

import json
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import tensorflow as tf

from app import method
from app.geometry import Grid, from_canonical, to_canonical
from app.localization import localization_grid, roi_from_foreground
from app.networks import build_localization_net, build_scn
from app.preprocessing import network_input
from app.segmentation import labels_on_roi, paste, segmentation_grid

DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
LOCALIZATION_WEIGHTS = "localization.weights.h5"
SEGMENTATION_WEIGHTS = "segmentation.weights.h5"
PROVENANCE = "weights.json"


@dataclass(frozen=True)
class PreprocessingSettings:
    """Preprocessing choices that must match how the weights were trained.

    Read from the ``preprocessing`` entry of weights.json; the defaults are ours.
    """

    localization_sigma_mm: float = method.LOCALIZATION_TRAINING_SIGMA_MM
    segmentation_sigma_mm: float = method.SEGMENTATION_SMOOTHING_SIGMA_MM
    crop_padding_hu: float = method.PADDING_HU

    @classmethod
    def from_provenance(cls, provenance):
        values = provenance.get("preprocessing", {})
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass
class CaseResult:
    """Labels on the input grid and what happened on the way."""

    labels: sitk.Image
    roi_index: dict
    roi_mm: dict
    localization_spacing_mm: float
    segmentation_spacing_mm: float
    crop_size: tuple
    seconds: dict


def read_provenance(weights_dir):
    path = Path(weights_dir) / PROVENANCE
    return json.loads(path.read_text()) if path.exists() else {}


class Predictor:
    """Both networks with their weights, loaded once; ``predict`` segments one CT image."""

    def __init__(self, weights_dir=DEFAULT_WEIGHTS_DIR):
        weights_dir = Path(weights_dir)
        for gpu in tf.config.list_physical_devices("GPU"):
            # allocate GPU memory as needed, not all of it up front (organisers sample it)
            tf.config.experimental.set_memory_growth(gpu, True)
        for name in (LOCALIZATION_WEIGHTS, SEGMENTATION_WEIGHTS):
            if not (weights_dir / name).is_file():
                raise FileNotFoundError(f"{weights_dir / name}: weights file missing")
        self.provenance = read_provenance(weights_dir)
        self.settings = PreprocessingSettings.from_provenance(self.provenance)
        self.localization_net = build_localization_net()
        self.localization_net.load_weights(weights_dir / LOCALIZATION_WEIGHTS)
        self.scn = build_scn()
        self.scn.load_weights(weights_dir / SEGMENTATION_WEIGHTS)
        volume = tf.TensorSpec([1, None, None, None, 1], tf.float32)
        # one graph each for all input sizes: tracing per size would cost seconds per case
        self._localize = tf.function(
            lambda x: tf.argmax(self.localization_net(x, training=False), axis=-1) == 1,
            input_signature=[volume])
        self._segment = tf.function(
            lambda x: self.scn(x, training=False)["probabilities"], input_signature=[volume])

    def predict(self, image):
        """Segment a CT (HU) image; returns a ``CaseResult`` whose uint8 labels lie on its grid."""
        seconds = {}
        clock = time.perf_counter()

        def lap(stage):
            nonlocal clock
            now = time.perf_counter()
            seconds[stage] = round(now - clock, 3)
            clock = now

        canonical, orientation = to_canonical(image)
        grid = Grid.of(canonical)
        lap("orientation")

        loc_grid = localization_grid(grid)
        loc_input = network_input(canonical, loc_grid, self.settings.localization_sigma_mm,
                                  method.PADDING_HU)
        lap("localization_preprocessing")
        foreground = self._localize(loc_input[None, ..., None]).numpy()[0]
        roi = roi_from_foreground(foreground, loc_grid, grid)
        lap("localization_network")

        crop_grid = segmentation_grid(grid, roi)
        crop = network_input(canonical, crop_grid, self.settings.segmentation_sigma_mm,
                             self.settings.crop_padding_hu)
        lap("segmentation_preprocessing")
        probabilities = self._segment(crop[None, ..., None]).numpy()[0]
        lap("segmentation_network")

        roi_labels = labels_on_roi(probabilities, crop_grid, roi.grid(grid))
        labels = sitk.GetImageFromArray(paste(roi_labels, roi, grid.size))
        labels.CopyInformation(canonical)
        labels = from_canonical(labels, orientation, image)
        lap("resampling_back")

        low_mm, high_mm = roi.axis_mm(grid)
        return CaseResult(
            labels=labels,
            roi_index={"start_xyz": list(roi.start), "size_xyz": list(roi.size),
                       "orientation": "canonical LPS voxel axes"},
            roi_mm={"low_xyz": np.round(low_mm, 2).tolist(), "high_xyz": np.round(high_mm, 2).tolist(),
                    "extent_xyz": np.round(high_mm - low_mm, 2).tolist()},
            localization_spacing_mm=round(loc_grid.spacing_mm[0], 4),
            segmentation_spacing_mm=round(crop_grid.spacing_mm[0], 4),
            crop_size=crop_grid.size,
            seconds=seconds,
        )
