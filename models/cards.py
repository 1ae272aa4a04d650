"""Checkpoint cards and model names resolved to files, without torch.

A serving install has no torch; it still has to turn ``C2P_MODEL`` into a config, a weights file and
the card that vouches for them (and find the shipped ONNX graph beside them), so that part lives here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from models.files import WEIGHTS_DIR, sha256_file
from models.variants import VARIANTS, C2PConfig

# What every model of this project is for, said in every result and DICOM SEG; a card may say more, never less.
INTENDED_USE = (
    "RESEARCH USE ONLY. Not a medical device; not for diagnosis, treatment or any clinical decision. Trained on "
    "synthetic data and packaged anatomy, not on patients; every mask needs review by a qualified reader."
)


def card_path(weights: str | Path) -> Path:
    return Path(weights).with_suffix(".json")


def read_card(weights: str | Path) -> dict[str, Any]:
    """The card beside a checkpoint; its recorded sha256 must match the weights on disk."""
    cpath = card_path(weights)
    if not cpath.is_file():
        raise FileNotFoundError(f"checkpoint card not found: {cpath} (a checkpoint is NAME.safetensors + NAME.json)")
    card = json.loads(cpath.read_text())
    if "config" not in card:
        raise ValueError(f"{cpath} has no 'config'")
    recorded = card.get("sha256")
    if recorded and recorded != sha256_file(weights):
        raise ValueError(f"{weights} does not match the sha256 recorded in {cpath}: the file changed or is corrupt")
    return card


def shipped_checkpoint(variant: str) -> Path | None:
    """The weights this package ships for a variant, if any (models/weights/<variant>.safetensors)."""
    path = WEIGHTS_DIR / f"{variant}.safetensors"
    return path if path.is_file() else None


def resolve(name_or_path: str) -> tuple[C2PConfig, Path | None, dict[str, Any]]:
    """A variant name (with its shipped weights when there are any) or a checkpoint path.

    Returns the config, the weights path (None means freshly initialised) and the card.
    """
    path = Path(name_or_path)
    if name_or_path in VARIANTS:
        weights = shipped_checkpoint(name_or_path)
        if weights is None:
            return VARIANTS[name_or_path], None, {"weights": "random-init"}
        card = read_card(weights)
        return C2PConfig.from_dict(card["config"]), weights, card
    if path.suffix in (".safetensors", ".json") and (path.with_suffix(".safetensors")).is_file():
        weights = path.with_suffix(".safetensors")
        card = read_card(weights)
        return C2PConfig.from_dict(card["config"]), weights, card
    raise ValueError(
        f"{name_or_path!r} is neither a known variant ({', '.join(sorted(VARIANTS))}) "
        "nor a checkpoint (NAME.safetensors with NAME.json beside it)"
    )
