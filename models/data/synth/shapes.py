"""Random smooth shapes: Fourier-perturbed blobs, polygons and curves, rasterised on a pixel grid.

Every shape is returned as a *radial field* where that is natural: ``rho = distance / r(theta)`` measured
from the shape's centre, so ``rho < 1`` is the inside, ``rho`` near 1 is the border (rims, halos,
capsules) and ``1 - rho`` is a smooth profile for shading. All functions take an explicit
``numpy.random.Generator`` and never touch global state, which is what makes the benchmark reproducible.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

__all__ = [
    "blob_field",
    "curve_points",
    "fourier_coefficients",
    "grid",
    "log_uniform",
    "polygon_mask",
    "render_curves",
    "smooth_closed_curve",
]


_SMOOTH3 = np.exp(-0.5 * (np.arange(-9, 10) / 3.0) ** 2)
_SMOOTH3 /= _SMOOTH3.sum()


@lru_cache(maxsize=8)
def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def grid(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Read-only (yy, xx) pixel-centre coordinates of an image of ``shape`` (cached)."""
    return _grid(int(shape[0]), int(shape[1]))


def log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def fourier_coefficients(
    rng: np.random.Generator, harmonics: int = 6, roughness: float = 0.2, decay: float = 1.3
) -> tuple[np.ndarray, np.ndarray]:
    """Amplitudes and phases of a radius perturbation ``1 + sum a_k cos(k theta + phi_k)``, k = 2..harmonics+1.

    Amplitudes fall as ``k**-decay`` and are scaled so that the worst case stays a star-shaped curve
    (the radius never falls below 35 % of its mean).
    """
    k = np.arange(2, harmonics + 2, dtype=np.float64)
    amps = roughness * rng.uniform(0.3, 1.0, harmonics) * k**-decay * 2.0**decay
    total = amps.sum()
    if total > 0.65:
        amps *= 0.65 / total
    phases = rng.uniform(0, 2 * np.pi, harmonics)
    return amps, phases


def blob_field(
    shape: tuple[int, int],
    center: tuple[float, float],
    radius: float,
    rng: np.random.Generator | None = None,
    *,
    aspect: float = 1.0,
    angle: float = 0.0,
    harmonics: int = 6,
    roughness: float = 0.2,
    decay: float = 1.3,
    spikes: int = 0,
    spike_length: float = 0.0,
    coefficients: tuple[np.ndarray, np.ndarray] | None = None,
    extent: float = 2.0,
) -> np.ndarray:
    """Normalised radial coordinate ``rho`` of a lumpy ellipse (``rho < 1`` inside), float32 of ``shape``.

    ``radius`` is the geometric-mean radius, ``aspect`` the ratio of the long to the short axis and
    ``angle`` the orientation of the long axis (radians). ``spikes`` adds that many narrow spicules of
    relative length ``spike_length`` (spiculated margins). Only a window that contains ``rho <= extent`` is
    evaluated (the rest is a constant above ``extent``), so small shapes are cheap.
    """
    if coefficients is None:
        if rng is None:
            raise ValueError("blob_field needs either rng or coefficients")
        coefficients = fourier_coefficients(rng, harmonics, roughness, decay)
    amps, phases = coefficients
    spike_params: list[tuple[float, float, float]] = []
    if spikes and spike_length > 0:
        if rng is None:
            raise ValueError("spikes need an rng")
        for t0 in rng.uniform(-np.pi, np.pi, spikes):
            spike_params.append((float(t0), rng.uniform(0.06, 0.16), spike_length * rng.uniform(0.5, 1.0)))
    # Only a window around the shape is computed; rho is exact wherever rho <= extent, and >= extent elsewhere.
    height, width = shape
    cy, cx = center
    reach = radius * np.sqrt(aspect) * (1 + float(np.sum(amps)) + spike_length) * extent + 2
    r0, r1 = max(int(cy - reach), 0), min(int(np.ceil(cy + reach)) + 1, height)
    c0, c1 = max(int(cx - reach), 0), min(int(np.ceil(cx + reach)) + 1, width)
    out = np.full(shape, np.float32(max(extent, 1.0) * 4), dtype=np.float32)
    if r0 >= r1 or c0 >= c1:
        return out
    yy, xx = grid(shape)
    dy = yy[r0:r1, c0:c1] - np.float32(cy)
    dx = xx[r0:r1, c0:c1] - np.float32(cx)
    ca, sa = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    u = (dx * ca + dy * sa) / np.float32(np.sqrt(aspect))
    v = (-dx * sa + dy * ca) * np.float32(np.sqrt(aspect))
    dist = np.sqrt(u * u + v * v)
    theta = np.arctan2(v, u)
    r = np.ones_like(theta)
    for k, (a, p) in enumerate(zip(amps, phases, strict=True), start=2):
        if a > 1e-4:
            r += np.float32(a) * np.cos(np.float32(k) * theta + np.float32(p))
    for t0, sw, sl in spike_params:
        d = (theta - np.float32(t0) + np.float32(np.pi)) % np.float32(2 * np.pi) - np.float32(np.pi)
        r += np.float32(sl) * np.exp(-((d / np.float32(sw)) ** 2))
    out[r0:r1, c0:c1] = dist / (np.float32(radius) * np.maximum(r, np.float32(0.2)))
    return out


def polygon_mask(shape: tuple[int, int], rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Boolean mask of a filled polygon (vertices in pixel coordinates, clipped to the image)."""
    canvas = Image.new("L", (int(shape[1]), int(shape[0])), 0)
    xy = [(float(c), float(r)) for r, c in zip(np.asarray(rows), np.asarray(cols), strict=True)]
    ImageDraw.Draw(canvas).polygon(xy, fill=1)
    return np.asarray(canvas, dtype=np.uint8).astype(bool)


def smooth_closed_curve(points: np.ndarray, samples: int = 200, smooth: float = 0.0) -> np.ndarray:
    """Periodic cubic interpolation (Catmull-Rom) through ``points`` (N x 2), returning ``samples`` points."""
    pts = np.asarray(points, dtype=np.float64)
    n = len(pts)
    t = np.linspace(0, n, samples, endpoint=False)
    i = np.floor(t).astype(int)
    f = (t - i)[:, None]
    p0, p1, p2, p3 = pts[(i - 1) % n], pts[i % n], pts[(i + 1) % n], pts[(i + 2) % n]
    out = 0.5 * (2 * p1 + (-p0 + p2) * f + (2 * p0 - 5 * p1 + 4 * p2 - p3) * f**2 + (-p0 + 3 * p1 - 3 * p2 + p3) * f**3)
    if smooth > 0:
        out = ndimage.gaussian_filter1d(out, smooth, axis=0, mode="wrap")
    return out


def curve_points(
    rng: np.random.Generator,
    start: tuple[float, float],
    direction: float,
    length: float,
    *,
    step: float = 1.0,
    curl: float = 0.05,
    drift: float = 0.0,
) -> np.ndarray:
    """A smooth random-walk curve (N x 2 of (row, col)), heading ``direction`` radians, ``length`` pixels long."""
    n = max(int(length / step), 2)
    turns = np.cumsum(rng.normal(drift, curl, n))
    turns = np.convolve(np.pad(turns, 9, mode="edge"), _SMOOTH3, mode="valid")  # Gaussian, sigma 3 samples
    ang = direction + turns
    rows = start[0] + np.cumsum(np.sin(ang) * step)
    cols = start[1] + np.cumsum(np.cos(ang) * step)
    return np.stack([rows, cols], axis=1)


def render_curves(
    shape: tuple[int, int], curves: list[np.ndarray], widths: list[float], weights: list[float] | None = None
) -> np.ndarray:
    """Soft rendering (float32 in [0, 1]) of polylines of the given widths (pixels).

    Curves are resampled at half-pixel steps and splatted with bilinear weights into one canvas per width
    class (widths rounded to whole pixels), then blurred by a Gaussian of sigma ``width / 2.5`` and
    normalised so a line's core reaches ~1.
    """
    height, width = shape
    out = np.zeros(shape, dtype=np.float32)
    if not curves:
        return out
    if weights is None:
        weights = [1.0] * len(curves)
    classes: dict[float, np.ndarray] = {}
    for pts, w, wt in zip(curves, widths, weights, strict=True):
        pts = np.asarray(pts, dtype=np.float64)
        if len(pts) < 2:
            continue
        seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
        arc = np.concatenate([[0.0], np.cumsum(seg)])
        if arc[-1] <= 0:
            continue
        s = np.arange(0.0, arc[-1], 0.5)
        r = np.interp(s, arc, pts[:, 0])
        c = np.interp(s, arc, pts[:, 1])
        keep = (r >= 0) & (r < height - 1) & (c >= 0) & (c < width - 1)
        r, c = r[keep], c[keep]
        if r.size == 0:
            continue
        key = 0.5 if w < 0.75 else float(round(w))  # few width classes: one blur each
        canvas = classes.setdefault(key, np.zeros(shape, dtype=np.float32))
        r0, c0 = np.floor(r).astype(int), np.floor(c).astype(int)
        fr, fc = r - r0, c - c0
        idx = np.concatenate([r0 * width + c0, (r0 + 1) * width + c0, r0 * width + c0 + 1, (r0 + 1) * width + c0 + 1])
        wgt = np.concatenate([(1 - fr) * (1 - fc), fr * (1 - fc), (1 - fr) * fc, fr * fc]) * wt
        canvas += np.bincount(idx, wgt, minlength=height * width).reshape(shape).astype(np.float32)
    for key, canvas in classes.items():
        sigma = max(key / 2.5, 0.5)
        # A line of unit weight splatted every half pixel has a density of 2 per pixel of length.
        blurred = ndimage.gaussian_filter(canvas, sigma) * (np.sqrt(2 * np.pi) * sigma / 2.0)
        out = np.maximum(out, np.clip(blurred, 0, 1).astype(np.float32))
    return out
