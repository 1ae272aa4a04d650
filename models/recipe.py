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

Then each slice is letterboxed into the network's square (version 2): resized, aspect kept, so its longer side
fills the square, with Pillow's bilinear filter on float32 values, which widens its support when it shrinks
(anti-aliased), and centred on zeros (the recipe's black); the network's output is cropped back to that box
before it is resized to the input's grid, so a 512 x 300 slice is neither squashed on the way in nor on the way
out. Version 1 stretched every slice to the square; its cards still read as stretch. On a square image the two
are the same. Grey is repeated over three channels, and the card's mean and std normalise it. Masks for
training take the same resize and a 0.5 threshold. The content gate looks at the box only: the black bands are
the recipe's, not the image's.

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
    "LETTERBOX",
    "PICTURE_WINDOW",
    "STRETCH",
    "Box",
    "Plan",
    "Recipe",
    "content_box",
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
# How a slice reaches the network's square: the recipe's ``resize``, by version.
STRETCH = "stretch-bilinear-antialiased"
LETTERBOX = "letterbox-bilinear-antialiased"
_RESIZE_OF_VERSION = {1: STRETCH, 2: LETTERBOX}
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
    resize: str = LETTERBOX
    channels: str = "grey repeated to 3; RGB as is"
    version: int = 2

    @property
    def letterbox(self) -> bool:
        return self.resize == LETTERBOX

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
        """The card's recipe; a card without one (written before recipes, when every slice was stretched) gets
        this module's numbers with version 1's stretch."""
        if not block:
            return cls(resize=STRETCH, version=1)
        version = int(block.get("version", 0))
        if version not in _RESIZE_OF_VERSION:
            raise ValueError(f"recipe version {block.get('version')!r} is not one of {sorted(_RESIZE_OF_VERSION)}")
        center, width = (float(v) for v in block["ct"]["window"])
        low, high = (float(v) for v in block["grey"]["percentiles"])
        if width <= 0 or not 0 <= low < high <= 100:
            raise ValueError(f"recipe numbers out of range: ct window {center, width}, percentiles {low, high}")
        return cls(
            ct_window=(center, width), percentiles=(low, high), resize=_RESIZE_OF_VERSION[version], version=version
        )


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


@dataclass(frozen=True)
class Box:
    """Where an image's content lies in the network's square: rows ``top:top + rows``, columns ``left:...``."""

    top: int
    left: int
    rows: int
    columns: int

    def of(self, square: np.ndarray) -> np.ndarray:
        """The content's part of a [S, S, ...] array (a view)."""
        return square[self.top : self.top + self.rows, self.left : self.left + self.columns]


def content_box(height: int, width: int, size: int, letterbox: bool) -> Box:
    """The box a height x width image fills in the size x size square: all of it when stretched or square; else
    its longer side spans the square and the shorter is scaled alike (at least one pixel), centred."""
    if not letterbox or height == width:
        return Box(0, 0, size, size)
    scale = size / max(height, width)
    rows = min(size, max(1, round(height * scale)))
    columns = min(size, max(1, round(width * scale)))
    return Box((size - rows) // 2, (size - columns) // 2, rows, columns)


def _resize_plane(plane: np.ndarray, rows: int, columns: int) -> np.ndarray:
    picture = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32), mode="F")
    return np.asarray(picture.resize((columns, rows), Image.Resampling.BILINEAR), dtype=np.float32)


def _into_square(planes: np.ndarray, size: int, letterbox: bool) -> np.ndarray:
    """[Y, X] or [Y, X, C] float32 -> [S, S] or [S, S, C]: each plane resized into its box, zeros around it."""
    box = content_box(planes.shape[0], planes.shape[1], size, letterbox)
    if planes.shape[:2] == (box.rows, box.columns) == (size, size):
        return np.array(planes, dtype=np.float32)
    out = np.zeros((size, size, *planes.shape[2:]), np.float32)
    if planes.ndim == 2:
        box.of(out)[...] = _resize_plane(planes, box.rows, box.columns)
    else:
        for c in range(planes.shape[2]):
            box.of(out)[..., c] = _resize_plane(planes[..., c], box.rows, box.columns)
    return out


def resize_unit(unit: np.ndarray, size: int, letterbox: bool) -> np.ndarray:
    """[Y, X] or [Y, X, 3] float32 -> the same at size x size (a new array, values stay in [0, 1])."""
    return np.clip(_into_square(unit, size, letterbox), 0.0, 1.0)


def resize_mask(mask: np.ndarray, size: int, letterbox: bool) -> np.ndarray:
    """A {0, 1} mask through the image's resize, thresholded at one half (so it stays aligned with the image)."""
    return (_into_square((mask > 0).astype(np.float32), size, letterbox) >= 0.5).astype(np.uint8)


def to_grid(prob: np.ndarray, height: int, width: int, letterbox: bool) -> np.ndarray:
    """The network's [S, S] probability back on a height x width input's grid: the content box cropped, then
    resized (bilinear) to the input's size. Thresholding comes after: a resized thresholded mask would have
    staircase edges at every upscale."""
    box = content_box(height, width, prob.shape[0], letterbox)
    content = box.of(prob)
    if content.shape == (height, width):
        return np.asarray(content, np.float32)
    return _resize_plane(content, height, width)


def is_blank(unit: np.ndarray) -> bool:
    """The content gate on a resized [0, 1] slice (grey or RGB), its content box only: see ``BLANK_STD``."""
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
