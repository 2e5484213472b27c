"""Score a weights folder on unseen generated cases, on the real CT of ../shared/data and on
renderings of the held-out real anatomy.

DSC and NSD at 1 mm (the FLARE21 protocol, evaluation.metrics.challenge_scores) per organ present
in the reference; for partly labelled real CT (../shared/data/partial, its labelled.json) only
the organs the case covers.

    python -m release.score_weights [--weights weights] [--cases 10]
                                       [--anatomy ../shared/anatomy [--anatomy-slabs]] [--update]
                                       [--json FILE] [--min-island-fraction F]

Generated test cases use seeds that training never uses (training/train.py draws its cases from
seeds 1,000,000+ and 2,000,000+). With ``--anatomy`` the label maps that training holds out
(training.train.anatomy_split) are rendered without augmentation, on seeds training never uses,
and scored; with ``--anatomy-slabs`` also a thin partial scan cut from each of them: 11 axial
slices of 5 mm (a 5 mm slice profile) through the pancreas, as thick-slice partial scans come
(``thick_slab``), scored as ``anatomy_held_out_slabs``. With ``--update`` the scores are written
into the folder's weights.json.
"""

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from app import method
from app.geometry import IDENTITY_DIRECTION, Grid, image_on_grid, resample
from app.predictor import Predictor
from app.weights import DEFAULT_WEIGHTS_DIR, PROVENANCE
from evaluation.metrics import challenge_scores, same_grid
from release.roi_coverage import (ANATOMY_TEST_SEED_OFFSET, SHARED_DATA, anatomy_cases,
                                     labels_on_image_grid, real_cases)
from training.coverage import FOLDER_KEY, folder_declarations

TEST_SEED_OFFSET = 3_000_000


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS_DIR)
    parser.add_argument("--cases", type=int, default=10,
                        help="unseen generated cases (0: none, e.g. to score renderings only)")
    parser.add_argument("--in-plane-size", type=int, default=512)
    parser.add_argument("--anatomy", type=Path, default=None,
                        help="label-map folder: also score renderings of its held-out maps")
    parser.add_argument("--anatomy-slabs", action="store_true",
                        help="with --anatomy: also score thin thick-slice partial scans cut from "
                             "the renderings (11 slices of 5 mm through the pancreas)")
    parser.add_argument("--update", action="store_true", help="write scores into weights.json")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the scores to this file (for release.shipping_rule)")
    parser.add_argument("--min-island-fraction", type=float, default=method.MIN_ISLAND_FRACTION,
                        help="drop each organ's pieces smaller than this fraction of its "
                             "largest (Predictor's min_island_fraction; 0: the plain argmax)")
    args = parser.parse_args(argv)
    if args.cases < 0:
        parser.error(f"--cases: {args.cases}, must be >= 0")
    if args.anatomy_slabs and args.anatomy is None:
        parser.error("--anatomy-slabs scores renderings of --anatomy: give both")
    return args


NSD_TOLERANCE_MM = 1.0
# Thin partial scans as real CT has them (11 slices of 5 mm): a slab through the pancreas, the
# organ such scans lose most.
SLAB_SLICES = 11
SLAB_THICKNESS_MM = 5.0
SLAB_CENTRE_LABEL = 4


def organ_scores(prediction, reference, organs=None):
    """{organ: {"dsc", "nsd"}} for the organs present in ``reference`` (same grid required),
    only those named in ``organs`` when given (a partly labelled reference)."""
    if not same_grid(prediction, reference):
        raise ValueError("prediction and reference lie on different grids")
    predicted = sitk.GetArrayViewFromImage(prediction)
    expected = sitk.GetArrayViewFromImage(reference)
    spacing_mm = reference.GetSpacing()[::-1]
    scores = {}
    for label, name in method.LABELS.items():
        if (organs is None or name in organs) and (expected == label).any():
            dsc, nsd = challenge_scores(expected == label, predicted == label, spacing_mm,
                                        NSD_TOLERANCE_MM)
            scores[name] = {"dsc": round(dsc, 4), "nsd": round(nsd, 4)}
    return scores


def summarise(per_case, metric):
    """Mean, std and count of ``metric`` per organ over cases that contain the organ."""
    summary = {}
    for name in method.LABELS.values():
        values = [scores[name][metric] for scores in per_case if name in scores]
        if values:
            summary[name] = {"mean": round(float(np.mean(values)), 4),
                             "std": round(float(np.std(values)), 4), "cases": len(values)}
    return summary


def score_generated(predictor, cases, in_plane_size):
    from synthetic import generate_case

    per_case, seconds = [], []
    for index in range(cases):
        image, labels = generate_case(TEST_SEED_OFFSET + index, in_plane_size=in_plane_size)
        start = time.perf_counter()
        output = predictor.predict(image).labels
        seconds.append(time.perf_counter() - start)
        per_case.append(organ_scores(output, labels))
        print(f"generated {index}: size {image.GetSize()}, " + format_scores(per_case[-1]),
              flush=True)
    return {"cases": cases, "seeds": f"{TEST_SEED_OFFSET}..{TEST_SEED_OFFSET + cases - 1}",
            "in_plane_size": in_plane_size, "dsc": summarise(per_case, "dsc"),
            f"nsd_{NSD_TOLERANCE_MM:g}mm": summarise(per_case, "nsd"),
            "mean_predict_seconds": round(float(np.mean(seconds)), 2) if seconds else None}


def format_scores(scores):
    return ", ".join(f"{k} DSC {v['dsc']:.3f} NSD {v['nsd']:.3f}" for k, v in scores.items())


def score_real(predictor):
    """DSC and NSD on the real CT of ../shared/data (labels compared in physical space)."""
    results = {}
    for name, image, reference in real_cases():
        output = predictor.predict(image).labels
        # ts_dicom's labels are stored with a flipped axis: compare on the prediction's grid
        results[name] = organ_scores(output, labels_on_image_grid(reference, output))
    for name, image, reference, organs in partial_cases():
        output = predictor.predict(image).labels
        results[name] = organ_scores(output, labels_on_image_grid(reference, output), organs)
    for name, scores in results.items():
        print(f"real {name}: " + format_scores(scores))
    return results


def partial_cases(shared_data=SHARED_DATA):
    """(name, image, labels, names of the organs covered) of the partly labelled real CT: the
    cases of ``shared_data/partial`` its labelled.json declares (training.coverage)."""
    from training.cases import case_coverage

    folder = shared_data / "partial"
    if not (folder / "labelled.json").is_file():
        return
    declared = folder_declarations(folder)
    for name, covered in sorted(case_coverage(folder).items()):
        if name in declared or FOLDER_KEY in declared:
            yield (name, sitk.ReadImage(str(folder / "images" / f"{name}_0000.nii.gz")),
                   sitk.ReadImage(str(folder / "labels" / f"{name}.nii.gz")),
                   tuple(method.LABELS[label] for label in covered))


def thick_slab(image, labels, slices=SLAB_SLICES, thickness_mm=SLAB_THICKNESS_MM,
               centre_label=SLAB_CENTRE_LABEL):
    """(image, labels) of a thin partial scan cut from a whole one (any grid and direction):
    ``slices`` axial slices ``thickness_mm`` apart, each with a Gaussian slice profile of that
    full width at half maximum (the scan's own slice spacing counted as width it already has),
    centred along the patient's z on the centroid of the ``centre_label`` organ (of all organs
    where the scan has none of it). The slab is axis-aligned (identity direction) over the
    scan's in-plane extent at its finest in-plane spacing; its labels are the scan's at each
    slice centre (nearest neighbour), as a reader labels the slices the scan has."""
    from training.augment import widening_sigma_mm

    stored = sitk.GetArrayViewFromImage(labels)
    organ = np.argwhere(stored == centre_label)
    if not len(organ):  # a scan without that organ: centred on all its organs
        organ = np.argwhere(stored > 0)
    if not len(organ):
        raise ValueError("no organ to centre a slab on")
    centre = labels.TransformContinuousIndexToPhysicalPoint(organ.mean(axis=0)[::-1].tolist())
    direction = np.array(image.GetDirection()).reshape(3, 3)
    axis_spacing = np.abs(direction) @ np.array(image.GetSpacing())  # per patient axis
    corners = np.array([image.TransformContinuousIndexToPhysicalPoint(corner) for corner in
                        itertools.product(*[(-0.5, n - 0.5) for n in image.GetSize()])])
    low, high = corners.min(axis=0), corners.max(axis=0)
    in_plane = float(min(axis_spacing[:2]))
    columns = tuple(int(n) for n in np.ceil((high[:2] - low[:2]) / in_plane))
    first = (low[0] + in_plane / 2, low[1] + in_plane / 2,
             centre[2] - (slices - 1) / 2 * thickness_mm)
    # a fine z grid on which every slice centre is a voxel, wide enough for the profile
    sub = int(np.ceil(thickness_mm))
    step = thickness_mm / sub
    sigma_mm = widening_sigma_mm(thickness_mm, axis_spacing[2])
    pad = int(np.ceil(3 * sigma_mm / step))
    fine = Grid((*columns, (slices - 1) * sub + 1 + 2 * pad), (in_plane, in_plane, step),
                (*first[:2], first[2] - pad * step), IDENTITY_DIRECTION)
    hu = sitk.GetArrayFromImage(resample(image, fine, sitk.sitkLinear, method.PADDING_HU))
    if sigma_mm > 0:
        hu = ndimage.gaussian_filter1d(hu, sigma_mm / step, axis=0, mode="nearest")
    slab = image_on_grid(np.rint(hu[pad::sub][:slices]).astype(np.int16),
                         Grid((*columns, slices), (in_plane, in_plane, thickness_mm), first,
                              IDENTITY_DIRECTION))
    return slab, labels_on_image_grid(labels, slab)


def score_anatomy(predictor, folder, in_plane_size, slabs=False):
    """DSC and NSD on renderings (unaugmented) of the label maps that training holds out; with
    ``slabs`` also on a thin thick-slice partial scan cut from each (``thick_slab``). Returns
    (scores of the renderings, scores of the slabs or None)."""
    maps, per_case, per_slab = [], [], []
    for name, image, labels in anatomy_cases(folder, in_plane_size):
        maps.append(name.removeprefix("anatomy_"))
        per_case.append(organ_scores(predictor.predict(image).labels, labels))
        print(f"{name}: " + format_scores(per_case[-1]), flush=True)
        if slabs:
            slab, slab_labels = thick_slab(image, labels)
            per_slab.append(organ_scores(predictor.predict(slab).labels, slab_labels))
            print(f"{name} slab: " + format_scores(per_slab[-1]), flush=True)
    seeds = f"{ANATOMY_TEST_SEED_OFFSET}..{ANATOMY_TEST_SEED_OFFSET + len(maps) - 1}"
    whole = {"maps": maps, "seeds": seeds, "in_plane_size": in_plane_size,
             "dsc": summarise(per_case, "dsc"),
             f"nsd_{NSD_TOLERANCE_MM:g}mm": summarise(per_case, "nsd")}
    if not slabs:
        return whole, None
    return whole, {"maps": maps, "seeds": seeds, "in_plane_size": in_plane_size,
                   "slices": SLAB_SLICES, "thickness_mm": SLAB_THICKNESS_MM,
                   "centred_on": f"{method.LABELS[SLAB_CENTRE_LABEL]}, else all organs",
                   "dsc": summarise(per_slab, "dsc"),
                   f"nsd_{NSD_TOLERANCE_MM:g}mm": summarise(per_slab, "nsd")}


def main(argv=None):
    args = parse_args(argv)
    predictor = Predictor(args.weights, min_island_fraction=args.min_island_fraction)
    scores = {"generated_unseen": score_generated(predictor, args.cases, args.in_plane_size),
              "real_ct": score_real(predictor), "min_island_fraction": args.min_island_fraction}
    if args.anatomy:
        scores["anatomy_held_out"], slabs = score_anatomy(predictor, args.anatomy,
                                                          args.in_plane_size, args.anatomy_slabs)
        if slabs:
            scores["anatomy_held_out_slabs"] = slabs
    print(json.dumps(scores, indent=2))
    if args.json:
        args.json.write_text(json.dumps(scores, indent=2) + "\n")
    if args.update:
        path = args.weights / PROVENANCE
        provenance = json.loads(path.read_text()) if path.exists() else {}
        provenance["scores"] = scores
        temporary = path.with_suffix(".json.partial")
        temporary.write_text(json.dumps(provenance, indent=2) + "\n")
        temporary.replace(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
