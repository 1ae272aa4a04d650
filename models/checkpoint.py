"""Checkpoints: weights in safetensors, the config and provenance in a JSON card beside them (models.cards).

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

# Re-exported: callers that already need torch keep importing the whole checkpoint API from here.
from models.cards import card_path, read_card, resolve, shipped_checkpoint
from models.files import WEIGHTS_DIR, sha256_file
from models.variants import C2PConfig

__all__ = [
    "WEIGHTS_DIR",
    "card_path",
    "read_card",
    "read_tensors",
    "resolve",
    "save_checkpoint",
    "sha256_file",
    "shipped_checkpoint",
]


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


def save_checkpoint(model: nn.Module, path: str | Path, config: C2PConfig, card: dict[str, Any] | None = None) -> Path:
    """Write ``path`` (.safetensors) and its card (.json): config, provenance, and the weights' sha256."""
    path = Path(path).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"variant": config.name})
    full = {**(card or {}), "config": config.to_dict(), "sha256": sha256_file(path)}
    card_path(path).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    return path
