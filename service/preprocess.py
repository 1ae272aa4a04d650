"""From decoded pixels to the network's input: intensities mapped to [0, 1] the way the training data was, then each
slice resized to the network's square and normalised.

What a grey value means decides the mapping. CT values are Hounsfield units, so a fixed window is right (the
header's, else ``DEFAULT_CT_WINDOW``); MR, ultrasound, nuclear medicine and unknown grey (NIfTI, 16-bit PNG) have no
fixed scale, so the 0.5 / 99.5 percentiles of the whole volume are used, as the training data was scaled; other
DICOM grey (radiographs, mammograms) follows the window its header recommends; 8-bit pictures are display-ready and
taken as they are (x / 255, recorded as the window (127.5, 255)) whatever modality the caller names, deeper ones
get the percentiles; RGB is x / 255. The plan records the method and
its numbers in the result, so a caller can tell how its input was read.

Work is per slice: a 512 x 512 x 300 CT is mapped and resized one slice at a time, never copied to float whole.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image

from service.inputs import Volume
from service.schema import Preprocessing

# Soft tissue, the usual default reading window (abdomen, neck, mediastinum); used only when a CT's header gives none.
DEFAULT_CT_WINDOW = (40.0, 400.0)
PERCENTILES = (0.5, 99.5)
# An 8-bit picture's x / 255, written as a window so the recorded plan reproduces it.
PICTURE_WINDOW = (127.5, 255.0)
# Modalities whose values have no fixed meaning: a header window there is a display preference, not a scale.
STATISTICAL_MODALITIES = frozenset({"MR", "US", "PT", "NM"})
# The percentiles are estimated on a strided sample: at most this many slices of at most this many pixels.
_SAMPLE_SLICES = 32
_SAMPLE_PIXELS = 1 << 16


def _sample(pixels: np.ndarray) -> np.ndarray:
    z, y, x = pixels.shape[:3]
    step_z = -(-z // _SAMPLE_SLICES)
    step_xy = max(1, int(np.ceil(np.sqrt(y * x / _SAMPLE_PIXELS))))
    return pixels[::step_z, ::step_xy, ::step_xy]


def plan(volume: Volume, input_size: int) -> Preprocessing:
    """How this volume's intensities map to [0, 1], decided once for the whole volume so slices agree."""
    if input_size < 1:
        raise ValueError(f"input_size must be positive, got {input_size}")
    pixels = volume.pixels
    if pixels.ndim == 4:
        return Preprocessing(method="rgb", input_size=input_size)
    modality = (volume.modality or "").upper()
    if volume.format in ("png", "jpeg") or (volume.format == "tensor" and pixels.dtype == np.uint8):
        # Pictures (and 8-bit tensors, which are pictures sent as arrays) hold display values, never
        # Hounsfield units, whatever modality the caller names: the same image gives the same mask
        # whether it arrives as a PNG or as an inference tensor.
        if pixels.dtype == np.uint8:
            return Preprocessing(method="window", window=PICTURE_WINDOW, input_size=input_size)
    elif modality == "CT":
        return Preprocessing(method="ct-window", window=volume.window or DEFAULT_CT_WINDOW, input_size=input_size)
    elif volume.window is not None and modality not in STATISTICAL_MODALITIES:
        return Preprocessing(method="window", window=volume.window, input_size=input_size)
    lo, hi = (float(v) for v in np.percentile(_sample(pixels), PERCENTILES))
    if hi > lo:
        return Preprocessing(method="percentile", percentiles=(lo, hi), input_size=input_size)
    # Mostly one value (a few bright spots on black): the percentiles collapse, the extremes do not.
    lo, hi = float(pixels.min()), float(pixels.max())
    if hi > lo:
        return Preprocessing(method="minmax", window=((lo + hi) / 2, hi - lo), input_size=input_size)
    return Preprocessing(method="minmax", input_size=input_size)  # constant: every pixel maps to 0


def to_unit(slice_: np.ndarray, plan: Preprocessing) -> np.ndarray:
    """One slice as float32 in [0, 1]: [Y, X] for grey, [Y, X, 3] for RGB."""
    if plan.method == "rgb":
        return slice_.astype(np.float32) * np.float32(1 / 255)
    if plan.window is not None:
        center, width = plan.window
        low, scale = center - width / 2, 1 / width
    elif plan.percentiles is not None:
        low, high = plan.percentiles
        scale = 1 / (high - low)
    else:
        return np.zeros(slice_.shape, np.float32)
    out = slice_.astype(np.float32)
    out -= np.float32(low)
    out *= np.float32(scale)
    np.clip(out, 0.0, 1.0, out=out)
    return np.nan_to_num(out, copy=False)


def _resized(plane: np.ndarray, size: int) -> np.ndarray:
    """Straight to size x size, no letterbox, anti-aliased: Pillow's bilinear filter widens with the scale factor,
    as the training resize (torch's bilinear with antialias) does."""
    if plane.shape[:2] == (size, size):
        return plane
    return np.asarray(Image.fromarray(plane).resize((size, size), Image.Resampling.BILINEAR))


def slices(volume: Volume, plan: Preprocessing, mean: Sequence[float], std: Sequence[float]) -> Iterator[np.ndarray]:
    """Each slice as the network's float32 [3, S, S] input, normalised with the model card's mean and std; grey is
    repeated over the three channels. Every array yielded is new (a batcher may hold it)."""
    size = plan.input_size
    mean_ = np.asarray(mean, np.float32).reshape(3)
    scale = 1 / np.asarray(std, np.float32).reshape(3)
    for plane in volume.pixels:
        if plan.method == "rgb":
            unit = to_unit(_resized(np.ascontiguousarray(plane, dtype=np.uint8), size), plan).transpose(2, 0, 1)
        else:
            unit = _resized(to_unit(plane, plan), size)[None]
        out = np.empty((3, size, size), np.float32)
        for channel in range(3):
            np.subtract(unit[channel if unit.shape[0] == 3 else 0], mean_[channel], out=out[channel])
            out[channel] *= scale[channel]
        yield out
