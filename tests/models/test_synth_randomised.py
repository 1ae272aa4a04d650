"""The domain-randomised tasks: wide sizes, every family and polarity, about one case in five empty."""

from __future__ import annotations

import numpy as np
import pytest

from models.data.synth import TASKS, generate_case
from models.data.synth.randomised import FAMILIES, POLARITIES

RANDOMISED = ("mr_brain_lesion", "ct_lesion", "us_lesion", "colour_lesion")


@pytest.mark.parametrize("task", RANDOMISED)
def test_negatives_are_fifteen_to_twenty_five_percent(task: str) -> None:
    empty = [generate_case(task, 0, "train", i, size=64)[2]["empty"] for i in range(40)]
    assert 0.15 <= np.mean(empty) <= 0.25
    assert TASKS[task].concept


def test_sizes_families_and_polarities_are_spread() -> None:
    areas, families, polarities = [], set(), set()
    for i in range(80):
        _, mask, meta = generate_case("ct_lesion", 3, "train", i, size=96)
        if mask.any():
            areas.append(mask.mean())
            families.add(meta["family"])
            polarities.add(meta["polarity"])
    assert min(areas) < 0.003 and max(areas) > 0.15
    assert families == set(FAMILIES) and polarities == set(POLARITIES)


def test_every_training_task_names_a_concept_and_has_twenty_percent_negatives() -> None:
    for spec in TASKS.values():
        assert spec.concept
        if spec.split == "train":
            assert spec.empty_fraction == 0.2
