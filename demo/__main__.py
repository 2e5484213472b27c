"""Demo: generate a sample CT, segment it with predict.sh as the organisers run it, print DSC.

    python -m demo [--folder demo-output] [--seed 7] [--size 512 512 200]

The real CT in ../shared/data (when present) is segmented and scored as well.
"""

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import SimpleITK as sitk

from evaluation.metrics import organ_dice

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__.split("\n")[0])
    parser.add_argument("--folder", type=Path, default=ROOT / "demo-output", help="working folder")
    parser.add_argument("--seed", type=int, default=7, help="seed of the generated case")
    parser.add_argument("--size", type=int, nargs=3, default=(512, 512, 200),
                        metavar=("X", "Y", "Z"), help="voxels of the generated case")
    return parser.parse_args(argv)


def generated_case(folder, seed, size):
    """Write one generated whole-abdomen case; returns (image path, label path)."""
    from synthetic import CaseGeometry, write_case

    geometry = CaseGeometry(size=tuple(size), spacing_mm=(0.8, 0.8, 2.0),
                            origin_mm=(-204.4, -204.4, -620.0),
                            direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    return write_case(folder, "sample", seed, geometry=geometry)


def segment_and_score(image_path, label_path, work):
    """Run predict.sh on the one image (one process, as the organisers run it) and score it."""
    inputs, outputs = work / "inputs", work / "outputs"
    shutil.rmtree(work, ignore_errors=True)
    inputs.mkdir(parents=True)
    shutil.copy(image_path, inputs / Path(image_path).name)
    start = time.perf_counter()
    subprocess.run([str(ROOT / "predict.sh"), str(inputs), str(outputs), "--quiet"], check=True)
    seconds = time.perf_counter() - start
    name = Path(image_path).name.replace("_0000.nii.gz", ".nii.gz")
    scores = organ_dice(sitk.ReadImage(str(outputs / name)), sitk.ReadImage(str(label_path)))
    return scores, seconds


def report(title, scores, seconds):
    organs = ", ".join(f"{organ} {value:.3f}" for organ, value in scores.items())
    print(f"{title}: DSC {organs}; {seconds:.1f} s end to end (process start included)")


def main(argv=None):
    args = parse_args(argv)
    args.folder.mkdir(parents=True, exist_ok=True)
    image_path, label_path = generated_case(args.folder / "generated", args.seed, args.size)
    print(f"generated {image_path} ({'x'.join(map(str, args.size))} voxels)")
    report("generated sample", *segment_and_score(image_path, label_path, args.folder / "run"))
    real_image = SHARED_DATA / "images" / "ts_example_0000.nii.gz"
    if real_image.is_file():
        real_label = SHARED_DATA / "labels" / "ts_example.nii.gz"
        scores, seconds = segment_and_score(real_image, real_label, args.folder / "run_real")
        report("real CT ts_example (TotalSegmentator reference labels)", scores, seconds)
    else:
        print(f"{real_image} not found: real CT demo skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
