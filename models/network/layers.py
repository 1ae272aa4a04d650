"""The small MLPs every part is built from, with the LayerNorm the reference layout puts after the first Linear.

Index positions are part of the checkpoint's key names: without the norm a two-layer MLP is ``0`` (Linear),
``2`` (Linear); with it ``0``, ``1`` (LayerNorm), ``3``. That is the reference's numbering too, so its
checkpoints map onto these modules name by name.
"""

from __future__ import annotations

from torch import nn


def dense(in_features: int, out_features: int, norm: bool = False) -> nn.Sequential:
    """Linear, optional LayerNorm, GELU."""
    return nn.Sequential(
        nn.Linear(in_features, out_features), *([nn.LayerNorm(out_features)] if norm else []), nn.GELU()
    )


def mlp(in_features: int, hidden: int, out_features: int, norm: bool = False) -> nn.Sequential:
    """Linear, optional LayerNorm, GELU, Linear."""
    return nn.Sequential(*dense(in_features, hidden, norm), nn.Linear(hidden, out_features))
