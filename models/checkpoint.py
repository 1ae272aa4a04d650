"""Checkpoints: weights in safetensors, the config and provenance in a JSON card beside them.

Loading never unpickles: safetensors, or torch.load(weights_only=True) for timm's .pth files; the
state dict is loaded strictly on the CPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from models.files import sha256_file
from models.registry import VARIANTS, C2PConfig

WEIGHTS_DIR = Path(__file__).parent / "weights"


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a flat tensor state dict")
    return state


def card_path(weights: str | Path) -> Path:
    return Path(weights).with_suffix(".json")


def save_checkpoint(model: nn.Module, path: str | Path, config: C2PConfig, card: dict[str, Any] | None = None) -> Path:
    """Write ``path`` (.safetensors) and its card (.json): config, provenance, and the weights' sha256."""
    path = Path(path).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"variant": config.name})
    full = {**(card or {}), "config": config.to_dict(), "sha256": sha256_file(path)}
    card_path(path).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    return path


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
