"""The procedural patient: its anatomy, drawn from a seed, and its place in a scan.

A :class:`Patient` holds everything about one synthetic patient: body outline, fat and muscle
layers, skeleton, lungs and heart, the four labelled organs and their unlabelled neighbours
(vessels, stomach, duodenum, bowel, gallbladder, adrenals, bladder), tissue intensities and scan
settings.  Every structure is an implicit field in millimetres (synthetic.fields) in a patient
frame with the axes of DICOM/ITK LPS: +x patient left, +y posterior, +z superior.  The frame's
origin is the middle of the L1 vertebral body.

:func:`_place` puts the patient in physical space relative to the image grid: centred in the field
of view in x/y (give or take 15-20 mm), and in z so that the scan covers the whole abdomen, only
part of it, or chest to pelvis (scans of 350 mm or more always reach from above the liver dome to
below the kidneys).  Only the grid's centre and its length along its slice axis matter, so the
grid (size, spacing, origin, direction) is a window onto the patient: one seed seen through
identity, flipped, permuted or slightly oblique grids of the same scan has its organs at the same
physical places and of the same shapes.  (The textures, bowel loops and noise are drawn on the
sampling grid and do differ between such grids.)
"""

from __future__ import annotations

import math

import numpy as np

from synthetic.appearance import _COMMON_HU, _PHASE_HU
from synthetic.fields import _EllipsoidOrgan, _frame, _rows_from_angles, _smoothstep, _Warp
from synthetic.grids import CaseGeometry, _rotation


# ------------------------------------------------------------------------------------------------
# The patient
# ------------------------------------------------------------------------------------------------


class Patient:
    """All anatomical parameters of one synthetic patient (patient frame, mm).

    Drawn in a fixed order from its own generator, so that the same seed always gives the same
    patient whatever grid it is later rendered on.
    """

    def __init__(self, rng: np.random.Generator):
        u = rng.uniform
        self.rng_seed = int(rng.integers(2**31))
        # Phase and tissue intensities.
        self.phase = str(rng.choice(list(_PHASE_HU), p=[0.15, 0.2, 0.5, 0.15]))
        self.hu = {k: float(u(*v)) for k, v in sorted({**_PHASE_HU[self.phase],
                                                       **_COMMON_HU}.items())}
        self.hu["medulla"] = min(self.hu["medulla"], self.hu["cortex"])
        if rng.random() < 0.12:  # fatty liver: darker than the spleen
            self.hu["liver"] -= u(20, 55)
        if rng.random() < 0.15:  # fatty pancreas
            self.hu["pancreas"] -= u(15, 40)
        self.oral_contrast = rng.random() < 0.2
        self.oral_hu = u(150, 450)
        self.noise_sigma = u(8, 30)
        self.hu_offset = rng.normal(0, 4)

        # Body frame: size scales, fat.
        self.s_lat = u(0.88, 1.12)  # lateral scale of the trunk
        self.s_ap = u(0.88, 1.12) * (0.5 + 0.5 * self.s_lat)  # AP scale, half tied to width
        self.s_z = u(0.9, 1.1)  # craniocaudal scale
        obesity = rng.beta(1.6, 2.4)  # 0 thin .. 1 obese
        self.fat_ant = 6 + 44 * obesity * u(0.7, 1.3)
        self.fat_lat = 5 + 34 * obesity * u(0.7, 1.3)
        self.fat_post = 5 + 25 * obesity * u(0.6, 1.2)
        self.visceral_fat = obesity * u(0.5, 1.2)
        self.muscle_mm = u(7, 15) * (1.1 - 0.3 * obesity)
        self.cav_a = 128 * self.s_lat + 14 * self.visceral_fat  # cavity half-width at L1
        self.cav_b_ant = 88 * self.s_ap + 22 * self.visceral_fat
        self.cav_b_post = 84 * self.s_ap
        self.cav_n_ant = u(2.0, 2.5)
        self.cav_n_post = u(2.8, 3.6)
        self.body_waves = [(u(150, 400), u(0, 2 * math.pi), u(0.0, 0.05)) for _ in range(3)]
        self.belly = obesity * u(0, 25)  # extra anterior bulge below the ribs

        # Spine: L1 centre at the origin; thoracic kyphosis and lumbar lordosis.
        self.vb_y0 = 35 * self.s_ap
        self.pitch_lumbar = u(33, 38) * self.s_z
        self.pitch_thoracic = u(24, 28) * self.s_z
        self.lordosis = u(5, 18)
        self.kyphosis = u(5, 20)
        self.scoliosis = (u(-6, 6), u(200, 500), u(0, 2 * math.pi))
        self.vb_half_w = u(21, 26) * self.s_lat ** 0.5
        self.vb_half_ap = u(15, 18) * self.s_ap ** 0.5
        self.disc_fraction = u(0.2, 0.28)
        self._spine_table()

        # Diaphragm domes (right higher than left).
        self.dome_r = (u(95, 130) * self.s_z, -65 * self.s_lat + u(-10, 10), u(-15, 10))
        self.dome_l = (self.dome_r[0] - u(5, 25), 70 * self.s_lat + u(-10, 10), u(-10, 15))
        self.diaph_c_ant = u(0.003, 0.006)
        self.diaph_c_post = u(0.009, 0.015)
        self.diaph_c_lat = u(0.006, 0.011)

        # Ribs.
        self.rib_pitch = u(26, 32) * self.s_z
        self.rib12_z = self.vertebra_z(-1) + u(-5, 10)
        self.rib_drop = u(90, 130) * self.s_z
        self.rib_half_h = u(4.0, 5.5)
        self.rib_half_t = u(3.0, 4.5)

        # Pelvis.
        self.crest_z = self.vertebra_z(3.5) + u(-10, 10)
        self.hip_z = self.crest_z - u(140, 170) * self.s_z
        self.pelvis_a = u(100, 120) * self.s_lat
        self.pelvis_b = u(62, 78) * self.s_ap

        # Splenomegaly (portal hypertension, blood diseases) is common among the patients of
        # abdominal CT collections: one in five gets a spleen 1.6-3.5 times the normal volume.
        # Its own stream: the patients without it stay exactly as they were.
        variants = np.random.default_rng([self.rng_seed, 1])
        self.spleen_growth = variants.uniform(1.6, 3.5) if variants.random() < 0.2 else 1.0
        self.target_ml = {"liver": u(1300, 2100), "spleen": u(115, 330) * self.spleen_growth,
                          "kidney_l": u(130, 190), "kidney_r": u(130, 190),
                          "pancreas": u(45, 105)}
        self._organs(rng)
        self._vessels(rng)
        self._gut(rng)
        self.bowel_params = dict(radius=u(10, 13), correlation=u(34, 48), gas=u(0.0, 0.5))
        self.streaks = rng.random() < 0.3
        self.circle_padding = rng.random() < 0.6
        self.table = rng.random() < 0.8
        self.table_gap = u(2, 12)
        self.table_radius = u(500, 1200)
        # Drawn last so that the other parameters of a seed stay as they were (only the liver,
        # carved around the pancreas, changes a little). The pancreas is a ribbon, thinner front
        # to back than it is tall, and with age it shrinks and fat grows between its lobules: real
        # CT shows a thin, mottled gland in fat far more often than a smooth round one.
        self.pancreas_flatness = u(1.0, 2.2)
        self.pancreas_fat = u(0.1, 0.45) if rng.random() < 0.6 else 0.0

    # -- spine ------------------------------------------------------------------------------------

    def _spine_table(self):
        """Vertebral level as a function of z, integrated from the varying level height."""
        z = np.arange(-700.0, 700.0, 0.5)
        pitch = np.interp(z, [0.0, 200.0], [self.pitch_lumbar, self.pitch_thoracic])
        pitch = np.where(z < 0, self.pitch_lumbar, pitch)
        level = np.cumsum(0.5 / pitch)
        level -= np.interp(0.0, z, level)  # L1 centre is level 0
        self._level_z, self._level = z, level  # level increases toward the head

    def level(self, z):
        """Vertebral level coordinate: 0 = L1 centre, +1 = T12 centre, -1 = L2 centre, ..."""
        return np.interp(z, self._level_z, self._level).astype(np.float32)

    def vertebra_z(self, level_below_l1):
        """z of the centre of the vertebra ``level_below_l1`` levels below L1 (negative: above)."""
        return float(np.interp(-level_below_l1, self._level, self._level_z))

    def spine_xy(self, z):
        """(x, y) of the vertebral body centre at height z (arrays broadcast with z)."""
        z = np.asarray(z, dtype=np.float32)
        amp, wl, ph = self.scoliosis
        x = amp * np.sin(2 * np.pi * z / wl + ph)
        lord = -self.lordosis * np.exp(-((z + 110) / 90) ** 2)  # lumbar lordosis: anterior
        kyph = self.kyphosis * np.clip(z / 250.0, 0, None) ** 2
        sacrum = 40 * np.clip((-z + self.vertebra_z(4.5)) / 120.0, 0, None) ** 1.5
        return x.astype(np.float32), (self.vb_y0 + lord + kyph + sacrum).astype(np.float32)

    # -- body cross-section ----------------------------------------------------------------------

    def section(self, z):
        """Cavity shape at height z: (half width, anterior/posterior half depths, centre y)."""
        z = np.asarray(z, dtype=np.float32)
        wave = 1.0 + sum(a * np.sin(2 * np.pi * z / wl + ph) for wl, ph, a in self.body_waves)
        pelvis = _smoothstep(self.crest_z, self.hip_z, z)
        a = self.cav_a * wave * (1 - 0.28 * pelvis)
        chest = _smoothstep(self.dome_r[0] - 40, self.dome_r[0] + 120, z)
        below_ribs = _smoothstep(self.dome_r[0] - 60, self.dome_r[0] - 150, z) * (1 - pelvis)
        b_ant = (self.cav_b_ant * wave * (1 + 0.08 * chest - 0.15 * pelvis)
                 + self.belly * below_ribs)
        b_post = self.cav_b_post * (1 + 0.05 * chest - 0.1 * pelvis) * wave
        return a, b_ant, b_post

    def layers(self, z):
        """Thickness of muscle and fat at height z: (muscle lateral, muscle ant, muscle post,
        fat ant, fat lateral, fat post)."""
        z = np.asarray(z, dtype=np.float32)
        pelvis = _smoothstep(self.crest_z + 20, self.hip_z, z)
        m = self.muscle_mm
        return (m + 55 * pelvis, m + 0 * z, m + 10 + 6 * pelvis,
                self.fat_ant * (1 + 0.3 * pelvis) + 0 * z, self.fat_lat * (1 + 0.6 * pelvis),
                self.fat_post * (1 + 0.3 * pelvis))

    def diaphragm_z(self, X, Y):
        """Height of the diaphragm above (x, y): two domes falling toward the back and sides."""
        out = None
        for z0, x0, y0 in (self.dome_r, self.dome_l):
            dy = Y - y0
            cy = np.where(dy < 0, self.diaph_c_ant, self.diaph_c_post)
            h = z0 - self.diaph_c_lat * (X - x0) ** 2 - cy * dy * dy
            out = h if out is None else np.maximum(out, h)
        # The central tendon under the heart sags a little between the domes.
        return np.maximum(out, min(self.dome_r[0], self.dome_l[0]) - 25 - 0.004 * Y * Y
                          - 0.004 * X * X)

    # -- organs -----------------------------------------------------------------------------------

    def _organs(self, rng):
        u = rng.uniform
        sl, sa, sz = self.s_lat, self.s_ap, self.s_z
        dome = self.dome_r[0]

        # Kidneys: bean = ellipsoid minus a hilum notch; upper poles medial and posterior.
        self.kidneys = {}
        for side, sign in (("kidney_l", 1.0), ("kidney_r", -1.0)):
            z0 = (-5 if sign > 0 else -22) * sz + u(-15, 15)
            center = np.array([sign * (68 * sl + u(-8, 8)), 50 * sa + u(-8, 8), z0])
            long_axis = [-sign * u(0.1, 0.35), u(0.05, 0.35), 1.0]
            hilum = [-sign * 1.0, -u(0.3, 0.9), 0.0]
            rows = _frame(hilum, [0, 0, 1])  # e1 toward the hilum, e2 ~ up
            rows = _frame(rows[0], long_axis)
            axes = np.array([u(25, 30), u(48, 58), u(19, 24)])  # (hilum dir, long, thickness)
            body = (np.zeros(3), axes, np.eye(3))
            notch = (np.array([axes[0] * u(0.85, 1.0), 0, -axes[2] * 0.2]),
                     np.array([u(11, 16), u(16, 24), u(9, 13)]), np.eye(3))
            organ = _EllipsoidOrgan(center, rows, [body], notches=[notch],
                                    warp=_Warp(rng, u(1.5, 4), (60, 140)))
            organ.cortex_mm = u(5, 8)
            organ.sinus = (np.array([axes[0] * 0.3, 0, 0]), np.array([axes[0] * 0.45,
                                                                       axes[1] * 0.55, 8.0]))
            self.kidneys[side] = organ

        # Spleen: bowl-shaped ovoid under the left ribs, hilum toward the front and middle.
        center = np.array([88 * sl + u(-10, 10), 48 * sa + u(-12, 8), dome - 60 * sz + u(-15, 15)])
        inward = [-1.0, -u(0.3, 0.8), u(-0.1, 0.2)]
        rows = _frame(inward, [0, -0.6, -0.8])  # e1 medial, e2 ~ anterior-inferior (long)
        rows = np.vstack([rows[1], rows[2], rows[0]])  # (long, width, thickness=medial)
        axes = np.array([u(50, 65), u(32, 44), u(17, 24)])
        # An enlarged spleen stays against the ribs and the diaphragm: it grows forward, down
        # and toward the middle, and its hilum (the pancreatic tail's end) moves with it.
        growth = self.spleen_growth ** (1.0 / 3.0) - 1.0
        center = center + growth * (0.6 * axes[0] * rows[0] + 0.8 * axes[2] * rows[2])
        self.spleen = _EllipsoidOrgan(center, rows, [(np.zeros(3), axes, np.eye(3))],
                                      warp=_Warp(rng, u(2, 6), (50, 120)), bend=u(0.004, 0.009))

        # Liver: big right lobe, inferior right extension, wedge-shaped left lobe, caudate.
        center = np.array([-45 * sl + u(-8, 8), 5 * sa + u(-6, 6), dome - 70 * sz + u(-8, 8)])
        left = u(0.55, 1.2)  # left lobe size: small to reaching the spleen
        parts = [
            (np.array([-25, 0, 5]) * [sl, sa, sz], np.array([u(65, 80), u(70, 85), u(70, 85)]),
             _rows_from_angles(rng, 6)),
            (np.array([-45, 5, -40]) * [sl, sa, sz], np.array([40, 50, 45]) * u(0.7, 1.3),
             _rows_from_angles(rng, 8)),
            (np.array([48 + 10 * (left - 1), -48, 18]) * [sl, sa, sz],
             np.array([75 * left, 34, 42]) * u(0.85, 1.15),
             _rotation([0, 0, 1], math.radians(u(-25, 5)))),
            (np.array([28, 15, 0]) * [sl, sa, sz], np.array([20, 22, 32]), np.eye(3)),
        ]
        self.liver = _EllipsoidOrgan(center, _rows_from_angles(rng, 4), parts, blend_mm=18.0,
                                     warp=_Warp(rng, u(5, 12), (70, 160)),
                                     taper=(2, u(0.6, 1.2)))

        # Gallbladder: pear under the liver, fundus anterior-inferior; absent after surgery.
        self.has_gallbladder = rng.random() > 0.1
        gb_len = u(28, 45)
        self.gallbladder = _EllipsoidOrgan(
            np.array([-48 * sl + u(-10, 10), -38 * sa + u(-10, 10), dome - 120 * sz + u(-10, 10)]),
            _frame([u(-0.3, 0.1), -u(0.3, 0.7), -1.0], [1, 0, 0]),
            [(np.zeros(3), np.array([gb_len, u(11, 18), u(11, 18)]), np.eye(3)),
             (np.array([gb_len * 0.6, 0, 0]), np.array([gb_len * 0.5, 9, 9]), np.eye(3))],
            warp=_Warp(rng, 2, (40, 80)))

        # Adrenals: thin plates above-medial to the kidneys.
        self.adrenals = []
        for sign, kidney in ((1.0, self.kidneys["kidney_l"]), (-1.0, self.kidneys["kidney_r"])):
            c = kidney.center + np.array([-sign * 30, -12 if sign > 0 else -20, 55 * sz])
            self.adrenals.append(_EllipsoidOrgan(
                c, _frame([sign * 0.4, 1, 0], [0, 0, 1]),
                [(np.zeros(3), np.array([u(3, 4.5), u(10, 16), u(14, 20)]), np.eye(3)),
                 (np.array([0, 6, -6]), np.array([3, 10, 12]), _rotation([1, 0, 0], 0.6))],
                warp=_Warp(rng, 1.5, (30, 60))))

        # Pancreas: curved tube from the head (by the duodenum) across the spine to the tail at
        # the splenic hilum.  Radii are scaled together to reach the target volume.
        jitter = lambda s=6: rng.normal(0, s, size=3)  # noqa: E731
        spleen_hilum = self.spleen.center + self.spleen.rows[2] * axes[2] * 0.8 * (1 + growth)
        base = np.array([0.0, 0.0, u(-15, 15)])
        self.pancreas_points = np.array([
            np.array([-36 * sl, 8 * sa, -58 * sz]) + jitter(4),  # uncinate
            np.array([-45 * sl, -4 * sa, -35 * sz]) + jitter(5),  # head
            np.array([-20 * sl, -24 * sa, -18 * sz]) + jitter(4),  # neck
            np.array([12 * sl, -28 * sa, -8 * sz]) + jitter(5),  # body
            np.array([48 * sl, -12 * sa, 5 * sz]) + jitter(6),  # body-tail
            0.5 * (np.array([78 * sl, 15 * sa, 22 * sz]) + spleen_hilum - [8, 0, 15]),  # tail
        ]) + base
        self.pancreas_points[-1] += jitter(4)
        self.pancreas_radii = np.array([u(10, 14), u(15, 19), u(10, 12), u(10, 13),
                                        u(9, 12), u(7, 10)])
        self.pancreas_warp = _Warp(rng, u(1.5, 4), (25, 60), terms=5)
        self.pancreas_scale = 1.0

    # -- vessels ----------------------------------------------------------------------------------

    def _vessels(self, rng):
        u = rng.uniform
        sz = self.s_z
        zs = np.array([400, 250, 130, 60, 0, -60, -115], float) * [1, 1, sz, sz, sz, sz, 1]
        zs[-1] = self.vertebra_z(3.6)
        sx, sy = self.spine_xy(zs)
        self.aorta_r = u(10, 13)
        ao_front = []
        for z, x, y in zip(zs, sx, sy):
            gap = self.vb_half_ap + self.aorta_r + 1
            if z > 100:  # thorax: left of the spine, further back
                ao_front.append([x + 22, y - gap * 0.5, z])
            else:
                ao_front.append([x + 14 + u(-3, 3), y - gap, z])
        self.aorta = np.array(ao_front)
        self.aorta_radii = np.array([1.1, 1.05, 1.0, 0.95, 0.9, 0.85, 0.8]) * self.aorta_r
        bif = self.aorta[-1]
        self.iliac_arteries = []
        self.iliac_veins = []
        for sign in (1, -1):
            pts = np.array([bif, bif + [sign * 25, 5, -50], [sign * 70, -5, self.hip_z + 30],
                            [sign * 85, -35, self.hip_z - 40], [sign * 90, -45, self.hip_z - 160]])
            self.iliac_arteries.append(pts)
            vpts = pts + [sign * -4 + 0.0, 12, 0]
            vpts[0] = [-18, bif[1] + 10, bif[2] - 30]
            self.iliac_veins.append(vpts)

        # IVC: right of the aorta, behind the liver, into the right atrium.
        ivc_r = u(9, 12)
        ivc = []
        for z, x, y in zip(zs[::-1][1:], sx[::-1][1:], sy[::-1][1:]):
            if z > self.dome_r[0] - 20:
                continue
            ivc.append([x - 24, y - self.vb_half_ap - ivc_r - 2, z])
        ivc[0] = [-18, ivc[0][1] + 8, self.aorta[-1][2] - 30]
        ivc.append([-28, 12 * self.s_ap, self.dome_r[0] - 45])
        ivc.append([-18, -8, self.dome_r[0] + 10])
        ivc.append([-10, -20, self.dome_r[0] + 50])
        self.ivc = np.array(ivc)
        self.ivc_radii = np.full(len(ivc), ivc_r)
        self.ivc_radii[-3:] = ivc_r * 1.2

        # Portal system: confluence behind the pancreatic neck.
        neck = self.pancreas_points[2]
        self.confluence = neck + [8, 13, 2]
        hilum = np.array([-42 * self.s_lat, 2, self.dome_r[0] - 85 * sz]) + rng.normal(0, 5, 3)
        self.portal = np.array([self.confluence, 0.5 * (self.confluence + hilum) + [0, 4, 0],
                                hilum])
        self.portal_r = u(6, 8)
        p = self.pancreas_points
        self.splenic_vein = np.array([self.confluence, p[3] + [0, 14, 6], p[4] + [0, 13, 6],
                                      p[5] + [6, 11, 8],
                                      self.spleen.center + self.spleen.rows[2] * 14])
        self.smv = np.array([self.confluence, self.confluence + [-4, -8, -40],
                             self.confluence + [-6, -20, -110]])
        ao = self.aorta
        self.sma = np.array([ao[4] + [0, -self.aorta_r, 8], ao[4] + [-2, -self.aorta_r - 16, -10],
                             ao[4] + [-5, -self.aorta_r - 26, -60],
                             ao[4] + [-8, -self.aorta_r - 32, -130]])
        self.celiac = np.array([ao[4] + [0, -self.aorta_r, 28],
                                ao[4] + [0, -self.aorta_r - 14, 30]])
        self.splenic_artery = np.array([self.celiac[-1], p[3] + [0, 4, 16], p[4] + [6, 8, 20],
                                        p[5] + [8, 8, 18],
                                        self.spleen.center + self.spleen.rows[2] * 16])
        self.hepatic_artery = np.array([self.celiac[-1], self.celiac[-1] + [-25, -5, 0],
                                        hilum + [4, -8, -4]])
        # Intrahepatic portal branches and hepatic veins (random, inside the liver).
        lc = self.liver.center
        self.portal_branches = [
            np.array([hilum, hilum + [-35, 2, 8], lc + [-55, 10, 15] + rng.normal(0, 8, 3)]),
            np.array([hilum + [-35, 2, 8], lc + [-40, -25, -15] + rng.normal(0, 8, 3)]),
            np.array([hilum + [-35, 2, 8], lc + [-60, 30, 0] + rng.normal(0, 8, 3)]),
            np.array([hilum, hilum + [25, -25, 10], lc + [70, -40, 20] + rng.normal(0, 8, 3)]),
            np.array([hilum + [25, -25, 10], lc + [40, -60, 0] + rng.normal(0, 6, 3)]),
        ]
        top = np.array([-22, 8, self.dome_r[0] - 20])
        self.hepatic_veins = [
            np.array([top, top + [-40, 5, -15], lc + [-75, 15, -5] + rng.normal(0, 8, 3)]),
            np.array([top, top + [-20, -25, -20], lc + [-25, -45, -40] + rng.normal(0, 8, 3)]),
            np.array([top, top + [20, -20, -5], lc + [50, -45, 15] + rng.normal(0, 8, 3)]),
        ]
        # Renal vessels from the hila.
        self.renal_veins, self.renal_arteries, self.ureters = [], [], []
        for side, sign in (("kidney_l", 1), ("kidney_r", -1)):
            k = self.kidneys[side]
            hil = k.center + k.rows[0] * 22
            ivc_pt = np.array([-26, ao[4][1], k.center[2] + 8])
            if sign > 0:  # left renal vein passes in front of the aorta
                vein = [hil, hil + [-20, -8, 4], [ao[4][0] + 2, ao[4][1] - self.aorta_r - 6,
                                                   ivc_pt[2] + 5], ivc_pt]
            else:
                vein = [hil, 0.5 * (hil + ivc_pt) + [0, -4, 0], ivc_pt]
            self.renal_veins.append(np.array(vein))
            self.renal_arteries.append(np.array([[ao[4][0], ao[4][1] + 3, k.center[2] + 12],
                                                 hil + [-sign * 12, 6, 4], hil + [0, 4, 0]]))
            self.ureters.append(np.array([hil + [0, -2, -12], hil + [-sign * 15, 0, -60],
                                          [sign * 45, -5, self.hip_z + 20],
                                          [sign * 30, -20, self.hip_z - 25]]))

    # -- digestive tract --------------------------------------------------------------------------

    def _gut(self, rng):
        u = rng.uniform
        sl, sa, sz = self.s_lat, self.s_ap, self.s_z
        dome_l = self.dome_l[0]
        fill = u(0.6, 1.25)
        self.stomach_fill = fill
        self.stomach_content = str(rng.choice(["fluid", "food", "gas", "collapsed"],
                                              p=[0.4, 0.25, 0.15, 0.2]))
        j = lambda s=6: rng.normal(0, s, 3)  # noqa: E731
        self.stomach = np.array([
            [25 * sl, 10 * sa, dome_l - 45],  # gastro-oesophageal junction
            np.array([55 * sl, 12 * sa, dome_l - 35]) + j(),  # fundus
            np.array([62 * sl, -30 * sa, dome_l - 80]) + j(),  # body
            np.array([42 * sl, -62 * sa, dome_l - 125]) + j(),
            np.array([5 * sl, -65 * sa, dome_l - 135]) + j(),  # antrum
            np.array([-28 * sl, -48 * sa, dome_l - 125]) + j(4),  # pylorus
        ])
        self.stomach_radii = (np.array([10, 38, 36, 30, 22, 11])
                              * [1, fill, fill, fill, fill ** 0.5, 1])
        ph = self.pancreas_points
        self.duodenum = np.array([
            self.stomach[-1], self.stomach[-1] + [-14, 16, -4],  # bulb
            ph[1] + [-24, 4, 8],  # descending, lateral to the head
            ph[1] + [-22, 6, -32],
            ph[0] + [5, 0, -28],  # horizontal, below the head
            [10 * sl, self.aorta[5][1] - self.aorta_r - 12, ph[0][2] - 22],
            [30 * sl, -8, ph[0][2] - 8], [36 * sl, -18, ph[3][2] - 25],  # to the DJ flexure
        ])
        self.duodenum_r = u(9, 13)
        # Colon frame: caecum, ascending, transverse (hanging), descending, sigmoid, rectum.
        lower = self.crest_z
        hip = self.hip_z
        self.colon = np.array([
            np.array([-75 * sl, -25 * sa, lower - 25]) + j(8),  # caecum
            np.array([-100 * sl, 5 * sa, lower + 40]) + j(8),
            np.array([-100 * sl, 10 * sa, -30 * sz]) + j(8),  # hepatic flexure
            np.array([-55 * sl, -62 * sa, -55 * sz]) + j(10),  # transverse
            np.array([10 * sl, -70 * sa, -75 * sz + u(-40, 20)]) + j(10),
            np.array([70 * sl, -45 * sa, -25 * sz]) + j(8),
            np.array([100 * sl, 10 * sa, 20 * sz]) + j(6),  # splenic flexure
            np.array([108 * sl, 25 * sa, -60 * sz]) + j(6),  # descending
            np.array([100 * sl, 20 * sa, lower + 10]) + j(6),
            np.array([70 * sl, -25 * sa, hip + 40]) + j(8),  # sigmoid
            np.array([15 * sl, -35 * sa, hip + 50]) + j(10),
            np.array([0, 55 * sa, hip + 20]) + j(5),  # rectum
            np.array([0, 50 * sa, hip - 50]),
        ])
        self.colon_radii = np.array([28, 24, 22, 20, 20, 20, 20, 17, 17, 16, 16, 20, 18]) * u(0.8,
                                                                                            1.2)
        self.bladder_fill = u(0.4, 1.3)
        self.bladder = _EllipsoidOrgan(
            np.array([0, -40 * sa, hip - 10]), np.eye(3),
            [(np.zeros(3), np.array([48, 36, 36]) * self.bladder_fill, np.eye(3))],
            warp=_Warp(rng, 3, (50, 100)))
        self.oesophagus = np.array([[4, self.vb_y0 - 25, 400], [8, self.vb_y0 - 28, dome_l + 30],
                                    self.stomach[0] + [-5, 0, 20], self.stomach[0]])
        heart_c = np.array([18 * sl, -28 * sa, self.dome_r[0] + 45 * sz])
        self.heart = _EllipsoidOrgan(heart_c, _frame([0.7, -0.5, -0.5], [0, 0, 1]),
                                     [(np.zeros(3), np.array([u(60, 72), u(48, 58), u(45, 55)]),
                                       np.eye(3))], warp=_Warp(rng, 3, (60, 120)))


# ------------------------------------------------------------------------------------------------
# Placement of the patient relative to the scan
# ------------------------------------------------------------------------------------------------


def _place(patient: Patient, geometry: CaseGeometry, rng: np.random.Generator) -> np.ndarray:
    """Offset (x, y, z) mm with physical point = patient-frame point + offset.

    Only the grid's centre and its length along the axis nearest to z are used, so flipped,
    permuted and slightly oblique grids of one scan see the very same patient.
    """
    centre = geometry.center_mm()
    slice_axis = int(np.argmax(np.abs(geometry.direction_matrix[2])))
    length = geometry.size[slice_axis] * geometry.spacing_mm[slice_axis]
    draws = rng.random(6)
    dome = max(patient.dome_r[0], patient.dome_l[0])
    if length >= 350:
        # Whole abdomen from just above the dome; long scans reach further into the chest.
        top = dome + 15 + 45 * draws[0] + max(0.0, length - 480) * draws[1]
    elif draws[2] < 0.5:
        top = dome + 40 * draws[0]
    else:
        top = -110 + 180 * draws[3] + length / 2
    return np.array([centre[0] + (draws[4] - 0.5) * 30,
                     centre[1] + (draws[5] - 0.5) * 40,
                     centre[2] + length / 2 - top])
