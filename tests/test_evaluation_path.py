"""The card's figures are the service's: the benchmark through the service's own path scores as PyTorch does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.data.synth import write_benchmark
from models.evaluate import evaluate
from service.evaluation import evaluate_through_service

pytestmark = pytest.mark.slow
TASKS = ("ct_lesion", "mr_brain_lesion", "thyroid_us_nodule")


def test_the_service_path_scores_within_two_points_of_the_card_path(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("C2P_CACHE_DIR", str(tmp_path / "cache"))
    data = tmp_path / "data"
    write_benchmark(data, seed=7, n_train=0, n_test=6, tasks=TASKS)
    card_path = evaluate("c2p-femto-192", data, tmp_path / "eval.json", cache_dir=tmp_path / "cache")
    service_path = evaluate_through_service("c2p-femto-192", data, tmp_path / "service.json")
    for name, figures in service_path["datasets"].items():
        torch_dice = card_path["datasets"][name]["dice"]
        for route, dice in figures["dice"].items():  # NIfTI and DICOM for CT, NIfTI for MR, PNG for pictures
            assert abs(dice - torch_dice) <= 0.02, (name, route, dice, torch_dice)
    means = [np.mean(list(f["dice"].values())) for f in service_path["datasets"].values()]
    torch_means = [card_path["datasets"][n]["dice"] for n in service_path["datasets"]]
    assert abs(np.mean(means) - np.mean(torch_means)) <= 0.02
