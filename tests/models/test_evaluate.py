from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models.checkpoint import save_checkpoint
from models.evaluate.metrics import auroc, dice_iou, spearman
from models.registry import get_config
from models.reliability import level, reliability
from service.cli import main
from tests.conftest import seeded_network
from tests.models.test_train import write_nnunet


def test_dice_and_iou_by_hand() -> None:
    gt = np.zeros((3, 4, 4), bool)
    pred = np.zeros((3, 4, 4), bool)
    gt[0, :2], pred[0, :1] = True, True  # 8 vs 4 pixels, 4 shared: Dice 8/12, IoU 4/8
    gt[1, 0, 0] = True  # missed entirely: 0, 0
    # image 2: both empty -> 1, 1
    dice, iou = dice_iou(pred, gt)
    np.testing.assert_allclose(dice, [8 / 12, 0, 1])
    np.testing.assert_allclose(iou, [0.5, 0, 1])


def test_spearman_by_hand() -> None:
    assert spearman(np.array([1, 2, 3, 4]), np.array([10, 20, 30, 40])) == pytest.approx(1.0)
    assert spearman(np.array([1, 2, 3, 4]), np.array([4, 3, 2, 1])) == pytest.approx(-1.0)
    # ranks (1, 2, 3) vs (1.5, 1.5, 3): r = 0.866
    assert spearman(np.array([1, 2, 3]), np.array([5, 5, 9])) == pytest.approx(np.sqrt(3) / 2)
    assert np.isnan(spearman(np.array([1, 1, 1]), np.array([1, 2, 3])))


def test_auroc_by_hand() -> None:
    assert auroc(np.array([0.9, 0.8, 0.1, 0.2]), np.array([1, 1, 0, 0])) == pytest.approx(1.0)
    assert auroc(np.array([0.1, 0.2, 0.9, 0.8]), np.array([1, 1, 0, 0])) == pytest.approx(0.0)
    # one positive (0.5) against negatives 0.4, 0.6: beats one of two -> 0.5; a tie counts half
    assert auroc(np.array([0.5, 0.4, 0.6]), np.array([1, 0, 0])) == pytest.approx(0.5)
    assert auroc(np.array([0.5, 0.5]), np.array([1, 0])) == pytest.approx(0.5)
    assert np.isnan(auroc(np.array([0.5]), np.array([1])))


def test_reliability_score_by_hand() -> None:
    geometry = np.full((1, 14), 0.5, np.float32)
    outputs = {
        "view_agreement": np.array([0.8]),
        "view_weights": np.array([[1.0, 1.0, 1.0]]),  # fusion weights (relative): not what consistency reads
        "view_inconsistency": -np.log(np.array([[1.0, 0.5, 0.6]])) / 5,  # exp(-5u) = 1, 0.5, 0.6
        "geometry_pred": geometry,
        "geometry_mask": geometry,
        "geometry_valid": np.ones((1, 14), bool),
    }
    parts = reliability(outputs)
    assert parts["score"][0] == pytest.approx(0.5 * 0.8 + 0.3 * 0.7 + 0.2 * 1.0)
    assert level(0.85) == "high" and level(0.6) == "medium" and level(0.1) == "low"


def test_empty_result_is_judged_by_the_predicted_area() -> None:
    geometry = np.zeros((2, 14), np.float32)
    geometry[1, 4] = 0.05  # the GEO heads expected 5% of the image: an empty mask is then doubtful
    outputs = {
        "view_agreement": np.array([1.0, 1.0]),
        "view_weights": np.full((2, 3), 1.0),
        "view_inconsistency": np.full((2, 3), 0.9),  # u's centroid term is undefined for empty masks
        "geometry_pred": geometry,
        "geometry_mask": np.zeros((2, 14), np.float32),
        "geometry_valid": np.zeros((2, 14), bool),
    }
    parts = reliability(outputs)
    assert parts["consistency"][0] == pytest.approx(1.0)
    assert parts["consistency"][1] == pytest.approx(np.exp(-5))
    assert parts["score"][0] > 0.9 > parts["score"][1]


def test_evaluate_writes_results_and_a_report(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_nnunet(data, "Dataset001_Blobs", 2, 6, seed=3)
    zero = write_nnunet(data, "Dataset201_Zero", 0, 5, seed=4)
    meta = json.loads((zero / "dataset.json").read_text())
    meta["c2p"]["split"] = "zero-shot"
    (zero / "dataset.json").write_text(json.dumps(meta))
    checkpoint = save_checkpoint(seeded_network(), tmp_path / "m.safetensors", get_config("c2p-test-64"))
    out = tmp_path / "eval.json"
    args = [
        "evaluate",
        "--model",
        str(checkpoint),
        "--data",
        str(data),
        "--json",
        str(out),
        "--report",
        str(tmp_path / "r"),
    ]
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert report["datasets"]["Dataset001_Blobs"]["images"] == 6
    assert report["datasets"]["Dataset201_Zero"]["split"] == "zero-shot"
    summary = report["summary"]
    assert 0 <= summary["in_domain_mean_dice"] <= 1 and summary["zero_shot_mean_dice"] is not None
    assert summary["reliability"]["images"] == 11
    for name in ("report.md", "reliability.png", "gallery.png"):
        assert (tmp_path / "r" / name).stat().st_size > 0


def test_evaluate_aspect_scores_stretch_and_letterbox_on_the_same_crops(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_nnunet(data, "Dataset001_Blobs", 0, 3, seed=5)
    checkpoint = save_checkpoint(seeded_network(), tmp_path / "m.safetensors", get_config("c2p-test-64"))
    out = tmp_path / "aspect.json"
    assert main(["evaluate", "--aspect", "--model", str(checkpoint), "--data", str(data), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    blobs = report["datasets"]["Dataset001_Blobs"]
    assert blobs["crops"] == 6  # three cases, one wide and one tall crop each
    assert 0 <= blobs["stretch_dice"] <= 1 and 0 <= blobs["letterbox_dice"] <= 1
    summary = report["summary"]["in-domain"]
    assert summary["letterbox_minus_stretch"] == pytest.approx(summary["letterbox_dice"] - summary["stretch_dice"])
    assert report["card_recipe"] == "stretch-bilinear-antialiased"  # a card without a recipe: version 1


def test_a_crop_keeps_the_target_and_the_long_side() -> None:
    from models.evaluate.aspect import crop

    image = np.zeros((100, 100, 3), np.float32)
    mask = np.zeros((100, 100), np.uint8)
    mask[80:90, 5:15] = 1
    wide_image, wide = crop(image, mask, 2.0)
    _, tall = crop(image, mask, 0.5)
    assert wide.shape == (50, 100) and tall.shape == (100, 50) and wide_image.shape == (50, 100, 3)
    assert wide.sum() == tall.sum() == mask.sum()
