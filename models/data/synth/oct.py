"""Retinal OCT B-scans (stand-in for AMD-SD): layered retina, speckle, log display; target = fluid/lesion pockets.

The retina is a stack of reflectivity bands between smooth boundary curves (ILM down to RPE, then
choroid), thinning of the inner layers at the fovea, and retinal-vessel shadows. Lesions deform the
stack: subretinal fluid lifts the neurosensory retina off the RPE, a pigment-epithelial detachment
lifts the RPE itself, intraretinal cysts bulge the inner layers, and hyper-reflective subretinal
material fills a pocket with bright speckle. The image is formed in linear reflectivity, multiplied by
exponential speckle, attenuated with depth and shown on a log (dB) scale, as OCT scanners do.
"""

from __future__ import annotations

import numpy as np

from .common import Case, CaseContext
from .shapes import blob_field, grid
from .textures import blur, rayleigh_speckle, smooth_noise

# Linear reflectivity of the layers, top to bottom (vitreous first); thickness as a fraction of the retina.
_LAYERS: tuple[tuple[str, float, float], ...] = (
    ("vitreous", 0.004, 0.0),
    ("nfl", 0.55, 0.10),
    ("gcl", 0.16, 0.12),
    ("ipl", 0.30, 0.10),
    ("inl", 0.07, 0.10),
    ("opl", 0.32, 0.07),
    ("onl", 0.045, 0.25),
    ("elm", 0.22, 0.02),
    ("myoid", 0.06, 0.03),
    ("ez", 0.75, 0.03),
    ("os", 0.14, 0.05),
    ("rpe", 1.0, 0.07),
    ("choroid", 0.22, 0.0),
    ("sclera", 0.05, 0.0),
)
_INNER = slice(1, 6)  # nfl..opl thin out at the fovea
_RPE = 11


def _dome(x: np.ndarray, center: float, half_width: float, height: float, power: float) -> np.ndarray:
    t = np.clip(1 - ((x - center) / half_width) ** 2, 0, None)
    return (height * t**power).astype(np.float32)


def render(ctx: CaseContext) -> Case:
    rng, s = ctx.rng, ctx.size
    shape = (s, s)
    yy, xx = grid(shape)
    x = np.arange(s, dtype=np.float32)

    # --- geometry of the layer stack -------------------------------------------------------------
    thick = s * rng.uniform(0.22, 0.34)
    fovea_x = rng.uniform(0.2, 0.8) * s
    fovea_w = s * rng.uniform(0.06, 0.12)
    g = np.exp(-(((x - fovea_x) / fovea_w) ** 2))
    floor = (
        s * rng.uniform(0.45, 0.72)
        + rng.uniform(-0.4, 1.0) * s * ((x - s / 2) / s) ** 2
        + rng.uniform(-0.12, 0.12) * (x - s / 2)
        + 0.01 * s * smooth_noise(rng, (1, s), s * 0.5)[0]
    )  # Bruch's membrane (bottom of the RPE)
    fractions = np.array([t for _, _, t in _LAYERS], dtype=np.float32)
    fractions = fractions * rng.uniform(0.85, 1.15, len(fractions)).astype(np.float32)
    fractions[1:12] /= fractions[1:12].sum()
    thickness = np.tile(fractions[:, None], (1, s)) * np.float32(thick)
    thickness[_INNER] *= 1 - 0.9 * g[None]
    thickness[6] *= 1 + 0.3 * g
    side = np.clip((x - fovea_x) / s, -1, 1) * rng.choice([-1.0, 1.0])
    thickness[1] *= 1 + rng.uniform(0.0, 1.5) * np.clip(side, 0, None)  # thicker NFL on the nasal side
    bounds = np.zeros((len(_LAYERS), s), dtype=np.float32)  # bounds[k] = top of layer k (k >= 1)
    bounds[12] = floor
    for k in range(11, 0, -1):
        bounds[k] = bounds[k + 1] - thickness[k]
    choroid = thick * rng.uniform(0.5, 0.9) * (1 + 0.1 * smooth_noise(rng, (1, s), s * 0.4)[0])
    bounds[13] = bounds[12] + choroid

    # --- lesions: deform the stack and collect the target ----------------------------------------
    lesions: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []  # kind, x-range mask, y0(x), y1(x)
    cysts: list[np.ndarray] = []
    kinds: list[str] = []
    if ctx.has_target:
        n_main = 1 if rng.random() < 0.75 else 2
        for _ in range(n_main):
            kind = str(rng.choice(["srf", "ped", "irf", "shrm"], p=[0.35, 0.3, 0.22, 0.13]))
            kinds.append(kind)
            cx = float(np.clip(fovea_x + rng.normal(0, 0.12 * s), 0.12 * s, 0.88 * s))
            if kind in ("srf", "ped", "shrm"):
                hw = s * rng.uniform(0.07, 0.3)
                h = float(min(thick * rng.uniform(0.15, 0.9), hw * 0.9))
                power = rng.uniform(0.4, 0.8) if kind != "ped" else rng.uniform(0.3, 0.55)
                lift = _dome(x, cx, hw, h, power)
                lift *= 1 + 0.08 * smooth_noise(rng, (1, s), hw * 0.5)[0]
                lift = np.clip(lift, 0, None)
                upto = _RPE if kind != "ped" else _RPE + 1
                bounds[1:upto] -= lift[None]
                base = bounds[upto].copy()  # the pocket lies between base - lift and base
                lesions.append((kind, lift > 0.5, base - lift, base))
            else:
                for _ in range(int(rng.integers(1, 5))):
                    ry = float(thick * rng.uniform(0.08, 0.3))
                    rx = float(ry * rng.uniform(1.0, 2.2))
                    ccx = cx + rng.normal(0, 0.06 * s)
                    bump = _dome(x, ccx, rx * 2.0, ry * 0.9, 1.0)
                    layer = int(rng.choice([4, 6, 6]))
                    bounds[1:layer] -= bump[None]
                    ccy = float(np.interp(ccx, x, (bounds[layer] + bounds[layer + 1]) / 2))
                    rho = blob_field(shape, (ccy, ccx), np.sqrt(rx * ry), rng, aspect=rx / ry, roughness=0.08)
                    cysts.append(rho)

    # --- reflectivity -----------------------------------------------------------------------------
    values = np.array([v for _, v, _ in _LAYERS], dtype=np.float32) * rng.uniform(0.8, 1.25, len(_LAYERS)).astype(
        np.float32
    )
    layer = np.zeros(shape, dtype=np.int64)
    for k in range(1, len(_LAYERS)):
        layer += yy >= bounds[k][None]
    refl = blur(values[layer], 0.6)
    # within-layer texture and slow variations
    refl *= np.exp(0.25 * smooth_noise(rng, shape, s * 0.05)).astype(np.float32)
    # choroidal vessels: dark lumens in the choroid
    for _ in range(int(rng.integers(4, 12))):
        vx = rng.uniform(0, s)
        vy = float(np.interp(vx, x, bounds[12])) + rng.uniform(0.2, 0.8) * float(
            np.interp(vx, x, bounds[13] - bounds[12])
        )
        r = rng.uniform(0.015, 0.04) * s
        rho = blob_field(shape, (vy, vx), r, rng, aspect=rng.uniform(1.2, 2.5), roughness=0.1)
        refl *= 1 - 0.8 * np.clip((1.2 - rho) / 0.4, 0, 1)
    # retinal vessels: bright dot in the inner retina and a shadow column below
    for _ in range(int(rng.integers(1, 5))):
        vx = rng.uniform(0.03, 0.97) * s
        if abs(vx - fovea_x) < fovea_w:
            continue
        vy = float(np.interp(vx, x, bounds[2])) + rng.uniform(0, 4)
        w = rng.uniform(1.5, 3.5) * s / 256
        refl += 0.6 * np.exp(-(((xx - vx) / w) ** 2 + ((yy - vy) / w) ** 2))
        shadow = 1 - rng.uniform(0.4, 0.75) * np.exp(-(((xx - vx) / (0.8 * w)) ** 2)) * (yy > vy + w)
        refl *= shadow

    mask = np.zeros(shape, dtype=bool)
    for kind, xr, y0, y1 in lesions:
        region = xr[None] & (yy >= y0[None]) & (yy < y1[None])
        soft = np.clip(blur(region.astype(np.float32), 0.7), 0, 1)
        if kind == "srf":
            val = values[0] * rng.uniform(1.0, 3.0) * (1 + 0.5 * np.abs(smooth_noise(rng, shape, 6)))
        elif kind == "ped":
            val = rng.choice([values[0] * rng.uniform(1, 3), rng.uniform(0.05, 0.15)]) * np.exp(
                0.5 * smooth_noise(rng, shape, 5)
            )
        else:  # shrm: hyper-reflective
            val = rng.uniform(0.3, 0.7) * np.exp(0.6 * smooth_noise(rng, shape, 4))
        refl = refl * (1 - soft) + soft * np.asarray(val, dtype=np.float32)
        mask |= region
    for rho in cysts:
        region = rho < 1
        soft = np.clip((1.15 - rho) / 0.3, 0, 1)
        refl = refl * (1 - soft) + soft * values[0] * rng.uniform(1, 2.5)
        mask |= region

    # --- image formation: attenuation, speckle, noise floor, log display -------------------------
    depth = np.clip(yy - bounds[1][None], 0, None) / np.float32(s)
    below_rpe = np.clip(yy - bounds[12][None], 0, None) / np.float32(s)
    atten = np.exp(-rng.uniform(0.5, 1.5) * depth - rng.uniform(4, 9) * below_rpe)
    inten = refl * atten.astype(np.float32)
    # B-scan averaging: speckle amplitude (not intensity), i.e. a few looks
    speckle = rayleigh_speckle(rng, shape, axial=rng.uniform(0.5, 0.9), lateral=rng.uniform(0.9, 1.8))
    speckle **= np.float32(rng.uniform(1.0, 1.6))
    inten = inten * speckle + np.float32(rng.uniform(0.001, 0.003)) * rayleigh_speckle(rng, shape, 0.6, 1.0)
    inten *= np.exp(0.2 * smooth_noise(rng, (1, s), s * 0.3))  # A-scan brightness drift
    db = 10 * np.log10(np.maximum(inten, 1e-6))
    lo = rng.uniform(-24, -20)
    hi = rng.uniform(-1.5, 1.0)
    img = np.clip((db - lo) / (hi - lo), 0, 1)
    img = blur(img, (0.5, 0.8)) ** np.float32(rng.uniform(0.8, 1.3))
    meta = {"lesions": kinds, "fovea_x": round(float(fovea_x / s), 3)}
    return Case(img.astype(np.float32), mask, meta)
