"""The one preprocessing recipe: how stored pixel values become the network's input.

A model is only as good as the match between the pixels it was trained on and the pixels it is served. So the
recipe lives with the model (its card carries ``Recipe.to_card()``), and the synthetic data generator, the
training loader, ``c2p evaluate`` and the service all call these functions; none has its own copy.

The rule, by what a stored value means:

- **CT**: Hounsfield units have a fixed meaning, so one fixed window (the recipe's ``ct_window``) is applied to
  every CT, whatever display window its header suggests (a header window is a reader's preference, and the
  model saw one window only).
- **Display pictures** (8-bit PNG/JPEG, 8-bit tensors, 8-bit grey of any modality but CT and MR: ultrasound,
  endoscopy, radiograph exports) are already display values: ``x / 255``.
- **Other grey** (MR, deep ultrasound, nuclear medicine, 16-bit pictures, NIfTI of unknown modality) has no
  fixed scale: the recipe's percentiles of the whole upload (a volume when a volume is sent, the slice when one
  slice is) map to [0, 1]. Radiographs with a header window (CR, DX, MG) use that window, as their readers do.
- **RGB** is ``x / 255`` per channel.

Then each slice is resized straight to the network's square (no letterbox) with Pillow's bilinear filter on
float32 values, which widens its support when it shrinks (anti-aliased), grey is repeated over three channels,
and the card's mean and std normalise it. Masks for training take the same resize and a 0.5 threshold.

numpy and Pillow only: the service imports this without torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image

__all__ = [
    "BLANK_STD",
    "PICTURE_WINDOW",
    "Plan",
    "Recipe",
    "decide",
    "is_blank",
    "network_input",
    "resize_mask",
    "resize_unit",
    "to_unit",
]

Method = Literal["ct-window", "percentile", "window", "rgb", "minmax"]

# An 8-bit picture's x / 255, written as a window so a recorded plan reproduces it.
PICTURE_WINDOW = (127.5, 255.0)
# Modalities whose values have no fixed meaning: a header window there is a display preference, not a scale.
STATISTICAL_MODALITIES = frozenset({"MR", "US", "PT", "NM"})
# Modalities whose 8-bit grey is still read statistically (MR magnitude scaled to 8 bits keeps no meaning).
_NOT_DISPLAY = frozenset({"CT", "MR"})
_DISPLAY_NOTE = "8-bit PNG/JPEG/tensors, and 8-bit grey of every modality except CT and MR"
# The content gate: a slice whose network-size [0, 1] values have a standard deviation below one display grey
# level holds nothing to segment (all-zero, constant, or near-constant padding); it gets an empty mask without
# the model being asked.
BLANK_STD = 1 / 255
# Percentiles are estimated on a strided sample: at most this many slices of at most this many pixels.
_SAMPLE_SLICES = 32
_SAMPLE_PIXELS = 1 << 16


@dataclass(frozen=True)
class Recipe:
    """The numbers of the rule above; ``version`` names the rule itself (bump it when the code changes)."""

    ct_window: tuple[float, float] = (-600.0, 1500.0)  # (center, width) in HU: lung window, soft tissue visible
    percentiles: tuple[float, float] = (0.5, 99.5)
    resize: str = "stretch-bilinear-antialiased"
    channels: str = "grey repeated to 3; RGB as is"
    version: int = 1

    def to_card(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "ct": {"method": "ct-window", "window": list(self.ct_window), "header_window": "ignored"},
            "display_pictures": {"method": "window", "window": list(PICTURE_WINDOW), "applies_to": _DISPLAY_NOTE},
            "grey": {"method": "percentile", "percentiles": list(self.percentiles), "scope": "whole upload"},
            "radiograph_header_window": "CR/DX/MG and other non-statistical modalities: the header's window",
            "rgb": {"method": "rgb", "scale": "x / 255"},
            "resize": self.resize,
            "channels": self.channels,
        }

    @classmethod
    def from_card(cls, block: Mapping[str, Any] | None) -> Recipe:
        """The card's recipe; a card without one (written before recipes) gets this module's defaults."""
        if not block:
            return cls()
        if int(block.get("version", 0)) != cls.version:
            raise ValueError(f"recipe version {block.get('version')!r} is not {cls.version}: this code cannot apply it")
        center, width = (float(v) for v in block["ct"]["window"])
        low, high = (float(v) for v in block["grey"]["percentiles"])
        if width <= 0 or not 0 <= low < high <= 100:
            raise ValueError(f"recipe numbers out of range: ct window {center, width}, percentiles {low, high}")
        return cls(ct_window=(center, width), percentiles=(low, high))


@dataclass(frozen=True)
class Plan:
    """How one upload's values map to [0, 1]: decided once, so every slice of a volume agrees."""

    method: Method
    window: tuple[float, float] | None = None  # (center, width)
    percentiles: tuple[float, float] | None = None  # the values found at the recipe's percentiles


def sample(pixels: np.ndarray) -> np.ndarray:
    """A strided sample of a [Z, Y, X] (or [Y, X]) array: enough for percentiles, bounded for a 300-slice CT."""
    if pixels.ndim == 2:
        pixels = pixels[None]
    z, y, x = pixels.shape[:3]
    step_z = -(-z // _SAMPLE_SLICES)
    step_xy = max(1, int(np.ceil(np.sqrt(y * x / _SAMPLE_PIXELS))))
    return pixels[::step_z, ::step_xy, ::step_xy]


def decide(
    pixels: np.ndarray,
    recipe: Recipe,
    *,
    modality: str | None,
    rgb: bool = False,
    picture: bool = False,
    header_window: tuple[float, float] | None = None,
) -> Plan:
    """The plan for one upload. ``pixels`` is the whole upload (or a sample of it); ``picture`` says it arrived as
    a picture file (PNG/JPEG) or an 8-bit tensor, whose values are display values whatever modality is named."""
    if rgb:
        return Plan("rgb")
    modality = (modality or "").upper()
    if pixels.dtype == np.uint8 and (picture or modality not in _NOT_DISPLAY):
        return Plan("window", window=PICTURE_WINDOW)
    if modality == "CT" and not picture:
        return Plan("ct-window", window=recipe.ct_window)
    if header_window is not None and modality not in STATISTICAL_MODALITIES and not picture:
        return Plan("window", window=header_window)
    values = sample(pixels)
    lo, hi = (float(v) for v in np.percentile(values, recipe.percentiles))
    if hi > lo:
        return Plan("percentile", percentiles=(lo, hi))
    # Mostly one value (a few bright spots on black): the percentiles collapse, the extremes do not.
    lo, hi = float(pixels.min()), float(pixels.max())
    if hi > lo:
        return Plan("minmax", window=((lo + hi) / 2, hi - lo))
    return Plan("minmax")  # constant: every pixel maps to 0


def to_unit(plane: np.ndarray, plan: Plan) -> np.ndarray:
    """One slice as float32 in [0, 1]: [Y, X] for grey, [Y, X, 3] for RGB."""
    if plan.method == "rgb":
        return plane.astype(np.float32) * np.float32(1 / 255)
    if plan.window is not None:
        center, width = plan.window
        low, scale = center - width / 2, 1 / width
    elif plan.percentiles is not None:
        low, high = plan.percentiles
        scale = 1 / (high - low)
    else:
        return np.zeros(plane.shape, np.float32)
    out = plane.astype(np.float32)
    out -= np.float32(low)
    out *= np.float32(scale)
    np.clip(out, 0.0, 1.0, out=out)
    return np.nan_to_num(out, copy=False)


def _resize_plane(plane: np.ndarray, size: int) -> np.ndarray:
    picture = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32), mode="F")
    return np.asarray(picture.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)


def resize_unit(unit: np.ndarray, size: int) -> np.ndarray:
    """[Y, X] or [Y, X, 3] float32 -> the same at size x size (a new array, values stay in [0, 1])."""
    if unit.shape[:2] == (size, size):
        return np.array(unit, dtype=np.float32)
    if unit.ndim == 2:
        return np.clip(_resize_plane(unit, size), 0.0, 1.0)
    return np.clip(np.stack([_resize_plane(unit[..., c], size) for c in range(unit.shape[2])], axis=2), 0.0, 1.0)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A {0, 1} mask through the image's resize, thresholded at one half (so it stays aligned with the image)."""
    if mask.shape[:2] == (size, size):
        return (mask > 0).astype(np.uint8)
    return (_resize_plane(mask.astype(np.float32), size) >= 0.5).astype(np.uint8)


def is_blank(unit: np.ndarray) -> bool:
    """The content gate on a resized [0, 1] slice (grey or RGB): see ``BLANK_STD``."""
    return float(np.std(unit)) < BLANK_STD


def network_input(unit: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A size x size unit slice ([S, S] or [S, S, 3]) as the network's float32 [3, S, S] input."""
    mean_ = np.asarray(mean, np.float32).reshape(3, 1, 1)
    std_ = np.asarray(std, np.float32).reshape(3, 1, 1)
    channels = unit[None] if unit.ndim == 2 else unit.transpose(2, 0, 1)
    out = np.empty((3, *unit.shape[:2]), np.float32)
    np.subtract(np.broadcast_to(channels, out.shape), mean_, out=out)
    out /= std_
    return out
