"""Dermoscopy (stand-in for ISIC 2018, and PH2 with another dermatoscope); target = the pigmented lesion.

Skin is a tone with redness patches, a fine skin-line relief and pores. The lesion is an irregular
Fourier blob whose pigment fades over a soft, uneven border; inside, colour zones (light and dark
brown, black, blue-grey, regression white, red) are painted from thresholded noise, with a pigment
network (a warped reticular pattern) and dark globules near the rim. Distractors: hairs crossing
everything, freckles, gel bubbles and marker ink. Acquisition: uneven illumination, vignetting,
dark corners, white balance. The PH2 style adds a round field of view and another colour calibration.
"""

from __future__ import annotations

import numpy as np

from .common import Case, CaseContext
from .shapes import blob_field, curve_points, grid, log_uniform, render_curves
from .textures import blur, fractal_noise, smooth_noise, splat_dots, vignette

_ZONES = {
    "light_brown": (0.56, 0.37, 0.26),
    "dark_brown": (0.36, 0.22, 0.15),
    "black": (0.14, 0.1, 0.09),
    "blue_grey": (0.42, 0.46, 0.55),
    "white": (0.85, 0.8, 0.78),
    "red": (0.75, 0.35, 0.35),
}


def _paint(img: np.ndarray, weight: np.ndarray, colour: tuple[float, float, float] | np.ndarray) -> np.ndarray:
    w = np.clip(weight, 0, 1)[..., None]
    return img * (1 - w) + w * np.asarray(colour, dtype=np.float32)


def render(ctx: CaseContext, style: str = "isic") -> Case:
    rng, s = ctx.rng, ctx.size
    shape = (s, s)
    yy, xx = grid(shape)
    px = s / 256

    # --- skin ----------------------------------------------------------------------------------------
    tone = np.array([0.86, 0.66, 0.56]) * rng.uniform(0.85, 1.05) + rng.normal(0, 0.03, 3)
    img = np.broadcast_to(tone.astype(np.float32), (*shape, 3)).copy()
    red = np.clip(smooth_noise(rng, shape, 50 * px) * 0.5 + rng.uniform(-0.3, 0.3), 0, 1) * rng.uniform(0.1, 0.35)
    img = _paint(img, red, (0.85, 0.45, 0.45))
    ang = rng.uniform(0, np.pi)
    lines = np.sin((xx * np.cos(ang) + yy * np.sin(ang)) / (2.5 * px) + 3 * smooth_noise(rng, shape, 30 * px))
    relief = 0.03 * lines + 0.025 * smooth_noise(rng, shape, 3 * px)
    img = img * (1 + relief)[..., None]

    # --- lesion --------------------------------------------------------------------------------------
    mask = np.zeros(shape, dtype=bool)
    meta: dict = {"style": style}
    if ctx.has_target:
        area = log_uniform(rng, 0.02, 0.5) * s * s
        radius = float(np.sqrt(area / np.pi))
        spread = 0.15 if style == "ph2" else 0.3
        cy, cx = (0.5 + rng.uniform(-spread, spread, 2)) * s
        irregular = rng.random() < 0.5
        rho = blob_field(
            shape,
            (cy, cx),
            radius,
            rng,
            aspect=rng.uniform(1.0, 1.6),
            angle=rng.uniform(0, np.pi),
            harmonics=12 if irregular else 6,
            roughness=rng.uniform(0.2, 0.4) if irregular else rng.uniform(0.05, 0.15),
            decay=1.0 if irregular else 1.4,
        )
        rho = rho * (1 + 0.04 * smooth_noise(rng, shape, max(5 * px, radius / 6)))  # ragged edge
        edge = rng.uniform(0.05, 0.25)
        pig = np.clip((1 - rho) / edge + 0.5, 0, 1)
        mask = rho < 1
        base = np.array(_ZONES["light_brown"]) * rng.uniform(0.75, 1.1)
        img = _paint(img, pig * rng.uniform(0.75, 0.95), base)
        zones = ["dark_brown"]
        zones += [z for z in ("black", "blue_grey", "white", "red") if rng.random() < 0.3]
        core = np.clip((0.85 - rho) / 0.3, 0, 1)
        for z in zones:
            sc = radius * rng.uniform(0.3, 0.7)
            field = fractal_noise(rng, shape, (sc, sc / 3, max(sc / 8, 2 * px)), 0.55) - rng.uniform(-0.2, 0.8)
            w = np.clip(field / 0.4, 0, 1) * core * rng.uniform(0.6, 0.95)
            img = _paint(img, w, np.array(_ZONES[z]) * rng.uniform(0.85, 1.1))
        if rng.random() < 0.6:  # pigment network
            wx = xx + 4 * px * smooth_noise(rng, shape, 12 * px)
            wy = yy + 4 * px * smooth_noise(rng, shape, 12 * px)
            period = rng.uniform(5, 9) * px
            net = np.clip(1.5 - np.abs(np.sin(wx * np.pi / period)) - np.abs(np.sin(wy * np.pi / period)), 0, 1)
            img = _paint(img, net * pig * rng.uniform(0.3, 0.6), _ZONES["dark_brown"])
        if rng.random() < 0.5:  # globules near the rim
            band = np.argwhere((rho > 0.6) & (rho < 0.95))
            if len(band):
                k = int(rng.integers(5, 40))
                pick = band[rng.integers(0, len(band), k)]
                glob = splat_dots(shape, pick[:, 0], pick[:, 1], rng.uniform(1.0, 2.2) * px)
                img = _paint(img, glob * 0.85, _ZONES["dark_brown"])
        meta.update({"border": "irregular" if irregular else "regular", "colours": ["light_brown", *zones]})

    # --- distractors ---------------------------------------------------------------------------------------
    n_freckles = int(rng.integers(0, 25))
    if n_freckles:
        fr = splat_dots(shape, rng.uniform(0, s, n_freckles), rng.uniform(0, s, n_freckles), rng.uniform(1.0, 2.0) * px)
        img = _paint(img, fr * rng.uniform(0.2, 0.4) * ~mask, _ZONES["light_brown"])
    n_hair = int(rng.choice([0, rng.integers(1, 6), rng.integers(6, 30)], p=[0.4, 0.35, 0.25]))
    curves, widths = [], []
    for _ in range(n_hair):
        start = (rng.uniform(-0.2, 1.2) * s, rng.uniform(-0.2, 1.2) * s)
        curves.append(
            curve_points(
                rng, start, rng.uniform(0, 2 * np.pi), rng.uniform(60, 300) * px, curl=0.02, drift=rng.normal(0, 0.004)
            )
        )
        widths.append(rng.uniform(1.0, 2.6) * px)
    if curves:
        hair = render_curves(shape, curves, widths)
        img = _paint(img, hair * rng.uniform(0.7, 0.95), np.array([0.2, 0.13, 0.1]) * rng.uniform(0.5, 1.5))
    if rng.random() < 0.15:  # gel bubbles: bright rims
        for _ in range(int(rng.integers(1, 6))):
            c = rng.uniform(0, s, 2)
            rho_b = blob_field(shape, (c[0], c[1]), rng.uniform(4, 20) * px, rng, roughness=0.02)
            rim = np.exp(-(((rho_b - 0.95) / 0.06) ** 2))
            img = _paint(img, rim * 0.7, (0.97, 0.97, 0.97))
    if rng.random() < 0.08:  # marker ink
        c = rng.uniform(0, s, 2)
        ink = np.clip(1 - blob_field(shape, (c[0], c[1]), rng.uniform(5, 12) * px, rng, roughness=0.2), 0, 1)
        img = _paint(img, ink * 2, (0.45, 0.3, 0.6))

    # --- acquisition ---------------------------------------------------------------------------------------
    light = 1 + 0.08 * smooth_noise(rng, shape, s / 2)
    if style == "ph2":
        wb = np.array([1.0, 0.98, 0.86]) * rng.uniform(0.97, 1.03, 3)  # warm, yellowish calibration
        gain = rng.uniform(1.05, 1.2)
        vig = vignette(shape, rng.uniform(0.05, 0.15))
    else:
        wb = np.array([1.0, 1.0, 1.0]) * rng.uniform(0.9, 1.08, 3)
        gain = rng.uniform(0.85, 1.05)
        vig = vignette(shape, rng.uniform(0.15, 0.6), center=tuple(s / 2 + rng.normal(0, 0.05 * s, 2)))
    img = img * (light * vig * gain)[..., None] * wb
    img = blur(img, rng.uniform(0.4, 0.9) * px)
    if style == "ph2":  # round field of view
        fov_r = s * rng.uniform(0.47, 0.53)
        fov = np.sqrt((yy - s / 2) ** 2 + (xx - s / 2) ** 2) < fov_r
        img = img * fov[..., None]
        mask &= fov
    elif rng.random() < 0.3:  # dark corners of a round dermatoscope lens
        corner = np.sqrt((yy - s / 2) ** 2 + (xx - s / 2) ** 2) / (s * rng.uniform(0.6, 0.72))
        img = img * np.clip(1.6 - corner * 1.5, 0.02, 1)[..., None] ** 2
    img = img + rng.normal(0, 0.01, img.shape)
    return Case(np.clip(img, 0, 1).astype(np.float32), mask, meta)


def render_ph2(ctx: CaseContext) -> Case:
    return render(ctx, style="ph2")
