"""Benchmark: our surface Dice against the reference implementation on one full-resolution liver.

    python -m benchmarks.evaluate [--size 512 512 200] [--spacing 0.8 0.8 2.5]
                                            [--repeats 3]

Builds a label and a realistic prediction of a liver (about 1.7 L, boundary errors of 1-3 mm) in
a CT-sized grid, once as is and once with a 27-voxel false positive in the far corner of the
volume, and times DSC + NSD for both implementations: the reference (the PyPI package
``surface-distance``, a development dependency; it computes a distance transform over the bounding
box of both masks) and ours (``evaluation.surface``). Prints seconds, speed-ups and the values at
the FLARE21 (1 mm) and FLARE22 liver (5 mm) tolerances, which must be identical (exit status 1
otherwise). The reference needs a few GB of memory for the case with the false positive.
"""

import argparse
import functools
import itertools
import time

import numpy as np
from scipy import ndimage

from evaluation.metrics import dice
from evaluation.surface import neighbour_code_areas_mm2, surface_dice

LIVER_RADII_MM = (70.0, 80.0, 90.0)  # (z, y, x) semi-axes of the ellipsoid the liver is carved from
TOLERANCES_MM = (1.0, 5.0)  # FLARE21, FLARE22 liver


def smooth_field(shape, cells, rng):
    """Smooth random field of the given shape, unit-ish amplitude: cubic zoom of a coarse grid."""
    coarse = rng.standard_normal(cells)
    return ndimage.zoom(coarse, [n / c for n, c in zip(shape, cells)], order=3)[
        tuple(slice(0, n) for n in shape)]


def liver_masks(shape_zyx, spacing_zyx_mm, seed=0):
    """A liver label and its prediction as boolean (z, y, x) arrays.

    The label is an ellipsoid deformed by a coarse random field; the prediction moves its boundary
    by a finer random field (a few mm) and adds a few small holes, as a network's output might.
    """
    rng = np.random.default_rng(seed)
    spacing = np.asarray(spacing_zyx_mm, dtype=float)
    radii_vox = np.asarray(LIVER_RADII_MM) / spacing
    centre = np.array([0.3, 0.6, 0.3]) * np.asarray(shape_zyx)
    low = np.maximum((centre - 1.4 * radii_vox).astype(int), 0)
    high = np.minimum((centre + 1.4 * radii_vox).astype(int), shape_zyx)
    box = tuple(slice(a, b) for a, b in zip(low, high))
    size = tuple(int(b - a) for a, b in zip(low, high))
    grid = np.meshgrid(*[(np.arange(a, b) - c) / r
                         for a, b, c, r in zip(low, high, centre, radii_vox)],
                       indexing="ij", sparse=True)
    level = sum(g ** 2 for g in grid) + 0.25 * grid[2] * grid[1]  # a tilted, lobed ellipsoid
    level = level + 0.25 * smooth_field(size, (4, 4, 4), rng)
    label = np.zeros(shape_zyx, dtype=bool)
    label[box] = level < 1.0
    error = 0.04 * smooth_field(size, (12, 24, 24), rng)
    prediction = np.zeros(shape_zyx, dtype=bool)
    prediction[box] = (level + error) < 1.0
    holes = rng.integers(low, high, size=(5, 3))
    for z, y, x in holes:
        prediction[z - 1:z + 2, y - 2:y + 3, x - 2:x + 3] = False
    return label, prediction


def with_far_false_positive(prediction):
    """The prediction plus a 3x3x3 blob in the corner of the volume farthest from the liver."""
    result = prediction.copy()
    result[-4:-1, 1:4, -4:-1] = True
    return result


def reference_scores(label, prediction, spacing_zyx_mm, tolerance_mm):
    """DSC and NSD from the reference package, as the challenge's script calls it per organ."""
    import surface_distance  # development dependency: tests and this benchmark only

    distances = surface_distance.compute_surface_distances(label, prediction, spacing_zyx_mm)
    nsd = surface_distance.compute_surface_dice_at_tolerance(distances, tolerance_mm)
    return float(surface_distance.compute_dice_coefficient(label, prediction)), float(nsd)


def our_scores(label, prediction, spacing_zyx_mm, tolerance_mm):
    """DSC and NSD from evaluation.metrics and evaluation.surface."""
    return dice(prediction, label), surface_dice(label, prediction, spacing_zyx_mm, tolerance_mm)


def best_seconds(function, repeats):
    """Smallest wall time over ``repeats`` calls, and the last result."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return min(times), result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, nargs=3, default=(512, 512, 200), help="x y z voxels")
    parser.add_argument("--spacing", type=float, nargs=3, default=(0.8, 0.8, 2.5), help="x y z mm")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of ours (best is shown)")
    parser.add_argument("--reference-repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    shape, spacing = tuple(args.size[::-1]), tuple(args.spacing[::-1])  # (z, y, x)

    label, prediction = liver_masks(shape, spacing, args.seed)
    neighbour_code_areas_mm2(spacing)  # derives the table once (about 0.1 s), as any import would
    voxel_ml = float(np.prod(spacing)) / 1000.0
    print(f"grid {'x'.join(map(str, args.size))} (x y z) at {args.spacing} mm; liver label "
          f"{label.sum() * voxel_ml:.0f} mL, prediction {prediction.sum() * voxel_ml:.0f} mL")
    print("| case | NSD tolerance | reference s | ours s | speed-up | DSC ref / ours "
          "| NSD ref / ours | identical |")
    print("|---|---|---|---|---|---|---|---|")
    all_identical = True
    cases = (("liver", prediction),
             ("liver + far 27-voxel FP", with_far_false_positive(prediction)))
    for (case, pred), tolerance_mm in itertools.product(cases, TOLERANCES_MM):
        reference = functools.partial(reference_scores, label, pred, spacing, tolerance_mm)
        reference_s, (ref_dsc, ref_nsd) = best_seconds(reference, args.reference_repeats)
        ours = functools.partial(our_scores, label, pred, spacing, tolerance_mm)
        ours_s, (our_dsc, our_nsd) = best_seconds(ours, args.repeats)
        identical = abs(ref_dsc - our_dsc) <= 1e-12 and abs(ref_nsd - our_nsd) <= 1e-9
        all_identical &= identical
        print(f"| {case} | {tolerance_mm:g} mm | {reference_s:.2f} | {ours_s:.3f} "
              f"| {reference_s / ours_s:.0f}x | {ref_dsc:.6f} / {our_dsc:.6f} "
              f"| {ref_nsd:.9f} / {our_nsd:.9f} | {'yes' if identical else 'NO'} |")
    return 0 if all_identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
