"""Names and column layout of the 14 geometry values, without torch.

The serving side (reliability report, result schema) needs the layout but must not import torch just
for it; models/geometry.py computes the values and re-exports these names.
"""

from __future__ import annotations

GEOMETRY_FIELDS: tuple[str, ...] = (
    "bbox_xmin",
    "bbox_ymin",
    "bbox_xmax",
    "bbox_ymax",
    "area",
    "perimeter",
    "aspect_ratio",
    "compactness",
    "centroid_x",
    "centroid_y",
    "eccentricity",
    "orientation_sin",
    "orientation_cos",
    "solidity",
)
NUM_GEOMETRY = len(GEOMETRY_FIELDS)

# One GEO token per attribute; the width is how many of the 14 columns it predicts.
ATTRIBUTES: tuple[tuple[str, int], ...] = (
    ("bbox", 4),
    ("area", 1),
    ("perimeter", 1),
    ("aspect_ratio", 1),
    ("compactness", 1),
    ("centroid", 2),
    ("eccentricity", 1),
    ("orientation", 2),
    ("solidity", 1),
)


def _attribute_slices() -> dict[str, slice]:
    slices, start = {}, 0
    for name, width in ATTRIBUTES:
        slices[name] = slice(start, start + width)
        start += width
    return slices


ATTRIBUTE_SLICES: dict[str, slice] = _attribute_slices()
