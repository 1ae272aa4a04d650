"""Axial chest CT (stand-in for the COVID-19 CT lung-infection set); target = ground-glass/consolidation.

The slice is composed in Hounsfield units: air, a body ellipse with subcutaneous fat and muscle, ribs,
sternum and a vertebra (cortex and marrow), a mediastinum with heart, aorta and fat, and two lungs
(about -850 HU) with a branching vessel tree that thins toward the periphery, bronchi, a fissure and a
dependent density gradient. Infection patches are multifocal, peripheral/posterior-biased blobs of
ground-glass (-700 to -350 HU, vessels still visible through them), crazy paving (ground-glass with a
reticular pattern) or consolidation (soft-tissue density with air bronchograms), always clipped to the
lungs. Noise is added in HU; the slice is returned in HU and the recipe's CT window (models/recipe.py) displays it.
"""

from __future__ import annotations

import numpy as np

from .common import Case, CaseContext
from .shapes import blob_field, curve_points, grid, log_uniform, render_curves
from .textures import blur, smooth_noise, splat_dots


def _inside(rho: np.ndarray, edge: float = 0.03) -> np.ndarray:
    return np.clip((1 - rho) / edge + 0.5, 0, 1).astype(np.float32)


def render(ctx: CaseContext) -> Case:
    rng, s = ctx.rng, ctx.size
    shape = (s, s)
    yy, xx = grid(shape)
    hu = np.full(shape, -1000.0, dtype=np.float32)

    # --- body, fat and muscle ------------------------------------------------------------------------
    bc = (s * rng.uniform(0.47, 0.55), s * rng.uniform(0.47, 0.53))
    bw, bh = s * rng.uniform(0.42, 0.48), s * rng.uniform(0.3, 0.38)
    body = blob_field(shape, bc, np.sqrt(bw * bh), rng, aspect=bw / bh, roughness=0.04, harmonics=4)
    hu = hu * (1 - _inside(body, 0.01)) + _inside(body, 0.01) * (-100 + 15 * smooth_noise(rng, shape, 6))
    fat = rng.uniform(0.05, 0.14)
    inner = body / (1 - fat)
    hu = np.where(inner < 1, 45 + 10 * smooth_noise(rng, shape, 8), hu)  # muscle wall
    cavity = body / (1 - fat - rng.uniform(0.05, 0.08))  # thoracic cavity
    hu = np.where(cavity < 1, -80 + 20 * smooth_noise(rng, shape, 10), hu)  # mediastinal fat by default
    # table under the patient
    table_y = bc[0] + bh + s * rng.uniform(0.03, 0.08)
    table = np.exp(-(((yy - table_y - 0.002 * (xx - s / 2) ** 2 / s) / 1.5) ** 2))
    hu += 900 * table * (body > 1.05)

    # --- lungs ---------------------------------------------------------------------------------------
    ch = bh * (1 - fat - 0.06)
    cw = bw * (1 - fat - 0.06)
    lungs = []
    for sign in (-1.0, 1.0):
        lc = (bc[0] + rng.uniform(-0.05, 0.05) * ch, bc[1] + sign * cw * rng.uniform(0.45, 0.55))
        lr = np.sqrt(cw * 0.47 * ch * 0.9) * rng.uniform(0.98, 1.1)
        rho = blob_field(
            shape,
            lc,
            lr,
            rng,
            aspect=rng.uniform(1.4, 1.9),
            angle=np.pi / 2 + sign * rng.uniform(0, 0.25),
            roughness=0.08,
            harmonics=4,
        )
        lungs.append(np.maximum(rho, 0.0))
    lung_rho = np.minimum(*lungs)
    # heart (left-anterior, on the image's right) carves the medial side of the left lung
    hc = (bc[0] - ch * rng.uniform(0.05, 0.2), bc[1] + cw * rng.uniform(0.08, 0.2))
    hr = min(cw, ch) * rng.uniform(0.38, 0.5)
    heart = blob_field(shape, hc, hr, rng, aspect=rng.uniform(1.1, 1.4), angle=rng.uniform(-0.6, 0), roughness=0.06)
    spine_c = (bc[0] + ch * rng.uniform(0.72, 0.85), bc[1] + rng.normal(0, 2))
    spine = blob_field(shape, spine_c, ch * rng.uniform(0.2, 0.26), rng, aspect=1.1, roughness=0.03)
    aorta_c = (spine_c[0] - ch * 0.3, spine_c[1] + cw * rng.uniform(0.12, 0.2))
    aorta = blob_field(shape, aorta_c, ch * rng.uniform(0.1, 0.14), rng, roughness=0.02)
    med = np.minimum(np.minimum(heart / 1.08, spine / 1.25), aorta / 1.2)
    lung = (lung_rho < 1) & (med > 1) & (cavity < 0.97)
    lung_soft = blur(lung.astype(np.float32), 0.8)

    parenchyma = -860 + 25 * smooth_noise(rng, shape, 10) + 12 * smooth_noise(rng, shape, 3)
    # dependent (posterior) density gradient
    parenchyma += rng.uniform(20, 90) * np.clip((yy - bc[0]) / ch, 0, 1) ** 2
    # vessel tree: from each hilum, curved branches that fork and taper toward the periphery
    curves, widths, weights = [], [], []

    def branch(start: tuple[float, float], ang: float, length: float, width: float, depth: int) -> None:
        pts = curve_points(rng, start, ang, length, curl=0.05)
        curves.append(pts)
        widths.append(width)
        weights.append(min(1.0, 0.35 + width / 3.5))
        if depth > 0:
            for _ in range(2):
                branch(
                    tuple(pts[-1]),
                    ang + rng.normal(0, 0.5),
                    length * rng.uniform(0.55, 0.8),
                    max(width * 0.7, 0.8),
                    depth - 1,
                )

    for sign in (-1.0, 1.0):
        hilum = (bc[0] + rng.uniform(-0.1, 0.1) * ch, bc[1] + sign * cw * 0.3)
        for _ in range(int(rng.integers(4, 7))):
            ang = rng.uniform(0, 2 * np.pi)
            branch(hilum, ang, rng.uniform(0.12, 0.22) * cw, rng.uniform(2.2, 3.2) * s / 256, 2)
    vessels = render_curves(shape, curves, widths, weights)
    # cross-sections of vessels running through the slice: dots
    n_dots = int(rng.integers(40, 90))
    pts = np.argwhere(lung)
    if len(pts):
        pick = pts[rng.integers(0, len(pts), n_dots)]
        vessels = np.maximum(vessels, splat_dots(shape, pick[:, 0], pick[:, 1], rng.uniform(0.6, 1.2) * s / 256))
    vessel_hu = vessels * (rng.uniform(550, 800))
    # fissure: a faint thin curve
    fis = render_curves(
        shape,
        [
            curve_points(
                rng,
                (bc[0] - ch * 0.5, bc[1] + rng.choice([-1, 1]) * cw * 0.5),
                np.pi / 2 + rng.normal(0, 0.3),
                ch,
                curl=0.02,
            )
        ],
        [1.0],
    )

    # --- infection -------------------------------------------------------------------------------------
    infection = np.zeros(shape, dtype=np.float32)
    core = np.zeros(shape, dtype=bool)
    kinds: list[str] = []
    if ctx.has_target and lung.any():
        lung_area = float(lung.sum())
        frac = log_uniform(rng, 0.03, 0.75)
        total = frac * lung_area
        n = int(rng.integers(1, 7 if frac < 0.25 else 4))
        # peripheral, posterior-biased candidate centres
        edge = lung & (blur(lung.astype(np.float32), 6) < 0.93)
        cand = np.argwhere(edge if rng.random() < 0.75 and edge.any() else lung)
        cand = (
            cand[np.argsort(cand[:, 0] + rng.uniform(0, s * 0.8, len(cand)))][len(cand) // 3 :]
            if len(cand) > 10
            else cand
        )
        level = np.zeros(shape, dtype=np.float32)
        kinds_here = []
        for _ in range(n):
            c = cand[int(rng.integers(len(cand)))]
            r = np.sqrt(total / n / np.pi) * rng.uniform(0.7, 1.4)
            rho = blob_field(
                shape,
                (float(c[0]), float(c[1])),
                r,
                rng,
                aspect=rng.uniform(1, 2),
                angle=rng.uniform(0, np.pi),
                roughness=0.3,
                harmonics=7,
            )
            kind = str(rng.choice(["ggo", "crazy", "consolidation"], p=[0.55, 0.2, 0.25]))
            kinds_here.append(kind)
            w = np.clip((1.0 - rho) / 0.15 + 0.5, 0, 1)
            core |= rho < 1  # the half-density contour is the label's border
            dens = {
                "ggo": rng.uniform(0.3, 0.55),
                "crazy": rng.uniform(0.3, 0.5),
                "consolidation": rng.uniform(0.85, 1.0),
            }[kind]
            level = np.maximum(level, w * dens)
            if kind == "crazy":
                net = np.abs(smooth_noise(rng, shape, 5)) < 0.25
                level = np.maximum(level, w * net * (dens + 0.2))
        level *= 1 + 0.15 * smooth_noise(rng, shape, 6)
        infection = np.clip(level, 0, 1) * lung_soft
        kinds = sorted(set(kinds_here))
    mask = core & lung

    # --- compose ---------------------------------------------------------------------------------------
    lung_hu = parenchyma + vessel_hu + 150 * fis
    # infection raises density toward soft tissue: vessels stay visible through ground glass, not consolidation
    lung_hu = lung_hu * (1 - infection) + infection * (30 + 15 * smooth_noise(rng, shape, 4))
    hu = hu * (1 - lung_soft) + lung_soft * lung_hu
    # mediastinal structures
    hu = np.where(heart < 1, 40 + 8 * smooth_noise(rng, shape, 8), hu)
    hu = np.where(aorta < 1, rng.uniform(40, 250), hu)
    marrow = 250 + 60 * smooth_noise(rng, shape, 3)
    hu = np.where(spine < 1, np.where(spine > 0.85, 900, marrow), hu)
    # ribs: bright ovals along the cavity border, with the sternum in front
    for t in np.linspace(0, 2 * np.pi, int(rng.integers(8, 14)), endpoint=False) + rng.uniform(0, 1):
        if np.sin(t) > 0.75:  # no ribs under the spine
            continue
        ry = bc[0] + np.sin(t) * bh * (1 - fat - 0.03)
        rx = bc[1] + np.cos(t) * bw * (1 - fat - 0.03)
        rib = blob_field(
            shape,
            (ry, rx),
            s * rng.uniform(0.012, 0.02),
            rng,
            aspect=rng.uniform(1.5, 2.5),
            angle=t + np.pi / 2,
            roughness=0.05,
        )
        hu = np.where(rib < 1, np.where(rib > 0.7, 800, 300), hu)
    sternum = blob_field(shape, (bc[0] - bh * (1 - fat - 0.02), bc[1]), s * 0.02, rng, aspect=2.5, roughness=0.05)
    hu = np.where(sternum < 1, np.where(sternum > 0.7, 700, 250), hu)

    # --- acquisition and display ---------------------------------------------------------------------
    hu = blur(hu, rng.uniform(0.5, 0.9))
    hu = hu + blur(rng.standard_normal(shape).astype(np.float32), 0.7) * np.float32(rng.uniform(15, 45))
    rng.uniform(-650, -550), rng.uniform(1350, 1650)  # once a jittered display window: draws kept, stream unchanged
    meta = {"findings": kinds}
    return Case(np.zeros(shape, np.float32), mask, meta, raw=hu.astype(np.float32), units="CT")
