"""Pseudo-labels on unlabelled CT: a FLARE-layout folder that training reads as a source.

    python -m training.pseudo_label IMAGES --weights DIR --out DIR [--min-probability P]
                                    [--second-weights DIR2] [--plausible-only]
                                    [--precision {float32,bfloat16}]

Every case that app's input discovery finds in IMAGES (app.io.survey: FLARE ``NAME_0000.nii.gz``,
other .nii.gz/.nii/.mha/.mhd/.nrrd files, DICOM series folders) is segmented with the weights of
``--weights``, and OUT receives

- ``images/NAME_0000.nii.gz``: the input, copied (a .nii.gz input byte for byte; another format
  written as NIfTI from the image that was segmented). A copy, not a symbolic link: the folder
  must stay whole when it is moved, archived with its training round or copied to another
  machine, where a link would dangle; it costs the inputs' disk space once;
- ``labels/NAME.nii.gz``: the predicted labels, uint8, on the input's grid (the labels
  ``app.predictor.Predictor.predict`` gives);
- ``ignore/NAME.nii.gz``: uint8, 1 where the label is uncertain and training must ignore the
  voxel: the largest class probability (the SCN's probabilities resampled linearly onto the
  input grid, whose argmax the label is) is below ``--min-probability``, or, with
  ``--second-weights``, the second weights' label differs. Outside the ROI of the first weights
  the voxels are background with certainty (the localization ROI holds the organs: inference
  writes background there without a probability) and are never ignored by the threshold;
- ``pseudo_labels.json``: the weights folders with a summary of their weights.json, the
  thresholds, and per case the organ volumes (mL), the organs its labels cover, the ignored
  share and the files' SHA-256 (training names its cache entries by them, so a new round is
  never served an old cache).

Every organ is covered unless ``--plausible-only``: then a case covers only the organs whose
predicted volume lies in the plausible adult range (``PLAUSIBLE_ADULT_ML``). Training leaves an
uncovered organ out of that case's losses, as for a partial label (training/losses.py): a
segmentation too small or too large to be right is neither learned nor unlearned, and the
voxels the network missed are not taught as background.

A case is listed in pseudo_labels.json only once its three files are complete: they are staged
in a hidden temporary folder of OUT, verified, then renamed into place (image last), and the
json is replaced atomically after each case. A bad input fails with a message naming the file
and the other cases go on. Exit status: 0 all cases written, 1 some failed, 2 nothing done (no
case in IMAGES, weights missing or invalid, OUT not writable).
"""

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from app import io as image_io
from app import method
from app.cli import unit_interval
from app.geometry import Grid, from_canonical, linear_positions, to_canonical
from app.localization import localization_grid
from app.precision import PRECISIONS
from app.segmentation import paste

# Measured with the shipped weights on 2 labelled real CT and 3 generated cases (docs/training.md,
# "Pseudo-labels"): 0.9 ignores 76 % of the wrong voxels and 17 % of the organ voxels, leaving
# 2.7 % of the kept organ voxels wrong (9.5 % ignoring none); 0.95 catches 87 % but ignores 30 %.
DEFAULT_MIN_PROBABILITY = 0.9
# Adult organ volumes in mL (both kidneys together), the ranges of the pseudo-label issue (#27);
# keys as app.cli.organ_volumes_ml names the organs.
PLAUSIBLE_ADULT_ML = {"liver": (1200.0, 2200.0), "kidney": (250.0, 450.0),
                      "spleen": (100.0, 400.0), "pancreas": (50.0, 110.0)}
RECORD = "pseudo_labels.json"
FOLDERS = ("images", "labels", "ignore")
IMAGE_SUFFIX = image_io.FLARE_SUFFIX


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m training.pseudo_label",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("images", type=Path, help="folder of unlabelled CT (app's input rules)")
    parser.add_argument("--weights", type=Path, default=None,
                        help="weights folder that labels (default: weights/)")
    parser.add_argument("--out", type=Path, required=True,
                        help="pseudo-label folder: images/, labels/, ignore/, " + RECORD)
    parser.add_argument("--min-probability", type=unit_interval, default=DEFAULT_MIN_PROBABILITY,
                        help="voxels whose largest class probability is below this are ignored "
                             f"by training (default {DEFAULT_MIN_PROBABILITY})")
    parser.add_argument("--second-weights", type=Path, default=None,
                        help="a second weights folder: voxels where its label differs are "
                             "ignored too")
    parser.add_argument("--plausible-only", action="store_true",
                        help="a case's labels cover only the organs whose predicted volume is "
                             "a plausible adult one (liver 1,200-2,200 mL, kidneys together "
                             "250-450, spleen 100-400, pancreas 50-110); training leaves the "
                             "others out of its losses. For adult cohorts")
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="the networks' precision (default: app's, bfloat16 on CPUs with "
                             "native bfloat16)")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Labels and their confidence
# ----------------------------------------------------------------------------------------------


@dataclass
class Prediction:
    """One image's labels and, inside the ROI, the largest class probability per voxel.

    ``labels``: uint8 on the input's grid (``Predictor.predict``'s labels). ``roi_confidence``:
    float32 (z, y, x) on the ROI of the canonical (LPS) image, ``roi`` its box; outside it the
    label is background with certainty. ``orientation``: the input's orientation code.
    """

    labels: sitk.Image
    roi_confidence: np.ndarray
    roi: object  # app.localization.Roi
    canonical_grid: Grid
    orientation: str


def predict_with_confidence(predictor, image):
    """``Predictor.predict``'s labels of a CT (HU) image, and their confidence.

    The predictor's own steps (localization input, ROI, SCN crop and probabilities, the labels
    by ``Predictor.roi_labels``), in ``predict``'s order; besides the labels, the
    probabilities give the largest class probability on the ROI (``max_probability_on_roi``).
    """
    canonical, orientation = to_canonical(image)
    grid = Grid.of(canonical)
    loc_grid = localization_grid(grid)
    roi = predictor.roi(predictor.localization_input(canonical, loc_grid), loc_grid, grid)
    crop_grid, crop = predictor.segmentation_input(canonical, roi)
    probabilities = predictor.segmentation_probabilities(crop)
    roi_grid = roi.grid(grid)
    roi_labels = predictor.roi_labels(probabilities, crop_grid, roi, grid)
    labels = sitk.GetImageFromArray(paste(roi_labels, roi, grid.size))
    labels.CopyInformation(canonical)
    labels = from_canonical(labels, orientation, image)
    confidence = max_probability_on_roi(probabilities, crop_grid, roi_grid)
    return Prediction(labels, confidence, roi, grid, orientation)


def max_probability_on_roi(probabilities, crop_grid, roi_grid):
    """Largest class probability at each ROI voxel, float32 (z, y, x) on ``roi_grid``.

    ``probabilities``: (z, y, x, classes) on ``crop_grid``, resampled linearly as
    ``labels_on_roi`` resamples them (clamped at the outer crop voxels; float64), whose argmax
    is the label. An ROI voxel outside the crop (the crop is larger than the ROI, so none in
    practice) gets 1.0: its label is background by definition. One output slice at a time.
    """
    if not np.allclose(crop_grid.direction, roi_grid.direction, atol=1e-6):
        raise ValueError("the crop and the ROI grid must share their direction")
    probabilities = np.asarray(probabilities)
    first_mm = crop_grid.physical_to_axis_mm(roi_grid.origin_mm)
    (lower_x, fx, inside_x), (lower_y, fy, inside_y), (lower_z, fz, inside_z) = [
        linear_positions(crop_grid.size[a], crop_grid.spacing_mm[a], first_mm[a],
                         roi_grid.size[a], roi_grid.spacing_mm[a]) for a in range(3)]
    upper = [np.minimum(lower + 1, n - 1) for lower, n in
             zip((lower_z, lower_y, lower_x), probabilities.shape[:3])]
    confidence = np.ones(tuple(reversed(roi_grid.size)), np.float32)
    wy, wx = fy[:, None, None], fx[None, :, None]
    inside_plane = inside_y[:, None] & inside_x[None, :]
    for z in np.flatnonzero(inside_z):
        plane = ((1 - fz[z]) * probabilities[lower_z[z]].astype(np.float64)
                 + fz[z] * probabilities[upper[0][z]])  # (y, x, classes) at crop resolution
        rows = (1 - wy) * plane[lower_y] + wy * plane[upper[1]]  # (roi y, crop x, classes)
        values = (1 - wx) * rows[:, lower_x] + wx * rows[:, upper[2]]
        confidence[z] = np.where(inside_plane, values.max(axis=-1), 1.0)
    return confidence


def uncertain_mask(prediction, min_probability, second_labels=None):
    """uint8 image on the input's grid: 1 where the ROI's confidence is below
    ``min_probability`` or ``second_labels`` (an image on the same grid) differ, else 0."""
    roi_uncertain = (prediction.roi_confidence < min_probability).astype(np.uint8)
    mask = sitk.GetImageFromArray(paste(roi_uncertain, prediction.roi,
                                        prediction.canonical_grid.size))
    mask.SetSpacing(prediction.canonical_grid.spacing_mm)
    mask.SetOrigin(prediction.canonical_grid.origin_mm)
    mask.SetDirection(prediction.canonical_grid.direction)
    mask = from_canonical(mask, prediction.orientation, prediction.labels)
    if second_labels is not None:
        differ = sitk.GetArrayViewFromImage(second_labels) != sitk.GetArrayViewFromImage(
            prediction.labels)
        array = sitk.GetArrayFromImage(mask) | differ.astype(np.uint8)
        mask = sitk.GetImageFromArray(array)
        mask.CopyInformation(prediction.labels)
    return mask


# ----------------------------------------------------------------------------------------------
# The folder
# ----------------------------------------------------------------------------------------------


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_summary(weights_dir):
    """What pseudo_labels.json records of a weights folder: its path, its files' SHA-256 and the
    identifying parts of its weights.json (date, and per network export, iterations, origin and
    snapshot)."""
    from app.weights import LOCALIZATION_WEIGHTS, SEGMENTATION_WEIGHTS, read_provenance

    weights_dir = Path(weights_dir)
    provenance = read_provenance(weights_dir)
    summary = {"folder": str(weights_dir.resolve()),
               "sha256": {name: sha256(weights_dir / name)
                          for name in (LOCALIZATION_WEIGHTS, SEGMENTATION_WEIGHTS)}}
    if "date" in provenance:
        summary["date"] = provenance["date"]
    for network in method.NETWORKS:
        entry = provenance.get(network)
        if isinstance(entry, dict):
            summary[network] = {key: entry[key] for key in
                                ("export", "iterations", "origin", "snapshot") if key in entry}
    return summary


def write_case(out, name, case, image, labels, ignore):
    """Write the three files of a case into ``out`` all or nothing: staged in a hidden
    temporary folder (``app.io.partial_name``, so a killed run's leftovers are removed by the
    next), flushed and verified, then renamed into place: ignore, labels, image last."""
    staging = out / image_io.partial_name()
    targets = {"ignore": out / "ignore" / f"{name}.nii.gz",
               "labels": out / "labels" / f"{name}.nii.gz",
               "image": out / "images" / f"{name}{IMAGE_SUFFIX}"}
    try:
        staging.mkdir()
        for key, data in (("ignore", ignore), ("labels", labels)):
            staged = staging / f"{key}.nii.gz"
            with image_io.quiet_itk():
                sitk.WriteImage(data, str(staged), useCompression=True)
            image_io.sync(staged)
            image_io.verify_written(staged, data)
        staged_image = staging / "image.nii.gz"
        if case.format == "nii.gz":
            shutil.copyfile(case.path, staged_image)
        else:
            with image_io.quiet_itk():
                sitk.WriteImage(image, str(staged_image), useCompression=True)
        image_io.sync(staged_image)
        for key in ("ignore", "labels", "image"):
            os.replace(staging / f"{key}.nii.gz", targets[key])
    except (OSError, RuntimeError) as error:
        reason = image_io.reader_message(error) if isinstance(error, RuntimeError) else str(error)
        raise image_io.OutputError(f"{out}: case {name} cannot be written: {reason}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return targets


def write_record(path, record):
    """Replace the json ``path`` atomically by ``record``."""
    temporary = path.parent / f"{image_io.partial_name()}.json"
    temporary.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(temporary, path)


def plausible_organs(volumes_ml):
    """Names of the organs whose volume (mL, ``organ_volumes_ml``) lies in PLAUSIBLE_ADULT_ML."""
    return [organ for organ, (low, high) in PLAUSIBLE_ADULT_ML.items()
            if low <= volumes_ml[organ] <= high]


def pseudo_label_case(predictor, second, case, out, min_probability, plausible_only=False):
    """Read, segment and write one case; returns its pseudo_labels.json entry."""
    from app.cli import organ_volumes_ml

    start = time.perf_counter()
    image, warnings = image_io.read_case(case)
    prediction = predict_with_confidence(predictor, image)
    second_labels = second.predict(image).labels if second is not None else None
    ignore = uncertain_mask(prediction, min_probability, second_labels)
    files = write_case(out, case.name, case, image, prediction.labels, ignore)
    labels = sitk.GetArrayViewFromImage(prediction.labels)
    ignored = sitk.GetArrayViewFromImage(ignore).astype(bool)
    organ = labels > 0
    volumes = organ_volumes_ml(prediction.labels)
    entry = {
        "input": str(case.path),
        "image": str(files["image"].relative_to(out)),
        "labels": str(files["labels"].relative_to(out)),
        "ignore": str(files["ignore"].relative_to(out)),
        "size_xyz": list(image.GetSize()),
        "volumes_ml": volumes,
        "covered": plausible_organs(volumes) if plausible_only else list(method.LABELS.values()),
        "ignored_share": round(float(ignored.mean()), 6),
        "ignored_share_of_organ_voxels": round(float(ignored[organ].mean()), 6)
        if organ.any() else None,
        "roi_index": {"start_xyz": list(prediction.roi.start),
                      "size_xyz": list(prediction.roi.size),
                      "orientation": "canonical LPS voxel axes"},
        "sha256": {key: sha256(files[key]) for key in ("labels", "ignore")},
        "seconds": round(time.perf_counter() - start, 2),
    }
    if second_labels is not None:
        entry["disagreement_share"] = round(float(np.mean(
            sitk.GetArrayViewFromImage(second_labels) != labels)), 6)
    if warnings:
        entry["warnings"] = warnings
    return entry


def run(images, out, weights_dir=None, min_probability=DEFAULT_MIN_PROBABILITY,
        second_weights=None, precision=None, plausible_only=False):
    """Pseudo-label every case of ``images`` into ``out``; returns the record written to
    ``out/pseudo_labels.json`` (failed cases under "failed" with their message).

    Raises FileNotFoundError / NotADirectoryError / PermissionError / ValueError before any work
    when there is no case, ``out`` is not writable or the weights are missing or invalid."""
    from app.predictor import Predictor
    from app.weights import DEFAULT_WEIGHTS_DIR

    out = Path(out)
    cases, skipped = image_io.survey(images)
    for item in skipped:
        print(f"skipped: {item.path}: {item.reason}", file=sys.stderr)
    if not cases:
        raise FileNotFoundError(image_io.nothing_to_segment(images, skipped))
    image_io.check_writable(out)
    for folder in FOLDERS:
        (out / folder).mkdir(exist_ok=True)
    image_io.remove_stale_partials(out)
    weights_dir = Path(weights_dir or DEFAULT_WEIGHTS_DIR)
    predictor = Predictor(weights_dir, precision=precision)
    second = Predictor(second_weights, precision=precision) if second_weights else None
    record = {
        "weights": weights_summary(weights_dir),
        "second_weights": weights_summary(second_weights) if second_weights else None,
        "precision": predictor.precision,
        "min_probability": min_probability,
        # the labels are predict's: an organ's pieces under this fraction of its largest dropped
        "min_island_fraction": predictor.min_island_fraction,
        "ignored": "largest class probability (linearly resampled onto the input grid) below "
                   "min_probability" + (", or the second weights' label differs"
                                        if second_weights else ""),
        "outside_roi": "background with certainty (never ignored by the threshold)",
        "covered": ({"rule": "plausible adult volume", "ranges_ml": PLAUSIBLE_ADULT_ML}
                    if plausible_only else {"rule": "every organ"}),
        "cases": {},
        "failed": {},
    }
    path = out / RECORD
    for case in cases:
        try:
            entry = pseudo_label_case(predictor, second, case, out, min_probability,
                                      plausible_only)
        except Exception as error:  # one bad case must not stop the rest
            from app.cli import with_path

            record["failed"][case.name] = with_path(case, error)
            print(f"{case.name}: FAILED: {record['failed'][case.name]}", file=sys.stderr)
        else:
            record["cases"][case.name] = entry
            volumes = ", ".join(f"{k} {v:.0f}" for k, v in entry["volumes_ml"].items())
            uncovered = [organ for organ in entry["volumes_ml"] if organ not in entry["covered"]]
            print(f"{case.name}: {volumes} mL"
                  + (f" (not covered: {', '.join(uncovered)})" if uncovered else "")
                  + f"; ignored {100 * entry['ignored_share']:.2f} % of the voxels "
                  f"({entry['seconds']:.1f} s)", flush=True)
        write_record(path, record)
    return record


def read_folder(folder):
    """[(name, image path, label path, ignore path, {"labels": sha256, "ignore": sha256},
    covered label ids)] of a pseudo-label folder, the cases its pseudo_labels.json lists (files a
    failed or older run left are not cases; a case recorded without "covered" covers every
    organ, one whose list is empty none). Raises ValueError naming the file when it or a listed
    file is missing or a case's coverage is not a list of organs."""
    from training.coverage import ALL_ORGANS, parse_organs

    folder = Path(folder)
    path = folder / RECORD
    if not path.is_file():
        raise ValueError(f"{path}: missing: --pseudo takes a folder written by "
                         "python -m training.pseudo_label")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        entries = record["cases"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a pseudo-label record ({error})") from None
    cases = []
    for name, entry in sorted(entries.items()):
        files = [folder / entry[key] for key in ("image", "labels", "ignore")]
        for file in files:
            if not file.is_file():
                raise ValueError(f"{path}: case {name}: {file} is missing")
        covered = entry.get("covered")
        if covered is None:
            covered = ALL_ORGANS
        elif covered == []:  # no organ plausible: the case teaches nothing
            covered = ()
        else:  # a DeclarationError (a ValueError) names the file, the case and the value
            covered = parse_organs(covered, f"{path}, case {name!r}, \"covered\"")
        cases.append((name, *files, entry["sha256"], covered))
    return cases


def main(argv=None):
    args = parse_args(argv)
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        record = run(args.images, args.out, args.weights, args.min_probability,
                     args.second_weights, args.precision, args.plausible_only)
    except (FileNotFoundError, NotADirectoryError, PermissionError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    failed = sorted(record["failed"])
    print(f"{len(record['cases'])} written, {len(failed)} failed"
          + (f" ({', '.join(failed)})" if failed else "") + f": {args.out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
