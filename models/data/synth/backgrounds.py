"""Real anatomy to paint on, from what installed packages ship (nothing is downloaded).

- MR: nilearn's MNI152 T1 with its brain mask, in all three planes. Slabs of each plane are held out for the test
  split (and the foreign evaluation generator), with a gap, so no test slice is a neighbour of a training one.
- CT: pydicom's two 512 x 512 test CTs (a head and a body slice, in Hounsfield units). pydicom's CT_small is kept
  out of training: it is the real CT the service is checked on.
- Colour: scikit-image's immunohistochemistry section and retina photograph, cropped at random.

Each function returns values in the source's own units and a "tissue" mask where a target is plausible.
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import numpy as np
from PIL import Image

from .mri import MNI_HELD_OUT, MNI_TRAIN, load_anatomy

__all__ = ["MNI_HELD_OUT", "MNI_TRAIN", "colour_photo", "ct_slice", "mni_slice", "resample"]

CT_FILES = ("693_J2KI.dcm", "J2K_pixelrep_mismatch.dcm")


def _pick(rng: np.random.Generator, ranges: tuple[tuple[int, int], ...]) -> int:
    sizes = np.array([b - a for a, b in ranges], dtype=np.float64)
    j = int(rng.choice(len(ranges), p=sizes / sizes.sum()))
    return int(rng.integers(*ranges[j]))


def resample(plane: np.ndarray, size: int, rng: np.random.Generator, zoom: tuple[float, float] = (0.85, 1.1)):
    """A random square crop (or pad with the plane's lowest value) around the centre, flipped left-right half the
    time, resized to size x size (Pillow's bilinear on float32, per channel)."""
    height, width = plane.shape[:2]
    side = int(max(height, width) * rng.uniform(*zoom))
    cy = height / 2 + rng.uniform(-0.06, 0.06) * height
    cx = width / 2 + rng.uniform(-0.06, 0.06) * width
    top, left = round(cy - side / 2), round(cx - side / 2)
    pad = [(max(0, -top), max(0, top + side - height)), (max(0, -left), max(0, left + side - width))]
    extra = [(0, 0)] * (plane.ndim - 2)
    padded = np.pad(plane, pad + extra, mode="constant", constant_values=float(plane.min()))
    top, left = top + pad[0][0], left + pad[1][0]
    crop = padded[top : top + side, left : left + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    channels = [crop] if crop.ndim == 2 else [crop[..., c] for c in range(crop.shape[2])]
    out = [
        np.asarray(Image.fromarray(np.ascontiguousarray(c, np.float32), "F").resize((size, size), Image.BILINEAR))
        for c in channels
    ]
    return out[0] if crop.ndim == 2 else np.stack(out, axis=2)


def mni_slice(
    rng: np.random.Generator, split: str, size: int, planes: tuple[str, ...] = ("axial", "coronal", "sagittal")
):
    """MNI152 T1 in scanner-like units (x 1000) and its brain mask, from the split's slabs of a random plane."""
    anat = load_anatomy()  # (3, X, Y, Z): T1 / max, brain mask, WM - GM
    plane = str(rng.choice(planes))
    index = _pick(rng, (MNI_TRAIN if split == "train" else MNI_HELD_OUT)[plane])
    if plane == "axial":
        cut = anat[:, :, :, index]
    elif plane == "coronal":
        cut = anat[:, :, index, :]
    else:
        cut = anat[:, index, :, :]
    cut = np.rot90(cut, 1, axes=(1, 2))  # superior / anterior towards row 0
    stacked = np.ascontiguousarray(np.stack([cut[0], cut[1]], axis=2))
    out = resample(stacked, size, rng)
    return out[..., 0] * 1000.0, out[..., 1] > 0.5, {"plane": plane, "slice_index": index}


@lru_cache(maxsize=4)
def _ct(name: str) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pydicom
        from pydicom.data import get_testdata_file

        ds = pydicom.dcmread(get_testdata_file(name))
        hu = ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    hu = np.clip(hu, -1024, 3071)
    hu.setflags(write=False)
    return hu


def ct_slice(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """One of pydicom's CTs in HU and its soft tissue (inside the body, neither air nor bone)."""
    name = str(rng.choice(CT_FILES))
    hu = resample(_ct(name), size, rng, zoom=(0.55, 1.0))
    from scipy import ndimage

    body = ndimage.binary_fill_holes(ndimage.binary_opening(hu > -400, iterations=2))
    tissue = body & (hu > -200) & (hu < 250)
    if tissue.sum() < 0.02 * size * size:
        tissue = body
    return hu, tissue, {"background": name}


@lru_cache(maxsize=2)
def _photo(name: str) -> np.ndarray:
    from skimage import data

    image = getattr(data, name)().astype(np.float32) / 255.0
    image.setflags(write=False)
    return image


def colour_photo(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """A random crop of a packaged stained section or retina photograph, display values in [0, 1]."""
    name = str(rng.choice(("immunohistochemistry", "retina")))
    photo = _photo(name)
    height, width = photo.shape[:2]
    side = int(min(height, width) * rng.uniform(0.3, 0.8))
    top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
    crop = photo[top : top + side, left : left + side]
    out = resample(np.ascontiguousarray(crop), size, rng, zoom=(0.95, 1.0))
    tissue = out.mean(axis=2) > 0.08  # the retina's black surround is not tissue
    return np.clip(out, 0, 1), tissue if tissue.any() else np.ones((size, size), bool), {"background": name}
