"""The scene: a patient painted on one grid.

Everything is evaluated on a coarse axis-aligned lattice (2-3 mm, synthetic.grids) that covers the
scan: a float HU map painted structure by structure with soft (anti-aliased) masks, and one field
per labelled organ.  Organs never overlap: each is carved out of the lower-priority ones it
touches (:meth:`_Scene.labelled_organs`).  :func:`_render` paints in a fixed order: table, body
wall, thorax, muscles, skeleton, vessels, gut, organs, streaks.

A scene may hold real structures (synthetic.anatomy): they are painted as they are and never
carved, and the procedural ones keep clear of them.

:func:`_calibrate` scales a patient's organs to their target volumes, measured on scenes of their
own with the same clipping and carving as the final rendering.
"""

from __future__ import annotations

import statistics

import numpy as np

from synthetic.appearance import _paint_streaks
from synthetic.fields import (Field, _ellipsoid, _evaluate, _ramp, _smin, _smooth_noise,
                              _smoothstep, _tube, _upsample)
from synthetic.grids import Lattice, _overlap, _shape_of
from synthetic.patient import Patient


# ------------------------------------------------------------------------------------------------
# The scene on one grid
# ------------------------------------------------------------------------------------------------


class _Scene:
    """Paints a patient's HU map and computes its organ fields on one grid."""

    def __init__(self, patient: Patient, grid: Lattice, rng: np.random.Generator | None = None):
        self.p = patient
        self.grid = grid
        self.rng = rng
        self.ramp = float(grid.spacing.max())  # anti-aliasing width of masks
        self.fields: dict[str, Field | None] = {}
        self._cavity = None
        self._texture = None
        # Structures taken from a real label map (synthetic.anatomy), by scene name: painted as
        # they are and never carved; procedural structures keep clear of ``keep_clear``.
        self.real: dict[str, Field] = {}
        self.keep_clear: list[tuple[Field, float]] = []
        # Smooth fields are computed every `factor` points when the grid is fine.
        self.factor = 2 if grid.spacing.max() < 3.5 else 1

    # -- shared fields ----------------------------------------------------------------------------

    def _superellipse(self, X, Y, a, b_ant, b_post, n_ant, n_post):
        """Approximate signed distance to a superellipse with different front/back halves."""
        front = Y < 0
        b = np.where(front, b_ant, b_post)
        n = np.where(front, n_ant, n_post)
        ax, ay = np.abs(X) / a, np.abs(Y) / b
        r = (ax ** n + ay ** n) ** (1.0 / n)
        # Scale by the local radius so the value is about mm near the boundary.
        radius = np.sqrt(X * X + Y * Y) / np.maximum(r, 1e-3)
        return ((1.0 - r) * np.minimum(radius, 400.0)).astype(np.float32)

    def cavity(self, sl):
        """Field of the abdominal/thoracic cavity (inside the muscle wall) on block sl."""
        def cavity(Z, Y, X):
            a, b_ant, b_post = self.p.section(Z)
            return self._superellipse(X, Y, a, b_ant, b_post, self.p.cav_n_ant,
                                      self.p.cav_n_post)
        return _evaluate(self.grid, sl, cavity, self.factor)

    def cavity_at(self, sl):
        """Cavity field on block sl (from the cached whole-body field when there is one)."""
        if self._cavity is not None:
            overlap = _overlap(sl, self._cavity.sl)
            if overlap is not None and all(o.stop - o.start == s.stop - s.start
                                           for o, s in zip(overlap[0], sl)):
                return self._cavity.values[overlap[1]]
        return self.cavity(sl)

    def below_diaphragm(self, sl):
        return _evaluate(self.grid, sl, lambda Z, Y, X: self.p.diaphragm_z(X, Y) - Z,
                         self.factor)

    def organ_field(self, organ, clip_cavity=1.5, clip_diaphragm=4.0):
        """An ellipsoid organ's field on its box, inside the cavity and under the diaphragm."""
        lo, hi = organ.box()
        sl = self.grid.box(lo, hi)
        if sl is None:
            return None
        f = _evaluate(self.grid, sl, lambda Z, Y, X: organ.field(X, Y, Z), self.factor)
        if clip_cavity is not None:
            f = _smin(f, self.cavity_at(sl) - clip_cavity, 3.0)
        if clip_diaphragm is not None:
            f = _smin(f, self.below_diaphragm(sl) - clip_diaphragm, 3.0)
        return Field(sl, f.astype(np.float32))

    def pancreas_field(self):
        p = self.p
        radii = p.pancreas_radii * p.pancreas_scale
        f = _tube(self.grid, p.pancreas_points, radii, squash=(1.0, p.pancreas_flatness, 1.0))
        if f is None:
            return None
        # Lobulated outline: evaluate the tube at slightly displaced points.
        Z, Y, X = self.grid.coords(f.sl)
        wx, wy, wz = p.pancreas_warp(X, Y, Z)
        jitter = ((wx - X) + (wy - Y) - (wz - Z)) * 0.5
        f.values = (f.values + jitter).astype(np.float32)
        return f

    # -- organs with carving ----------------------------------------------------------------------

    def vessel(self, name):
        if name not in self.fields:
            p = self.p
            spec = {
                "aorta": (p.aorta, p.aorta_radii),
                "ivc": (p.ivc, p.ivc_radii),
                "portal": (p.portal, [p.portal_r * 1.1, p.portal_r, p.portal_r * 0.9]),
                "splenic_vein": (p.splenic_vein, [5.0, 4.5, 4.5, 4.0, 4.0]),
                "smv": (p.smv, [5.5, 5.0, 3.5]),
            }[name]
            self.fields[name] = _tube(self.grid, *spec)
        return self.fields[name]

    def labelled_organs(self, upto: str | None = None):
        """Fields of the labelled organs, carved so that they never overlap.

        Priority (who keeps contested voxels): kidneys > spleen > gallbladder and large veins
        > pancreas > liver.  ``upto`` stops after that organ (for calibration).
        """
        p = self.p
        out = {}
        out["kidney_l"] = self.organ_field(p.kidneys["kidney_l"], clip_diaphragm=6)
        out["kidney_r"] = self.organ_field(p.kidneys["kidney_r"], clip_diaphragm=6)
        if upto in ("kidney_l", "kidney_r"):
            return out
        spleen = out["spleen"] = self.organ_field(p.spleen)
        if spleen is not None:
            spleen.carve(out["kidney_l"], 3.0)
        if upto == "spleen":
            return out
        gb = self.organ_field(p.gallbladder, clip_cavity=4, clip_diaphragm=15) \
            if p.has_gallbladder else None
        if gb is not None:
            gb.carve(out["kidney_r"], 3.0)
        self.fields["gallbladder"] = gb
        pancreas = out["pancreas"] = self.pancreas_field()
        if pancreas is not None:
            for other, gap in ((spleen, 2.0), (out["kidney_l"], 4.0), (out["kidney_r"], 4.0),
                               (gb, 2.0), (self.vessel("splenic_vein"), 1.0),
                               (self.vessel("smv"), 1.0), (self.vessel("portal"), 1.0),
                               (self.vessel("aorta"), 3.0), (self.vessel("ivc"), 3.0)):
                pancreas.carve(other, gap)
        if upto == "pancreas":
            return out
        liver = out["liver"] = self.organ_field(p.liver, clip_cavity=0.5, clip_diaphragm=3.5)
        if liver is not None:
            for other, gap in ((out["kidney_r"], 2.5), (spleen, 3.0), (self.vessel("ivc"), 0.0),
                               (self.vessel("portal"), 0.5), (gb, 0.0), (pancreas, 3.0)):
                liver.carve(other, gap)
        self.fields.update(out)
        return out

    def kidney_interior(self, side: str, f: Field) -> np.ndarray:
        """HU inside a kidney on its field's block: cortex, medullary pyramids, sinus fat and
        the collecting system, laid out in the procedural kidney's own frame."""
        H, organ = self.p.hu, self.p.kidneys[side]
        Z, Y, X = self.grid.coords(f.sl)
        u, v, w = organ.local(X, Y, Z)
        (cu, cv, cw), (au, av, aw) = organ.sinus
        sinus = _ellipsoid(u - cu, v - cv, w - cw, au, av, aw)
        pelvis = _ellipsoid(u - cu - 0.3 * au, v - cv, w - cw, au * 0.6, av * 0.45, aw * 0.6)
        depth = f.values
        # Medullary pyramids between cortical columns around the long axis.
        angle = np.arctan2(w, u)
        pyramids = (depth > organ.cortex_mm) & (np.cos(7 * angle + 0.7 * v / av) < 0.55)
        value = np.where(pyramids, H["medulla"], H["cortex"]).astype(np.float32)
        sinus_mix = _ramp(sinus, 3.0)
        value = value + sinus_mix * (H["sinus_fat"] - value)
        return value + _ramp(pelvis, 3.0) * (H["pelvis"] - value)

    # -- painting ---------------------------------------------------------------------------------

    def paint(self, hu, field: Field | None, value, offset_mm=0.0, within: Field | None = None):
        """Blend ``value`` (scalar or array on the field's block) into hu where the field is
        positive (shrunk by offset_mm), optionally only inside ``within``."""
        if field is None:
            return
        m = _ramp(field.values - offset_mm, self.ramp)
        if within is not None:
            inside = np.zeros_like(m)
            overlap = _overlap(field.sl, within.sl)
            if overlap is None:
                return
            inside[overlap[0]] = _ramp(within.values[overlap[1]], self.ramp)
            m *= inside
        target = hu[field.sl]
        target += m * (value - target)

    def texture(self, sl, correlation_mm, amplitude):
        """Smooth zero-mean variation (HU) on block sl: tissue inhomogeneity.

        Blobs of about 14 mm are cut from one field over the body (made once); other sizes are
        made for the block.
        """
        if self.rng is None or amplitude == 0:
            return 0.0
        if correlation_mm == 14.0 and self._texture is not None:
            overlap = _overlap(sl, self._texture.sl)
            if overlap is not None and _shape_of(sl) == _shape_of(overlap[0]):
                return amplitude * self._texture.values[overlap[1]]
        return amplitude * _smooth_noise(self.rng, _shape_of(sl), self.grid.spacing,
                                         correlation_mm)


# ------------------------------------------------------------------------------------------------
# Painting
# ------------------------------------------------------------------------------------------------


def _render(patient: Patient, grid: Lattice, rng: np.random.Generator, body_box,
            scene: _Scene | None = None):
    """HU map (z, y, x) float32 and the labelled organ fields on ``grid``.

    ``scene`` may bring real structures (a scene of synthetic.anatomy); by default everything is
    procedural.
    """
    p, H = patient, patient.hu
    scene = scene or _Scene(patient, grid, rng)
    hu = np.full(grid.shape, -1000.0, np.float32)
    full = grid.full()

    # Table under the patient: carbon shells around a foam core, its sides curving up, with a
    # foam pad between it and the patient's back.
    if p.table:
        Zf, Yf, Xf = grid.coords(full)
        _, _, b_post = p.section(grid.z)
        back = float(np.max(b_post + p.layers(grid.z)[2] + p.layers(grid.z)[5]))
        y_table = back + p.table_gap - (Xf * Xf) / (2 * p.table_radius)
        depth = Yf - y_table
        lateral = np.abs(Xf) < 225
        shell = ((depth > 0) & (depth < 3)) | ((depth > 42) & (depth < 45))
        table = np.where(shell & lateral, H["table"], -1000.0)
        table = np.where((depth >= 3) & (depth <= 42) & lateral, -930.0, table)
        table = np.where((depth > -p.table_gap) & (depth <= 0) & (np.abs(Xf) < 200), -800.0,
                         table)
        hu[:] = table.astype(np.float32)[0]

    # Body: skin, subcutaneous fat, muscle wall, cavity.
    sl = grid.box(*body_box)
    if sl is not None:
        Z, Y, X = grid.coords(sl)
        a, b_ant, b_post = p.section(Z)
        m_lat, m_ant, m_post, f_ant, f_lat, f_post = p.layers(Z)
        cav = scene.cavity(sl)
        scene._cavity = Field(sl, cav)

        def fascia_field(Z, Y, X):
            a, b_ant, b_post = p.section(Z)
            m_lat, m_ant, m_post = p.layers(Z)[:3]
            return scene._superellipse(X, Y, a + m_lat, b_ant + m_ant, b_post + m_post,
                                       p.cav_n_ant, p.cav_n_post + 0.3)

        def skin_field(Z, Y, X):
            a, b_ant, b_post = p.section(Z)
            m_lat, m_ant, m_post, f_ant, f_lat, f_post = p.layers(Z)
            return scene._superellipse(X, Y, a + m_lat + f_lat, b_ant + m_ant + f_ant,
                                       b_post + m_post + f_post, p.cav_n_ant, p.cav_n_post + 0.6)

        fascia = _evaluate(grid, sl, fascia_field, scene.factor)
        skin = _evaluate(grid, sl, skin_field, scene.factor)
        block = hu[sl]
        scene._texture = Field(sl, scene.texture(sl, 14.0, 1.0))
        texture = 4.0 * scene._texture.values
        for f, value in ((skin, H["skin"]), (skin - 2.5, H["sc_fat"] + texture),
                         (fascia, H["muscle"] + texture), (cav, H["visceral_fat"] + texture)):
            m = _ramp(f, scene.ramp)
            block += m * (value - block)
        # Linea alba and the fat line between the obliques break up the muscle wall.
        fat_line = ((np.abs(X) < 3) & (Y < 0)) | ((np.abs(fascia - (m_lat * 0.5)) < 0.8)
                                                   & (np.abs(Y) < 0.4 * b_ant)
                                                   & (Z > p.crest_z))
        block[(fascia > 0) & (cav < 0) & fat_line] = H["sc_fat"]
        scene.skin = Field(sl, skin)

    _paint_thorax(scene, hu)
    _paint_muscles(scene, hu)
    _paint_skeleton(scene, hu)
    organs = scene.labelled_organs()
    _paint_vessels(scene, hu)
    _paint_gut(scene, hu, organs)
    _paint_organs(scene, hu, organs)
    if p.streaks:
        _paint_streaks(scene, hu)
    return hu, organs, scene


def _body_box(patient: Patient, grid: Lattice):
    """Box (lo, hi) in the patient frame that holds the body (skin and all) on ``grid``'s z."""
    a_max = float(np.max(patient.section(grid.z)[0]))
    layers = [float(np.max(v)) for v in patient.layers(grid.z)]
    half_w = a_max + layers[0] + layers[4] + 10
    b_ant = float(np.max(patient.section(grid.z)[1])) + layers[1] + layers[3] + 10
    b_post = float(np.max(patient.section(grid.z)[2])) + layers[2] + layers[5] + 10
    return (-half_w, -b_ant, -1e4), (half_w, b_post, 1e4)


def _paint_thorax(scene: _Scene, hu):
    """Diaphragm, lungs with vessels, mediastinal fat and the heart above the diaphragm."""
    p, grid, H = scene.p, scene.grid, scene.p.hu
    lowest = min(p.dome_r[0], p.dome_l[0]) - 110  # bottom of the posterior lung recesses
    sl = grid.box((-300, -300, lowest), (300, 300, 1e4))
    if sl is None or scene._cavity is None:
        return
    overlap = _overlap(sl, scene._cavity.sl)
    if overlap is None:
        return
    sl = tuple(slice(s.start + o.start, s.start + o.stop) for s, o in zip(sl, overlap[0]))
    Z, Y, X = grid.coords(sl)
    cav = scene.cavity_at(sl)
    above = -scene.below_diaphragm(sl)
    # Mediastinum: a band from the spine to the sternum, and the heart in its fat.
    sx, sy = p.spine_xy(Z)
    band = np.minimum(22 - np.abs(X - sx - 6), np.where(Y > sy - 60, 30.0, 12 - np.abs(X)))
    medi = np.where(Y > sy + p.vb_half_ap + 5, -20.0, band)
    heart = scene.organ_field(p.heart, clip_cavity=2.0, clip_diaphragm=None)
    if heart is not None:
        heart.intersect(Field(sl, above), 2.0)
        mine, theirs = _overlap(sl, heart.sl)
        medi[mine] = np.maximum(medi[mine], heart.values[theirs] + 6)
    lung = np.minimum(np.minimum(cav - 4, above - 4), -medi)
    # Lung vessels: where two smooth random fields are both near zero, thin tubes appear.
    vessels = 0.0
    if scene.rng is not None:
        shape = _shape_of(sl)
        low = [(n - 1) // 2 + 2 for n in shape]
        n1 = _smooth_noise(scene.rng, low, grid.spacing * 2, 30.0)
        n2 = _smooth_noise(scene.rng, low, grid.spacing * 2, 30.0)
        tubes = np.clip(1.0 - np.sqrt(n1 * n1 + n2 * n2) / 0.32, 0, 1)
        vessels = _upsample(tubes, shape) * (0.5 * H["aorta"] + 850)
    block = hu[sl]
    r = scene.ramp
    block += _ramp(np.minimum(cav, 4 - np.abs(above)), r) * (H["muscle"] - block)
    block += _ramp(np.minimum(np.minimum(medi, cav), above), r) * (H["visceral_fat"] - block)
    block += _ramp(lung, r) * (H["lung"] + vessels - block)
    if heart is not None:
        # Two chambers (left ventricle and the right side) separated by the septum.
        Zh, Yh, Xh = grid.coords(heart.sl)
        u, v, w = p.heart.local(Xh, Yh, Zh)
        ax, ay, az = p.heart.parts[0][1]
        chambers = np.maximum(
            _ellipsoid(u - 0.2 * ax, v + 0.1 * ay, w, 0.5 * ax, 0.5 * ay, 0.6 * az),
            _ellipsoid(u + 0.35 * ax, v - 0.2 * ay, w, 0.45 * ax, 0.5 * ay, 0.65 * az))
        chambers = _ramp(np.minimum(chambers, heart.values - 6), r)
        scene.paint(hu, heart, H["myocardium"] + chambers * (H["heart"] - H["myocardium"]))


def _paint_muscles(scene: _Scene, hu):
    """Paraspinal, psoas and quadratus lumborum muscles."""
    p, grid, H = scene.p, scene.grid, scene.p.hu
    sl = grid.box((-120, -20, -1000), (120, 200, 1000))
    if sl is None:
        return
    Z, Y, X = grid.coords(sl)
    sx, sy = p.spine_xy(Z)
    field = None
    for sign in (1, -1):
        cx, cy = sx + sign * 34 * p.s_lat, sy + 55 * p.s_ap
        f = (1 - np.sqrt(((X - cx) / (30 * p.s_lat)) ** 2 + ((Y - cy) / 26) ** 2)) * 26
        field = f if field is None else np.maximum(field, f)
    # They shrink into the sacrum below L5.
    field = field - 30 * _smoothstep(p.vertebra_z(4.5), p.hip_z, Z)
    f = Field(sl, field.astype(np.float32))
    f.intersect(scene.skin, 3 + 0.7 * p.fat_post)
    scene.paint(hu, f, H["muscle"])
    for sign in (1, -1):
        lvl = p.vertebra_z
        top, l4 = lvl(-1), lvl(3)
        pts = [[sign * 22, p.vb_y0 - 5, top], [sign * 38, p.vb_y0 - 5, lvl(1.5)],
               [sign * 48, p.vb_y0 - 8, l4], [sign * 62, p.vb_y0 - 25, p.crest_z - 40],
               [sign * 75, -25, p.hip_z - 10]]
        pts = np.array(pts, float)
        _, ys = p.spine_xy(pts[:3, 2])
        pts[:3, 1] = ys - 3
        psoas = _tube(grid, pts, [5, 14, 22, 22, 16])
        scene.paint(hu, psoas, H["muscle"])
        scene.fields[f"psoas_{sign}"] = psoas
        ql = _tube(grid, [[sign * 58, 72 * p.s_ap, lvl(0)], [sign * 68, 72 * p.s_ap, lvl(2)],
                          [sign * 80, 62 * p.s_ap, p.crest_z + 5]], [6, 11, 12])
        scene.paint(hu, ql, H["muscle"])


def _paint_bone(scene, hu, field: Field | None, cortex_mm=2.0, cancellous=None):
    """Bone with a bright cortex and a darker cancellous interior."""
    if field is None:
        return
    H = scene.p.hu
    inner = H["cancellous"] if cancellous is None else cancellous
    value = inner + (H["cortical"] - inner) * np.clip(1.5 - field.values / cortex_mm, 0, 1)
    scene.paint(hu, field, value)


def _paint_skeleton(scene: _Scene, hu):
    p, grid, H = scene.p, scene.grid, scene.p.hu
    # Vertebrae: bodies with endplates, discs, neural arch, spinous and transverse processes.
    _, spine_y = p.spine_xy(grid.z)
    sl = grid.box((-70, float(spine_y.min()) - p.vb_half_ap - 6, p.hip_z - 30),
                  (70, float(spine_y.max()) + 85, 1000))
    if sl is not None:
        Z, Y, X = grid.coords(sl)
        sx, sy = p.spine_xy(Z)
        level = p.level(Z)
        frac = level - np.round(level)  # -0.5..0.5 within a vertebra
        pitch = np.interp(Z, [0.0, 200.0], [p.pitch_lumbar, p.pitch_thoracic]).astype(np.float32)
        half_body = (0.5 - p.disc_fraction / 2) * pitch
        dz = np.abs(frac) * pitch
        sacral = _smoothstep(p.vertebra_z(4.5), p.vertebra_z(5.2), Z)
        width = p.vb_half_w * (1 + 0.15 * (1 - _smoothstep(-200, 100, Z)) + 1.3 * sacral)
        width = width * (1 - 0.6 * _smoothstep(p.vertebra_z(5.5), p.hip_z - 10, Z))
        depth_ap = p.vb_half_ap * (1 - 0.35 * sacral) + 0 * Z
        radial = _ellipsoid(X - sx, Y - sy, 0 * X, width, depth_ap, 1e3)
        body = np.minimum(radial, np.maximum(half_body - dz, sacral * 40 - 20))
        disc = np.minimum(radial - 1, 0.5 * pitch - dz + 40 * sacral)
        canal_y = sy + p.vb_half_ap + 9
        canal_r = 8 + 2 * (1 - sacral)
        rho = np.sqrt((X - sx) ** 2 + (Y - canal_y) ** 2)
        arch_part = np.abs(frac + 0.05) < 0.36
        ring = np.minimum(5.0 - np.abs(rho - canal_r - 5), np.where(arch_part, 10.0, -10.0))
        ring = np.minimum(ring, (Y - sy - p.vb_half_ap + 2))
        spinous = np.minimum(np.minimum(4.5 - np.abs(X - sx), 18 - np.abs(Y - canal_y - 30)),
                             np.where(np.abs(frac - 0.05) < 0.3, 10.0, -10.0))
        spinous = np.minimum(spinous, 8 - 8 * sacral)
        trans_len = np.where(Z < p.rib12_z + 5, 50.0, 30.0) * (1 - sacral)
        transverse = np.minimum(np.minimum(5.0 - np.abs(Y - canal_y + 4),
                                           trans_len - np.abs(X - sx)),
                                np.where(np.abs(frac + 0.05) < 0.17, 10.0, -10.0))
        posterior = np.maximum(np.maximum(ring, spinous), transverse)
        block = hu[sl]
        r = scene.ramp
        block += _ramp(disc, r) * (H["disc"] - block)
        cortex = np.clip(1.5 - np.minimum(radial, half_body - dz) / 2.0, 0, 1)
        block += _ramp(body, r) * (H["cancellous"] + (H["cortical"] - H["cancellous"]) * cortex
                                   - block)
        post_val = H["cancellous"] + (H["cortical"] - H["cancellous"]) * np.clip(
            1.5 - posterior / 2.5, 0.3, 1)
        block += _ramp(posterior, r) * (post_val - block)
        block += _ramp(canal_r - rho, r) * _ramp(Y - sy - p.vb_half_ap, r) * (H["csf"] - block)
        scene.fields["spine"] = Field(sl, np.maximum(np.maximum(body, disc), posterior))

    # Ribs: curved bands in the muscle wall; their height drops from the spine to the front.
    top = 1000
    sl = grid.box((-400, -400, p.rib12_z - p.rib_drop - 40), (400, 400, top))
    if sl is not None and scene._cavity is not None:
        overlap = _overlap(sl, scene._cavity.sl)
        if overlap is not None:
            sl = tuple(slice(s.start + o.start, s.start + o.stop)
                       for s, o in zip(sl, overlap[0]))
            cav = scene.cavity_at(sl)
            muscle = p.layers(grid.z[sl[0]])[0][:, None, None]
            # Ribs live in a thin shell of the muscle wall: work on those voxels only.
            radial_all = p.rib_half_t - np.abs(cav + muscle * 0.45 + 1)
            shell = np.nonzero(radial_all > -scene.ramp)
            radial = radial_all[shell]
            z = grid.z[sl[0]][shell[0]]
            y = grid.y[sl[1]][shell[1]]
            x = grid.x[sl[2]][shell[2]]
            # Angle around the trunk (0 behind the spine, pi in front), from the spine's
            # position at the lower ribs: it barely moves over the ribs' height.
            sx, sy = p.spine_xy(np.float32(p.rib12_z + 100))
            theta = np.arctan2(np.abs(x - sx), y - sy + 10)
            drop = p.rib_drop * (np.clip(theta, 0, np.pi) / np.pi) ** 0.9
            t = (z + drop - p.rib12_z) / p.rib_pitch
            k = np.round(t)
            dz = np.abs(t - k) * p.rib_pitch
            # Floating ribs 12 and 11 end early; 10..1 reach the sternum through cartilage.
            theta_end = np.where(k <= 0, 0.45 * np.pi, np.where(k <= 1, 0.62 * np.pi,
                                                               0.93 * np.pi))
            inner = np.minimum(radial, p.rib_half_h - dz)
            rib = np.minimum(inner, np.minimum((theta - 0.32) * 60, (theta_end - theta) * 80))
            rib = np.where((k >= 0) & (k <= 11), rib, -10.0)
            cortex = np.clip(1.5 - inner / 1.5, 0, 1)
            value = np.where(theta > theta_end - 0.35, H["cartilage"],
                             H["cancellous"] + (H["cortical"] - H["cancellous"]) * cortex)
            block = hu[sl]
            old = block[shell]
            block[shell] = old + _ramp(rib, scene.ramp) * (value - old)
            # Sternum and xiphoid in front, in the chest.
            front = grid.box((-16, -400, p.dome_r[0] - 40), (16, 0, 1000))
            if front is not None:
                overlap = _overlap(sl, front)
                if overlap is not None:
                    Z, Y, X = grid.coords(tuple(slice(s.start + o.start, s.start + o.stop)
                                                for s, o in zip(sl, overlap[0])))
                    sternum = np.minimum(np.minimum(12 - np.abs(X), 5 - np.abs(
                        cav[overlap[0]] + 6)), Z - (p.dome_r[0] - 35))
                    part = block[overlap[0]]
                    part += _ramp(sternum, scene.ramp) * (H["cancellous"] + 200 - part)

    # Pelvis: iliac wings (curved plates), sacrum handled with the spine, hips and femora.
    sl = grid.box((-p.pelvis_a - 30, -p.pelvis_b - 30, p.hip_z - 40),
                  (p.pelvis_a + 30, p.pelvis_b + 40, p.crest_z + 10))
    if sl is not None:
        Z, Y, X = grid.coords(sl)
        depth = _smoothstep(p.crest_z, p.hip_z, Z)  # 0 at the crest, 1 at the hip joint
        ax = p.pelvis_a * (1 - 0.25 * depth)
        ay = p.pelvis_b * (1 - 0.1 * depth)
        cy = -5 + 10 * depth
        rho = np.sqrt((X / ax) ** 2 + ((Y - cy) / ay) ** 2)
        psi = np.arctan2(np.abs(X) / ax, (Y - cy) / ay)  # 0 posterior, pi anterior
        thick = 4 + 10 * depth ** 2
        psi0 = 0.12 * np.pi + 0.25 * depth
        psi1 = 0.7 * np.pi - 0.1 * depth
        wing = np.minimum(thick - np.abs(rho - 1) * np.minimum(ax, ay),
                          np.minimum((psi - psi0) * 60, (psi1 - psi) * 60))
        crest = p.crest_z - 25 * (np.abs(psi - 0.45 * np.pi) / np.pi) ** 1 * 2
        wing = np.minimum(wing, crest - Z)
        wing = np.minimum(wing, Z - (p.hip_z - 15))
        bones = wing
        for sign in (1, -1):
            head = np.array([sign * 0.82 * p.pelvis_a, -8.0, p.hip_z])
            ball = 23 - np.sqrt((X - head[0]) ** 2 + (Y - head[1]) ** 2 + (Z - head[2]) ** 2)
            bones = np.maximum(bones, ball)
            # Acetabular roof linking the wing and the head.
            roof = 16 - np.sqrt((X - head[0] * 0.9) ** 2 + (Y - head[1]) ** 2
                                + ((Z - head[2] - 28) * 0.7) ** 2)
            bones = np.maximum(bones, roof)
        f = Field(sl, bones.astype(np.float32))
        _paint_bone(scene, hu, f, 2.5)
        for sign in (1, -1):
            hx = sign * 0.82 * p.pelvis_a
            femur = _tube(grid, [[hx, -8, p.hip_z], [hx + sign * 30, 0, p.hip_z - 30],
                                 [hx + sign * 38, 2, p.hip_z - 60],
                                 [hx + sign * 30, -5, p.hip_z - 250]], [13, 15, 16, 13])
            _paint_bone(scene, hu, femur, 4.0, cancellous=H["marrow_fat"] + 60)
            pubis = _tube(grid, [[hx * 0.85, -35, p.hip_z - 10], [sign * 35, -70, p.hip_z - 30],
                                 [sign * 6, -78, p.hip_z - 40]], [9, 8, 9])
            _paint_bone(scene, hu, pubis, 2.5)
            ischium = _tube(grid, [[hx * 0.9, 15, p.hip_z - 5], [sign * 55, 35, p.hip_z - 50]],
                            [11, 12])
            _paint_bone(scene, hu, ischium, 2.5)


def _paint_vessels(scene: _Scene, hu):
    p, grid, H = scene.p, scene.grid, scene.p.hu
    paint = scene.paint
    paint(hu, scene.vessel("aorta"), H["aorta"])
    paint(hu, scene.vessel("ivc"), H["ivc"])
    for pts in p.iliac_veins:
        paint(hu, _tube(grid, pts, [9, 8, 7, 7, 6]), H["ivc"])
    for pts in p.iliac_arteries:
        paint(hu, _tube(grid, pts, [7, 6, 5, 5, 4.5]), H["artery"])
    paint(hu, scene.vessel("portal"), H["portal"])
    paint(hu, scene.vessel("splenic_vein"), H["portal"])
    paint(hu, scene.vessel("smv"), H["portal"])
    paint(hu, _tube(grid, p.sma, [4.5, 4, 3.5, 3]), H["artery"])
    paint(hu, _tube(grid, p.celiac, [4, 4]), H["artery"])
    paint(hu, _tube(grid, p.splenic_artery, [3, 3, 3, 3, 2.5]), H["artery"])
    paint(hu, _tube(grid, p.hepatic_artery, [3, 2.5, 2]), H["artery"])
    for pts in p.renal_veins:
        paint(hu, _tube(grid, pts, [5] * len(pts)), H["kidney_vein"])
    for pts in p.renal_arteries:
        paint(hu, _tube(grid, pts, [3.0, 3.0, 2.5]), H["artery"])
    ureter_hu = H["pelvis"] if p.phase == "delayed" else H["bowel_fluid"] + 10
    for pts in p.ureters:
        paint(hu, _tube(grid, pts, [3.5, 2.5, 2.5, 2.5]), ureter_hu)
    # Mesenteric branches fanning out from the SMA/SMV into the bowel fat.
    if scene.rng is not None:
        rng = np.random.default_rng(p.rng_seed)
        for _ in range(10):
            start = p.sma[1 + rng.integers(len(p.sma) - 1)]
            end = start + rng.normal(0, 1, 3) * [60, 25, 50] + [0, -20, -30]
            mid = 0.5 * (start + end) + rng.normal(0, 10, 3)
            paint(hu, _tube(grid, [start, mid, end], [2.5, 2.0, 1.5]), H["artery"] * 0.5
                  + H["portal"] * 0.5)


def _paint_gut(scene: _Scene, hu, organs):
    """Stomach, duodenum, colon, small bowel and bladder: never overlapping the organs."""
    p, grid, H = scene.p, scene.grid, scene.p.hu
    rng = scene.rng if scene.rng is not None else np.random.default_rng(0)
    avoid = [(organs[k], 2.0) for k in ("liver", "spleen", "kidney_l", "kidney_r", "pancreas")]
    avoid += [(scene.fields.get("gallbladder"), 1.5), (scene.vessel("aorta"), 1.0),
              (scene.vessel("ivc"), 1.0), (scene.vessel("smv"), 1.0),
              (scene.vessel("splenic_vein"), 1.0), (scene.vessel("portal"), 1.0)]
    avoid += [(scene.fields.get(f"psoas_{s}"), 1.0) for s in (1, -1)]
    avoid += [(scene.fields.get("spine"), 2.0)] + scene.keep_clear
    real = scene.real

    def prepared(field, clip_diaphragm=4.0, extra=()):
        if field is None:
            return None
        for other, gap in list(avoid) + list(extra):
            field.carve(other, gap)
        field.values = np.minimum(field.values, scene.cavity_at(field.sl) - 1.0)
        if clip_diaphragm is not None:
            field.values = np.minimum(field.values, scene.below_diaphragm(field.sl)
                                      - clip_diaphragm)
        return field

    def paint_lumen(field, wall_mm, wall_hu, content_hu):
        if field is None:
            return
        scene.paint(hu, field, wall_hu)
        scene.paint(hu, field, content_hu, offset_mm=wall_mm)

    def field_center(field):
        y = grid.y[field.sl[1]]
        return float(y.mean())

    def content(field, kind, gas_fraction):
        """HU of the lumen: fluid, food, faeces or gas (gas rises to the front: -y)."""
        Z, Y, X = grid.coords(field.sl)
        shape = _shape_of(field.sl)
        fluid = p.oral_hu if p.oral_contrast else H["bowel_fluid"]
        if kind == "gas":
            return np.float32(-1000.0)
        n = _smooth_noise(rng, shape, grid.spacing, 12.0)
        if kind == "faeces":
            # Stool: soft tissue density mixed with small gas bubbles, gas rising to the front.
            bubbles = _smooth_noise(rng, shape, grid.spacing, 5.0)
            mottled = np.where(bubbles > 1.0 - 0.012 * (Y - field_center(field)), -950.0,
                               -60.0 + 50 * n)
            return mottled.astype(np.float32)
        base = fluid + (35 * n if kind == "food" else 4 * n)
        if gas_fraction <= 0:
            return base.astype(np.float32)
        # Air-fluid level: gas in the front part of each lumen.
        yy = np.broadcast_to(Y, shape)
        inside = field.values > 0
        if not inside.any():
            return base.astype(np.float32)
        level = np.quantile(yy[inside], gas_fraction)
        return np.where(Y < level, -1000.0, base).astype(np.float32)

    # Stomach (with the oesophagus coming down), duodenum.
    stomach = real.get("stomach") or prepared(_tube(grid, p.stomach, p.stomach_radii),
                                              clip_diaphragm=4.0)
    if stomach is not None:
        kind = {"fluid": "fluid", "food": "food", "gas": "fluid", "collapsed": "fluid"}[
            p.stomach_content]
        gas = {"fluid": 0.15, "food": 0.1, "gas": 0.7, "collapsed": 0.0}[p.stomach_content]
        wall = 7.0 if p.stomach_content == "collapsed" else 4.0
        paint_lumen(stomach, wall, H["bowel_wall"], content(stomach, kind, gas))
    scene.paint(hu, real.get("oesophagus") or _tube(grid, p.oesophagus, [8, 8, 9, 10]),
                H["muscle"])
    duodenum = real.get("duodenum") or prepared(
        _tube(grid, p.duodenum, [p.duodenum_r] * len(p.duodenum)), extra=[(stomach, 1.0)])
    paint_lumen(duodenum, 3.0, H["bowel_wall"], content(duodenum, "fluid", 0.1)
                if duodenum is not None else 0)
    colon = real.get("colon") or prepared(_tube(grid, p.colon, p.colon_radii),
                                          extra=[(stomach, 2.0), (duodenum, 2.0)])
    if colon is not None:
        paint_lumen(colon, 2.5, H["bowel_wall"], content(colon, "faeces", 0))
    bladder = real.get("bladder")
    if bladder is None:
        bladder = scene.organ_field(p.bladder, clip_cavity=None, clip_diaphragm=None)
        if bladder is not None:
            prepared(bladder, clip_diaphragm=None, extra=[(colon, 2.0)])
    if bladder is not None:
        Z, Y, X = grid.coords(bladder.sl)
        # Contrast from the ureters sinks to the back of the bladder in the delayed phase.
        back = grid.y[bladder.sl[1]].mean() + 10 if "bladder" in real else p.bladder.center[1] + 10
        urine = H["bladder"] if p.phase != "delayed" else np.where(Y > back, H["bladder"], 10.0)
        paint_lumen(bladder, 2.5, H["muscle"], urine)

    # Small bowel: tubes where two smooth random fields are both near zero, filling the space
    # left in the lower and middle abdomen.
    if "small_bowel" in real:
        bowel = real["small_bowel"]
        gas = _smooth_noise(rng, _shape_of(bowel.sl), grid.spacing, 25.0)
        fluid = p.oral_hu if p.oral_contrast else H["bowel_fluid"]
        lumen = np.where(gas > 2.2 - 2.5 * p.bowel_params["gas"], -1000.0, fluid)
        paint_lumen(bowel, 2.5, H["bowel_wall"], lumen.astype(np.float32))
        return
    top = min(p.pancreas_points[:, 2].min() + 20, p.dome_l[0] - 110)
    sl = grid.box((-160, -200, p.hip_z - 10), (160, 60, top))
    if sl is not None:
        bp = p.bowel_params
        shape = _shape_of(sl)
        n1 = _smooth_noise(rng, shape, grid.spacing, bp["correlation"])
        n2 = _smooth_noise(rng, shape, grid.spacing, bp["correlation"])
        # Scale so that the value is about mm from the tube's centre line.
        scale = bp["correlation"] / 4.0
        Z, Y, X = grid.coords(sl)
        f = bp["radius"] - np.sqrt(n1 * n1 + n2 * n2) * scale
        f = np.minimum(f, (top - Z) * 0.5)
        bowel = prepared(Field(sl, f.astype(np.float32)),
                         extra=[(stomach, 2.0), (duodenum, 2.0), (colon, 2.0), (bladder, 3.0)])
        gas = _smooth_noise(rng, shape, grid.spacing, 25.0)
        fluid = p.oral_hu if p.oral_contrast else H["bowel_fluid"]
        lumen = np.where(gas > 2.2 - 2.5 * bp["gas"], -1000.0, fluid).astype(np.float32)
        paint_lumen(bowel, 2.5, H["bowel_wall"], lumen)


def _paint_organs(scene: _Scene, hu, organs):
    p, grid, H = scene.p, scene.grid, scene.p.hu
    paint = scene.paint

    # Adrenals first (lowest priority: organs are painted over them).
    paint(hu, scene.real.get("adrenal"), H["adrenal"])
    for adrenal in p.adrenals if "adrenal" not in scene.real else ():
        f = scene.organ_field(adrenal, clip_cavity=None, clip_diaphragm=3)
        if f is not None:
            for k in ("liver", "kidney_l", "kidney_r", "spleen", "pancreas"):
                f.carve(organs[k], 2.0)
            f.carve(scene.vessel("ivc"), 1.0)
            f.carve(scene.vessel("aorta"), 2.0)
            paint(hu, f, H["adrenal"])

    gb = scene.fields.get("gallbladder")
    paint(hu, gb, H["bowel_wall"])
    paint(hu, gb, H["bile"], offset_mm=2.0)

    liver = organs["liver"]
    if liver is not None:
        value = H["liver"] + scene.texture(liver.sl, 14.0, 4.0) + scene.texture(liver.sl, 6.0,
                                                                                2.5)
        paint(hu, liver, value)
        for pts in p.portal_branches:
            paint(hu, _tube(grid, pts, [p.portal_r * 0.8, 4.5, 2.5][:len(pts)]), H["portal"],
                  within=liver)
        for pts in p.hepatic_veins:
            paint(hu, _tube(grid, pts, [6.0, 4.5, 2.5]), H["hepatic_vein"], within=liver)

    spleen = organs["spleen"]
    if spleen is not None:
        amp = 30.0 if p.phase == "arterial" else 4.0
        paint(hu, spleen, H["spleen"] + scene.texture(spleen.sl, 10.0 if amp > 10 else 14.0, amp))

    pancreas = organs["pancreas"]
    if pancreas is not None:
        value = H["pancreas"] + scene.texture(pancreas.sl, 5.0, 8.0)
        if p.pancreas_fat > 0 and scene.rng is not None:  # no textures without a stream
            # Fat between the lobules: the top ``pancreas_fat`` share of a fine random field,
            # soft-edged as partial volume makes it.
            field = scene.texture(pancreas.sl, 4.0, 1.0)
            threshold = statistics.NormalDist().inv_cdf(1.0 - p.pancreas_fat)
            fat = np.clip((field - threshold) / 0.6 + 0.5, 0.0, 1.0)
            value = value + 0.85 * fat * (H["visceral_fat"] - value)
        paint(hu, pancreas, value)

    for side in ("kidney_l", "kidney_r"):
        f = organs[side]
        if f is None:
            continue
        paint(hu, f, scene.kidney_interior(side, f) + scene.texture(f.sl, 14.0, 3.0))


# ------------------------------------------------------------------------------------------------
# Volume calibration
# ------------------------------------------------------------------------------------------------


def _calibrate(patient: Patient):
    """Scale each labelled organ so that its labelled volume hits the patient's target.

    Measured on a fixed lattice in the patient frame (independent of any image grid) with the
    same clipping and carving as the final rendering; a few power-law updates converge.
    """
    p = patient
    organs = {"kidney_l": p.kidneys["kidney_l"], "kidney_r": p.kidneys["kidney_r"],
              "spleen": p.spleen, "liver": p.liver}

    def measure(name):
        if name == "pancreas":
            reach = p.pancreas_radii.max() * p.pancreas_scale + 12
            lo = p.pancreas_points.min(axis=0) - reach
            hi = p.pancreas_points.max(axis=0) + reach
        else:
            lo, hi = organs[name].box()
        step = {"liver": 5.0, "pancreas": 3.0}.get(name, 4.0)
        # Carving neighbours only matter inside this organ's box: the lattice can stop there.
        scene = _Scene(p, Lattice.covering(lo, hi, [step] * 3))
        field = scene.labelled_organs(upto=name)[name]
        return 0.0 if field is None else field.volume_ml(step ** 3 / 1000.0, step)

    for name, exponent in (("kidney_l", 3), ("kidney_r", 3), ("spleen", 3), ("pancreas", 2),
                           ("liver", 3)):
        for _ in range(3 if name == "pancreas" else 2):
            volume = measure(name)
            if volume <= 0:
                break
            ratio = p.target_ml[name] / volume
            if abs(ratio - 1) < 0.015:
                break
            factor = ratio ** (1.0 / exponent)
            if name == "pancreas":
                p.pancreas_scale *= factor
            else:
                organs[name].scale *= factor
