"""Levels and the concept threshold keep their promises on the data they were fitted to, and come from it."""

from __future__ import annotations

import numpy as np

from models.concepts import CONCEPT_CODES, NO_FINDING, UNKNOWN, code_of, load_vocabulary, read_out, vocabulary_card
from models.evaluate.calibration import fit_abstention, fit_concept_threshold, fit_levels, kept_promises, level_of
from models.reliability import abstain_bound, abstains, level, levels_from_card


def calibration_pairs(seed: int, shift: float = 0.0, n: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    score = rng.random(n)
    dice = np.clip(score + shift + rng.normal(0, 0.1, n), 0, 1)
    return score, dice


def test_levels_keep_their_promises_on_the_calibration_data() -> None:
    score, dice = calibration_pairs(0)
    levels = fit_levels(score, dice)
    named = level_of(score, levels)
    assert (dice[named == "high"] >= 0.8).mean() >= 0.9
    assert (dice[named == "low"] < 0.5).mean() >= 0.5
    kept = kept_promises(*calibration_pairs(1), levels)  # and on other data drawn the same way
    assert kept["high"]["share_dice_at_least_0.8"] >= 0.9 and kept["low"]["share_dice_below_0.5"] > 0.5


def test_the_high_bound_asks_the_share_s_confidence_bound_not_the_share() -> None:
    """Fitted where the calibration share merely reaches 90 %, fresh data lands on either side of the promise; the
    bound asks the share's one-sided 95 % lower confidence bound to reach it, so it sits higher."""
    from models.evaluate import calibration

    assert calibration.wilson_lower(90, 100) < 0.9 < calibration.wilson_lower(97, 100)
    assert calibration.wilson_lower(0, 0) == 0.0 and calibration.wilson_lower(10, 10) < 0.9  # 10 of 10 is not proof
    score, dice = calibration_pairs(4)
    high = fit_levels(score, dice)["levels"][0]["min_score"]
    plain = min(
        s for s in np.unique(np.round(score, 4)) if (score >= s).sum() >= 10 and (dice[score >= s] >= 0.8).mean() >= 0.9
    )
    assert high > plain
    above = score >= high
    assert calibration.wilson_lower(int((dice[above] >= 0.8).sum()), int(above.sum())) >= 0.9


def test_the_bounds_follow_the_calibration_data_not_constants() -> None:
    easy = fit_levels(*calibration_pairs(0, shift=0.15))
    hard = fit_levels(*calibration_pairs(0, shift=-0.15))
    bound = {e["name"]: e["min_score"] for e in easy["levels"]}, {e["name"]: e["min_score"] for e in hard["levels"]}
    assert bound[0]["high"] < bound[1]["high"] and bound[0]["medium"] < bound[1]["medium"]
    card_levels = levels_from_card(easy)
    assert level(bound[0]["high"], card_levels) == "high" and level(0.0, card_levels) == "low"


def test_a_score_that_never_keeps_the_promise_calls_nothing_high() -> None:
    rng = np.random.default_rng(3)
    levels = fit_levels(rng.random(200), rng.random(200) * 0.7)  # Dice never reaches 0.8 for 90 %
    assert level_of(np.array([1.0]), levels)[0] != "high"


def test_abstention_drops_the_weak_findings_that_cost_more_than_they_bring() -> None:
    """Healthy images where the model paints a weak false finding (score ~0.3, Dice 0), lesions found well
    (score ~0.8, Dice ~0.85) and a few found badly (score 0.3-0.4, Dice 0.3): the bound lands just above the
    false findings, as emptying each gains 1 and each weak true one dropped with them loses only 0.3."""
    rng = np.random.default_rng(0)
    healthy = 60
    score = np.r_[rng.uniform(0.2, 0.38, healthy), rng.uniform(0.65, 0.95, 120), rng.uniform(0.3, 0.4, 20)]
    dice = np.r_[np.zeros(healthy), rng.uniform(0.75, 0.95, 120), np.full(20, 0.3)]
    empty_true = np.r_[np.ones(healthy, bool), np.zeros(140, bool)]
    has_mask = np.ones(200, bool)
    bound = fit_abstention(score, dice, has_mask, empty_true)
    assert score[:healthy].max() < bound < 0.4
    assert abstains(score, has_mask, bound)[:healthy].all() and not abstains(score, has_mask, bound)[60:180].any()
    # where every finding is worth returning (no false findings), nothing is dropped
    assert fit_abstention(score[healthy:], dice[healthy:], has_mask[healthy:], empty_true[healthy:]) == 0.0
    # an empty answer is never an abstention, and a card without a bound keeps every finding
    assert not abstains(np.array([0.0]), np.array([False]), 0.9).any()
    assert abstain_bound(None) == 0.0 and abstain_bound({"abstain_below": 0.41}) == 0.41


def test_concept_threshold_and_readout() -> None:
    rng = np.random.default_rng(0)
    similarity = rng.random(300)
    correct = rng.random(300) < similarity  # the more similar, the more often right
    threshold = fit_concept_threshold(similarity, correct)
    assert correct[similarity >= threshold].mean() >= 0.9 and 0 < threshold < 1
    names = ["lesion on CT", "polyp in colonoscopy", NO_FINDING]
    concepts, stored = load_vocabulary(vocabulary_card(names, np.eye(3, 8), 0.6, "enc"))
    assert stored == 0.6 and [c.name for c in concepts] == names
    assert read_out(np.eye(1, 8, 1)[0], concepts, 0.6, empty=False).name == "polyp in colonoscopy"
    assert read_out(np.ones(8), concepts, 0.6, empty=False).name == UNKNOWN
    assert read_out(np.eye(1, 8, 2)[0], concepts, 0.6, empty=False).name != NO_FINDING  # a mask is never "nothing"


def test_every_listed_concept_has_a_real_snomed_code() -> None:
    for name in CONCEPT_CODES:
        codes = code_of(name)
        assert codes["type"]["scheme"] == "SCT" and codes["type"]["value"].isdigit()
    assert code_of(UNKNOWN)["type"]["meaning"] == "Tissue"


def test_the_shipped_card_carries_levels_and_threshold_fitted_on_calibration_data() -> None:
    import json

    from models.data.synth import TASKS
    from models.files import WEIGHTS_DIR

    card = json.loads((WEIGHTS_DIR / "c2p-femto-192.json").read_text())
    calibration = card["evaluation"]["calibration"]
    assert calibration["data"].rstrip("/").endswith("calib")  # c2p data synth --seed 1, not the test split
    assert card["reliability"] == calibration["levels"] and card["reliability"]["calibration_images"] >= 400
    assert card["reliability"]["abstain_below"] == calibration["abstain_below"] > 0
    assert card["concepts"]["threshold"] == calibration["concept_threshold"]
    trained = {spec.concept for spec in TASKS.values() if spec.split == "train"}
    assert {entry["name"] for entry in card["concepts"]["vocabulary"]} == trained | {NO_FINDING}
    high = calibration["levels"]["on_test"]["high"]
    assert high["images"] > 0 and high["share_dice_at_least_0.8"] >= 0.9  # the promise, kept on the test split
    assert card["intended_use"].startswith("RESEARCH USE ONLY")
