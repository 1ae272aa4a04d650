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
    """A rendered case: ``image`` float32 in [0, 1] (H x W or H x W x 3) and ``mask`` bool H x W."""

    image: np.ndarray
    mask: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
