"""Turn a trained checkpoint into the one this package ships: half-precision weights plus a card, and the
serving graph without its weights (models.export.strip), so a serving install needs neither torch nor an export.

Weights are stored in float16 (the 25 MB budget; float32 training and serving are unchanged since
loading copies them into float32 parameters). The card records what the model is, how it was made
(config file, command, data) and what it measured, so the numbers travel with the weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from models.cards import INTENDED_USE
from models.checkpoint import WEIGHTS_DIR, read_card, read_tensors, sha256_file
from models.export.strip import ship_graph

MAX_BYTES = 25 * 1024 * 1024


def ship(
    checkpoint: str | Path,
    evaluation: str | Path,
    provenance: dict[str, Any],
    out_dir: str | Path = WEIGHTS_DIR,
) -> Path:
    """Write ``<variant>.safetensors`` and ``<variant>.json`` into ``out_dir``; refuses oversize weights."""
    card = read_card(checkpoint)
    report = json.loads(Path(evaluation).read_text())
    variant = card["config"]["name"]
    state = {k: v.half() if v.is_floating_point() else v for k, v in read_tensors(checkpoint).items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / f"{variant}.safetensors"
    save_file(state, str(weights), metadata={"variant": variant, "dtype": "float16"})
    if weights.stat().st_size > MAX_BYTES:
        weights.unlink()
        raise ValueError(f"{variant}: {weights.stat().st_size} bytes is over the 25 MB budget for shipped weights")
    shipped = {
        "config": card["config"],
        "sha256": sha256_file(weights),
        "dtype": "float16",
        "licence": "Apache-2.0 (weights trained by this project on its own synthetic data)",
        "train": card.get("train", {}),
        "recipe": card.get("recipe"),
        "provenance": provenance,
        "evaluation": {k: v for k, v in report.items() if k != "vocabulary"},
        "intended_use": INTENDED_USE,
        # what the service reads beyond the mask (service/worker/interpret.py): fitted on calibration data by
        # c2p evaluate
        "concepts": report.get("vocabulary"),
        "reliability": report.get("calibration", {}).get("levels"),
    }
    (out / f"{variant}.json").write_text(json.dumps(shipped, indent=2, sort_keys=True) + "\n")
    ship_graph(weights)
    return weights
