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
IGNORE_IMAGES = ("localization_ignore", "segmentation_ignore")  # pseudo-labelled cases only


def save(case, folder):
    """Write a prepared case into ``folder`` (MetaImage files + meta.json, meta written last);
    the ignore masks only where the case has them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ignore = case.segmentation_ignore is not None
    for field in IMAGES + (IGNORE_IMAGES if ignore else ()):
        sitk.WriteImage(getattr(case, field), str(folder / f"{field}.mha"))
    meta = {"name": case.name, "image_grid": case.image_grid.__dict__,
            "roi_low_mm": case.roi_low_mm.tolist(), "roi_high_mm": case.roi_high_mm.tolist(),
            "covered": list(case.covered), "ignore": ignore}
    temporary = folder / "meta.json.partial"
    temporary.write_text(json.dumps(meta))
    temporary.replace(folder / "meta.json")


def load(folder):
    """The prepared case in ``folder``; entries written before coverage existed cover every
    organ (they were all fully labelled), and those written before ignore masks existed have
    none."""
    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    fields = IMAGES + (IGNORE_IMAGES if meta.get("ignore") else ())
    images = {field: sitk.ReadImage(str(folder / f"{field}.mha")) for field in fields}
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
