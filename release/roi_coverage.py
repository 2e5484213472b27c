"""How much of the labelled organs the localization stage's ROI contains, per case.

    python -m release.roi_coverage [--weights DIR] [--seeds 1 2 3] [--in-plane-size 256]
                                      [--anatomy ../shared/anatomy]

Runs stage 1 alone (``Predictor.localize``) with the weights of DIR on the real CT of
../shared/data (when present) and on generated cases, and prints per case the ROI in voxel indices
(of the LPS-reoriented image) and in mm, and the share of labelled organ voxels inside it. Used to
check imported published weights (``python -m release.import_weights``): the ROI must contain at
least 99% of the organ voxels. With ``--anatomy`` the held-out real-anatomy maps are rendered as
``python -m release.score_weights --anatomy`` renders them (same seeds, unaugmented) and checked
too.
"""

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from app import method
from app.geometry import Grid, to_canonical
from app.io import read_dicom_series
from app.predictor import Predictor
from app.weights import DEFAULT_WEIGHTS_DIR
from synthetic import generate_case

SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
# seeds of the held-out maps' renderings: far from every seed training draws
ANATOMY_TEST_SEED_OFFSET = 5_000_000


def labels_on_image_grid(labels, image):
    """Labels brought onto the image's grid in physical space (nearest neighbour), uint8."""
    return sitk.Resample(labels, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                         sitk.sitkUInt8)


def roi_coverage(predictor, image, labels):
    """Stage 1 on ``image``; its ROI and the share of ``labels``' organ voxels inside it.

    ``labels`` may lie on another grid over the same physical space. Returns a dict: ROI start
    and size (x, y, z voxels of the LPS-reoriented image), ROI low/high edges and extent in mm
    along those axes, organ voxel count, the share inside the ROI, and that share per organ.
    """
    canonical, _ = to_canonical(image)
    canonical_labels, _ = to_canonical(labels_on_image_grid(labels, image))
    roi = predictor.localize(canonical)
    array = sitk.GetArrayViewFromImage(canonical_labels)  # (z, y, x)
    (x0, y0, z0), (x1, y1, z1) = roi.start, roi.stop
    inside = np.zeros(array.shape, bool)
    inside[z0:z1, y0:y1, x0:x1] = True
    low_mm, high_mm = roi.axis_mm(Grid.of(canonical))
    organs = array > 0
    per_organ = {name: round(float((inside & (array == label)).sum() / (array == label).sum()), 4)
                 for label, name in method.LABELS.items() if (array == label).any()}
    return {
        "size_xyz": list(canonical.GetSize()),
        "spacing_mm_xyz": [round(s, 4) for s in canonical.GetSpacing()],
        "roi_start_xyz": list(roi.start), "roi_size_xyz": list(roi.size),
        "roi_low_mm_xyz": np.round(low_mm, 1).tolist(),
        "roi_high_mm_xyz": np.round(high_mm, 1).tolist(),
        "roi_extent_mm_xyz": np.round(high_mm - low_mm, 1).tolist(),
        "organ_voxels": int(organs.sum()),
        "coverage": round(float((inside & organs).sum() / max(int(organs.sum()), 1)), 4),
        "coverage_per_organ": per_organ,
    }


def real_cases(shared_data=SHARED_DATA):
    """(name, image, labels) of the real CT in ../shared/data: NIfTI images and the DICOM case."""
    for image_path in sorted((shared_data / "images").glob("*_0000.nii.gz")):
        name = image_path.name[: -len("_0000.nii.gz")]
        label_path = shared_data / "labels" / f"{name}.nii.gz"
        if label_path.is_file():
            yield name, sitk.ReadImage(str(image_path)), sitk.ReadImage(str(label_path))
    dicom = shared_data / "dicom"
    if (dicom / "ts_dicom_slices").is_dir() and (dicom / "ts_dicom.nii.gz").is_file():
        yield ("ts_dicom", read_dicom_series(dicom / "ts_dicom_slices")[0],
               sitk.ReadImage(str(dicom / "ts_dicom.nii.gz")))


def generated_cases(seeds, in_plane_size):
    """(name, image, labels) of generated cases."""
    for seed in seeds:
        image, labels = generate_case(seed, in_plane_size=in_plane_size)
        yield f"generated_{seed}", image, labels


def anatomy_cases(folder, in_plane_size):
    """(name, image, labels) of the label maps that training holds out, rendered unaugmented on
    seeds training never uses; score_weights scores the same renderings."""
    from synthetic.anatomy import read_label_map, render_case
    from training.train import anatomy_split

    _, held = anatomy_split(folder)
    for index, path in enumerate(held):
        image, labels = render_case(read_label_map(path), ANATOMY_TEST_SEED_OFFSET + index,
                                    augment=False, in_plane_size=in_plane_size)
        yield f"anatomy_{path.name.split('.')[0]}", image, labels


def summary_line(name, record):
    return (f"{name}: ROI start {record['roi_start_xyz']} size {record['roi_size_xyz']} voxels, "
            f"{record['roi_low_mm_xyz']}..{record['roi_high_mm_xyz']} mm "
            f"(extent {record['roi_extent_mm_xyz']} mm); organ voxels inside "
            f"{100 * record['coverage']:.2f}% of {record['organ_voxels']} "
            f"{ {k: round(100 * v, 2) for k, v in record['coverage_per_organ'].items()} }")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m release.roi_coverage",
                                     description="Share of organ voxels inside the stage-1 ROI.")
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS_DIR,
                        help="weights folder (default: weights/)")
    parser.add_argument("--seeds", type=int, nargs="*", default=[1, 2, 3],
                        help="seeds of the generated cases")
    parser.add_argument("--in-plane-size", type=int, default=256,
                        help="in-plane voxels of the generated cases")
    parser.add_argument("--anatomy", type=Path, default=None,
                        help="label-map folder: also its held-out maps, rendered")
    parser.add_argument("--json", type=Path, default=None, help="write all records to this file")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    predictor = Predictor(args.weights)
    records = {}
    cases = [real_cases(), generated_cases(args.seeds, args.in_plane_size)]
    if args.anatomy:
        cases.append(anatomy_cases(args.anatomy, args.in_plane_size))
    for name, image, labels in itertools.chain(*cases):
        records[name] = roi_coverage(predictor, image, labels)
        print(summary_line(name, records[name]), flush=True)
    if records:
        worst = min(records, key=lambda name: records[name]["coverage"])
        print(f"{len(records)} cases; lowest coverage {100 * records[worst]['coverage']:.2f}% "
              f"({worst})")
    if args.json:
        args.json.write_text(json.dumps(records, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
