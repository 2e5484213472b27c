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

    Read from the ``preprocessing`` entry of weights.json; the defaults are ours. Published
    EfficientSCN weights (``python -m app.import_weights``) need ``PUBLISHED``: area downsampling
    without smoothing for the localization input, crop padding 0 HU for the segmentation input.
    """

    localization_sigma_mm: float = method.LOCALIZATION_TRAINING_SIGMA_MM
    segmentation_sigma_mm: float = method.SEGMENTATION_SMOOTHING_SIGMA_MM
    crop_padding_hu: float = method.PADDING_HU
    localization_downsampling: str = "gaussian"

    def __post_init__(self):
        if self.localization_downsampling not in method.LOCALIZATION_DOWNSAMPLING:
            raise ValueError(f"preprocessing localization_downsampling "
                             f"{self.localization_downsampling!r} is not one of "
                             f"{', '.join(method.LOCALIZATION_DOWNSAMPLING)}")

    @classmethod
    def from_provenance(cls, provenance):
        """Settings from a weights.json dict; an unknown setting is an error, not ignored."""
        values = provenance.get("preprocessing", {})
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown preprocessing settings {sorted(unknown)}: these weights "
                             "need preprocessing this version cannot do")
        return cls(**values)


# Which settings belong to which network: a weights folder may combine networks of two origins.
NETWORK_SETTINGS = {
    "localization": ("localization_downsampling", "localization_sigma_mm"),
    "segmentation": ("segmentation_sigma_mm", "crop_padding_hu"),
}
PUBLISHED = PreprocessingSettings(  # the published inference (METHOD.md, stages 1 and 2)
    localization_sigma_mm=0.0, localization_downsampling="area",
    segmentation_sigma_mm=method.SEGMENTATION_SMOOTHING_SIGMA_MM,
    crop_padding_hu=method.PUBLISHED_CROP_PADDING_HU)


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
    """The weights.json of a weights folder as a dict ({} when there is none)."""
    path = Path(weights_dir) / PROVENANCE
    return json.loads(path.read_text()) if path.exists() else {}


def read_settings(weights_dir):
    """The ``PreprocessingSettings`` of a weights folder; errors name its weights.json."""
    try:
        return PreprocessingSettings.from_provenance(read_provenance(weights_dir))
    except (ValueError, TypeError) as error:
        raise ValueError(f"{Path(weights_dir) / PROVENANCE}: {error}") from None


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
        self.settings = read_settings(weights_dir)
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

    def localization_input(self, canonical, loc_grid):
        """The localization network's input (z, y, x) float32, preprocessed as the weights need."""
        return network_input(canonical, loc_grid, self.settings.localization_sigma_mm,
                             method.PADDING_HU, self.settings.localization_downsampling)

    def roi(self, loc_input, loc_grid, image_grid):
        """Stage 1 on a prepared input: the ROI (``Roi``, canonical image voxels)."""
        foreground = self._localize(loc_input[None, ..., None]).numpy()[0]
        return roi_from_foreground(foreground, loc_grid, image_grid, network_input=loc_input)

    def localize(self, canonical):
        """Stage 1 alone on an image in canonical orientation: its ``Roi``."""
        grid = Grid.of(canonical)
        loc_grid = localization_grid(grid)
        return self.roi(self.localization_input(canonical, loc_grid), loc_grid, grid)

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
        loc_input = self.localization_input(canonical, loc_grid)
        lap("localization_preprocessing")
        roi = self.roi(loc_input, loc_grid, grid)
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
