"""Noise fields and image-formation helpers shared by the modality renderers (numpy/scipy only)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import ndimage

from .shapes import grid

__all__ = [
    "bias_field",
    "blur",
    "fractal_noise",
    "normalise",
    "rayleigh_speckle",
    "smooth_noise",
    "splat_dots",
    "to_uint8",
    "vignette",
]


_TAPS = 6


@lru_cache(maxsize=64)
def _interp_taps(n: int, step: float) -> tuple[int, np.ndarray, np.ndarray]:
    """Gaussian interpolation from a coarse lattice (spacing ``step`` pixels) to ``n`` pixels, as 6 taps.

    Returns the lattice length, the first tap of every pixel and the (n, 6) weights, normalised to unit
    energy so that the interpolated field keeps the lattice's variance.
    """
    m = int(np.ceil(n / step)) + 6
    t = np.arange(n) / step + 3.0
    first = np.floor(t).astype(np.intp) - _TAPS // 2 + 1
    taps = first[:, None] + np.arange(_TAPS)[None, :]
    w = np.exp(-0.5 * ((t[:, None] - taps) / 0.75) ** 2)
    w /= np.sqrt((w * w).sum(axis=1, keepdims=True))
    w = w.astype(np.float32)
    for a in (first, w):
        a.setflags(write=False)
    return m, first, w


def _interp_rows(coarse: np.ndarray, first: np.ndarray, w: np.ndarray) -> np.ndarray:
    out = w[:, 0:1] * coarse[first]
    for k in range(1, _TAPS):
        out += w[:, k : k + 1] * coarse[first + k]
    return out


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field whose features are about ``scale`` pixels wide (float32).

    White noise on a coarse lattice (one sample per ``scale / 2`` pixels) is interpolated with separable
    Gaussian weights (6 taps per axis, gathered rather than multiplied as matrices: BLAS threads would
    only contend on the small products), so large scales cost no more than small ones.
    """
    height, width = shape
    step = max(scale / 2.0, 1.0)
    my, fy, wy = _interp_taps(int(height), step)
    mx, fx, wx = _interp_taps(int(width), step)
    coarse = rng.standard_normal((my, mx), dtype=np.float32)
    field = _interp_rows(coarse, fy, wy)  # (height, mx)
    field = _interp_rows(np.ascontiguousarray(field.T), fx, wx).T  # (width, height) -> (height, width)
    field = field - field.mean()
    std = field.std()
    return np.ascontiguousarray(field / np.float32(std if std > 0 else 1.0))


def fractal_noise(
    rng: np.random.Generator, shape: tuple[int, int], scales: tuple[float, ...] = (64, 32, 16, 8), falloff: float = 0.6
) -> np.ndarray:
    """Sum of ``smooth_noise`` octaves with weights ``falloff**i``, renormalised to unit std."""
    out = np.zeros(shape, dtype=np.float32)
    for i, s in enumerate(scales):
        out += np.float32(falloff**i) * smooth_noise(rng, shape, s)
    return out / np.float32(max(out.std(), 1e-6))


def rayleigh_speckle(
    rng: np.random.Generator, shape: tuple[int, int], axial: float = 1.0, lateral: float = 2.0
) -> np.ndarray:
    """Fully developed speckle: |complex Gaussian filtered by the PSF|, normalised to mean 1 (float32).

    ``axial`` and ``lateral`` are the PSF sigmas in pixels along rows and columns (ultrasound speckle is
    elongated laterally). The amplitude is Rayleigh distributed.
    """
    re = rng.standard_normal(shape).astype(np.float32)
    im = rng.standard_normal(shape).astype(np.float32)
    sig = (axial, lateral)
    re = ndimage.gaussian_filter(re, sig)
    im = ndimage.gaussian_filter(im, sig)
    amp = np.sqrt(re * re + im * im)
    return amp / np.float32(max(amp.mean(), 1e-6))


def bias_field(rng: np.random.Generator, shape: tuple[int, int], strength: float, scale: float = 96) -> np.ndarray:
    """Smooth multiplicative field ``exp(strength * noise)`` (float32), e.g. an MRI coil bias."""
    return np.exp(np.float32(strength) * smooth_noise(rng, shape, scale)).astype(np.float32)


def vignette(
    shape: tuple[int, int], strength: float, center: tuple[float, float] | None = None, power: float = 2.0
) -> np.ndarray:
    """Radial fall-off in [1 - strength, 1]: 1 at ``center``, ``1 - strength`` at the image corners."""
    height, width = shape
    yy, xx = grid(shape)
    cy, cx = center if center is not None else ((height - 1) / 2, (width - 1) / 2)
    half_diag = np.hypot(height / 2, width / 2)
    r = np.sqrt((yy - np.float32(cy)) ** 2 + (xx - np.float32(cx)) ** 2) / np.float32(half_diag)
    return (1 - np.float32(strength) * np.clip(r, 0, 1.5) ** np.float32(power)).astype(np.float32)


def blur(image: np.ndarray, sigma: float | tuple[float, ...]) -> np.ndarray:
    """Gaussian blur over the spatial axes only (the last axis of an H x W x C image is left alone).

    Wide isotropic blurs (sigma > 6) use three box filters instead, whose cost does not grow with sigma.
    """
    if np.isscalar(sigma) and float(sigma) > 6.0:  # type: ignore[arg-type]
        width = round(float(np.sqrt(4.0 * float(sigma) ** 2 + 1.0)))  # three boxes of this width ~ Gaussian(sigma)
        size = (width, width, 1) if image.ndim == 3 else width
        out = np.asarray(image, dtype=np.float32)
        for _ in range(3):
            out = ndimage.uniform_filter(out, size, mode="nearest")
        return out
    if image.ndim == 3:
        s = (sigma, sigma, 0) if np.isscalar(sigma) else (*tuple(sigma), 0)  # type: ignore[arg-type]
        return ndimage.gaussian_filter(image, s)
    return ndimage.gaussian_filter(image, sigma)


def splat_dots(
    shape: tuple[int, int],
    rows: np.ndarray,
    cols: np.ndarray,
    sigma: float,
    weights: np.ndarray | None = None,
    sharpness: float = 3.0,
) -> np.ndarray:
    """Round soft dots (nuclei, globules, calcifications) of radius about ``2 * sigma`` at given centres.

    Impulses are blurred by a Gaussian and passed through ``1 - exp(-sharpness * density)``, which gives
    flat-topped dots that merge gracefully where they crowd.
    """
    height, width = shape
    rows = np.asarray(rows, dtype=np.float64)
    cols = np.asarray(cols, dtype=np.float64)
    w = np.ones(rows.shape) if weights is None else np.asarray(weights, dtype=np.float64)
    keep = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
    idx = rows[keep].astype(int) * width + cols[keep].astype(int)
    canvas = np.bincount(idx, w[keep], minlength=height * width).reshape(shape)
    density = ndimage.gaussian_filter(canvas, sigma) * (2 * np.pi * sigma * sigma)
    return (1 - np.exp(-sharpness * density)).astype(np.float32)


def normalise(image: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5) -> np.ndarray:
    """Percentile normalisation to [0, 1] (float32)."""
    lo, hi = np.percentile(image, [low_pct, high_pct])
    return np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32)


def to_uint8(image: np.ndarray, low: float = 0.0, high: float = 1.0) -> np.ndarray:
    """Linear map of [low, high] to 0..255 with clipping and rounding."""
    scaled = (np.asarray(image, dtype=np.float32) - np.float32(low)) * np.float32(255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def bilinear(stack: np.ndarray, rows: np.ndarray, cols: np.ndarray, cval: float = 0.0) -> np.ndarray:
    """Bilinear sampling of a (C, H, W) stack at float coordinates (any shape), ``cval`` outside (float32).

    One gather per corner for all channels at once: several times faster than ``map_coordinates`` per
    channel for the few-channel resampling the renderers do.
    """
    _, height, width = stack.shape
    r0 = np.floor(rows)
    c0 = np.floor(cols)
    fr = (rows - r0).astype(np.float32)
    fc = (cols - c0).astype(np.float32)
    r0 = r0.astype(np.intp)
    c0 = c0.astype(np.intp)
    padded = np.pad(stack, ((0, 0), (1, 1), (1, 1)), constant_values=cval)
    r0 = np.clip(r0 + 1, 0, height)
    c0 = np.clip(c0 + 1, 0, width)
    inside = (rows > -1) & (rows < height) & (cols > -1) & (cols < width)
    flat = padded.reshape(stack.shape[0], -1)
    w = width + 2
    i00 = r0 * w + c0
    out = (
        flat[:, i00] * ((1 - fr) * (1 - fc))
        + flat[:, i00 + 1] * ((1 - fr) * fc)
        + flat[:, i00 + w] * (fr * (1 - fc))
        + flat[:, i00 + w + 1] * (fr * fc)
    )
    return np.where(inside, out, np.float32(cval)).astype(np.float32)
