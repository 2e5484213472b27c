"""How far the shipped (fast) path's labels are from the plain float32 path's.

    python -m benchmarks.fast_path_agreement [--weights DIR] [--images FILE ...] [--no-generated]

For every case: the share of all voxels with equal labels, and of the voxels that either path
labels as an organ, and each path's seconds. Cases: ../shared/data/images and generated
160 x 160 x 70 cases with an identity, an oblique (7 degrees) and a permuted and flipped
direction (``--no-generated`` leaves them out), plus any ``--images``. tests/test_fast_path.py
holds the fast path to >= 99.9% of all voxels; this prints the numbers.
"""

import argparse
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
REAL_IMAGES = ROOT.parent / "shared" / "data" / "images"
OBLIQUE_AXIS, OBLIQUE_DEGREES = (1.0, 0.3, 0.2), 7.0


def generated_cases():
    """{name: image}: one generated abdomen on three kinds of direction matrix."""
    from scipy.spatial.transform import Rotation

    from synthetic import CaseGeometry, generate_case

    matrices = {
        "generated 160x160x70, identity": np.eye(3),
        "generated 160x160x70, oblique 7 deg": Rotation.from_rotvec(
            np.radians(OBLIQUE_DEGREES) * np.asarray(OBLIQUE_AXIS) / np.linalg.norm(OBLIQUE_AXIS)
        ).as_matrix(),
        "generated 160x160x70, permuted and flipped": np.array(
            [[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]]),
    }
    cases = {}
    for name, matrix in matrices.items():
        axes = np.abs(matrix).argmax(axis=0)  # the patient axis each voxel axis runs along
        size = np.array([160, 160, 70])[axes]
        spacing = np.array([2.5, 2.5, 5.0])[axes]
        centre = np.array([0.0, -20.0, -300.0])
        origin = centre - matrix @ (spacing * (size - 1) / 2)
        geometry = CaseGeometry(tuple(int(n) for n in size), tuple(float(s) for s in spacing),
                                tuple(float(o) for o in origin), tuple(matrix.ravel()))
        cases[name] = generate_case(21, geometry=geometry)[0]
    return cases


def agreement(fast, plain):
    """(share of all voxels with equal labels, share of the organ voxels of either path)."""
    organs = (fast > 0) | (plain > 0)
    return float(np.mean(fast == plain)), float(np.mean(fast[organs] == plain[organs]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", type=Path, default=None)
    parser.add_argument("--images", type=Path, nargs="*", default=[])
    parser.add_argument("--no-generated", action="store_true")
    args = parser.parse_args(argv)
    import SimpleITK as sitk

    from app.predictor import Predictor
    from app.weights import DEFAULT_WEIGHTS_DIR

    weights = args.weights or DEFAULT_WEIGHTS_DIR
    paths = [*sorted(REAL_IMAGES.glob("*_0000.nii.gz")), *args.images]
    cases = {path.name: sitk.ReadImage(str(path)) for path in paths}
    if not args.no_generated:
        cases.update(generated_cases())
    fast, plain = Predictor(weights), Predictor(weights, precision="float32", plain=True)
    print(f"fast path precision: {fast.precision}")
    print("| case | all voxels | organ voxels | fast s | plain s |")
    print("|---|---|---|---|---|")
    for name, image in cases.items():
        start = time.perf_counter()
        fast_labels = sitk.GetArrayFromImage(fast.predict(image).labels)
        middle = time.perf_counter()
        plain_labels = sitk.GetArrayFromImage(plain.predict(image).labels)
        end = time.perf_counter()
        everything, organs = agreement(fast_labels, plain_labels)
        print(f"| {name} | {100 * everything:.3f}% | {100 * organs:.2f}% | "
              f"{middle - start:.1f} | {end - middle:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
