"""Chest radiographs, PA (zero-shot stand-in for Montgomery); target = both lung fields.

An attenuation map is summed from a thorax silhouette (thicker in the middle), the mediastinum and a
heart that bulges to the patient's left, a spine with vertebral bands, posterior and fainter anterior
ribs, clavicles, scapular edges, the diaphragm domes with the abdomen below and sometimes a gastric
bubble or breast shadows; the lungs subtract attenuation (air). Lung outlines are smooth closed
curves through jittered anatomical landmarks (apex, lateral wall, costophrenic angle, diaphragm dome,
cardiophrenic angle, mediastinal border). Some cases get patchy opacities inside the lungs (still lung
field). The radiograph is ``1 - exp(-attenuation)`` with scatter blur, noise, gamma and collimation.
"""

from __future__ import annotations

import numpy as np

from .common import Case, CaseContext
from .shapes import blob_field, grid, polygon_mask, render_curves, smooth_closed_curve
from .textures import blur, smooth_noise


def _lung(
    rng: np.random.Generator, s: int, side: float, cx: float, top: float, bottom: float, heart_w: float
) -> np.ndarray:
    """Closed outline (rows, cols) of one lung; ``side`` -1 for the image-left lung, +1 for the right."""

    def j(scale: float) -> float:  # landmark jitter, as a fraction of the image size
        return float(rng.normal(0, scale * s))

    half = 0.5 * s
    med = half + side * (0.045 * s + (heart_w if side > 0 else 0.02 * s))
    lat = half + side * rng.uniform(0.34, 0.4) * s
    pts = [
        (top + j(0.01), half + side * 0.15 * s + j(0.01)),  # apex
        (top + 0.04 * s, half + side * 0.23 * s),
        (top + 0.14 * s + j(0.01), lat - side * 0.04 * s),  # upper lateral wall
        ((top + bottom) / 2 + j(0.01), lat + j(0.008)),
        (bottom - 0.02 * s, lat + side * 0.005 * s),
        (bottom + j(0.01), lat - side * 0.02 * s),  # costophrenic angle
        (bottom - rng.uniform(0.06, 0.1) * s, (lat + med) / 2 + j(0.01)),  # diaphragm dome
        (bottom - rng.uniform(0.0, 0.03) * s, med + side * 0.01 * s),  # cardiophrenic angle
        (top + 0.45 * (bottom - top), med + j(0.008)),  # mediastinal/cardiac border
        (top + 0.22 * (bottom - top), half + side * 0.06 * s + j(0.006)),  # aortic knob / hilum
        (top + 0.05 * s, half + side * 0.08 * s),
    ]
    return smooth_closed_curve(np.array(pts), samples=240)


def render(ctx: CaseContext) -> Case:
    rng, s = ctx.rng, ctx.size
    shape = (s, s)
    yy, xx = grid(shape)
    u = (xx - s / 2) / s  # -0.5 .. 0.5
    v = yy / s

    # --- anatomy landmarks with patient variation ----------------------------------------------------
    top = rng.uniform(0.08, 0.16) * s
    bottom = top + rng.uniform(0.58, 0.7) * s
    heart_w = rng.uniform(0.07, 0.13) * s
    tilt = rng.normal(0, 0.03)
    lungs = [
        _lung(
            rng, s, side, s / 2, top + (0.015 * s if side > 0 else 0), bottom + (0.02 * s if side > 0 else 0), heart_w
        )
        for side in (-1.0, 1.0)
    ]

    # --- attenuation ---------------------------------------------------------------------------------
    body_half = rng.uniform(0.41, 0.46) + 0.03 * np.clip((v - 0.15) / 0.2, -1, 1)
    body_half = np.where(v < 0.08, 0.12 + 0.3 * np.clip(v / 0.08, 0, 1), body_half)  # neck to shoulders
    body = np.sqrt(np.clip(1 - (u / body_half) ** 2, 0, 1))
    att = 1.3 * body
    # arms/shoulders at the edges
    att += 0.5 * np.exp(-(((np.abs(u) - 0.47) / 0.04) ** 2)) * (v > 0.05) * (rng.random() < 0.6)
    # heart and mediastinum
    hc = (top + 0.62 * (bottom - top), s / 2 + 0.05 * s)
    heart = blob_field(shape, hc, np.sqrt(heart_w * 1.9 * 0.13 * s), rng, aspect=1.5, angle=0.35, roughness=0.04)
    att += 0.6 * np.clip((1.2 - heart) / 0.4, 0, 1)
    att += 0.35 * np.exp(-((u / 0.07) ** 2)) * (v > top / s - 0.02)
    # abdomen below the domes
    att += 0.4 * np.clip((v - bottom / s + 0.05) / 0.08, 0, 1)
    masks = [polygon_mask(shape, c[:, 0], c[:, 1]) for c in lungs]
    lung = masks[0] | masks[1]
    depth = blur(lung.astype(np.float32), 0.04 * s)
    att -= 1.0 * depth * (1 + 0.05 * smooth_noise(rng, shape, 20))
    # gastric bubble under the left dome
    if rng.random() < 0.5:
        gb = blob_field(shape, (bottom + 0.06 * s, s / 2 + 0.18 * s), 0.035 * s, rng, aspect=1.8, roughness=0.1)
        att -= 0.3 * np.clip((1 - gb) / 0.2, 0, 1)
    # breast shadows
    if rng.random() < 0.3:
        for side in (-1, 1):
            br = blob_field(
                shape, (bottom - 0.05 * s, s / 2 + side * 0.27 * s), 0.16 * s, rng, aspect=1.4, roughness=0.05
            )
            att += 0.2 * np.clip((1 - br) / 0.3, 0, 1)
    # spine with vertebral bands
    spine = np.exp(-((u / 0.04) ** 4))
    bands = 0.5 + 0.5 * np.cos(2 * np.pi * yy / (0.045 * s))
    att += (0.35 + 0.1 * bands) * spine
    # ribs: posterior (clearer) and anterior (fainter)
    curves, widths, weights = [], [], []
    n_ribs = 10
    for i in range(n_ribs):
        y0 = top + (i + 0.3) * (bottom - top) / (n_ribs - 0.5)
        for side in (-1.0, 1.0):
            t = np.linspace(0, 1, 40)
            x = s / 2 + side * (0.04 + 0.38 * t) * s
            y = y0 - 0.06 * s * np.sin(np.pi * t * 0.7) + 0.09 * s * t**2 + tilt * s * side * t
            curves.append(np.stack([y, x], 1))
            widths.append(0.022 * s)
            weights.append(1.0)
            if i < 6:  # anterior ribs descend medially
                ya = y0 + 0.12 * s + 0.1 * s * (1 - t)
                xa = s / 2 + side * (0.1 + 0.3 * t) * s
                curves.append(np.stack([ya - 0.08 * s * t * (1 - t), xa], 1))
                widths.append(0.016 * s)
                weights.append(0.4)
    ribs = render_curves(shape, curves, widths, weights)
    att += 0.16 * ribs
    # clavicles
    clav = []
    for side in (-1.0, 1.0):
        t = np.linspace(0, 1, 40)
        cy = top - 0.01 * s + 0.03 * s * np.sin(np.pi * t) - 0.05 * s * t + rng.normal(0, 0.01 * s)
        clav.append(np.stack([cy, s / 2 + side * (0.04 + 0.34 * t) * s], 1))
    att += 0.4 * render_curves(shape, clav, [0.025 * s] * 2)
    # scapular edges overlapping the upper lateral lungs
    for side in (-1.0, 1.0):
        sc = blob_field(
            shape,
            (top + 0.2 * s, s / 2 + side * 0.42 * s),
            0.12 * s,
            rng,
            aspect=2.2,
            angle=np.pi / 2 + side * 0.3,
            roughness=0.05,
        )
        att += 0.15 * np.clip((1 - sc) / 0.1, 0, 1)
    # patchy opacities (infection/TB) inside the lungs: they stay lung field
    findings = []
    if rng.random() < 0.3:
        pts = np.argwhere(lung)
        for _ in range(int(rng.integers(1, 4))):
            c = pts[int(rng.integers(len(pts)))]
            op = blob_field(shape, (float(c[0]), float(c[1])), rng.uniform(0.03, 0.08) * s, rng, roughness=0.3)
            att += 0.3 * np.clip((1 - op) / 0.5, 0, 1) * depth
        findings.append("opacity")

    # --- image formation -----------------------------------------------------------------------------------
    att = np.clip(att, 0, None) * (1 + 0.03 * smooth_noise(rng, shape, 8))
    img = 1 - np.exp(-rng.uniform(1.2, 1.8) * att)
    img = img + 0.15 * blur(img, 0.08 * s) * rng.uniform(0, 1)  # scatter
    img = blur(img, rng.uniform(0.5, 1.0))
    lo, hi = np.percentile(img, [1, 99.7])
    img = np.clip((img - lo) / max(hi - lo, 1e-3), 0, 1) ** rng.uniform(0.8, 1.5)
    img = img + rng.normal(0, rng.uniform(0.005, 0.02), shape)
    # collimation: black borders on some sides
    if rng.random() < 0.5:
        m = rng.uniform(0, 0.06, 4) * s
        coll = (yy >= m[0]) & (yy < s - m[1]) & (xx >= m[2]) & (xx < s - m[3])
        img = img * coll
        lung &= coll
    meta = {"findings": findings}
    return Case(np.clip(img, 0, 1).astype(np.float32), lung, meta)
