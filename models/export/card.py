"""The model card that travels inside every artifact: the engine takes preprocessing from it.

Export embeds the card in the artifact (ONNX metadata ``c2p.card``, TorchScript extra file
``card.json``), so an artifact copied without its folder still says what it expects. ``card.json`` in
the export folder adds the artifacts' own digests, which cannot live inside the files they hash.
"""

from __future__ import annotations

import platform
from typing import Any

import torch

from models import consensus
from models.cards import INTENDED_USE
from models.geometry import GEOMETRY_FIELDS
from models.recipe import Recipe
from models.variants import C2PConfig

CARD_SCHEMA = 1
# What the consensus measures a view's centroid as, per rule (models.consensus, models.geometry.soft_centroid).
CENTROIDS = {"relative": "pixel centres: (x + 0.5) / W", "reference": "the reference's: x / W, x = 0..W-1"}


def output_specs(size: int, text_dim: int) -> list[dict[str, Any]]:
    shapes = {
        "prob": ["batch", 1, size, size],
        "view_weights": ["batch", consensus.NUM_VIEWS],
        "view_inconsistency": ["batch", consensus.NUM_VIEWS],
        "geometry_pred": ["batch", len(GEOMETRY_FIELDS)],
        "geometry_mask": ["batch", len(GEOMETRY_FIELDS)],
        "geometry_valid": ["batch", len(GEOMETRY_FIELDS)],
        "view_agreement": ["batch"],
        "empty_gate": ["batch"],
        "concept_embedding": ["batch", text_dim],
    }
    return [
        {"name": name, "shape": shapes[name], "dtype": "bool" if name == "geometry_valid" else "float32"}
        for name in consensus.OUTPUT_NAMES
    ]


def build_card(config: C2PConfig, weights: dict[str, Any]) -> dict[str, Any]:
    """Everything a serving process needs to feed and read the artifact, and where its weights came from."""
    size = config.input_size
    return {
        "schema": CARD_SCHEMA,
        "variant": config.name,
        "config": config.to_dict(),
        "input": {
            "name": "image",
            "shape": ["batch", 3, size, size],
            "dtype": "float32",
            "layout": "NCHW",
            "channels": "RGB",
            "size": size,
            "scale": "the recipe's [0, 1] values, then (x - mean) / std",
            # Weights without a recipe (from before recipes, or imported from the reference code) were trained on
            # stretched slices: version 1.
            "recipe": Recipe.from_card(weights.get("recipe")).to_card(),
            "mean": list(config.mean),
            "std": list(config.std),
        },
        "outputs": output_specs(size, config.text_dim),
        "geometry_fields": list(GEOMETRY_FIELDS),
        "consensus": {
            "views": list(consensus.VIEWS),
            "area_weight": consensus.AREA_WEIGHT,
            "weight_sharpness": consensus.WEIGHT_SHARPNESS,
            "empty_area": consensus.EMPTY_AREA,
            "empty_mean_prob": consensus.EMPTY_MEAN_PROB,
            "threshold": consensus.THRESHOLD,
            "weighting": config.consensus,
            "centroid": CENTROIDS[config.consensus],
        },
        # How the network's parts are laid out ("reference": an imported Yundi218/Concept-to-Pixel checkpoint).
        "layout": config.layout,
        "weights": weights,
        # What the result says beyond its mask (service/worker/interpret.py): absent blocks get documented fallbacks.
        "intended_use": weights.get("intended_use") or INTENDED_USE,
        "concepts": weights.get("concepts"),
        "reliability": weights.get("reliability"),
        "exported_with": {"torch": torch.__version__, "python": platform.python_version()},
    }
