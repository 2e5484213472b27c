"""Write synthetic CT cases in the FLARE layout: NAME_0000.nii.gz (image) and NAME.nii.gz (label).

    python -m synthetic --out DIR --cases N --seed S [--prefix case] [--start 0]
                        [--size X Y Z] [--spacing X Y Z] [--direction identity]
    python -m synthetic --anatomy MAP_OR_FOLDER --out DIR --cases N --seed S
                        [--grid random|map] [--no-augment]

Case i is named PREFIX_%04d (i counted from --start) and generated from seed S + i, so any
case can be regenerated alone.  Without --size each case's grid is drawn at random from its seed
(as for training); with --size every case gets that grid (SimpleITK axis order), centred on the
scanner isocentre, with the chosen --direction.

With --anatomy each case is drawn around a real patient's organ label map (synthetic.anatomy): a
file, or a folder whose maps the cases take in turn by seed (seed modulo the number of maps). The
grid is drawn from the seed and moved into the map's range, or is the map's own (--grid map).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

from synthetic.generator import CaseGeometry, random_geometry, write_case

# Named directions: columns are the physical directions of the image axes (x, y, z).
DIRECTIONS = {
    "identity": (1, 0, 0, 0, 1, 0, 0, 0, 1),
    "flip-x": (-1, 0, 0, 0, 1, 0, 0, 0, 1),
    "flip-xy": (-1, 0, 0, 0, -1, 0, 0, 0, 1),  # RAS-like storage
    "flip-z": (1, 0, 0, 0, 1, 0, 0, 0, -1),  # slices from head to feet
    "coronal": (1, 0, 0, 0, 0, 1, 0, -1, 0),  # image y runs head to feet, image z front to back
    "sagittal": (0, 0, 1, 1, 0, 0, 0, -1, 0),
}


def oblique(degrees: float) -> tuple[float, ...]:
    """Identity tilted about x (a gantry tilt) by ``degrees``."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return (1.0, 0.0, 0.0, 0.0, c, -s, 0.0, s, c)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m synthetic", description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Directions: " + ", ".join(DIRECTIONS) + ", oblique (5 degree tilt), random.")
    parser.add_argument("--out", type=Path, required=True, help="output folder (created)")
    parser.add_argument("--cases", type=int, default=1, help="number of cases (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first case (default 0)")
    parser.add_argument("--start", type=int, default=0, help="index of the first case name")
    parser.add_argument("--prefix", default="case", help="case name prefix (default 'case')")
    parser.add_argument("--size", type=int, nargs=3, metavar=("X", "Y", "Z"),
                        help="voxels per image axis; without it each grid is random")
    parser.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"),
                        help="mm per image axis (default: 400 mm field of view, 2.5 mm slices)")
    parser.add_argument("--direction", default=None,
                        choices=sorted(DIRECTIONS) + ["oblique", "random"],
                        help="image axes (default identity with --size, else random)")
    parser.add_argument("--in-plane-size", type=int, default=512,
                        help="in-plane voxels of random grids (default 512)")
    parser.add_argument("--max-voxels", type=int, default=None,
                        help="cap on the voxels of random grids")
    parser.add_argument("--anatomy", type=Path, default=None,
                        help="a real label map, or a folder of them (with anatomy.json)")
    parser.add_argument("--grid", choices=("random", "map"), default="random",
                        help="with --anatomy: a grid drawn from the seed, or the map's own")
    parser.add_argument("--no-augment", action="store_true",
                        help="with --anatomy: no scaling, rotation or deformation of the anatomy")
    args = parser.parse_args(argv)
    if args.cases < 0:
        parser.error("--cases must be >= 0")
    if args.spacing is not None and args.size is None:
        parser.error("--spacing needs --size")
    if args.spacing is not None and min(args.spacing) <= 0:
        parser.error("--spacing values must be positive")
    if args.size is not None and min(args.size) < 1:
        parser.error("--size values must be positive")
    if args.size is None and args.direction not in (None, "random"):
        parser.error("--direction other than random needs --size")
    if args.anatomy is None and (args.grid != "random" or args.no_augment):
        parser.error("--grid and --no-augment need --anatomy")
    if args.anatomy is not None and args.grid == "map" and args.size is not None:
        parser.error("--grid map and --size exclude each other")
    return args


def fixed_geometry(size, spacing, direction) -> CaseGeometry:
    """A grid centred on the isocentre (x, y) at a scanner-like table position (z).

    size and spacing are per image axis (SimpleITK order); spacing defaults to a 400 mm field
    of view over the first two axes and 2.5 mm along the third.
    """
    size = np.asarray(size)
    if spacing is None:
        spacing = (400.0 / size[0], 400.0 / size[1], 2.5)
    spacing = np.asarray(spacing, dtype=float)
    matrix = np.asarray(direction, dtype=float).reshape(3, 3)
    center = np.array([0.0, 0.0, -400.0])
    origin = center - matrix @ (spacing * (size - 1) / 2.0)
    return CaseGeometry(tuple(int(v) for v in size), tuple(float(v) for v in spacing),
                        tuple(float(v) for v in origin), tuple(float(v) for v in matrix.ravel()))


def case_geometry(args, seed: int) -> CaseGeometry | None:
    """The grid of one case, or None to let generate_case draw it from the case's seed."""
    if args.size is None:
        return None
    name = args.direction or "identity"
    if name == "random":
        direction = random_geometry(np.random.default_rng([seed, 1])).direction
    elif name == "oblique":
        direction = oblique(5.0)
    else:
        direction = DIRECTIONS[name]
    return fixed_geometry(args.size, args.spacing, direction)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.anatomy is not None:
        return anatomy_main(args)
    for i in range(args.cases):
        seed = args.seed + i
        name = f"{args.prefix}_{args.start + i:04d}"
        geometry = case_geometry(args, seed)
        start = time.perf_counter()
        kwargs = dict(geometry=geometry) if geometry is not None else dict(
            in_plane_size=args.in_plane_size, max_voxels=args.max_voxels)
        image_path, label_path = write_case(args.out, name, seed, **kwargs)
        seconds = time.perf_counter() - start
        print(f"{name}: seed {seed} -> {image_path} {label_path} ({seconds:.1f} s)", flush=True)
    return 0


def anatomy_main(args) -> int:
    from synthetic import anatomy

    try:
        anatomy.list_maps(args.anatomy)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for i in range(args.cases):
        seed = args.seed + i
        name = f"{args.prefix}_{args.start + i:04d}"
        start = time.perf_counter()
        try:
            label_map = anatomy.read_label_map(anatomy.map_for_seed(args.anatomy, seed))
        except (OSError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        geometry = "map" if args.grid == "map" else case_geometry(args, seed)
        info = {}
        image_path, label_path = anatomy.write_case(
            args.out, name, label_map, seed, geometry=geometry, augment=not args.no_augment,
            in_plane_size=args.in_plane_size, max_voxels=args.max_voxels, info=info)
        seconds = time.perf_counter() - start
        print(f"{name}: seed {seed}, map {label_map.name} ({info['phase']}; real "
              f"{', '.join(info['real_organs'])}; drawn {', '.join(info['drawn_organs']) or '-'})"
              f" -> {image_path} {label_path} ({seconds:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
