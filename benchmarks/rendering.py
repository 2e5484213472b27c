"""Rendering speed: seconds per real-anatomy case on a fixed grid, beside the procedural generator.

    .venv/bin/python -m benchmarks.rendering [--anatomy ../shared/anatomy] [--maps 5]
                                            [--size 512 512 200] [--spacing 0.8 0.8 2.0]

Every timed case is rendered with augmentation (as training renders them) on a grid of ``--size``
voxels (x, y, z) centred on the map's organs, so that the numbers do not depend on the grid a seed
draws. The maps are spread over the folder's sorted list (and so over its sources). The procedural
generator is timed on the same grid size for comparison. Printed: seconds per case (min / median /
max) and the process's peak resident memory.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from pathlib import Path

import numpy as np

from synthetic.anatomy import list_maps, read_label_map, render_case
from synthetic.generator import generate_case
from synthetic.grids import CaseGeometry

SEED = 6_000_000  # no training or scoring seed


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--anatomy", type=Path, default=Path("../shared/anatomy"))
    parser.add_argument("--maps", type=int, default=5, help="maps rendered (one case each)")
    parser.add_argument("--size", type=int, nargs=3, default=(512, 512, 200),
                        metavar=("X", "Y", "Z"))
    parser.add_argument("--spacing", type=float, nargs=3, default=(0.8, 0.8, 2.0),
                        metavar=("X", "Y", "Z"), help="mm")
    parser.add_argument("--procedural", type=int, default=2,
                        help="procedural cases timed on the same grid size (0: none)")
    return parser.parse_args(argv)


def grid_over_organs(label_map, size, spacing) -> CaseGeometry:
    """An axial grid of ``size`` centred on the map's covered organs."""
    half = (np.asarray(size) - 1) / 2.0 * np.asarray(spacing)
    return CaseGeometry(tuple(size), tuple(spacing), tuple(label_map.organ_centre() - half))


def summary(seconds) -> str:
    return (f"{min(seconds):.1f} / {statistics.median(seconds):.1f} / {max(seconds):.1f} s "
            f"(min / median / max of {len(seconds)})")


def main(argv=None) -> int:
    args = parse_args(argv)
    maps = list_maps(args.anatomy)
    chosen = [maps[i] for i in np.linspace(0, len(maps) - 1, min(args.maps, len(maps))).astype(int)]
    size = "x".join(str(v) for v in args.size)
    rendered = []
    for index, path in enumerate(chosen):
        label_map = read_label_map(path)
        geometry = grid_over_organs(label_map, args.size, args.spacing)
        start = time.perf_counter()
        image, label = render_case(label_map, SEED + index, geometry=geometry, augment=True)
        rendered.append(time.perf_counter() - start)
        if image.GetSize() != tuple(args.size) or label.GetSize() != tuple(args.size):
            raise RuntimeError(f"{path.name}: rendered {image.GetSize()}, asked for {size}")
        print(f"{label_map.name}: {rendered[-1]:.1f} s", flush=True)
    print(f"real anatomy, {size} voxels: {summary(rendered)}")
    if args.procedural:
        geometry = CaseGeometry(tuple(args.size), tuple(args.spacing), tuple(
            -(np.asarray(args.size) - 1) / 2.0 * np.asarray(args.spacing)))
        procedural = []
        for index in range(args.procedural):
            start = time.perf_counter()
            generate_case(SEED + index, geometry=geometry)
            procedural.append(time.perf_counter() - start)
        print(f"procedural, {size} voxels: {summary(procedural)}")
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak resident memory: {peak_gib:.2f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
