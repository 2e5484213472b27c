"""A weights folder as the Predictor reads it: the two networks' files and weights.json, whose
``preprocessing`` entry says how the networks' inputs must be prepared.

Writing weights folders (training snapshots, averages, the published weights' import) is the
business of release/, not of the container.
"""

import json
from dataclasses import dataclass, fields
from pathlib import Path

from app import method

DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
LOCALIZATION_WEIGHTS = "localization.weights.h5"
SEGMENTATION_WEIGHTS = "segmentation.weights.h5"
PROVENANCE = "weights.json"
WEIGHTS_FILES = {"localization": LOCALIZATION_WEIGHTS, "segmentation": SEGMENTATION_WEIGHTS}


@dataclass(frozen=True)
class PreprocessingSettings:
    """Preprocessing choices that must match how the weights were trained.

    Read from the ``preprocessing`` entry of weights.json; the defaults are ours. Published
    EfficientSCN weights (``python -m release.import_weights``) need ``PUBLISHED``: area
    downsampling without smoothing for the localization input, crop padding 0 HU for the
    segmentation input.
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
