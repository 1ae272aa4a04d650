"""What the model says it segmented: its concept vocabulary, their codes, and the readout.

C2P is prompt-free, so the reader of a result must learn from the result what was segmented. Training pulls the
diagnosis SEM head of every image with a target to the sentence embedding of that task's concept name (and of
every image without one to ``NO_FINDING``); at ship time the names are embedded with the same packaged encoder
and stored in the card; the exported graph outputs the head's embedding fused over the views; serving picks the
nearest name by cosine similarity and says ``unknown`` below a threshold calibrated on held-out data.

Codes come from pydicom's SNOMED CT dictionary by name (``codes.SCT.<Name>``), never typed by hand, so a code
that does not exist fails here, at import, not in a hospital's viewer. numpy and pydicom only: the service
imports this module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.sr.codedict import codes

__all__ = ["CONCEPT_CODES", "NO_FINDING", "UNKNOWN", "Concept", "Readout", "code_of", "read_out", "vocabulary_card"]

NO_FINDING = "no finding"
UNKNOWN = "unknown"

# concept name -> (segmented property category, segmented property type), by pydicom's SCT attribute names.
CONCEPT_CODES: dict[str, tuple[str, str]] = {
    "brain lesion on MR": ("MorphologicallyAbnormalStructure", "LesionOfBrain"),
    "lesion on CT": ("MorphologicallyAbnormalStructure", "Lesion"),
    "lung infection on CT": ("MorphologicallyAbnormalStructure", "InfectiousDisease"),
    "thyroid nodule on ultrasound": ("MorphologicallyAbnormalStructure", "ThyroidNodule"),
    "breast lesion on ultrasound": ("MorphologicallyAbnormalStructure", "Lesion"),
    "lesion on ultrasound": ("MorphologicallyAbnormalStructure", "Lesion"),
    "polyp in colonoscopy": ("MorphologicallyAbnormalStructure", "PolypOfColon"),
    "skin lesion in dermoscopy": ("MorphologicallyAbnormalStructure", "SkinLesion"),
    "retinal lesion on OCT": ("MorphologicallyAbnormalStructure", "Lesion"),
    "lesion in a colour image": ("MorphologicallyAbnormalStructure", "Lesion"),
    "glands in histology": ("Tissue", "Tissue"),
    "lung fields on chest X-ray": ("AnatomicalStructure", "Lung"),
}
# The documented fallback for a mask whose concept the model cannot name: the generic tissue code.
GENERIC = ("Tissue", "Tissue")


def _code(name: str) -> dict[str, str]:
    code = getattr(codes.SCT, name)
    return {"scheme": code.scheme_designator, "value": str(code.value), "meaning": str(code.meaning)}


def code_of(concept: str) -> dict[str, dict[str, str]]:
    """{category, type} codes of a concept name (the generic tissue code for unknown or unlisted names)."""
    category, kind = CONCEPT_CODES.get(concept, GENERIC)
    return {"category": _code(category), "type": _code(kind)}


for _name in CONCEPT_CODES:  # every listed code must exist in pydicom's dictionary: fail at import, not later
    code_of(_name)


@dataclass(frozen=True)
class Concept:
    name: str
    embedding: np.ndarray  # [text_dim] unit length


@dataclass(frozen=True)
class Readout:
    name: str  # a vocabulary name, NO_FINDING, or UNKNOWN
    similarity: float  # cosine to the nearest name
    code: dict[str, str]  # the segmented property type (scheme, value, meaning)
    category: dict[str, str]


def vocabulary_card(names: Sequence[str], embeddings: np.ndarray, threshold: float, encoder: str) -> dict[str, Any]:
    """What the card stores: names, their embeddings (rounded: 4 decimals are far below what separates them), the
    calibrated threshold and the encoder that made them."""
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    return {
        "encoder": encoder,
        "threshold": round(float(threshold), 4),
        "vocabulary": [
            {"name": n, "embedding": [round(float(v), 4) for v in e]} for n, e in zip(names, unit, strict=True)
        ],
    }


def load_vocabulary(block: Mapping[str, Any]) -> tuple[list[Concept], float]:
    concepts = []
    for entry in block["vocabulary"]:
        vector = np.asarray(entry["embedding"], np.float32)
        concepts.append(Concept(str(entry["name"]), vector / max(float(np.linalg.norm(vector)), 1e-6)))
    return concepts, float(block["threshold"])


def read_out(embedding: np.ndarray, concepts: Sequence[Concept], threshold: float, empty: bool) -> Readout:
    """The nearest concept to a fused embedding. An empty mask is "no finding" whatever the head says; a
    non-empty one never is (the nearest target concept is taken), and below the threshold it is unknown."""
    vector = np.asarray(embedding, np.float32)
    vector = vector / max(float(np.linalg.norm(vector)), 1e-6)
    if empty:
        return _readout(NO_FINDING, 1.0)
    targets = [c for c in concepts if c.name != NO_FINDING]
    if not targets:
        return _readout(UNKNOWN, 0.0)
    similarities = np.array([float(vector @ c.embedding) for c in targets])
    best = int(similarities.argmax())
    similarity = round(float(similarities[best]), 4)
    return _readout(targets[best].name if similarity >= threshold else UNKNOWN, similarity)


def _readout(name: str, similarity: float) -> Readout:
    codes_ = code_of(name)
    return Readout(name=name, similarity=similarity, code=codes_["type"], category=codes_["category"])
