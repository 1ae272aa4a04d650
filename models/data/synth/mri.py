"""Brain MRI with synthetic tumours (stand-in for BTD) on real anatomy: nilearn's packaged MNI152 T1 template.

Slices come from the 1 mm MNI152 (2009) T1 template with its brain mask and grey/white-matter
probability maps, all packaged inside nilearn (nothing is downloaded). Training and test cases come in
all three planes, from slabs of each plane that are kept apart (``MNI_TRAIN`` and ``MNI_HELD_OUT``). Each slice gets a
random in-plane similarity transform (zoom, shift, small rotation, flip) and is resampled to
``size x size`` with its aspect kept; a synthetic scalp/skull ring is drawn around the brain; a lumpy
tumour (necrotic T1-hypointense core with an enhancing rim, a homogeneous enhancing extra-axial mass,
or a non-enhancing hypointense mass) displaces the surrounding tissue and is surrounded by mild
oedema; then bias field, gamma and Rician noise randomise the contrast. The slice is returned in
scanner-like units (``raw``); the recipe's percentiles (models/recipe.py) make the image.
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import numpy as np
from scipy import ndimage
from scipy.special import erfcinv

from .common import Case, CaseContext
from .shapes import blob_field, grid, log_uniform
from .textures import bias_field, bilinear, smooth_noise

PLANES = ("axial", "coronal", "sagittal")
# Voxel index ranges of the 197 x 233 x 189 template per plane (brain: x 26-170, y 27-207, z 0-154). Training
# draws every plane from its slabs; the held-out slabs (tests, and the foreign evaluation generator) sit apart
# from them with a gap of at least 3 voxels, so no test slice neighbours a training one.
MNI_TRAIN = {
    "axial": ((20, 31), (59, 115), (143, 150)),
    "coronal": ((40, 92), (118, 190)),
    "sagittal": ((35, 57), (72, 124), (139, 160)),
}
MNI_HELD_OUT = {"axial": ((34, 56), (118, 140)), "coronal": ((95, 115),), "sagittal": ((60, 69), (127, 136))}


@lru_cache(maxsize=1)
def load_anatomy() -> np.ndarray:
    """T1, brain mask and white-minus-grey matter stacked as a float32 (3, X, Y, Z) array (cached)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nilearn.datasets import (
            load_mni152_brain_mask,
            load_mni152_gm_template,
            load_mni152_template,
            load_mni152_wm_template,
        )

        vols = [
            load_mni152_template(resolution=1),
            load_mni152_brain_mask(resolution=1),
            load_mni152_gm_template(resolution=1),
            load_mni152_wm_template(resolution=1),
        ]
        # Copies: nilearn caches the loaded images, and their arrays may be read-only (shared cache).
        t1, brain, gm, wm = (np.array(v.get_fdata(dtype=np.float32), dtype=np.float32) for v in vols)
    t1 /= max(float(t1.max()), 1e-6)
    out = np.stack([t1, brain, wm - gm])
    out.setflags(write=False)
    return out


def _pick(rng: np.random.Generator, ranges: tuple[tuple[int, int], ...]) -> int:
    sizes = np.array([b - a for a, b in ranges], dtype=np.float64)
    j = int(rng.choice(len(ranges), p=sizes / sizes.sum()))
    return int(rng.integers(*ranges[j]))


def _slice(anat: np.ndarray, plane: str, index: int) -> np.ndarray:
    """(channels, rows, cols) slice with superior/anterior towards row 0."""
    if plane == "axial":
        sl = anat[:, :, :, index]  # (C, X, Y)
    elif plane == "coronal":
        sl = anat[:, :, index, :]  # (C, X, Z)
    else:
        sl = anat[:, index, :, :]  # (C, Y, Z)
    return np.ascontiguousarray(np.rot90(sl, 1, axes=(1, 2)))


def _tumour_centre(rng: np.random.Generator, brain: np.ndarray, radius: float, peripheral: bool) -> tuple[float, float]:
    dist = ndimage.distance_transform_edt(np.pad(brain[::4, ::4], 1)) * 4  # coarse is precise enough here
    dist = np.kron(dist[1:-1, 1:-1], np.ones((4, 4)))[: brain.shape[0], : brain.shape[1]] * brain
    # meningiomas sit at the brain's surface, the others deeper inside
    ok = (dist > 2) & (dist < max(radius * 0.7, 4)) if peripheral else dist > min(radius * 0.8, dist.max() * 0.6)
    if not ok.any():
        ok = dist >= dist.max() * 0.5
    rows, cols = np.nonzero(ok)
    j = int(rng.integers(len(rows)))
    return float(rows[j]), float(cols[j])


def render(ctx: CaseContext) -> Case:
    rng, s = ctx.rng, ctx.size
    shape = (s, s)
    anat = load_anatomy()
    plane = PLANES[ctx.index % 3]
    index = _pick(rng, (MNI_TRAIN if ctx.split == "train" else MNI_HELD_OUT)[plane])
    sl = _slice(anat, plane, index)
    rows, cols = sl.shape[1:]

    # --- output-pixel -> slice-voxel similarity transform ------------------------------------------
    mm_per_px = max(rows, cols) / s / rng.uniform(0.92, 1.18)
    theta = np.deg2rad(rng.uniform(-12, 12))
    flip = -1.0 if rng.random() < 0.5 else 1.0
    shift = rng.uniform(-0.06, 0.06, 2) * s
    yy, xx = grid(shape)
    oy = yy - (s - 1) / 2 - shift[0]
    ox = (xx - (s - 1) / 2 - shift[1]) * flip
    ct, st = np.float32(np.cos(theta)), np.float32(np.sin(theta))

    def coords(dy: np.ndarray, dx: np.ndarray) -> list[np.ndarray]:
        r = (ct * dy - st * dx) * np.float32(mm_per_px) + np.float32((rows - 1) / 2)
        c = (st * dy + ct * dx) * np.float32(mm_per_px) + np.float32((cols - 1) / 2)
        return [r, c]

    r_, c_ = coords(oy, ox)
    r_ = np.rint(r_).astype(np.intp)
    c_ = np.rint(c_).astype(np.intp)
    ok = (r_ >= 0) & (r_ < rows) & (c_ >= 0) & (c_ < cols)
    brain0 = np.where(ok, sl[1][np.clip(r_, 0, rows - 1), np.clip(c_, 0, cols - 1)], 0) > 0.5

    # --- tumour geometry and mass effect -------------------------------------------------------------
    kind = "none"
    rho = None
    if ctx.has_target and brain0.sum() > 400:
        kind = str(rng.choice(["glioma", "meningioma", "nonenhancing"], p=[0.45, 0.3, 0.25]))
        area = log_uniform(rng, 0.02, 0.35) * brain0.sum()
        radius = float(np.sqrt(area / np.pi))
        centre = _tumour_centre(rng, brain0, radius, peripheral=kind == "meningioma")
        aspect = rng.uniform(1.0, 1.6)
        angle = rng.uniform(0, np.pi)
        rough = 0.12 if kind == "meningioma" else rng.uniform(0.15, 0.35)
        coef = (rng, 5 if kind == "meningioma" else 8, rough)
        rho = blob_field(
            shape, centre, radius, coef[0], aspect=aspect, angle=angle, harmonics=coef[1], roughness=coef[2], extent=3
        )
        # push tissue away from the centre: output pixel p samples the anatomy at c + (p - c) * (1 - push)
        push = rng.uniform(0.25, 0.5) * np.exp(-((rho / 1.4) ** 2))
        oy = oy + (centre[0] - yy) * push * np.float32(1)
        ox = ox + (centre[1] - xx) * push * np.float32(flip)
    t1, brain_soft, wm_gm = bilinear(sl, *coords(oy, ox))
    brain = brain_soft > 0.5
    wm = np.clip(wm_gm, 0, 1)

    # --- contrast: re-weight tissue classes a little, then scalp/skull ring -------------------------
    img = t1 * np.float32(rng.uniform(0.85, 1.0)) + np.float32(rng.uniform(-0.06, 0.06)) * wm_gm
    # distance outside the brain (mm) from a blurred mask: smooth offset curves, as a skull is smoother than a cortex
    sig = 6.0
    level = np.clip(ndimage.gaussian_filter(brain_soft, sig), 1e-6, 0.5)
    dist = np.float32(sig * np.sqrt(2) * mm_per_px) * erfcinv(2 * level).astype(np.float32)
    t = dist + np.float32(1.2) * smooth_noise(rng, shape, s / 6)
    layers = np.array([2.0, 4.0, 7.0, 9.0, 15.0]) * rng.uniform(0.8, 1.3)  # csf, inner table, diploe, outer, scalp
    ring = np.select(
        [t < layers[0], t < layers[1], t < layers[2], t < layers[3], t < layers[4]],
        [0.04, 0.03, rng.uniform(0.35, 0.6), 0.04, rng.uniform(0.55, 0.9)],
        0.0,
    ).astype(np.float32)
    ring *= 1 + 0.25 * smooth_noise(rng, shape, 3)
    img = np.where(brain, img, ring)
    img = ndimage.gaussian_filter(img, 0.6)

    # --- tumour appearance -----------------------------------------------------------------------------
    mask = np.zeros(shape, dtype=bool)
    if rho is not None:
        region = brain if kind != "meningioma" else ndimage.binary_dilation(brain, iterations=3)
        mask = (rho < 1) & region
        if mask.sum() < 20:
            mask[:] = False
            kind = "none"
    if mask.any():
        wm_level = float(np.percentile(img[brain & (wm > 0.8)], 50)) if (brain & (wm > 0.8)).any() else 0.8
        tex = smooth_noise(rng, shape, max(s / 40, 2))
        soft = np.clip((1.08 - rho) / 0.16, 0, 1) * region
        oedema = np.clip((rng.uniform(1.3, 2.0) - rho) / 0.5, 0, 1) * (1 - soft) * (0.4 + 0.6 * wm) * brain
        img = img * (1 - np.float32(rng.uniform(0.05, 0.2)) * oedema)
        if kind == "glioma":
            rim = rng.uniform(0.12, 0.3)
            core = wm_level * rng.uniform(0.3, 0.6) * (1 + 0.15 * tex)
            enh = wm_level * rng.uniform(1.15, 1.45) * (1 + 0.1 * tex)
            w_rim = np.clip((rho - (1 - rim)) / 0.08, 0, 1)
            val = core * (1 - w_rim) + enh * w_rim
        elif kind == "meningioma":
            val = wm_level * rng.uniform(1.1, 1.4) * (1 + 0.06 * tex)
        else:
            val = wm_level * rng.uniform(0.3, 0.5) * (1 + 0.12 * tex)
        img = img * (1 - soft) + soft * val
    # --- acquisition randomisation ---------------------------------------------------------------------
    img = np.clip(img, 0, None) * bias_field(rng, shape, rng.uniform(0.05, 0.25), scale=s / 1.5)
    img = img / np.float32(max(float(np.percentile(img, 99.7)), 1e-3))
    img = np.clip(img, 0, 1.2) ** np.float32(rng.uniform(0.75, 1.4))
    sigma = np.float32(rng.uniform(0.01, 0.05))
    n1, n2 = sigma * rng.standard_normal((2, *shape), dtype=np.float32)
    img = np.sqrt((img + n1) ** 2 + n2**2)  # Rician magnitude noise
    raw = np.clip(img / np.float32(rng.uniform(1.0, 1.15)), 0, None) * np.float32(1000)  # scanner-like units
    meta = {"plane": plane, "slice_index": index, "tumour": kind}
    return Case(np.zeros(shape, np.float32), mask, meta, raw=raw.astype(np.float32), units="MR")
