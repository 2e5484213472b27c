"""A folder cache of prepared training cases, so a resumed run does not prepare them again."""

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from app.geometry import Grid
from training.cases import PreparedCase
from training.coverage import ALL_ORGANS

IMAGES = ("localization_image", "localization_labels", "segmentation_image",
          "segmentation_labels")


def save(case, folder):
    """Write a prepared case into ``folder`` (MetaImage files + meta.json, meta written last)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for field in IMAGES:
        sitk.WriteImage(getattr(case, field), str(folder / f"{field}.mha"))
    meta = {"name": case.name, "image_grid": case.image_grid.__dict__,
            "roi_low_mm": case.roi_low_mm.tolist(), "roi_high_mm": case.roi_high_mm.tolist(),
            "covered": list(case.covered)}
    temporary = folder / "meta.json.partial"
    temporary.write_text(json.dumps(meta))
    temporary.replace(folder / "meta.json")


def load(folder):
    """The prepared case in ``folder``; entries written before coverage existed cover every
    organ (they were all fully labelled)."""
    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    images = {field: sitk.ReadImage(str(folder / f"{field}.mha")) for field in IMAGES}
    grid = Grid(**{k: tuple(v) for k, v in meta["image_grid"].items()})
    return PreparedCase(meta["name"], grid, **images, roi_low_mm=np.array(meta["roi_low_mm"]),
                        roi_high_mm=np.array(meta["roi_high_mm"]),
                        covered=tuple(meta.get("covered", ALL_ORGANS)))


def cached(cache_dir, name, prepare):
    """The prepared case ``name`` from the cache, or ``prepare()`` it and store it there."""
    folder = Path(cache_dir) / name
    if (folder / "meta.json").is_file():
        return load(folder)
    case = prepare()
    save(case, folder)
    return case
