"""Per organ, what the SCN sees and says: HU inside the labels and the SCN's probability there.

    python -m release.organ_probe [--weights DIR] [--seeds 1 2] [--in-plane-size 256]

For the real CT of ../shared/data (when present) and generated cases, prints per labelled organ
its volume (mL) and largest axial cross-section (cm2), the HU median and 10th / 90th percentiles
inside it (one voxel in from its edge in-plane, so that partial volume with the surrounding fat
does not count), and the mean and highest probability the
SCN gives that organ's class at its labelled voxels on the SCN's crop (the crop the predictor
uses, partial-field-of-view rules included). A low mean with a high maximum: the organ is seen
but not trusted; a low maximum: it is not seen.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from app import method
from app.geometry import to_canonical
from app.predictor import Predictor
from app.weights import DEFAULT_WEIGHTS_DIR
from release.roi_coverage import generated_cases, labels_on_image_grid, real_cases


def organ_sizes(labels):
    """{organ: (volume mL, largest axial cross-section cm2)}; axial: across the axis of the
    labels' voxels that points closest to the patient's head-feet axis."""
    canonical, _ = to_canonical(labels)
    values = sitk.GetArrayViewFromImage(canonical)
    spacing_x, spacing_y, spacing_z = canonical.GetSpacing()
    result = {}
    for value, organ in method.LABELS.items():
        per_slice = (values == value).sum(axis=(1, 2))
        if per_slice.any():
            voxel_mm3 = spacing_x * spacing_y * spacing_z
            result[organ] = (round(float(per_slice.sum()) * voxel_mm3 / 1000.0, 1),
                             round(float(per_slice.max()) * spacing_x * spacing_y / 100.0, 1))
    return result


def hu_inside(image, labels):
    """{organ: (median, 10th, 90th percentile HU)} inside each organ, eroded by one voxel
    in-plane; ``labels`` on the image's grid."""
    hu = sitk.GetArrayViewFromImage(image)
    result = {}
    for value, organ in method.LABELS.items():
        core = sitk.BinaryErode(sitk.Cast(labels == value, sitk.sitkUInt8), [1, 1, 0])
        inside = hu[sitk.GetArrayViewFromImage(core) > 0]
        if inside.size:
            result[organ] = tuple(round(float(v), 1) for v in np.percentile(inside, [50, 10, 90]))
    return result


def probabilities_at_labels(predictor, image, labels):
    """{organ: (mean, max) SCN probability of its class at its labelled voxels on the crop}."""
    canonical, _ = to_canonical(image)
    crop_grid, crop = predictor.segmentation_input(canonical, predictor.localize(canonical))
    probabilities = predictor.segmentation_probabilities(crop)
    on_crop = sitk.GetArrayFromImage(sitk.Resample(  # a copy: a view would outlive its image
        labels, crop_grid.reference(), sitk.Transform(), sitk.sitkNearestNeighbor, 0,
        sitk.sitkUInt8))
    result = {}
    for value, organ in method.LABELS.items():
        at = probabilities[on_crop == value, value]
        if at.size:
            result[organ] = (round(float(at.mean()), 3), round(float(at.max()), 3))
    return result


def probe(predictor, image, labels):
    on_image = labels_on_image_grid(labels, image)
    return {"volume_ml_largest_section_cm2": organ_sizes(labels),
            "hu_median_p10_p90": hu_inside(image, on_image),
            "probability_mean_max": probabilities_at_labels(predictor, image, labels)}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m release.organ_probe",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS_DIR)
    parser.add_argument("--seeds", type=int, nargs="*", default=[],
                        help="seeds of generated cases to probe too")
    parser.add_argument("--in-plane-size", type=int, default=256)
    parser.add_argument("--json", type=Path, default=None, help="write all records to this file")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    predictor = Predictor(args.weights, warm_up=False)
    records = {}
    for name, image, labels in [*real_cases(), *generated_cases(args.seeds, args.in_plane_size)]:
        records[name] = probe(predictor, image, labels)
        print(name, json.dumps(records[name]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(records, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
