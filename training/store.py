"""A folder cache of prepared training cases, so a resumed run does not prepare them again."""

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from app.geometry import Grid
from training.cases import PreparedCase, whole_hu
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


def load(folder, stage=None):
    """The prepared case in ``folder``; entries written before coverage existed cover every
    organ (they were all fully labelled), and those written before ignore masks existed have
    none. With ``stage`` ("localization" or "segmentation") only that network's images are read
    and the other's are None: a localization run then holds a few MB per case instead of the
    2 mm images around the organs. Images of entries written in float32 are held in int16
    (``cases.whole_hu``), as new entries are written."""
    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    fields = IMAGES + (IGNORE_IMAGES if meta.get("ignore") else ())
    images = {field: None for field in fields}
    images.update({field: sitk.ReadImage(str(folder / f"{field}.mha")) for field in fields
                   if stage is None or field.startswith(stage)})
    for field in ("localization_image", "segmentation_image"):
        if images[field] is not None and images[field].GetPixelID() != sitk.sitkInt16:
            images[field] = as_whole_hu(images[field])  # an entry written in float32
    grid = Grid(**{k: tuple(v) for k, v in meta["image_grid"].items()})
    return PreparedCase(meta["name"], grid, **images, roi_low_mm=np.array(meta["roi_low_mm"]),
                        roi_high_mm=np.array(meta["roi_high_mm"]),
                        covered=tuple(meta.get("covered", ALL_ORGANS)))


def as_whole_hu(image):
    """A float HU image as ``cases.whole_hu`` holds it (int16), with its geometry."""
    out = sitk.GetImageFromArray(whole_hu(sitk.GetArrayViewFromImage(image)))
    out.CopyInformation(image)
    return out


def held_bytes(cases):
    """Bytes of the images (and labels and ignore masks) that prepared ``cases`` hold in memory:
    what a training run keeps for its whole length."""
    return sum(sitk.GetArrayViewFromImage(image).nbytes for case in cases
               for field in IMAGES + IGNORE_IMAGES
               if (image := getattr(case, field)) is not None)


def cached(cache_dir, name, prepare, stage=None):
    """The prepared case ``name`` from the cache (only ``stage``'s images, see ``load``), or
    ``prepare()`` it and store it there whole."""
    folder = Path(cache_dir) / name
    if not (folder / "meta.json").is_file():
        save(prepare(), folder)
    return load(folder, stage)
