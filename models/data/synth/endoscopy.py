"""Colonoscopy frames (stand-in for the polyp sets, e.g. Kvasir-SEG/CVC); target = polyp.

A height map holds the colon wall: haustral folds as irregular rings around the lumen, fine mucosal
relief and, for a target, a sessile or pedunculated polyp (a dome with a lumpy top). The frame is lit
from the scope tip: Lambert shading from the height map's normals, a fall-off with distance so the
lumen is dark, and Blinn-Phong specular highlights that land on crests of folds, wet mucosa and the
polyp's cap. Albedo is pink-orange mucosa with a red branching vessel pattern; polyps are redder or
paler with a pit pattern. Black octagonal scope borders, vignetting and slight defocus finish it.
"""

from __future__ import annotations

import numpy as np

from .common import Case, CaseContext
from .shapes import blob_field, curve_points, grid, log_uniform, render_curves
from .textures import blur, smooth_noise, vignette


def render(ctx: CaseContext) -> Case:
    rng, s = ctx.rng, ctx.size
    shape = (s, s)
    yy, xx = grid(shape)

    # --- geometry: lumen and folds -----------------------------------------------------------------
    ly, lx = rng.uniform(-0.1, 1.1, 2) * s
    dy, dx = yy - np.float32(ly), xx - np.float32(lx)
    r = np.sqrt(dy * dy + dx * dx) / np.float32(s)
    theta = np.arctan2(dy, dx)
    lumen_r = rng.uniform(0.06, 0.16)
    # radial coordinate warped by angle: folds are irregular rings
    warp = r * (1 + 0.15 * np.cos(2 * theta + rng.uniform(0, 6)) + 0.1 * np.cos(3 * theta + rng.uniform(0, 6)))
    warp = warp + 0.04 * smooth_noise(rng, shape, s / 4)
    freq = rng.uniform(1.0, 2.2)
    folds = ((1 + np.sin(2 * np.pi * freq * np.log1p(warp * 8) + rng.uniform(0, 6))) / 2) ** rng.uniform(2, 4)
    height = s * 0.05 * rng.uniform(0.6, 1.4) * folds * np.clip(warp / lumen_r, 0, 1)
    height = height + s * 0.001 * smooth_noise(rng, shape, 10)  # mucosal relief

    # --- polyp ---------------------------------------------------------------------------------------
    mask = np.zeros(shape, dtype=bool)
    meta: dict = {}
    polyp_w = np.zeros(shape, dtype=np.float32)
    if ctx.has_target:
        area = log_uniform(rng, 0.01, 0.4) * s * s
        radius = float(np.sqrt(area / np.pi))
        # not inside the dark lumen, mostly fully or partly in view
        for _ in range(20):
            cy, cx = rng.uniform(0.1, 0.9, 2) * s
            if np.hypot(cy - ly, cx - lx) > (lumen_r * s + radius) * 0.8:
                break
        kind = str(rng.choice(["sessile", "pedunculated", "flat"], p=[0.6, 0.28, 0.12]))
        rho = blob_field(
            shape,
            (cy, cx),
            radius,
            rng,
            aspect=rng.uniform(1.0, 1.6),
            angle=rng.uniform(0, np.pi),
            roughness=rng.uniform(0.05, 0.2),
            harmonics=5,
        )
        dome = np.sqrt(np.clip(1 - rho**2, 0, 1))
        tall = {
            "sessile": rng.uniform(0.5, 0.9),
            "pedunculated": rng.uniform(0.9, 1.4),
            "flat": rng.uniform(0.25, 0.4),
        }[kind]
        lumps = 1 + 0.12 * smooth_noise(rng, shape, max(radius / 3, 3))
        height = height * (1 - dome) + radius * tall * dome * lumps
        mask = rho < 1
        polyp_w = np.clip((1 - rho) / 0.08 + 0.5, 0, 1)
        meta = {"polyp": kind, "size": round(radius * 2 / s, 3)}

    # --- shading --------------------------------------------------------------------------------------
    gy, gx = np.gradient(height)
    # the wall of a tube seen from inside is oblique: its height rises away from the lumen
    slope = rng.uniform(0.8, 1.6) * np.clip(warp / lumen_r, 0, 1) * (1 - polyp_w * 0.7)
    rr = np.maximum(r * s, 1e-3)
    gx = gx + slope * dx / rr
    gy = gy + slope * dy / rr
    nz = 1 / np.sqrt(1 + gx * gx + gy * gy)
    # light and camera at the scope tip, slightly off-axis
    lx_, ly_ = rng.uniform(-0.3, 0.3, 2)
    lz = np.sqrt(1 - lx_**2 - ly_**2)
    ndotl = np.clip((-gx * lx_ - gy * ly_ + lz) * nz, 0, 1)
    dist = 0.25 + np.clip(r / max(lumen_r * 3, 1e-3), 0, 1.5)
    falloff = np.clip(dist**1.6, 0.03, 1.3)
    hx, hy, hz = lx_ / 2, ly_ / 2, (lz + 1) / 2  # Blinn half vector between light and camera
    hn = np.sqrt(hx * hx + hy * hy + hz * hz)
    spec = np.clip((-gx * hx - gy * hy + hz) * nz / hn, 0, 1) ** rng.uniform(80, 250)

    # --- albedo -----------------------------------------------------------------------------------------
    base = np.array([0.88, 0.52, 0.42]) * rng.uniform(0.85, 1.1, 3)
    albedo = np.empty((*shape, 3), dtype=np.float32)
    tint = 0.06 * smooth_noise(rng, shape, s / 5)
    for c in range(3):
        albedo[..., c] = base[c] * (1 + tint * (1 if c == 0 else -0.5))
    curves, widths = [], []
    for _ in range(int(rng.integers(6, 20))):
        start = (rng.uniform(0, s), rng.uniform(0, s))
        pts = curve_points(rng, start, rng.uniform(0, 2 * np.pi), rng.uniform(30, 120) * s / 256, curl=0.12)
        curves.append(pts)
        widths.append(rng.uniform(1.0, 2.0) * s / 256)
        for _ in range(2):
            j = int(rng.integers(len(pts)))
            curves.append(
                curve_points(rng, tuple(pts[j]), rng.uniform(0, 2 * np.pi), rng.uniform(10, 40) * s / 256, curl=0.15)
            )
            widths.append(1.0 * s / 256)
    vessels = render_curves(shape, curves, widths) * (1 - polyp_w)
    vessel_col = np.array([0.75, 0.3, 0.35]) * rng.uniform(0.8, 1.0)
    albedo = albedo * (1 - 0.6 * vessels[..., None]) + 0.6 * vessels[..., None] * vessel_col
    if ctx.has_target:
        tone = str(rng.choice(["red", "pale", "iso"], p=[0.45, 0.25, 0.3]))
        pcol = {"red": np.array([0.92, 0.42, 0.38]), "pale": np.array([0.9, 0.62, 0.5]), "iso": base * 1.02}[tone]
        pcol = pcol * rng.uniform(0.92, 1.06, 3)
        meta["tone"] = tone
        pits = 0.08 * smooth_noise(rng, shape, 3)
        pal = pcol[None, None, :] * (1 + pits[..., None])
        albedo = albedo * (1 - polyp_w[..., None]) + polyp_w[..., None] * pal

    # debris and bubbles: flat yellowish patches and small bright-rimmed rings, never the target
    for _ in range(int(rng.integers(0, 4)) if rng.random() < 0.35 else 0):
        c = rng.uniform(0, s, 2)
        if rng.random() < 0.5:
            rho = blob_field(
                shape,
                (c[0], c[1]),
                rng.uniform(3, 14) * s / 256,
                rng,
                aspect=rng.uniform(1, 3),
                angle=rng.uniform(0, 3),
                roughness=0.35,
            )
            w = np.clip((1 - rho) / 0.2, 0, 1) * (1 - polyp_w)
            albedo = albedo * (1 - w[..., None]) + w[..., None] * np.array([0.8, 0.65, 0.3]) * rng.uniform(0.8, 1.1)
        else:
            rho = blob_field(shape, (c[0], c[1]), rng.uniform(3, 9) * s / 256, rng, roughness=0.02)
            spec = spec + 0.8 * np.exp(-(((rho - 0.9) / 0.12) ** 2))
    # --- compose ----------------------------------------------------------------------------------------
    spec = spec * np.clip(warp / lumen_r - 0.5, 0, 1)
    light = (0.25 + 0.75 * ndotl) * falloff
    img = albedo * light[..., None] + (rng.uniform(0.5, 1.0) * spec)[..., None]
    img = img * np.array([1.0, 0.97, 0.95]) * rng.uniform(0.9, 1.15)
    img = img * vignette(shape, rng.uniform(0.2, 0.5))[..., None]
    img = blur(img, rng.uniform(0.3, 1.2))
    img = np.clip(img, 0, 1) ** rng.uniform(0.85, 1.15)
    if rng.random() < 0.7:  # black scope border: a rounded octagon
        cut = rng.uniform(0.1, 0.2) * s
        inset = rng.uniform(0.0, 0.04) * s
        ay, ax = np.abs(yy - (s - 1) / 2), np.abs(xx - (s - 1) / 2)
        inside = (ay < s / 2 - inset) & (ax < s / 2 - inset) & (ay + ax < s - inset - cut)
        img = img * inside[..., None]
        mask &= inside
    img = img + rng.normal(0, 0.008, img.shape)
    return Case(np.clip(img, 0, 1).astype(np.float32), mask, meta)
