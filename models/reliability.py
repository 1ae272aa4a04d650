"""One reliability score per image from the consensus outputs, shared by evaluation and the service.

Three signals, each in [0, 1], that should all be high when a segmentation is right:
- agreement: mean pairwise soft Dice of the three views (a model that is unsure hesitates or flips),
- consistency: mean view weight exp(-5u) (each view's mask matches its own predicted geometry); for
  an empty result, where u's centroid term is undefined, how firmly the GEO heads predict no area,
- geometry: predicted vs measured area and centroid of the final mask agree.
The score is their weighted mean; evaluation reports how well it ranks real Dice (Spearman, AUROC).
"""

from __future__ import annotations

import numpy as np

from models.attributes import ATTRIBUTE_SLICES

WEIGHTS = {"agreement": 0.5, "consistency": 0.3, "geometry": 0.2}
LEVELS = ((0.8, "high"), (0.5, "medium"), (0.0, "low"))


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
    consistency = np.where(empty, np.exp(-100 * predicted_area), np.clip(outputs["view_weights"].mean(-1), 0, 1))
    gap = geometry_gap(outputs["geometry_pred"], outputs["geometry_mask"], outputs["geometry_valid"])
    geometry = np.exp(-5 * gap)
    score = WEIGHTS["agreement"] * agreement + WEIGHTS["consistency"] * consistency + WEIGHTS["geometry"] * geometry
    return {"score": score, "agreement": agreement, "consistency": consistency, "geometry": geometry}


def level(score: float) -> str:
    return next(name for bound, name in LEVELS if score >= bound)
