"""Reliability levels and the concept threshold, fitted on calibration data and judged on the test data.

A level is only worth printing if it promises something. So the bounds are chosen on a calibration set (the
generator with another seed: never the test split) to keep these promises, and ``c2p evaluate`` reports how
well the test split kept them:

- **high**: Dice >= 0.8 for at least 90 % of the images scored high. The bound is the lowest score above which the
  calibration share's one-sided 95 % lower confidence bound (Wilson) reaches 90 %, not the share itself: a bound
  fitted where 600 images reach exactly 90 % lands on either side of it on fresh data (the shipped model's first
  letterbox card kept 89.2 % on its test split that way), and a promise should hold on data not yet seen;
- **low**: Dice < 0.5 for most (at least half) of the images scored low, the bound sitting where failures stop
  being the likelier outcome (not merely wherever the share below happens to reach one half);
- **medium**: the rest.

The abstention bound is the score below which a finding is better not returned: the one that maximises the mean
Dice of the calibration images when every finding below it becomes an empty answer (Dice 1 where nothing was
there, 0 where something was). Ties keep the lowest bound (return as much as the data allows).

The concept threshold is the lowest cosine similarity at which at least 90 % of the named calibration images
are named right; below it the service says "unknown". Pure numpy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

HIGH_DICE, HIGH_SHARE = 0.8, 0.9
CONFIDENCE_Z = 1.645  # one-sided 95 %
LOW_DICE, LOW_SHARE = 0.5, 0.5
MIN_IMAGES = 10  # a bound needs at least this many calibration images above (or below) it
CONCEPT_PRECISION = 0.9


def wilson_lower(successes: int, n: int, z: float = CONFIDENCE_Z) -> float:
    """The Wilson score interval's lower end for a share of ``successes`` in ``n`` (0 when n is 0)."""
    if n == 0:
        return 0.0
    share = successes / n
    centre = share + z * z / (2 * n)
    spread = z * np.sqrt(share * (1 - share) / n + z * z / (4 * n * n))
    return float((centre - spread) / (1 + z * z / n))


def fit_levels(score: np.ndarray, dice: np.ndarray) -> dict[str, Any]:
    """Bounds on the score that keep the module's promises on (score, dice) calibration pairs."""
    score, dice = np.asarray(score, float), np.asarray(dice, float)
    candidates = np.unique(np.round(score, 4))
    high = next(
        (
            float(s)
            for s in candidates
            if (score >= s).sum() >= MIN_IMAGES
            and wilson_lower(int((dice[score >= s] >= HIGH_DICE).sum()), int((score >= s).sum())) >= HIGH_SHARE
        ),
        None,
    )
    low = _low_bound(score, dice)
    high = 1.01 if high is None else high  # no score keeps the promise: nothing is called high
    low = 0.0 if low is None else min(round(low, 4), high)
    return {
        "levels": [
            {"name": "high", "min_score": round(high, 4), "promise": f"Dice >= {HIGH_DICE} for >= {HIGH_SHARE:.0%}"},
            {"name": "medium", "min_score": round(low, 4), "promise": "between high and low"},
            {"name": "low", "min_score": 0.0, "promise": f"Dice < {LOW_DICE} for most (>= {LOW_SHARE:.0%})"},
        ],
        "calibration_images": len(score),
    }


def _low_bound(score: np.ndarray, dice: np.ndarray) -> float | None:
    """Where failures stop being the likelier outcome: the top of the highest run of calibration images (sorted by
    score, a tenth of them at a time) in which most failed, moved down until most of everything below failed."""
    order = np.argsort(score, kind="mergesort")
    ranked, failed = score[order], dice[order] < LOW_DICE
    width = max(MIN_IMAGES, len(score) // 10)
    if len(score) < width:
        return None
    local = np.convolve(failed.astype(float), np.ones(width) / width, mode="valid")  # run starting at each rank
    for start in np.flatnonzero(local >= LOW_SHARE)[::-1]:
        bound = float(ranked[start + width - 1])
        below = score < bound
        if below.sum() >= MIN_IMAGES and (dice[below] < LOW_DICE).mean() >= LOW_SHARE:
            return bound
    return None


def fit_abstention(score: np.ndarray, dice: np.ndarray, has_mask: np.ndarray, empty_true: np.ndarray) -> float:
    """The bound on the score below which findings are dropped (module docstring); 0 keeps every finding."""
    score, dice = np.asarray(score, float), np.asarray(dice, float)
    has_mask, empty_true = np.asarray(has_mask, bool), np.asarray(empty_true, bool)
    best, best_dice = 0.0, float(dice.mean()) if len(dice) else 0.0
    for bound in np.unique(np.round(score[has_mask], 4)):
        bound = float(bound) + 1e-4  # drop the findings scored at this value too
        dropped = has_mask & (score < bound)
        mean = float(np.where(dropped, empty_true.astype(float), dice).mean())
        if mean > best_dice + 1e-9:
            best, best_dice = round(bound, 4), mean
    return best


def level_of(score: np.ndarray, levels: dict[str, Any]) -> np.ndarray:
    bounds = {e["name"]: e["min_score"] for e in levels["levels"]}
    return np.where(score >= bounds["high"], "high", np.where(score >= bounds["medium"], "medium", "low"))


def kept_promises(score: np.ndarray, dice: np.ndarray, levels: dict[str, Any]) -> dict[str, Any]:
    """What each level delivered on other data (the test split)."""
    named = level_of(np.asarray(score, float), levels)
    dice = np.asarray(dice, float)
    out: dict[str, Any] = {}
    for name in ("high", "medium", "low"):
        rows = named == name
        out[name] = {
            "images": int(rows.sum()),
            "share_dice_at_least_0.8": float((dice[rows] >= HIGH_DICE).mean()) if rows.any() else None,
            "share_dice_below_0.5": float((dice[rows] < LOW_DICE).mean()) if rows.any() else None,
        }
    return out


def fit_concept_threshold(similarity: np.ndarray, correct: np.ndarray) -> float:
    """The lowest similarity above which at least CONCEPT_PRECISION of the named images are named right."""
    similarity, correct = np.asarray(similarity, float), np.asarray(correct, bool)
    for s in np.unique(np.round(similarity, 4)):
        kept = similarity >= s
        if kept.sum() >= MIN_IMAGES and correct[kept].mean() >= CONCEPT_PRECISION:
            return float(s)
    return 1.0  # never precise enough: every concept reads "unknown"
