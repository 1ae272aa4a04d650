"""The C2P network, one part per module; ``assemble`` builds the parts from a config."""

from __future__ import annotations

from models.geometry import ATTRIBUTES
from models.network.backbone import Backbone
from models.network.c2p import C2P, Segmentation
from models.network.decoder import UNetDecoder
from models.network.head import DynamicHead, GeoHeads, SemHeads
from models.network.interaction import Interaction
from models.network.tokens import ConceptTokens
from models.variants import C2PConfig

__all__ = ["C2P", "Segmentation", "assemble"]


def assemble(config: C2PConfig) -> C2P:
    backbone = Backbone(config.backbone, weights=config.backbone_weights)
    e2, _, _, e5 = backbone.channels
    if len(ATTRIBUTES) != config.num_geo_tokens:
        raise ValueError(f"{len(ATTRIBUTES)} geometric attributes need as many GEO tokens, got {config.num_geo_tokens}")
    return C2P(
        config,
        backbone=backbone,
        tokens=ConceptTokens(
            config.num_geo_tokens,
            config.num_sem_tokens,
            config.token_dim,
            config.dim,
            config.geo_token_noise,
            e2,
            e5,
        ),
        interaction=Interaction(e5, config.dim, config.grid_size, config.num_heads, config.num_layers),
        decoder=UNetDecoder(backbone.channels, config.decoder_channels),
        head=DynamicHead(config.decoder_channels, config.dim, config.num_heads, config.kernel_hidden),
        geo_heads=GeoHeads(config.dim, config.geo_hidden, tuple(width for _, width in ATTRIBUTES)),
        sem_heads=SemHeads(config.dim, config.text_dim, config.num_sem_tokens),
    )
