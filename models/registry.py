"""C2P variants, and the one way to build them: ``build_c2p`` assembles a network from a variant (models.network)
and loads its checkpoint (models.checkpoint).

The configs themselves live in models.variants and are re-exported here. This module stays importable without
torch (a serving install reads ``DEFAULT_VARIANT`` from here), so ``build_c2p`` imports the network and checkpoint
code when it is called; neither of them imports this module, so that is no import cycle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from models.variants import (
    DECODER_CHANNELS,
    DEFAULT_VARIANT,
    IMAGENET_MEAN,
    IMAGENET_STD,
    KERNEL_HIDDEN,
    KERNEL_SIZE,
    VARIANTS,
    C2PConfig,
    get_config,
)

__all__ = [
    "DECODER_CHANNELS",
    "DEFAULT_VARIANT",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "KERNEL_HIDDEN",
    "KERNEL_SIZE",
    "VARIANTS",
    "C2PConfig",
    "build_c2p",
    "get_config",
]


def build_c2p(name_or_config: str | C2PConfig, checkpoint: str | Path | None = None, **overrides: Any):
    """Build a C2P network from a variant name or config, optionally loading a checkpoint (strict)."""
    from models.network import assemble

    config = name_or_config if isinstance(name_or_config, C2PConfig) else get_config(name_or_config, **overrides)
    model = assemble(config)
    if checkpoint is not None:
        from models.checkpoint import read_tensors

        model.load_state_dict(read_tensors(checkpoint), strict=True)
    return model
