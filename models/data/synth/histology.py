"""H&E colorectal histology (stand-in for EBHI); target = glands (lumen + epithelium), several allowed.

Stain concentrations are painted per structure and turned into RGB by Beer-Lambert mixing of a
haematoxylin and an eosin optical-density vector (both jittered per image, as stain batches and
scanners differ). Stroma is eosinophilic with fibres, loose areas and scattered elongated nuclei;
a gland is a lumpy ring: pale lumen (sometimes mucus), an epithelium of pink-purple cytoplasm with
goblet vacuoles and a crowded row of basal nuclei. Distractors with no epithelium: lymphoid
aggregates (dense round nuclei), vessels with red cells, fat vacuoles and tissue tears, and white
slide background at a tissue edge.
"""

from __future__ import annotations

import numpy as np

from .common import Case, CaseContext
from .shapes import blob_field, curve_points, grid, log_uniform, render_curves
from .textures import blur, smooth_noise, splat_dots

_H = np.array([0.65, 0.70, 0.29], dtype=np.float32)
_E = np.array([0.12, 0.80, 0.32], dtype=np.float32)
_RBC = np.array([0.05, 1.0, 0.75], dtype=np.float32)


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v)).astype(np.float32)


def render(ctx: CaseContext) -> Case:
    rng, s = ctx.rng, ctx.size
    shape = (s, s)
    yy, xx = grid(shape)
    px = s / 256  # pixels per reference pixel

    # --- stroma ------------------------------------------------------------------------------------
    e = rng.uniform(0.45, 0.75) + 0.1 * smooth_noise(rng, shape, 12 * px)
    loose = np.clip(smooth_noise(rng, shape, 40 * px) - 0.6, 0, None)
    e = e * (1 - 0.6 * np.clip(loose, 0, 1))
    fibre_dir = rng.uniform(0, np.pi)
    curves = [
        curve_points(
            rng,
            (rng.uniform(-0.2, 1.2) * s, rng.uniform(-0.2, 1.2) * s),
            fibre_dir + rng.normal(0, 0.3),
            rng.uniform(40, 160) * px,
            curl=0.03,
        )
        for _ in range(int(rng.integers(40, 90)))
    ]
    fibres = render_curves(shape, curves, list(rng.uniform(1.5, 3.0, len(curves)) * px))
    e = e + 0.2 * fibres
    h = 0.05 + 0.03 * smooth_noise(rng, shape, 20 * px)
    # scattered stromal nuclei (elongated along the fibres)
    n = int(rng.integers(80, 220) * px * px)
    ry, rx = rng.uniform(0, s, n), rng.uniform(0, s, n)
    dy, dx = 1.6 * np.sin(fibre_dir) * px, 1.6 * np.cos(fibre_dir) * px  # elongated: three dots in a row
    stromal = splat_dots(
        shape, np.concatenate([ry - dy, ry, ry + dy]), np.concatenate([rx - dx, rx, rx + dx]), 1.1 * px
    )
    h = h + 1.2 * stromal

    # --- glands ----------------------------------------------------------------------------------------
    mask = np.zeros(shape, dtype=bool)
    glands: list[tuple[float, float, float]] = []
    if ctx.has_target:
        target_area = log_uniform(rng, 0.03, 0.5) * s * s
        count = int(rng.integers(1, 8))
        mean_r = np.sqrt(target_area / count / np.pi)
        for _ in range(count * 20):
            if len(glands) >= count:
                break
            r = float(np.clip(mean_r * rng.uniform(0.6, 1.4), 8 * px, 0.45 * s))
            cy, cx = rng.uniform(-0.05, 1.05, 2) * s
            if all(np.hypot(cy - gy, cx - gx) > (r + gr) * 1.15 + 4 * px for gy, gx, gr in glands):
                glands.append((float(cy), float(cx), r))
    lumen_w = np.zeros(shape, dtype=np.float32)
    epi_w = np.zeros(shape, dtype=np.float32)
    nuc_rows: list[np.ndarray] = []
    nuc_cols: list[np.ndarray] = []
    gob_rows: list[np.ndarray] = []
    gob_cols: list[np.ndarray] = []
    wobble = smooth_noise(rng, shape, 6 * px)  # shared by all lumens (each sees another part of it)
    for cy, cx, r in glands:
        aspect = rng.uniform(1.0, 2.2)
        angle = rng.uniform(0, np.pi)
        rho = blob_field(
            shape, (cy, cx), r, rng, aspect=aspect, angle=angle, roughness=rng.uniform(0.08, 0.3), harmonics=6
        )
        inner = rng.uniform(0.35, 0.7)
        mask |= rho < 1
        epi_w = np.maximum(epi_w, np.clip((1 - rho) / 0.04 + 0.5, 0, 1))
        lumen_rho = rho / inner + 0.12 * wobble * (rho < 1.2)
        lumen_w = np.maximum(lumen_w, np.clip((1 - lumen_rho) / 0.1 + 0.5, 0, 1))
        # basal nuclei: a crowded row just inside the border, and a few scattered ones
        band = np.argwhere((rho > 0.74 + 0.2 * inner) & (rho < 0.95))
        if len(band):
            k = int(min(len(band), 0.35 * len(band) / px**2 + 5))
            pick = band[rng.integers(0, len(band), k)]
            nuc_rows.append(pick[:, 0] + rng.normal(0, 0.6 * px, k))
            nuc_cols.append(pick[:, 1] + rng.normal(0, 0.6 * px, k))
        epi = np.argwhere((rho > inner * 1.1) & (rho < 0.8))
        if len(epi):
            k = int(len(epi) * rng.uniform(0.004, 0.02) / px**2)
            pick = epi[rng.integers(0, len(epi), k)]
            gob_rows.append(pick[:, 0])
            gob_cols.append(pick[:, 1])
    epi_only = np.clip(epi_w - lumen_w, 0, 1)
    fine = smooth_noise(rng, shape, 4 * px)
    e = e * (1 - epi_w) + epi_w * rng.uniform(0.3, 0.45) * (1 + 0.15 * fine)
    h = h * (1 - epi_w) + epi_w * rng.uniform(0.15, 0.3) * (1 - 0.15 * fine)
    if gob_rows:
        goblet = (
            splat_dots(shape, np.concatenate(gob_rows), np.concatenate(gob_cols), rng.uniform(1.5, 2.2) * px) * epi_only
        )
        e = e * (1 - 0.8 * goblet)
        h = h * (1 - 0.5 * goblet) + 0.08 * goblet
    if nuc_rows:
        nuclei = splat_dots(
            shape, np.concatenate(nuc_rows), np.concatenate(nuc_cols), rng.uniform(1.3, 1.8) * px, sharpness=2.0
        )
        h = h + rng.uniform(1.1, 1.6) * nuclei * (1 + 0.2 * fine)
    mucus = rng.uniform(0.0, 0.25)
    e = e * (1 - lumen_w) + lumen_w * (0.04 + 0.5 * mucus * np.clip(smooth_noise(rng, shape, 10 * px), 0, None))
    h = h * (1 - lumen_w) + lumen_w * (0.02 + mucus * 0.5)

    # --- distractors -------------------------------------------------------------------------------------
    rbc_w = np.zeros(shape, dtype=np.float32)
    outside = ~blur(mask.astype(np.float32), 3 * px).astype(bool)
    free = np.argwhere(outside & (blur(mask.astype(np.float32), 6 * px) < 0.01))
    if len(free):
        lr: list[np.ndarray] = []
        lc: list[np.ndarray] = []
        for _ in range(int(rng.integers(0, 3))):  # lymphoid aggregates
            c = free[int(rng.integers(len(free)))]
            rr = rng.uniform(10, 30) * px
            k = int(rr * rr * rng.uniform(0.25, 0.5) / px**2)
            a = rng.uniform(0, 2 * np.pi, k)
            d = rr * np.sqrt(rng.uniform(0, 1, k))
            lr.append(c[0] + d * np.sin(a))
            lc.append(c[1] + d * np.cos(a))
        if lr:
            lym = splat_dots(shape, np.concatenate(lr), np.concatenate(lc), 1.1 * px, sharpness=4.0)
            h = h + 1.6 * lym * outside
        speck = np.clip(smooth_noise(rng, shape, 3 * px) + 0.3, 0, 1)
        for _ in range(int(rng.integers(0, 4))):  # vessel with red cells / fat vacuole / empty space
            c = free[int(rng.integers(len(free)))]
            rr = rng.uniform(4, 18) * px
            rho = blob_field(
                shape,
                (float(c[0]), float(c[1])),
                rr,
                rng,
                aspect=rng.uniform(1, 2.5),
                angle=rng.uniform(0, np.pi),
                roughness=0.15,
            )
            w = np.clip((1 - rho) / 0.1 + 0.5, 0, 1) * outside
            e = e * (1 - w) + w * 0.03
            h = h * (1 - w)
            if rng.random() < 0.5:
                rbc_w = np.maximum(rbc_w, w * speck)
                wall = np.exp(-(((rho - 1.05) / 0.08) ** 2)) * outside
                h = h + 0.8 * wall
    # tissue tears
    if rng.random() < 0.3:
        tear = render_curves(
            shape,
            [curve_points(rng, (rng.uniform(0, s), 0), rng.normal(0, 0.5), 1.5 * s, curl=0.04)],
            [rng.uniform(2, 5) * px],
        )
        e = e * (1 - tear)
        h = h * (1 - tear)
        mask &= tear < 0.5
    # white slide background beyond a tissue edge
    if rng.random() < 0.2:
        edge = smooth_noise(rng, (1, s), s / 3)[0] * 0.06 * s + rng.uniform(0.05, 0.25) * s
        side = int(rng.integers(4))
        coord = [yy, s - 1 - yy, xx, s - 1 - xx][side]
        other = xx if side < 2 else yy
        glass = np.clip((edge[other.astype(int)] - coord) / 2, 0, 1)
        if (mask & (glass < 0.5)).sum() >= 0.5 * mask.sum():  # never cut away most of the glands
            e = e * (1 - glass)
            h = h * (1 - glass)
            mask &= glass < 0.5

    # --- Beer-Lambert colour ---------------------------------------------------------------------------
    hv = _unit(_H + rng.normal(0, 0.05, 3).astype(np.float32))
    ev = _unit(_E + rng.normal(0, 0.06, 3).astype(np.float32))
    h_str, e_str = rng.uniform(0.8, 1.3), rng.uniform(0.7, 1.3)
    od = (
        np.clip(h, 0, None)[..., None] * hv * h_str
        + np.clip(e, 0, None)[..., None] * ev * e_str
        + (1.5 * rbc_w)[..., None] * _unit(_RBC)
    )
    od = blur(od, 0.5 * px)
    bg = rng.uniform(0.92, 1.0, 3).astype(np.float32)
    img = bg * np.exp(-od)
    img = img * (1 + 0.03 * smooth_noise(rng, shape, 30 * px))[..., None]
    img = img + rng.normal(0, 0.012, img.shape).astype(np.float32)
    meta = {"glands": len(glands)}
    return Case(np.clip(img, 0, 1).astype(np.float32), mask, meta)
