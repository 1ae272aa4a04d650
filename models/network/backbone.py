"""ConvNeXt-V2 encoder: E2..E5 at strides 4, 8, 16, 32, from timm, never downloaded."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from models.checkpoint import read_tensors
from models.network._timm import import_timm


class Backbone(nn.Module):
    """timm ConvNeXt-V2 with ``features_only``; downstream modules read ``channels`` from here."""

    def __init__(self, name: str, weights: str | Path | None = None) -> None:
        super().__init__()
        timm = import_timm()
        self.body = timm.create_model(name, pretrained=False, features_only=True, out_indices=(0, 1, 2, 3))
        self.channels: tuple[int, ...] = tuple(self.body.feature_info.channels())
        self.reductions: tuple[int, ...] = tuple(self.body.feature_info.reduction())
        if self.reductions != (4, 8, 16, 32):
            raise ValueError(f"{name} gives features at strides {self.reductions}, C2P needs 4, 8, 16, 32")
        if weights is not None:
            self.load_classifier_weights(weights)

    def load_classifier_weights(self, path: str | Path) -> None:
        """Load a timm classifier checkpoint (ImageNet weights fetched by hand) into the feature body.

        timm's feature wrapper flattens ``stages.0`` to ``stages_0``; the classifier head is dropped.
        Loading is strict otherwise, so a checkpoint of another variant fails loudly.
        """
        state = read_tensors(path)
        renamed = {}
        for key, value in state.items():
            if key.startswith("head."):
                continue
            if key.startswith(("stem.", "stages.")):
                key = key.replace(".", "_", 1)
            renamed[key] = value
        self.body.load_state_dict(renamed, strict=True)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        return self.body(image)
