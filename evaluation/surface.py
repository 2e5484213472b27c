"""Surface Dice (normalised surface distance, NSD) as the FLARE challenges compute it.

The challenges score with the surface-distance method of Nikolov et al. (DeepMind
``surface-distance``), see ../shared/METHOD.md, "Challenge evaluation". This module computes the
same numbers from first principles, in a time that grows with the surface, not with the volume.

Conventions (all functions):

- Masks are boolean NumPy arrays in SimpleITK order (z, y, x): ``sitk.GetArrayFromImage``.
- ``spacing_mm`` is in the same (z, y, x) order, i.e. ``image.GetSpacing()[::-1]``.
- Voxels outside the array count as background, so an object touching the border is closed there.
- Surface elements ("surfels") sit on voxel corners. Corner ``(i, j, k)`` is the point shared by
  the 2x2x2 block of voxels ``(i-1..i, j-1..j, k-1..k)``; a mask of shape ``(Z, Y, X)`` has
  ``(Z+1, Y+1, X+1)`` corners. A corner is a surfel when its block holds both object and
  background voxels; its weight is the area (mm^2) of the marching-cubes surface inside the block,
  looked up by the block's 8-bit neighbour code.
- Distances are Euclidean in mm between corners:
  ``sqrt((di*s0)^2 + (dj*s1)^2 + (dk*s2)^2)`` for integer corner offsets ``(di, dj, dk)``.

Surface Dice at tolerance t (mm), with S_A, S_B the surfels of A and B and a(s) their areas:

    NSD = (sum a(s), s in S_A with d(s, S_B) <= t  +  sum a(s), s in S_B with d(s, S_A) <= t)
          / (sum a(s), s in S_A  +  sum a(s), s in S_B)
"""

import itertools
from functools import cache

import numpy as np
from scipy.spatial import cKDTree

# The 8 voxels of a 2x2x2 block as offsets (dz, dy, dx), and the bit each one sets in the block's
# neighbour code. The challenge's convention: bit 7 for offset (0, 0, 0) down to bit 0 for
# (1, 1, 1).
BLOCK_OFFSETS = np.array(list(itertools.product((0, 1), repeat=3)))
BLOCK_BITS = (2 ** (7 - BLOCK_OFFSETS @ np.array([4, 2, 1]))).astype(np.uint8)
NUM_CODES = 256

# cKDTree excludes neighbours at exactly its distance bound, and its coordinates carry rounding
# errors far below a micrometre; the search bound is widened by this much and every candidate is
# then re-measured exactly (``lattice_distance_mm``) against the tolerance itself.
SEARCH_SLACK_MM = 1e-6

# The nearest this many lattice offsets within the tolerance are looked up one at a time (a few
# sorted lookups cost less than a k-d tree query); corners not found that way go to a k-d tree
# unless those offsets were all of them. MAX_OFFSET_GRID bounds the candidates enumerated.
MAX_LOOKUP_OFFSETS = 32
MAX_OFFSET_GRID = 20_000


# --- The neighbour-code table, derived ------------------------------------------------------------

def _block_faces():
    """The 6 faces of the block, each as 4 block-voxel indices in cyclic order around the face."""
    faces = []
    for axis in range(3):
        u, v = [a for a in range(3) if a != axis]
        for side in (0, 1):
            cycle = []
            for du, dv in ((0, 0), (0, 1), (1, 1), (1, 0)):
                offset = [0, 0, 0]
                offset[axis], offset[u], offset[v] = side, du, dv
                cycle.append(int(np.flatnonzero((BLOCK_OFFSETS == offset).all(axis=1))[0]))
            faces.append(cycle)
    return faces


def _polygons(code):
    """Closed polygons of the surface inside a block with the given code, as lists of edges.

    An edge is a frozenset of two block voxels, one inside and one outside; the surface crosses it
    at its midpoint (the iso-value 1/2 between 0 and 1). On each block face the crossing points are
    joined in pairs; a face with 4 crossings (inside and outside voxels on its two diagonals) is
    ambiguous, and is joined so that the voxels of the minority side (inside when at most 4 of the 8
    are inside, else outside) are cut off one by one. Every crossing point lies on two faces, so the
    joins close into loops.
    """
    inside = [(code & int(bit)) != 0 for bit in BLOCK_BITS]
    minority = sum(inside) <= 4
    neighbours = {}
    for cycle in _block_faces():
        edges = [(cycle[n], cycle[(n + 1) % 4]) for n in range(4)]
        crossing = [n for n, (a, b) in enumerate(edges) if inside[a] != inside[b]]
        if len(crossing) == 2:
            pairs = [crossing]
        elif len(crossing) == 4:
            # Edges n and n+1 share voxel cycle[n+1]; joining them cuts that voxel off.
            first = 0 if inside[cycle[1]] == minority else 1
            pairs = [[first, first + 1], [first + 2, (first + 3) % 4]]
        else:
            pairs = []
        for n, m in pairs:
            a, b = frozenset(edges[n]), frozenset(edges[m])
            neighbours.setdefault(a, []).append(b)
            neighbours.setdefault(b, []).append(a)
    polygons, visited = [], set()
    for start in neighbours:
        if start in visited:
            continue
        loop, previous, current = [start], None, start
        visited.add(start)
        while True:
            following = [e for e in neighbours[current] if e != previous][0]
            if following == start:
                break
            loop.append(following)
            visited.add(following)
            previous, current = current, following
        polygons.append(loop)
    return polygons


@cache
def _triangulations(indices):
    """All triangulations of the polygon with the given vertex indices (a tuple), as lists of
    index triples: the triangle on edge (first, last) has some apex; recurse on both sides."""
    if len(indices) < 3:
        return [[]]
    first, last = indices[0], indices[-1]
    return [left + right + [(first, indices[apex], last)]
            for apex in range(1, len(indices) - 1)
            for left in _triangulations(indices[:apex + 1])
            for right in _triangulations(indices[apex:])]


def triangle_areas_mm2(triangles, spacing_mm):
    """Areas (mm^2) of triangles given in voxel units, shape (T, 3 vertices, 3 axes (z, y, x))."""
    scaled = np.asarray(triangles, dtype=np.float64) * np.asarray(spacing_mm, dtype=np.float64)
    normals = np.cross(scaled[:, 1] - scaled[:, 0], scaled[:, 2] - scaled[:, 0])
    return 0.5 * np.linalg.norm(normals, axis=-1)


def _largest_triangulation(vertices):
    """The triangulation of a closed polygon (vertices in voxel units) with the largest area.

    Planar polygons have one area whatever the triangulation. For a non-planar one (a fold along a
    diagonal) we take the triangulation of largest area at unit spacing; it is unique for every
    code, and it is the one the challenge's table encodes (pinned by tests/test_evaluate.py). The
    chosen triangles are then scaled with the spacing, never re-chosen.
    """
    options = np.array(_triangulations(tuple(range(len(vertices)))))  # (options, n - 2, 3)
    triangles = vertices[options]  # (options, n - 2, 3 vertices, 3 axes)
    areas = triangle_areas_mm2(triangles.reshape(-1, 3, 3), (1.0, 1.0, 1.0))
    areas = areas.reshape(len(options), -1)
    return triangles[int(np.argmax(areas.sum(axis=1)))]


@cache
def _triangle_table():
    """All surface triangles of all 256 codes: (code per triangle (T,), vertices (T, 3, 3))."""
    codes, triangles = [], []
    for code in range(NUM_CODES):
        for polygon in _polygons(code):
            vertices = np.array([BLOCK_OFFSETS[list(edge)].mean(axis=0) for edge in polygon])
            chosen = _largest_triangulation(vertices)
            triangles.append(chosen)
            codes.extend([code] * len(chosen))
    return np.array(codes), np.concatenate(triangles)


def neighbour_code_areas_mm2(spacing_mm):
    """Surface area (mm^2) inside a 2x2x2 block for each of the 256 neighbour codes.

    ``spacing_mm`` in (z, y, x). Codes 0 (all background) and 255 (all object) have area 0; the
    area of code c equals that of 255 - c. Example: a single voxel is closed by 8 corner triangles
    of total area sqrt((sz*sy)^2 + (sz*sx)^2 + (sy*sx)^2).
    """
    codes, triangles = _triangle_table()
    return np.bincount(codes, weights=triangle_areas_mm2(triangles, spacing_mm),
                       minlength=NUM_CODES)


# --- Surfels of a mask ---------------------------------------------------------------------------

def neighbour_codes(mask):
    """Neighbour code (uint8) of every corner of a boolean (z, y, x) mask; shape ``mask.shape + 1``.

    The code of corner (i, j, k) reads its 2x2x2 block (i-1..i, j-1..j, k-1..k) in (z, y, x)
    raster order as an 8-bit binary number, first voxel most significant (``BLOCK_BITS``); it is
    built axis by axis: 2 bits per x pair, 4 per (y, x) square, 8 per block. Voxels outside the
    array count as background.
    """
    padded = np.pad(np.asarray(mask, dtype=bool), 1).astype(np.uint8)
    pairs = (padded[:, :, :-1] << 1) | padded[:, :, 1:]
    squares = (pairs[:, :-1] << 2) | pairs[:, 1:]
    return (squares[:-1] << 4) | squares[1:]


def occupied_boxes(mask):
    """Tight boxes (tuples of slices) holding all object voxels of a (z, y, x) mask.

    Boxes are split wherever a plane of the box is empty, recursively, so a far-away stray voxel
    gets its own small box instead of stretching one box over the whole volume. Boxes never share
    a corner: between two boxes lies at least one empty plane. No boxes for an empty mask.
    """
    mask = np.asarray(mask, dtype=bool)
    boxes, pending = [], [tuple(slice(0, n) for n in mask.shape)]
    while pending:
        box = pending.pop()
        part = mask[box]
        for axis in range(mask.ndim):
            other_axes = tuple(a for a in range(mask.ndim) if a != axis)
            occupied = np.flatnonzero(part.any(axis=other_axes))
            if occupied.size == 0:
                break  # only an empty mask gets here
            runs = np.split(occupied, np.flatnonzero(np.diff(occupied) > 1) + 1)
            if len(runs) > 1 or len(occupied) < part.shape[axis]:
                start = box[axis].start
                for run in runs:
                    piece = list(box)
                    piece[axis] = slice(start + int(run[0]), start + int(run[-1]) + 1)
                    pending.append(tuple(piece))
                break
        else:
            boxes.append(box)
    return boxes


def surface_points(mask, spacing_mm):
    """Surfels of a boolean (z, y, x) mask: corner indices (N, 3) int64 and areas (N,) in mm^2.

    Corner indices are global (see the module docstring); an empty mask has no surfels.
    The work is proportional to the volume of ``occupied_boxes``, not of the array.
    """
    area_of_code = neighbour_code_areas_mm2(spacing_mm)
    corners, areas = [np.zeros((0, 3), dtype=np.int64)], [np.zeros(0)]
    for box in occupied_boxes(mask):
        codes = neighbour_codes(mask[box])
        surface = np.flatnonzero((codes != 0) & (codes != NUM_CODES - 1))
        local = np.stack(np.unravel_index(surface, codes.shape), axis=1)
        corners.append(local + np.array([s.start for s in box], dtype=np.int64))
        areas.append(area_of_code[codes.ravel()[surface]])
    return np.concatenate(corners), np.concatenate(areas)


# --- Distances and surface Dice -------------------------------------------------------------------

def lattice_distance_mm(offsets, spacing_mm):
    """Euclidean length (mm) of integer corner offsets (N, 3) in (z, y, x).

    Computed as ``sqrt(((dz*sz)^2 + (dy*sy)^2) + (dx*sx)^2)`` in float64, the very operations of
    SciPy's ``distance_transform_edt`` with ``sampling``, so values at exactly the tolerance
    compare the same way as in the challenge's code.
    """
    scaled = np.asarray(offsets, dtype=np.float64) * np.asarray(spacing_mm, dtype=np.float64)
    squared = scaled * scaled
    return np.sqrt((squared[:, 0] + squared[:, 1]) + squared[:, 2])


def offsets_within(spacing_mm, tolerance_mm):
    """All integer corner offsets (K, 3) with ``lattice_distance_mm <= tolerance_mm``, nearest
    first.

    Enumerates the box of candidates around the ellipsoid, so it is meant for tolerances of a few
    voxels (``lookup_offsets`` guards the size).
    """
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    radius = np.floor(tolerance_mm / spacing).astype(np.int64) + 1  # + 1: safe against rounding
    axes = [np.arange(-r, r + 1) for r in radius]
    candidates = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    distance_mm = lattice_distance_mm(candidates, spacing)
    keep = np.flatnonzero(distance_mm <= tolerance_mm)
    return candidates[keep[np.argsort(distance_mm[keep], kind="stable")]]


def found_at_offsets(corners, other_corners, offsets):
    """For each corner (N, 3), whether ``corner + offset`` is in ``other_corners`` for some offset.

    Exact lookups of linear corner keys in the sorted keys of the other surface; a corner found
    at one offset is not looked up again. Cost: about N * len(offsets) * log(M).
    """
    result = np.zeros(len(corners), dtype=bool)
    if len(corners) == 0 or len(other_corners) == 0:
        return result
    margin = np.abs(offsets).max(axis=0)
    shape = np.maximum(corners.max(axis=0), other_corners.max(axis=0)) + 2 * margin + 1
    keys = np.ravel_multi_index((corners + margin).T, shape)
    other_keys = np.sort(np.ravel_multi_index((other_corners + margin).T, shape))
    steps = np.asarray(offsets) @ np.array([shape[1] * shape[2], shape[2], 1])
    remaining = np.arange(len(corners))
    for step in steps:
        wanted = keys[remaining] + step
        position = np.minimum(np.searchsorted(other_keys, wanted), len(other_keys) - 1)
        hit = other_keys[position] == wanted
        result[remaining[hit]] = True
        remaining = remaining[~hit]
        if remaining.size == 0:
            break
    return result


def nearest_within_kdtree(corners, other_corners, spacing_mm, tolerance_mm):
    """For each corner (N, 3), whether its nearest corner in ``other_corners`` is within tolerance.

    The nearest corner, in mm, comes from a k-d tree searched only up to the tolerance plus
    ``SEARCH_SLACK_MM`` (cKDTree excludes the bound itself); it is re-measured exactly with
    ``lattice_distance_mm`` and compared with ``<=``.
    """
    result = np.zeros(len(corners), dtype=bool)
    if len(corners) == 0 or len(other_corners) == 0:
        return result
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    tree = cKDTree(other_corners * spacing, balanced_tree=False, compact_nodes=False)
    _, nearest = tree.query(corners * spacing, distance_upper_bound=tolerance_mm + SEARCH_SLACK_MM)
    found = np.flatnonzero(nearest < len(other_corners))
    offsets = corners[found] - other_corners[nearest[found]]
    result[found] = lattice_distance_mm(offsets, spacing) <= tolerance_mm
    return result


def lookup_offsets(spacing_mm, tolerance_mm):
    """The nearest lattice offsets within the tolerance, at most ``MAX_LOOKUP_OFFSETS`` of them,
    and whether they are all of them. Only the zero offset (not all) when there would be too many
    candidates to enumerate (``MAX_OFFSET_GRID``)."""
    reach = np.floor(tolerance_mm / np.asarray(spacing_mm, dtype=np.float64)) + 1
    if np.prod(2 * reach + 1) > MAX_OFFSET_GRID:
        return np.zeros((1, 3), dtype=np.int64), False
    offsets = offsets_within(spacing_mm, tolerance_mm)
    return offsets[:MAX_LOOKUP_OFFSETS], len(offsets) <= MAX_LOOKUP_OFFSETS


def within_tolerance(corners, other_corners, spacing_mm, tolerance_mm):
    """For each corner (N, 3), whether some corner of ``other_corners`` is at most tolerance_mm
    away.

    First the nearest lattice offsets are looked up (``found_at_offsets``); when they are all the
    offsets in reach (e.g. 1 mm at 0.8 x 0.8 x 2.5 mm: 5 offsets) that is the answer. Otherwise
    the corners not yet found go to ``nearest_within_kdtree``. The cost grows with the number of
    corners, never with the volume around them. All False when ``other_corners`` is empty.
    """
    if not tolerance_mm >= 0:
        raise ValueError(f"the tolerance must be >= 0 mm, not {tolerance_mm}")
    offsets, complete = lookup_offsets(spacing_mm, tolerance_mm)
    result = found_at_offsets(corners, other_corners, offsets)
    if not complete:
        rest = np.flatnonzero(~result)
        result[rest] = nearest_within_kdtree(corners[rest], other_corners, spacing_mm, tolerance_mm)
    return result


def surface_dice_of_points(points_a, points_b, spacing_mm, tolerance_mm):
    """Surface Dice (in [0, 1]) of two surfel sets from ``surface_points`` (see module docstring).

    Both empty: 1.0. Exactly one empty: 0.0.
    """
    (corners_a, areas_a), (corners_b, areas_b) = points_a, points_b
    if len(areas_a) == 0 and len(areas_b) == 0:
        return 1.0
    total_mm2 = areas_a.sum() + areas_b.sum()
    a_near_b = within_tolerance(corners_a, corners_b, spacing_mm, tolerance_mm)
    b_near_a = within_tolerance(corners_b, corners_a, spacing_mm, tolerance_mm)
    overlap_mm2 = areas_a[a_near_b].sum() + areas_b[b_near_a].sum()
    return float(overlap_mm2 / total_mm2)


def surface_dice(mask_a, mask_b, spacing_mm, tolerance_mm):
    """Surface Dice (NSD) of two boolean (z, y, x) masks at ``tolerance_mm``; symmetric in a, b.

    A surfel counts when the other surface has a surfel at distance <= tolerance_mm. Both masks
    empty: 1.0; exactly one empty: 0.0 (the FLARE rules; the reference library itself gives NaN
    for two empty masks, and fails under NumPy 2 when one is empty).
    """
    return surface_dice_of_points(surface_points(mask_a, spacing_mm),
                                  surface_points(mask_b, spacing_mm), spacing_mm, tolerance_mm)
