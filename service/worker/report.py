"""From the engine's per-slice outputs to what a caller gets: masks, reliability, volume consistency.

Pure functions on numpy arrays, shared by the worker and ``c2p segment``. The graph already fused the
three views and applied the empty gate; here the fused probability goes back to the input's grid, the
consensus outputs become a readable report, and a volume's slices are checked against each other: a
slice whose mask area or position jumps away from its neighbours is more likely a failure than anatomy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from models.attributes import ATTRIBUTE_SLICES, GEOMETRY_FIELDS
from models.recipe import to_grid
from models.reliability import DEFAULT_LEVELS, abstains, level, reliability
from service.schema import Reliability, SliceReliability

AREA = ATTRIBUTE_SLICES["area"].start
CENTROID = ATTRIBUTE_SLICES["centroid"]
# Changes smaller than this (fraction of the slice) are never outliers: noise around tiny masks.
MIN_AREA_JUMP = 0.005
MIN_CENTROID_JUMP = 0.05
NEIGHBOURS = 2


@dataclass(frozen=True)
class SliceOutputs:
    """The engine's outputs for one slice, batch axis removed (see models/consensus.py)."""

    prob: np.ndarray  # [S, S] fused foreground probability, already gated
    view_weights: np.ndarray  # [3]
    view_inconsistency: np.ndarray  # [3]
    geometry_pred: np.ndarray  # [14]
    geometry_mask: np.ndarray  # [14]
    geometry_valid: np.ndarray  # [14] bool
    view_agreement: float
    empty_gate: float
    concept_embedding: np.ndarray | None = None  # [text_dim], unit length; None from graphs exported before it
    blank: bool = False  # the content gate answered for the model: nothing to segment, the engine never ran

    @classmethod
    def for_blank(cls, size: int) -> SliceOutputs:
        """What a slice without content gets: an empty mask the views agree on."""
        n = len(GEOMETRY_FIELDS)
        return cls(
            prob=np.zeros((size, size), np.float32),
            view_weights=np.ones(3, np.float32),
            view_inconsistency=np.zeros(3, np.float32),
            geometry_pred=np.zeros(n, np.float32),
            geometry_mask=np.zeros(n, np.float32),
            geometry_valid=np.zeros(n, bool),
            view_agreement=1.0,
            empty_gate=0.0,
            blank=True,
        )

    @classmethod
    def from_engine(cls, outputs: dict[str, np.ndarray]) -> SliceOutputs:
        return cls(
            prob=np.asarray(outputs["prob"], dtype=np.float32).reshape(outputs["prob"].shape[-2:]),
            view_weights=np.asarray(outputs["view_weights"], dtype=np.float32),
            view_inconsistency=np.asarray(outputs["view_inconsistency"], dtype=np.float32),
            geometry_pred=np.asarray(outputs["geometry_pred"], dtype=np.float32),
            geometry_mask=np.asarray(outputs["geometry_mask"], dtype=np.float32),
            geometry_valid=np.asarray(outputs["geometry_valid"]).astype(bool),
            view_agreement=float(outputs["view_agreement"]),
            empty_gate=float(outputs["empty_gate"]),
            concept_embedding=(
                np.asarray(outputs["concept_embedding"], np.float32) if "concept_embedding" in outputs else None
            ),
        )


def mask_on_grid(prob: np.ndarray, height: int, width: int, threshold: float, letterbox: bool) -> np.ndarray:
    """Fused probability [S, S] -> uint8 mask [height, width] on the input's grid: the recipe's content box
    cropped back and resized (models/recipe.py: ``to_grid``), then thresholded."""
    return (to_grid(prob, height, width, letterbox) >= threshold).astype(np.uint8)


def _robust_outliers(values: np.ndarray, mads: float, floor: float) -> np.ndarray:
    """Flag values far from the median of their neighbours (±NEIGHBOURS slices, itself excluded)."""
    n = len(values)
    residual = np.zeros(n, dtype=np.float64)
    for z in range(n):
        around = np.r_[values[max(0, z - NEIGHBOURS) : z], values[z + 1 : z + 1 + NEIGHBOURS]]
        residual[z] = abs(values[z] - np.median(around))
    scale = 1.4826 * np.median(residual)
    return (residual > mads * scale) & (residual > floor)


def volume_outliers(outputs: Sequence[SliceOutputs], mads: float) -> np.ndarray:
    """[Z] bool: slices whose measured area or centroid is out of line with their neighbours.

    Robust statistics (median of neighbours, MAD over the volume), so one failed slice cannot hide
    itself by moving the reference, and absolute floors, so a stack of tiny noisy masks is not
    "inconsistent" at every slice. Volumes of fewer than 3 slices have no neighbours to compare with.
    """
    n = len(outputs)
    if n < 3:
        return np.zeros(n, dtype=bool)
    area = np.array([o.geometry_mask[AREA] for o in outputs], dtype=np.float64)
    flagged = _robust_outliers(area, mads, MIN_AREA_JUMP)
    present = area > 0
    if present.sum() >= 3:
        centroids = np.array([o.geometry_mask[CENTROID] for o in outputs], dtype=np.float64)
        idx = np.flatnonzero(present)
        jump = np.zeros(n, dtype=bool)
        for axis in range(2):
            jump[idx] |= _robust_outliers(centroids[idx, axis], mads, MIN_CENTROID_JUMP)
        flagged |= jump
    return flagged


def _named(values: np.ndarray, valid: np.ndarray | None = None) -> dict[str, float | None]:
    return {
        name: (None if valid is not None and not valid[i] else round(float(values[i]), 5))
        for i, name in enumerate(GEOMETRY_FIELDS)
    }


def fused_concept(outputs: Sequence[SliceOutputs], areas: Sequence[int]) -> np.ndarray | None:
    """The volume's concept embedding: the slices' embeddings weighted by mask area (None if there is none)."""
    rows = [(o.concept_embedding, a) for o, a in zip(outputs, areas, strict=True) if a > 0]
    rows = [(e, a) for e, a in rows if e is not None]
    if not rows:
        return None
    return np.sum([e * a for e, a in rows], axis=0) / sum(a for _, a in rows)


def slice_parts(outputs: Sequence[SliceOutputs]) -> dict[str, np.ndarray]:
    """Each slice's reliability score and its parts (models/reliability.py); a blank slice scores 1."""
    stacked = {
        "view_agreement": np.array([o.view_agreement for o in outputs], dtype=np.float32),
        "view_weights": np.stack([o.view_weights for o in outputs]),
        "view_inconsistency": np.stack([o.view_inconsistency for o in outputs]),
        "geometry_pred": np.stack([o.geometry_pred for o in outputs]),
        "geometry_mask": np.stack([o.geometry_mask for o in outputs]),
        "geometry_valid": np.stack([o.geometry_valid for o in outputs]),
    }
    parts = reliability(stacked)
    blank = np.array([o.blank for o in outputs], dtype=bool)
    parts["score"] = np.where(blank, 1.0, np.clip(parts["score"], 0, 1))
    return parts


def abstaining(
    outputs: Sequence[SliceOutputs], parts: dict[str, np.ndarray], bound: float, threshold: float
) -> np.ndarray:
    """[Z] bool: slices whose finding (a mask on the model's grid) scored below the card's abstention bound."""
    has_mask = np.array([bool((o.prob >= threshold).any()) for o in outputs], dtype=bool)
    return abstains(parts["score"], has_mask, bound)


def build_reliability(
    outputs: Sequence[SliceOutputs],
    areas: Sequence[int],
    outliers: np.ndarray,
    suppress_outliers: bool,
    levels: Sequence[tuple[float, str]] = DEFAULT_LEVELS,
    abstained: np.ndarray | None = None,
    parts: dict[str, np.ndarray] | None = None,
) -> Reliability:
    """The report: per-slice scores and their parts, and one score for the result.

    The result's score weighs each slice by its mask area, so a volume is judged by the slices that
    carry the segmentation rather than by hundreds of confidently empty ones; an empty result falls back
    to the plain mean (how sure the model is that there is nothing). Levels come from the card's calibrated
    bounds. A slice the content gate answered scores 1: there was nothing in it to segment. An abstained slice
    keeps the score of the finding it did not return and reads low, as does a result emptied that way: the empty
    answer is not one the model vouched for.
    """
    parts = slice_parts(outputs) if parts is None else parts
    abstained = np.zeros(len(outputs), bool) if abstained is None else abstained
    slices = []
    for z, o in enumerate(outputs):
        score = float(parts["score"][z])
        outlier = bool(outliers[z])
        gated = bool(o.empty_gate >= 0.5) or o.blank or bool(abstained[z])
        slices.append(
            SliceReliability(
                index=z,
                score=round(score, 5),
                level=levels[-1][1] if abstained[z] else level(score, levels),
                suppressed=gated or (outlier and suppress_outliers),
                abstained=bool(abstained[z]),
                outlier=outlier,
                blank=o.blank,
                agreement=round(float(parts["agreement"][z]), 5),
                consistency=round(float(parts["consistency"][z]), 5),
                geometry_agreement=round(float(parts["geometry"][z]), 5),
                view_weights=tuple(round(float(v), 5) for v in o.view_weights),
                view_inconsistency=tuple(round(float(v), 5) for v in o.view_inconsistency),
                geometry_predicted=_named(o.geometry_pred),
                geometry_measured=_named(o.geometry_mask, o.geometry_valid),
            )
        )
    weights = np.asarray(areas, dtype=np.float64)
    scores = np.array([s.score for s in slices], dtype=np.float64)
    overall = float((scores * weights).sum() / weights.sum()) if weights.sum() > 0 else float(scores.mean())
    reason = _empty_reason(outputs, areas, abstained)
    return Reliability(
        score=round(overall, 5),
        level=levels[-1][1] if reason == "low_confidence" else level(overall, levels),
        suppressed=bool(all(s.suppressed for s in slices)),
        reason=reason,
        outlier_slices=[int(z) for z in np.flatnonzero(outliers)],
        slices=slices,
    )


def _empty_reason(outputs: Sequence[SliceOutputs], areas: Sequence[int], abstained: np.ndarray) -> str | None:
    if not outputs or any(a > 0 for a in areas):
        return None
    if all(o.blank for o in outputs):
        return "blank_input"
    return "low_confidence" if abstained.any() else None
