"""What every modality renderer receives and returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Case", "CaseContext"]


@dataclass
class CaseContext:
    """Per-case inputs: the case's own RNG, output size, whether a target is drawn, and where it sits."""

    rng: np.random.Generator
    size: int
    has_target: bool
    split: str  # "train" or "test"
    index: int


@dataclass
class Case:
    """A rendered case: ``image`` float32 in [0, 1] (H x W or H x W x 3) and ``mask`` bool H x W.

    A CT or MR renderer gives ``raw`` instead, in the scanner's own units (HU, MR signal) with ``units`` its
    modality ("CT", "MR"): the recipe (models/recipe.py) maps it to the image, as the service maps a real scan.
    """

    image: np.ndarray
    mask: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    raw: np.ndarray | None = None
    units: str | None = None
