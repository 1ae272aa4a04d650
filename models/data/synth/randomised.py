"""Domain randomisation: targets of every size, shape, polarity and edge on backgrounds the model must not memorise.

A model trained on one lesion look per task learns the look, not the task (the shipped model scored 0.17 Dice on
tumours drawn by another generator). So a target here is drawn from wide, independent distributions:

- **size**: log-uniform from 0.05 % to 40 % of the image;
- **shape family**: ellipse, lobulated, spiculated, random-walk blob, thin elongated, ring with a necrotic core,
  multifocal (2 or 3 parts), organ-like smooth region;
- **polarity**: brighter or darker than the tissue around it, or iso-intense with a rim;
- **appearance**: internal texture, a partial-volume edge of random width, and the modality's acquisition
  (noise model, blur, bias field, gamma, MR ghosting, ultrasound speckle), applied to the whole image;
- **placement**: the centre is drawn inside plausible tissue and the target is clipped to it.

Everything is painted in the background's own units (Hounsfield units for CT, scanner units for MR, display
values elsewhere), relative to the tissue's robust spread, so the recipe (models/recipe.py) is what maps the
result to the network's input, as it maps a real scan.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from .shapes import blob_field, grid, log_uniform
from .textures import bias_field, blur, rayleigh_speckle, smooth_noise

__all__ = ["FAMILIES", "POLARITIES", "acquisition", "negative", "paint", "target_core"]

FAMILIES = ("ellipse", "lobulated", "spiculated", "random_walk", "thin", "ring", "multifocal", "organ")
POLARITIES = ("bright", "dark", "iso_rim")
AREA_RANGE = (0.0005, 0.40)


def _centre(rng: np.random.Generator, tissue: np.ndarray, radius: float) -> tuple[float, float]:
    """A point of the tissue, preferring ones at least half a radius inside it."""
    inner = ndimage.binary_erosion(tissue, iterations=max(1, int(radius * 0.5))) if radius >= 2 else tissue
    pool = inner if inner.any() else tissue
    rows, cols = np.nonzero(pool)
    j = int(rng.integers(len(rows)))
    return float(rows[j]), float(cols[j])


def _random_walk(rng: np.random.Generator, shape: tuple[int, int], centre: tuple[float, float], radius: float):
    yy, xx = grid(shape)
    out = np.zeros(shape, bool)
    point = np.array(centre, np.float64)
    disc = max(radius * rng.uniform(0.3, 0.5), 1.0)
    for _ in range(int(rng.integers(6, 18))):
        out |= (yy - point[0]) ** 2 + (xx - point[1]) ** 2 < disc**2
        point += rng.normal(0, disc * 0.9, 2)
    return out


def _thin(rng: np.random.Generator, shape: tuple[int, int], centre: tuple[float, float], radius: float):
    """A curved tube: a random smooth path of length ~4 radii, a few pixels thick."""
    yy, xx = grid(shape)
    angle, length = rng.uniform(0, 2 * np.pi), radius * rng.uniform(3, 6)
    thickness = max(radius * rng.uniform(0.12, 0.3), 0.8)
    out = np.zeros(shape, bool)
    point = np.array(centre, np.float64) - 0.5 * length * np.array([np.sin(angle), np.cos(angle)])
    steps = max(int(length / max(thickness, 1.0)), 4)
    for _ in range(steps):
        out |= (yy - point[0]) ** 2 + (xx - point[1]) ** 2 < thickness**2
        angle += rng.normal(0, 0.25)
        point += (length / steps) * np.array([np.sin(angle), np.cos(angle)])
    return out


def _one_part(rng: np.random.Generator, family: str, shape: tuple[int, int], centre, radius: float) -> np.ndarray:
    aspect, angle = rng.uniform(1.0, 2.5), rng.uniform(0, np.pi)
    if family == "ellipse":
        rho = blob_field(shape, centre, radius, rng, aspect=aspect, angle=angle, roughness=0.0)
    elif family == "lobulated":
        rho = blob_field(shape, centre, radius, rng, aspect=aspect, angle=angle, roughness=0.45, harmonics=6, decay=0.7)
    elif family == "spiculated":
        spikes, length = int(rng.integers(6, 15)), rng.uniform(0.35, 0.9)
        rho = blob_field(shape, centre, radius * 0.8, rng, aspect=aspect, angle=angle, roughness=0.1, spikes=spikes,
                         spike_length=length)  # fmt: skip
    elif family == "organ":
        rho = blob_field(shape, centre, radius, rng, aspect=rng.uniform(1.0, 1.8), angle=angle, roughness=0.15,
                         harmonics=3, decay=1.6)  # fmt: skip
    elif family == "random_walk":
        return _random_walk(rng, shape, centre, radius)
    elif family == "thin":
        return _thin(rng, shape, centre, radius)
    else:
        raise ValueError(f"unknown part family {family!r}")
    return rho < 1


def target_core(rng: np.random.Generator, tissue: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """A random target inside ``tissue``: its binary core, a ring-core flag image (necrotic part) and metadata."""
    shape = tissue.shape
    family = str(rng.choice(FAMILIES))
    area = log_uniform(rng, *AREA_RANGE)
    if family == "organ":
        area = max(area, rng.uniform(0.08, 0.35))
    total_radius = np.sqrt(area * shape[0] * shape[1] / np.pi)
    parts = int(rng.integers(2, 4)) if family == "multifocal" else 1
    part_family = str(rng.choice(("ellipse", "lobulated", "random_walk"))) if family == "multifocal" else family
    part_family = "lobulated" if part_family == "ring" else part_family
    core = np.zeros(shape, bool)
    necrotic = np.zeros(shape, bool)
    for _ in range(parts):
        radius = total_radius / np.sqrt(parts)
        centre = _centre(rng, tissue, radius)
        part = _one_part(rng, part_family, shape, centre, radius)
        if family == "ring":
            inner = ndimage.binary_erosion(part, iterations=max(1, int(radius * rng.uniform(0.2, 0.45))))
            necrotic |= inner
        core |= part
    core &= ndimage.binary_dilation(tissue, iterations=2)
    meta = {"family": family, "parts": parts, "area_drawn": round(float(area), 5)}
    return core, necrotic & core, meta


def _spread(image: np.ndarray, tissue: np.ndarray) -> tuple[float, float]:
    values = image[tissue] if tissue.any() else image.ravel()
    lo, med, hi = np.percentile(values, [10, 50, 90])
    full = float(np.percentile(image, 99.5) - np.percentile(image, 0.5))
    return float(med), max(float(hi - lo) / 2.56, 0.08 * full, 1e-3)


def paint(
    rng: np.random.Generator, image: np.ndarray, tissue: np.ndarray, core: np.ndarray, necrotic: np.ndarray
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The target painted into ``image`` (H x W, or H x W x 3) with a partial-volume edge; returns the image, the
    mask (where the target fills at least half the pixel) and what was drawn."""
    polarity = str(rng.choice(POLARITIES))
    grey = image if image.ndim == 2 else image.mean(axis=2)
    _, spread = _spread(grey, tissue)
    contrast = spread * rng.uniform(0.8, 3.0) * (1 if polarity != "dark" else -1)
    if polarity == "iso_rim":
        contrast *= rng.choice((-1, 1))
    edge = rng.uniform(0.3, 2.5)
    alpha = np.clip(blur(core.astype(np.float32), edge), 0, 1) if edge > 0.4 else core.astype(np.float32)
    mask = alpha >= 0.5
    if not mask.any():
        mask, alpha = core.copy(), core.astype(np.float32)
    shape = core.shape
    texture = smooth_noise(rng, shape, rng.uniform(1.5, 8)) * np.float32(abs(contrast) * rng.uniform(0.05, 0.5))
    if polarity == "iso_rim":
        width = max(1, int(rng.integers(1, 4)))
        rim = (mask & ~ndimage.binary_erosion(mask, iterations=width)).astype(np.float32)
        change = blur(rim, 0.7) * np.float32(contrast) + texture * 0.3
    else:
        change = np.float32(contrast) + texture
    if necrotic.any():
        change = np.where(necrotic, -np.float32(contrast) * np.float32(rng.uniform(0.3, 1.0)) + texture, change)
    change = change.astype(np.float32) * alpha
    if image.ndim == 3:
        direction = rng.normal(0, 0.4, 3) + 1.0
        out = image + change[..., None] * direction.astype(np.float32)
    else:
        out = image + change
    return out.astype(np.float32), mask, {"polarity": polarity, "edge_sigma": round(float(edge), 2)}


def acquisition(rng: np.random.Generator, image: np.ndarray, modality: str) -> np.ndarray:
    """What the scanner does to the whole image, in its own units: ``ct`` (HU), ``mri`` (positive scanner units),
    ``ultrasound``/grey pictures and ``rgb`` (display values in [0, 1])."""
    shape = image.shape[:2]
    out = np.asarray(image, np.float32)
    if rng.random() < 0.5:
        out = blur(out, rng.uniform(0.3, 1.2))
    if modality == "ct":
        return out + rng.standard_normal(shape).astype(np.float32) * np.float32(rng.uniform(5, 40))
    if modality == "mri":
        scale = float(np.percentile(out, 99)) or 1.0
        out = np.clip(out, 0, None) * bias_field(rng, shape, rng.uniform(0.0, 0.3), scale=shape[0] / 1.5)
        out = scale * (out / scale) ** np.float32(rng.uniform(0.7, 1.5))
        if rng.random() < 0.3:  # motion ghost: a faint copy shifted along the phase-encoding direction
            axis = int(rng.integers(2))
            out = out + np.float32(rng.uniform(0.05, 0.2)) * np.roll(
                out, int(shape[axis] * rng.uniform(0.1, 0.3)), axis
            )
        sigma = np.float32(scale * rng.uniform(0.005, 0.05))
        n1, n2 = sigma * rng.standard_normal((2, *shape), dtype=np.float32)
        return np.sqrt((out + n1) ** 2 + n2**2)  # Rician magnitude
    if modality == "ultrasound":
        out = out * rayleigh_speckle(rng, shape, rng.uniform(0.6, 1.5), rng.uniform(1.0, 3.0)) ** np.float32(
            rng.uniform(0.1, 0.5)
        )
    gain = bias_field(rng, shape, rng.uniform(0.0, 0.2), scale=shape[0] / 1.5)
    out = out * (gain if out.ndim == 2 else gain[..., None])
    out = np.clip(out, 0, 1) ** np.float32(rng.uniform(0.7, 1.4))
    out = out * np.float32(rng.uniform(0.8, 1.15)) + np.float32(rng.uniform(-0.08, 0.08))
    return out + rng.standard_normal(out.shape).astype(np.float32) * np.float32(rng.uniform(0.0, 0.04))


def negative(rng: np.random.Generator, background: np.ndarray, low: float, high: float) -> tuple[np.ndarray, str]:
    """A case with nothing to find: mostly healthy background, sometimes a blank or pure-noise image."""
    draw = rng.random()
    if draw < 0.7:
        return background, "healthy"
    if draw < 0.85:
        value = rng.uniform(low, high)
        return np.full(background.shape, value, np.float32) + rng.normal(0, 1e-3 * (high - low)), "blank"
    noise = smooth_noise(rng, background.shape[:2], rng.uniform(1, 20))
    noise = noise if background.ndim == 2 else np.repeat(noise[..., None], background.shape[2], axis=2)
    return (low + (high - low) * np.clip(0.5 + 0.2 * noise, 0, 1)).astype(np.float32), "noise"
