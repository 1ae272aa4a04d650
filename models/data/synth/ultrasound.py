"""B-mode ultrasound: thyroid (stand-in for TNUI, and TN3K with another scanner) and breast (stand-in for BUSI).

Scenes are built in beam space (rows = depth, columns = scan lines) as a linear echogenicity map plus
an extra-attenuation map. Image formation then applies depth attenuation with imperfect time-gain
compensation, acoustic shadowing (cumulative attenuation below calcifications, ribs, trachea and
spiculated masses) and posterior enhancement (fluid attenuates less), multiplies by fully developed
Rayleigh speckle whose cell is elongated laterally, log-compresses to the display dynamic range and,
for a convex probe, scan-converts to a fan. Scanner profiles change gain, dynamic range, speckle size,
depth of field and persistence smoothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .common import Case, CaseContext
from .shapes import blob_field, curve_points, grid, log_uniform, render_curves
from .textures import bilinear, blur, rayleigh_speckle, smooth_noise, splat_dots


@dataclass(frozen=True)
class Scanner:
    """Ranges (low, high) drawn per image: a scanner/preset 'look'."""

    speckle_axial: tuple[float, float] = (0.9, 1.3)
    speckle_lateral: tuple[float, float] = (1.8, 2.8)
    looks: int = 2  # spatial compounding: independent speckle patterns averaged
    zoom: tuple[float, float] = (0.9, 1.1)  # > 1: shallower field of view, larger anatomy
    gain: tuple[float, float] = (-0.08, 0.08)
    dynamic_range: tuple[float, float] = (32.0, 42.0)  # dB shown
    tgc_error: float = 1.0  # residual depth attenuation after time-gain compensation (nepers per image depth)
    persistence: tuple[float, float] = (0.0, 0.4)  # post-processing blur sigma (pixels)
    gamma: tuple[float, float] = (0.9, 1.15)
    sector_probability: float = 0.2


THYROID_TNUI = Scanner()
THYROID_TN3K = Scanner(
    speckle_axial=(1.4, 1.9),
    speckle_lateral=(3.0, 4.2),
    looks=1,
    zoom=(0.68, 0.82),
    gain=(0.08, 0.2),
    dynamic_range=(28.0, 34.0),
    tgc_error=0.3,
    persistence=(0.6, 1.1),
    gamma=(0.7, 0.85),
    sector_probability=0.0,
)
BREAST_BUSI = Scanner(
    speckle_axial=(1.0, 1.4),
    speckle_lateral=(2.0, 3.2),
    dynamic_range=(34.0, 45.0),
    tgc_error=1.3,
    sector_probability=0.0,
)


def _u(rng: np.random.Generator, pair: tuple[float, float]) -> float:
    return float(rng.uniform(*pair))


def _form_image(
    rng: np.random.Generator, echo: np.ndarray, atten: np.ndarray, scanner: Scanner
) -> tuple[np.ndarray, float]:
    """Echogenicity + extra attenuation (beam space) -> displayed B-mode image in [0, 1]."""
    h, w = echo.shape
    # shadows/enhancement: cumulative extra attenuation down each scan line, slightly blurred by beam width
    path = np.cumsum(blur(atten, (0.5, 1.5)), axis=0) / np.float32(h)
    depth = (np.arange(h, dtype=np.float32) / h)[:, None]
    tgc = np.exp(-np.float32(scanner.tgc_error * rng.uniform(0.3, 1.0)) * depth)
    tgc = tgc * np.exp(np.float32(0.15) * smooth_noise(rng, (h, 1), h / 3))  # uneven TGC sliders
    inten = echo * np.exp(-path) * tgc
    ax, lat = _u(rng, scanner.speckle_axial), _u(rng, scanner.speckle_lateral)
    speckle = sum(rayleigh_speckle(rng, (h, w), axial=ax, lateral=lat) for _ in range(scanner.looks)) / scanner.looks
    env = blur(inten, 0.8) * speckle + np.float32(0.003) * rayleigh_speckle(rng, (h, w), 0.7, 1.2)
    dr = _u(rng, scanner.dynamic_range)
    db = 20 * np.log10(np.maximum(env, 1e-6))
    top = np.float32(np.percentile(db, 99.5))
    img = (db - top) / np.float32(dr) + 1 + np.float32(_u(rng, scanner.gain))
    img = np.clip(img, 0, 1)
    sig = _u(rng, scanner.persistence)
    if sig > 0.05:
        img = blur(img, sig)
    return np.clip(img, 0, 1) ** np.float32(_u(rng, scanner.gamma)), dr


def _scan_convert(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Beam space -> convex-probe fan (apex above the image), zero outside the sector."""
    s = img.shape[0]
    half = np.deg2rad(rng.uniform(28, 38))
    r0 = s * rng.uniform(0.2, 0.5)  # apex distance above the skin line (output pixels)
    r1 = r0 + s * 0.97
    shrink = min(1.0, s * 0.98 / (2 * r1 * np.sin(half)))
    r0, r1 = r0 * shrink, r1 * shrink
    apex_y = 2.0 - r0
    yy, xx = grid((s, s))
    dy = yy - np.float32(apex_y)
    dx = xx - np.float32((s - 1) / 2)
    r = np.sqrt(dy * dy + dx * dx)
    th = np.arctan2(dx, dy)
    rows = (r - r0) / (r1 - r0) * (s - 1)
    cols = (th / half + 1) / 2 * (s - 1)
    out = bilinear(np.stack([img, mask.astype(np.float32)]), rows, cols, cval=0.0)
    return out[0], out[1] > 0.5


def _finish(
    rng: np.random.Generator, scanner: Scanner, echo: np.ndarray, atten: np.ndarray, mask: np.ndarray, meta: dict
) -> Case:
    img, dr = _form_image(rng, echo, atten, scanner)
    geometry = "linear"
    if rng.random() < scanner.sector_probability:
        img, mask = _scan_convert(rng, img, mask)
        geometry = "convex"
    meta.update({"probe": geometry, "dynamic_range_db": round(dr, 1)})
    return Case(img.astype(np.float32), mask, meta)


def _soft(rho: np.ndarray, edge: float = 0.08) -> np.ndarray:
    return np.clip((1 - rho) / edge + 0.5, 0, 1)


# --------------------------------------------------------------------------------------------------
# Thyroid (transverse view)
# --------------------------------------------------------------------------------------------------
def render_thyroid(ctx: CaseContext, scanner: Scanner = THYROID_TNUI) -> Case:
    rng, s = ctx.rng, ctx.size
    shape = (s, s)
    yy, xx = grid(shape)
    k = _u(rng, scanner.zoom) * s  # anatomy scale: pixels per 'image depth' at zoom 1
    side = 1.0 if rng.random() < 0.5 else -1.0  # trachea on the left or the right

    def fx(v: float) -> float:  # lateral position from the medial side
        return (0.5 + side * (v - 0.5)) * s

    echo = np.full(shape, 0.35, dtype=np.float32)
    atten = np.zeros(shape, dtype=np.float32)
    # skin and subcutaneous fat
    skin = 0.025 * k + 0.01 * k * smooth_noise(rng, (1, s), s / 2)
    echo += 0.9 * np.exp(-(((yy - skin) / (0.008 * k + 1)) ** 2))
    # strap muscles: hypoechoic band with fine horizontal striations
    m_top = 0.07 * k + 0.015 * k * smooth_noise(rng, (1, s), s / 2)
    m_bot = m_top + rng.uniform(0.08, 0.14) * k * (1 + 0.2 * smooth_noise(rng, (1, s), s / 2))
    muscle = (yy > m_top) & (yy < m_bot)
    stri = 0.5 + 0.5 * np.sin(yy * 1.3 + 2 * smooth_noise(rng, shape, s / 4))
    echo = np.where(muscle, 0.22 + 0.12 * stri, echo)
    # thyroid lobe: bright homogeneous region, rounded triangle
    lobe_c = (m_bot.mean() + rng.uniform(0.14, 0.22) * k, fx(rng.uniform(0.5, 0.62)))
    lobe_r = rng.uniform(0.17, 0.24) * k
    lobe = blob_field(
        shape, lobe_c, lobe_r, rng, aspect=rng.uniform(1.2, 1.8), angle=rng.uniform(-0.3, 0.3), roughness=0.1
    )
    isthmus = blob_field(
        shape,
        (lobe_c[0] - 0.08 * k, fx(0.15)),
        0.07 * k,
        rng,
        aspect=rng.uniform(3, 5),
        angle=0.1 * side,
        roughness=0.05,
    )
    thy = np.minimum(lobe, isthmus)
    rho = None
    if ctx.has_target:  # nodule geometry first: it sits in, and enlarges, the lobe
        area = log_uniform(rng, 0.01, 0.25) * s * s
        radius = float(np.sqrt(area / np.pi))
        cy = lobe_c[0] + rng.normal(0, 0.3) * lobe_r
        cx = lobe_c[1] + rng.normal(0, 0.4) * lobe_r
        cy = float(np.clip(cy, m_bot.mean() + radius * 0.7, s - radius * 0.8))
        cx = float(np.clip(cx, radius * 0.7, s - radius * 0.7))
        margin = str(rng.choice(["smooth", "lobulated", "irregular"], p=[0.5, 0.3, 0.2]))
        rough = {"smooth": 0.06, "lobulated": 0.22, "irregular": 0.35}[margin]
        taller = rng.random() < 0.2
        aspect = rng.uniform(1.0, 1.4 if taller else 1.7)
        rho = blob_field(
            shape,
            (cy, cx),
            radius,
            rng,
            aspect=aspect,
            angle=(np.pi / 2 if taller else 0) + rng.normal(0, 0.3),
            harmonics=8 if margin == "irregular" else 5,
            roughness=rough,
        )
        thy = np.minimum(thy, rho / 1.15)
    thy_echo = rng.uniform(0.75, 1.0)
    echo = echo * (1 - _soft(thy)) + _soft(thy) * thy_echo * np.exp(0.12 * smooth_noise(rng, shape, 5))
    # trachea (medial): bright arc, reverberation and shadow below
    tc = (lobe_c[0] - 0.02 * k, fx(rng.uniform(-0.02, 0.08)))
    tr = rng.uniform(0.12, 0.17) * k
    tdist = np.sqrt((yy - tc[0]) ** 2 + (xx - tc[1]) ** 2)
    arc = np.exp(-(((tdist - tr) / (0.012 * k + 0.8)) ** 2)) * (yy < tc[0])
    echo += 1.2 * arc
    atten += np.float32(30.0) * arc
    for j in range(1, 4):  # reverberation lines
        echo += (
            0.35
            / j
            * np.exp(-(((tdist - tr * (1 + 0.25 * j)) / 1.2) ** 2))
            * (yy < tc[0] + tr)
            * (np.abs(xx - tc[1]) < tr * 0.6)
        )
    # carotid artery (lateral, anechoic, bright wall, posterior enhancement) and jugular vein
    cc = (lobe_c[0] + rng.uniform(0.0, 0.1) * k, lobe_c[1] + side * (lobe_r * rng.uniform(1.1, 1.5)))
    cr = rng.uniform(0.07, 0.1) * k
    car = blob_field(shape, cc, cr, rng, aspect=rng.uniform(1.0, 1.15), roughness=0.02)
    wall = np.exp(-(((car - 1) * cr / 1.3) ** 2))
    echo = echo * (1 - _soft(car, 0.05)) + _soft(car, 0.05) * 0.02 + 0.7 * wall
    atten -= np.float32(2.5) * _soft(car, 0.05)
    if rng.random() < 0.7:
        jc = (skin.mean() + (m_bot.mean() - skin.mean()) * 0.9, cc[1] + side * cr * rng.uniform(0.6, 1.4))
        jug = blob_field(shape, jc, cr * rng.uniform(0.6, 1.0), rng, aspect=rng.uniform(1.5, 3.0), roughness=0.15)
        echo = echo * (1 - _soft(jug)) + _soft(jug) * 0.03
    # oesophagus (medial, behind the lobe): bull's-eye, a classic mimic
    if rng.random() < 0.35:
        oc = (lobe_c[0] + lobe_r * rng.uniform(0.7, 1.1), fx(rng.uniform(0.12, 0.22)))
        oes = blob_field(shape, oc, 0.06 * k, rng, aspect=1.6, roughness=0.08)
        ring = np.exp(-(((oes - 0.75) / 0.15) ** 2))
        echo = echo * (1 - _soft(oes)) + _soft(oes) * (0.25 + 0.5 * ring)
    # deep: longus colli (hypoechoic) and vertebral body (bright curve + shadow)
    vb_y = lobe_c[0] + lobe_r * rng.uniform(1.6, 2.2)
    vb = vb_y + 0.1 * k * ((xx - fx(0.2)) / k) ** 2
    bone = np.exp(-(((yy - vb) / 1.5) ** 2)) * (np.abs(xx - fx(0.2)) < 0.35 * k)
    echo += 1.0 * bone
    atten += np.float32(40.0) * bone
    # sternocleidomastoid: lens-shaped hypoechoic muscle, lateral and superficial
    scm_c = (m_top.mean() + rng.uniform(0.02, 0.06) * k, fx(rng.uniform(0.8, 1.0)))
    scm = blob_field(
        shape, scm_c, 0.11 * k, rng, aspect=rng.uniform(2.5, 4.0), angle=side * rng.uniform(0.1, 0.4), roughness=0.05
    )
    echo = echo * (1 - _soft(scm)) + _soft(scm) * (0.2 + 0.1 * stri)
    # deep soft tissue is darker; fascial planes are thin bright curves
    deep = np.clip((yy - (lobe_c[0] + lobe_r)) / (0.1 * k), 0, 1)
    echo *= 1 - 0.35 * deep
    curves = [
        curve_points(
            rng,
            (rng.uniform(0.1, 0.9) * s, rng.uniform(-0.1, 0.3) * s),
            rng.normal(0, 0.15),
            rng.uniform(0.3, 0.8) * s,
            curl=0.03,
        )
        for _ in range(int(rng.integers(2, 6)))
    ]
    echo += 0.45 * render_curves(shape, curves, [1.2] * len(curves)) * (1 - _soft(thy)) * (1 - _soft(car, 0.05))
    # slow tissue heterogeneity everywhere
    echo *= np.exp(0.2 * smooth_noise(rng, shape, s / 8))

    mask = np.zeros(shape, dtype=bool)
    meta: dict = {"view": "transverse"}
    if rho is not None:
        mask = rho < 1
        comp = str(rng.choice(["solid", "mixed", "cystic"], p=[0.65, 0.25, 0.1]))
        echog = str(
            rng.choice(["hypoechoic", "isoechoic", "hyperechoic", "very hypoechoic"], p=[0.5, 0.15, 0.13, 0.22])
        )
        rel = {
            "hypoechoic": (0.2, 0.42),
            "isoechoic": (0.6, 0.8),
            "hyperechoic": (1.4, 1.8),
            "very hypoechoic": (0.06, 0.15),
        }
        val = thy_echo * rng.uniform(*rel[echog]) * np.exp(0.2 * smooth_noise(rng, shape, rng.uniform(3, 8)))
        if comp != "solid":  # fluid spaces: most of a cystic nodule, some of a mixed one
            level = -0.9 if comp == "cystic" else 0.3
            cyst = blur((smooth_noise(rng, shape, max(radius * 0.8, 10)) > level).astype(np.float32), 1.0)
            val = val * (1 - cyst) + 0.03 * cyst
            atten -= np.float32(3.0) * cyst * mask
        soft = _soft(rho, 0.06)
        echo = echo * (1 - soft) + soft * val
        halo = echog in ("isoechoic", "hyperechoic") or (margin == "smooth" and rng.random() < 0.4)
        if halo:  # thin hypoechoic halo around the nodule
            hal = np.exp(-(((rho - 1.0 - 2.5 / radius) / (2.0 / radius)) ** 2))
            echo *= 1 - 0.85 * hal
        calc = str(rng.choice(["none", "micro", "macro"], p=[0.6, 0.25, 0.15])) if comp != "cystic" else "none"
        if calc != "none":
            inside = np.argwhere(rho < 0.85)
            n = int(rng.integers(3, 15)) if calc == "micro" else int(rng.integers(1, 3))
            pick = inside[rng.integers(0, len(inside), n)] if len(inside) else np.zeros((0, 2))
            sig = 0.9 if calc == "micro" else rng.uniform(2.0, 3.5) * s / 256
            dots = splat_dots(shape, pick[:, 0], pick[:, 1], sig)
            echo += 2.0 * dots
            atten += np.float32(25.0 if calc == "macro" else 6.0) * dots
        meta.update(
            {
                "composition": comp,
                "echogenicity": echog,
                "margin": margin,
                "halo": bool(halo),
                "calcification": calc,
                "taller_than_wide": bool(taller),
            }
        )
    return _finish(rng, scanner, np.clip(echo, 0.0, None), atten, mask, meta)


def render_thyroid_tn3k(ctx: CaseContext) -> Case:
    return render_thyroid(ctx, THYROID_TN3K)


# --------------------------------------------------------------------------------------------------
# Breast
# --------------------------------------------------------------------------------------------------
def render_breast(ctx: CaseContext, scanner: Scanner = BREAST_BUSI) -> Case:
    rng, s = ctx.rng, ctx.size
    shape = (s, s)
    yy, xx = grid(shape)

    # layer boundaries (undulating)
    def line(mean: float, amp: float, scale: float) -> np.ndarray:
        return (mean * s + amp * s * smooth_noise(rng, (1, s), scale * s)).astype(np.float32)

    skin = line(rng.uniform(0.02, 0.04), 0.004, 0.5)
    fat_bot = line(rng.uniform(0.15, 0.3), 0.03, 0.3)
    gland_bot = fat_bot + line(rng.uniform(0.25, 0.4), 0.04, 0.3)
    retro_bot = gland_bot + line(rng.uniform(0.04, 0.08), 0.01, 0.4)
    musc_bot = np.maximum(retro_bot + 0.06 * s, line(rng.uniform(0.78, 0.9), 0.01, 0.8))
    echo = np.full(shape, 0.35, dtype=np.float32)
    atten = np.zeros(shape, dtype=np.float32)
    # subcutaneous and retromammary fat: hypoechoic lobules separated by bright Cooper's ligaments
    fat = ((yy > skin) & (yy < fat_bot)) | ((yy > gland_bot) & (yy < retro_bot))
    gland = (yy >= fat_bot) & (yy <= gland_bot)
    fat_tex = rng.uniform(0.3, 0.42) + 0.06 * smooth_noise(rng, shape, s / 12)
    gland_tex = rng.uniform(0.75, 1.0) * np.exp(
        0.3 * smooth_noise(rng, shape, s / 20) + 0.2 * smooth_noise(rng, shape, 4)
    )
    echo = np.where(fat, fat_tex, echo)
    echo = np.where(gland, gland_tex, echo)
    echo = blur(echo, 1.5)
    curves, widths = [], []
    for _ in range(int(rng.integers(4, 10))):
        y0 = rng.uniform(0.05, 0.3) * s
        curves.append(
            curve_points(
                rng,
                (y0, rng.uniform(0, s)),
                rng.uniform(-0.6, 0.6) + (np.pi if rng.random() < 0.5 else 0),
                rng.uniform(0.2, 0.6) * s,
                curl=0.06,
            )
        )
        widths.append(rng.uniform(1.0, 2.0))
    ligaments = render_curves(shape, curves, widths) * (yy < gland_bot)
    echo += 0.7 * ligaments
    # fat lobules inside the gland (the main mimic of a mass)
    lobules = []
    for _ in range(int(rng.integers(1, 6))):
        cy = rng.uniform(fat_bot.mean(), gland_bot.mean())
        r = rng.uniform(0.03, 0.08) * s
        lob = blob_field(
            shape,
            (cy, rng.uniform(0, s)),
            r,
            rng,
            aspect=rng.uniform(1.8, 3.5),
            angle=rng.normal(0, 0.2),
            roughness=0.08,
        )
        lobules.append(lob)
        rim = np.exp(-(((lob - 1.05) / 0.08) ** 2))
        echo = echo * (1 - _soft(lob)) + _soft(lob) * rng.uniform(0.28, 0.42) + 0.35 * rim
    # pectoralis muscle: hypoechoic with oblique bright striations
    musc = (yy > retro_bot) & (yy < musc_bot)
    ang = rng.uniform(-0.25, 0.25)
    stri = np.sin((yy * np.cos(ang) + xx * np.sin(ang)) * rng.uniform(0.5, 0.9) + 1.5 * smooth_noise(rng, shape, s / 6))
    echo = np.where(musc, 0.25 + 0.2 * np.clip(stri, 0, 1) ** 3, echo)
    # deep: ribs (bright arc with shadow) and pleura
    below = yy >= musc_bot
    echo = np.where(below, 0.2, echo)
    pleura = np.exp(-(((yy - musc_bot - 0.04 * s) / 1.5) ** 2))
    echo += 0.8 * pleura
    for _ in range(int(rng.integers(0, 3))):
        rc = (float(musc_bot.mean()) + rng.uniform(0.0, 0.06) * s, rng.uniform(0.1, 0.9) * s)
        rib = blob_field(shape, rc, rng.uniform(0.06, 0.1) * s, rng, aspect=2.5, roughness=0.02)
        top_arc = np.exp(-(((rib - 1) / 0.1) ** 2)) * (yy < rc[0])
        echo = echo * (1 - _soft(rib)) + _soft(rib) * 0.15 + 1.0 * top_arc
        atten += np.float32(30.0) * top_arc
    skin_line = np.exp(-(((yy - skin) / 1.2) ** 2)) + 0.7 * np.exp(-(((yy - skin - 0.015 * s) / 1.2) ** 2))
    echo = np.where(yy < skin - 2, 0.05, echo) + 0.9 * skin_line

    mask = np.zeros(shape, dtype=bool)
    meta: dict = {}
    if ctx.has_target:
        kind = str(rng.choice(["malignant", "benign", "cyst"], p=[0.42, 0.43, 0.15]))
        area = log_uniform(rng, 0.01, 0.35) * s * s
        radius = float(np.sqrt(area / np.pi))
        cy = float(np.clip(rng.uniform(fat_bot.mean(), gland_bot.mean()), skin.mean() + radius * 0.8, s - radius * 0.7))
        cx = rng.uniform(radius * 0.6, s - radius * 0.6)
        if kind == "malignant":
            taller = rng.random() < 0.4
            rho = blob_field(
                shape,
                (cy, cx),
                radius,
                rng,
                aspect=rng.uniform(1.0, 1.5),
                angle=(np.pi / 2 if taller else 0) + rng.normal(0, 0.4),
                harmonics=10,
                roughness=rng.uniform(0.25, 0.45),
                decay=1.0,
                spikes=int(rng.integers(0, 10)),
                spike_length=rng.uniform(0.1, 0.35),
            )
            val = rng.uniform(0.04, 0.12) * np.exp(0.35 * smooth_noise(rng, shape, 4))
            shadow = rng.uniform(1.5, 5.0) if rng.random() < 0.65 else 0.0
            margin = "spiculated" if rng.random() < 0.5 else "irregular"
        elif kind == "benign":
            taller = False
            rho = blob_field(
                shape,
                (cy, cx),
                radius,
                rng,
                aspect=rng.uniform(1.4, 2.2),
                angle=rng.normal(0, 0.15),
                harmonics=4,
                roughness=rng.uniform(0.03, 0.15),
            )
            val = rng.uniform(0.07, 0.18) * np.exp(0.18 * smooth_noise(rng, shape, 5))
            shadow = -rng.uniform(0.8, 2.5)
            margin = "circumscribed"
        else:
            taller = False
            rho = blob_field(
                shape,
                (cy, cx),
                radius,
                rng,
                aspect=rng.uniform(1.1, 1.8),
                angle=rng.normal(0, 0.2),
                harmonics=3,
                roughness=0.04,
            )
            val = np.full(shape, 0.02, dtype=np.float32)
            shadow = -rng.uniform(2.0, 4.0)
            margin = "circumscribed"
        mask = rho < 1
        soft = _soft(rho, 0.08 if kind != "malignant" else 0.15)
        echo = echo * (1 - soft) + soft * val
        if kind == "malignant" and rng.random() < 0.5:  # echogenic halo
            echo += 0.5 * np.exp(-(((rho - 1.12) / 0.1) ** 2))
        atten += np.float32(shadow) * soft
        meta.update(
            {
                "lesion": kind,
                "margin": margin,
                "taller_than_wide": bool(taller),
                "posterior": "shadowing" if shadow > 0 else ("enhancement" if shadow < 0 else "none"),
            }
        )
    _ = lobules
    return _finish(rng, scanner, np.clip(echo, 0.0, None), atten, mask, meta)
