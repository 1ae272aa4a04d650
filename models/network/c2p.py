"""The C2P network: assembles parts it is given (segment-anything's habit) and builds none itself."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from models.network.backbone import Backbone
from models.network.decoder import UNetDecoder
from models.network.head import DynamicHead, GeoHeads, SemHeads
from models.network.interaction import Interaction
from models.network.tokens import ConceptTokens
from models.variants import C2PConfig


class Segmentation(NamedTuple):
    fg: torch.Tensor  # [B, 1, S, S] foreground logits
    bg: torch.Tensor  # [B, 1, S, S] background logits
    geometry: torch.Tensor  # [B, 14] predicted geometry, each in [0, 1]
    concept: torch.Tensor  # [B, text_dim] the last SEM head (predicted diagnosis): what the model thinks it sees


class C2P(nn.Module):
    def __init__(
        self,
        config: C2PConfig,
        backbone: Backbone,
        tokens: ConceptTokens,
        interaction: Interaction,
        decoder: UNetDecoder,
        head: DynamicHead,
        geo_heads: GeoHeads,
        sem_heads: SemHeads,
    ) -> None:
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.tokens = tokens
        self.interaction = interaction
        self.decoder = decoder
        self.head = head
        self.geo_heads = geo_heads
        self.sem_heads = sem_heads
        # Preprocessing lives with the weights, so training, evaluation and export share one copy.
        self.register_buffer("pixel_mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(config.std).view(1, 3, 1, 1), persistent=False)

    def normalize(self, image01: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1] -> the network's input (ImageNet mean/std by default)."""
        return (image01 - self.pixel_mean) / self.pixel_std

    def _run(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        e2, e3, e4, e5 = self.backbone(image)
        tokens = self.tokens(e2, e5)
        tokens, e5 = self.interaction(tokens, e5)
        d2 = self.decoder((e2, e3, e4, e5))
        n_geo = self.tokens.num_geo
        geo_tokens, sem_tokens = tokens[:, :n_geo], tokens[:, n_geo:]
        logits = self.head(d2, geo_tokens, sem_tokens)
        align = self.config.align_corners  # the reference upsamples with align_corners=True
        logits = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=align)
        return logits, self.geo_heads(geo_tokens), sem_tokens, d2

    def segment(self, image: torch.Tensor) -> Segmentation:
        """Inference path: masks, geometry, and the diagnosis SEM head only (the concept readout compares it with
        the embedded concept names; the other eight SEM heads exist to shape training)."""
        logits, geometry, sem_tokens, _ = self._run(image)
        concept = self.sem_heads.heads[-1](sem_tokens[:, -1])
        return Segmentation(logits[:, :1], logits[:, 1:], geometry, concept)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training path: everything the C2P loss needs, SEM embeddings [B, 9, text_dim] included."""
        logits, geometry, sem_tokens, _ = self._run(image)
        return {"fg": logits[:, :1], "bg": logits[:, 1:], "geometry": geometry, "sem": self.sem_heads(sem_tokens)}
