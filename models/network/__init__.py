"""The C2P network, one part per module; ``assemble`` builds the parts from a config.

The config's layout (``C2PConfig.parts``) is handed to each part as the few flags where the reference code's
network differs from ours, so one set of parts builds both and a reference checkpoint maps onto them by name.
"""

from __future__ import annotations

from models.geometry import ATTRIBUTE_SLICES, ATTRIBUTES
from models.network.backbone import Backbone
from models.network.c2p import C2P, Segmentation
from models.network.decoder import UNetDecoder
from models.network.head import DynamicHead, GeoHeads, SemHeads
from models.network.interaction import ImageTokens, Interaction, SplitImageTokens
from models.network.tokens import ConceptTokens
from models.variants import REFERENCE_POSITION_TABLE, C2PConfig

__all__ = ["C2P", "Segmentation", "assemble"]


def assemble(config: C2PConfig) -> C2P:
    backbone = Backbone(config.backbone, weights=config.backbone_weights)
    e2, _, _, e5 = backbone.channels
    if len(ATTRIBUTES) != config.num_geo_tokens:
        raise ValueError(f"{len(ATTRIBUTES)} geometric attributes need as many GEO tokens, got {config.num_geo_tokens}")
    parts = config.parts
    dim = config.dim
    geo_widths = tuple(config.orientation_values if name == "orientation" else width for name, width in ATTRIBUTES)
    angle_column = ATTRIBUTE_SLICES["orientation"].start if config.orientation_values == 1 else None
    return C2P(
        config,
        backbone=backbone,
        tokens=ConceptTokens(
            config.num_geo_tokens,
            config.num_sem_tokens,
            config.token_dim,
            dim,
            config.geo_token_noise,
            e2,
            e5,
            scfm_widths=(e2, e5 // 2) if parts.scfm_widths_from_backbone else None,
            scfm_norm=parts.mlp_norm,
            style_eps=parts.style_eps,
        ),
        interaction=Interaction(
            SplitImageTokens(e5, dim, REFERENCE_POSITION_TABLE)
            if parts.split_positions
            else ImageTokens(e5, dim, config.grid_size),
            e5,
            dim,
            config.num_heads,
            config.num_layers,
            qkv_bias=parts.qkv_bias,
            norm_context=parts.norm_context,
            reinject_bias=parts.reinject_bias,
        ),
        decoder=UNetDecoder(backbone.channels, config.decoder_channels, parts.up_to_skip, parts.decoder_bias),
        head=DynamicHead(
            config.decoder_channels,
            dim,
            config.tgdh_heads,
            config.kernel_hidden,
            parts.qkv_bias,
            parts.mlp_norm,
            config.pooled_norm,
        ),
        geo_heads=GeoHeads(dim, config.geo_hidden, geo_widths, angle_column),
        sem_heads=SemHeads(dim, config.text_dim, config.num_sem_tokens, parts.mlp_norm),
    )
