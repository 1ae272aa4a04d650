"""What a result says beyond its mask, read from the model's card: the concept, the calibrated level, the use.

A prompt-free model's result must carry its own meaning. The card (models/export/card.py) brings the concept
vocabulary with its calibrated threshold, the reliability and abstention bounds fitted on calibration data, and
the intended use; a card written before any of them gets the documented fallbacks (concept ``unknown`` for any mask, the
uncalibrated bounds, the default intended use), never an invented figure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from models.cards import INTENDED_USE
from models.concepts import Readout, load_vocabulary, read_out
from models.reliability import abstain_bound, levels_from_card
from service.schema import Code, ConceptInfo
from service.worker.report import SliceOutputs, fused_concept


class CardReadout:
    def __init__(self, card: Mapping[str, Any]) -> None:
        block = card.get("concepts")
        self.concepts, self.threshold = load_vocabulary(block) if block else ([], 1.0)
        self.levels = levels_from_card(card.get("reliability"))
        self.abstain_below = abstain_bound(card.get("reliability"))
        self.intended_use = str(card.get("intended_use") or INTENDED_USE)

    def concept(self, outputs: Sequence[SliceOutputs], areas: Sequence[int]) -> ConceptInfo:
        """The result's concept: from the slices that carry the mask (area-weighted); 'no finding' if none."""
        empty = not any(a > 0 for a in areas)
        embedding = fused_concept(outputs, areas)
        if embedding is None:  # nothing to read: an empty mask, or a graph exported without the concept output
            return to_schema(read_out(np.zeros(1, np.float32), [], self.threshold, empty))
        return to_schema(read_out(embedding, self.concepts, self.threshold, empty))


def to_schema(readout: Readout) -> ConceptInfo:
    return ConceptInfo(
        name=readout.name,
        code=Code(**readout.code),
        category=Code(**readout.category),
        similarity=readout.similarity,
    )
