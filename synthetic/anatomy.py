"""Synthetic CT drawn around a real patient's anatomy: organ label maps rendered as CT.

A label map of a real abdomen (liver, kidneys, spleen, pancreas and neighbours such as the
gallbladder, stomach, aorta and bowel; no image) is turned into a CT case in the manner of
SynthSeg (Billot et al., 2023): the structures of the map keep their real shape and place, and the
procedural generator (synthetic.generator) builds the rest of the patient around them and chooses
the appearance.

How a case is made
------------------
1. The map is read and checked; the structures it covers come from the catalogue beside it
   (``anatomy.json``: a structure it does not cover may be in the body but reads as 0) or, without
   one, are the structures present.
2. Augmentation of the anatomy (per seed, optional): a scaling of 0.9-1.1 (each axis within 5 % of
   the others), a rotation of a few degrees and a smooth B-spline deformation of a few mm. Never a
   left-right mirror: the liver and the spleen keep their sides.
3. A procedural patient is drawn from the seed exactly as ``generate_case(seed)`` draws it, then
   fitted to the real anatomy: its frame is placed so that the spine lies behind the aorta and
   between the kidneys and the right diaphragm dome just above the liver; the domes and the
   diaphragm's curvature rise over every real organ; the abdominal cavity widens until it holds
   them all. Body wall, fat, skeleton, lungs, heart, vessels and bowel follow from the patient.
4. Real structures become fields (signed distance in mm) on the generator's coarse grid. Organs
   the map does not cover (a kidney, the pancreas) are drawn by the generator: a drawn kidney is
   first moved (at most 30 mm, its vessels and ureter dragged along) to where real structures
   take at most 2 % of it, then, like the pancreas, carved clear of every real structure;
   procedural neighbours keep clear of real ones too.
5. Appearance is the generator's, per seed: contrast phase, tissue HU, textures, fatty liver and
   pancreas, noise, slice thickness; lesions (cysts and tumours) are added inside the organs and
   stay part of the organ's label, as FLARE labels them.
6. Labels: the map's covered organs, resampled (nearest neighbour, through the augmentation) onto
   the output grid, and the generator's organs wherever the map holds nothing. On the map's own
   grid without augmentation they equal the map's organs voxel for voxel.

Neighbours are drawn as what they are (bile in the gallbladder, content and gas in the stomach and
bowel, contrast in the vessels) and never labelled: they are the confusers the networks must learn.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from app.geometry import IDENTITY_DIRECTION
from synthetic.appearance import _scan
from synthetic.fields import _FAR_MM, Field, _ellipsoid, _ramp
from synthetic.generator import _organ_labels, write_pair
from synthetic.grids import CaseGeometry, Lattice, _coarse_grid, _overlap, random_geometry
from synthetic.patient import Patient
from synthetic.scene import _body_box, _calibrate, _render, _Scene

# The label values of ../shared/anatomy (its README): 0 is background or unknown.
STRUCTURES = {
    1: "liver", 2: "kidneys", 3: "spleen", 4: "pancreas", 5: "gallbladder", 6: "stomach",
    7: "aorta", 8: "inferior_vena_cava", 9: "esophagus", 10: "portal_splenic_vein",
    11: "adrenal_glands", 12: "duodenum", 13: "colon", 14: "small_intestine", 15: "rectum",
    16: "urinary_bladder", 17: "femoral_heads",
}
VALUES = {name: value for value, name in STRUCTURES.items()}
# Output labels (as synthetic.LABELS and the FLARE task): structures 1-4 keep their values.
ORGAN_LABELS = {"liver": 1, "kidneys": 2, "spleen": 3, "pancreas": 4}

# Where a neighbour goes in the generator's scene: ``fields`` are looked up by the procedural
# painting (vessels, gallbladder), ``real`` replaces a procedural structure of the same name.
_SCENE_FIELD = {"gallbladder": "gallbladder", "aorta": "aorta", "inferior_vena_cava": "ivc",
                "portal_splenic_vein": "portal"}
_SCENE_REAL = {"stomach": "stomach", "esophagus": "oesophagus", "adrenal_glands": "adrenal",
               "duodenum": "duodenum", "colon": "colon", "rectum": "colon",
               "small_intestine": "small_bowel", "urinary_bladder": "bladder"}
# Structures that pass through the diaphragm or lie outside the abdomen: no diaphragm fit.
_THROUGH_DIAPHRAGM = {"aorta", "inferior_vena_cava", "esophagus", "femoral_heads"}

CATALOGUE = "anatomy.json"
HELD_OUT_FRACTION = 0.15


# ------------------------------------------------------------------------------------------------
# Reading label maps
# ------------------------------------------------------------------------------------------------


@dataclass
class LabelMap:
    """A real patient's label map: values of STRUCTURES on the source's own grid."""

    path: Path
    image: sitk.Image  # uint8
    covers: frozenset  # structure names annotated in the source
    source: str = ""
    patient: str = ""

    @property
    def name(self) -> str:
        return self.path.name.split(".")[0]

    def array(self) -> np.ndarray:
        return sitk.GetArrayViewFromImage(self.image)

    @functools.cached_property
    def boxes(self) -> list:
        """Index box (z, y, x slices) of each structure value 1.. (None where absent)."""
        return ndimage.find_objects(self.array(), max_label=max(STRUCTURES))

    def organ_centre(self, step=(2, 4, 4)) -> np.ndarray:
        """Physical point (mm) of the mean voxel of the covered organs, sampled every ``step``
        voxels along (z, y, x): the place the generator builds the patient around."""
        covered = [VALUES[n] for n in self.covers if n in ORGAN_LABELS]
        sampled = self.array()[::step[0], ::step[1], ::step[2]]
        voxels = np.argwhere(np.isin(sampled, covered))
        if not len(voxels):
            raise ValueError(f"{self.path}: holds none of the organs {', '.join(ORGAN_LABELS)}")
        return np.asarray(self.image.TransformContinuousIndexToPhysicalPoint(
            (voxels.mean(axis=0) * step)[::-1].tolist()))


@functools.lru_cache(maxsize=8)
def _catalogue_cases(path: str, modified_ns: int) -> dict:
    """A catalogue's cases, read once per version of the file (every map looks its entry up)."""
    return json.loads(Path(path).read_text()).get("cases", {})


def catalogue_entry(path: Path) -> dict | None:
    """The catalogue entry of a map file (``anatomy.json`` in its folder or the one above)."""
    path = Path(path)
    for folder in (path.parent, path.parent.parent):
        catalogue = folder / CATALOGUE
        if catalogue.is_file():
            cases = _catalogue_cases(str(catalogue), catalogue.stat().st_mtime_ns)
            for name, entry in cases.items():
                if Path(entry.get("file", "")).name == path.name or name == path.name.split(".")[0]:
                    return entry
    return None


def read_label_map(path, covers=None) -> LabelMap:
    """Read and check a label map; ``covers`` (structure names) overrides the catalogue's."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such label map")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise ValueError(
            f"{path}: cannot be read as an image ({str(error).strip()[:200]})") from error
    if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() != 3:
        raise ValueError(f"{path}: a label map must be one 3-D scalar image")
    if image.GetPixelID() not in (sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16,
                                  sitk.sitkUInt32, sitk.sitkInt32, sitk.sitkInt64,
                                  sitk.sitkUInt64):
        raise ValueError(f"{path}: label maps hold integers, this one holds "
                         f"{image.GetPixelIDTypeAsString()}")
    array = sitk.GetArrayViewFromImage(image)
    values = np.unique(array)
    unknown = sorted(int(v) for v in values if v != 0 and int(v) not in STRUCTURES)
    if unknown:
        raise ValueError(f"{path}: label values {unknown} are not structures of the anatomy "
                         f"label set (1-{max(STRUCTURES)}: {', '.join(STRUCTURES.values())})")
    if image.GetPixelID() != sitk.sitkUInt8:
        image = sitk.Cast(image, sitk.sitkUInt8)
    entry = catalogue_entry(path)
    if covers is None:
        covers = entry["covers"] if entry else [STRUCTURES[int(v)] for v in values if v != 0]
    unknown_names = sorted(set(covers) - set(VALUES))
    if unknown_names:
        raise ValueError(f"{path}: covers unknown structures {unknown_names}")
    return LabelMap(path, image, frozenset(covers), (entry or {}).get("source", ""),
                    (entry or {}).get("patient", path.name.split(".")[0]))


def list_maps(path) -> list[Path]:
    """The label map files of ``path``: itself, or a folder's (or its labels/ folder's) maps."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such label map or folder")
    folder = path / "labels" if (path / "labels").is_dir() else path
    maps = sorted(p for p in folder.iterdir() if p.name.endswith((".nii.gz", ".nii", ".mha",
                                                                   ".nrrd")))
    if not maps:
        raise ValueError(f"{path}: holds no label maps (.nii.gz, .nii, .mha, .nrrd)")
    return maps


def map_for_seed(path, seed: int) -> Path:
    """The map a case of ``seed`` renders: a file itself, or a folder's maps taken in turn."""
    maps = list_maps(path)
    return maps[seed % len(maps)]


def held_out(paths, fraction: float = HELD_OUT_FRACTION) -> set[str]:
    """Names of the maps kept out of training: about ``fraction`` of each source's patients.

    Chosen by a hash of source and patient, so the choice is stable whatever maps are added,
    and every map of a patient is on the same side.
    """
    by_source: dict[str, dict[str, list[str]]] = {}
    for path in paths:
        path = Path(path)
        entry = catalogue_entry(path) or {}
        name = path.name.split(".")[0]
        source = entry.get("source") or name.rsplit("_", 1)[0]
        patient = entry.get("patient") or name
        by_source.setdefault(source, {}).setdefault(patient, []).append(name)
    out = set()
    for source, patients in by_source.items():
        count = int(round(fraction * len(patients)))
        ranked = sorted(patients, key=lambda p: hashlib.sha256(f"{source}/{p}".encode())
                        .hexdigest())
        for patient in ranked[:count]:
            out.update(patients[patient])
    return out


# ------------------------------------------------------------------------------------------------
# Augmentation of the anatomy
# ------------------------------------------------------------------------------------------------


class Augmentation:
    """Render space -> map space: p_map = c + A (p + w(p) - c), with a small smooth warp w.

    Identity when not ``enabled``.
    """

    def __init__(self, rng: np.random.Generator, label_map: LabelMap, centre_mm,
                 enabled: bool = True, warp_mm: float = 2.5, control_mm: float = 60.0):
        self.centre = np.asarray(centre_mm, float)
        self.enabled = enabled
        if not enabled:
            self.matrix = np.eye(3)
            self.transform = sitk.Transform(3, sitk.sitkIdentity)
            self.reach_mm = 0.0
            return
        scale = rng.uniform(0.9, 1.1) * rng.uniform(0.95, 1.05, size=3)
        degrees = rng.normal(0.0, [3.0, 3.0, 6.0])  # about x, y (small) and z
        rotation = np.eye(3)
        for axis, angle in enumerate(np.radians(degrees)):
            c, s = math.cos(angle), math.sin(angle)
            r = np.eye(3)
            i, j = [k for k in range(3) if k != axis]
            r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
            rotation = rotation @ r
        self.matrix = rotation @ np.diag(scale)
        affine = sitk.AffineTransform(3)
        affine.SetMatrix(tuple(float(v) for v in self.matrix.ravel()))
        affine.SetCenter(tuple(float(v) for v in self.centre))
        image = label_map.image
        extent = np.asarray(image.GetSize()) * np.asarray(image.GetSpacing())
        mesh = [max(1, int(round(e / control_mm))) for e in extent]
        spline = sitk.BSplineTransformInitializer(image, mesh, 3)
        coefficients = rng.normal(0.0, warp_mm, size=len(spline.GetParameters()))
        spline.SetParameters(tuple(float(v) for v in coefficients))
        # The spline sampled every 4 mm and interpolated linearly: a B-spline evaluated at every
        # voxel of a 512 x 512 x 200 grid costs ten times more, for sub-millimetre differences.
        step = 4.0
        room = 8 * step
        direction = np.asarray(image.GetDirection()).reshape(3, 3)
        start = np.asarray(image.GetOrigin()) - direction @ np.full(3, room)
        size = [int(math.ceil((e + 2 * room) / step)) + 1 for e in extent]
        field = sitk.TransformToDisplacementField(
            spline, sitk.sitkVectorFloat64, size, tuple(float(v) for v in start), (step,) * 3,
            image.GetDirection())
        warp = sitk.DisplacementFieldTransform(field)
        # SimpleITK applies a composite's transforms last-added first: the warp, then the affine.
        self.transform = sitk.CompositeTransform([affine, warp])
        self.reach_mm = 4.0 * warp_mm

    def to_render(self, points_map) -> np.ndarray:
        """Map-space points (..., 3) to render space, the warp left out (it is a few mm)."""
        points = np.asarray(points_map, float)
        return self.centre + (points - self.centre) @ np.linalg.inv(self.matrix).T


# ------------------------------------------------------------------------------------------------
# Fitting the procedural patient to the real anatomy
# ------------------------------------------------------------------------------------------------


def _structure_points(label_map: LabelMap, augmentation: Augmentation, rng, per_structure=3000):
    """Per covered structure present: (all-voxel centroid, sample of points), render space."""
    array = label_map.array()
    image = label_map.image
    boxes = label_map.boxes
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    spacing, origin = np.asarray(image.GetSpacing()), np.asarray(image.GetOrigin())
    out = {}
    for value, box in enumerate(boxes, start=1):
        name = STRUCTURES[value]
        if box is None or name not in label_map.covers:
            continue
        zyx = np.argwhere(array[box] == value)
        zyx += [b.start for b in box]
        xyz = zyx[:, ::-1].astype(float)
        centroid = origin + direction @ (xyz.mean(axis=0) * spacing)
        if len(xyz) > per_structure:
            xyz = xyz[rng.choice(len(xyz), per_structure, replace=False)]
        points = origin + (xyz * spacing) @ direction.T
        out[name] = (augmentation.to_render(centroid), augmentation.to_render(points))
    return out


def _procedural_centroids(patient: Patient) -> dict[str, np.ndarray]:
    """Centroids (patient frame) of the procedural organs, measured on a 5 mm lattice."""
    boxes = [patient.liver.box(), patient.spleen.box(), patient.kidneys["kidney_l"].box(),
             patient.kidneys["kidney_r"].box()]
    lo = np.min([b[0] for b in boxes], axis=0) - 20
    hi = np.max([b[1] for b in boxes], axis=0) + 20
    scene = _Scene(patient, Lattice.covering(lo, hi, [5.0] * 3))
    out = {}
    for name, field in scene.labelled_organs().items():
        if field is None or not (field.values > 0).any():
            continue
        Z, Y, X = scene.grid.coords(field.sl)
        inside = field.values > 0
        out[name] = np.array([np.broadcast_to(X, inside.shape)[inside].mean(),
                              np.broadcast_to(Y, inside.shape)[inside].mean(),
                              np.broadcast_to(Z, inside.shape)[inside].mean()])
    return out


def _polyline_at_z(points, z):
    """(x, y) of a polyline (N, 3) at height z (nearest end outside its range)."""
    points = np.asarray(points, float)
    order = np.argsort(points[:, 2])
    p = points[order]
    return np.array([np.interp(z, p[:, 2], p[:, 0]), np.interp(z, p[:, 2], p[:, 1])])


@dataclass
class Fit:
    """Where the patient frame lies in render space (render = patient + offset), and which
    kidney sides the map holds (by the side of the spine)."""

    offset: np.ndarray
    kidney_sides: tuple[str, ...]
    liver_dome_seen: bool


def fit_patient(patient: Patient, points: dict, map_top_z: float, rng) -> Fit:
    """Place the patient frame in render space and reshape the body around the real points.

    Modifies ``patient``: diaphragm domes and curvature, heart height, cavity size.
    """
    procedural = _procedural_centroids(patient)
    centroid = {name: c for name, (c, _) in points.items()}
    # Midline (patient x = 0 at the spine): the aorta runs left of it, the IVC right of it.
    if "liver" in centroid:
        midline = centroid["liver"][0] - procedural["liver"][0]
    else:
        midline = float(np.mean([p[:, 0].mean() for _, p in points.values()]))
    vessel = next((n for n in ("aorta", "inferior_vena_cava") if n in points), None)
    vessel_xy = _polyline_at_z(patient.aorta if vessel == "aorta" else patient.ivc, 0.0)
    if vessel:
        midline = float(np.median(points[vessel][1][:, 0])) - vessel_xy[0]
    kidney_sides = ()
    if "kidneys" in points:
        kidney = points["kidneys"][1]
        left, right = kidney[kidney[:, 0] > midline], kidney[kidney[:, 0] <= midline]
        kidney_sides = tuple(side for side, pts in (("kidney_l", left), ("kidney_r", right))
                             if len(pts) > 0.1 * len(kidney))
        if len(kidney_sides) == 2:
            midline = 0.5 * (left[:, 0].mean() + right[:, 0].mean()) - 0.5 * (
                procedural["kidney_l"][0] + procedural["kidney_r"][0])

    # Height: the right dome just above the liver, where the map shows the liver's top.
    liver_top = None
    if "liver" in points:
        liver = points["liver"][1]
        top = liver[np.argmax(liver[:, 2])]
        if top[2] < map_top_z - 6.0:
            liver_top = top
    if liver_top is not None:
        gap = rng.uniform(2.0, 6.0)
        height = liver_top[2] + gap - patient.dome_r[0]
    else:
        shared = [n for n in ("liver", "spleen", "kidney_l", "kidney_r") if n in procedural and (
            n in centroid or (n.startswith("kidney") and n in kidney_sides))]
        real_z = [centroid[n][2] if n in centroid else centroid["kidneys"][2] for n in shared]
        height = float(np.mean([r - procedural[n][2] for n, r in zip(shared, real_z)])) \
            if shared else float(np.mean([c[2] for c in centroid.values()]))

    # Depth: the aorta (or the IVC) in front of the spine; else the kidneys beside it; else the
    # liver.
    if vessel:
        tube = points[vessel][1]
        near = tube[np.abs(tube[:, 2] - height) < 30.0]
        near = near if len(near) > 10 else tube
        depth = float(np.median(near[:, 1])) - vessel_xy[1]
    elif len(kidney_sides) == 2:
        depth = centroid["kidneys"][1] - 0.5 * (procedural["kidney_l"][1]
                                                 + procedural["kidney_r"][1])
    elif "liver" in centroid:
        depth = centroid["liver"][1] - procedural["liver"][1]
    else:
        depth = float(np.mean([c[1] for c in centroid.values()]))
    offset = np.array([midline, depth, height])
    # How far the anchors above may be off: the aorta places the spine to a few mm, the kidneys
    # bracket it left to right, the liver alone says little.
    reach = (8.0, 8.0) if vessel else (20.0, 40.0) if len(kidney_sides) == 2 else (
        40.0, 40.0)
    offset[:2] += _spine_clearance(patient, points, offset, reach)

    local = {name: pts - offset for name, (_, pts) in points.items()}
    _fit_diaphragm(patient, local, liver_top - offset if liver_top is not None else None, rng)
    _fit_cavity(patient, np.vstack(list(local.values())))
    return Fit(offset, kidney_sides, liver_top is not None)


def _spine_clearance(patient: Patient, points: dict, offset, reach, step_mm: float = 4.0):
    """The (x, y) shift of the patient frame, within ``reach``, that keeps the spine (vertebral
    bodies and the posterior elements and back muscles behind them) clear of the real organs;
    among equals, the smallest shift."""
    solid = [pts for n, (_, pts) in points.items() if n not in _THROUGH_DIAPHRAGM | {
        "portal_splenic_vein"}]
    if not solid:
        return np.zeros(2)
    q = np.vstack(solid) - offset
    sx, sy = patient.spine_xy(q[:, 2])
    half_w, half_ap = patient.vb_half_w + 5.0, patient.vb_half_ap + 5.0
    best, best_cost = np.zeros(2), np.inf
    for dx in np.arange(-reach[0], reach[0] + 1e-6, step_mm):
        for dy in np.arange(-reach[1], reach[1] + 1e-6, step_mm):
            ux = q[:, 0] - dx - sx
            uy = q[:, 1] - dy - sy
            body = (ux / half_w) ** 2 + (uy / half_ap) ** 2 < 1.0
            behind = (np.abs(ux) < 30.0) & (uy > 0.0) & (uy < 70.0)
            cost = float(np.mean(body | behind)) + 1e-4 * (dx * dx + dy * dy) / step_mm
            if cost < best_cost:
                best, best_cost = np.array([dx, dy]), cost
    return best


def _fit_diaphragm(patient: Patient, local: dict, liver_top, rng):
    """Domes over the liver (right) and spleen or stomach (left); no organ above the diaphragm."""
    before = patient.dome_r[0]
    if liver_top is not None:
        patient.dome_r = (float(liver_top[2] + rng.uniform(2.0, 6.0)),
                          float(np.clip(liver_top[0], -110, -30)),
                          float(np.clip(liver_top[1], -30, 30)))
    for name in ("spleen", "stomach"):
        if name in local:
            pts = local[name]
            top = pts[np.argmax(pts[:, 2])]
            if top[2] + 3.0 > patient.dome_l[0]:
                patient.dome_l = (float(top[2] + rng.uniform(2.0, 6.0)),
                                  float(np.clip(top[0], 30, 110)), float(np.clip(top[1], -30, 40)))
    below = np.vstack([p for n, p in local.items() if n not in _THROUGH_DIAPHRAGM] or
                      [np.zeros((0, 3))])
    for _ in range(6):
        if not len(below):
            break
        deficit = float(np.max(below[:, 2] + 3.0 - patient.diaphragm_z(below[:, 0], below[:, 1])))
        if deficit <= 0:
            break
        patient.diaph_c_ant *= 0.75
        patient.diaph_c_post *= 0.75
        patient.diaph_c_lat *= 0.75
    else:
        if len(below):
            deficit = float(np.max(below[:, 2] + 3.0
                                   - patient.diaphragm_z(below[:, 0], below[:, 1])))
            if deficit > 0:
                patient.dome_r = (patient.dome_r[0] + deficit, *patient.dome_r[1:])
                patient.dome_l = (patient.dome_l[0] + deficit, *patient.dome_l[1:])
    # The heart sits on the right dome.
    patient.heart.center = patient.heart.center + [0.0, 0.0, patient.dome_r[0] - before]


def _fit_cavity(patient: Patient, points: np.ndarray, margin_mm: float = 4.0):
    """Widen the abdominal cavity (inside the muscle wall) until it holds every real point."""
    X, Y, Z = points[:, 0], points[:, 1], points[:, 2]
    for _ in range(3):
        a, b_ant, b_post = patient.section(Z)
        front = Y < 0
        b = np.where(front, b_ant, b_post)
        n = np.where(front, patient.cav_n_ant, patient.cav_n_post)
        r = ((np.abs(X) / a) ** n + (np.abs(Y) / b) ** n) ** (1.0 / n)
        radius = np.maximum(np.hypot(X, Y), 10.0)
        need = float(np.max(r * (1.0 + margin_mm / radius)))
        if need <= 1.0:
            return
        patient.cav_a *= need
        patient.cav_b_ant *= need
        patient.cav_b_post *= need


# ------------------------------------------------------------------------------------------------
# Real structures on the coarse grid
# ------------------------------------------------------------------------------------------------


def _signed_distance(fraction: np.ndarray, spacing_zyx) -> np.ndarray:
    """Field (mm, positive inside) from an occupancy fraction: exact near the surface (the
    fraction's own sub-voxel position), Euclidean distance further away."""
    inside = fraction >= 0.5
    h = float(np.mean(spacing_zyx))
    if not inside.any():
        return np.full(fraction.shape, -_FAR_MM, np.float32)
    d_in = ndimage.distance_transform_edt(inside, sampling=spacing_zyx)
    d_out = ndimage.distance_transform_edt(~inside, sampling=spacing_zyx)
    far = np.where(inside, d_in - 0.5 * h, -(d_out - 0.5 * h))
    near = (fraction - 0.5) * h
    edge = (fraction > 0.0) & (fraction < 1.0)
    return np.where(edge, near, far).astype(np.float32)


def real_fields(label_map: LabelMap, augmentation: Augmentation, grid: Lattice,
                offset: np.ndarray, margin_mm: float = 12.0) -> dict[str, Field]:
    """Field of each covered structure present, on the coarse grid (patient frame)."""
    array = label_map.array()
    image = label_map.image
    boxes = label_map.boxes
    out = {}
    for value, box in enumerate(boxes, start=1):
        name = STRUCTURES[value]
        if box is None or name not in label_map.covers:
            continue
        # The structure's own box of the map, one voxel of room on each side.
        box = tuple(slice(max(b.start - 1, 0), min(b.stop + 1, n))
                    for b, n in zip(box, array.shape))
        mask = sitk.GetImageFromArray((array[box] == value).astype(np.float32))
        mask.SetSpacing(image.GetSpacing())
        mask.SetDirection(image.GetDirection())
        mask.SetOrigin(image.TransformIndexToPhysicalPoint([int(b.start) for b in box[::-1]]))
        corners = np.array([mask.TransformContinuousIndexToPhysicalPoint(
            [float(i), float(j), float(k)]) for i in (-0.5, mask.GetSize()[0] - 0.5)
            for j in (-0.5, mask.GetSize()[1] - 0.5) for k in (-0.5, mask.GetSize()[2] - 0.5)])
        render = augmentation.to_render(corners) - offset
        reach = margin_mm + augmentation.reach_mm
        sl = grid.box(render.min(axis=0) - reach, render.max(axis=0) + reach)
        if sl is None:
            continue
        shape = [s.stop - s.start for s in sl]
        fraction = sitk.Resample(
            mask, [shape[2], shape[1], shape[0]], augmentation.transform, sitk.sitkLinear,
            tuple(float(v) for v in grid.block_origin(sl) + offset),
            tuple(float(v) for v in grid.spacing), IDENTITY_DIRECTION,
            0.0, sitk.sitkFloat32)
        values = _signed_distance(sitk.GetArrayViewFromImage(fraction), grid.spacing[::-1])
        if (values > 0).any() or (values > -0.5 * grid.spacing.max()).any():
            out[name] = Field(sl, values)
    return out


def _split_sides(field: Field, grid: Lattice) -> dict[str, Field]:
    """A both-kidneys field split by the side of the spine (patient x > 0 is left)."""
    x = grid.x[field.sl[2]][None, None, :]
    return {"kidney_l": Field(field.sl, np.where(x > 0, field.values, -_FAR_MM)
                              .astype(np.float32)),
            "kidney_r": Field(field.sl, np.where(x <= 0, field.values, -_FAR_MM)
                              .astype(np.float32))}


CARVE_GAP_MM = 2.0  # drawn organs keep this far from real structures
CLIP_CAVITY_MM = 1.5  # synthetic.scene's organ_field defaults
KIDNEY_CLIP_DIAPHRAGM_MM = 6.0
MOVE_MAX_MM = 30.0
MOVE_ACCEPTED = 0.02


def _clearing_shift(inside: np.ndarray, blocked: np.ndarray, start, spacing_zyx, reach):
    """A (z, y, x) voxel shift, within ``reach`` voxels per axis and MOVE_MAX_MM, of the mask
    ``inside`` (placed at ``start`` in ``blocked``): the shortest after which ``blocked`` holds at
    most MOVE_ACCEPTED of it, else the one after which it holds least (ties: the shorter, then
    the first in (z, y, x) order). Shares are counted on at most 4,000 of the mask's voxels."""
    points = np.argwhere(inside)
    points = points[::-(-len(points) // 4000)] + np.asarray(start)
    steps = [np.arange(-r, r + 1) for r in reach]
    shifts = np.stack(np.meshgrid(*steps, indexing="ij"), axis=-1).reshape(-1, 3)
    length = np.linalg.norm(shifts * np.asarray(spacing_zyx), axis=1)
    keep = length <= MOVE_MAX_MM + 1e-6
    shifts = shifts[keep][np.argsort(length[keep], kind="stable")]
    allowed = MOVE_ACCEPTED * len(points)
    lowest, highest = points.min(axis=0), points.max(axis=0)
    best, best_count = None, None
    for shift in shifts:
        if (lowest + shift < 0).any() or (highest + shift >= blocked.shape).any():
            continue
        moved = points + shift
        count = np.count_nonzero(blocked[moved[:, 0], moved[:, 1], moved[:, 2]])
        if count <= allowed:
            return shift
        if best_count is None or count < best_count:
            best, best_count = shift, count
    return best


def _drag(points: np.ndarray, move_mm: np.ndarray) -> np.ndarray:
    """A polyline that starts at a moved organ: its first point moves by ``move_mm``, the others
    by less in proportion to their distance along the line from it, the last not at all."""
    points = np.asarray(points, float)
    along = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))])
    weight = 1.0 - along / max(along[-1], 1e-6)
    return points + weight[:, None] * move_mm


class AnatomyScene(_Scene):
    """The generator's scene with real structures: real organs replace procedural ones, real
    neighbours are painted as what they are, and procedural structures keep clear of both."""

    def __init__(self, patient, grid, rng, fields: dict[str, Field], kidney_sides):
        super().__init__(patient, grid, rng)
        self.real_organs = {}
        for name, field in fields.items():
            if name == "kidneys":
                sides = _split_sides(field, grid)
                self.real_organs.update({s: sides[s] for s in kidney_sides})
            elif name in ORGAN_LABELS:
                self.real_organs[name] = field
            elif name in _SCENE_FIELD:
                self.fields[_SCENE_FIELD[name]] = field
                if name == "portal_splenic_vein":
                    self.fields["splenic_vein"] = None
            elif name in _SCENE_REAL:
                key = _SCENE_REAL[name]  # the rectum joins the colon
                self.real[key] = _union(self.real[key], field, grid) if key in self.real else field
        self.femoral_heads = fields.get("femoral_heads")
        everything = list(self.real_organs.values()) + [
            fields[n] for n in fields if n not in ORGAN_LABELS]
        self.moved: dict[str, list[float]] = {}  # drawn kidneys moved clear: mm (x, y, z)
        self.keep_clear = [(f, 1.5) for f in everything]
        self._all_real = everything
        self._drawn_kidneys_placed = False

    def _move_clear(self, side: str):
        """Move a drawn kidney by the shortest whole-voxel translation (at most MOVE_MAX_MM) after
        which real structures (grown by the carving gap), the outside of the cavity and the space
        above the diaphragm hold at most MOVE_ACCEPTED of it, else by the one after which they
        hold least; what they still hold is carved afterwards. Carving alone cut up to half of a
        drawn right kidney where a real liver reached down."""
        organ = self.p.kidneys[side]
        field = self.organ_field(organ, clip_diaphragm=KIDNEY_CLIP_DIAPHRAGM_MM)
        if field is None or not (field.values > 0).any():
            return
        grid = self.grid
        reach = [int(MOVE_MAX_MM // d) for d in grid.spacing[::-1]]  # (z, y, x) voxels
        around = tuple(slice(max(s.start - r, 0), min(s.stop + r, n))
                       for s, r, n in zip(field.sl, reach, grid.shape))
        blocked = self.cavity_at(around) < CLIP_CAVITY_MM
        blocked |= self.below_diaphragm(around) < KIDNEY_CLIP_DIAPHRAGM_MM
        for other in self._all_real:
            overlap = _overlap(around, other.sl)
            if overlap is not None:
                blocked[overlap[0]] |= other.values[overlap[1]] > -CARVE_GAP_MM
        shift = _clearing_shift(field.values > 0, blocked,
                                [s.start - a.start for s, a in zip(field.sl, around)],
                                grid.spacing[::-1], reach)
        if shift is None or not shift.any():
            return
        move_mm = shift[::-1] * grid.spacing  # (x, y, z)
        index = 0 if side == "kidney_l" else 1
        organ.center = organ.center + move_mm
        p = self.p
        p.renal_veins[index] = _drag(p.renal_veins[index], move_mm)
        p.ureters[index] = _drag(p.ureters[index], move_mm)
        p.renal_arteries[index] = _drag(p.renal_arteries[index][::-1], move_mm)[::-1]
        self.moved[side] = [round(float(v), 1) for v in move_mm]

    def labelled_organs(self, upto: str | None = None):
        if not self._drawn_kidneys_placed:
            self._drawn_kidneys_placed = True
            for side in ("kidney_l", "kidney_r"):
                if side not in self.real_organs:
                    self._move_clear(side)
        real_gb = self.fields.get("gallbladder") if "gallbladder" in self.fields else None
        out = super().labelled_organs(upto)
        if real_gb is not None:
            self.fields["gallbladder"] = real_gb
        elif self.fields.get("gallbladder") is not None:
            for other in self._all_real:
                self.fields["gallbladder"].carve(other, CARVE_GAP_MM)
        for name in list(out):
            if name in self.real_organs:
                out[name] = self.real_organs[name]
            elif out[name] is not None:
                for other in self._all_real:
                    out[name].carve(other, CARVE_GAP_MM)
        self.fields.update(out)
        return out

    def kidney_interior(self, side, f):
        if side not in self.real_organs:
            return super().kidney_interior(side, f)
        H, organ = self.p.hu, self.p.kidneys[side]
        Z, Y, X = self.grid.coords(f.sl)
        inside = f.values > 0
        depth = f.values
        weights = np.clip(depth, 0, None)
        total = max(float(weights.sum()), 1e-6)
        cx = float((weights * X).sum() / total)
        cy = float((weights * Y).sum() / total)
        # The hilum faces the spine and a little forward.
        sign = 1.0 if side == "kidney_l" else -1.0
        hx, hy = -sign / math.hypot(1.0, 0.6), -0.6 / math.hypot(1.0, 0.6)
        toward_hilum = (X - cx) * hx + (Y - cy) * hy
        pyramids = (depth > organ.cortex_mm) & (self.texture(f.sl, 8.0, 1.0) > -0.2)
        value = np.where(pyramids, H["medulla"], H["cortex"]).astype(np.float32)
        deepest = float(depth[inside].max()) if inside.any() else 0.0
        sinus = np.minimum(depth - max(organ.cortex_mm * 1.6, 0.35 * deepest), toward_hilum + 4)
        value = value + _ramp(sinus, 3.0) * (H["sinus_fat"] - value)
        pelvis = np.minimum(depth - max(organ.cortex_mm * 2.2, 0.5 * deepest), toward_hilum - 4)
        return value + _ramp(pelvis, 3.0) * (H["pelvis"] - value)


def _union(a: Field, b: Field, grid: Lattice) -> Field:
    """One field for two structures (the larger value wins) on the union of their blocks."""
    sl = tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a.sl, b.sl))
    values = np.full([s.stop - s.start for s in sl], -_FAR_MM, np.float32)
    for f in (a, b):
        part = tuple(slice(s.start - u.start, s.stop - u.start) for s, u in zip(f.sl, sl))
        np.maximum(values[part], f.values, out=values[part])
    return Field(sl, values)


# ------------------------------------------------------------------------------------------------
# Lesions
# ------------------------------------------------------------------------------------------------

# Chance of any lesion in an organ and their largest radius (mm).
_LESIONS = (("liver", 0.4, 30.0), ("kidney_l", 0.2, 22.0), ("kidney_r", 0.2, 22.0),
            ("spleen", 0.1, 18.0), ("pancreas", 0.12, 14.0))
_ORGAN_HU = {"liver": "liver", "kidney_l": "cortex", "kidney_r": "cortex", "spleen": "spleen",
             "pancreas": "pancreas"}


def paint_lesions(scene: _Scene, hu: np.ndarray, organs: dict, rng) -> list[dict]:
    """Cysts and tumours inside the organs (inside their fields, so inside their labels)."""
    H, grid = scene.p.hu, scene.grid
    drawn = []
    for name, chance, largest in _LESIONS:
        organ = organs.get(name)
        if organ is None or rng.random() >= chance:
            continue
        deep = np.argwhere(organ.values > 5.0)
        if not len(deep):
            continue
        for _ in range(int(rng.integers(1, 4))):
            index = deep[rng.integers(len(deep))]
            depth = float(organ.values[tuple(index)])
            radius = float(rng.uniform(3.0, max(3.5, min(largest, 1.5 * depth))))
            centre = grid.block_origin(organ.sl) + index[::-1] * grid.spacing
            kind = str(rng.choice(["cyst", "hypodense", "hyperdense"], p=[0.45, 0.4, 0.15]))
            base = H[_ORGAN_HU[name]]
            value = {"cyst": rng.uniform(0.0, 20.0),
                     "hypodense": max(base - rng.uniform(20.0, 70.0), 5.0),
                     "hyperdense": base + rng.uniform(20.0, 80.0)}[kind]
            axes = radius * rng.uniform(0.75, 1.25, size=3)
            sl = grid.box(centre - axes.max() - 4, centre + axes.max() + 4)
            if sl is None:
                continue
            Z, Y, X = grid.coords(sl)
            field = _ellipsoid(X - centre[0], Y - centre[1], Z - centre[2], *axes)
            if kind != "cyst":  # tumours are heterogeneous, cysts are water
                value = value + scene.texture(sl, 5.0, 10.0)
            scene.paint(hu, Field(sl, np.broadcast_to(field, [s.stop - s.start for s in sl])
                                  .astype(np.float32)), value, within=organ)
            drawn.append(dict(organ=name, kind=kind, radius_mm=round(radius, 1)))
    return drawn


# ------------------------------------------------------------------------------------------------
# Grids and the case
# ------------------------------------------------------------------------------------------------


def _map_z_range(label_map: LabelMap, augmentation: Augmentation) -> tuple[float, float]:
    """Lowest and highest render-space z that the map's grid covers everywhere."""
    image = label_map.image
    size = image.GetSize()
    corners = np.array([image.TransformContinuousIndexToPhysicalPoint([float(i), float(j),
                                                                       float(k)])
                        for i in (0, size[0] - 1) for j in (0, size[1] - 1)
                        for k in (0, size[2] - 1)])
    z = augmentation.to_render(corners)[:, 2]
    # A tilted map covers its lowest and highest slices only at one end: use the inner range.
    z_sorted = np.sort(z)
    return float(z_sorted[3]), float(z_sorted[4])


def _window(geometry: CaseGeometry, z_range, organs_z, centre_xy, rng) -> CaseGeometry:
    """``geometry`` moved (and shortened along its slice axis if need be) to lie within the
    map's z range, centred on the body in x and y and in z on a height of the organs (the
    ``organs_z`` range), so that a short scan still shows some of them."""
    direction = geometry.direction_matrix
    axis = int(np.argmax(np.abs(direction[2])))
    size = list(geometry.size)
    spacing = np.asarray(geometry.spacing_mm)
    tilt = abs(direction[2, axis])
    room = max(z_range[1] - z_range[0] - 4.0, spacing[axis] * tilt)
    size[axis] = int(max(1, min(size[axis], math.floor(room / (spacing[axis] * tilt)) + 1)))
    length = (size[axis] - 1) * spacing[axis] * tilt
    z = float(np.clip(rng.uniform(*organs_z), z_range[0] + 2.0 + length / 2,
                      max(z_range[0] + 2.0 + length / 2, z_range[1] - 2.0 - length / 2)))
    centre = np.array([centre_xy[0] + rng.uniform(-15, 15), centre_xy[1] + rng.uniform(-20, 20),
                       z])
    origin = centre - direction @ (spacing * (np.asarray(size) - 1) / 2.0)
    return CaseGeometry(tuple(size), tuple(spacing), tuple(origin), geometry.direction)


def render_case(label_map: LabelMap, seed: int, geometry: CaseGeometry | str | None = None,
                augment: bool = True, in_plane_size: int = 512, max_voxels: int | None = None,
                info: dict | None = None) -> tuple[sitk.Image, sitk.Image]:
    """One CT case (image int16 HU, label uint8 on the same grid) around ``label_map``'s anatomy.

    ``geometry``: a CaseGeometry, ``"map"`` (the map's own grid) or None (a grid drawn from the
    seed as the generator draws them, moved into the map's range). Labels: 0 background,
    1 liver, 2 kidneys, 3 spleen, 4 pancreas. ``info`` (a dict) receives what was drawn.
    """
    streams = np.random.default_rng(seed).spawn(7)
    geometry_rng, patient_rng, place_rng, texture_rng, noise_rng, anatomy_rng, lesion_rng = streams
    patient = Patient(patient_rng)
    _calibrate(patient)

    augmentation = Augmentation(anatomy_rng, label_map, label_map.organ_centre(), enabled=augment)
    points = _structure_points(label_map, augmentation, anatomy_rng)
    z_range = _map_z_range(label_map, augmentation)
    fit = fit_patient(patient, points, z_range[1], anatomy_rng)
    offset = fit.offset

    if isinstance(geometry, str):
        if geometry != "map":
            raise ValueError(f"geometry must be a CaseGeometry, 'map' or None, not {geometry!r}")
        geometry = CaseGeometry.from_image(label_map.image)
    elif geometry is None:
        drawn = random_geometry(geometry_rng, in_plane_size, max_voxels)
        organs_z = np.concatenate([pts[:, 2] for name, (_, pts) in points.items()
                                   if name in ORGAN_LABELS])
        geometry = _window(drawn, z_range, (organs_z.min(), organs_z.max()), offset[:2],
                           place_rng)
    grid, physical_spacing = _coarse_grid(geometry, offset)

    fields = real_fields(label_map, augmentation, grid, offset)
    scene = AnatomyScene(patient, grid, texture_rng, fields, fit.kidney_sides)
    hu, organs, scene = _render(patient, grid, texture_rng, _body_box(patient, grid), scene)
    if scene.femoral_heads is not None:
        scene.paint(hu, scene.femoral_heads, patient.hu["cortical"])
        scene.paint(hu, scene.femoral_heads, patient.hu["cancellous"], offset_mm=2.5)
    lesions = paint_lesions(scene, hu, organs, lesion_rng)
    image = _scan(hu, patient, grid, geometry, offset, physical_spacing, noise_rng)
    del hu

    # The map's organs on the output grid, then the generator's wherever the map holds nothing.
    on_grid = sitk.GetArrayFromImage(sitk.Resample(
        label_map.image, list(geometry.size), augmentation.transform, sitk.sitkNearestNeighbor,
        geometry.origin_mm, geometry.spacing_mm, geometry.direction, 0, sitk.sitkUInt8))
    label = np.zeros(on_grid.shape, np.uint8)
    for name, value in ORGAN_LABELS.items():
        if name in label_map.covers:
            label[on_grid == VALUES[name]] = value
    drawn_organs = [n for n in ("liver", "spleen", "pancreas", "kidney_l", "kidney_r")
                    if n not in scene.real_organs]
    if drawn_organs:
        procedural = _organ_labels(organs, grid, geometry, offset, names=drawn_organs)
        free = (on_grid == 0) & (procedural > 0)
        label[free] = procedural[free]
    if info is not None:
        info.update(map=label_map.name, seed=seed, phase=patient.phase,
                    real_organs=sorted(scene.real_organs), drawn_organs=drawn_organs,
                    moved_kidneys_mm=scene.moved,
                    lesions=lesions, augmented=augment,
                    offset_mm=[round(float(v), 1) for v in offset],
                    liver_dome_seen=fit.liver_dome_seen)
    return image, geometry.apply_to(sitk.GetImageFromArray(label))


def write_case(out_dir, name: str, label_map: LabelMap, seed: int, **kwargs):
    """Render a case and write it in the FLARE layout (synthetic.generator.write_pair)."""
    return write_pair(out_dir, name, *render_case(label_map, seed, **kwargs))
