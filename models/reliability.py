"""One reliability score per image from the consensus outputs, shared by evaluation and the service.

Three signals, each in [0, 1], that should all be high when a segmentation is right:
- agreement: mean pairwise soft Dice of the three views (a model that is unsure hesitates or flips),
- consistency: mean of exp(-5u) over the views (each view's mask matches its own predicted geometry), from
  u itself, not the fusion weights (which are relative to the best view); for
  an empty result, where u's centroid term is undefined, how firmly the GEO heads predict no area,
- geometry: predicted vs measured area and centroid of the final mask agree.
The score is their weighted mean; evaluation reports how well it ranks real Dice (Spearman, AUROC).

A finding scored below the card's ``abstain_below`` (fitted on calibration data, models/evaluate/calibration.py)
is not returned: the mask is emptied and the result says why (``low_confidence``). On healthy anatomy a weak
model still paints something; a finding it cannot back is worse than saying nothing was found.
"""

from __future__ import annotations

import numpy as np

from models.attributes import ATTRIBUTE_SLICES

WEIGHTS = {"agreement": 0.5, "consistency": 0.3, "geometry": 0.2}
# Uncalibrated bounds, for a card without a calibration (models/calibration.py fits them on held-out data).
DEFAULT_LEVELS = ((0.8, "high"), (0.5, "medium"), (0.0, "low"))


def geometry_gap(predicted: np.ndarray, measured: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """[B] 10|area gap| + centroid distance (the consensus' own yardstick) on the final mask; 0 where undefined."""
    area = ATTRIBUTE_SLICES["area"]
    centroid = ATTRIBUTE_SLICES["centroid"]
    gap = 10 * np.abs(predicted[:, area] - measured[:, area])[:, 0]
    distance = np.linalg.norm(predicted[:, centroid] - measured[:, centroid], axis=-1)
    return gap + np.where(valid[:, centroid].all(-1), distance, 0.0)


def reliability(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Score and its parts, per image, from the engine's named outputs."""
    agreement = np.clip(outputs["view_agreement"], 0, 1)
    empty = ~outputs["geometry_valid"][:, ATTRIBUTE_SLICES["centroid"]].any(-1)
    predicted_area = outputs["geometry_pred"][:, ATTRIBUTE_SLICES["area"]][:, 0]
    consistency = np.where(
        empty, np.exp(-100 * predicted_area), np.exp(-5 * np.clip(outputs["view_inconsistency"], 0, None)).mean(-1)
    )
    gap = geometry_gap(outputs["geometry_pred"], outputs["geometry_mask"], outputs["geometry_valid"])
    geometry = np.exp(-5 * gap)
    score = WEIGHTS["agreement"] * agreement + WEIGHTS["consistency"] * consistency + WEIGHTS["geometry"] * geometry
    return {"score": score, "agreement": agreement, "consistency": consistency, "geometry": geometry}


def abstains(score: np.ndarray, has_mask: np.ndarray, bound: float) -> np.ndarray:
    """[B] bool: findings too weak to return (a mask, scored below the bound); empty answers never abstain."""
    return np.asarray(has_mask, bool) & (np.asarray(score, float) < bound)


def abstain_bound(block) -> float:
    """The card's ``reliability.abstain_below``; 0 (return every finding) on a card without one."""
    return float((block or {}).get("abstain_below") or 0.0)


def level(score: float, levels=DEFAULT_LEVELS) -> str:
    """The name of the first (highest) bound the score reaches; ``levels`` is [(bound, name), ...], high first."""
    return next((name for bound, name in levels if score >= bound), levels[-1][1])


def levels_from_card(block) -> tuple[tuple[float, str], ...]:
    """The card's calibrated bounds (``reliability.levels``: [{"name", "min_score"}, ...]), else the defaults."""
    if not block or not block.get("levels"):
        return DEFAULT_LEVELS
    order = {"high": 0, "medium": 1, "low": 2}  # equal bounds (an empty medium band) keep this order
    pairs = sorted(
        ((float(e["min_score"]), str(e["name"])) for e in block["levels"]), key=lambda p: (-p[0], order.get(p[1], 3))
    )
    return (*pairs[:-1], (0.0, pairs[-1][1]))
